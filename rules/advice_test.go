package rules

import (
	"fmt"
	"os"
	"sort"
	"strconv"
	"strings"
	"testing"

	"github.com/culprit-dev/culprit/workload"
)

// adviceVocab is each runtime's own vocabulary: API names, tools and
// settings that make sense only there. Matching is case-sensitive and at
// the start of a word (see vocabIn), so that Tokio's
// Builder::worker_threads is not Node's worker_threads, nor Python's
// aiohttp.ClientSession Go's http.Client. A
// runtime's advice may use only the groups its case allows; everything
// else is another runtime's advice leaking in.
var adviceVocab = map[string][]string{
	"go": {"goroutine", "GOMEMLIMIT", "GOMAXPROCS", "GODEBUG", "http.Client", "http.Server", "Transport.", "net.Listen",
		"debug.FreeOSMemory", "net/http/pprof", "LockOSThread", "cgo", "database/sql", "grpc.Server", "io.EOF", "resp.Body",
		"exec.Cmd", "fsnotify", "signal.NotifyContext", "pgxpool", "net.Conn", "*sql.DB", "Go 1.", "Go's", "in Go", "In Go"},
	"rust": {"reqwest", "hyper", "socket2", "rayon", "std::thread", "std::net", "std::process", "sqlx", "deadpool", "bb8",
		"tikv-jemallocator", "_RJEM_MALLOC_CONF", "signal-hook", "RAYON_NUM_THREADS", "TcpStream", "Ok(0)", "jemalloc_pprof",
		"pprof-rs", "into_raw_fd", "mem::forget", "Weak", "Arc or Rc", "notify watcher"},
	"rustasync": {"spawn_blocking", ".await", "yield_now", "spawn_local", "block_on"},
	"tokio":     {"tokio", "Tokio", "TcpSocket", "TOKIO_WORKER_THREADS", "block_in_place", "current_thread", "JoinSet", "CancellationToken"},
	"actix":     {"actix", "web::block", "HttpServer::"},
	"asyncstd":  {"async_std", "async-std", "ASYNC_STD_THREAD_COUNT"},
	"axum":      {"axum"},
	"tonic":     {"tonic"},
	"node": {"Node.js", "JavaScript", "libuv", "worker_threads", "server.listen", "http.Agent", "keepAlive", "res.resume",
		"--max-old-space-size", "setImmediate", "closeIdleConnections", "closeAllConnections", "UV_THREADPOOL_SIZE", "perf_hooks",
		"fs.promises", "process.memoryUsage", "piscina", "undici", "child_process", "MaxListenersExceededWarning", "heapsnapshot",
		"process.on", "allowHalfOpen", "npm", "fs.watch", "--cpu-prof", "--report-on-signal"},
	"python": {"Python", "CPython", "GIL", "requests.Session", "httpx", "aiohttp", "tracemalloc", "py-spy", "lru_cache",
		"ThreadPoolExecutor", "ProcessPoolExecutor", "SQLAlchemy", "subprocess", "pymalloc", "memray", "b''", "signal.signal",
		"with-block", "socketserver", "http.server", "HTTPAdapter", "watchdog", "sock.listen"},
	"asyncio":  {"asyncio", "run_in_executor", "to_thread", "PYTHONASYNCIODEBUG", "uvloop", "wait_closed", "add_signal_handler"},
	"gunicorn": {"gunicorn", "--graceful-timeout", "--max-requests"},
	"uvicorn":  {"uvicorn", "--timeout-graceful-shutdown"},
	"gevent":   {"gevent", "monkey", "greenlet"},
	"jvm": {"JVM", "jstack", "jcmd", "jmap", "HikariCP", "ServerSocket", "Tomcat", "Jetty", "acceptCount", "-XX:", "G1", "OkHttp",
		"Apache", "try-with-resources", "Spring", "ForkJoinPool", "Vert.x", "Reactor", "WebFlux", "Caffeine", "JDBC", "Netty",
		"EventLoopGroup", "SO_BACKLOG", "ChannelOption", "EventExecutorGroup", "JFR", "async-profiler", "WatchService", "waitFor", "ThreadLocal"},
	"dotnet": {".NET", "Kestrel", "ASP.NET", "IHttpClientFactory", "Task.Run", ".Result", ".Wait()", "GetAwaiter", "dotnet-", "DOTNET_",
		"SocketsHttpHandler", "HostOptions", "IHostApplicationLifetime", "SemaphoreSlim", "Parallel.ForEachAsync", "TaskCreationOptions",
		"FileSystemWatcher", "Max Pool Size", "HttpResponseMessage", "NetworkStream", "SignalR", "MemoryCache", "TaskScheduler", "UseSockets"},
	"nginx": {"nginx", "worker_processes", "worker_connections", "aio threads", "proxy_http_version", "proxy_set_header", "reuseport",
		"accept_mutex", "open_file_cache", "worker_shutdown_timeout", "OpenResty", "cosocket", "max_conns", "gzip_comp_level",
		"ssl_session_cache", "worker_rlimit_nofile", "keepalive_timeout", "client_body_timeout", "STOPSIGNAL", "keepalive N"},
	"redis": {"redis", "Redis", "tcp-backlog", "SLOWLOG", "UNLINK", "LATENCY DOCTOR", "activedefrag", "MEMORY PURGE", "maxmemory",
		"shutdown-timeout", "shutdown-on-sigterm", "appendfsync", "BGSAVE", "io-threads", "Sentinel", "--bigkeys", "INFO ", "CLIENT ", "redis.conf"},
	"envoy": {"Envoy", "envoy", "tcp_backlog_size", "drain_listeners", "--concurrency", "exact_balance", "--drain-time-s",
		"max_requests_per_connection", "circuit-breaker", "connection_balance_config"},
	"malloc": {"MALLOC_ARENA_MAX", "malloc_trim", "glibc", "M_TRIM_THRESHOLD", "jemalloc", "MALLOC_CONF", "tcmalloc", "TCMALLOC_",
		"mimalloc", "MIMALLOC_", "musl", "LD_PRELOAD", "MallocExtension"},
	"native": {"gdb", "eu-stack", "getaddrinfo", "heaptrack", "jeprof", "libcurl", "pipe2", "O_CLOEXEC", "waitpid", "EPOLLRDHUP", "fclose", "close(2)"},
}

