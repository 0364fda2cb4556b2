package main

import (
	"crypto/subtle"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/http/pprof"
	"os"
	"strings"
	"syscall"
	"time"

	"google.golang.org/grpc"

	"github.com/culprit-dev/culprit/exporters"
)

// serverBounds are the limits of the agent's own gRPC and HTTP servers.
type serverBounds struct {
	GRPCConns int // agent.grpc_addr: connections open at once
	HTTPConns int // agent.http_addr: connections open at once
	GRPC      exporters.GRPCLimits
	HTTP      exporters.HTTPLimits
}

// serverLimits are the bounds the servers run with. They are the
// exporters' defaults until agent.conf has keys for them.
func serverLimits(cfg Config) serverBounds {
	http := exporters.DefaultHTTPLimits()
	http.MaxConns = cfg.Agent.HTTPMaxConnections
	http.ReadTimeout = cfg.Agent.HTTPReadTimeout
	http.WriteTimeout = cfg.Agent.HTTPWriteTimeout
	http.IdleTimeout = cfg.Agent.HTTPIdleTimeout
	http.MaxHeaderBytes = cfg.Agent.HTTPMaxHeaderBytes
	return serverBounds{
		GRPCConns: cfg.Agent.GRPCMaxConnections,
		HTTPConns: cfg.Agent.HTTPMaxConnections,
		GRPC: exporters.GRPCLimits{
			MaxStreams:        uint32(cfg.Agent.GRPCMaxStreams),
			MaxHeaderBytes:    uint32(cfg.Agent.GRPCMaxHeaderBytes),
			MaxRequestBytes:   cfg.Agent.GRPCMaxRequestBytes,
			ConnectionTimeout: cfg.Agent.GRPCConnectionTimeout,
			MaxIdle:           cfg.Agent.GRPCMaxIdle,
			MaxHeavyCalls:     cfg.Agent.GRPCMaxHeavyCalls,
		},
		HTTP: http,
	}
}

// File descriptors the agent keeps for its own work (procfs reads,
// netlink, eBPF maps and perf events, the heap puller) beyond what its
// listeners may hold: a quarter of the limit, at least minFDReserve. A
// listener flood must never cost a collector its files or the tracker
// its target.
const minFDReserve = 256

// fdPlan is how the agent shares RLIMIT_NOFILE between its listeners and
// its own work.
type fdPlan struct {
	Limit, Reserve int
	GRPC, HTTP     int // connection caps of agent.grpc_addr and agent.http_addr
	OTLP           int // counted for the OTLP receiver, both listeners
	Scaled         bool
}

// planFDs caps the listeners so that their sum leaves the reserve, scaling
// the wanted caps down (each to at least 4) when the limit is too small.
// Each capped listener may also hold exporters.ConnCloseQueue connections
// being closed; those are counted too.
func planFDs(limit, grpcConns, httpConns, otlpConns int) fdPlan {
	p := fdPlan{Limit: limit, Reserve: max(minFDReserve, limit/4), GRPC: grpcConns, HTTP: httpConns, OTLP: otlpConns}
	avail := limit - p.Reserve - 2*exporters.ConnCloseQueue
	want := grpcConns + httpConns + otlpConns
	if want <= avail {
		return p
	}
	p.Scaled = true
	scale := func(n int) int { return max(4, n*max(avail, 0)/want) }
	p.GRPC, p.HTTP, p.OTLP = scale(grpcConns), scale(httpConns), scale(otlpConns)
	return p
}

// raiseFileLimit lifts the soft RLIMIT_NOFILE to the hard one and returns
// it. Go's runtime does this at start on Linux already; doing it here
// makes the number the plan is built on the one in force.
func raiseFileLimit() (int, error) {
	var rl syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &rl); err != nil {
		return 0, fmt.Errorf("read RLIMIT_NOFILE: %w", err)
	}
	if rl.Cur < rl.Max {
		raised := rl
		raised.Cur = rl.Max
		if err := syscall.Setrlimit(syscall.RLIMIT_NOFILE, &raised); err != nil {
			return int(min(rl.Cur, 1<<30)), fmt.Errorf("raise RLIMIT_NOFILE from %d to %d: %w", rl.Cur, rl.Max, err)
		}
		rl = raised
	}
	return int(min(rl.Cur, 1<<30)), nil
}

