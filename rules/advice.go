package rules

import (
	"fmt"
	"strings"

	"github.com/culprit-dev/culprit/workload"
)

// Advisor words a finding's remediation in the target's own terms: Tokio
// advice for a Go service, or goroutine advice for nginx, is wrong advice,
// and an operator who reads it stops trusting the tool. Each method returns
// one or two full sentences for one topic; a rule may append its own
// numbers. For an unknown runtime the wording is runtime-neutral and names
// no framework at all.
//
//	adv := NewAdvisor(w.Runtime)
//	o.Remediation = adv.BlockingCall(fn, syscall)
//
// The zero Advisor is the unknown runtime's. Advisors are small values,
// safe to copy and to use from several goroutines.
type Advisor struct {
	rt workload.Runtime
	f  flavor
}

// flavor is the family of advice a runtime gets. Runtimes that share an
// API share a flavor (actix-web runs on Tokio but has its own
// web::block), and a flavor's texts only use its own vocabulary.
type flavor int

const (
	flavorGeneric flavor = iota
	flavorGo
	flavorTokio    // Rust on Tokio (hyper, axum, tonic)
	flavorActix    // Rust on actix-web
	flavorAsyncStd // Rust on async-std
	flavorRust     // Rust without a known async runtime
	flavorNginx
	flavorRedis
	flavorEnvoy
	flavorNative // C and C++ otherwise
	flavorNode
	flavorPython
	flavorJVM
	flavorDotnet
)

// NewAdvisor returns the advisor for rt, as workload.DetectRuntime found it.
func NewAdvisor(rt workload.Runtime) Advisor {
	a := Advisor{rt: rt}
	switch rt.Lang {
	case workload.LangGo:
		a.f = flavorGo
	case workload.LangRust:
		switch {
		case rt.Has(workload.FwActix):
			a.f = flavorActix
		case rt.Has(workload.FwTokio), rt.Has(workload.FwAxum), rt.Has(workload.FwTonic):
			a.f = flavorTokio
		case rt.Has(workload.FwAsyncStd):
			a.f = flavorAsyncStd
		default:
			a.f = flavorRust
		}
	case workload.LangC, workload.LangCPP:
		switch {
		case rt.Has(workload.FwNginx):
			a.f = flavorNginx
		case rt.Has(workload.FwRedis):
			a.f = flavorRedis
		case rt.Has(workload.FwEnvoy):
			a.f = flavorEnvoy
		default:
			a.f = flavorNative
		}
	case workload.LangNode:
		a.f = flavorNode
	case workload.LangPython:
		a.f = flavorPython
	case workload.LangJVM:
		a.f = flavorJVM
	case workload.LangDotnet:
		a.f = flavorDotnet
	}
	return a
}

// Runtime is the runtime the advice is for.
func (a Advisor) Runtime() workload.Runtime { return a.rt }

func (a Advisor) has(fw string) bool { return a.rt.Has(fw) }

// version is a framework's version, "" when unknown.
func (a Advisor) version(fw string) string {
	for _, f := range a.rt.Frameworks {
		if f.Name == fw {
			return f.Version
		}
	}
	return ""
}

// inCall is " in nanosleep", or nothing when the system call is unknown.
func inCall(call string) string {
	if call == "" {
		return ""
	}
	return " in " + call
}

// BlockingCall is the remedy for fn blocking a worker or event-loop thread
// in the system call call ("" when unknown).
func (a Advisor) BlockingCall(fn, call string) string {
	in := inCall(call)
	switch a.f {
	case flavorGo:
		return fmt.Sprintf("%s blocks its thread%s. Go parks only the goroutine on a blocking system call unless the goroutine is locked to its thread (runtime.LockOSThread) or the call goes through cgo: make the call from a goroutine of its own (hand the work over a channel), give it a context deadline, and keep locked threads free of it.", fn, in)
	case flavorTokio:
		return fmt.Sprintf("Move %s off the Tokio worker: wrap it in tokio::task::spawn_blocking (or tokio::task::block_in_place on the multi-threaded runtime), or use the async equivalent (tokio::fs, tokio::time::sleep, an async database driver); never call block_on inside the runtime. While it blocks%s, that worker runs no other task: the tasks queued on it wait until it returns or an idle worker steals them.", fn, in)
	case flavorActix:
		return fmt.Sprintf("Move %s off the actix-web worker: run it in web::block(move || ...).await, actix-web's pool for blocking work, or use the async equivalent of the call. Each actix-web worker is a single-threaded runtime, so while it blocks%s every connection it owns waits.", fn, in)
	case flavorAsyncStd:
		return fmt.Sprintf("Move %s off the async-std executor: wrap it in async_std::task::spawn_blocking, or use the async equivalent (async_std::fs, async_std::task::sleep). While it blocks%s, that thread runs no other task.", fn, in)
	case flavorRust:
		return fmt.Sprintf("Move %s off this worker thread: run blocking calls on a thread of their own (std::thread::spawn) or a dedicated blocking pool, and give them timeouts, so the threads that serve requests never wait%s.", fn, in)
	case flavorNginx:
		return fmt.Sprintf("%s blocks an nginx worker process%s, and every connection that worker owns waits: for file I/O turn on thread pools (aio threads;), for a module or Lua code use its non-blocking API (OpenResty cosockets instead of blocking Lua libraries), and make no blocking network or DNS calls in a handler.", fn, in)
	case flavorRedis:
		return fmt.Sprintf("%s blocks redis's single event loop%s, and every client waits: for disk writes check appendfsync (everysec, not always) and the fork of BGSAVE/BGREWRITEAOF; for a module or Lua script, keep slow work out of it. SLOWLOG GET and LATENCY DOCTOR show what held the loop.", fn, in)
	case flavorEnvoy:
		return fmt.Sprintf("%s blocks an Envoy worker thread%s, and every connection that worker owns waits: filters must not block, so use Envoy's asynchronous HTTP/gRPC clients from filters and move slow work to an external service.", fn, in)
	case flavorNative:
		return fmt.Sprintf("Move %s off the event-loop/worker thread: run the blocking call (file I/O, getaddrinfo, a synchronous database client) on a separate thread pool and hand the result back, or use the non-blocking form of the call with the event loop. While it blocks%s, everything queued on that thread waits.", fn, in)
	case flavorNode:
		return fmt.Sprintf("%s blocks the JavaScript event loop%s, and every request waits: use the asynchronous API (fs.promises instead of fs.*Sync, the callback forms of crypto and zlib), and move unavoidable blocking work to worker_threads.", fn, in)
	case flavorPython:
		switch {
		case a.has(workload.FwAsyncio):
			return fmt.Sprintf("%s blocks the asyncio event loop%s, and every coroutine waits: run it with await asyncio.to_thread(...) or loop.run_in_executor(...), or use an async library (httpx.AsyncClient, aiohttp, asyncpg). PYTHONASYNCIODEBUG=1 logs every callback that holds the loop over 100 ms.", fn, in)
		case a.has(workload.FwGevent):
			return fmt.Sprintf("%s blocks the gevent hub%s, and every greenlet waits: the call bypasses gevent's monkey patching (a C extension, or a module imported before monkey.patch_all()); patch first thing at startup, or run the call in the hub's threadpool (gevent.get_hub().threadpool.spawn).", fn, in)
		case a.has(workload.FwGunicorn):
			return fmt.Sprintf("%s blocks a gunicorn worker%s, and a sync worker serves one request at a time: give the call a timeout, add workers (--workers) or threads (--threads), or move slow calls to a background job queue.", fn, in)
		}
		return fmt.Sprintf("%s blocks a Python thread%s: give the call a timeout and run it on a thread pool (concurrent.futures.ThreadPoolExecutor) or a background job queue, so the threads that serve requests stay free.", fn, in)
	case flavorJVM:
		return fmt.Sprintf("%s blocks a JVM thread%s: if it is an event-loop thread (Netty, Vert.x, WebFlux), hand the call to a separate executor (an EventExecutorGroup for a Netty handler, Schedulers.boundedElastic() in Reactor) or use a non-blocking client; in a thread-per-request server, give it a timeout and size the pool for it.", fn, in)
	case flavorDotnet:
		return fmt.Sprintf("%s blocks a .NET thread-pool thread%s: await the asynchronous API end to end instead of .Result, .Wait() or a synchronous call, and move unavoidable blocking work to a dedicated thread (TaskCreationOptions.LongRunning) so the pool does not starve.", fn, in)
	}
	return fmt.Sprintf("Move %s off the worker thread: run the blocking call on a separate pool of threads meant for blocking work, or use a non-blocking form of the call, so the threads that serve requests never wait%s.", fn, in)
}

