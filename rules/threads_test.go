package rules

import (
	"regexp"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/culprit-dev/culprit/signals"
	"github.com/culprit-dev/culprit/workload"
)

// Stacks as the sched probe symbolized them on this machine for real
// programs (redis 7.0, nginx 1.22, Node.js 20, Tokio 1.24 under hyper
// 0.14, CPython 3.11's asyncio): kernel frames first, then the user stack,
// leaf first, with the C library's wrapper at the leaf.
var (
	kEpollWait  = []string{"__schedule", "schedule_hrtimeout_range", "do_epoll_wait", "__x64_sys_epoll_wait", "do_syscall_64", "entry_SYSCALL_64_after_hwframe"}
	kEpollPwait = []string{"__schedule", "schedule_hrtimeout_range", "do_epoll_wait", "do_epoll_pwait.part.0", "__x64_sys_epoll_pwait", "do_syscall_64"}
	kNanosleep  = []string{"__schedule", "do_nanosleep", "hrtimer_nanosleep", "common_nsleep", "__x64_sys_clock_nanosleep", "do_syscall_64"}
	kFutex      = []string{"__schedule", "futex_wait_queue", "__futex_wait", "futex_wait", "do_futex", "__x64_sys_futex", "do_syscall_64"}
	kSelect     = []string{"__schedule", "schedule_hrtimeout_range", "do_select", "core_sys_select", "__x64_sys_pselect6", "do_syscall_64"}
	kRead       = []string{"__schedule", "io_schedule", "folio_wait_bit_common", "filemap_read", "vfs_read", "ksys_read", "__x64_sys_read", "do_syscall_64"}

	uRedisIdle  = []string{"epoll_wait", "redis-check-rdb+0x64e51", "aeMain", "main", "libc.so.6+0x2724a", "__libc_start_main", "_start"}
	uRedisSleep = []string{"clock_nanosleep", "nanosleep", "debugCommand", "0x518f800000000000"} // cut short: no ptrace access

	uNginxIdle = []string{"epoll_wait", "nginx+0x54174", "ngx_process_events_and_timers", "nginx+0x51b5d", "ngx_spawn_process", "nginx+0x51398", "ngx_master_process_cycle", "main"}

	uNodeIdle = []string{"epoll_pwait", "uv__io_poll", "uv_run", "node::SpinEventLoopInternal", "node::NodeMainInstance::Run", "node::Start", "libc.so.6+0x2724a", "__libc_start_main"}
	uNodeExec = []string{"epoll_pwait", "uv__io_poll", "uv_run", "node::SyncProcessRunner::TryInitializeAndRunLoop", "node::SyncProcessRunner::Spawn",
		"v8::internal::FunctionCallbackArguments::Call", "v8::internal::(anonymous namespace)::HandleApiCallHelper", "v8::internal::Builtin_HandleApiCall", "Builtins_CEntry_Return1_ArgvOnStack_BuiltinExit"}
	// The same, once the symbolizer names V8's JIT frames from the perf
	// map and the unwinder gets through them.
	uNodeExecJS = append(slices.Clone(uNodeExec), "spawnSync (node:internal/child_process:1114)", "spawnSync (node:child_process:870)", "execSync (node:child_process:957)",
		"handler (/app/server.js:12)", "emit (node:events:519)", "Builtins_JSEntryTrampoline")
	uNodePlatform   = []string{"__futex_abstimed_wait_common", "pthread_cond_wait", "uv_cond_wait", "node::TaskQueue<v8::Task>::BlockingPop", "node::(anonymous namespace)::PlatformWorkerThread", "libc.so.6+0x891f5"}
	uNodeThreadpool = []string{"__futex_abstimed_wait_common", "pthread_cond_wait", "uv_cond_wait", "worker", "libc.so.6+0x891f5"}
	uNodeFSRead     = []string{"read", "uv__fs_work", "worker", "libc.so.6+0x891f5"}

	uTokioIdle = []string{"epoll_wait", "mio::poll::Poll::poll", "tokio::runtime::io::Driver::turn", "tokio::runtime::time::Driver::park_internal",
		"tokio::runtime::scheduler::multi_thread::park::Parker::park", "tokio::runtime::scheduler::multi_thread::worker::Context::park_timeout",
		"tokio::runtime::scheduler::multi_thread::worker::Context::run", "tokio::runtime::scheduler::multi_thread::worker::run",
		"tokio::runtime::task::core::Core<T,S>::poll", "tokio::runtime::task::harness::Harness<T,S>::poll", "tokio::runtime::blocking::pool::Inner::run"}
	uTokioPark = []string{"syscall", "<std::sys::sync::condvar::futex::Condvar>::wait", "tokio::runtime::scheduler::multi_thread::park::Parker::park",
		"tokio::runtime::scheduler::multi_thread::worker::Context::park_timeout", "tokio::runtime::scheduler::multi_thread::worker::Context::run",
		"tokio::runtime::scheduler::multi_thread::worker::run", "tokio::runtime::task::core::Core<T,S>::poll", "tokio::runtime::blocking::pool::Inner::run"}
	uTokioBlock = []string{"clock_nanosleep", "std::thread::functions::sleep", "tokio_hyper::load_user_sync", "hyper::proto::h1::dispatch::Dispatcher<D,Bs,I,T>::poll_catch",
		"tokio::runtime::task::core::Core<T,S>::poll", "tokio::runtime::task::harness::Harness<T,S>::poll", "tokio::runtime::scheduler::multi_thread::worker::Context::run_task",
		"tokio::runtime::scheduler::multi_thread::worker::Context::run", "tokio::runtime::scheduler::multi_thread::worker::run",
		"tokio::runtime::task::core::Core<T,S>::poll", "tokio::runtime::task::harness::Harness<T,S>::poll", "tokio::runtime::blocking::pool::Inner::run"}
	uTokioOffload = []string{"clock_nanosleep", "std::thread::functions::sleep", "tokio_hyper::load_user_sync", "tokio::runtime::task::core::Core<T,S>::poll",
		"tokio::runtime::task::harness::Harness<T,S>::poll", "tokio::runtime::blocking::pool::Inner::run", "std::sys::backtrace::_rust_begin_short_backtrace"}
	uTokioPoolIdle = []string{"syscall", "<std::sys::sync::condvar::futex::Condvar>::wait_optional_timeout", "tokio::runtime::blocking::pool::Inner::run"}

	uAsyncioIdle   = []string{"epoll_wait", "select_epoll_poll", "_PyEval_EvalFrameDefault", "PyEval_EvalCode", "run_mod", "Py_RunMain"}
	uAsyncioSelect = []string{"select", "select_select_impl.constprop.0", "0xc3500"} // select.select in a handler, cut short
)