// isLoopback reports whether addr (host:port) listens on loopback only.
// An empty host or 0.0.0.0 listens everywhere; a name other than
// localhost may resolve anywhere.
func isLoopback(addr string) (bool, error) {
	host, _, err := net.SplitHostPort(addr)
	if err != nil {
		return false, fmt.Errorf("not host:port: %w", err)
	}
	if host == "localhost" {
		return true, nil
	}
	ip := net.ParseIP(host)
	return ip != nil && ip.IsLoopback(), nil
}

// checkLocal refuses listeners beyond loopback that nothing protects. The
// gRPC API may listen anywhere when it authenticates its callers (a token
// or mTLS: TLS alone lets anyone in); otherwise, like every other
// listener, only with agent.allow_non_local. allow_non_local is about
// addresses only: GetSnapshot and CaptureProfile still need
// authentication beyond loopback (the gate refuses them).
func checkLocal(cfg Config) error {
	listeners := []struct{ key, addr, why string }{
		{"agent.grpc_addr", cfg.Agent.GRPCAddr, "findings describe the app's internals and the gRPC API authenticates no one (TLS alone does not): set agent.token_file or agent.tls_client_ca_file (mTLS), or agent.allow_non_local = true to expose findings (GetSnapshot and CaptureProfile stay refused without authentication)"},
		{"agent.http_addr", cfg.Agent.HTTPAddr, "/metrics describes the app's internals: set agent.allow_non_local = true to expose it"},
	}
	if cfg.Traces.Enabled {
		listeners = append(listeners,
			struct{ key, addr, why string }{"traces.grpc_addr", cfg.Traces.GRPCAddr, "anyone could feed the trace receiver: set agent.allow_non_local = true to accept spans from beyond the pod"},
			struct{ key, addr, why string }{"traces.http_addr", cfg.Traces.HTTPAddr, "anyone could feed the trace receiver: set agent.allow_non_local = true to accept spans from beyond the pod"})
	}
	authenticated := security(cfg).Protected()
	for _, l := range listeners {
		if l.addr == "" {
			continue
		}
		local, err := isLoopback(l.addr)
		if err != nil {
			return &ConfigError{Key: l.key, Err: err}
		}
		if local || cfg.Agent.AllowNonLocal || (l.key == "agent.grpc_addr" && authenticated) {
			continue
		}
		return &ConfigError{Key: l.key, Err: fmt.Errorf("%s is not a loopback address; %s", l.addr, l.why)}
	}
	return nil
}

// security is the gRPC API's protection from the [agent] keys.
func security(cfg Config) exporters.ServerSecurity {
	local, err := isLoopback(cfg.Agent.GRPCAddr)
	return exporters.ServerSecurity{
		CertFile: cfg.Agent.TLSCertFile, KeyFile: cfg.Agent.TLSKeyFile, ClientCAFile: cfg.Agent.TLSClientCAFile,
		TokenFile: cfg.Agent.TokenFile, MaxMessageBytes: cfg.Agent.GRPCMaxMessage,
		KeepaliveTime: cfg.Agent.GRPCKeepalive, KeepaliveTimeout: 10 * time.Second,
		// An address that does not parse is refused by checkLocal; until
		// then it counts as exposed, the safe side.
		Exposed: !local || err != nil,
		Limits:  serverLimits(cfg).GRPC,
	}
}

