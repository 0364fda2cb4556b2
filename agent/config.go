package main

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"io"
	"math"
	"os"
	"reflect"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/pelletier/go-toml/v2"

	"github.com/culprit-dev/culprit/collectors"
	"github.com/culprit-dev/culprit/exporters"
	"github.com/culprit-dev/culprit/probes"
	"github.com/culprit-dev/culprit/rules"
	"github.com/culprit-dev/culprit/symbolize"
	"github.com/culprit-dev/culprit/traces"
)

// Config mirrors agent.conf; the file at the repository root documents every
// key with its default, and a test keeps the two in step. Each numeric key
// carries its bounds in a `range` tag ("[1s,1h]", "(0,1]": brackets
// include the end, parentheses exclude it), checked by Validate for every
// key; a test walks them all. The [rules] section is the rules package's
// own Options: each rule declares its keys, bounds and defaults next to the
// code that reads them.
type Config struct {
	Agent struct {
		HTTPAddr        string        `toml:"http_addr"`
		GRPCAddr        string        `toml:"grpc_addr"`
		LogLevel        string        `toml:"log_level"`
		LogFormat       string        `toml:"log_format"`
		AllowNonLocal   bool          `toml:"allow_non_local"`
		TLSCertFile     string        `toml:"tls_cert_file"`
		TLSKeyFile      string        `toml:"tls_key_file"`
		TLSClientCAFile string        `toml:"tls_client_ca_file"`
		TokenFile       string        `toml:"token_file"`
		GRPCMaxMessage  int           `toml:"grpc_max_message_bytes" range:"[65536,1073741824]"`
		GRPCKeepalive   time.Duration `toml:"grpc_keepalive" range:"[1s,24h]"`
		ShutdownTimeout time.Duration `toml:"shutdown_timeout" range:"[0s,10m]"`

		GRPCMaxConnections    int           `toml:"grpc_max_connections" range:"[1,65536]"`
		GRPCMaxStreams        int           `toml:"grpc_max_streams" range:"[1,1024]"`
		GRPCMaxHeaderBytes    int           `toml:"grpc_max_header_bytes" range:"[1024,1048576]"`
		GRPCMaxRequestBytes   int           `toml:"grpc_max_request_bytes" range:"[1024,16777216]"`
		GRPCConnectionTimeout time.Duration `toml:"grpc_connection_timeout" range:"[100ms,2m]"`
		GRPCMaxIdle           time.Duration `toml:"grpc_max_idle" range:"[1s,24h]"`
		GRPCMaxHeavyCalls     int           `toml:"grpc_max_heavy_calls" range:"[1,256]"`
		HTTPMaxConnections    int           `toml:"http_max_connections" range:"[8,65536]"`
		HTTPReadTimeout       time.Duration `toml:"http_read_timeout" range:"[100ms,10m]"`
		HTTPWriteTimeout      time.Duration `toml:"http_write_timeout" range:"[100ms,10m]"`
		HTTPIdleTimeout       time.Duration `toml:"http_idle_timeout" range:"[1s,1h]"`
		HTTPMaxHeaderBytes    int           `toml:"http_max_header_bytes" range:"[1024,1048576]"`
		HTTPMaxScrapes        int           `toml:"http_max_scrapes" range:"[1,64]"`
		// Pprof serves the agent's own profiles on /debug/pprof/ of the
		// HTTP listener (loopback callers, or with the bearer token).
		Pprof bool `toml:"pprof"`
		// MemoryLimitBytes is the agent's Go memory limit
		// (debug.SetMemoryLimit); 0 derives it from its container's memory
		// limit (cgroup v1 or v2), -1 sets none.
		MemoryLimitBytes int64 `toml:"memory_limit_bytes" range:"[-1,1099511627776]"`
		// MemoryLimitRatio is the share of the container's limit the Go
		// runtime aims under when memory_limit_bytes is 0.
		MemoryLimitRatio float64 `toml:"memory_limit_ratio" range:"(0,1]"`
		// GOGC is the Go garbage collector's target (percent heap growth
		// between collections); 0 keeps the runtime's (GOGC env, or 100).
		GOGC int `toml:"gogc" range:"[0,1000]"`
		// MaxProcs is the agent's GOMAXPROCS; 0 keeps the runtime's
		// (GOMAXPROCS env, else the container's CPU limit or the CPUs).
		MaxProcs int `toml:"max_procs" range:"[0,1024]"`
	} `toml:"agent"`
	Target struct {
		PID            int           `toml:"pid" range:"[0,4194304]"`
		Port           int           `toml:"port" range:"[0,65535]"`
		Cmd            string        `toml:"cmd"`
		RefindInterval time.Duration `toml:"refind_interval" range:"[10ms,1h]"`
	} `toml:"target"`
	Collect struct {
		Interval     time.Duration `toml:"interval" range:"[10ms,1h]"`
		FastInterval time.Duration `toml:"fast_interval" range:"[10ms,1m]"`
		ProcRoot     string        `toml:"proc_root"`
		SysRoot      string        `toml:"sys_root"`
		Disabled     []string      `toml:"disabled"`
		MaxThreads   int           `toml:"max_threads" range:"[1,1048576]"`
		// SocketsIdleInterval: the longest the sockets collector goes
		// without a sock_diag dump while the namespace's TCP counters say
		// no socket changed.
		SocketsIdleInterval time.Duration `toml:"sockets_idle_interval" range:"[1s,1h]"`
		// SocketsBusyInterval: the longest it goes without one while only
		// segments move (no socket opened, closed, reset or
		// retransmitted).
		SocketsBusyInterval time.Duration `toml:"sockets_busy_interval" range:"[1s,1h]"`
	} `toml:"collect"`
	Probes struct {
		Enabled         bool          `toml:"enabled"`
		PollInterval    time.Duration `toml:"poll_interval" range:"[10ms,1m]"`
		IdlePoll        time.Duration `toml:"idle_poll_interval" range:"[10ms,1m]"`
		MaxEntries      int           `toml:"max_entries" range:"[16,1048576]"`
		RingBufferBytes int           `toml:"ring_buffer_bytes" range:"[4096,1073741824]"`
		MaxConnEvents   int           `toml:"max_conn_events" range:"[16,1048576]"`
	} `toml:"probes"`
	Sched struct {
		MinBlock    time.Duration `toml:"min_block" range:"[1ms,1m]"`
		BusyAfter   time.Duration `toml:"busy_after" range:"[1ms,1m]"`
		BusyGap     time.Duration `toml:"busy_gap" range:"[1us,1s]"`
		MaxThreads  int           `toml:"max_threads" range:"[16,1048576]"`
		MaxStacks   int           `toml:"max_stacks" range:"[64,1048576]"`
		MaxEpisodes int           `toml:"max_episodes" range:"[16,1048576]"`
	} `toml:"sched"`
	SockCalls struct {
		Enabled       bool          `toml:"enabled"`
		MaxSockets    int           `toml:"max_sockets" range:"[64,1048576]"`
		MaxRemotes    int           `toml:"max_remotes" range:"[1,4096]"`
		Accepts       string        `toml:"accepts"`
		AcceptsLinger time.Duration `toml:"accepts_linger" range:"[1s,1h]"`
		Unread        string        `toml:"unread"`
		UnreadLinger  time.Duration `toml:"unread_linger" range:"[1s,1h]"`
	} `toml:"sockcalls"`
	Profiling struct {
		Enabled       bool          `toml:"enabled"`
		Frequency     int           `toml:"frequency" range:"[1,1000]"`
		MaxStacks     int           `toml:"max_stacks" range:"[64,1048576]"`
		DrainInterval time.Duration `toml:"drain_interval" range:"[100ms,1m]"`
		MaxSamples    int           `toml:"max_samples" range:"[64,16777216]"`
		MaxCapture    time.Duration `toml:"max_capture" range:"[1s,1h]"`
		// MaxPerfMapBytes bounds the JIT symbols read from perf maps, for
		// every process together; 0 turns them off.
		MaxPerfMapBytes int `toml:"max_perf_map_bytes" range:"[0,1073741824]"`
		// StackBytes is the user stack each CPU sample of the target
		// copies, for CFI unwinding (0: none).
		StackBytes int `toml:"stack_bytes" range:"[0,32768]"`
	} `toml:"profiling"`
	Traces struct {
		Enabled           bool          `toml:"enabled"`
		GRPCAddr          string        `toml:"grpc_addr"`
		HTTPAddr          string        `toml:"http_addr"`
		MaxRequestBytes   int           `toml:"max_request_bytes" range:"[1024,1073741824]"`
		MaxInflightBytes  int           `toml:"max_inflight_bytes" range:"[1048576,4294967296]"`
		InflightWait      time.Duration `toml:"inflight_wait" range:"[0s,1m]"`
		MaxConnections    int           `toml:"max_connections" range:"[1,65536]"`
		GRPCMaxStreams    int           `toml:"grpc_max_streams" range:"[1,1024]"`
		MaxHeaderBytes    int           `toml:"max_header_bytes" range:"[4096,1048576]"`
		HeaderTimeout     time.Duration `toml:"header_timeout" range:"[100ms,5m]"`
		ReadTimeout       time.Duration `toml:"read_timeout" range:"[100ms,10m]"`
		WriteTimeout      time.Duration `toml:"write_timeout" range:"[100ms,10m]"`
		IdleTimeout       time.Duration `toml:"idle_timeout" range:"[1s,1h]"`
		MaxStringBytes    int           `toml:"max_string_bytes" range:"[16,65536]"`
		MaxSpans          int           `toml:"max_spans" range:"[64,16777216]"`
		MaxSpanBytes      int           `toml:"max_span_bytes" range:"[1048576,4294967296]"`
		ForwardEndpoint   string        `toml:"forward_endpoint"`
		ForwardQueue      int           `toml:"forward_queue" range:"[1,65536]"`
		ForwardQueueBytes int           `toml:"forward_queue_bytes" range:"[65536,4294967296]"`
	} `toml:"traces"`
	Signals struct {
		RingSize  int `toml:"ring_size" range:"[16,1048576]"`
		MaxSeries int `toml:"max_series" range:"[64,16777216]"`
	} `toml:"signals"`
	Rules rules.Options `toml:"rules"`
	Pprof struct {
		HeapURL  string        `toml:"heap_url"`
		Interval time.Duration `toml:"interval" range:"[1s,24h]"`
		Timeout  time.Duration `toml:"timeout" range:"[100ms,10m]"`
		MaxBytes int64         `toml:"max_bytes" range:"[1,17179869184]"`
		Keep     int           `toml:"keep" range:"[2,1024]"`
	} `toml:"pprof"`
	Findings struct {
		History  int `toml:"history" range:"[16,16777216]"`
		MaxBatch int `toml:"max_batch" range:"[1,1048576]"`
		// OTLP*: finding events as OpenTelemetry log records
		// (exporters.FindingsLogs); no export while OTLPEndpoint is empty.
		OTLPEndpoint   string        `toml:"otlp_endpoint"`
		OTLPProtocol   string        `toml:"otlp_protocol"`
		OTLPQueue      int           `toml:"otlp_queue" range:"[1,65536]"`
		OTLPQueueBytes int           `toml:"otlp_queue_bytes" range:"[65536,1073741824]"`
		OTLPBatch      int           `toml:"otlp_batch" range:"[1,65536]"`
		OTLPInterval   time.Duration `toml:"otlp_interval" range:"[10ms,1m]"`
		OTLPTimeout    time.Duration `toml:"otlp_timeout" range:"[1s,1h]"`
	} `toml:"findings"`
}