// ep is a block episode of thread tid with its kernel and user stacks;
// the user stack's first libc frames are the C library's.
func ep(pid, tid int, thread string, start time.Time, d time.Duration, kernel, user []string, libc int) signals.Episode {
	return signals.Episode{Kind: signals.EpisodeBlock, Pid: pid, Tid: tid, Thread: thread, Start: start, Duration: d,
		Stack: append(slices.Clone(kernel), user...), KernelFrames: len(kernel), LibcFrames: libc}
}

// seen records that a thread was seen sleeping with these stacks, as the
// sched probe does for every sleep it reads.
func seen(es *signals.Episodes, e signals.Episode) {
	es.Observe(signals.ThreadSight{Pid: e.Pid, Tid: e.Tid, Name: e.Thread, Start: e.Start, Stack: e.Stack, KernelFrames: e.KernelFrames, LibcFrames: e.LibcFrames, At: e.Start})
}

func blockRule() *BlockingWorker {
	return NewBlockingWorker(BlockingWorkerOptions{Window: 10 * time.Second, MinBlock: 250 * time.Millisecond})
}

func hasArtifact(o Observation, kind, value string) bool {
	return slices.ContainsFunc(o.Artifacts, func(a Artifact) bool { return a.Kind == kind && a.Value == value })
}

// Tokio 1.24 names its blocking pool's threads like its workers. A sleep
// moved to spawn_blocking (the fix) is silent even when it is the longest;
// the real block on a worker is the one named, with Tokio's fix.
func TestBlockingWorkerTokioWorkerNotBlockingPool(t *testing.T) {
	now := time.Now()
	const name = "tokio-runtime-w"
	offload := ep(10, 21, name, now.Add(-4*time.Second), 2*time.Second, kNanosleep, uTokioOffload, 1)
	block := ep(10, 22, name, now.Add(-3*time.Second), 800*time.Millisecond, kNanosleep, uTokioBlock, 1)
	eps := episodes(offload, block,
		ep(10, 23, name, now.Add(-5*time.Second), 5*time.Second, kEpollWait, uTokioIdle, 1),
		ep(10, 24, name, now.Add(-5*time.Second), 5*time.Second, kFutex, uTokioPark, 1),
		ep(10, 21, name, now.Add(-2*time.Second), 2*time.Second, kFutex, uTokioPoolIdle, 1),
	)
	obs := blockRule().Evaluate(Window{Store: signals.New(10, 10), Now: now, Inputs: Inputs{Episodes: eps, Pools: testPools}})
	if len(obs) != 1 {
		t.Fatalf("got %d observations, want 1: %+v", len(obs), obs)
	}
	o := obs[0]
	if o.Cause != CauseBlockingCallOnWorker || o.Key != name || o.Labels["runtime"] != "tokio" {
		t.Errorf("cause %q key %q labels %v", o.Cause, o.Key, o.Labels)
	}
	if !strings.Contains(o.Title, "tokio_hyper::load_user_sync in clock_nanosleep") || !hasArtifact(o, "thread", name+" (tid 22)") {
		t.Errorf("does not name the worker's call: %q, %+v", o.Title, o.Artifacts)
	}
	if !strings.Contains(o.Symptom, "800 ms") || !strings.Contains(o.RootCause, "Tokio's") || !strings.Contains(o.Remediation, "spawn_blocking") {
		t.Errorf("%q / %q / %q", o.Symptom, o.RootCause, o.Remediation)
	}
	// The offloaded sleep alone, the pool's idle wait and the workers'
	// parks: silent.
	eps = episodes(offload, ep(10, 21, name, now.Add(-2*time.Second), 2*time.Second, kFutex, uTokioPoolIdle, 1),
		ep(10, 23, name, now.Add(-5*time.Second), 5*time.Second, kEpollWait, uTokioIdle, 1),
		ep(10, 24, name, now.Add(-5*time.Second), 5*time.Second, kFutex, uTokioPark, 1))
	if obs := blockRule().Evaluate(Window{Store: signals.New(10, 10), Now: now, Inputs: Inputs{Episodes: eps, Pools: testPools}}); len(obs) != 0 {
		t.Fatalf("spawn_blocking raised %+v", obs)
	}
}

// A blocking-pool thread whose sleep's stack was cut short of Tokio's
// frames is still the pool's: what it was seen doing says so.
func TestBlockingWorkerBlockingPoolByWhatItWasSeenDoing(t *testing.T) {
	now := time.Now()
	eps := episodes()
	seen(eps, ep(10, 31, "tokio-runtime-w", now.Add(-20*time.Second), 10*time.Second, kFutex, uTokioPoolIdle, 1))
	eps.Put(ep(10, 31, "tokio-runtime-w", now.Add(-2*time.Second), time.Second, kNanosleep, []string{"clock_nanosleep", "0x7f0012345678"}, 1))
	if obs := blockRule().Evaluate(Window{Store: signals.New(10, 10), Now: now, Inputs: Inputs{Episodes: eps, Pools: testPools}}); len(obs) != 0 {
		t.Fatalf("a blocking-pool thread raised %+v", obs)
	}
}

// redis's main thread does not match any worker name: its idle waits in
// aeMain make it an event loop, and DEBUG SLEEP's nanosleep, whose stack
// stops at debugCommand, is a blocking call on it.
// redis's event loop asleep outside any system call (a page fault that
// waits on I/O, in its cron's /proc read): "get_proc_stat_ll makes a
// blocking the kernel call" was once said.
func TestBlockingWorkerOutsideASyscallInWords(t *testing.T) {
	now := time.Now()
	kFault := []string{"__schedule", "io_schedule", "folio_wait_bit_common", "filemap_fault", "__do_fault", "handle_mm_fault", "do_user_addr_fault", "exc_page_fault", "asm_exc_page_fault"}
	sleep := ep(50, 50, "redis-server", now.Add(-2100*time.Millisecond), 2*time.Second, kFault, []string{"get_proc_stat_ll", "serverCron", "aeProcessEvents", "aeMain", "main"}, 0)
	if o, _, _ := redisLoopBlock(t, now, sleep); !strings.Contains(o.RootCause, "get_proc_stat_ll makes a call that blocks in the kernel on the event-loop thread of redis") || strings.Contains(o.RootCause, "blocking the kernel call") {
		t.Errorf("root cause %q", o.RootCause)
	}
}

