package signals

import (
	"hash/fnv"
	"slices"
	"sort"
	"strings"
	"sync"
	"time"
)

// A thread's name says little about what it does: Tokio names its blocking
// pool like its workers, redis, nginx and Node.js name their event loops
// after the program, and a new thread carries its parent's name until it
// renames itself. What a thread waits in, and the stack it waits with, say
// what it is: an event loop parks in epoll_wait under its runtime's poll
// (uv_run, aeProcessEvents, Tokio's park), a blocking pool's thread waits
// on a condition variable in the pool's run loop. So threads are classified
// by their stacks, and what each thread was seen doing is kept, because the
// stack of a blocking call is often cut short (C code built without frame
// pointers) before it reaches the runtime's frames.

// Runtime is the event-loop runtime a stack shows.
type Runtime string

// Runtimes recognised from their frames.
const (
	RuntimeUnknown Runtime = ""
	RuntimeTokio   Runtime = "tokio"   // Rust's Tokio (tokio::runtime::...)
	RuntimeActix   Runtime = "actix"   // actix-rt / actix-server, on Tokio's current-thread runtime
	RuntimeNode    Runtime = "node"    // libuv under Node.js (node::... frames)
	RuntimeLibuv   Runtime = "libuv"   // libuv in another program
	RuntimeRedis   Runtime = "redis"   // redis's ae event loop
	RuntimeNginx   Runtime = "nginx"   // nginx's event module
	RuntimeAsyncio Runtime = "asyncio" // CPython's asyncio
	RuntimeGo      Runtime = "go"      // Go's scheduler: goroutines, not an event loop
)

// Role is what a thread is for, as far as a blocking call on it goes.
type Role uint8

// Roles.
const (
	RoleUnknown Role = iota
	// RoleWorker: one of a pool of threads that share an async runtime's
	// tasks (Tokio's multi-thread workers, actix's arbiters). A blocking
	// call stalls the tasks queued on it.
	RoleWorker
	// RoleEventLoop: a thread that runs every callback of its loop alone
	// (Node.js's main thread, redis, an nginx worker, asyncio, a Tokio
	// block_on or current-thread runtime, any thread that waits for work
	// in epoll). A blocking call stalls everything the loop serves.
	RoleEventLoop
	// RoleBlockingPool: a thread meant to block (Tokio's blocking pool and
	// block_in_place, libuv's threadpool). Blocking there is the fix.
	RoleBlockingPool
	// RoleHelper: a runtime's own thread that serves no requests (V8's
	// platform workers, Node.js's delayed-task scheduler, nginx's master,
	// redis's background threads).
	RoleHelper
)

func (r Role) String() string {
	switch r {
	case RoleWorker:
		return "worker"
	case RoleEventLoop:
		return "event_loop"
	case RoleBlockingPool:
		return "blocking_pool"
	case RoleHelper:
		return "helper"
	}
	return "unknown"
}

// StackClass is what one stack says of its thread.
type StackClass struct {
	Runtime Runtime
	Role    Role
	// IdleKnown: the runtime's frames decide whether this sleep is the
	// thread's idle wait (its loop's poll or its pool's park, with no task
	// or callback in between); Idle is the answer. When IdleKnown is false
	// the stack is too short to tell, and only the system call is left.
	IdleKnown, Idle bool
	// Nested: the sleep is in an event loop run from inside a callback of
	// the thread's own loop (Node.js's execSync runs a second uv_run): it
	// looks like the idle wait, yet the outer loop is stopped. Runner is
	// the frame that runs the nested loop.
	Nested bool
	Runner string
	// Mark is the frame that told the runtime and the role.
	Mark string
	// ByWait: only the system call (an epoll wait) told the role; no
	// runtime's frame did.
	ByWait bool
}

// LoopWaits are the system calls an event loop waits for work in.
var LoopWaits = []string{"epoll_wait", "epoll_pwait", "epoll_pwait2", "io_uring_enter"}