// DefaultConfig is what the agent runs with when agent.conf says nothing.
func DefaultConfig() Config {
	var c Config
	c.Agent.HTTPAddr = "127.0.0.1:9461"
	c.Agent.GRPCAddr = "127.0.0.1:9462"
	c.Agent.LogLevel = "info"
	c.Agent.LogFormat = "text"
	c.Agent.ShutdownTimeout = 5 * time.Second
	c.Agent.GRPCMaxMessage = 4 << 20
	c.Agent.GRPCKeepalive = 30 * time.Second
	c.Agent.GRPCMaxConnections = 64
	c.Agent.GRPCMaxStreams = 16
	c.Agent.GRPCMaxHeaderBytes = 16 << 10
	c.Agent.GRPCMaxRequestBytes = 16 << 10
	c.Agent.GRPCConnectionTimeout = 5 * time.Second
	c.Agent.GRPCMaxIdle = 5 * time.Minute
	c.Agent.GRPCMaxHeavyCalls = 4
	c.Agent.HTTPMaxConnections = 256
	c.Agent.HTTPReadTimeout = 10 * time.Second
	c.Agent.HTTPWriteTimeout = 30 * time.Second
	c.Agent.HTTPIdleTimeout = time.Minute
	c.Agent.HTTPMaxHeaderBytes = 16 << 10
	c.Agent.HTTPMaxScrapes = 4
	c.Agent.Pprof = false
	c.Agent.MemoryLimitBytes = 0
	c.Agent.MemoryLimitRatio = 0.8
	c.Agent.GOGC = 50
	c.Agent.MaxProcs = 1
	c.Target.RefindInterval = 500 * time.Millisecond
	c.Collect.Interval = time.Second
	c.Collect.FastInterval = 100 * time.Millisecond
	c.Collect.ProcRoot = "/proc"
	c.Collect.SysRoot = "/sys"
	c.Collect.Disabled = []string{}
	c.Collect.MaxThreads = 4096
	c.Collect.SocketsIdleInterval = 30 * time.Second
	c.Collect.SocketsBusyInterval = 5 * time.Second
	c.Probes.Enabled = true
	c.Probes.PollInterval = 100 * time.Millisecond
	c.Probes.IdlePoll = time.Second
	c.Probes.MaxEntries = 4096
	c.Probes.RingBufferBytes = 65536
	c.Probes.MaxConnEvents = 8192
	c.Sched.MinBlock = 100 * time.Millisecond
	c.Sched.BusyAfter = 200 * time.Millisecond
	c.Sched.BusyGap = time.Millisecond
	c.Sched.MaxThreads = 4096
	c.Sched.MaxStacks = 8192
	c.Sched.MaxEpisodes = 1024
	c.SockCalls.Enabled = true
	c.SockCalls.MaxSockets = 16384
	c.SockCalls.MaxRemotes = 64
	c.SockCalls.Accepts = AcceptsQueued
	c.SockCalls.AcceptsLinger = 30 * time.Second
	c.SockCalls.Unread = UnreadBlocked
	c.SockCalls.UnreadLinger = 10 * time.Second
	c.Profiling.Enabled = true
	c.Profiling.Frequency = 49
	c.Profiling.MaxStacks = 8192
	c.Profiling.DrainInterval = time.Second
	c.Profiling.MaxSamples = 65536
	c.Profiling.MaxCapture = time.Minute
	c.Profiling.MaxPerfMapBytes = int(symbolize.DefaultMaxPerfMapBytes)
	c.Profiling.StackBytes = probes.DefaultStackBytes
	c.Rules = rules.DefaultOptions()
	c.Traces.Enabled = true
	c.Traces.GRPCAddr = "127.0.0.1:4317"
	c.Traces.HTTPAddr = "127.0.0.1:4318"
	c.Traces.MaxRequestBytes = 4 << 20
	c.Traces.MaxInflightBytes = traces.DefaultMaxInflightBytes
	c.Traces.InflightWait = time.Second
	c.Traces.MaxConnections = 64
	c.Traces.GRPCMaxStreams = 16
	c.Traces.MaxHeaderBytes = 64 << 10
	c.Traces.HeaderTimeout = 5 * time.Second
	c.Traces.ReadTimeout = 10 * time.Second
	c.Traces.WriteTimeout = 10 * time.Second
	c.Traces.IdleTimeout = 30 * time.Second
	c.Traces.MaxStringBytes = 256
	c.Traces.MaxSpans = 65536
	c.Traces.MaxSpanBytes = 32 << 20
	c.Traces.ForwardQueue = 64
	c.Traces.ForwardQueueBytes = 16 << 20
	c.Signals.RingSize = 600
	c.Signals.MaxSeries = 20000
	c.Pprof.HeapURL = ""
	c.Pprof.Interval = 10 * time.Second
	c.Pprof.Timeout = 5 * time.Second
	c.Pprof.MaxBytes = 32 << 20
	c.Pprof.Keep = 8
	c.Findings.History = 4096
	c.Findings.MaxBatch = 256
	c.Findings.OTLPQueue = exporters.DefaultOTLPQueue
	c.Findings.OTLPQueueBytes = exporters.DefaultOTLPQueueBytes
	c.Findings.OTLPBatch = exporters.DefaultOTLPBatch
	c.Findings.OTLPInterval = exporters.DefaultOTLPInterval
	c.Findings.OTLPTimeout = exporters.DefaultOTLPTimeout
	return c
}