// redisLoopBlock evaluates the blocking rule over redis's event loop,
// seen idle in epoll_wait 30 s ago, then the episodes given (the block
// last), with 3 sockets' data unread for 1.9 s from the block's start,
// and returns its one observation, with the episodes and the store.
func redisLoopBlock(t *testing.T, now time.Time, es ...signals.Episode) (Observation, *signals.Episodes, *signals.Store) {
	t.Helper()
	eps := episodes()
	seen(eps, ep(50, 50, "redis-server", now.Add(-30*time.Second), 100*time.Millisecond, kEpollWait, uRedisIdle, 1))
	for _, e := range es {
		eps.Put(e)
	}
	st := signals.New(100, 100)
	putUnread(st, es[len(es)-1].Start, 20, 1.9, 3)
	obs := blockRule().Evaluate(Window{Store: st, Now: now, Inputs: Inputs{Episodes: eps, Pools: testPools}})
	if len(obs) != 1 {
		t.Fatalf("got %+v", obs)
	}
	return obs[0], eps, st
}

func TestBlockingWorkerRedisEventLoop(t *testing.T) {
	now := time.Now()
	sleep := ep(50, 50, "redis-server", now.Add(-2100*time.Millisecond), 2*time.Second, kNanosleep, uRedisSleep, 2)
	sleep.Ongoing = true
	o, eps, st := redisLoopBlock(t, now, ep(50, 50, "redis-server", now.Add(-5*time.Second), 100*time.Millisecond, kEpollWait, uRedisIdle, 1), sleep)
	if o.Cause != CauseBlockingCallOnEventLoop || o.Key != "redis-server" || o.Severity != SeverityCritical || o.Labels["role"] != "event_loop" {
		t.Errorf("cause %q key %q severity %v labels %v", o.Cause, o.Key, o.Severity, o.Labels)
	}
	if o.Title != "Blocking call on the event loop of redis-server: debugCommand in clock_nanosleep" {
		t.Errorf("title %q", o.Title)
	}
	if !strings.Contains(o.Symptom, "for 2 s so far, still blocked") || !strings.Contains(o.Symptom, "(data waited unread on 3 sockets of the process for at least 1.9 s)") {
		t.Errorf("symptom %q", o.Symptom)
	}
	if !strings.Contains(o.RootCause, "debugCommand makes a blocking clock_nanosleep call on the event-loop thread of redis") || !strings.Contains(o.Remediation, "SLOWLOG") {
		t.Errorf("%q / %q", o.RootCause, o.Remediation)
	}
	if strings.Contains(o.Remediation, "tokio") || strings.Contains(o.Remediation, "actix") {
		t.Errorf("advice for another runtime: %q", o.Remediation)
	}
	// The count of sockets written once, as a probe writes a gauge that
	// stands still, is still the count in force when the age peaked.
	once := signals.New(100, 100)
	once.Put(signals.ProcessUnreadSockets, nil, 3, sleep.Start.Add(100*time.Millisecond))
	for i := 1; i <= 20; i++ {
		once.Put(signals.ProcessUnreadOldestSeconds, nil, 1.9*float64(i)/20, sleep.Start.Add(time.Duration(i)*100*time.Millisecond))
	}
	if obs := blockRule().Evaluate(Window{Store: once, Now: now, Inputs: Inputs{Episodes: eps, Pools: testPools}}); len(obs) != 1 || !strings.Contains(obs[0].Symptom, "data waited unread on 3 sockets of the process for at least 1.9 s") {
		t.Errorf("the sockets' count written once: %+v", obs)
	}
	// Unread data watched for under a poll, as just after the hooks were
	// attached: nothing is said of it ("for at least 0 ms" was seen).
	fresh := signals.New(100, 100)
	putUnread(fresh, sleep.Start, 1, 0.0004, 0)
	if obs := blockRule().Evaluate(Window{Store: fresh, Now: now, Inputs: Inputs{Episodes: eps, Pools: testPools}}); len(obs) != 1 || strings.Contains(obs[0].Symptom, "waited") {
		t.Errorf("unread data watched for 0.4 ms: %+v", obs)
	}
	// Healthy: the same loop idling in epoll, however long.
	idle := episodes()
	seen(idle, ep(50, 50, "redis-server", now.Add(-30*time.Second), 100*time.Millisecond, kEpollWait, uRedisIdle, 1))
	idle.Put(ep(50, 50, "redis-server", now.Add(-9*time.Second), 9*time.Second, kEpollWait, uRedisIdle, 1))
	if obs := blockRule().Evaluate(Window{Store: st, Now: now, Inputs: Inputs{Episodes: idle, Pools: testPools}}); len(obs) != 0 {
		t.Fatalf("an idle redis raised %+v", obs)
	}
}

// putUnread writes the sockcalls probe's gauges every 100 ms from start for
// n samples: the oldest unread data's age grows from 0 to oldest, on
// sockets sockets.
func putUnread(st *signals.Store, start time.Time, n int, oldest float64, sockets int) {
	for i := 1; i <= n; i++ {
		ts := start.Add(time.Duration(i) * 100 * time.Millisecond)
		st.Put(signals.ProcessUnreadOldestSeconds, nil, oldest*float64(i)/float64(n), ts)
		st.Put(signals.ProcessUnreadSockets, nil, float64(sockets), ts)
	}
}

// Node.js's execSync waits for its child in epoll_pwait, in a second
// uv_run: the call the main loop idles in. The nested loop is a blocking
// call that names the app's JavaScript when the JIT frames are there, and
// the native frame that runs the nested loop when they are not; the main
// loop's own idle wait, V8's helper threads and libuv's threadpool (all
// named "node", all "workers" for a user who declared ^node$) are silent.
func TestBlockingWorkerNodeNestedLoop(t *testing.T) {
	now := time.Now()
	pools := WorkerPools{Match: regexp.MustCompile(`^node$`), IdleSyscalls: DefaultIdleSyscalls}
	healthy := []signals.Episode{
		ep(70, 70, "node", now.Add(-9*time.Second), 5*time.Second, kEpollPwait, uNodeIdle, 1),
		ep(70, 71, "node", now.Add(-9*time.Second), 9*time.Second, kFutex, uNodePlatform, 1),
		ep(70, 75, "node", now.Add(-9*time.Second), 9*time.Second, kFutex, uNodeThreadpool, 1),
		ep(70, 76, "node", now.Add(-4*time.Second), 2*time.Second, kRead, uNodeFSRead, 1),
	}
	for _, tc := range []struct {
		user []string
		fn   string
	}{{uNodeExecJS, "handler (/app/server.js:12)"}, {uNodeExec, "node::SyncProcessRunner::TryInitializeAndRunLoop"}} {
		eps := episodes(append(slices.Clone(healthy), ep(70, 70, "node", now.Add(-3*time.Second), 993*time.Millisecond, kEpollPwait, tc.user, 1))...)
		obs := blockRule().Evaluate(Window{Store: signals.New(10, 10), Now: now, Inputs: Inputs{Episodes: eps, Pools: pools}})
		if len(obs) != 1 {
			t.Fatalf("got %+v", obs)
		}
		o := obs[0]
		if o.Cause != CauseBlockingCallOnEventLoop || o.Labels["runtime"] != "node" || !hasArtifact(o, "frame", tc.fn) || !hasArtifact(o, "thread", "node (tid 70)") {
			t.Errorf("cause %q labels %v artifacts %+v", o.Cause, o.Labels, o.Artifacts)
		}
		if o.Title != "Blocking call on the event loop of node: "+tc.fn+" waits in a nested event loop" {
			t.Errorf("title %q", o.Title)
		}
		if !strings.Contains(o.RootCause, "a synchronous child process (execSync, execFileSync or spawnSync)") || !strings.Contains(o.Symptom, "993 ms") ||
			!strings.Contains(o.Remediation, "worker_threads") || strings.Contains(o.Remediation, "tokio") {
			t.Errorf("%q / %q / %q", o.Symptom, o.RootCause, o.Remediation)
		}
	}
	if obs := blockRule().Evaluate(Window{Store: signals.New(10, 10), Now: now, Inputs: Inputs{Episodes: episodes(healthy...), Pools: pools}}); len(obs) != 0 {
		t.Fatalf("a healthy node raised %+v", obs)
	}
}