// ClassifyStack tells the runtime and role of a thread, and whether it is
// in its idle wait, from one user stack (leaf first, C library frames at
// the leaf left out: Episode.CallerStack) and the system call it sleeps in
// ("" for a stack that is not a sleep).
func ClassifyStack(user []string, syscall string) StackClass {
	var c StackClass
	switch {
	case anyContains(user, "tokio::runtime::"):
		return classifyTokio(user)
	case anyContains(user, "actix_server::", "actix_rt::"):
		return classifyActix(user)
	case anyPrefix(user, "runtime."):
		// A Go program: its threads run goroutines and its netpoller's
		// epoll_pwait is the scheduler's, not an event loop of the app.
		return StackClass{Runtime: RuntimeGo}
	case anyPrefix(user, "uv_", "uv__", "node::"):
		c = classifyLibuv(user)
	case anyEqual(user, redisFrames...):
		c = classifyRedis(user)
	case anyPrefix(user, "ngx_"):
		c = classifyNginx(user)
	case anyEqual(user, pythonFrames...):
		c = classifyPython(user)
	}
	if c.Role != RoleUnknown || c.IdleKnown {
		return c
	}
	if slices.Contains(LoopWaits, syscall) {
		return StackClass{Runtime: c.Runtime, Role: RoleEventLoop, Mark: syscall, ByWait: true}
	}
	return c
}

// plumbing frames sit between a runtime's code and the kernel without
// being the app's: the C library's syscall wrappers, Rust's std and
// lock crates, mio, and frames with no symbol (module+offset, a bare
// address), which a runtime's static helpers often are.
func plumbing(f string) bool {
	if strings.HasPrefix(f, "0x") || strings.Contains(f, "+0x") {
		return true
	}
	for _, p := range []string{"std::sys::", "<std::sys::", "std::thread::park", "core::", "<core::", "parking_lot", "<parking_lot", "lock_api::", "<lock_api::", "mio::", "<mio::",
		"__GI_", "__libc_", "__pthread", "pthread_cond", "__futex", "syscall", "epoll_", "__epoll", "io_uring", "poll", "__poll"} {
		if strings.HasPrefix(f, p) {
			return true
		}
	}
	return false
}

func classifyTokio(user []string) StackClass {
	c := StackClass{Runtime: RuntimeTokio}
	task, park, foreign := false, false, false
	for i, f := range user {
		switch {
		case strings.Contains(f, "block_in_place"):
			// The app told Tokio this call blocks: Tokio moved the
			// worker's other tasks to another thread first.
			c.Role, c.Mark, c.IdleKnown = RoleBlockingPool, f, true
			return finishTokio(c, user)
		case strings.Contains(f, "tokio::runtime::blocking::"):
			c.Role, c.Mark = RoleBlockingPool, f
			c.IdleKnown, c.Idle = true, !task && !foreign
			return finishTokio(c, user)
		case strings.Contains(f, "tokio::runtime::scheduler::multi_thread::"), strings.Contains(f, "tokio::runtime::thread_pool::"):
			c.Role, c.Mark = RoleWorker, f
			c.IdleKnown, c.Idle = true, (park || tokioPark(f)) && !task && !foreign
			return finishTokio(c, user)
		case strings.Contains(f, "tokio::runtime::scheduler::current_thread::"), strings.Contains(f, "tokio::runtime::basic_scheduler::"),
			strings.Contains(f, "CachedParkThread") && strings.Contains(f, "block_on"), strings.Contains(f, "tokio::runtime::enter::"):
			// One thread drives the runtime's future itself.
			c.Role, c.Mark = RoleEventLoop, f
			c.IdleKnown, c.Idle = true, (park || tokioPark(f)) && !task && !foreign
			// A block_on inside spawn_blocking is the blocking pool's.
			for _, g := range user[i+1:] {
				if strings.Contains(g, "tokio::runtime::scheduler::multi_thread::") {
					break
				}
				if strings.Contains(g, "tokio::runtime::blocking::") {
					c.Role = RoleBlockingPool
					break
				}
			}
			return finishTokio(c, user)
		case strings.Contains(f, "tokio::runtime::task::"):
			task = true
		case tokioPark(f):
			park = true
		case strings.Contains(f, "tokio::"):
			// The I/O and time drivers, the runtime context: neither a
			// task nor the app's code.
		case plumbing(f):
		default:
			foreign = true
		}
	}
	if foreign || task {
		c.IdleKnown = true // a task's code is on the stack: not the park
	}
	return finishTokio(c, user)
}

// tokioPark: the frames of a Tokio thread parking until work arrives.
func tokioPark(f string) bool {
	return strings.Contains(f, "tokio::runtime::") && (strings.Contains(f, "park") || strings.Contains(f, "Driver::"))
}