// ConfigError names the key and, when known, the line of agent.conf.
type ConfigError struct {
	File string
	Line int
	Key  string
	Err  error
}

func (e *ConfigError) Error() string {
	where := e.File
	if where == "" {
		where = "config"
	}
	if e.Line > 0 {
		where = fmt.Sprintf("%s:%d", e.File, e.Line)
	}
	if e.Key != "" {
		return fmt.Sprintf("%s: %s: %v", where, e.Key, e.Err)
	}
	return fmt.Sprintf("%s: %v", where, e.Err)
}

func (e *ConfigError) Unwrap() error { return e.Err }

// The values of sockcalls.accepts: count the target's accepts while a
// listener's queue fills up (the sys_exit program they need makes
// every system call of the host slower), or all the time.
const (
	AcceptsQueued = "queued"
	AcceptsAlways = "always"
)

// The values of sockcalls.unread: watch for data left unread on the
// target's sockets while one of its threads sleeps where work may wait for
// it (the two socket hooks run for every packet and read of the host), or
// all the time.
const (
	UnreadBlocked = "blocked"
	UnreadAlways  = "always"
)

// Bounds on the configuration itself: a config file is read up to
// maxConfigBytes (so --config /dev/zero is an error, not an out-of-memory
// kill), a string value may hold maxStringBytes, a list maxListItems, and
// a value quoted in an error is cut to quoteBytes.
const (
	maxConfigBytes = 1 << 20
	maxStringBytes = 4096
	maxListItems   = 256
	quoteBytes     = 64
)

