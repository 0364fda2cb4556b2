package signals

import (
	"slices"
	"testing"
	"time"
)

// User stacks (C library leaf frames left out, as Episode.CallerStack
// gives them) of real programs, copied from what the sched probe saw on
// this machine: redis 7.0, nginx 1.22, Node.js 20, Tokio 1.24 under hyper
// 0.14, CPython 3.11's asyncio.
var (
	redisIdle  = []string{"redis-check-rdb+0x64e51", "aeMain", "main", "libc.so.6+0x2724a", "__libc_start_main", "_start", "0x7fd424e40008"}
	redisSleep = []string{"debugCommand", "call", "processCommand", "processInputBuffer", "readQueryFromClient", "redis-check-rdb+0x13c334", "redis-check-rdb+0x64ef8", "0x5210800000000000"}
	// Without the target's memory (no ptrace access) only the probe's
	// 256-byte copy unwinds: the stack stops at the command.
	redisSleepShort = []string{"debugCommand", "0x518f800000000000"}
	nginxIdle       = []string{"nginx+0x54174", "ngx_process_events_and_timers", "nginx+0x51b5d", "ngx_spawn_process", "nginx+0x51398", "ngx_master_process_cycle", "main"}
	nodeIdle        = []string{"uv__io_poll", "uv_run", "node::SpinEventLoopInternal", "node::NodeMainInstance::Run", "node::Start", "libc.so.6+0x2724a", "__libc_start_main", "_start"}
	nodeExecSync    = []string{"uv__io_poll", "uv_run", "node::SyncProcessRunner::TryInitializeAndRunLoop", "node::SyncProcessRunner::Spawn",
		"v8::internal::FunctionCallbackArguments::Call", "v8::internal::(anonymous namespace)::HandleApiCallHelper", "v8::internal::Builtin_HandleApiCall", "Builtins_CEntry_Return1_ArgvOnStack_BuiltinExit"}
	nodePlatform   = []string{"uv_cond_wait", "node::TaskQueue<v8::Task>::BlockingPop", "node::(anonymous namespace)::PlatformWorkerThread", "libc.so.6+0x891f5"}
	nodeDelayed    = []string{"uv__io_poll", "uv_run", "node::WorkerThreadsTaskRunner::DelayedTaskScheduler::Start()::{lambda(void*)#1}::_FUN", "libc.so.6+0x891f5"}
	nodeThreadpool = []string{"uv_cond_wait", "worker", "libc.so.6+0x891f5"}
	tokioWorkerIO  = []string{"mio::poll::Poll::poll", "tokio::runtime::io::Driver::turn", "tokio::runtime::time::Driver::park_internal",
		"tokio::runtime::scheduler::multi_thread::park::Parker::park", "tokio::runtime::scheduler::multi_thread::worker::Context::park_timeout",
		"tokio::runtime::scheduler::multi_thread::worker::Context::run", "tokio::macros::scoped_tls::ScopedKey<T>::set", "tokio::runtime::scheduler::multi_thread::worker::run",
		"tokio::runtime::task::core::Core<T,S>::poll", "tokio::runtime::task::harness::Harness<T,S>::poll", "tokio::runtime::blocking::pool::Inner::run",
		"std::sys::backtrace::_rust_begin_short_backtrace", "core::ops::function::FnOnce::call_once{{vtable.shim}}", "<std::sys::thread::unix::Thread>::new::thread_start"}
	tokioWorkerPark = []string{"<std::sys::sync::condvar::futex::Condvar>::wait", "tokio::runtime::scheduler::multi_thread::park::Parker::park",
		"tokio::runtime::scheduler::multi_thread::worker::Context::park_timeout", "tokio::runtime::scheduler::multi_thread::worker::Context::run",
		"tokio::macros::scoped_tls::ScopedKey<T>::set", "tokio::runtime::scheduler::multi_thread::worker::run", "tokio::runtime::task::core::Core<T,S>::poll",
		"tokio::runtime::task::harness::Harness<T,S>::poll", "tokio::runtime::blocking::pool::Inner::run", "std::sys::backtrace::_rust_begin_short_backtrace"}
	tokioWorkerBlock = []string{"std::thread::functions::sleep", "tokio_hyper::load_user_sync", "hyper::proto::h1::dispatch::Dispatcher<D,Bs,I,T>::poll_catch",
		"<hyper::server::conn::upgrades::UpgradeableConnection<I,S,E> as core::future::future::Future>::poll",
		"<hyper::server::server::new_svc::NewSvcTask<I,N,S,E,W> as core::future::future::Future>::poll",
		"tokio::runtime::task::core::Core<T,S>::poll", "tokio::runtime::task::harness::Harness<T,S>::poll", "tokio::runtime::scheduler::multi_thread::worker::Context::run_task",
		"tokio::runtime::scheduler::multi_thread::worker::Context::run", "tokio::macros::scoped_tls::ScopedKey<T>::set", "tokio::runtime::scheduler::multi_thread::worker::run",
		"tokio::runtime::task::core::Core<T,S>::poll", "tokio::runtime::task::harness::Harness<T,S>::poll", "tokio::runtime::blocking::pool::Inner::run"}
	tokioOffload = []string{"std::thread::functions::sleep", "tokio_hyper::load_user_sync", "tokio::runtime::task::core::Core<T,S>::poll",
		"tokio::runtime::task::harness::Harness<T,S>::poll", "tokio::runtime::blocking::pool::Inner::run", "std::sys::backtrace::_rust_begin_short_backtrace"}
	tokioPoolIdle = []string{"<std::sys::sync::condvar::futex::Condvar>::wait_optional_timeout", "tokio::runtime::blocking::pool::Inner::run",
		"std::sys::backtrace::_rust_begin_short_backtrace", "core::ops::function::FnOnce::call_once{{vtable.shim}}"}
	tokioMain = []string{"<std::sys::sync::condvar::futex::Condvar>::wait", "tokio::runtime::park::Inner::park", "tokio::runtime::park::CachedParkThread::block_on",
		"tokio::runtime::runtime::Runtime::block_on", "tokio_hyper::main", "std::sys::backtrace::_rust_begin_short_backtrace"}
	asyncioIdle  = []string{"select_epoll_poll", "_PyEval_EvalFrameDefault", "PyEval_EvalCode", "run_mod", "_PyRun_SimpleFileObject", "Py_RunMain", "Py_BytesMain"}
	asyncioSleep = []string{"time_sleep", "cfunction_vectorcall_O", "PyObject_Vectorcall", "_PyEval_EvalFrameDefault", "PyGen_am_send", "task_step_impl", "task_step", "cfunction_vectorcall_O"}
	goIdle       = []string{"runtime/internal/syscall.Syscall6", "runtime.futex", "runtime.futexsleep", "runtime.notesleep", "runtime.stoplockedm", "runtime.schedule", "runtime.park_m", "runtime.mcall"}
	goNetpoll    = []string{"runtime.netpoll", "runtime.findRunnable", "runtime.schedule", "runtime.park_m", "runtime.mcall"}
)