// finishTokio: actix-rt runs each arbiter on a Tokio current-thread
// runtime, and actix-web's server workers are such arbiters: a pool.
func finishTokio(c StackClass, user []string) StackClass {
	if anyContains(user, "actix_rt::", "actix_server::") {
		c.Runtime = RuntimeActix
		if c.Role == RoleEventLoop {
			c.Role = RoleWorker
		}
	}
	return c
}

// classifyActix: actix-server's acceptor polls mio itself, without Tokio.
func classifyActix(user []string) StackClass {
	c := StackClass{Runtime: RuntimeActix}
	foreign := false
	for _, f := range user {
		switch {
		case strings.Contains(f, "actix_server::accept::"):
			c.Role, c.Mark = RoleEventLoop, f
			c.IdleKnown, c.Idle = true, !foreign
			return c
		case strings.Contains(f, "actix_rt::"), strings.Contains(f, "actix_server::"):
			c.Role, c.Mark = RoleWorker, f
			c.IdleKnown, c.Idle = foreign, false
			return c
		case plumbing(f):
		default:
			foreign = true
		}
	}
	return c
}

// nodeHelpers are frames of Node.js's own threads: V8's platform workers,
// the delayed-task scheduler (which runs a uv loop of its own), the
// inspector.
var nodeHelpers = []string{"PlatformWorkerThread", "DelayedTaskScheduler", "WorkerThreadsTaskRunner", "node::TaskQueue", "node::inspector::", "node::tracing::", "node::SignalHandlerThread"}

// nodeMainLoops run a thread's own libuv loop: the main thread's, and a
// worker_threads Worker's.
var nodeMainLoops = []string{"node::SpinEventLoop", "node::SpinEventLoopInternal", "node::NodeMainInstance::Run", "node::worker::Worker::Run", "node::Start"}

func classifyLibuv(user []string) StackClass {
	c := StackClass{Runtime: RuntimeLibuv}
	if anyPrefix(user, "node::") {
		c.Runtime = RuntimeNode
	}
	mainFrame := ""
	for _, f := range user {
		if slices.Contains(nodeMainLoops, f) {
			mainFrame = f
			break
		}
	}
	// The main thread too waits in node::TaskQueue when it drains V8's
	// tasks between loop turns: a helper's frames count only on a stack
	// that does not come from a thread's own loop.
	for _, f := range user {
		for _, h := range nodeHelpers {
			if strings.Contains(f, h) && mainFrame == "" {
				c.Role, c.Mark, c.IdleKnown, c.Idle = RoleHelper, f, true, true
				return c
			}
		}
	}
	first := slices.Index(user, "uv_run")
	if first < 0 && mainFrame != "" {
		// The loop's thread, outside uv_run: its loop is not turning.
		c.Role, c.Mark, c.IdleKnown = RoleEventLoop, mainFrame, true
		return c
	}
	if first < 0 {
		// libuv's threadpool: `worker` in threadpool.c runs the queued
		// work (fs, dns, crypto) and waits in uv_cond_wait for more.
		if slices.Contains(user, "worker") || anyPrefix(user, "uv__fs_work", "uv__work", "uv__getaddrinfo_work", "node::ThreadPoolWork") {
			c.Role, c.Mark = RoleBlockingPool, "worker"
			c.IdleKnown = true
			c.Idle = len(user) > 0 && (user[0] == "uv_cond_wait" || plumbing(user[0]))
			return c
		}
		return c
	}
	c.Role, c.Mark = RoleEventLoop, "uv_run"
	own := true // only the loop's poll between the sleep and uv_run
	for _, f := range user[:first] {
		if !strings.HasPrefix(f, "uv__io_poll") && !strings.HasPrefix(f, "uv__epoll") && !strings.HasPrefix(f, "uv__io_uring") && !plumbing(f) {
			own = false
		}
	}
	runs := 0
	for _, f := range user {
		if f == "uv_run" {
			runs++
		}
	}
	caller := ""
	if first+1 < len(user) {
		caller = user[first+1]
	}
	mainLoop := slices.Contains(nodeMainLoops, caller) || (c.Runtime == RuntimeLibuv && caller != "" && !plumbing(caller))
	switch {
	case runs > 1 || (c.Runtime == RuntimeNode && caller != "" && !plumbing(caller) && !mainLoop):
		// uv_run called from inside a callback: a synchronous wait
		// (spawnSync, execSync) runs a loop of its own while the
		// thread's loop stands still.
		c.Nested, c.Runner, c.IdleKnown = true, caller, true
	case !own:
		c.IdleKnown = true // a callback sleeps
	case mainLoop:
		c.IdleKnown, c.Idle = true, true
	}
	return c
}