// ParseConfig reads agent.conf content over the defaults. Unknown keys are
// errors: a misspelt key silently ignored is a setting the user thinks they
// made.
func ParseConfig(name string, data []byte) (Config, error) {
	c := DefaultConfig()
	if len(data) > maxConfigBytes {
		return c, &ConfigError{File: name, Err: fmt.Errorf("larger than %d bytes: not a configuration file", maxConfigBytes)}
	}
	var doc map[string]any
	if err := toml.Unmarshal(data, &doc); err != nil {
		var de *toml.DecodeError
		if errors.As(err, &de) {
			row, _ := de.Position()
			return c, &ConfigError{File: name, Line: row, Key: strings.Join(de.Key(), "."), Err: errors.New(decodeMessage(de))}
		}
		return c, &ConfigError{File: name, Err: err}
	}
	keys := c.keys()
	var walk func(prefix string, m map[string]any) error
	walk = func(prefix string, m map[string]any) error {
		names := make([]string, 0, len(m))
		for k := range m {
			names = append(names, k)
		}
		slices.Sort(names) // the first error is the same every time
		for _, k := range names {
			key := k
			if prefix != "" {
				key = prefix + "." + k
			}
			f, ok := keys[key]
			if sub, table := m[k].(map[string]any); table && !ok {
				if !c.isTable(key) {
					return &ConfigError{File: name, Line: lineOfKey(data, key), Key: key, Err: errors.New("unknown key")}
				}
				if err := walk(key, sub); err != nil {
					return err
				}
				continue
			}
			if !ok {
				return &ConfigError{File: name, Line: lineOfKey(data, key), Key: key, Err: errors.New("unknown key")}
			}
			if err := f.setTOML(m[k]); err != nil {
				return &ConfigError{File: name, Line: lineOfKey(data, key), Key: key, Err: err}
			}
		}
		return nil
	}
	if err := walk("", doc); err != nil {
		return c, err
	}
	if err := c.Validate(); err != nil {
		var ce *ConfigError
		if errors.As(err, &ce) {
			ce.File = name
			ce.Line = lineOfKey(data, ce.Key)
		}
		return c, err
	}
	return c, nil
}

