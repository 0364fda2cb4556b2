package rules

import (
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/culprit-dev/culprit/signals"
	"github.com/culprit-dev/culprit/workload"
)

// A thread is judged by what it does, not by its name alone (see
// signals/threads.go): the stack of the episode first, then what the thread
// was seen doing (its idle waits), then the name pattern of
// [rules.workers], which adds the threads stacks say nothing about (a Go
// program's worker pool, an unknown runtime) but never overrides what a
// runtime's frames said (Tokio names its blocking pool like its workers).

// threadClass is what the rules know of the thread an episode ran on.
type threadClass struct {
	role    signals.Role
	runtime signals.Runtime
	pool    string // the pool's name, from the thread's: the finding's key
	byName  bool   // only the name pattern says it serves tasks
}

// serves reports whether a blocking call or a long run on the thread
// holds up work: a worker's tasks or an event loop's callbacks.
func (v threadClass) serves() bool {
	return v.role == signals.RoleWorker || v.role == signals.RoleEventLoop
}

// threadOf tells what e's thread is, from cls (what e's own stack says;
// zero for a busy episode, which has no stack).
func threadOf(w Window, e signals.Episode, cls signals.StackClass) threadClass {
	v := threadClass{role: cls.Role, runtime: cls.Runtime, pool: poolName(e.Thread)}
	var k signals.ThreadInfo
	known := false
	if w.Episodes != nil {
		k, known = w.Episodes.Thread(e.Tid)
		known = known && (e.Pid == 0 || k.Pid == e.Pid)
	}
	sameRuntime := cls.Runtime == signals.RuntimeUnknown || cls.Runtime == k.Runtime || (k.Runtime == signals.RuntimeNode && cls.Runtime == signals.RuntimeLibuv)
	switch {
	case cls.Runtime != signals.RuntimeUnknown && cls.Role != signals.RoleUnknown && !cls.ByWait:
	case known && k.Runtime != signals.RuntimeUnknown && sameRuntime:
		// The episode's stack was cut short of the runtime's frames (C
		// built without frame pointers); the thread's idle waits were not.
		v.role, v.runtime = k.Role, k.Runtime
	case cls.Role != signals.RoleUnknown:
	case known && cls.Runtime == signals.RuntimeUnknown:
		v.role = k.Role
	}
	if v.role == signals.RoleUnknown {
		if _, named := w.Pools.Pool(e.Thread); named {
			v.role, v.byName = signals.RoleWorker, true
		}
	}
	return v
}

// blockHow is how a block holds up its thread's work.
type blockHow uint8

const (
	// blockingCall: a sleep outside the thread's idle wait (nanosleep,
	// fsync, a lock taken inside a task).
	blockingCall blockHow = iota
	// nestedLoop: an event loop run from inside a callback (Node.js's
	// execSync): the same call as the idle wait, one loop deeper.
	nestedLoop
	// looksIdle: a sleep in an idle call (epoll, poll, select) that is
	// not the thread's own idle wait, while work waited for the loop.
	looksIdle
)

// blockJudgement is why a block episode is, or is not, a finding.
type blockJudgement struct {
	thread threadClass
	cls    signals.StackClass
	how    blockHow
	// idle: the block is the thread's idle wait.
	idle bool
	// waited is how long work waited for the process during the block,
	// what in words ("data unread on 3 sockets"; "-" once read and
	// none), evidence its signal.
	waited   time.Duration
	what     string
	evidence Evidence
}

// judgeBlock decides whether block e held up the work its thread serves:
// the thread must serve tasks or callbacks, and the sleep must not be its
// idle wait. A sleep in an idle call counts only when the runtime's frames
// say it is not the idle wait (a task's lock, a nested loop), or, when
// they cannot tell, when it is not the wait the loop usually sleeps in and
// work waited for at least threshold meanwhile. On an epoll loop of a
// runtime culprit does not know, even a plain blocking call counts only
// with work seen waiting: such a thread may be one of a pool of
// synchronous handlers (gRPC's), where blocking is the design.
//
// Judgements are memoized per evaluation engine (Window.memo): an episode
// whose key, duration and thread class (signals.ThreadInfo.Gen) are those
// of a judgement already made is not judged again, unless that judgement
// read something else that moves (whether work waited, the thread's most
// frequent wait, the other event loops): those are judged every time.
func judgeBlock(w Window, e signals.Episode, threshold time.Duration) (blockJudgement, bool) {
	if w.memo == nil {
		j, blocked, _ := judgeBlockOnce(w, e, threshold)
		return j, blocked
	}
	return w.memo.judge(w, e, threshold)
}