// A wait that looks idle: an asyncio handler in select.select, whose
// stack is cut short. It is blocked only while work waits for the loop,
// the loop being the process's only one; its usual epoll wait never is.
func TestBlockingWorkerWaitThatLooksIdle(t *testing.T) {
	now := time.Now()
	history := func() *signals.Episodes {
		es := episodes()
		for i := 0; i < 3; i++ {
			seen(es, ep(90, 90, "python3", now.Add(time.Duration(i-30)*time.Second), time.Second, kEpollWait, uAsyncioIdle, 1))
		}
		return es
	}
	sel := ep(90, 90, "python3", now.Add(-2*time.Second), 800*time.Millisecond, kSelect, uAsyncioSelect, 1)
	win := func(es *signals.Episodes, st *signals.Store) Window {
		return Window{Store: st, Now: now, Inputs: Inputs{Episodes: es, Pools: testPools}}
	}

	es := history()
	es.Put(sel)
	st := signals.New(100, 100)
	putUnread(st, sel.Start, 8, 0.7, 1)
	obs := blockRule().Evaluate(win(es, st))
	if len(obs) != 1 {
		t.Fatalf("got %+v", obs)
	}
	o := obs[0]
	if o.Cause != CauseBlockingCallOnEventLoop || !strings.Contains(o.Title, "select_select_impl.constprop.0 in pselect6 while work waited") ||
		!strings.Contains(o.Symptom, "data waited unread on 1 socket of the process for at least 700 ms") || !strings.Contains(o.Remediation, "asyncio.to_thread") {
		t.Errorf("%q / %q / %q", o.Title, o.Symptom, o.Remediation)
	}

	// No work waited: a sleep in select may be the program's own business.
	es = history()
	es.Put(sel)
	if obs := blockRule().Evaluate(win(es, signals.New(100, 100))); len(obs) != 0 {
		t.Errorf("no work waited, yet %+v", obs)
	}
	// Data left unread since before the sleep (a paused stream) counts
	// only from the sleep's start: 100 ms of it is not enough.
	es = history()
	es.Put(sel)
	st = signals.New(100, 100)
	st.Put(signals.ProcessUnreadOldestSeconds, nil, 30, sel.Start.Add(100*time.Millisecond))
	if obs := blockRule().Evaluate(win(es, st)); len(obs) != 0 {
		t.Errorf("old unread data raised %+v", obs)
	}
	// The loop's own idle wait while data waits (a socket it does not
	// watch): not blocked.
	es = history()
	idle := ep(90, 90, "python3", now.Add(-2*time.Second), 900*time.Millisecond, kEpollWait, uAsyncioIdle, 1)
	es.Put(idle)
	st = signals.New(100, 100)
	putUnread(st, idle.Start, 9, 0.8, 1)
	if obs := blockRule().Evaluate(win(es, st)); len(obs) != 0 {
		t.Errorf("the idle wait raised %+v", obs)
	}
	// Another event loop in the process: the waiting work may be its.
	es = history()
	seen(es, ep(90, 91, "python3", now.Add(-20*time.Second), time.Second, kEpollWait, uAsyncioIdle, 1))
	es.Put(sel)
	st = signals.New(100, 100)
	putUnread(st, sel.Start, 8, 0.7, 1)
	if obs := blockRule().Evaluate(win(es, st)); len(obs) != 0 {
		t.Errorf("with two loops, %+v", obs)
	}
}

// A thread of a runtime culprit does not know, that waits in epoll: a
// blocking call counts only when work was seen waiting (it may be one of
// a pool of synchronous handlers), and then it does.
func TestBlockingWorkerUnknownEpollLoop(t *testing.T) {
	now := time.Now()
	es := episodes()
	seen(es, ep(60, 61, "grpc-srv", now.Add(-20*time.Second), time.Second, kEpollWait, []string{"epoll_wait", "pollset_work", "cq_next", "main"}, 1))
	block := ep(60, 61, "grpc-srv", now.Add(-2*time.Second), time.Second, kNanosleep, []string{"clock_nanosleep", "nanosleep", "db_query", "handle_rpc", "cq_next"}, 2)
	es.Put(block)
	if obs := blockRule().Evaluate(Window{Store: signals.New(100, 100), Now: now, Inputs: Inputs{Episodes: es, Pools: testPools}}); len(obs) != 0 {
		t.Errorf("no work waited, yet %+v", obs)
	}
	st := signals.New(100, 100)
	for i := 0; i <= 10; i++ {
		st.Put(signals.ListenQueueLength, signals.L("addr", "0.0.0.0", "port", "50051"), 4, block.Start.Add(time.Duration(i)*100*time.Millisecond))
	}
	obs := blockRule().Evaluate(Window{Store: st, Now: now, Inputs: Inputs{Episodes: es, Pools: testPools}})
	if len(obs) != 1 || !strings.Contains(obs[0].Title, "db_query in clock_nanosleep") || !strings.Contains(obs[0].Symptom, "4 connections waited in the accept queue of 0.0.0.0:50051 for at least 1 s") {
		t.Fatalf("got %+v", obs)
	}
	if strings.Contains(obs[0].Remediation, "tokio") {
		t.Errorf("remediation %q", obs[0].Remediation)
	}
}

