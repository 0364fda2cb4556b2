package rules

import (
	"fmt"
	"regexp"
	"slices"
	"strings"
	"time"

	"github.com/culprit-dev/culprit/signals"
)

// EpisodeSource is what the worker rules read: block and busy episodes of
// the target's threads, and what each thread was seen doing
// (signals.Episodes).
type EpisodeSource interface {
	Since(kind string, from time.Time) []signals.Episode
	// Thread is what thread tid's stacks showed: its runtime, its role
	// (worker, event loop, blocking pool, helper) and its idle waits.
	Thread(tid int) (signals.ThreadInfo, bool)
	// Threads is every thread known so.
	Threads() []signals.ThreadInfo
}

// FrameShare is one function's share of a thread's CPU samples.
type FrameShare struct {
	Func  string
	Share float64 // 0..1 of the thread's samples in the window
}

// HotFrames names where a thread spent its CPU between from and to, from
// the CPU profiler: the hottest functions by self time, at most n.
type HotFrames interface {
	HotFrames(tid int, from, to time.Time, n int) []FrameShare
}

// StackShare is one distinct user stack among a thread's CPU samples and
// its share of them.
type StackShare struct {
	Frames []string // leaf first, as symbolize.Frame.String names them
	// Library marks the frames in a shared library (the C library,
	// libcrypto, libstdc++): code the program called, never the function
	// to name. Parallel to Frames; may be shorter (then false).
	Library []bool
	Share   float64 // 0..1 of the thread's samples in the window
}

// HotStacks is implemented by a HotFrames source that also has the
// samples' whole stacks: the function of the app that the hot leaves
// (OpenSSL's SHA-512, memcpy) ran for is up the stack.
type HotStacks interface {
	// HotStacks returns thread tid's distinct user stacks between from
	// and to, most samples first, at most n.
	HotStacks(tid int, from, to time.Time, n int) []StackShare
}

// WorkerPools is [rules.workers]: thread names that are workers, and the
// system calls of idle waits. Threads are first told apart by their
// stacks (threads.go: Tokio's blocking pool is named like its workers,
// redis's and Node.js's event loops are named after the program); the
// name pattern adds the threads no runtime's frames describe (a Go
// program's pool such as worker-3, an unknown runtime's workers) and
// groups threads into pools. A blocking call on a worker stalls every task
// queued behind it, while the same call on a thread of a blocking pool is
// what that pool is for.
type WorkerPools struct {
	Match *regexp.Regexp // thread names that are workers
	// IdleSyscalls are where a worker waits for work: a sleep in one of
	// these is the event loop being idle, not a blocking call.
	IdleSyscalls []string
}

// DefaultWorkerThreads matches the worker threads of common async runtimes.
// libuv's threadpool (uv_worker, libuv-worker) is not among them: it is
// Node.js's blocking pool, where a blocking call belongs.
const DefaultWorkerThreads = `^(tokio-runtime-w|tokio-rt-worker|actix-rt|actix-server|async-std|smol|worker|event-?loop|reactor|nio)`

// DefaultIdleSyscalls are the waits of an idle event loop or of a parked
// worker.
var DefaultIdleSyscalls = []string{"epoll_wait", "epoll_pwait", "epoll_pwait2", "io_uring_enter", "futex", "poll", "ppoll", "select", "pselect6", "rt_sigtimedwait", "rt_sigsuspend", "pause"}

// Pool returns the pool a thread belongs to ("worker" for worker-3), and
// whether it is a worker at all.
func (wp WorkerPools) Pool(thread string) (string, bool) {
	if wp.Match == nil || !wp.Match.MatchString(thread) {
		return "", false
	}
	return poolName(thread), true
}

// poolName is the name of the pool a thread's name puts it in: the name
// without its trailing number.
func poolName(thread string) string {
	p := strings.TrimRight(thread, "0123456789")
	p = strings.TrimRight(p, "-_#:.| ")
	if p == "" {
		p = thread
	}
	return p
}

// Idle reports whether a block in syscall is an idle wait.
func (wp WorkerPools) Idle(syscall string) bool { return slices.Contains(wp.IdleSyscalls, syscall) }

// wrapperPrefixes are frames between the code that made a call and the
// kernel: runtimes' and libc's syscall wrappers, and the standard
// libraries' thin I/O types (os.(*File).Sync, std::fs::File::sync_all),
// which name the call but not who made it. The first user frame that is
// none of these is the function to name.
var wrapperPrefixes = []string{
	"runtime.", "runtime/internal/", "syscall.", "internal/runtime/", "internal/poll.", "golang.org/x/sys/unix.",
	"os.", "io.", "io/ioutil.", "bufio.", "net.(*conn).", "net.(*netFD).", "net.(*TCPConn).", "net.(*UnixConn).",
	"std::fs::", "std::io::", "std::net::", "std::sync::", "<std::sync::", "parking_lot::", "<parking_lot::", "lock_api::", "<lock_api::",
	"tokio::runtime::", "tokio::loom::", "mio::", "<mio::",
	"__GI_", "__libc_", "__lll_", "__pthread", "pthread_", "__futex", "__nanosleep", "__clock_nanosleep",
	"clock_nanosleep", "nanosleep", "__select", "__poll", "__read", "__write", "__fsync", "fsync",
	"fdatasync", "__connect", "__recv", "__send", "syscall", "__syscall", "std::sys::", "<std::sys::", "std::thread::",
	// V8's own code between a JavaScript caller and the call it made.
	"Builtin:", "BytecodeHandler:", "Stub:", "Builtins_", "v8::",
	"0x",
}

// culpritFrame is the first user frame that is not a wrapper, or the leaf
// user frame when all are.
func culpritFrame(user []string) string {
	for _, f := range user {
		wrapper := false
		for _, p := range wrapperPrefixes {
			if strings.HasPrefix(f, p) {
				wrapper = true
				break
			}
		}
		if !wrapper && !strings.Contains(f, "+0x") {
			return f
		}
	}
	if len(user) > 0 {
		return user[0]
	}
	return ""
}

// stackArtifact is a stack as one readable line per frame, leaf first,
// at most depth frames.
func stackArtifact(e signals.Episode, depth int) Artifact {
	frames := e.Stack
	if len(frames) > depth {
		frames = frames[:depth]
	}
	return Artifact{Kind: "stack", Value: strings.Join(frames, "\n"),
		Detail: fmt.Sprintf("%s (tid %d), %d kernel frames first", e.Thread, e.Tid, min(e.KernelFrames, len(frames)))}
}

func threadArtifact(e signals.Episode) Artifact {
	return Artifact{Kind: "thread", Value: fmt.Sprintf("%s (tid %d)", e.Thread, e.Tid)}
}

// seconds is a duration as "0.4 s", the wording accept_overflow's stalled
// thread keeps; the worker rules use duration.
func seconds(d time.Duration) string { return fmt.Sprintf("%.1f s", d.Seconds()) }