// CPUHeavy is the remedy for fn keeping a worker or event-loop thread on
// CPU without yielding.
func (a Advisor) CPUHeavy(fn string) string {
	switch a.f {
	case flavorGo:
		return fmt.Sprintf("%s runs without giving up its thread. Goroutines are preempted since Go 1.14, so this is a thread locked with runtime.LockOSThread, a cgo call, or GODEBUG=asyncpreemptoff=1: run the work in an ordinary goroutine, split it into parts, and bound CPU-heavy concurrency (a semaphore sized to GOMAXPROCS) so request goroutines still get a P.", fn)
	case flavorTokio:
		return fmt.Sprintf("%s keeps a Tokio worker on CPU without reaching an .await: move it to tokio::task::spawn_blocking or a rayon pool, or split it and call tokio::task::yield_now().await between parts.", fn)
	case flavorActix:
		return fmt.Sprintf("%s keeps an actix-web worker on CPU, and the connections that worker owns wait: run it in web::block or a rayon pool, or split it into parts that yield between them.", fn)
	case flavorAsyncStd:
		return fmt.Sprintf("%s keeps an async-std thread on CPU without reaching an .await: move it to async_std::task::spawn_blocking or a rayon pool, or split it and call async_std::task::yield_now().await between parts.", fn)
	case flavorRust:
		return fmt.Sprintf("%s keeps a worker thread on CPU without a break: run it on a separate CPU pool (rayon) sized below the core count, or split it into smaller parts.", fn)
	case flavorNginx:
		return fmt.Sprintf("%s keeps an nginx worker on CPU, and its connections wait: lower the per-request CPU work (gzip_comp_level, regex locations and rewrites, TLS handshakes without ssl_session_cache), and set worker_processes auto so that every core runs a worker.", fn)
	case flavorRedis:
		return fmt.Sprintf("%s keeps redis's event loop on CPU, and every client waits: find the command in SLOWLOG GET, replace O(N) commands (KEYS, HGETALL or SMEMBERS on huge keys) by SCAN-family iteration, split long Lua scripts, and delete big keys with UNLINK.", fn)
	case flavorEnvoy:
		return fmt.Sprintf("%s keeps an Envoy worker thread on CPU: lighten the filter chain (regex route matching, Lua or Wasm filters, access-log formatting), or raise --concurrency to the cores available.", fn)
	case flavorNative:
		return fmt.Sprintf("%s keeps the event-loop/worker thread on CPU: move it to a separate pool of CPU threads sized below the core count, or split it into parts and return to the event loop between them.", fn)
	case flavorNode:
		return fmt.Sprintf("%s keeps the JavaScript event loop on CPU, and every request waits: move it to worker_threads (a pool such as piscina), or split it into chunks scheduled with setImmediate; perf_hooks.monitorEventLoopDelay measures the delay it causes.", fn)
	case flavorPython:
		if a.has(workload.FwAsyncio) {
			return fmt.Sprintf("%s keeps the asyncio event loop on CPU, and every coroutine waits: run it in a process pool (loop.run_in_executor with a ProcessPoolExecutor; threads would still share the GIL), or split it with await asyncio.sleep(0) between parts.", fn)
		}
		more := ""
		if a.has(workload.FwGunicorn) {
			more = ", or run more worker processes (gunicorn --workers)"
		}
		return fmt.Sprintf("%s keeps a Python thread on CPU, and the GIL makes the other threads of the process wait too: move it to a process pool (concurrent.futures.ProcessPoolExecutor) or a background job queue%s.", fn, more)
	case flavorJVM:
		return fmt.Sprintf("%s keeps a JVM thread on CPU: if it is an event-loop thread (Netty, Vert.x, Reactor), move the work to a bounded executor sized to the cores (a ForkJoinPool or a fixed thread pool) and return to the loop; async-profiler or JFR shows the hot path.", fn)
	case flavorDotnet:
		return fmt.Sprintf("%s keeps a .NET thread-pool thread on CPU: bound the parallelism of CPU-heavy work (SemaphoreSlim, or a dedicated TaskScheduler), split it into parts, and profile it with dotnet-trace.", fn)
	}
	return fmt.Sprintf("%s keeps a worker thread on CPU without a break: run CPU-heavy work on a separate pool sized below the core count, or split it into parts so the worker serves other requests between them.", fn)
}

// LoopStalled is the remedy when a listener's accept queue stayed full and
// the app accepted nothing: its accept loop or event loop did not run.
func (a Advisor) LoopStalled() string {
	const tail = " Raising the backlog only delays the drops."
	switch a.f {
	case flavorGo:
		return "The accept loop is a goroutine: check that it hands each connection to a goroutine of its own (as http.Server does) and does no work inline, that it is not waiting on a lock or a full channel, and that no locked threads or cgo calls hold every P; a goroutine dump (/debug/pprof/goroutine?debug=2; SIGQUIT prints one too but kills the process) shows where it waits." + tail
	case flavorTokio:
		return "The Tokio workers that poll the accept loop were blocked or busy: move blocking calls into tokio::task::spawn_blocking and CPU-heavy work into spawn_blocking or rayon, never call block_on inside the runtime, and serve each connection in its own task (tokio::spawn); tokio-console shows the tasks that poll too long." + tail
	case flavorActix:
		return "actix-web's acceptor pauses while every worker is blocked, busy or at its connection limit: move blocking calls into web::block and CPU-heavy work to a separate pool, and raise HttpServer::workers or max_connections if the workers are simply full." + tail
	case flavorAsyncStd:
		return "The async-std threads that poll the accept loop were blocked or busy: move blocking calls into async_std::task::spawn_blocking, CPU-heavy work to a separate pool, and serve each connection in its own task (async_std::task::spawn)." + tail
	case flavorRust:
		return "The threads that accept and serve connections were blocked or busy: move blocking calls to threads of their own (std::thread::spawn) and CPU-heavy work to a separate pool (rayon); a thread dump (gdb -p PID -batch -ex 'thread apply all bt') shows where they wait." + tail
	case flavorNginx:
		return "nginx's workers did not accept: each was blocked (file I/O without aio threads, a blocking module or Lua library) or at worker_connections; raise worker_connections (and worker_rlimit_nofile to match), set worker_processes auto, and remove blocking calls from the request path." + tail
	case flavorRedis:
		return "redis's event loop did not come back to accept: a slow command (SLOWLOG GET), a big key deleted with DEL, a long Lua script, or the fork of BGSAVE/BGREWRITEAOF on a large dataset held it; LATENCY DOCTOR names the event." + " Raising tcp-backlog only delays the drops."
	case flavorEnvoy, flavorNative:
		return "The threads that run the event loop or the accept loop were blocked or busy: move blocking calls (file I/O, getaddrinfo, synchronous database clients) to a thread pool and CPU-heavy work to worker threads; a thread dump (gdb -p PID -batch -ex 'thread apply all bt') shows where they wait." + tail
	case flavorNode:
		return "The JavaScript event loop was blocked: synchronous calls (fs.*Sync, crypto's sync forms, zlib's sync forms), a big JSON.parse or JSON.stringify, or a long loop kept it from accepting; use the asynchronous APIs and move CPU work to worker_threads; perf_hooks.monitorEventLoopDelay or node --cpu-prof shows what holds it." + tail
	case flavorPython:
		switch {
		case a.has(workload.FwAsyncio):
			return "The asyncio event loop was blocked: a coroutine made a blocking call or ran CPU work without awaiting; move blocking calls to asyncio.to_thread(...), CPU work to a process pool, and run with PYTHONASYNCIODEBUG=1 to log the callbacks that hold the loop; py-spy dump --pid PID shows where it is." + tail
		case a.has(workload.FwGunicorn):
			return "Every gunicorn worker was busy: each sync worker serves one request at a time, so slow requests take them all; raise --workers or --threads, set --timeout, and find the slow call with py-spy dump --pid PID." + tail
		}
		return "The Python threads that accept and serve were blocked, or one held the GIL: give blocking calls timeouts, move CPU work to a process pool, and find where they wait with py-spy dump --pid PID." + tail
	case flavorJVM:
		return "The acceptor or request threads were all blocked or busy: in a thread-per-request server (Tomcat, Jetty) the pool was exhausted, so raise it or find the slow call; in an event-loop server (Netty, Vert.x, WebFlux) a handler blocked the loop. jstack PID or jcmd PID Thread.print shows where they wait." + tail
	case flavorDotnet:
		return "The .NET thread pool was starved: sync-over-async (.Result, .Wait(), GetAwaiter().GetResult()) and blocking calls hold its threads while new ones are added slowly; await end to end. dotnet-counters monitor shows the ThreadPool queue length, dotnet-stack report the stacks." + tail
	}
	return "The threads that accept and serve connections were blocked or busy: move blocking calls and CPU-heavy work off them to a separate pool, and take a thread dump to see what they wait on." + tail
}