func judgeBlockOnce(w Window, e signals.Episode, threshold time.Duration) (j blockJudgement, blocked, pure bool) {
	pure = true
	defer func() {
		if j.what != "" {
			pure = false // read the store: work waited
		}
	}()
	cls := w.memo.classify(e)
	j = blockJudgement{thread: threadOf(w, e, cls), cls: cls}
	if j.thread.role == signals.RoleBlockingPool || j.thread.role == signals.RoleHelper {
		j.idle = true
		return j, false, pure
	}
	if !j.thread.serves() {
		j.idle = w.Pools.Idle(e.Syscall())
		return j, false, pure
	}
	// What waited is read only where it decides (reading it is the
	// costly part); the finding's own episode reads it for its evidence.
	waited := func() time.Duration {
		if j.what == "" {
			j.waited, j.what, j.evidence = workWaited(w, e.Start, e.End())
			if j.what == "" {
				j.what = "-"
			}
		}
		return j.waited
	}
	sc := e.Syscall()
	switch {
	case cls.IdleKnown && cls.Idle:
		j.idle = true
		return j, false, pure
	case cls.IdleKnown:
		j.how = blockingCall
		if cls.Nested {
			j.how = nestedLoop
		}
	case sc != "" && !w.Pools.Idle(sc):
		j.how = blockingCall
	default:
		// An idle call, and the stack cannot say whose wait it is.
		j.idle = true
		if j.thread.role != signals.RoleEventLoop || j.thread.byName {
			return j, false, pure
		}
		// The thread's usual wait and the other loops move with every
		// sleep seen: not memoized.
		pure = false
		if homeWait(w, e) || waited() < threshold || !onlyLoop(w, e) {
			return j, false, pure
		}
		j.idle = false
		j.how = looksIdle
	}
	if j.thread.runtime == signals.RuntimeUnknown && !j.thread.byName && waited() < threshold {
		return j, false, pure
	}
	return j, true, pure
}

// judgeMemo keeps the judgements of one engine's evaluations, and the
// classes of the stacks they read (ClassifyStack is pure: a stack that
// comes back, an event loop's idle wait every time, is classified once).
// Bounded: it starts again empty past maxJudgeMemo entries, and entries
// of episodes no longer asked about go at the next pruning.
type judgeMemo struct {
	mu      sync.Mutex
	entries map[judgeKey]judgeEntry
	classes map[stackID]stackClassEntry
	evals   uint64 // evaluations seen (prune)
}

const maxJudgeMemo = 4096

// judgeKey is what a judgement is made from, besides the thread's class.
type judgeKey struct {
	tid       int
	start     time.Time
	dur       time.Duration
	ongoing   bool
	thread    string
	threshold time.Duration
	stack     stackID
}

type judgeEntry struct {
	gen     uint64 // ThreadInfo.Gen it was judged with (0: thread unknown)
	j       blockJudgement
	blocked bool
	used    uint64 // the evaluation that last asked
}

// stackID identifies a stack by its storage: the sched probe hands the
// same slice for the same stack (it caches each thread's last one), and an
// entry keeps its slice alive, so the address cannot be reused meanwhile.
type stackID struct {
	first     *string
	n, kernel int
	libc      int
}

type stackClassEntry struct {
	stack []string // keeps the storage alive
	cls   signals.StackClass
	used  uint64
}

func idOf(e signals.Episode) stackID {
	id := stackID{n: len(e.Stack), kernel: e.KernelFrames, libc: e.LibcFrames}
	if len(e.Stack) > 0 {
		id.first = &e.Stack[0]
	}
	return id
}