// decodeMessage keeps go-toml's first line (its String() adds a drawing of
// the document that does not fit a log line).
func decodeMessage(de *toml.DecodeError) string {
	msg := de.Error()
	if i := strings.IndexByte(msg, '\n'); i > 0 {
		msg = msg[:i]
	}
	return strings.TrimPrefix(msg, "toml: ")
}

// LoadConfig reads a file; an empty path means the defaults. At most
// maxConfigBytes are read, whatever the file is (a FIFO, /dev/zero).
func LoadConfig(path string) (Config, error) {
	if path == "" {
		c := DefaultConfig()
		return c, c.Validate()
	}
	f, err := os.Open(path)
	if err != nil {
		return DefaultConfig(), fmt.Errorf("read config: %w", err)
	}
	defer f.Close()
	data, err := io.ReadAll(io.LimitReader(f, maxConfigBytes+1))
	if err != nil {
		return DefaultConfig(), fmt.Errorf("read config %s: %w", path, err)
	}
	return ParseConfig(path, data)
}

// Validate checks every key against its bounds, then what the bounds
// cannot say: values that must agree with each other, formats.
func (c *Config) Validate() error {
	bad := func(key, format string, a ...any) error {
		return &ConfigError{Key: key, Err: fmt.Errorf(format, a...)}
	}
	keys := c.keys()
	names := make([]string, 0, len(keys))
	for k := range keys {
		names = append(names, k)
	}
	slices.Sort(names)
	for _, k := range names {
		if err := keys[k].check(); err != nil {
			return &ConfigError{Key: k, Err: err}
		}
	}
	if err := c.Rules.Validate(); err != nil {
		var ke *rules.KeyError
		if errors.As(err, &ke) {
			return &ConfigError{Key: "rules." + ke.Key, Err: ke.Err}
		}
		return &ConfigError{Key: "rules", Err: err}
	}
	// A misspelt name would leave on the collector it meant to turn off,
	// with no word said.
	for _, n := range c.Collect.Disabled {
		if !slices.Contains(collectors.Names(), n) {
			return bad("collect.disabled", "no collector is named %s; the collectors are %s", quote(n), strings.Join(collectors.Names(), ", "))
		}
	}
	if rb := c.Probes.RingBufferBytes; rb&(rb-1) != 0 {
		return bad("probes.ring_buffer_bytes", "must be a power of two of at least 4096, got %d", rb)
	}
	// The ring must hold a whole rule window of fast samples, or the rule
	// would judge a 10 s window on the last second.
	if need := int(c.Rules.AcceptOverflow.Window/c.Collect.FastInterval) + 1; c.Signals.RingSize < need {
		return bad("signals.ring_size", "must hold rules.accept_overflow.window of collect.fast_interval samples: at least %d, got %d", need, c.Signals.RingSize)
	}
	// A request of the largest size must fit the in-flight budget with
	// what decoding it takes (traces.Receiver.Start refuses otherwise).
	if c.Traces.MaxInflightBytes < 4*c.Traces.MaxRequestBytes {
		return bad("traces.max_inflight_bytes", "must be at least 4 × traces.max_request_bytes (%d), got %d", 4*c.Traces.MaxRequestBytes, c.Traces.MaxInflightBytes)
	}
	switch c.Agent.LogLevel {
	case "debug", "info", "warn", "error":
	default:
		return bad("agent.log_level", "must be debug, info, warn or error, got %s", quote(c.Agent.LogLevel))
	}
	switch c.Agent.LogFormat {
	case "text", "json":
	default:
		return bad("agent.log_format", "must be text or json, got %s", quote(c.Agent.LogFormat))
	}
	switch c.SockCalls.Accepts {
	case AcceptsQueued, AcceptsAlways:
	default:
		return bad("sockcalls.accepts", "must be %s or %s, got %s", AcceptsQueued, AcceptsAlways, quote(c.SockCalls.Accepts))
	}
	switch c.SockCalls.Unread {
	case UnreadBlocked, UnreadAlways:
	default:
		return bad("sockcalls.unread", "must be %s or %s, got %s", UnreadBlocked, UnreadAlways, quote(c.SockCalls.Unread))
	}
	switch p := c.Findings.OTLPProtocol; p {
	case "", exporters.OTLPProtocolGRPC, exporters.OTLPProtocolHTTP:
	default:
		return bad("findings.otlp_protocol", "must be grpc or http/protobuf (empty: OTEL_EXPORTER_OTLP_LOGS_PROTOCOL, OTEL_EXPORTER_OTLP_PROTOCOL, else grpc), got %s", quote(p))
	}
	if c.Findings.OTLPBatch > c.Findings.OTLPQueue {
		return bad("findings.otlp_batch", "must not exceed findings.otlp_queue (%d), got %d", c.Findings.OTLPQueue, c.Findings.OTLPBatch)
	}
	if u := c.Pprof.HeapURL; u != "" && !strings.HasPrefix(u, "http://") && !strings.HasPrefix(u, "https://") {
		return bad("pprof.heap_url", "must be an http:// or https:// URL, got %s", quote(u))
	}
	set := 0
	if c.Target.PID != 0 {
		set++
	}
	if c.Target.Port != 0 {
		set++
	}
	if c.Target.Cmd != "" {
		set++
		if _, err := regexp.Compile(c.Target.Cmd); err != nil {
			return bad("target.cmd", "not a regular expression: %w", err)
		}
	}
	if set > 1 {
		return bad("target", "set only one of pid, port and cmd")
	}
	return nil
}