// Backlog is the remedy for a listen backlog that bursts overflow: how to
// raise it (backlog now, 0 when unknown) to at least atLeast in this
// runtime, then what net.core.somaxconn (somaxconn, 0 when unknown) means
// for it.
func (a Advisor) Backlog(atLeast, backlog, somaxconn int) string {
	n := atLeast
	var s string
	switch a.f {
	case flavorGo:
		// Go has no backlog setting: net.Listen asks for somaxconn, read
		// once per process.
		const how = "Go's net.Listen (and http.ListenAndServe) asks for net.core.somaxconn as its backlog, read once at startup"
		if somaxconn >= n || (backlog > 0 && backlog < somaxconn) {
			// Not what net.Listen would ask for now. Which of the two
			// it is cannot be seen from outside: the value net.Listen
			// read at the process's start is gone.
			s = fmt.Sprintf("%s: the sysctl allows %d now, yet this listener's backlog is smaller, so either the service started while the sysctl was lower or the listener was not made by net.Listen (a listen(2) call or a library with a smaller backlog of its own: give it at least %d)", how, somaxconn, n)
			if somaxconn < n {
				s += fmt.Sprintf("; either way the sysctl caps it: raise it to at least %d (sysctl -w net.core.somaxconn=%d; in a pod, securityContext.sysctls)", n, n)
			}
			return s + ", then restart the service. Keep net.ipv4.tcp_max_syn_backlog at least as large."
		}
		s = fmt.Sprintf("%s: raise the sysctl to at least %d (sysctl -w net.core.somaxconn=%d; in a pod, securityContext.sysctls) and restart the service", how, n, n)
		if somaxconn > 0 {
			s += fmt.Sprintf("; it is %d now", somaxconn)
		}
		return s + ". Keep net.ipv4.tcp_max_syn_backlog at least as large."
	case flavorTokio:
		s = fmt.Sprintf("Raise the listen backlog to at least %d: Tokio's TcpListener::bind listens with 1024, and std's TcpListener::bind (behind hyper 0.14's Server::bind) with 128; create the socket with tokio::net::TcpSocket, call listen(%d), and hand the listener to the server.", n, n)
	case flavorActix:
		s = fmt.Sprintf("Raise actix-web's listen backlog to at least %d with HttpServer::backlog(%d).", n, n)
	case flavorAsyncStd:
		s = fmt.Sprintf("Raise the listen backlog to at least %d: async-std's TcpListener::bind uses std's fixed 128; create the socket with socket2, call listen(%d), and convert it with async_std::net::TcpListener::from.", n, n)
	case flavorRust:
		s = fmt.Sprintf("Raise the listen backlog to at least %d: std's TcpListener::bind uses a fixed 128; create the socket with socket2 (Socket::listen(%d)) and convert it into a std::net::TcpListener.", n, n)
	case flavorNginx:
		s = fmt.Sprintf("Raise the backlog on nginx's listen directive to at least %d (listen ... backlog=%d;); nginx uses 511 by default.", n, n)
	case flavorRedis:
		s = fmt.Sprintf("Raise tcp-backlog to at least %d in redis.conf (the default is 511) and restart: it is applied when the listener is created.", n)
	case flavorEnvoy:
		s = fmt.Sprintf("Set tcp_backlog_size: %d on the Envoy listener (without it Envoy asks for net.core.somaxconn).", n)
	case flavorNative:
		s = fmt.Sprintf("Raise the backlog the server passes to listen(2) to at least %d, in its configuration or its code.", n)
	case flavorNode:
		s = fmt.Sprintf("Raise the listen backlog to at least %d: server.listen({ port, backlog: %d }); Node.js uses 511 by default.", n, n)
	case flavorPython:
		switch {
		case a.has(workload.FwGunicorn):
			s = fmt.Sprintf("Start gunicorn with --backlog %d (the default is 2048).", n)
		case a.has(workload.FwUvicorn):
			s = fmt.Sprintf("Start uvicorn with --backlog %d (the default is 2048).", n)
		case a.has(workload.FwAsyncio):
			s = fmt.Sprintf("Raise the listen backlog to at least %d: asyncio.start_server(..., backlog=%d) or loop.create_server(..., backlog=%d); asyncio uses 100 by default.", n, n, n)
		default:
			s = fmt.Sprintf("Raise the listen backlog to at least %d: sock.listen(%d); socketserver-based servers (http.server, wsgiref) take request_queue_size, 5 by default.", n, n)
		}
	case flavorJVM:
		s = fmt.Sprintf("Raise the listen backlog to at least %d: new ServerSocket(port, %d); Tomcat's acceptCount (server.tomcat.accept-count in Spring Boot, 100 by default); Jetty's acceptQueueSize; Netty's ServerBootstrap.option(ChannelOption.SO_BACKLOG, %d).", n, n, n)
	case flavorDotnet:
		s = fmt.Sprintf("Raise Kestrel's listen backlog (512 by default) to at least %d: builder.WebHost.UseSockets(o => o.Backlog = %d).", n, n)
	default:
		s = fmt.Sprintf("Raise the server's listen backlog (its backlog setting, or the argument it passes to listen(2)) to at least %d.", n)
	}
	return s + " " + somaxconnNote(atLeast, somaxconn)
}