// vocabIn reports whether word occurs in s at the start of a word: not
// right after a letter, digit, '_', ':' or '.', which would make it part
// of another identifier or path.
func vocabIn(s, word string) bool {
	for off := 0; ; {
		i := strings.Index(s[off:], word)
		if i < 0 {
			return false
		}
		at := off + i
		if at == 0 {
			return true
		}
		c := s[at-1]
		if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '_' || c == ':' || c == '.') {
			return true
		}
		off = at + 1
	}
}

func fw(names ...string) []workload.Framework {
	var out []workload.Framework
	for _, n := range names {
		out = append(out, workload.Framework{Name: n})
	}
	return out
}

// adviceCases are the runtimes DetectRuntime reports, each with the
// vocabulary groups its advice may use: all of them, and no others.
var adviceCases = []struct {
	name    string
	rt      workload.Runtime
	allowed []string
}{
	{"zero", workload.Runtime{}, nil},
	{"unknown", workload.Runtime{Lang: workload.LangUnknown}, nil},
	{"go", workload.Runtime{Lang: workload.LangGo, Version: "1.26.8", Allocator: workload.AllocGo}, []string{"go"}},
	{"go-old", workload.Runtime{Lang: workload.LangGo, Version: "1.22.1", Allocator: workload.AllocGo}, []string{"go"}},
	{"rust", workload.Runtime{Lang: workload.LangRust, Allocator: workload.AllocGlibc}, []string{"rust", "malloc", "native"}},
	{"tokio", workload.Runtime{Lang: workload.LangRust, Frameworks: fw(workload.FwHyper, workload.FwTokio, workload.FwReqwest), Allocator: workload.AllocGlibc},
		[]string{"rust", "rustasync", "tokio", "malloc", "native"}},
	{"tokio-jemalloc", workload.Runtime{Lang: workload.LangRust, Frameworks: fw(workload.FwTokio), Allocator: workload.AllocJemalloc},
		[]string{"rust", "rustasync", "tokio", "malloc", "native"}},
	{"axum", workload.Runtime{Lang: workload.LangRust, Frameworks: fw(workload.FwAxum, workload.FwHyper, workload.FwTokio), Allocator: workload.AllocGlibc},
		[]string{"rust", "rustasync", "tokio", "axum", "malloc", "native"}},
	{"tonic", workload.Runtime{Lang: workload.LangRust, Frameworks: fw(workload.FwTonic, workload.FwHyper, workload.FwTokio), Allocator: workload.AllocGlibc},
		[]string{"rust", "rustasync", "tokio", "tonic", "malloc", "native"}},
	{"actix", workload.Runtime{Lang: workload.LangRust, Frameworks: fw(workload.FwActix, workload.FwTokio), Allocator: workload.AllocGlibc},
		[]string{"rust", "rustasync", "tokio", "actix", "malloc", "native"}},
	{"async-std", workload.Runtime{Lang: workload.LangRust, Frameworks: fw(workload.FwAsyncStd), Allocator: workload.AllocGlibc},
		[]string{"rust", "rustasync", "asyncstd", "malloc", "native"}},
	{"c", workload.Runtime{Lang: workload.LangC, Allocator: workload.AllocGlibc}, []string{"malloc", "native"}},
	{"cpp-tcmalloc", workload.Runtime{Lang: workload.LangCPP, Allocator: workload.AllocTcmalloc}, []string{"malloc", "native"}},
	{"nginx", workload.Runtime{Lang: workload.LangC, Frameworks: fw(workload.FwNginx), Allocator: workload.AllocGlibc}, []string{"nginx", "malloc", "native"}},
	{"redis", workload.Runtime{Lang: workload.LangC, Frameworks: fw(workload.FwRedis), Allocator: workload.AllocJemalloc}, []string{"redis", "malloc", "native"}},
	{"envoy", workload.Runtime{Lang: workload.LangCPP, Frameworks: fw(workload.FwEnvoy), Allocator: workload.AllocTcmalloc}, []string{"envoy", "malloc", "native"}},
	{"node", workload.Runtime{Lang: workload.LangNode, Version: "20.20.2", Frameworks: fw(workload.FwLibuv), Allocator: workload.AllocGlibc}, []string{"node", "malloc"}},
	{"python", workload.Runtime{Lang: workload.LangPython, Version: "3.11", Allocator: workload.AllocGlibc}, []string{"python", "malloc"}},
	{"python-asyncio", workload.Runtime{Lang: workload.LangPython, Version: "3.12", Frameworks: fw(workload.FwAsyncio)}, []string{"python", "asyncio", "malloc"}},
	{"gunicorn", workload.Runtime{Lang: workload.LangPython, Version: "3.11", Frameworks: fw(workload.FwGunicorn)}, []string{"python", "gunicorn", "malloc"}},
	{"uvicorn", workload.Runtime{Lang: workload.LangPython, Version: "3.11", Frameworks: fw(workload.FwUvicorn, workload.FwAsyncio)},
		[]string{"python", "asyncio", "uvicorn", "malloc"}},
	{"gunicorn-uvicorn", workload.Runtime{Lang: workload.LangPython, Version: "3.11", Frameworks: fw(workload.FwGunicorn, workload.FwUvicorn, workload.FwAsyncio)},
		[]string{"python", "asyncio", "gunicorn", "malloc"}},
	{"gevent", workload.Runtime{Lang: workload.LangPython, Version: "3.11", Frameworks: fw(workload.FwGunicorn, workload.FwGevent)},
		[]string{"python", "gevent", "gunicorn", "malloc"}},
	{"jvm", workload.Runtime{Lang: workload.LangJVM, Version: "17.0.15"}, []string{"jvm", "malloc"}},
	{"dotnet", workload.Runtime{Lang: workload.LangDotnet, Version: "8.0.11", Frameworks: fw(workload.FwAspNetCore)}, []string{"dotnet"}},
}