func TestClassifyStack(t *testing.T) {
	for _, tc := range []struct {
		name    string
		user    []string
		syscall string
		want    StackClass
	}{
		{"redis idle", redisIdle, "epoll_wait", StackClass{Runtime: RuntimeRedis, Role: RoleEventLoop, IdleKnown: true, Idle: true, Mark: "aeMain"}},
		{"redis DEBUG SLEEP", redisSleep, "clock_nanosleep", StackClass{Runtime: RuntimeRedis, Role: RoleEventLoop, IdleKnown: true, Mark: "processCommand"}},
		{"redis DEBUG SLEEP, cut short", redisSleepShort, "clock_nanosleep", StackClass{}},
		{"nginx worker idle", nginxIdle, "epoll_wait", StackClass{Runtime: RuntimeNginx, Role: RoleEventLoop, IdleKnown: true, Idle: true, Mark: "ngx_process_events_and_timers"}},
		{"nginx master", []string{"nginx+0x51398", "ngx_master_process_cycle", "main"}, "rt_sigsuspend", StackClass{Runtime: RuntimeNginx, Role: RoleHelper, IdleKnown: true, Idle: true, Mark: "ngx_master_process_cycle"}},
		{"nginx reading a file", []string{"ngx_read_file", "ngx_output_chain", "nginx+0x5a000", "ngx_process_events_and_timers"}, "pread64", StackClass{Runtime: RuntimeNginx, Role: RoleEventLoop, IdleKnown: true, Mark: "ngx_process_events_and_timers"}},
		{"node main loop idle", nodeIdle, "epoll_pwait", StackClass{Runtime: RuntimeNode, Role: RoleEventLoop, IdleKnown: true, Idle: true, Mark: "uv_run"}},
		{"node execSync", nodeExecSync, "epoll_pwait", StackClass{Runtime: RuntimeNode, Role: RoleEventLoop, IdleKnown: true, Nested: true, Runner: "node::SyncProcessRunner::TryInitializeAndRunLoop", Mark: "uv_run"}},
		{"V8 platform worker", nodePlatform, "futex", StackClass{Runtime: RuntimeNode, Role: RoleHelper, IdleKnown: true, Idle: true, Mark: "node::TaskQueue<v8::Task>::BlockingPop"}},
		{"node delayed-task scheduler", nodeDelayed, "epoll_pwait", StackClass{Runtime: RuntimeNode, Role: RoleHelper, IdleKnown: true, Idle: true, Mark: nodeDelayed[2]}},
		{"libuv threadpool", nodeThreadpool, "futex", StackClass{Runtime: RuntimeLibuv, Role: RoleBlockingPool, IdleKnown: true, Idle: true, Mark: "worker"}},
		{"tokio worker in epoll", tokioWorkerIO, "epoll_wait", StackClass{Runtime: RuntimeTokio, Role: RoleWorker, IdleKnown: true, Idle: true, Mark: tokioWorkerIO[3]}},
		{"tokio worker parked", tokioWorkerPark, "futex", StackClass{Runtime: RuntimeTokio, Role: RoleWorker, IdleKnown: true, Idle: true, Mark: tokioWorkerPark[1]}},
		{"tokio worker blocked in a task", tokioWorkerBlock, "clock_nanosleep", StackClass{Runtime: RuntimeTokio, Role: RoleWorker, IdleKnown: true, Mark: tokioWorkerBlock[7]}},
		{"tokio spawn_blocking", tokioOffload, "clock_nanosleep", StackClass{Runtime: RuntimeTokio, Role: RoleBlockingPool, IdleKnown: true, Mark: tokioOffload[4]}},
		{"tokio blocking pool idle", tokioPoolIdle, "futex", StackClass{Runtime: RuntimeTokio, Role: RoleBlockingPool, IdleKnown: true, Idle: true, Mark: tokioPoolIdle[1]}},
		{"tokio block_on on main", tokioMain, "futex", StackClass{Runtime: RuntimeTokio, Role: RoleEventLoop, IdleKnown: true, Idle: true, Mark: tokioMain[2]}},
		{"tokio block_in_place", []string{"app::fsync_all", "tokio::runtime::scheduler::multi_thread::worker::block_in_place", "app::handler", "tokio::runtime::task::core::Core<T,S>::poll",
			"tokio::runtime::scheduler::multi_thread::worker::Context::run_task"}, "fsync", StackClass{Runtime: RuntimeTokio, Role: RoleBlockingPool, IdleKnown: true, Mark: "tokio::runtime::scheduler::multi_thread::worker::block_in_place"}},
		{"tokio worker on a std Mutex in a task", []string{"std::sys::sync::mutex::futex::Mutex::lock_contended", "app::cache::get", "tokio::runtime::task::core::Core<T,S>::poll",
			"tokio::runtime::scheduler::multi_thread::worker::Context::run_task"}, "futex", StackClass{Runtime: RuntimeTokio, Role: RoleWorker, IdleKnown: true, Mark: "tokio::runtime::scheduler::multi_thread::worker::Context::run_task"}},
		{"actix worker", []string{"app::handler", "tokio::runtime::task::core::Core<T,S>::poll", "tokio::runtime::scheduler::current_thread::CoreGuard::block_on",
			"actix_rt::arbiter::Arbiter::with_tokio_rt::{{closure}}"}, "clock_nanosleep", StackClass{Runtime: RuntimeActix, Role: RoleWorker, IdleKnown: true, Mark: "tokio::runtime::scheduler::current_thread::CoreGuard::block_on"}},
		{"asyncio idle", asyncioIdle, "epoll_wait", StackClass{Runtime: RuntimeAsyncio, Role: RoleEventLoop, IdleKnown: true, Idle: true, Mark: "asyncio"}},
		{"asyncio time.sleep in a task", asyncioSleep, "clock_nanosleep", StackClass{Runtime: RuntimeAsyncio, Role: RoleEventLoop, IdleKnown: true, Mark: "asyncio"}},
		{"Go parked thread", goIdle, "futex", StackClass{Runtime: RuntimeGo}},
		{"Go netpoller", goNetpoll, "epoll_pwait", StackClass{Runtime: RuntimeGo}},
		{"unknown epoll loop", []string{"app_loop", "main"}, "epoll_wait", StackClass{Role: RoleEventLoop, Mark: "epoll_wait", ByWait: true}},
		{"node idle, cut short", []string{"uv__io_poll"}, "epoll_pwait", StackClass{Runtime: RuntimeLibuv, Role: RoleEventLoop, Mark: "epoll_pwait", ByWait: true}},
		{"unknown thread", []string{"app_work", "main"}, "read", StackClass{}},
	} {
		if got := ClassifyStack(tc.user, tc.syscall); got != tc.want {
			t.Errorf("%s:\n got %+v\nwant %+v", tc.name, got, tc.want)
		}
	}
}