// quote shows a bad value in an error, cut so that a 50 MB value does not
// become a 50 MB error.
func quote(s string) string {
	if len(s) > quoteBytes {
		return strconv.Quote(s[:quoteBytes]) + fmt.Sprintf("... (%d bytes)", len(s))
	}
	return strconv.Quote(s)
}

// lineOfKey finds the line where a dotted key is set, following [table]
// headers; 0 when the key is not in the file (it came from a default, a
// flag or the environment).
func lineOfKey(data []byte, key string) int {
	table := ""
	sc := bufio.NewScanner(bytes.NewReader(data))
	for n := 1; sc.Scan(); n++ {
		l := strings.TrimSpace(sc.Text())
		if strings.HasPrefix(l, "[") && strings.HasSuffix(l, "]") {
			table = strings.Trim(l, "[] ")
			if table == key {
				return n
			}
			continue
		}
		k, _, ok := strings.Cut(l, "=")
		if !ok || strings.HasPrefix(l, "#") {
			continue
		}
		full := strings.TrimSpace(k)
		if table != "" {
			full = table + "." + full
		}
		if full == key {
			return n
		}
	}
	return 0
}

// field is one key of the config: its value and its declaration (tags).
type field struct {
	v reflect.Value
	f reflect.StructField
}

var durationType = reflect.TypeOf(time.Duration(0))

// keys lists every dotted key of the config with its field. Fields tagged
// toml:"-" are not keys (values the agent derives, such as a rule's
// HeapFresh).
func (c *Config) keys() map[string]field {
	out := map[string]field{}
	var walk func(prefix string, v reflect.Value)
	walk = func(prefix string, v reflect.Value) {
		t := v.Type()
		for i := 0; i < t.NumField(); i++ {
			name, _, _ := strings.Cut(t.Field(i).Tag.Get("toml"), ",")
			if name == "-" || name == "" {
				continue
			}
			key := name
			if prefix != "" {
				key = prefix + "." + name
			}
			f := v.Field(i)
			if f.Kind() == reflect.Struct {
				walk(key, f)
				continue
			}
			out[key] = field{v: f, f: t.Field(i)}
		}
	}
	walk("", reflect.ValueOf(c).Elem())
	return out
}