// somaxconnNote is what net.core.somaxconn means for any runtime: the
// kernel caps every backlog at it.
func somaxconnNote(atLeast, somaxconn int) string {
	switch {
	case somaxconn <= 0:
		return fmt.Sprintf("The kernel caps every backlog at net.core.somaxconn: make sure it is at least %d too (in a pod, securityContext.sysctls), and keep net.ipv4.tcp_max_syn_backlog at least as large.", atLeast)
	case somaxconn < atLeast:
		return fmt.Sprintf("The kernel caps every backlog at net.core.somaxconn, now %d: raise it to at least %d too (sysctl -w net.core.somaxconn=%d; in a pod, securityContext.sysctls), and keep net.ipv4.tcp_max_syn_backlog at least as large.", somaxconn, atLeast, atLeast)
	}
	return fmt.Sprintf("net.core.somaxconn (%d) already allows it; keep net.ipv4.tcp_max_syn_backlog at least as large.", somaxconn)
}

// FDLeak is the remedy for descriptors of one kind growing towards
// RLIMIT_NOFILE. kind is the fds collector's: socket, file, pipe,
// anon_eventfd, anon_eventpoll, anon_timerfd, anon_inotify, anon_other.
// Sockets piling up in CLOSE_WAIT have their own remedy, CloseWait.
func (a Advisor) FDLeak(kind string) string {
	switch kind {
	case "socket":
		return "Sockets are opened and never closed. " + a.socketLeak()
	case "file":
		return "Files are opened and never closed. " + a.fileLeak()
	case "pipe":
		return "Pipes leak, usually those of child processes. " + a.pipeLeak()
	case "anon_eventfd", "anon_eventpoll", "anon_timerfd":
		return "Event descriptors (eventfd, epoll, timerfd) leak: each belongs to an event loop or timer that is created and never closed. " + a.eventLeak()
	case "anon_inotify":
		return "inotify descriptors leak: file watchers are created and never closed. " + a.watchLeak()
	}
	return "Descriptors leak: find the code path that opens them without closing them (ls -l /proc/PID/fd shows what they point at), and close them on every path, error paths included."
}

func (a Advisor) socketLeak() string {
	switch a.f {
	case flavorGo:
		return "Share one http.Client (its Transport pools connections) instead of one per request, always close response bodies (defer resp.Body.Close()), and close every net.Conn on all paths."
	case flavorTokio, flavorActix, flavorAsyncStd, flavorRust:
		return "Build one HTTP client at startup and clone it (reqwest::Client is a pool) instead of one per request, and make sure connections are dropped: a task that holds a TcpStream and never finishes keeps it open."
	case flavorNginx:
		return "Set keepalive_timeout, client_header_timeout and client_body_timeout so idle client connections close, and bound upstream keepalive (keepalive N; in the upstream block)."
	case flavorRedis:
		return "Set timeout in redis.conf so idle clients are closed, and fix the clients that open a connection per request instead of using a pool (CLIENT LIST shows who holds them)."
	case flavorNode:
		return "Reuse one http.Agent with keepAlive and a maxSockets bound, call res.resume() on responses you do not read, and destroy sockets on 'error' and 'timeout'."
	case flavorPython:
		return "Share one requests.Session (or httpx.Client, aiohttp.ClientSession) instead of one per request, and close responses and sockets in with-blocks."
	case flavorJVM:
		return "Reuse one HTTP client instance (OkHttpClient, a pooled Apache client), close every response and socket with try-with-resources, and return JDBC connections to the pool."
	case flavorDotnet:
		return "Use IHttpClientFactory or one shared client instead of one per request, and dispose every response, stream and socket (using)."
	}
	return "Reuse connections through one pooled client per upstream instead of one per request, and close every socket on all paths, error paths included."
}

func (a Advisor) fileLeak() string {
	switch a.f {
	case flavorGo:
		return "Close each one right after opening it succeeds (defer f.Close()), and close os.File values kept in long-lived structures when they are dropped."
	case flavorTokio, flavorActix, flavorAsyncStd, flavorRust:
		return "A File closes when it is dropped: look for handles kept in long-lived structures or caches, and for into_raw_fd or mem::forget."
	case flavorNginx:
		return "If open_file_cache is on, bound it (max= and inactive=); otherwise a module leaks them: update or remove it."
	case flavorNode:
		return "Close every fs.promises FileHandle in a finally block (await fh.close()), and destroy streams on error (stream.pipeline does)."
	case flavorPython:
		return "Open files in with-blocks, so they close on every path."
	case flavorJVM:
		return "Open streams in try-with-resources, including the streams of Files.lines and Files.list."
	case flavorDotnet:
		return "Dispose every FileStream (using or await using)."
	case flavorRedis, flavorEnvoy, flavorNative:
		return "Close them (close(2), fclose) on every path, error paths included, and open them with O_CLOEXEC so child processes do not inherit them."
	}
	return "Close them on every path, error paths included."
}

func (a Advisor) pipeLeak() string {
	switch a.f {
	case flavorGo:
		return "Call Wait after Start on every exec.Cmd (it closes the pipes), and close the writer from StdinPipe."
	case flavorTokio, flavorActix, flavorAsyncStd, flavorRust:
		return "Wait for every std::process::Child (wait or wait_with_output) and drop its stdin, stdout and stderr handles."
	case flavorNode:
		return "For each child_process, consume or destroy its stdio streams and wait for 'exit'."
	case flavorPython:
		return "Run subprocesses with subprocess.run, or as with subprocess.Popen(...) blocks, or call communicate() on them."
	case flavorJVM:
		return "For each Process, close its input, output and error streams and call waitFor()."
	case flavorDotnet:
		return "Dispose each Process and read its redirected streams to the end."
	case flavorNginx, flavorRedis, flavorEnvoy, flavorNative:
		return "Close both ends after fork and exec, create pipes with pipe2(O_CLOEXEC), and waitpid every child."
	}
	return "Close both ends of every pipe, and wait for every child process."
}

func (a Advisor) eventLeak() string {
	switch a.f {
	case flavorGo:
		return "The Go runtime owns a single epoll; look at cgo libraries, or at code that creates them through the syscall packages."
	case flavorTokio, flavorActix:
		return "Build the Tokio Runtime once and share it: a Runtime built per request (reqwest::blocking::Client starts one too) owns its own epoll and eventfd."
	case flavorAsyncStd, flavorRust:
		return "Create event loops and runtimes once and share them, instead of one per request or connection."
	case flavorNode:
		return "Terminate worker_threads you no longer need (each runs its own event loop), and clear timers and intervals."
	case flavorPython:
		if a.has(workload.FwAsyncio) {
			return "Use one event loop (asyncio.run at startup), not asyncio.new_event_loop() per call without loop.close()."
		}
		return "Close every selector and epoll object the code creates (selectors.DefaultSelector, select.epoll: with-blocks or close()), and create event loops once rather than per call."
	case flavorJVM:
		return "Close Selectors and channels, and shut down executors and event-loop groups created per request (Netty's EventLoopGroup.shutdownGracefully())."
	case flavorDotnet:
		return "Reuse timers and sockets instead of creating them per request, and dispose them (using)."
	}
	return "Create event loops and timers once and share them, and close those created per request or connection."
}

func (a Advisor) watchLeak() string {
	switch a.f {
	case flavorGo:
		return "Close every fsnotify Watcher (Watcher.Close)."
	case flavorTokio, flavorActix, flavorAsyncStd, flavorRust:
		return "Drop every notify watcher when its owner is done, and create them once rather than per request."
	case flavorNode:
		return "Call close() on every fs.watch watcher."
	case flavorPython:
		return "Stop and join every watchdog Observer."
	case flavorJVM:
		return "Close every WatchService."
	case flavorDotnet:
		return "Dispose every FileSystemWatcher."
	}
	return "Close every file watcher when its owner is done, and create them once rather than per request."
}