// fakeProfile is a CPU profile whose samples of the last settle have not
// arrived yet.
type fakeProfile struct {
	frames []FrameShare
	settle time.Duration
	asked  []time.Time
}

func (f *fakeProfile) HotFrames(_ int, from, to time.Time, _ int) []FrameShare {
	f.asked = append(f.asked, from, to)
	return f.frames
}
func (f *fakeProfile) Settle() time.Duration { return f.settle }

// hotByTid is a CPU profile per thread.
type hotByTid map[int][]FrameShare

func (h hotByTid) HotFrames(tid int, _, _ time.Time, _ int) []FrameShare { return h[tid] }

func busyEp(pid, tid int, thread string, start time.Time, d time.Duration) signals.Episode {
	return signals.Episode{Kind: signals.EpisodeBusy, Pid: pid, Tid: tid, Thread: thread, Start: start, Duration: d, Ongoing: true}
}

func busyRule() *BusyWorker {
	return NewBusyWorker(BusyWorkerOptions{Window: 10 * time.Second, MinBusy: 500 * time.Millisecond, TopN: 5, MaxIOShare: 0.3})
}

// pbkdf2Sync on Node.js's event loop: until the profile covers the run
// there is no finding (the samples there are of the loop before the run:
// epoll_pwait); then the first event names the hot function, never the
// idle wait.
func TestBusyWorkerNodeWaitsForTheProfile(t *testing.T) {
	start := time.Now()
	es := episodes()
	seen(es, ep(70, 70, "node", start.Add(-10*time.Second), time.Second, kEpollPwait, uNodeIdle, 1))
	prof := &fakeProfile{settle: time.Second, frames: []FrameShare{{"epoll_pwait", 1}}}
	w := func(now time.Time) Window {
		es.Put(busyEp(70, 70, "node", start, now.Sub(start)))
		return Window{Store: signals.New(10, 10), Now: now, Inputs: Inputs{Episodes: es, Pools: testPools, Hot: prof}}
	}
	if obs := busyRule().Evaluate(w(start.Add(600 * time.Millisecond))); len(obs) != 0 {
		t.Fatalf("opened before the profile covers the run: %+v", obs)
	}
	// Covered in time, but the drain with the run's samples is late.
	prof.frames = nil
	if obs := busyRule().Evaluate(w(start.Add(1300 * time.Millisecond))); len(obs) != 0 {
		t.Fatalf("opened on an empty profile: %+v", obs)
	}
	prof.frames = []FrameShare{{"sha512_block_data_order_avx2", 0.7}, {"SHA512_Update", 0.15}, {"epoll_pwait", 0.02}}
	obs := busyRule().Evaluate(w(start.Add(1300 * time.Millisecond)))
	if len(obs) != 1 {
		t.Fatalf("got %+v", obs)
	}
	o := obs[0]
	if o.Cause != CauseCPUHeavyOnEventLoop || o.Title != "CPU-heavy work on the event loop of node: sha512_block_data_order_avx2" {
		t.Errorf("cause %q title %q", o.Cause, o.Title)
	}
	for _, a := range o.Artifacts {
		if strings.Contains(a.Detail, "epoll") {
			t.Errorf("names the idle wait: %+v", a)
		}
	}
	if from, to := prof.asked[len(prof.asked)-2], prof.asked[len(prof.asked)-1]; !from.Equal(start) || !to.Equal(start.Add(300*time.Millisecond)) {
		t.Errorf("profile asked for %v..%v, want the run up to what has settled", from.Sub(start), to.Sub(start))
	}
	if !strings.Contains(o.Remediation, "worker_threads") || !strings.Contains(o.Symptom, "1.3 s") {
		t.Errorf("%q / %q", o.Symptom, o.Remediation)
	}
	// Without a profiler, a run during which the loop never slept is a
	// finding that names no function rather than a wrong one.
	st := signals.New(100, 100)
	putSleeps(st, start.Add(1300*time.Millisecond), 70, "node", 0)
	es.Put(busyEp(70, 70, "node", start, 1300*time.Millisecond))
	obs = busyRule().Evaluate(Window{Store: st, Now: start.Add(1300 * time.Millisecond), Inputs: Inputs{Episodes: es, Pools: testPools}})
	if len(obs) != 1 || obs[0].Title != "CPU-heavy work on the event loop of node: the callback it runs" {
		t.Errorf("without a profile: %+v", obs)
	}
}