const (
	testFn     = "orders.saveSession"
	testCall   = "fdatasync"
	testRemote = "10.1.2.3:5432"
)

// adviceTexts is every topic's text for one advisor, by topic.
func adviceTexts(a Advisor) map[string]string {
	out := map[string]string{
		"BlockingCall":       a.BlockingCall(testFn, testCall),
		"BlockingCallNoCall": a.BlockingCall(testFn, ""),
		"CPUHeavy":           a.CPUHeavy(testFn),
		"LoopStalled":        a.LoopStalled(),
		"Backlog":            a.Backlog(4096, 1024, 1024),
		"BacklogNoSomax":     a.Backlog(2048, 0, 0),
		"BacklogRoom":        a.Backlog(512, 128, 4096),
		"BacklogBelowSomax":  a.Backlog(8192, 8, 4096),
		"CloseWait":          a.CloseWait(),
		"ConnectionReuse":    a.ConnectionReuse(testRemote),
		"PoolCeiling":        a.PoolCeiling(17, testRemote),
		"AllocatorRetention": a.AllocatorRetention(),
		"HeapGrowth":         a.HeapGrowth(),
		"HeapProfile":        a.HeapProfile(),
		"GracefulShutdown":   a.GracefulShutdown(),
		"WorkerCount":        a.WorkerCount(3),
		"WaitingThreads":     a.WaitingThreads(),
	}
	for _, k := range []string{"socket", "file", "pipe", "anon_eventfd", "anon_eventpoll", "anon_timerfd", "anon_inotify", "anon_other", "weird"} {
		out["FDLeak/"+k] = a.FDLeak(k)
	}
	if s, ok := a.WorkerImbalance(); ok {
		out["WorkerImbalance"] = s
	}
	return out
}