var redisFrames = []string{"aeProcessEvents", "aeMain", "processCommand", "processInputBuffer", "readQueryFromClient", "bioProcessBackgroundJobs", "IOThreadMain", "serverCron", "beforeSleep"}

func classifyRedis(user []string) StackClass {
	c := StackClass{Runtime: RuntimeRedis}
	foreign := false
	for _, f := range user {
		switch f {
		case "bioProcessBackgroundJobs", "IOThreadMain":
			c.Role, c.Mark, c.IdleKnown, c.Idle = RoleHelper, f, true, true
			return c
		case "aeProcessEvents", "aeMain":
			c.Role, c.Mark = RoleEventLoop, f
			c.IdleKnown, c.Idle = true, !foreign
			return c
		case "processCommand", "processInputBuffer", "readQueryFromClient":
			// Inside a client's command: never the idle wait.
			c.Role, c.Mark, c.IdleKnown = RoleEventLoop, f, true
			return c
		}
		if !plumbing(f) && !strings.HasPrefix(f, "aeApi") {
			foreign = true
		}
	}
	c.IdleKnown = foreign
	return c
}

func classifyNginx(user []string) StackClass {
	c := StackClass{Runtime: RuntimeNginx}
	foreign := false
	for _, f := range user {
		switch f {
		case "ngx_process_events_and_timers", "ngx_worker_process_cycle", "ngx_single_process_cycle":
			c.Role, c.Mark = RoleEventLoop, f
			c.IdleKnown, c.Idle = true, !foreign
			return c
		case "ngx_master_process_cycle", "ngx_cache_manager_process_cycle":
			if !foreign {
				c.Role, c.Mark, c.IdleKnown, c.Idle = RoleHelper, f, true, true
				return c
			}
		}
		if !plumbing(f) && !strings.HasPrefix(f, "ngx_epoll_") {
			foreign = true
		}
	}
	c.IdleKnown = foreign
	return c
}

var pythonFrames = []string{"select_epoll_poll", "select_epoll_poll_impl", "pyepoll_poll", "task_step", "task_step_impl", "_PyEval_EvalFrameDefault", "PyEval_EvalCode", "Py_RunMain"}

func classifyPython(user []string) StackClass {
	c := StackClass{Runtime: RuntimeUnknown}
	asyncio := anyEqual(user, "task_step", "task_step_impl")
	poll := -1
	for i, f := range user {
		if strings.HasPrefix(f, "select_epoll_poll") || f == "pyepoll_poll" {
			poll = i
			break
		}
	}
	if !asyncio && poll < 0 {
		return c // a Python thread, not known to run a loop
	}
	c.Runtime, c.Role, c.Mark = RuntimeAsyncio, RoleEventLoop, "asyncio"
	switch {
	case asyncio:
		c.IdleKnown = true // a task's step is running: a callback sleeps
	case poll >= 0:
		own := true
		for _, f := range user[:poll] {
			own = own && plumbing(f)
		}
		c.IdleKnown, c.Idle = true, own
	}
	return c
}

func anyContains(fs []string, subs ...string) bool {
	for _, f := range fs {
		for _, s := range subs {
			if strings.Contains(f, s) {
				return true
			}
		}
	}
	return false
}

func anyPrefix(fs []string, ps ...string) bool {
	for _, f := range fs {
		for _, p := range ps {
			if strings.HasPrefix(f, p) {
				return true
			}
		}
	}
	return false
}

func anyEqual(fs []string, names ...string) bool {
	for _, f := range fs {
		if slices.Contains(names, f) {
			return true
		}
	}
	return false
}

// ThreadInfo is what a thread was seen doing: the runtime and role its
// stacks showed last, and the waits it has been seen in.
type ThreadInfo struct {
	Pid, Tid int
	Name     string // as last seen
	Runtime  Runtime
	Role     Role
	Mark     string // the frame that told the role
	// IdleStack is the user stack (C library leaf frames left out) of the
	// last sleep that was its idle wait, IdleSyscall that sleep's call.
	IdleStack   []string
	IdleSyscall string
	Seen        time.Time
	// Gen changes whenever what the thread is (Pid, Runtime, Role, Mark,
	// IdleStack, IdleSyscall) changes, never for a new wait counted:
	// rules that memoize a judgement made from those alone check it.
	Gen     uint64
	waits   [maxWaits]waitSig
	idleGen uint64 // bumped when IdleStack or IdleSyscall change
}