// CloseWait is the remedy for sockets the peer closed piling up because
// the app never closes its side.
func (a Advisor) CloseWait() string {
	const timeouts = " Set read timeouts so a half-closed connection is noticed."
	switch a.f {
	case flavorGo:
		return "Close the net.Conn when Read returns io.EOF, and on every error path; in HTTP clients, read and close every response body (defer resp.Body.Close()) so the Transport can reuse or close the connection. Set read deadlines so a half-closed connection is noticed."
	case flavorTokio:
		return "A TcpStream closes when it is dropped: end the task (and drop the stream) when read returns Ok(0), and on every error path; with an HTTP client, read or drop every response body. Wrap reads in tokio::time::timeout so a half-closed connection is noticed."
	case flavorActix, flavorAsyncStd, flavorRust:
		return "A TcpStream closes when it is dropped: drop it when read returns Ok(0), and on every error path; with an HTTP client, read or drop every response body." + timeouts
	case flavorNginx:
		return "nginx closes a client connection as soon as its event loop sees the EOF: sockets piling up in CLOSE_WAIT mean workers that do not get back to the loop (a blocking module or Lua code) or a third-party module that leaks connections; check that the workers are not blocked, and update or remove the module."
	case flavorRedis:
		return "redis closes a client at EOF when its event loop runs: CLOSE_WAIT piling up means the loop is held (a slow command, a big key deletion, a fork) or clients are paused (CLIENT PAUSE); check SLOWLOG GET and LATENCY DOCTOR."
	case flavorEnvoy, flavorNative:
		return "close(2) the socket when read or recv returns 0 (EOF), and on every error path; with an event loop, close on the EOF or EPOLLRDHUP event." + timeouts
	case flavorNode:
		return "Sockets the peer closed stay open: end them on 'end' (socket.end(), or keep allowHalfOpen false, the default), destroy them on 'error' and 'timeout' (socket.setTimeout), and consume every HTTP response (res.resume())."
	case flavorPython:
		if a.has(workload.FwAsyncio) {
			return "When reader.read() returns b'' (EOF), call writer.close() and await writer.wait_closed(), also on every error path; close HTTP responses (async with blocks)." + timeouts
		}
		return "Close the socket when recv() returns b'' (EOF), and on every error path (with-blocks or try/finally); close HTTP responses (with-blocks, response.close())." + timeouts
	case flavorJVM:
		return "Close the Socket or channel when read returns -1, and in finally blocks (try-with-resources); with HTTP clients, close every response so the pool can reuse or close the connection." + timeouts
	case flavorDotnet:
		return "Dispose the Socket or NetworkStream when a receive returns 0 bytes, and on every error path (using); dispose every HttpResponseMessage." + timeouts
	}
	return "Close the connection when a read returns end-of-file (0 bytes), and on every error path; in HTTP clients, always read or close response bodies." + timeouts
}

// ConnectionReuse is the remedy for TIME_WAIT sockets toward remote
// exhausting the ephemeral ports: the client does not reuse connections.
func (a Advisor) ConnectionReuse(remote string) string {
	const stopgap = " As stopgaps, widen net.ipv4.ip_local_port_range and set net.ipv4.tcp_tw_reuse=1."
	var s string
	switch a.f {
	case flavorGo:
		s = fmt.Sprintf("Reuse connections to %s: share one http.Client for the whole program instead of one per request, read and close every response body, and raise Transport.MaxIdleConnsPerHost above the concurrency to that host (the default, 2, closes the extra connections after each request); for a database, one *sql.DB with SetMaxIdleConns.", remote)
	case flavorTokio, flavorActix, flavorAsyncStd, flavorRust:
		s = fmt.Sprintf("Reuse connections to %s: build one reqwest::Client (or hyper-util Client) at startup and clone it, since it is a pool, instead of one per request; read each response body to the end, and raise pool_max_idle_per_host if connections still close. For a database, one pool (sqlx::Pool, deadpool, bb8).", remote)
	case flavorNginx:
		s = fmt.Sprintf("Reuse upstream connections to %s: add keepalive N; to the upstream block, with proxy_http_version 1.1; and proxy_set_header Connection \"\"; in the location, so nginx stops opening a connection per request.", remote)
	case flavorRedis:
		s = fmt.Sprintf("redis opens outbound connections only to its master, replicas and cluster peers: TIME_WAIT piling up toward %s means those links are torn down and retried; check the replication link (INFO replication, repl-timeout, client-output-buffer-limit replica) and the cluster bus.", remote)
	case flavorEnvoy:
		s = fmt.Sprintf("Reuse upstream connections to %s: use HTTP/2 to that cluster, or keep HTTP/1.1 connections alive (no low max_requests_per_connection), and raise the cluster's circuit-breaker max_connections above the concurrency.", remote)
	case flavorNative:
		s = fmt.Sprintf("Reuse connections to %s: keep connections open and pool them (HTTP keep-alive; with libcurl, reuse one easy handle or a share handle) instead of connecting per request.", remote)
	case flavorNode:
		s = fmt.Sprintf("Reuse connections to %s: pass one http.Agent({ keepAlive: true, maxSockets }) to every request (fetch, through undici, pools per origin already), and consume every response (res.resume()) so the socket returns to the pool.", remote)
	case flavorPython:
		s = fmt.Sprintf("Reuse connections to %s: one requests.Session (or httpx.Client, aiohttp.ClientSession) for the whole process instead of requests.get per call, read or close every response, and size the pool (HTTPAdapter(pool_maxsize=...), aiohttp's TCPConnector(limit=...)) to the concurrency.", remote)
	case flavorJVM:
		s = fmt.Sprintf("Reuse connections to %s: one HTTP client for the application (java.net.http's client, OkHttpClient, or Apache's PoolingHttpClientConnectionManager with setDefaultMaxPerRoute above the concurrency), close every response, and use a JDBC pool (HikariCP) for a database.", remote)
	case flavorDotnet:
		s = fmt.Sprintf("Reuse connections to %s: use IHttpClientFactory or one shared client over a SocketsHttpHandler (set PooledConnectionLifetime to follow DNS changes) instead of a new client per request, and dispose every response.", remote)
	default:
		s = fmt.Sprintf("Reuse connections to %s: HTTP keep-alive and one shared client or connection pool for the process, instead of a new connection per request.", remote)
	}
	return s + stopgap
}

// PoolCeiling is the remedy for connections to remote stuck flat at a
// pool's maximum (ceiling) while requests queue.
func (a Advisor) PoolCeiling(ceiling int, remote string) string {
	const hold = " Shorten how long each request holds a connection (no slow work inside a transaction)."
	switch a.f {
	case flavorGo:
		return fmt.Sprintf("Raise the pool's maximum above %d if %s can take more: database/sql's SetMaxOpenConns (pgxpool's MaxConns), or Transport.MaxConnsPerHost for HTTP; give callers a context deadline so they fail fast instead of queueing.", ceiling, remote) + hold
	case flavorTokio, flavorActix, flavorAsyncStd, flavorRust:
		return fmt.Sprintf("Raise the pool's maximum above %d if %s can take more: sqlx's PoolOptions::max_connections, or max_size in deadpool and bb8; set an acquire timeout (PoolOptions::acquire_timeout, bb8's connection_timeout) so requests fail fast instead of queueing.", ceiling, remote) + hold
	case flavorNginx:
		return fmt.Sprintf("Raise max_conns= on the upstream's server lines above %d if %s can take more, or remove it; keep upstream keepalive below it.", ceiling, remote)
	case flavorNode:
		return fmt.Sprintf("Raise the pool's maximum above %d if %s can take more: pg's Pool({ max }), mysql2's connectionLimit, or the http.Agent's maxSockets; set connectionTimeoutMillis so requests fail fast instead of queueing.", ceiling, remote) + hold
	case flavorPython:
		return fmt.Sprintf("Raise the pool's maximum above %d if %s can take more: SQLAlchemy's create_engine(pool_size=..., max_overflow=...), or HTTPAdapter(pool_maxsize=...) for requests; set pool_timeout so requests fail fast instead of queueing.", ceiling, remote) + hold
	case flavorJVM:
		return fmt.Sprintf("Raise the pool's maximum above %d if %s can take more: HikariCP's maximumPoolSize, or the HTTP client's per-route maximum; set connectionTimeout so requests fail fast instead of queueing.", ceiling, remote) + hold
	case flavorDotnet:
		return fmt.Sprintf("Raise the pool's maximum above %d if %s can take more: Max Pool Size in the connection string (100 by default), or SocketsHttpHandler.MaxConnectionsPerServer for HTTP; set a command or request timeout so requests fail fast instead of queueing.", ceiling, remote) + hold
	}
	return fmt.Sprintf("Raise the connection pool's maximum above %d if %s can take more (the server's own connection limit permitting), and set an acquire timeout so requests fail fast instead of queueing.", ceiling, remote) + hold
}