// Keys lists every dotted key of the config with a pointer to its field,
// for environment and flag overrides.
func (c *Config) Keys() map[string]reflect.Value {
	out := map[string]reflect.Value{}
	for k, f := range c.keys() {
		out[k] = f.v
	}
	return out
}

// isTable reports whether key names a table ([rules.accept_overflow]).
func (c *Config) isTable(key string) bool {
	prefix := key + "."
	for k := range c.keys() {
		if strings.HasPrefix(k, prefix) {
			return true
		}
	}
	return false
}

// setTOML assigns a value as go-toml decoded it (int64, float64, bool,
// string, []any).
func (f field) setTOML(v any) error {
	switch x := v.(type) {
	case string:
		if f.v.Kind() == reflect.String || f.v.Type() == durationType {
			return f.setString(x)
		}
		return fmt.Errorf("want %s, got the string %s", f.want(), quote(x))
	case int64:
		switch {
		case f.v.Type() == durationType:
			return fmt.Errorf("want a duration like 500ms or 10s, got the number %d", x)
		case f.v.CanInt():
			if f.v.OverflowInt(x) {
				return fmt.Errorf("%d is out of range", x)
			}
			f.v.SetInt(x)
			return nil
		case f.v.CanFloat():
			f.v.SetFloat(float64(x))
			return nil
		}
	case float64:
		if f.v.CanFloat() {
			f.v.SetFloat(x)
			return nil
		}
		if f.v.CanInt() && f.v.Type() != durationType {
			return fmt.Errorf("want an integer, got %s", strconv.FormatFloat(x, 'f', -1, 64))
		}
	case bool:
		if f.v.Kind() == reflect.Bool {
			f.v.SetBool(x)
			return nil
		}
	case []any:
		if f.v.Type() == reflect.TypeOf([]string(nil)) {
			if len(x) > maxListItems {
				return fmt.Errorf("at most %d items, got %d", maxListItems, len(x))
			}
			out := make([]string, 0, len(x))
			for _, e := range x {
				s, ok := e.(string)
				if !ok {
					return fmt.Errorf("want a list of strings, got an element %v", e)
				}
				if len(s) > maxStringBytes {
					return fmt.Errorf("an element of %d bytes: at most %d", len(s), maxStringBytes)
				}
				out = append(out, s)
			}
			f.v.Set(reflect.ValueOf(out))
			return nil
		}
	}
	return fmt.Errorf("want %s, got %T", f.want(), v)
}

// want names the field's type for an error.
func (f field) want() string {
	switch {
	case f.v.Type() == durationType:
		return "a duration like 500ms or 10s"
	case f.v.CanInt():
		return "an integer"
	case f.v.CanFloat():
		return "a number"
	case f.v.Kind() == reflect.Bool:
		return "true or false"
	case f.v.Kind() == reflect.Slice:
		return "a list of strings"
	}
	return "a string"
}

// setString assigns a value written as text: a flag, a CULPRIT_* variable,
// or a TOML string.
func (f field) setString(value string) error {
	if len(value) > maxStringBytes {
		return fmt.Errorf("a value of %d bytes: at most %d", len(value), maxStringBytes)
	}
	switch {
	case f.v.Type() == durationType:
		d, err := time.ParseDuration(value)
		if err != nil {
			return fmt.Errorf("want a duration like 500ms or 10s, got %s", quote(value))
		}
		f.v.SetInt(int64(d))
	case f.v.Kind() == reflect.String:
		f.v.SetString(value)
	case f.v.CanInt():
		n, err := strconv.ParseInt(value, 10, 64)
		if err != nil || f.v.OverflowInt(n) {
			return fmt.Errorf("want an integer, got %s", quote(value))
		}
		f.v.SetInt(n)
	case f.v.CanFloat():
		x, err := strconv.ParseFloat(value, 64)
		if err != nil {
			return fmt.Errorf("want a number, got %s", quote(value))
		}
		f.v.SetFloat(x)
	case f.v.Kind() == reflect.Bool:
		b, err := strconv.ParseBool(value)
		if err != nil {
			return fmt.Errorf("want true or false, got %s", quote(value))
		}
		f.v.SetBool(b)
	case f.v.Type() == reflect.TypeOf([]string(nil)):
		var out []string
		for _, s := range strings.Split(value, ",") {
			if s = strings.TrimSpace(s); s != "" {
				out = append(out, s)
			}
		}
		if len(out) > maxListItems {
			return fmt.Errorf("at most %d items, got %d", maxListItems, len(out))
		}
		f.v.Set(reflect.ValueOf(out))
	default:
		return fmt.Errorf("cannot be set from text")
	}
	return nil
}

// bounds is a parsed `range` tag.
type bounds struct {
	lo, hi         float64
	loOpen, hiOpen bool
	dur            bool
}