func TestAdviceVocabulary(t *testing.T) {
	for _, c := range adviceCases {
		t.Run(c.name, func(t *testing.T) {
			allowed := map[string]bool{}
			for _, g := range c.allowed {
				if _, ok := adviceVocab[g]; !ok {
					t.Fatalf("allowed group %q is not in adviceVocab", g)
				}
				allowed[g] = true
			}
			used := map[string]bool{}
			texts := adviceTexts(NewAdvisor(c.rt))
			topics := make([]string, 0, len(texts))
			for k := range texts {
				topics = append(topics, k)
			}
			sort.Strings(topics)
			for _, topic := range topics {
				s := texts[topic]
				for g, words := range adviceVocab {
					for _, w := range words {
						if !vocabIn(s, w) {
							continue
						}
						if !allowed[g] {
							t.Errorf("%s: %q is %s vocabulary, foreign to %s:\n  %s", topic, w, g, c.name, s)
						}
						used[g] = true
					}
				}
			}
			// Every allowed group is used somewhere: the table is as
			// tight as the advice, and the advice is specific.
			for _, g := range c.allowed {
				if !used[g] {
					t.Errorf("no topic uses %s vocabulary for %s: drop it from the allowed groups or say it", g, c.name)
				}
			}
		})
	}
}

func TestAdviceSentences(t *testing.T) {
	for _, c := range adviceCases {
		a := NewAdvisor(c.rt)
		for topic, s := range adviceTexts(a) {
			switch {
			case strings.TrimSpace(s) != s || s == "":
				t.Errorf("%s/%s: empty or padded: %q", c.name, topic, s)
			case !strings.HasSuffix(s, "."):
				t.Errorf("%s/%s: not a full sentence: %q", c.name, topic, s)
			case strings.Contains(s, "%!") || strings.Contains(s, "  "):
				t.Errorf("%s/%s: formatting error: %q", c.name, topic, s)
			}
		}
		texts := adviceTexts(a)
		for _, topic := range []string{"BlockingCall", "CPUHeavy"} {
			if !strings.Contains(texts[topic], testFn) {
				t.Errorf("%s/%s does not name the function %s: %q", c.name, topic, testFn, texts[topic])
			}
		}
		if !strings.Contains(texts["BlockingCall"], testCall) {
			t.Errorf("%s/BlockingCall does not name the call %s: %q", c.name, testCall, texts["BlockingCall"])
		}
		if strings.Contains(texts["BlockingCallNoCall"], " in .") || strings.Contains(texts["BlockingCallNoCall"], " in ,") {
			t.Errorf("%s/BlockingCall without a call: %q", c.name, texts["BlockingCallNoCall"])
		}
		for _, topic := range []string{"ConnectionReuse", "PoolCeiling"} {
			if c.name == "redis" && topic == "PoolCeiling" {
				continue
			}
			if !strings.Contains(texts[topic], testRemote) {
				t.Errorf("%s/%s does not name the remote: %q", c.name, topic, texts[topic])
			}
		}
		if !strings.Contains(texts["PoolCeiling"], "17") {
			t.Errorf("%s/PoolCeiling does not name the ceiling: %q", c.name, texts["PoolCeiling"])
		}
		if s := texts["Backlog"]; !strings.Contains(s, "4096") || !strings.Contains(s, "1024") || !strings.Contains(s, "somaxconn") {
			t.Errorf("%s/Backlog(4096, somaxconn 1024) names neither the size nor the cap: %q", c.name, s)
		}
		if s := texts["BacklogRoom"]; strings.Contains(s, "raise it to at least") || strings.Contains(s, "raise the sysctl") {
			t.Errorf("%s/Backlog(512, somaxconn 4096) asks to raise somaxconn: %q", c.name, s)
		}
		_, imbalance := a.WorkerImbalance()
		singleThreaded := c.rt.Lang == workload.LangNode || c.rt.Lang == workload.LangPython || c.rt.Has(workload.FwRedis)
		if imbalance == singleThreaded {
			t.Errorf("%s: WorkerImbalance applies = %v; runtimes that run the app on one thread have no pool to balance", c.name, imbalance)
		}
		if !singleThreaded && !strings.Contains(texts["WorkerCount"], "3") {
			t.Errorf("%s/WorkerCount(3) does not say 3: %q", c.name, texts["WorkerCount"])
		}
	}
}