// threadClass is what ThreadInfo.Gen stands for.
type threadClass struct {
	pid     int
	rt      Runtime
	role    Role
	mark    string
	idleGen uint64
}

func classOf(t *ThreadInfo) threadClass {
	return threadClass{t.Pid, t.Runtime, t.Role, t.Mark, t.idleGen}
}

// maxWaits bounds the distinct sleep stacks kept per thread.
const maxWaits = 4

// waitSig counts the distinct sleeps of one thread with one stack.
type waitSig struct {
	sig       uint64
	n         int
	lastStart time.Time
}

// HomeWait reports whether a sleep in syscall with stack (leaf first, C
// library frames left out) that began at start is the wait this thread
// sleeps in most: seen in more earlier sleeps than any other, at least
// twice. For a loop the runtime's frames cannot vouch for, that is its
// idle wait.
func (t ThreadInfo) HomeWait(syscall string, stack []string, start time.Time) bool {
	sig := waitSignature(syscall, stack)
	best, mine := 0, 0
	for _, w := range t.waits {
		n := w.n
		if w.sig == sig && w.lastStart.Equal(start) {
			n-- // this very sleep is not evidence about itself
		}
		best = max(best, n)
		if w.sig == sig {
			mine = n
		}
	}
	return mine >= 2 && mine == best
}

// AtHome reports whether a sleep in syscall with this caller stack (leaf
// first) that began at start is where the thread waits for work: its last
// idle stack, or the wait it sleeps in most (HomeWait).
func (t ThreadInfo) AtHome(syscall string, stack []string, start time.Time) bool {
	if t.IdleSyscall == syscall && len(t.IdleStack) > 0 && len(stack) > 0 {
		n := min(len(stack), len(t.IdleStack))
		if slices.Equal(stack[:n], t.IdleStack[:n]) {
			return true
		}
	}
	return t.HomeWait(syscall, stack, start)
}

func waitSignature(syscall string, stack []string) uint64 {
	h := fnv.New64a()
	h.Write([]byte(syscall))
	for i, f := range stack {
		if i == 16 {
			break
		}
		h.Write([]byte{0})
		h.Write([]byte(f))
	}
	return h.Sum64()
}

// ThreadSight is one look at a thread asleep: the stack it went to sleep
// with (as Episode.Stack), and when the sleep began.
type ThreadSight struct {
	Pid, Tid     int
	Name         string
	Start        time.Time
	Stack        []string
	KernelFrames int
	LibcFrames   int
	At           time.Time
}

// threads keeps ThreadInfo per thread, at most max, the least recently
// seen evicted first.
type threads struct {
	mu  sync.RWMutex
	max int
	m   map[int]*ThreadInfo
	gen uint64 // the last ThreadInfo.Gen given
}

// defaultMaxThreads: the sched probe's own default map size.
const defaultMaxThreads = 4096

// LimitThreads bounds the threads whose doings are kept (sched.max_threads).
func (es *Episodes) LimitThreads(n int) {
	es.th.mu.Lock()
	defer es.th.mu.Unlock()
	es.th.max = max(n, 1)
	es.th.evictLocked()
}