// parseRange reads "[1s,1h]", "(0,1]", "[16,1048576]".
func parseRange(tag string, dur bool) (bounds, error) {
	b := bounds{dur: dur}
	if len(tag) < 5 || !strings.ContainsRune("[(", rune(tag[0])) || !strings.ContainsRune("])", rune(tag[len(tag)-1])) {
		return b, fmt.Errorf("malformed range tag %q", tag)
	}
	b.loOpen, b.hiOpen = tag[0] == '(', tag[len(tag)-1] == ')'
	lo, hi, ok := strings.Cut(tag[1:len(tag)-1], ",")
	if !ok {
		return b, fmt.Errorf("malformed range tag %q", tag)
	}
	num := func(s string) (float64, error) {
		if dur {
			d, err := time.ParseDuration(strings.TrimSpace(s))
			return float64(d), err
		}
		return strconv.ParseFloat(strings.TrimSpace(s), 64)
	}
	var err1, err2 error
	b.lo, err1 = num(lo)
	b.hi, err2 = num(hi)
	if err := errors.Join(err1, err2); err != nil {
		return b, fmt.Errorf("malformed range tag %q: %w", tag, err)
	}
	return b, nil
}

func (b bounds) format(x float64) string {
	if b.dur {
		return time.Duration(x).String()
	}
	// 'f' not 'g': a bound of 1048576 reads as such, not 1.048576e+06.
	return strconv.FormatFloat(x, 'f', -1, 64)
}

// check holds the value to its `range` tag and strings to their size.
func (f field) check() error {
	if f.v.Kind() == reflect.String && f.v.Len() > maxStringBytes {
		return fmt.Errorf("a value of %d bytes: at most %d", f.v.Len(), maxStringBytes)
	}
	tag, ok := f.f.Tag.Lookup("range")
	if !ok {
		return nil
	}
	dur := f.v.Type() == durationType
	b, err := parseRange(tag, dur)
	if err != nil {
		return err // a programming error, caught by the tests that walk every key
	}
	var x float64
	switch {
	case f.v.CanInt():
		x = float64(f.v.Int())
	case f.v.CanFloat():
		x = f.v.Float()
	default:
		return fmt.Errorf("range tag on a %s", f.v.Kind())
	}
	switch {
	case math.IsNaN(x):
		return fmt.Errorf("must be a number, got NaN")
	case b.loOpen && x <= b.lo:
		return fmt.Errorf("must be more than %s, got %s", b.format(b.lo), b.format(x))
	case !b.loOpen && x < b.lo:
		return fmt.Errorf("must be at least %s, got %s", b.format(b.lo), b.format(x))
	case b.hiOpen && x >= b.hi:
		return fmt.Errorf("must be less than %s, got %s", b.format(b.hi), b.format(x))
	case !b.hiOpen && x > b.hi:
		return fmt.Errorf("must be at most %s, got %s", b.format(b.hi), b.format(x))
	}
	return nil
}

// Set assigns one key from a string, as flags and CULPRIT_* variables do.
func (c *Config) Set(key, value string) error {
	f, ok := c.keys()[key]
	if !ok {
		return &ConfigError{Key: key, Err: errors.New("unknown key")}
	}
	if err := f.setString(value); err != nil {
		return &ConfigError{Key: key, Err: err}
	}
	return nil
}

// EnvName is the environment variable that overrides key.
func EnvName(key string) string {
	return "CULPRIT_" + strings.ToUpper(strings.ReplaceAll(key, ".", "_"))
}

// envNotKeys are CULPRIT_* variables that are not agent.conf keys: the
// CLI's token, and the test harness's own.
var envNotKeys = []string{"CULPRIT_TOKEN", "CULPRIT_SOAK", "CULPRIT_TEST"}

// ApplyEnv applies every CULPRIT_* variable that names a key; environ is
// os.Environ() in the agent. A CULPRIT_* variable that names no key is an
// error, as a misspelt key in the file is.
func (c *Config) ApplyEnv(environ []string) error {
	byEnv := map[string]string{}
	for k := range c.keys() {
		byEnv[EnvName(k)] = k
	}
	for _, kv := range environ {
		name, value, _ := strings.Cut(kv, "=")
		if !strings.HasPrefix(name, "CULPRIT_") {
			continue
		}
		key, ok := byEnv[name]
		if !ok {
			if slices.ContainsFunc(envNotKeys, func(p string) bool { return strings.HasPrefix(name, p) }) {
				continue
			}
			return &ConfigError{File: "environment " + name, Err: fmt.Errorf("names no agent.conf key (see agent.conf; CULPRIT_RULES_ACCEPT_OVERFLOW_WINDOW is rules.accept_overflow.window)")}
		}
		if err := c.Set(key, value); err != nil {
			var ce *ConfigError
			if errors.As(err, &ce) {
				ce.File = "environment " + name
			}
			return err
		}
	}
	return nil
}