func newJudgeMemo() *judgeMemo {
	return &judgeMemo{entries: map[judgeKey]judgeEntry{}, classes: map[stackID]stackClassEntry{}}
}

// next marks the start of an evaluation; every 64 evaluations, entries no
// evaluation asked about since the last pruning go.
func (m *judgeMemo) next() {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.evals++
	if m.evals%64 != 0 {
		return
	}
	for k, v := range m.entries {
		if m.evals-v.used > 64 {
			delete(m.entries, k)
		}
	}
	for k, v := range m.classes {
		if m.evals-v.used > 64 {
			delete(m.classes, k)
		}
	}
}

// classify is signals.ClassifyStack of e's caller stack and call, once per
// stack.
func (m *judgeMemo) classify(e signals.Episode) signals.StackClass {
	if m == nil {
		return signals.ClassifyStack(e.CallerStack(), e.Syscall())
	}
	id := idOf(e)
	m.mu.Lock()
	if c, ok := m.classes[id]; ok {
		c.used = m.evals
		m.classes[id] = c
		m.mu.Unlock()
		return c.cls
	}
	m.mu.Unlock()
	cls := signals.ClassifyStack(e.CallerStack(), e.Syscall())
	if id.first == nil {
		return cls
	}
	m.mu.Lock()
	if len(m.classes) >= maxJudgeMemo {
		clear(m.classes)
	}
	m.classes[id] = stackClassEntry{e.Stack, cls, m.evals}
	m.mu.Unlock()
	return cls
}

func (m *judgeMemo) judge(w Window, e signals.Episode, threshold time.Duration) (blockJudgement, bool) {
	gen, _ := threadGen(w, e.Tid)
	k := judgeKey{e.Tid, e.Start, e.Duration, e.Ongoing, e.Thread, threshold, idOf(e)}
	m.mu.Lock()
	if c, ok := m.entries[k]; ok && c.gen == gen {
		c.used = m.evals
		m.entries[k] = c
		m.mu.Unlock()
		return c.j, c.blocked
	}
	m.mu.Unlock()
	j, blocked, pure := judgeBlockOnce(w, e, threshold)
	if pure {
		m.mu.Lock()
		if len(m.entries) >= maxJudgeMemo {
			clear(m.entries)
		}
		m.entries[k] = judgeEntry{gen, j, blocked, m.evals}
		m.mu.Unlock()
	}
	return j, blocked
}

// threadGen is the class generation of thread tid (0 and false when the
// source cannot tell, or does not know the thread).
func threadGen(w Window, tid int) (uint64, bool) {
	if g, ok := w.Episodes.(interface{ ThreadGen(int) (uint64, bool) }); ok {
		return g.ThreadGen(tid)
	}
	return 0, false
}

// withWork fills in what waited during the block, if judgeBlock did not
// need to read it.
func (j *blockJudgement) withWork(w Window, e signals.Episode) {
	if j.what == "" {
		j.waited, j.what, j.evidence = workWaited(w, e.Start, e.End())
	}
	if j.what == "-" {
		j.what = ""
	}
}

// homeWait reports whether block e sleeps where its thread usually waits
// for work: its last idle stack, or the stack it sleeps in most.
func homeWait(w Window, e signals.Episode) bool {
	if w.Episodes == nil {
		return false
	}
	t, ok := w.Episodes.Thread(e.Tid)
	if !ok {
		return false
	}
	return t.AtHome(e.Syscall(), e.CallerStack(), e.Start)
}

// onlyLoop reports whether e's thread is the only event loop seen in its
// process: work waiting on the process's sockets is then that loop's.
func onlyLoop(w Window, e signals.Episode) bool {
	if w.Episodes == nil {
		return false
	}
	for _, t := range w.Episodes.Threads() {
		if t.Tid != e.Tid && (e.Pid == 0 || t.Pid == e.Pid) && t.Role == signals.RoleEventLoop {
			return false
		}
	}
	return true
}