func sight(tid int, start time.Time, kernel []string, user []string, libc int) ThreadSight {
	return ThreadSight{Pid: 100, Tid: tid, Name: "t", Start: start, Stack: append(slices.Clone(kernel), user...), KernelFrames: len(kernel), LibcFrames: libc, At: start}
}

var (
	kEpoll = []string{"__schedule", "schedule_hrtimeout_range", "do_epoll_wait", "__x64_sys_epoll_wait", "do_syscall_64"}
	kSleep = []string{"__schedule", "do_nanosleep", "hrtimer_nanosleep", "__x64_sys_clock_nanosleep", "do_syscall_64"}
	kPoll  = []string{"__schedule", "do_select", "core_sys_select", "__x64_sys_pselect6", "do_syscall_64"}
)

// What a thread was seen doing outlives the stack of one sleep: redis's
// main thread is told by its idle waits, and its blocking call, whose
// stack stops at the command, does not undo that.
func TestObserveKeepsWhatAThreadIs(t *testing.T) {
	es := NewEpisodes(16)
	now := time.Now()
	es.Observe(sight(7, now, kEpoll, append([]string{"epoll_wait"}, redisIdle...), 1))
	es.Observe(sight(7, now.Add(time.Second), kSleep, append([]string{"clock_nanosleep", "nanosleep"}, redisSleepShort...), 2))
	ti, ok := es.Thread(7)
	if !ok || ti.Runtime != RuntimeRedis || ti.Role != RoleEventLoop || ti.IdleSyscall != "epoll_wait" || !slices.Contains(ti.IdleStack, "aeMain") {
		t.Fatalf("thread 7: %+v, %v", ti, ok)
	}
	// A bare epoll wait does not turn a known thread into another one,
	// and a Go stack says the thread is not an event loop.
	es.Observe(sight(7, now.Add(2*time.Second), kEpoll, []string{"epoll_wait", "0x1234"}, 1))
	if ti, _ := es.Thread(7); ti.Runtime != RuntimeRedis || ti.Role != RoleEventLoop {
		t.Errorf("after a bare epoll wait: %+v", ti)
	}
	es.Observe(sight(9, now, kEpoll, append([]string{"epoll_pwait"}, nodeIdle...), 1))
	es.Observe(sight(9, now.Add(time.Second), kEpoll, []string{"epoll_pwait", "uv__io_poll"}, 1))
	if ti, _ := es.Thread(9); ti.Runtime != RuntimeNode || ti.Role != RoleEventLoop || ti.Mark != "uv_run" {
		t.Errorf("node's loop after a stack cut short: %+v", ti)
	}
	es.Observe(sight(8, now, kEpoll, []string{"epoll_wait", "app_loop", "main"}, 1))
	es.Observe(sight(8, now.Add(time.Second), kEpoll, append([]string{"epoll_pwait"}, goNetpoll...), 1))
	if ti, _ := es.Thread(8); ti.Runtime != RuntimeGo || ti.Role != RoleUnknown {
		t.Errorf("Go thread: %+v", ti)
	}
	// Threads that exit are forgotten; at most LimitThreads are kept.
	es.KeepThreads(func(_, tid int) bool { return tid != 8 && tid != 9 })
	if _, ok := es.Thread(8); ok {
		t.Error("thread 8 kept after it exited")
	}
	es.LimitThreads(2)
	for tid := 20; tid < 25; tid++ {
		es.Observe(sight(tid, now.Add(time.Duration(tid)*time.Second), kEpoll, []string{"epoll_wait", "app_loop"}, 1))
	}
	if got := len(es.Threads()); got != 2 {
		t.Errorf("%d threads kept, want 2", got)
	}
	if _, ok := es.Thread(24); !ok {
		t.Error("the thread seen last was evicted")
	}
}