// AllocatorRetention is the remedy for resident memory far above a flat
// live heap: the allocator keeps freed memory; it is not a leak.
func (a Advisor) AllocatorRetention() string {
	const stream = " Cap buffer sizes and stream large bodies instead of buffering them."
	switch a.f {
	case flavorGo:
		return "Go keeps freed heap memory until its scavenger returns it: set GOMEMLIMIT a little below the container's limit so the runtime returns memory under pressure, call debug.FreeOSMemory after one-off spikes, and check that GODEBUG=madvdontneed=0 is not set (released pages then stay resident until the kernel needs them)." + stream
	case flavorRedis:
		return "redis's memory is fragmented: turn on activedefrag yes (jemalloc builds), run MEMORY PURGE after big deletions, and watch mem_fragmentation_ratio in INFO memory; MEMORY DOCTOR explains the gap."
	case flavorNode:
		return "The JavaScript heap is not what grows, so --max-old-space-size (which only bounds that heap) will not return this memory: look at process.memoryUsage().external and arrayBuffers (Buffers held by streams or caches). glibc keeps freed native memory in per-thread arenas: MALLOC_ARENA_MAX=2, or preloading jemalloc, returns more of it." + stream
	case flavorPython:
		recycle := ""
		if a.has(workload.FwGunicorn) {
			recycle = " and recycle workers (gunicorn --max-requests with --max-requests-jitter)"
		}
		return "CPython's allocator (pymalloc) frees an arena only when every object in it is gone, and glibc keeps freed memory in per-thread arenas: set MALLOC_ARENA_MAX=2, avoid building huge temporary lists and dicts (stream instead)" + recycle + "."
	case flavorJVM:
		return "The JVM keeps committed heap and native memory: cap the heap to the container (-XX:MaxRAMPercentage), let G1 return idle heap (-XX:G1PeriodicGCInterval=30000, JDK 12+), set MALLOC_ARENA_MAX=2 for native allocations, and use -XX:NativeMemoryTracking=summary with jcmd PID VM.native_memory to see which part grows."
	case flavorDotnet:
		return "The .NET GC keeps memory it may reuse, Server GC most of all: set DOTNET_GCConserveMemory (1 to 9) or a heap limit (DOTNET_GCHeapHardLimitPercent), or use Workstation GC (DOTNET_gcServer=0) in small containers; dotnet-counters shows the GC heap size against the working set."
	case flavorTokio, flavorActix, flavorAsyncStd, flavorRust:
		switch a.rt.Allocator {
		case workload.AllocJemalloc:
			return "jemalloc keeps freed pages until they decay: turn on background purging with short decay times (_RJEM_MALLOC_CONF for tikv-jemallocator, MALLOC_CONF otherwise: background_thread:true,dirty_decay_ms:1000,muzzy_decay_ms:1000)." + stream
		case workload.AllocMimalloc:
			return "mimalloc keeps freed pages for MIMALLOC_PURGE_DELAY milliseconds: lower it (0 purges at once)." + stream
		}
		return "glibc malloc keeps freed memory in per-thread arenas: cap them with MALLOC_ARENA_MAX=2, or switch the global allocator to jemalloc (tikv-jemallocator, with _RJEM_MALLOC_CONF=background_thread:true,dirty_decay_ms:1000) or mimalloc." + stream
	case flavorNginx, flavorEnvoy, flavorNative:
		return nativeRetention(a.rt.Allocator) + stream
	}
	return "The allocator keeps freed memory instead of returning it to the kernel: configure it to release memory (fewer arenas, background purging, shorter decay times)." + stream
}

func nativeRetention(alloc string) string {
	switch alloc {
	case workload.AllocJemalloc:
		return "jemalloc keeps freed pages until they decay: turn on background purging with short decay times (MALLOC_CONF=background_thread:true,dirty_decay_ms:1000,muzzy_decay_ms:1000)."
	case workload.AllocTcmalloc:
		return "tcmalloc keeps freed pages in its page heap: raise TCMALLOC_RELEASE_RATE, or call MallocExtension::ReleaseFreeMemory() after big frees."
	case workload.AllocMimalloc:
		return "mimalloc keeps freed pages for MIMALLOC_PURGE_DELAY milliseconds: lower it (0 purges at once)."
	case workload.AllocMusl:
		return "musl's malloc returns little memory to the kernel: link a purging allocator (jemalloc with MALLOC_CONF=background_thread:true, or mimalloc)."
	}
	return "glibc malloc keeps freed memory in its arenas: cap them with MALLOC_ARENA_MAX=2, call malloc_trim(0) after big frees (or lower M_TRIM_THRESHOLD), or preload jemalloc with background purging (LD_PRELOAD=libjemalloc.so.2, MALLOC_CONF=background_thread:true,dirty_decay_ms:1000)."
}

// HeapGrowth is the remedy for a live heap that grows steadily: what keeps
// objects reachable, in this runtime's terms.
func (a Advisor) HeapGrowth() string {
	const lead = "Find why the named allocation sites keep their objects reachable: "
	switch a.f {
	case flavorGo:
		return lead + "maps and caches without a bound or eviction, slices kept alive by a small sub-slice, goroutines that never exit (the goroutine profile counts them), and channels nobody drains."
	case flavorTokio, flavorActix, flavorAsyncStd, flavorRust:
		return lead + "caches and maps without a bound or eviction, Arc or Rc cycles (use Weak for back references), tasks that never finish and the futures they hold, and unbounded channels whose receivers fell behind."
	case flavorRedis:
		return "Keys keep accumulating: set TTLs on cache keys, set maxmemory with an evicting maxmemory-policy, and find the key patterns that grow (redis-cli --bigkeys, --memkeys)."
	case flavorNode:
		return lead + "global caches and Maps without a bound, closures kept alive by event listeners that are never removed (MaxListenersExceededWarning), timers never cleared, and promises that never settle; compare two heap snapshots (node --heapsnapshot-signal=SIGUSR2)."
	case flavorPython:
		return lead + "module-level caches and dicts, functools.lru_cache without maxsize (on a method it also keeps self alive), and objects reachable from globals; compare two tracemalloc snapshots."
	case flavorJVM:
		return lead + "static collections and caches without eviction (a bounded cache such as Caffeine's maximumSize), ThreadLocals on pooled threads, and listeners never unregistered; compare class histograms (jmap -histo:live PID) or analyse a heap dump (jcmd PID GC.heap_dump)."
	case flavorDotnet:
		return lead + "static collections and caches without a limit (MemoryCache's SizeLimit), event handlers never unsubscribed, and objects captured by long-lived closures; compare two dotnet-gcdump snapshots."
	}
	return lead + "caches and containers without a bound or eviction, objects allocated per request or connection and not freed on some path, and per-connection state kept after the connection ends."
}