// startServers binds the gRPC and HTTP listeners, each capped so that all
// listeners together leave the agent file descriptors for its own work,
// and serves them.
func (a *Agent) startServers(cfg Config) error {
	b := serverLimits(cfg)
	limit, err := raiseFileLimit()
	if err != nil {
		a.log.Warn("file descriptor limit not raised; planning with the current one", "err", err)
	}
	if limit > 0 {
		otlp := 0
		if cfg.Traces.Enabled {
			otlp = 2 * cfg.Traces.MaxConnections
		}
		plan := planFDs(limit, b.GRPCConns, b.HTTPConns, otlp)
		b.GRPCConns, b.HTTPConns = plan.GRPC, plan.HTTP
		log := a.log.Info
		if plan.Scaled {
			log = a.log.Warn // the caps are below what was asked
		}
		log("file descriptors planned", "rlimit_nofile", plan.Limit, "reserved_for_the_agent", plan.Reserve,
			"grpc_max_connections", plan.GRPC, "http_max_connections", plan.HTTP, "otlp_connections_assumed", plan.OTLP, "scaled_down", plan.Scaled)
	}

	gl, err := net.Listen("tcp", cfg.Agent.GRPCAddr)
	if err != nil {
		return fmt.Errorf("gRPC listener (agent.grpc_addr): %w", err)
	}
	hl, err := net.Listen("tcp", cfg.Agent.HTTPAddr)
	if err != nil {
		gl.Close()
		return fmt.Errorf("HTTP listener (agent.http_addr): %w", err)
	}
	closeBoth := func() { gl.Close(); hl.Close() }
	glim, err := exporters.NewConnLimiter(gl, "agent.grpc_addr", b.GRPCConns, a.log.With("component", "grpc"))
	if err != nil {
		closeBoth()
		return err
	}
	hlim, err := exporters.NewConnLimiter(hl, "agent.http_addr", b.HTTPConns, a.log.With("component", "http"))
	if err != nil {
		closeBoth()
		return err
	}
	hlim.ForHTTP()
	a.GRPCAddr, a.HTTPAddr = gl.Addr().String(), hl.Addr().String()

	sec := security(cfg)
	sec.Conns = glim
	opts, err := sec.ServerOptions()
	if err != nil {
		closeBoth()
		return &ConfigError{Key: "agent.tls", Err: err}
	}
	if sec.Exposed && !sec.Protected() {
		a.log.Warn("gRPC API listens beyond loopback without authentication (agent.allow_non_local): findings are open to the network; GetSnapshot and CaptureProfile are refused until agent.token_file or agent.tls_client_ca_file is set",
			"grpc_addr", a.GRPCAddr)
	}
	a.grpcSrv = grpc.NewServer(opts...)
	svc := exporters.NewGRPC(exporters.GRPCOptions{
		Journal:    a.Journal,
		Store:      a.Store,
		Tracker:    a.Tracker,
		Version:    version,
		Log:        a.log.With("component", "grpc"),
		MaxBatch:   cfg.Findings.MaxBatch,
		Profiles:   a.profileSource(cfg),
		MaxCapture: cfg.Profiling.MaxCapture,
	})
	svc.Register(a.grpcSrv)
	a.grpcSvc = svc
	a.log.Info("serving", "grpc_addr", a.GRPCAddr, "http_addr", a.HTTPAddr, "instance_id", svc.InstanceID())
	a.goRun(func() {
		if err := a.grpcSrv.Serve(glim); err != nil {
			a.log.Error("gRPC server stopped", "err", err)
		}
	})

	prom := exporters.NewPrometheus(exporters.PromOptions{Store: a.Store, Journal: a.Journal, Log: a.log.With("component", "metrics"),
		Listeners: []*exporters.ConnLimiter{glim, hlim}, MaxScrapes: cfg.Agent.HTTPMaxScrapes,
		Resource: a.resource, Engine: a.engine})
	mux := a.httpMux(prom)
	if cfg.Agent.Pprof {
		gate, err := pprofGate(cfg)
		if err != nil {
			closeBoth()
			return &ConfigError{Key: "agent.pprof", Err: err}
		}
		handlePprof(mux, gate)
		a.log.Info("serving the agent's own profiles", "url", "http://"+a.HTTPAddr+"/debug/pprof/", "from", gate.who())
	}
	a.httpSrv = exporters.NewHTTPServer(mux, b.HTTP, a.log.With("component", "http"))
	a.goRun(func() {
		if err := a.httpSrv.Serve(hlim); err != nil && !errors.Is(err, http.ErrServerClosed) {
			a.log.Error("HTTP server stopped", "err", err)
		}
	})
	return nil
}