// HomeWait: the wait a loop of an unknown runtime sleeps in most is its
// idle wait; a sleep elsewhere, or a tie, is not vouched for.
func TestHomeWait(t *testing.T) {
	es := NewEpisodes(16)
	now := time.Now()
	idle := []string{"epoll_wait", "app_poll", "app_loop", "main"}
	other := []string{"select", "app_handler", "app_loop", "main"}
	for i := 0; i < 3; i++ {
		es.Observe(sight(9, now.Add(time.Duration(i)*time.Second), kEpoll, idle, 1))
		// The same sleep seen again (ongoing, then ended) counts once.
		es.Observe(sight(9, now.Add(time.Duration(i)*time.Second), kEpoll, idle, 1))
	}
	es.Observe(sight(9, now.Add(5*time.Second), kPoll, other, 1))
	ti, _ := es.Thread(9)
	if !ti.HomeWait("epoll_wait", idle[1:], now.Add(10*time.Second)) {
		t.Error("the usual epoll wait is not the home wait")
	}
	if !ti.HomeWait("epoll_wait", idle[1:], now.Add(2*time.Second)) {
		t.Error("the third idle sleep, judged on the two before it, is not the home wait")
	}
	if ti.HomeWait("pselect6", other[1:], now.Add(5*time.Second)) {
		t.Error("a select in a handler is taken for the home wait")
	}
	fresh := NewEpisodes(16)
	fresh.Observe(sight(9, now, kEpoll, idle, 1))
	if ti, _ := fresh.Thread(9); ti.HomeWait("epoll_wait", idle[1:], now.Add(time.Second)) {
		t.Error("one sleep makes a home wait")
	}
}