// HeapProfile is the remedy when culprit has no heap profile to read: how
// this runtime can expose one (pprof.heap_url takes the pprof format).
func (a Advisor) HeapProfile() string {
	const set = " and set pprof.heap_url so culprit can name the allocation sites."
	switch a.f {
	case flavorGo:
		return "Expose a heap profile with net/http/pprof (import _ \"net/http/pprof\" and serve /debug/pprof/heap on a local port)" + set
	case flavorTokio, flavorActix, flavorAsyncStd, flavorRust:
		return "Expose a heap profile in pprof format on a local HTTP endpoint (jemalloc's profiling through tikv-jemallocator and jemalloc_pprof, or pprof-rs)" + set
	case flavorRedis:
		return "redis's growth is its dataset: MEMORY STATS and redis-cli --memkeys show which keys hold the memory."
	case flavorNode:
		return "Expose a heap profile in pprof format (the pprof package from npm has a heap profiler) on a local HTTP endpoint" + set
	case flavorPython:
		return "culprit reads heap profiles in pprof format, which CPython does not produce: compare tracemalloc snapshots in the process (or run it under memray) to name the allocation sites."
	case flavorJVM:
		return "culprit reads heap profiles in pprof format: for the JVM, compare class histograms (jcmd PID GC.class_histogram) or a heap dump (jcmd PID GC.heap_dump) to name what grows."
	case flavorDotnet:
		return "culprit reads heap profiles in pprof format: for .NET, compare two dotnet-gcdump snapshots (dotnet-gcdump collect -p PID) to name what grows."
	case flavorNginx, flavorEnvoy, flavorNative:
		return "Run with a heap profiler that names allocation sites (jemalloc's prof:true with jeprof, or heaptrack), or expose a pprof-format heap profile" + set
	}
	return "Expose a heap profile in pprof format on a local HTTP endpoint" + set
}

// GracefulShutdown is the remedy for connections that outlive SIGTERM and
// will be cut by SIGKILL.
func (a Advisor) GracefulShutdown() string {
	const k8s = " Bound the whole wait below terminationGracePeriodSeconds, then close what remains; a preStop sleep lets the endpoint leave the load balancer first."
	var s string
	switch a.f {
	case flavorGo:
		s = "On SIGTERM (signal.NotifyContext), call http.Server.Shutdown with a deadline: it stops accepting and closes idle connections but not hijacked ones (close WebSockets yourself with 1001 Going Away); for gRPC call grpc.Server.GracefulStop, which sends GOAWAY and waits for streams, then Stop at the deadline."
	case flavorTokio:
		var how []string
		if a.has(workload.FwAxum) {
			how = append(how, "axum::serve(...).with_graceful_shutdown(signal)")
		}
		if a.has(workload.FwTonic) {
			how = append(how, "tonic's Server::serve_with_shutdown")
		}
		if a.has(workload.FwHyper) {
			// hyper 1 moved the server, and its graceful shutdown, to
			// hyper-util.
			switch v := a.version(workload.FwHyper); {
			case strings.HasPrefix(v, "0."):
				how = append(how, "hyper's Server::with_graceful_shutdown(signal)")
			case v != "":
				how = append(how, "hyper-util's GracefulShutdown (watch each connection, then shutdown().await)")
			default:
				how = append(how, "hyper-util's GracefulShutdown (hyper 0.14: Server::with_graceful_shutdown)")
			}
		}
		how = append(how, "a tokio_util CancellationToken that stops the accept loop while a JoinSet waits for the connection tasks")
		s = "On SIGTERM (tokio::signal::unix), stop accepting and let in-flight connections finish: " + strings.Join(how, ", or ") + "; bound the wait with tokio::time::timeout and close long-lived streams (WebSockets with 1001 Going Away)."
	case flavorActix:
		s = "actix-web handles SIGTERM itself: it stops accepting and waits HttpServer::shutdown_timeout (30 s by default) for workers to finish; set it below the grace period, and end WebSockets and streaming responses yourself, since they keep workers busy until the timeout."
	case flavorAsyncStd:
		s = "On SIGTERM, stop the accept loop and wait for the connection tasks, bounded by async_std::future::timeout; close long-lived streams (WebSockets with 1001 Going Away)."
	case flavorRust:
		s = "On SIGTERM (signal-hook), stop accepting, let the worker threads finish their connections within a deadline, then exit; close long-lived streams (WebSockets with 1001 Going Away)."
	case flavorNginx:
		s = "nginx treats SIGTERM as a fast shutdown that cuts connections; the graceful one is SIGQUIT (nginx -s quit): make the container stop with SIGQUIT (STOPSIGNAL SIGQUIT, as the official image does) or run nginx -s quit in a preStop hook, and set worker_shutdown_timeout for long-lived connections."
	case flavorRedis:
		s = "redis drops its clients on SIGTERM, but first waits up to shutdown-timeout (10 s) for lagging replicas and saves an RDB snapshot if save points are set, and either can outlast the grace period: lower shutdown-timeout, set shutdown-on-sigterm (nosave when the data is persisted elsewhere), and fail over first (Sentinel or Cluster) so clients reconnect elsewhere."
	case flavorEnvoy:
		s = "Drain Envoy before it stops: POST /drain_listeners?graceful to its admin port in a preStop hook (the drain lasts --drain-time-s), so SIGTERM arrives once connections have moved."
	case flavorNative:
		s = "On SIGTERM, stop accepting (close the listening socket), let open connections finish within a deadline, then close what remains; close long-lived streams (WebSockets with 1001 Going Away)."
	case flavorNode:
		s = "On SIGTERM (process.on('SIGTERM')), call server.close() to stop accepting, server.closeIdleConnections() for idle keep-alive sockets (Node.js 18.2+), and server.closeAllConnections() at the deadline; close WebSockets with 1001 Going Away and HTTP/2 sessions with session.close()."
	case flavorPython:
		switch {
		case a.has(workload.FwGunicorn):
			s = "gunicorn stops its workers gracefully on SIGTERM and kills them after --graceful-timeout (30 s by default): set it below the grace period and make long requests and streams end within it."
		case a.has(workload.FwUvicorn):
			s = "uvicorn stops gracefully on SIGTERM: set --timeout-graceful-shutdown below the grace period, and end long-lived streams (WebSockets with 1001 Going Away) in the app's shutdown handler."
		case a.has(workload.FwAsyncio):
			s = "On SIGTERM (loop.add_signal_handler), call server.close(), await server.wait_closed() under asyncio.wait_for, and cancel the tasks left."
		default:
			s = "Install a SIGTERM handler (signal.signal) that stops accepting and lets in-flight requests finish within a deadline."
		}
	case flavorJVM:
		s = "Shut down gracefully on SIGTERM from a shutdown hook: Spring Boot's server.shutdown=graceful with spring.lifecycle.timeout-per-shutdown-phase, Netty's EventLoopGroup.shutdownGracefully(quietPeriod, timeout, unit), gRPC's server.shutdown() then awaitTermination() and shutdownNow() at the deadline."
	case flavorDotnet:
		s = "ASP.NET Core stops Kestrel gracefully on SIGTERM and waits HostOptions.ShutdownTimeout (30 s since .NET 8, 5 s before) for requests: set it below the grace period, and end long-lived streams (SignalR, WebSockets) on IHostApplicationLifetime.ApplicationStopping."
	default:
		s = "On SIGTERM, stop accepting, tell long-lived clients to leave (HTTP/2 GOAWAY, WebSocket close 1001, Connection: close on keep-alive responses), and let in-flight requests finish within a deadline."
	}
	return s + k8s
}