// Event loops busy with their own connections (redis under load, an
// nginx worker) are not CPU-heavy work, nor is a loop's run without a
// profile to tell; a Tokio worker computing is, in Tokio's terms.
func TestBusyWorkerEventLoopIO(t *testing.T) {
	now := time.Now()
	es := episodes()
	seen(es, ep(50, 50, "redis-server", now.Add(-30*time.Second), 100*time.Millisecond, kEpollWait, uRedisIdle, 1))
	seen(es, ep(80, 81, "nginx", now.Add(-30*time.Second), time.Second, kEpollWait, uNginxIdle, 1))
	seen(es, ep(10, 22, "tokio-runtime-w", now.Add(-30*time.Second), time.Second, kEpollWait, uTokioIdle, 1))
	es.Put(busyEp(50, 50, "redis-server", now.Add(-3*time.Second), 3*time.Second))
	es.Put(busyEp(80, 81, "nginx", now.Add(-2*time.Second), 2*time.Second))
	redisIO := []FrameShare{{"__libc_read", 0.3}, {"__GI___libc_write", 0.25}, {"epoll_wait", 0.08}, {"je_malloc", 0.05}, {"processCommand", 0.04}}
	for _, hot := range []HotFrames{fakeHot(redisIO), nil, fakeHot(nil)} {
		w := Window{Store: signals.New(10, 10), Now: now, Inputs: Inputs{Episodes: es, Pools: testPools, Hot: hot}}
		if obs := busyRule().Evaluate(w); len(obs) != 0 {
			t.Errorf("busy loops in their own I/O (profile %v) raised %+v", hot, obs)
		}
	}
	// redis under pipelined load (redis-benchmark -P 32), measured: the
	// profile is spread over command processing, a fifth in I/O, and the
	// loop went to sleep 14k times a second during the run (each under
	// busy_gap): a loop turning, not one task.
	pipelined := []FrameShare{{"gettimeofday", 0.13}, {"__libc_read", 0.12}, {"hdr_record_values", 0.05}, {"processMultibulkBuffer", 0.05},
		{"readQueryFromClient", 0.05}, {"zmalloc", 0.05}, {"__GI___libc_write", 0.08}, {"epoll_wait", 0.02}}
	st := signals.New(100, 100)
	putSleeps(st, now, 50, "redis-server", 14000)
	putSleeps(st, now, 81, "nginx", 3000)
	w := Window{Store: st, Now: now, Inputs: Inputs{Episodes: es, Pools: testPools, Hot: hotByTid{50: pipelined, 81: pipelined}}}
	if obs := busyRule().Evaluate(w); len(obs) != 0 {
		t.Errorf("loops under pipelined load raised %+v", obs)
	}
	// An nginx worker flat out on a 1 KiB static file (wrk, 64
	// connections), user leaves as the agent's profile had them: most of
	// it in the calls that serve a file; the finding had named "open".
	flatOut := []FrameShare{{"writev", 0.35}, {"open", 0.15}, {"fstatat", 0.09}, {"close", 0.09}, {"recv", 0.07}, {"ngx_http_parse_request_line", 0.05},
		{"pread", 0.04}, {"ngx_reusable_connection", 0.02}, {"epoll_wait", 0.02}}
	w = Window{Store: signals.New(10, 10), Now: now, Inputs: Inputs{Episodes: es, Pools: testPools, Hot: hotByTid{81: flatOut}}}
	if obs := busyRule().Evaluate(w); len(obs) != 0 {
		t.Errorf("nginx flat out on a static file raised %+v", obs)
	}
	// With writev, close and recv alone counted it was 51 %: a run of a
	// few samples with fewer writes fell under max_io_share (0.3).
	fewWrites := []FrameShare{{"open", 0.3}, {"fstatat", 0.15}, {"writev", 0.1}, {"close", 0.1}, {"ngx_http_parse_request_line", 0.1}, {"pread", 0.1}, {"recv", 0.05}}
	w = Window{Store: signals.New(10, 10), Now: now, Inputs: Inputs{Episodes: es, Pools: testPools, Hot: hotByTid{81: fewWrites}}}
	if obs := busyRule().Evaluate(w); len(obs) != 0 {
		t.Errorf("nginx serving files, a run with few writes, raised %+v", obs)
	}
	es.Put(busyEp(10, 22, "tokio-runtime-w", now.Add(-time.Second), 900*time.Millisecond))
	hot := hotByTid{50: redisIO, 81: redisIO, 22: {{"tokio_hyper::compute_digest", 0.97}}}
	w = Window{Store: signals.New(10, 10), Now: now, Inputs: Inputs{Episodes: es, Pools: testPools, Hot: hot}}
	obs := busyRule().Evaluate(w)
	if len(obs) != 1 || obs[0].Cause != CauseCPUHeavyOnWorker || obs[0].Key != "tokio-runtime-w" || !strings.Contains(obs[0].Remediation, "spawn_blocking") {
		t.Fatalf("tokio spin: %+v", obs)
	}
}

// putSleeps writes thread tid's voluntary switches, rate a second, over
// the last 10 s, every 100 ms (as the sched probe polls).
func putSleeps(st *signals.Store, now time.Time, tid int, name string, rate float64) {
	for i := 0; i <= 100; i++ {
		st.Put(signals.ThreadVoluntarySwitchesTotal, signals.L("tid", strconv.Itoa(tid), "thread", name), rate*float64(i)/10, now.Add(time.Duration(i-100)*100*time.Millisecond))
	}
}

// A single-threaded runtime is never imbalanced: Node.js's main loop at a
// core while its helpers (all named node, declared workers by ^node$)
// idle is how Node.js works. Tokio's blocking threads are not workers'
// peers; its workers are compared among themselves.
func TestWorkerImbalanceSingleThreadedRuntime(t *testing.T) {
	now := time.Now()
	r := NewWorkerImbalance(WorkerImbalanceOptions{Window: 10 * time.Second, MinBusy: 0.5, MinRatio: 4})
	es := episodes()
	seen(es, ep(70, 70, "node", now.Add(-30*time.Second), time.Second, kEpollPwait, uNodeIdle, 1))
	seen(es, ep(70, 71, "node", now.Add(-30*time.Second), time.Second, kFutex, uNodePlatform, 1))
	st := signals.New(100, 100)
	putCPU(st, now, map[string]float64{"70/node": 0.98, "71/node": 0.01, "72/node": 0.01, "73/node": 0.0, "74/node": 0.0})
	pools := WorkerPools{Match: regexp.MustCompile(`^node$`), IdleSyscalls: DefaultIdleSyscalls}
	if obs := r.Evaluate(Window{Store: st, Now: now, Inputs: Inputs{Episodes: es, Pools: pools}}); len(obs) != 0 {
		t.Errorf("node raised %+v", obs)
	}

	es = episodes()
	for _, tid := range []int{21, 22} {
		seen(es, ep(10, tid, "tokio-runtime-w", now.Add(-30*time.Second), time.Second, kEpollWait, uTokioIdle, 1))
	}
	// 23 and 24: blocking threads never seen asleep since the probe began.
	st = signals.New(100, 100)
	putCPU(st, now, map[string]float64{"21/tokio-runtime-w": 0.6, "22/tokio-runtime-w": 0.55, "23/tokio-runtime-w": 0, "24/tokio-runtime-w": 0})
	if obs := r.Evaluate(Window{Store: st, Now: now, Inputs: Inputs{Episodes: es, Pools: testPools}}); len(obs) != 0 {
		t.Errorf("balanced tokio workers raised %+v", obs)
	}
	st = signals.New(100, 100)
	putCPU(st, now, map[string]float64{"21/tokio-runtime-w": 0.95, "22/tokio-runtime-w": 0.02, "23/tokio-runtime-w": 0, "24/tokio-runtime-w": 0})
	obs := r.Evaluate(Window{Store: st, Now: now, Inputs: Inputs{Episodes: es, Pools: testPools}})
	if len(obs) != 1 || !strings.Contains(obs[0].Symptom, "used 0.9 cores over 10 s while its 1 peer used a median of 0.02 cores") || !strings.Contains(obs[0].Remediation, "work stealing") {
		t.Fatalf("unbalanced tokio workers: %+v", obs)
	}
}

// putCPU writes thread_cpu_seconds_total for "tid/name" threads using
// the given cores over the last 10 s.
func putCPU(st *signals.Store, now time.Time, cores map[string]float64) {
	for i := 0; i <= 10; i++ {
		ts := now.Add(time.Duration(i-10) * time.Second)
		for k, c := range cores {
			tid, name, _ := strings.Cut(k, "/")
			st.Put(signals.ThreadCPUSecondsTotal, signals.L("tid", tid, "thread", name), c*float64(i), ts)
		}
	}
}