// workWaited is the longest time work waited for the process within
// [start, end]: data unread on its sockets (counted only from start: data
// left unread before is not what this sleep kept waiting), or connections
// in a listener's accept queue (from the first sample that saw it
// non-empty to the last that still did).
func workWaited(w Window, start, end time.Time) (time.Duration, string, Evidence) {
	var best time.Duration
	var what string
	var ev Evidence
	if w.Store == nil {
		return 0, "", Evidence{}
	}
	// The sockcalls probe and the accept_queue collector say when work
	// waits for the process: data nobody reads (the age of the oldest
	// unread data on its sockets, and how many sockets have data unread
	// longer than a poll), connections nobody accepts.
	for _, ls := range w.Store.Select(signals.ProcessUnreadOldestSeconds) {
		for _, s := range w.Store.Range(signals.ProcessUnreadOldestSeconds, ls, start) {
			if s.T.After(end) || s.V <= 0 {
				continue
			}
			d := min(time.Duration(s.V*float64(time.Second)), s.T.Sub(start))
			if d > best {
				best = d
				what = "data waited unread on the process's sockets"
				if n := valueAt(w, signals.ProcessUnreadSockets, s.T); n > 0 {
					what = "data waited unread on " + count(n, "socket", "") + " of the process"
				}
				ev = Evidence{Signal: signals.ProcessUnreadOldestSeconds.Name + ls.String(), Value: d.Seconds(), Unit: "seconds", Note: "unread data waited this long while the thread slept"}
			}
		}
	}
	for _, ls := range w.Store.Select(signals.ListenQueueLength) {
		var first time.Time
		peak := 0.0
		for _, s := range w.Store.Range(signals.ListenQueueLength, ls, start) {
			if s.T.After(end) {
				break
			}
			if s.V <= 0 {
				first, peak = time.Time{}, 0
				continue
			}
			if first.IsZero() {
				first = s.T
			}
			peak = max(peak, s.V)
			if d := s.T.Sub(first); d > best {
				best = d
				what = count(peak, "connection", "") + " waited in the accept queue of " + joinHostPort(ls.Get("addr"), ls.Get("port"))
				ev = Evidence{Signal: signals.ListenQueueLength.Name + ls.String(), Value: d.Seconds(), Unit: "seconds", Note: "the accept queue stayed non-empty this long while the thread slept"}
			}
		}
	}
	return best, what, ev
}

// valueAt is the value of d (summed over its series) in force at t: each
// series' last sample at or before t. Producers write a gauge when it
// changes and at least every second otherwise, so a sample is never older
// than valueAtReach; one only at exactly t missed the count of sockets
// that had not changed since the last poll ("data waited unread on the
// process's sockets", with no count, was seen).
func valueAt(w Window, d *signals.Desc, t time.Time) float64 {
	var v float64
	for _, ls := range w.Store.Select(d) {
		var last float64
		for _, s := range w.Store.Range(d, ls, t.Add(-valueAtReach)) {
			if s.T.After(t) {
				break
			}
			last = s.V
		}
		v += last
	}
	return v
}

// valueAtReach is how far back valueAt looks: a second's refresh and a
// poll's slack.
const valueAtReach = 2 * time.Second

// culpritOf names the function that made e's call, in the terms of its
// runtime: for Node.js the JavaScript function (from the JIT's perf map)
// rather than the engine's frames, for others the first frame that is
// neither the C library's nor a runtime's wrapper.
func culpritOf(e signals.Episode, rt signals.Runtime) string {
	user := e.CallerStack()
	if rt == signals.RuntimeNode || rt == signals.RuntimeLibuv || hasAppJS(user) {
		var lib, native string
		for _, f := range user {
			if file, ok := jsFile(f); ok {
				if !strings.HasPrefix(file, "node:") && !strings.HasPrefix(file, "internal/") {
					return f // the app's own JavaScript
				}
				if lib == "" {
					lib = f // node's library (execSync) when the app's is not on the stack
				}
				continue
			}
			if native == "" && !nodeInternal(f) {
				native = f
			}
		}
		if lib != "" {
			return lib
		}
		if native != "" {
			return native
		}
	}
	return culpritFrame(user)
}

// appJS reports whether f is the app's own JavaScript: a frame named from
// the perf map whose script is not node's (node:..., internal/...).
func appJS(f string) bool {
	file, ok := jsFile(f)
	return ok && !strings.HasPrefix(file, "node:") && !strings.HasPrefix(file, "internal/")
}