// Observe records what a thread was seen sleeping in. A stack that shows
// a runtime and role updates them (the latest wins: Tokio turns blocking
// threads into workers); one that shows only an epoll wait makes an
// otherwise unknown thread an event loop, and never overrides what a
// runtime's frames said.
func (es *Episodes) Observe(s ThreadSight) {
	e := Episode{Stack: s.Stack, KernelFrames: s.KernelFrames, LibcFrames: s.LibcFrames}
	user := e.CallerStack()
	if len(user) == 0 {
		return
	}
	sc := e.Syscall()
	c := ClassifyStack(user, sc)
	es.th.mu.Lock()
	defer es.th.mu.Unlock()
	t := es.th.m[s.Tid]
	if t == nil || t.Pid != s.Pid {
		if es.th.m == nil {
			es.th.m = map[int]*ThreadInfo{}
		}
		t = &ThreadInfo{Pid: s.Pid, Tid: s.Tid, Seen: s.At}
		es.th.m[s.Tid] = t
		es.th.evictLocked()
	}
	before := classOf(t)
	defer func() {
		if t.Gen == 0 || classOf(t) != before {
			es.th.gen++
			t.Gen = es.th.gen
		}
	}()
	t.Name, t.Seen = s.Name, s.At
	// A stack cut short of node's frames shows libuv only: it is no news
	// about a thread known to be Node.js's.
	sameRuntime := t.Runtime == c.Runtime || (t.Runtime == RuntimeNode && c.Runtime == RuntimeLibuv)
	switch {
	case c.ByWait:
		if t.Runtime == RuntimeUnknown {
			t.Runtime = c.Runtime
		}
		if t.Role == RoleUnknown && t.Runtime != RuntimeGo {
			t.Role, t.Mark = c.Role, c.Mark
		}
	case c.Role != RoleUnknown && c.Runtime != RuntimeUnknown:
		if !sameRuntime {
			t.Runtime = c.Runtime
		}
		t.Role, t.Mark = c.Role, c.Mark
	case c.Runtime != RuntimeUnknown && !sameRuntime:
		t.Runtime, t.Role, t.Mark = c.Runtime, RoleUnknown, ""
	}
	if c.IdleKnown && c.Idle && (sc != t.IdleSyscall || !slices.Equal(t.IdleStack, user[:min(len(user), 32)])) {
		t.IdleStack, t.IdleSyscall = slices.Clone(user[:min(len(user), 32)]), sc
		t.idleGen++
	}
	if c.IdleKnown && !c.Idle {
		return // a task's or callback's sleep: not a candidate idle wait
	}
	sig := waitSignature(sc, user)
	slot := -1
	for i, w := range t.waits {
		if w.sig == sig && w.n > 0 {
			slot = i
			break
		}
	}
	if slot < 0 {
		// A new stack takes the place of the rarest.
		slot = 0
		for i, w := range t.waits {
			if w.n < t.waits[slot].n {
				slot = i
			}
		}
		t.waits[slot] = waitSig{sig: sig}
	}
	if w := &t.waits[slot]; !w.lastStart.Equal(s.Start) {
		w.n++
		w.lastStart = s.Start
	}
}

func (th *threads) evictLocked() {
	limit := th.max
	if limit <= 0 {
		limit = defaultMaxThreads
	}
	if len(th.m) <= limit {
		return
	}
	all := make([]*ThreadInfo, 0, len(th.m))
	for _, t := range th.m {
		all = append(all, t)
	}
	sort.Slice(all, func(i, j int) bool { return all[i].Seen.Before(all[j].Seen) })
	for _, t := range all[:len(all)-limit] {
		delete(th.m, t.Tid)
	}
}

// Thread returns what thread tid was seen doing.
func (es *Episodes) Thread(tid int) (ThreadInfo, bool) {
	es.th.mu.RLock()
	defer es.th.mu.RUnlock()
	t, ok := es.th.m[tid]
	if !ok {
		return ThreadInfo{}, false
	}
	out := *t
	out.IdleStack = slices.Clone(t.IdleStack)
	return out, true
}

// ThreadGen is ThreadInfo.Gen of thread tid, without copying the rest.
func (es *Episodes) ThreadGen(tid int) (uint64, bool) {
	es.th.mu.RLock()
	defer es.th.mu.RUnlock()
	t, ok := es.th.m[tid]
	if !ok {
		return 0, false
	}
	return t.Gen, true
}

// Threads returns every thread known, by tid.
func (es *Episodes) Threads() []ThreadInfo {
	es.th.mu.RLock()
	defer es.th.mu.RUnlock()
	out := make([]ThreadInfo, 0, len(es.th.m))
	for _, t := range es.th.m {
		c := *t
		c.IdleStack = slices.Clone(t.IdleStack)
		out = append(out, c)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Tid < out[j].Tid })
	return out
}

// KeepThreads forgets the threads keep rejects (threads that exited, or
// all of them when the target changed).
func (es *Episodes) KeepThreads(keep func(pid, tid int) bool) {
	es.th.mu.Lock()
	defer es.th.mu.Unlock()
	for tid, t := range es.th.m {
		if !keep(t.Pid, tid) {
			delete(es.th.m, tid)
		}
	}
}