// A plateau while an event loop is blocked names the loop, not the
// futexes its helper threads idle in.
func TestThroughputPlateauNamesABlockedLoop(t *testing.T) {
	now := time.Now()
	es := episodes()
	seen(es, ep(50, 50, "redis-server", now.Add(-30*time.Second), 100*time.Millisecond, kEpollWait, uRedisIdle, 1))
	sleep := ep(50, 50, "redis-server", now.Add(-4*time.Second), 4*time.Second, kNanosleep, uRedisSleep, 2)
	sleep.Ongoing = true
	es.Put(sleep)
	r := NewThroughputPlateau(ThroughputPlateauOptions{Window: 5 * time.Second, MinQueued: 0.8, MaxBusyCores: 0.5})
	obs := r.Evaluate(Window{Store: plateauStore(now, 12, 0.05), Now: now, Inputs: Inputs{Episodes: es, Pools: testPools}})
	if len(obs) != 1 {
		t.Fatalf("got %+v", obs)
	}
	o := obs[0]
	if !strings.Contains(o.Title, "the event loop redis-server is blocked in clock_nanosleep") || !strings.Contains(o.RootCause, "called from debugCommand, for 4 s") {
		t.Errorf("%q / %q", o.Title, o.RootCause)
	}
}

func TestJSFrames(t *testing.T) {
	for f, want := range map[string]string{
		"handler (/app/server.js:12)":          "/app/server.js",
		"execSync (node:child_process:957)":    "node:child_process",
		"(anonymous) (file:///app/x.mjs:3)":    "file:///app/x.mjs",
		"node::SyncProcessRunner::Spawn":       "",
		"(anonymous namespace)::foo":           "",
		"v8::internal::Foo(int) (inlined)":     "",
		"Builtin:ArrayPrototypePush":           "",
		"std::vec::Vec<T>::push (src/vec.rs)":  "",
		"compute (/srv/app/dist/index.ts:101)": "/srv/app/dist/index.ts",
	} {
		got, ok := jsFile(f)
		if ok != (want != "") || (ok && got != want) {
			t.Errorf("jsFile(%q) = %q, %v; want %q", f, got, ok, want)
		}
	}
	for _, f := range []string{"__libc_read", "__GI___libc_write", "epoll_wait", "__write_nocancel", "tcp_sendmsg", "sendmsg"} {
		if !ioFrame(f) {
			t.Errorf("ioFrame(%q) = false", f)
		}
	}
	for _, f := range []string{"sha512_block_data_order_avx2", "readQueryFromClient", "write_json", "node::crypto::PBKDF2Job"} {
		if ioFrame(f) {
			t.Errorf("ioFrame(%q) = true", f)
		}
	}
}

// Remedies are in the target's terms: the detected runtime first (the
// demo's Go workers, known by name only, get Go's advice, never Tokio's),
// and a runtime whose app code runs on one thread is never imbalanced,
// even before its threads' stacks were seen.
func TestWorkerRulesAdviseInTheTargetsTerms(t *testing.T) {
	now := time.Now()
	goRT := workload.Runtime{Lang: workload.LangGo, Version: "1.26.8"}
	eps := episodes(ep(5, 6, "worker-1", now.Add(-time.Second), 800*time.Millisecond, kNanosleep,
		[]string{"runtime/internal/syscall.Syscall6", "syscall.Syscall", "golang.org/x/sys/unix.Nanosleep", "faults.BlockingCall", "runtime.goexit"}, 0))
	obs := blockRule().Evaluate(Window{Store: signals.New(10, 10), Now: now, Runtime: goRT, Inputs: Inputs{Episodes: eps, Pools: testPools}})
	if len(obs) != 1 || obs[0].Cause != CauseBlockingCallOnWorker || !strings.Contains(obs[0].Remediation, "runtime.LockOSThread") ||
		strings.Contains(obs[0].Remediation, "tokio") || strings.Contains(obs[0].RootCause, "Tokio") {
		t.Fatalf("Go worker: %+v", obs)
	}

	r := NewWorkerImbalance(WorkerImbalanceOptions{Window: 10 * time.Second, MinBusy: 0.5, MinRatio: 4})
	st := signals.New(100, 100)
	putCPU(st, now, map[string]float64{"70/node": 0.98, "71/node": 0.01, "72/node": 0.01})
	nodeRT := workload.Runtime{Lang: workload.LangNode, Version: "20.20.2", Frameworks: []workload.Framework{{Name: workload.FwLibuv}}}
	pools := WorkerPools{Match: regexp.MustCompile(`^node$`), IdleSyscalls: DefaultIdleSyscalls}
	if obs := r.Evaluate(Window{Store: st, Now: now, Runtime: nodeRT, Inputs: Inputs{Episodes: episodes(), Pools: pools}}); len(obs) != 0 {
		t.Errorf("node, threads not yet seen: %+v", obs)
	}
}

// stallKind, for accept_overflow's stalled thread: a worker's blocking
// call is a stall; a blocking pool's sleep, a worker's park and V8's
// helpers waiting are not candidates at all; an unknown thread's long
// sleep is a candidate of last resort.
func TestStallKind(t *testing.T) {
	now := time.Now()
	w := Window{Store: signals.New(10, 10), Now: now, Inputs: Inputs{Episodes: episodes(), Pools: testPools}}
	for _, tc := range []struct {
		name          string
		e             signals.Episode
		serving, idle bool
	}{
		{"tokio worker blocked", ep(10, 22, "tokio-runtime-w", now, time.Second, kNanosleep, uTokioBlock, 1), true, false},
		{"spawn_blocking", ep(10, 21, "tokio-runtime-w", now, time.Second, kNanosleep, uTokioOffload, 1), false, true},
		{"tokio worker parked", ep(10, 24, "tokio-runtime-w", now, time.Second, kFutex, uTokioPark, 1), false, true},
		{"V8 helper", ep(70, 71, "node", now, time.Second, kFutex, uNodePlatform, 1), false, true},
		{"node execSync", ep(70, 70, "node", now, time.Second, kEpollPwait, uNodeExec, 1), true, false},
		{"an unknown thread reading", ep(70, 80, "logger", now, time.Second, kRead, []string{"read", "log_flush", "main"}, 1), false, false},
		{"busy tokio worker", signals.Episode{Kind: signals.EpisodeBusy, Pid: 10, Tid: 22, Thread: "tokio-runtime-w", Start: now, Duration: time.Second}, true, false},
	} {
		serving, idle := stallKind(w, tc.e, 300*time.Millisecond)
		if serving != tc.serving || idle != tc.idle {
			t.Errorf("%s: serving %v idle %v, want %v %v", tc.name, serving, idle, tc.serving, tc.idle)
		}
	}
}