// httpMux serves /metrics, /healthz and /readyz. /readyz says why the
// target is not watched, as GetSnapshot does.
func (a *Agent) httpMux(prom *exporters.Prometheus) *http.ServeMux {
	mux := http.NewServeMux()
	mux.Handle("/metrics", prom.Handler(exporters.NewRegistry(prom)))
	mux.HandleFunc("/healthz", func(w http.ResponseWriter, _ *http.Request) { fmt.Fprintln(w, "ok") })
	mux.HandleFunc("/readyz", func(w http.ResponseWriter, _ *http.Request) {
		if _, ok := a.Tracker.Current(); !ok {
			msg := "target not found: " + a.Tracker.Selector().String()
			if r := a.Tracker.Reason(); r != "" {
				msg += ": " + r
			}
			http.Error(w, msg, http.StatusServiceUnavailable)
			return
		}
		fmt.Fprintln(w, "ok")
	})
	return mux
}

// pprofAccess decides who may read the agent's own profiles: callers on
// loopback always; others only with the bearer token of agent.token_file.
// The HTTP listener has no TLS, so mTLS cannot admit anyone here.
type pprofAccess struct{ token []byte }

func pprofGate(cfg Config) (pprofAccess, error) {
	if cfg.Agent.TokenFile == "" {
		return pprofAccess{}, nil
	}
	b, err := os.ReadFile(cfg.Agent.TokenFile)
	if err != nil {
		return pprofAccess{}, fmt.Errorf("agent.token_file: %w", err)
	}
	t := strings.TrimSpace(string(b))
	if len(t) < 16 {
		return pprofAccess{}, fmt.Errorf("agent.token_file: the token is shorter than 16 characters")
	}
	return pprofAccess{token: []byte(t)}, nil
}

func (g pprofAccess) who() string {
	if g.token != nil {
		return "loopback, or with the bearer token of agent.token_file"
	}
	return "loopback only"
}

func (g pprofAccess) allowed(r *http.Request) bool {
	if host, _, err := net.SplitHostPort(r.RemoteAddr); err == nil {
		if ip := net.ParseIP(host); ip != nil && ip.IsLoopback() {
			return true
		}
	}
	if g.token == nil {
		return false
	}
	got, ok := strings.CutPrefix(r.Header.Get("Authorization"), "Bearer ")
	return ok && subtle.ConstantTimeCompare([]byte(got), g.token) == 1
}

// handlePprof serves net/http/pprof under /debug/pprof/ behind the gate.
// Nothing runs until asked: a CPU profile costs the agent a few percent of
// a core for its duration (bounded by agent.http_write_timeout), a heap
// profile one walk of the heap's sampled records.
func handlePprof(mux *http.ServeMux, g pprofAccess) {
	guard := func(h http.HandlerFunc) http.Handler {
		return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			if !g.allowed(r) {
				http.Error(w, "the agent's profiles are served to loopback callers, or with agent.token_file's bearer token", http.StatusForbidden)
				return
			}
			h(w, r)
		})
	}
	mux.Handle("/debug/pprof/", guard(pprof.Index))
	mux.Handle("/debug/pprof/cmdline", guard(pprof.Cmdline))
	mux.Handle("/debug/pprof/profile", guard(pprof.Profile))
	mux.Handle("/debug/pprof/symbol", guard(pprof.Symbol))
	mux.Handle("/debug/pprof/trace", guard(pprof.Trace))
}