// TestAdviceGoVersion: Go 1.25 reads the CPU quota; older versions do not,
// and the advice must say which applies.
func TestAdviceGoVersion(t *testing.T) {
	for v, wantSet := range map[string]bool{"1.24.9": true, "1.25.0": false, "1.26.8": false, "": true} {
		s := NewAdvisor(workload.Runtime{Lang: workload.LangGo, Version: v}).WorkerCount(2)
		if got := strings.Contains(s, "GOMAXPROCS=2"); got != wantSet {
			t.Errorf("Go %q: %q; want set GOMAXPROCS=2: %v", v, s, wantSet)
		}
	}
}

// TestAdviceGoBacklogRoom: a Go listener whose backlog is below what
// somaxconn allows now came from a start while the sysctl was lower, or
// not from net.Listen; which cannot be seen from outside, so the advice
// names both and asserts neither ("it started when the value was lower"
// was said of the demo, whose listener is listen(2)'s with backlog 8).
func TestAdviceGoBacklogRoom(t *testing.T) {
	a := NewAdvisor(workload.Runtime{Lang: workload.LangGo, Version: "1.26.8"})
	for _, c := range []struct {
		atLeast, backlog, somax int
		raise                   bool // the sysctl must go up too
	}{{512, 128, 4096, false}, {512, 0, 4096, false}, {8192, 8, 4096, true}} {
		s := a.Backlog(c.atLeast, c.backlog, c.somax)
		if !strings.Contains(s, "either the service started while the sysctl was lower") || !strings.Contains(s, "or the listener was not made by net.Listen") ||
			!strings.Contains(s, fmt.Sprintf("at least %d", c.atLeast)) || strings.Contains(s, "it started when") ||
			strings.Contains(s, "net.core.somaxconn=") != c.raise {
			t.Errorf("backlog %d, somaxconn %d, wanted %d: %q", c.backlog, c.somax, c.atLeast, s)
		}
	}
	// A listener at the sysctl's value: net.Listen's; the sysctl caps it.
	if s := a.Backlog(8192, 4096, 4096); strings.Contains(s, "either") || !strings.Contains(s, "raise the sysctl to at least 8192") {
		t.Errorf("at somaxconn: %q", s)
	}
}

// TestAdviceHyperVersion: hyper 1 has no Server; its graceful shutdown is
// hyper-util's.
func TestAdviceHyperVersion(t *testing.T) {
	for v, want := range map[string]string{"0.14.19": "Server::with_graceful_shutdown", "1.8.1": "hyper-util", "": "hyper-util"} {
		rt := workload.Runtime{Lang: workload.LangRust, Frameworks: []workload.Framework{{Name: workload.FwHyper, Version: v}, {Name: workload.FwTokio}}}
		s := NewAdvisor(rt).GracefulShutdown()
		if !strings.Contains(s, want) {
			t.Errorf("hyper %q: %q, want %s", v, s, want)
		}
		if v == "0.14.19" && strings.Contains(s, "hyper-util") || v == "1.8.1" && strings.Contains(s, "with_graceful_shutdown") {
			t.Errorf("hyper %q: advice for the other major version: %q", v, s)
		}
	}
}

// TestAdviceForThisProcess joins detection and advice on a real process:
// this Go test binary gets Go's advice, in Go's version.
func TestAdviceForThisProcess(t *testing.T) {
	rt, err := workload.DetectRuntime("/proc", os.Getpid())
	if err != nil {
		t.Fatal(err)
	}
	a := NewAdvisor(rt)
	for topic, s := range adviceTexts(a) {
		for g, words := range adviceVocab {
			if g == "go" {
				continue
			}
			for _, w := range words {
				if vocabIn(s, w) {
					t.Errorf("%s advice, %s: %q is %s vocabulary: %q", rt, topic, w, g, s)
				}
			}
		}
	}
	if s := a.BlockingCall("faults.BlockingCall", "nanosleep"); !strings.Contains(s, "LockOSThread") {
		t.Errorf("Go blocking-call advice: %q", s)
	}
	major, minor := 0, 0
	if f := strings.SplitN(rt.Version, ".", 3); len(f) >= 2 {
		major, _ = strconv.Atoi(f[0])
		minor, _ = strconv.Atoi(f[1])
	}
	if s := a.WorkerCount(2); (major > 1 || minor >= 25) == strings.Contains(s, "GOMAXPROCS=2") {
		t.Errorf("Go %s: %q", rt.Version, s)
	}
}