// stackProfile is a CPU profile with whole stacks (HotStacks) as well as
// leaves.
type stackProfile struct {
	fakeProfile
	stacks []StackShare
}

func (f *stackProfile) HotStacks(int, time.Time, time.Time, int) []StackShare { return f.stacks }

// The stacks of pbkdf2Sync's samples as the profiler unwinds them on this
// machine (node 20, --perf-basic-prof): OpenSSL's SHA-512 at the leaf,
// node's crypto binding and V8 between it and the JavaScript that called.
var (
	uNodePBKDF2Leaf = []string{"sha512_block_data_order_avx2", "sha512_block_data_order", "SHA512_Update", "HMAC_Update", "kdf_pbkdf2_derive", "PKCS5_PBKDF2_HMAC",
		"node::crypto::PBKDF2Traits::DeriveBits", "node::crypto::CryptoJob::Run", "v8::internal::FunctionCallbackArguments::Call",
		"v8::internal::Builtin_HandleApiCall", "Builtins_CEntry_Return1_ArgvOnStack_BuiltinExit", "pbkdf2Sync (node:internal/crypto/pbkdf2:62)",
		"hashPasswordSync (/app/server.js:62)", "(anonymous) (/app/server.js:82)", "handle (/app/node_modules/express/lib/router/layer.js:86)",
		"Builtins_JSEntryTrampoline", "node::InternalMakeCallback", "uv__io_poll", "uv_run", "node::SpinEventLoopInternal"}
	uNodePBKDF2Final = append([]string{"sha512_block_data_order_avx2", "SHA512_Final", "HMAC_Final"}, uNodePBKDF2Leaf[4:]...)
	uNodeGC          = []string{"v8::internal::Heap::Scavenge", "v8::internal::Heap::CollectGarbage", "Builtins_CEntry_Return1_ArgvOnStack_NoBuiltinExit",
		"Builtins_InterpreterEntryTrampoline", "Builtins_JSEntryTrampoline", "uv_run"}
)

// pbkdf2Sync on Node.js's event loop, with whole stacks: the first event
// names the app's JavaScript function the samples ran under, and the
// hottest leaf (OpenSSL's) beside it; the leaf shares stay in the frame's
// detail. A function under too few of the samples is not named.
func TestBusyWorkerNamesTheAppFunction(t *testing.T) {
	now := time.Now()
	start := now.Add(-1300 * time.Millisecond)
	es := episodes()
	seen(es, ep(70, 70, "node", start.Add(-10*time.Second), time.Second, kEpollPwait, uNodeIdle, 1))
	es.Put(busyEp(70, 70, "node", start, 1300*time.Millisecond))
	prof := &stackProfile{
		fakeProfile: fakeProfile{settle: time.Second, frames: []FrameShare{{"sha512_block_data_order_avx2", 0.7}, {"SHA512_Update", 0.15}, {"v8::internal::Heap::Scavenge", 0.05}}},
		stacks:      []StackShare{{Frames: uNodePBKDF2Leaf, Share: 0.6}, {Frames: uNodePBKDF2Final, Share: 0.3}, {Frames: uNodeGC, Share: 0.05}},
	}
	obs := busyRule().Evaluate(Window{Store: signals.New(10, 10), Now: now, Inputs: Inputs{Episodes: es, Pools: testPools, Hot: prof}})
	if len(obs) != 1 {
		t.Fatalf("got %+v", obs)
	}
	o := obs[0]
	const app = "hashPasswordSync (/app/server.js:62)"
	if want := "CPU-heavy work on the event loop of node: " + app + ", hottest in sha512_block_data_order_avx2"; o.Title != want {
		t.Errorf("title %q, want %q", o.Title, want)
	}
	if !strings.HasPrefix(o.RootCause, app+", with 70% of the run's samples in sha512_block_data_order_avx2, runs on the event-loop thread of Node.js") {
		t.Errorf("root cause %q", o.RootCause)
	}
	if !hasArtifact(o, "frame", app) {
		t.Errorf("artifacts %+v", o.Artifacts)
	}
	for _, a := range o.Artifacts {
		if a.Kind == "frame" && (!strings.Contains(a.Detail, "90%") || !strings.Contains(a.Detail, "sha512_block_data_order_avx2 70%")) {
			t.Errorf("frame detail %q: want the app function's share and the hottest leaves'", a.Detail)
		}
	}
	if !strings.Contains(o.Remediation, "hashPasswordSync") {
		t.Errorf("remediation %q", o.Remediation)
	}

	// Under the app's function for less than half the run: the leaf alone.
	prof.stacks = []StackShare{{Frames: uNodePBKDF2Leaf, Share: 0.4}, {Frames: uNodeGC, Share: 0.6}}
	obs = busyRule().Evaluate(Window{Store: signals.New(10, 10), Now: now, Inputs: Inputs{Episodes: es, Pools: testPools, Hot: prof}})
	if len(obs) != 1 || obs[0].Title != "CPU-heavy work on the event loop of node: sha512_block_data_order_avx2" || !hasArtifact(obs[0], "frame", "sha512_block_data_order_avx2") {
		t.Errorf("app function under 40%% of the samples: %+v", obs)
	}
}

// The app's function on a CPU stack: the app's JavaScript where there is
// some (never node's own), else the first frame outside shared libraries
// that is no runtime's wrapper.
func TestAppFrame(t *testing.T) {
	for _, tc := range []struct {
		name string
		s    StackShare
		rt   signals.Runtime
		want string
	}{
		{"node", StackShare{Frames: uNodePBKDF2Leaf}, signals.RuntimeNode, "hashPasswordSync (/app/server.js:62)"},
		{"node, runtime not told", StackShare{Frames: uNodePBKDF2Leaf}, signals.RuntimeUnknown, "hashPasswordSync (/app/server.js:62)"},
		{"node's own work", StackShare{Frames: uNodeGC}, signals.RuntimeNode, ""},
		{"go", StackShare{Frames: []string{"runtime.memmove", "app.compress", "main.main"}}, signals.RuntimeGo, "app.compress"},
		{"a shared library at the leaf", StackShare{Frames: []string{"sha512_block_data_order_avx2", "EVP_Digest", "openssl::hash::hash", "app::hash_password"},
			Library: []bool{true, true}}, signals.RuntimeTokio, "openssl::hash::hash"},
		{"only libraries and wrappers", StackShare{Frames: []string{"memcpy", "__libc_write", "libfoo.so+0x1234"}, Library: []bool{true, true, true}}, signals.RuntimeUnknown, ""},
	} {
		if got := appFrame(tc.s, tc.rt); got != tc.want {
			t.Errorf("%s: appFrame = %q, want %q", tc.name, got, tc.want)
		}
	}
}