func hasAppJS(user []string) bool { return slices.ContainsFunc(user, appJS) }

// appFrame is the app's own function on a CPU sample's stack: the first
// frame up from the leaf that is neither a library's, a runtime's nor a
// wrapper. Where the app is JavaScript, that is its first JavaScript frame
// (everything below it is V8, node's C++ and node's own JavaScript, or
// what they call: OpenSSL under pbkdf2Sync); otherwise the first frame
// outside shared libraries that culpritFrame would not skip. "" when the
// stack has none: its samples ran for no function of the app that can be
// told (a GC, the engine's compiler).
func appFrame(s StackShare, rt signals.Runtime) string {
	if rt == signals.RuntimeNode || rt == signals.RuntimeLibuv || hasAppJS(s.Frames) {
		for _, f := range s.Frames {
			if appJS(f) {
				return f
			}
		}
		return ""
	}
	for i, f := range s.Frames {
		if i < len(s.Library) && s.Library[i] {
			continue
		}
		if strings.Contains(f, "+0x") || slices.ContainsFunc(wrapperPrefixes, func(p string) bool { return strings.HasPrefix(f, p) }) {
			continue
		}
		return f
	}
	return ""
}

// jsFile returns the script of a JavaScript frame as the symbolizer names
// it from a perf map, "handler (/app/server.js:12)".
func jsFile(f string) (string, bool) {
	i := strings.LastIndex(f, " (")
	if i <= 0 || !strings.HasSuffix(f, ")") {
		return "", false
	}
	file := f[i+2 : len(f)-1]
	if strings.ContainsAny(file, "()") {
		return "", false
	}
	if j := strings.LastIndexByte(file, ':'); j > 0 {
		if _, err := strconv.Atoi(file[j+1:]); err == nil {
			file = file[:j]
		}
	}
	return file, strings.HasPrefix(file, "/") || strings.HasPrefix(file, "node:") || strings.HasPrefix(file, "file:") ||
		strings.HasSuffix(file, ".js") || strings.HasSuffix(file, ".mjs") || strings.HasSuffix(file, ".cjs") || strings.HasSuffix(file, ".ts")
}

// nodeInternal: libuv's loop and V8's engine frames between a sleep and
// what called it.
func nodeInternal(f string) bool {
	for _, p := range []string{"uv_", "uv__", "Builtins_", "Builtin:", "BytecodeHandler:", "Stub:", "v8::internal::", "v8::", "0x"} {
		if strings.HasPrefix(f, p) {
			return true
		}
	}
	return strings.Contains(f, "+0x")
}

// roleWords is how a finding names a thread's role: "async worker" for a
// pool's worker, "event loop" for a loop that runs alone.
func roleWords(v threadClass) string {
	if v.role == signals.RoleEventLoop {
		return "event loop"
	}
	return "async worker"
}

// runtimeName is the runtime in prose, "" when unknown.
func runtimeName(rt signals.Runtime) string {
	switch rt {
	case signals.RuntimeTokio:
		return "Tokio"
	case signals.RuntimeActix:
		return "actix"
	case signals.RuntimeNode:
		return "Node.js"
	case signals.RuntimeLibuv:
		return "libuv"
	case signals.RuntimeRedis:
		return "redis"
	case signals.RuntimeNginx:
		return "nginx"
	case signals.RuntimeAsyncio:
		return "asyncio"
	case signals.RuntimeGo:
		return "Go"
	}
	return ""
}

// advisorFor words remediation for thread v: in the target's runtime as
// detected (Window.Runtime), or, when detection did not tell, in the
// runtime the thread's own frames showed; neutral when neither did.
func advisorFor(w Window, v threadClass) Advisor {
	if w.Runtime.Known() {
		return w.advice()
	}
	if rt, ok := targetRuntime(v.runtime); ok {
		return NewAdvisor(rt)
	}
	return w.advice()
}