// WorkerImbalance is the remedy for one worker of a pool doing the work
// while its peers idle. It reports false for runtimes that run the app's
// code on a single thread (Node.js, CPython, redis): there is no pool to
// balance, and the rule should say nothing rather than something wrong.
func (a Advisor) WorkerImbalance() (string, bool) {
	switch a.f {
	case flavorNode, flavorPython, flavorRedis:
		return "", false
	case flavorGo:
		return "One thread does the work while its peers idle: in Go that means goroutines pinned to their thread (runtime.LockOSThread) or a single goroutine consuming all the work (one reader of a channel, an accept loop that serves inline); fan the work out to several goroutines.", true
	case flavorTokio:
		return "One Tokio worker does the work while its peers idle: tasks spawned with tokio::task::spawn_local or on a current_thread runtime stay on one thread, one connection or HTTP/2 stream carries the load, or one task holds a lock the others wait for; spawn with tokio::spawn on the multi-threaded runtime (work stealing), and split a busy connection's work into tasks.", true
	case flavorActix:
		return "One actix-web worker does the work while its peers idle: a worker keeps the connections it was given for their whole life (there is no work stealing), so a few long-lived keep-alive or HTTP/2 clients land on one worker; bound keep-alive (HttpServer::keep_alive), move heavy work to web::block, or have clients open more connections.", true
	case flavorAsyncStd:
		return "One async-std thread does the work while its peers idle: tasks spawned with spawn_local stay on one thread, one connection carries the load, or one task holds a lock the others wait for; spawn with async_std::task::spawn and split a busy connection's work into tasks.", true
	case flavorRust:
		return "One thread of the pool does the work while its peers idle: check how work is handed out (a single consumer of a channel, a lock held by one thread) and share it through a common queue or a rayon pool.", true
	case flavorNginx:
		return "One nginx worker takes most connections: without reuseport, the worker that wakes first accepts in bursts; add reuseport to the listen directive so the kernel spreads connections across workers (or turn accept_mutex on). Long-lived connections (WebSockets, HTTP/2) also pin load to one worker.", true
	case flavorEnvoy:
		return "One Envoy worker takes most connections: connections are balanced only when accepted, so a few long-lived downstream connections pin the load; set connection_balance_config with exact_balance on the listener.", true
	case flavorJVM:
		return "One thread of the pool does the work while its peers idle: a Netty channel stays on one EventLoop for life, so a few busy connections pin one thread (hand heavy work to a separate executor); otherwise look for a single-threaded executor or a lock held by one thread.", true
	case flavorDotnet:
		return "One thread does the work while its peers idle: look for a single consumer loop (one Channel reader, one dedicated thread) or a lock held by one thread, and spread the work over several consumers or Parallel.ForEachAsync.", true
	}
	return "One thread of the pool does the work while its peers idle: find what ties the work to it (connections accepted by one thread, one long-lived connection, a single consumer, a lock held by one thread) and spread the work across the pool.", true
}

// WorkerCount is the advice for a CPU quota of cores: size the runtime's
// worker pool to it, since a pool sized from the host's cores
// oversubscribes the quota and is throttled.
func (a Advisor) WorkerCount(cores int) string {
	switch a.f {
	case flavorGo:
		v := a.rt.Version
		switch {
		case v == "":
			return fmt.Sprintf("Go before 1.25 sizes GOMAXPROCS from the host's cores, not the quota: for a binary built with it, set GOMAXPROCS=%d (Go 1.25 and later read the quota).", cores)
		case goAtLeast(v, 1, 25):
			return fmt.Sprintf("Go %s sizes GOMAXPROCS from the CPU quota by itself (%d): unset any GOMAXPROCS that says more.", majorMinorOf(v), cores)
		}
		return fmt.Sprintf("Go %s sizes GOMAXPROCS from the host's cores, not the quota: set GOMAXPROCS=%d, or rebuild with Go 1.25 or later, which reads the quota.", majorMinorOf(v), cores)
	case flavorTokio:
		return fmt.Sprintf("Size Tokio's workers to the quota: TOKIO_WORKER_THREADS=%d or Builder::worker_threads(%d).", cores, cores)
	case flavorActix:
		return fmt.Sprintf("Size actix-web's workers to the quota: HttpServer::workers(%d).", cores)
	case flavorAsyncStd:
		return fmt.Sprintf("Size async-std's threads to the quota: ASYNC_STD_THREAD_COUNT=%d.", cores)
	case flavorRust:
		return fmt.Sprintf("Size the thread pools to the quota, %d threads (rayon: RAYON_NUM_THREADS=%d).", cores, cores)
	case flavorNginx:
		return fmt.Sprintf("worker_processes auto counts the host's cores, not the quota: set worker_processes %d.", cores)
	case flavorRedis:
		return "redis runs commands on one thread: give it at least one whole core, and no more io-threads than the quota allows."
	case flavorEnvoy:
		return fmt.Sprintf("Start Envoy with --concurrency %d, so it runs no more workers than the quota.", cores)
	case flavorNode:
		return "Node.js runs JavaScript on one thread: give it at least one whole core, and size worker_threads pools and UV_THREADPOOL_SIZE to what the quota allows."
	case flavorPython:
		if a.has(workload.FwGunicorn) {
			return fmt.Sprintf("gunicorn's usual (2 x cores) + 1 counts the host: set --workers from the quota (%d cores).", cores)
		}
		return fmt.Sprintf("The GIL runs Python code on one core per process: run about %d worker processes, not more.", cores)
	case flavorJVM:
		return fmt.Sprintf("The JVM sizes GC and ForkJoinPool threads from the CPUs it sees: set -XX:ActiveProcessorCount=%d, and size executors and event-loop groups to it.", cores)
	case flavorDotnet:
		return fmt.Sprintf("Size the .NET runtime to the quota: DOTNET_PROCESSOR_COUNT=%d.", cores)
	}
	return fmt.Sprintf("Size the worker pools to the quota, %d threads: pools sized from the host's cores oversubscribe it.", cores)
}

// goAtLeast reports whether a Go version ("1.26.8", "1.25rc1") is at least
// major.minor.
func goAtLeast(v string, major, minor int) bool {
	var ma, mi int
	if n, _ := fmt.Sscanf(v, "%d.%d", &ma, &mi); n < 2 {
		return false
	}
	return ma > major || ma == major && mi >= minor
}

func majorMinorOf(v string) string {
	f := strings.SplitN(v, ".", 3)
	if len(f) >= 2 {
		return f[0] + "." + f[1]
	}
	return v
}

// WaitingThreads is the remedy when connections queue while the process
// uses little CPU: its threads wait on something, and this says how to see
// on what, in this runtime.
func (a Advisor) WaitingThreads() string {
	const fix = ": size the pool to the concurrency you need, shorten what is done under the lock, or call the dependency asynchronously; more CPU or more replicas sharing the same bottleneck will not raise throughput."
	var dump string
	switch a.f {
	case flavorGo:
		dump = "a goroutine dump: curl /debug/pprof/goroutine?debug=2, served by net/http/pprof"
	case flavorTokio, flavorActix:
		dump = "tokio-console for the tasks, gdb -p PID -batch -ex 'thread apply all bt' for the threads"
	case flavorAsyncStd, flavorRust, flavorNginx, flavorRedis, flavorEnvoy, flavorNative:
		dump = "gdb -p PID -batch -ex 'thread apply all bt', or eu-stack -p PID"
	case flavorNode:
		dump = "a diagnostic report: node --report-on-signal, then kill -USR2 PID"
	case flavorPython:
		dump = "py-spy dump --pid PID"
	case flavorJVM:
		dump = "jstack PID, or jcmd PID Thread.print"
	case flavorDotnet:
		dump = "dotnet-stack report -p PID"
	default:
		dump = "a thread dump of the process"
	}
	return "Find what the threads wait on (culprit snapshot; " + dump + ")" + fix
}