// targetRuntime is what a thread's frames say of the program, in
// workload.Runtime's terms.
func targetRuntime(rt signals.Runtime) (workload.Runtime, bool) {
	fw := func(lang workload.Lang, names ...string) (workload.Runtime, bool) {
		r := workload.Runtime{Lang: lang, Sources: []string{"thread stacks"}}
		for _, n := range names {
			r.Frameworks = append(r.Frameworks, workload.Framework{Name: n})
		}
		return r, true
	}
	switch rt {
	case signals.RuntimeTokio:
		return fw(workload.LangRust, workload.FwTokio)
	case signals.RuntimeActix:
		return fw(workload.LangRust, workload.FwActix, workload.FwTokio)
	case signals.RuntimeNode:
		return fw(workload.LangNode, workload.FwLibuv)
	case signals.RuntimeLibuv:
		return fw(workload.LangC, workload.FwLibuv)
	case signals.RuntimeRedis:
		return fw(workload.LangC, workload.FwRedis)
	case signals.RuntimeNginx:
		return fw(workload.LangC, workload.FwNginx)
	case signals.RuntimeAsyncio:
		return fw(workload.LangPython, workload.FwAsyncio)
	case signals.RuntimeGo:
		return fw(workload.LangGo)
	}
	return workload.Runtime{}, false
}

// Frames of a thread in its own I/O, or waiting for it: the C library's
// wrappers of the socket and poll calls, and of the file calls a server
// makes to serve a file, and the kernel's when a sample has no user frame.
// A busy loop whose samples are mostly these is serving its connections,
// not computing. The file calls count: nginx flat out on a static file
// spent 15 % of its worker's samples in open, 9 % in fstatat and 4 % in
// pread (measured, user leaves), and without them a run's share of I/O
// could dip under max_io_share in a short run's few samples and name
// "open" as CPU-heavy work. A thread asleep in one of them is
// blocking_worker's, which does not read this list.
var ioCalls = []string{"read", "write", "readv", "writev", "pread", "pread64", "preadv", "pwrite", "pwrite64", "pwritev",
	"recv", "recvfrom", "recvmsg", "recvmmsg", "send", "sendto", "sendmsg", "sendmmsg", "sendfile", "sendfile64", "splice",
	"accept", "accept4", "connect", "close", "shutdown", "setsockopt", "getsockopt", "getsockname", "getpeername",
	"open", "open64", "openat", "openat64", "fstat", "fstat64", "fstatat", "fstatat64", "newfstatat", "stat", "stat64",
	"lstat", "lstat64", "statx", "lseek", "lseek64", "fcntl", "fcntl64",
	"epoll_wait", "epoll_pwait", "epoll_pwait2", "epoll_ctl", "poll", "ppoll", "select", "pselect", "pselect6", "io_uring_enter"}

// ioFrame reports whether a hot frame is I/O or an idle wait: libc's
// names come as epoll_wait, __GI_epoll_wait, __libc_read, __write...
func ioFrame(f string) bool {
	for _, p := range []string{"tcp_", "udp_", "sock_", "__sys_", "__x64_sys_", "do_epoll", "ep_poll", "do_sys_poll", "io_uring", "entry_SYSCALL"} {
		if strings.HasPrefix(f, p) {
			return true
		}
	}
	n := strings.TrimPrefix(f, "__GI_")
	n = strings.TrimPrefix(n, "__libc_")
	n = strings.TrimLeft(n, "_")
	n = strings.TrimPrefix(n, "libc_")
	n = strings.TrimSuffix(n, "_nocancel")
	return slices.Contains(ioCalls, n)
}

// stallKind tells accept_overflow's search for the thread that stalled an
// accept loop what episode e is: serving, a worker or event loop held up
// outside its idle wait (a blocking call, a run without yielding); idle,
// a wait for work or a pool meant to block, never the stall's cause.
// Episodes neither serving nor idle are other threads' long sleeps.
func stallKind(w Window, e signals.Episode, threshold time.Duration) (serving, idle bool) {
	if e.Kind == signals.EpisodeBusy {
		v := threadOf(w, e, signals.StackClass{})
		return v.serves(), v.role == signals.RoleBlockingPool || v.role == signals.RoleHelper
	}
	j, blocked := judgeBlock(w, e, threshold)
	return blocked, !blocked && j.idle
}
