package main

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"os"
	"reflect"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/pelletier/go-toml/v2"

	"github.com/culprit-dev/culprit/rules"
)

// Duration is a time.Duration written as "250ms" in agent.conf.
type Duration time.Duration

func (d *Duration) UnmarshalText(b []byte) error {
	v, err := time.ParseDuration(string(b))
	if err != nil {
		return fmt.Errorf("want a duration like 500ms or 10s: %w", err)
	}
	*d = Duration(v)
	return nil
}

func (d Duration) MarshalText() ([]byte, error) { return []byte(time.Duration(d).String()), nil }

// D returns the standard type.
func (d Duration) D() time.Duration { return time.Duration(d) }

// Config mirrors agent.conf; the file at the repository root documents every
// key with its default, and a test keeps the two in step.
type Config struct {
	Agent struct {
		HTTPAddr        string   `toml:"http_addr"`
		GRPCAddr        string   `toml:"grpc_addr"`
		LogLevel        string   `toml:"log_level"`
		LogFormat       string   `toml:"log_format"`
		AllowNonLocal   bool     `toml:"allow_non_local"`
		TLSCertFile     string   `toml:"tls_cert_file"`
		TLSKeyFile      string   `toml:"tls_key_file"`
		TLSClientCAFile string   `toml:"tls_client_ca_file"`
		TokenFile       string   `toml:"token_file"`
		GRPCMaxMessage  int      `toml:"grpc_max_message_bytes"`
		GRPCKeepalive   Duration `toml:"grpc_keepalive"`
		ShutdownTimeout Duration `toml:"shutdown_timeout"`
	} `toml:"agent"`
	Target struct {
		PID            int      `toml:"pid"`
		Port           int      `toml:"port"`
		Cmd            string   `toml:"cmd"`
		RefindInterval Duration `toml:"refind_interval"`
	} `toml:"target"`
	Collect struct {
		Interval     Duration `toml:"interval"`
		FastInterval Duration `toml:"fast_interval"`
		ProcRoot     string   `toml:"proc_root"`
		SysRoot      string   `toml:"sys_root"`
		Disabled     []string `toml:"disabled"`
		MaxThreads   int      `toml:"max_threads"`
	} `toml:"collect"`
	Probes struct {
		Enabled         bool     `toml:"enabled"`
		PollInterval    Duration `toml:"poll_interval"`
		MaxEntries      int      `toml:"max_entries"`
		RingBufferBytes int      `toml:"ring_buffer_bytes"`
		MaxConnEvents   int      `toml:"max_conn_events"`
	} `toml:"probes"`
	Sched struct {
		MinBlock    Duration `toml:"min_block"`
		BusyAfter   Duration `toml:"busy_after"`
		BusyGap     Duration `toml:"busy_gap"`
		MaxThreads  int      `toml:"max_threads"`
		MaxStacks   int      `toml:"max_stacks"`
		MaxEpisodes int      `toml:"max_episodes"`
	} `toml:"sched"`
	Profiling struct {
		Enabled       bool     `toml:"enabled"`
		Frequency     int      `toml:"frequency"`
		MaxStacks     int      `toml:"max_stacks"`
		DrainInterval Duration `toml:"drain_interval"`
		MaxSamples    int      `toml:"max_samples"`
		MaxCapture    Duration `toml:"max_capture"`
	} `toml:"profiling"`
	Traces struct {
		Enabled         bool   `toml:"enabled"`
		GRPCAddr        string `toml:"grpc_addr"`
		HTTPAddr        string `toml:"http_addr"`
		MaxRequestBytes int    `toml:"max_request_bytes"`
		MaxSpans        int    `toml:"max_spans"`
		ForwardEndpoint string `toml:"forward_endpoint"`
		ForwardQueue    int    `toml:"forward_queue"`
	} `toml:"traces"`
	Signals struct {
		RingSize  int `toml:"ring_size"`
		MaxSeries int `toml:"max_series"`
	} `toml:"signals"`
	Rules struct {
		Interval          Duration `toml:"interval"`
		MinGap            Duration `toml:"min_gap"`
		ResolveAfter      Duration `toml:"resolve_after"`
		MinUpdateInterval Duration `toml:"min_update_interval"`
		MaxOpenFindings   int      `toml:"max_open_findings"`
		AcceptOverflow    struct {
			Window     Duration `toml:"window"`
			Recent     Duration `toml:"recent"`
			StallAfter Duration `toml:"stall_after"`
			MinDrops   int      `toml:"min_drops"`
		} `toml:"accept_overflow"`
		FDExhaustion struct {
			Window      Duration `toml:"window"`
			NearRatio   float64  `toml:"near_ratio"`
			MinIncrease int      `toml:"min_increase"`
			Steady      float64  `toml:"steady"`
			Horizon     Duration `toml:"horizon"`
		} `toml:"fd_exhaustion"`
		RSSWithoutHeap struct {
			Window      Duration `toml:"window"`
			MinGapBytes int64    `toml:"min_gap_bytes"`
			MinRatio    float64  `toml:"min_ratio"`
		} `toml:"rss_without_heap"`
		HeapLeak struct {
			Window         Duration `toml:"window"`
			MinGrowthBytes int64    `toml:"min_growth_bytes"`
			Steady         float64  `toml:"steady"`
			TopSites       int      `toml:"top_sites"`
		} `toml:"heap_leak"`
		OOMAhead struct {
			NearRatio float64  `toml:"near_ratio"`
			Window    Duration `toml:"window"`
		} `toml:"oom_ahead"`
		Workers struct {
			Threads      string   `toml:"threads"`
			IdleSyscalls []string `toml:"idle_syscalls"`
		} `toml:"workers"`
		BlockingWorker struct {
			Window   Duration `toml:"window"`
			MinBlock Duration `toml:"min_block"`
		} `toml:"blocking_worker"`
		BusyWorker struct {
			Window    Duration `toml:"window"`
			MinBusy   Duration `toml:"min_busy"`
			TopFrames int      `toml:"top_frames"`
		} `toml:"busy_worker"`
		WorkerImbalance struct {
			Window       Duration `toml:"window"`
			MinBusyCores float64  `toml:"min_busy_cores"`
			MinRatio     float64  `toml:"min_ratio"`
		} `toml:"worker_imbalance"`
		ThroughputPlateau struct {
			Window       Duration `toml:"window"`
			MinQueued    float64  `toml:"min_queued"`
			MaxBusyCores float64  `toml:"max_busy_cores"`
		} `toml:"throughput_plateau"`
		CloseWait struct {
			Window      Duration `toml:"window"`
			MinIncrease int      `toml:"min_increase"`
			Steady      float64  `toml:"steady"`
			MinCount    int      `toml:"min_count"`
			MinAge      Duration `toml:"min_age"`
		} `toml:"close_wait"`
		PortExhaustion struct {
			Window    Duration `toml:"window"`
			NearRatio float64  `toml:"near_ratio"`
			Horizon   Duration `toml:"horizon"`
			MinCount  int      `toml:"min_count"`
		} `toml:"port_exhaustion"`
		RSTStorm struct {
			Recent  Duration `toml:"recent"`
			MinRate float64  `toml:"min_rate"`
		} `toml:"rst_storm"`
		PoolExhaustion struct {
			Window   Duration `toml:"window"`
			MinConns int      `toml:"min_conns"`
			MinQueue float64  `toml:"min_queue"`
		} `toml:"pool_exhaustion"`
		StalledShutdown struct {
			Grace    Duration `toml:"grace"`
			Fraction float64  `toml:"fraction"`
		} `toml:"stalled_shutdown"`
		LatencySpike struct {
			Recent     Duration `toml:"recent"`
			Window     Duration `toml:"window"`
			Ratio      float64  `toml:"ratio"`
			MinLatency Duration `toml:"min_latency"`
			MinSpans   int      `toml:"min_spans"`
		} `toml:"latency_spike"`
		SYNBacklog struct {
			Recent     Duration `toml:"recent"`
			MinDrops   int      `toml:"min_drops"`
			MinSources int      `toml:"min_sources"`
		} `toml:"syn_backlog"`
		IdleTimeout struct {
			Window    Duration `toml:"window"`
			MinCloses int      `toml:"min_closes"`
			Tolerance float64  `toml:"tolerance"`
			MinShare  float64  `toml:"min_share"`
			MinIdle   Duration `toml:"min_idle"`
		} `toml:"idle_timeout"`
		CPUThrottling struct {
			Window              Duration `toml:"window"`
			MinThrottledRatio   float64  `toml:"min_throttled_ratio"`
			MinThrottledPeriods int      `toml:"min_throttled_periods"`
		} `toml:"cpu_throttling"`
	} `toml:"rules"`
	Pprof struct {
		HeapURL  string   `toml:"heap_url"`
		Interval Duration `toml:"interval"`
		Timeout  Duration `toml:"timeout"`
		MaxBytes int64    `toml:"max_bytes"`
		Keep     int      `toml:"keep"`
	} `toml:"pprof"`
	Findings struct {
		History  int `toml:"history"`
		MaxBatch int `toml:"max_batch"`
	} `toml:"findings"`
}

// DefaultConfig is what the agent runs with when agent.conf says nothing.
func DefaultConfig() Config {
	var c Config
	c.Agent.HTTPAddr = "127.0.0.1:9461"
	c.Agent.GRPCAddr = "127.0.0.1:9462"
	c.Agent.LogLevel = "info"
	c.Agent.LogFormat = "text"
	c.Agent.ShutdownTimeout = Duration(5 * time.Second)
	c.Agent.GRPCMaxMessage = 4 << 20
	c.Agent.GRPCKeepalive = Duration(30 * time.Second)
	c.Target.RefindInterval = Duration(500 * time.Millisecond)
	c.Collect.Interval = Duration(time.Second)
	c.Collect.FastInterval = Duration(100 * time.Millisecond)
	c.Collect.ProcRoot = "/proc"
	c.Collect.SysRoot = "/sys"
	c.Collect.Disabled = []string{}
	c.Collect.MaxThreads = 4096
	c.Probes.Enabled = true
	c.Probes.PollInterval = Duration(100 * time.Millisecond)
	c.Probes.MaxEntries = 4096
	c.Probes.RingBufferBytes = 65536
	c.Probes.MaxConnEvents = 8192
	c.Sched.MinBlock = Duration(100 * time.Millisecond)
	c.Sched.BusyAfter = Duration(200 * time.Millisecond)
	c.Sched.BusyGap = Duration(time.Millisecond)
	c.Sched.MaxThreads = 4096
	c.Sched.MaxStacks = 8192
	c.Sched.MaxEpisodes = 1024
	c.Profiling.Enabled = true
	c.Profiling.Frequency = 49
	c.Profiling.MaxStacks = 8192
	c.Profiling.DrainInterval = Duration(time.Second)
	c.Profiling.MaxSamples = 65536
	c.Profiling.MaxCapture = Duration(time.Minute)
	c.Rules.Workers.Threads = rules.DefaultWorkerThreads
	c.Rules.Workers.IdleSyscalls = slices.Clone(rules.DefaultIdleSyscalls)
	c.Rules.BlockingWorker.Window = Duration(10 * time.Second)
	c.Rules.BlockingWorker.MinBlock = Duration(250 * time.Millisecond)
	c.Rules.BusyWorker.Window = Duration(10 * time.Second)
	c.Rules.BusyWorker.MinBusy = Duration(500 * time.Millisecond)
	c.Rules.BusyWorker.TopFrames = 5
	c.Rules.WorkerImbalance.Window = Duration(10 * time.Second)
	c.Rules.WorkerImbalance.MinBusyCores = 0.5
	c.Rules.WorkerImbalance.MinRatio = 4
	c.Rules.ThroughputPlateau.Window = Duration(10 * time.Second)
	c.Rules.ThroughputPlateau.MinQueued = 0.8
	c.Rules.ThroughputPlateau.MaxBusyCores = 0.5
	c.Rules.CloseWait.Window = Duration(time.Minute)
	c.Rules.CloseWait.MinIncrease = 20
	c.Rules.CloseWait.Steady = 0.8
	c.Rules.CloseWait.MinCount = 50
	c.Rules.CloseWait.MinAge = Duration(5 * time.Minute)
	c.Rules.PortExhaustion.Window = Duration(30 * time.Second)
	c.Rules.PortExhaustion.NearRatio = 0.5
	c.Rules.PortExhaustion.Horizon = Duration(5 * time.Minute)
	c.Rules.PortExhaustion.MinCount = 100
	c.Rules.RSTStorm.Recent = Duration(5 * time.Second)
	c.Rules.RSTStorm.MinRate = 50
	c.Rules.PoolExhaustion.Window = Duration(10 * time.Second)
	c.Rules.PoolExhaustion.MinConns = 2
	c.Rules.PoolExhaustion.MinQueue = 0.5
	c.Rules.StalledShutdown.Grace = Duration(30 * time.Second)
	c.Rules.StalledShutdown.Fraction = 0.5
	c.Rules.LatencySpike.Recent = Duration(10 * time.Second)
	c.Rules.LatencySpike.Window = Duration(5 * time.Minute)
	c.Rules.LatencySpike.Ratio = 3
	c.Rules.LatencySpike.MinLatency = Duration(200 * time.Millisecond)
	c.Rules.LatencySpike.MinSpans = 10
	c.Rules.SYNBacklog.Recent = Duration(5 * time.Second)
	c.Rules.SYNBacklog.MinDrops = 10
	c.Rules.SYNBacklog.MinSources = 20
	c.Rules.IdleTimeout.Window = Duration(5 * time.Minute)
	c.Rules.IdleTimeout.MinCloses = 10
	c.Rules.IdleTimeout.Tolerance = 0.1
	c.Rules.IdleTimeout.MinShare = 0.8
	c.Rules.IdleTimeout.MinIdle = Duration(time.Second)
	c.Rules.CPUThrottling.Window = Duration(rules.DefaultCPUThrottlingWindow)
	c.Rules.CPUThrottling.MinThrottledRatio = rules.DefaultCPUMinThrottledRatio
	c.Rules.CPUThrottling.MinThrottledPeriods = rules.DefaultCPUMinThrottledPeriods
	c.Traces.Enabled = true
	c.Traces.GRPCAddr = "127.0.0.1:4317"
	c.Traces.HTTPAddr = "127.0.0.1:4318"
	c.Traces.MaxRequestBytes = 4 << 20
	c.Traces.MaxSpans = 65536
	c.Traces.ForwardQueue = 64
	c.Signals.RingSize = 600
	c.Signals.MaxSeries = 20000
	c.Rules.Interval = Duration(200 * time.Millisecond)
	c.Rules.MinGap = Duration(50 * time.Millisecond)
	c.Rules.ResolveAfter = Duration(3 * time.Second)
	c.Rules.MinUpdateInterval = Duration(time.Second)
	c.Rules.MaxOpenFindings = 256
	c.Rules.AcceptOverflow.Window = Duration(10 * time.Second)
	c.Rules.AcceptOverflow.Recent = Duration(2 * time.Second)
	c.Rules.AcceptOverflow.StallAfter = Duration(300 * time.Millisecond)
	c.Rules.AcceptOverflow.MinDrops = 1
	c.Rules.FDExhaustion.Window = Duration(time.Minute)
	c.Rules.FDExhaustion.NearRatio = 0.8
	c.Rules.FDExhaustion.MinIncrease = 20
	c.Rules.FDExhaustion.Steady = 0.8
	c.Rules.FDExhaustion.Horizon = Duration(time.Hour)
	c.Rules.RSSWithoutHeap.Window = Duration(time.Minute)
	c.Rules.RSSWithoutHeap.MinGapBytes = 256 << 20
	c.Rules.RSSWithoutHeap.MinRatio = 0.5
	c.Rules.HeapLeak.Window = Duration(2 * time.Minute)
	c.Rules.HeapLeak.MinGrowthBytes = 32 << 20
	c.Rules.HeapLeak.Steady = 0.7
	c.Rules.HeapLeak.TopSites = 5
	c.Rules.OOMAhead.NearRatio = 0.9
	c.Rules.OOMAhead.Window = Duration(5 * time.Minute)
	c.Pprof.HeapURL = ""
	c.Pprof.Interval = Duration(10 * time.Second)
	c.Pprof.Timeout = Duration(5 * time.Second)
	c.Pprof.MaxBytes = 32 << 20
	c.Pprof.Keep = 8
	c.Findings.History = 4096
	c.Findings.MaxBatch = 256
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

// ParseConfig reads agent.conf content over the defaults. Unknown keys are
// errors: a misspelt key silently ignored is a setting the user thinks they
// made.
func ParseConfig(name string, data []byte) (Config, error) {
	c := DefaultConfig()
	dec := toml.NewDecoder(bytes.NewReader(data))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&c); err != nil {
		var strict *toml.StrictMissingError
		if errors.As(err, &strict) && len(strict.Errors) > 0 {
			de := strict.Errors[0]
			row, _ := de.Position()
			return c, &ConfigError{File: name, Line: row, Key: strings.Join(de.Key(), "."), Err: errors.New("unknown key")}
		}
		var de *toml.DecodeError
		if errors.As(err, &de) {
			row, _ := de.Position()
			return c, &ConfigError{File: name, Line: row, Key: strings.Join(de.Key(), "."), Err: errors.New(decodeMessage(de))}
		}
		return c, &ConfigError{File: name, Err: err}
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

// LoadConfig reads a file; an empty path means the defaults.
func LoadConfig(path string) (Config, error) {
	if path == "" {
		c := DefaultConfig()
		return c, c.Validate()
	}
	data, err := os.ReadFile(path)
	if err != nil {
		return DefaultConfig(), fmt.Errorf("read config: %w", err)
	}
	return ParseConfig(path, data)
}

// Validate checks values the types cannot.
func (c *Config) Validate() error {
	bad := func(key, format string, a ...any) error {
		return &ConfigError{Key: key, Err: fmt.Errorf(format, a...)}
	}
	positive := []struct {
		key string
		v   time.Duration
	}{
		{"target.refind_interval", c.Target.RefindInterval.D()},
		{"agent.grpc_keepalive", c.Agent.GRPCKeepalive.D()},
		{"collect.interval", c.Collect.Interval.D()},
		{"collect.fast_interval", c.Collect.FastInterval.D()},
		{"probes.poll_interval", c.Probes.PollInterval.D()},
		{"sched.min_block", c.Sched.MinBlock.D()},
		{"sched.busy_after", c.Sched.BusyAfter.D()},
		{"sched.busy_gap", c.Sched.BusyGap.D()},
		{"profiling.drain_interval", c.Profiling.DrainInterval.D()},
		{"profiling.max_capture", c.Profiling.MaxCapture.D()},
		{"rules.blocking_worker.window", c.Rules.BlockingWorker.Window.D()},
		{"rules.blocking_worker.min_block", c.Rules.BlockingWorker.MinBlock.D()},
		{"rules.busy_worker.window", c.Rules.BusyWorker.Window.D()},
		{"rules.busy_worker.min_busy", c.Rules.BusyWorker.MinBusy.D()},
		{"rules.worker_imbalance.window", c.Rules.WorkerImbalance.Window.D()},
		{"rules.cpu_throttling.window", c.Rules.CPUThrottling.Window.D()},
		{"rules.throughput_plateau.window", c.Rules.ThroughputPlateau.Window.D()},
		{"rules.close_wait.window", c.Rules.CloseWait.Window.D()},
		{"rules.close_wait.min_age", c.Rules.CloseWait.MinAge.D()},
		{"rules.port_exhaustion.window", c.Rules.PortExhaustion.Window.D()},
		{"rules.port_exhaustion.horizon", c.Rules.PortExhaustion.Horizon.D()},
		{"rules.rst_storm.recent", c.Rules.RSTStorm.Recent.D()},
		{"rules.pool_exhaustion.window", c.Rules.PoolExhaustion.Window.D()},
		{"rules.idle_timeout.window", c.Rules.IdleTimeout.Window.D()},
		{"rules.syn_backlog.recent", c.Rules.SYNBacklog.Recent.D()},
		{"rules.latency_spike.recent", c.Rules.LatencySpike.Recent.D()},
		{"rules.stalled_shutdown.grace", c.Rules.StalledShutdown.Grace.D()},
		{"rules.latency_spike.window", c.Rules.LatencySpike.Window.D()},
		{"rules.latency_spike.min_latency", c.Rules.LatencySpike.MinLatency.D()},
		{"rules.idle_timeout.min_idle", c.Rules.IdleTimeout.MinIdle.D()},
		{"rules.interval", c.Rules.Interval.D()},
		{"rules.resolve_after", c.Rules.ResolveAfter.D()},
		{"rules.accept_overflow.window", c.Rules.AcceptOverflow.Window.D()},
		{"rules.accept_overflow.recent", c.Rules.AcceptOverflow.Recent.D()},
		{"rules.accept_overflow.stall_after", c.Rules.AcceptOverflow.StallAfter.D()},
		{"rules.fd_exhaustion.window", c.Rules.FDExhaustion.Window.D()},
		{"rules.fd_exhaustion.horizon", c.Rules.FDExhaustion.Horizon.D()},
		{"rules.rss_without_heap.window", c.Rules.RSSWithoutHeap.Window.D()},
		{"rules.heap_leak.window", c.Rules.HeapLeak.Window.D()},
		{"rules.oom_ahead.window", c.Rules.OOMAhead.Window.D()},
		{"pprof.interval", c.Pprof.Interval.D()},
		{"pprof.timeout", c.Pprof.Timeout.D()},
	}
	for _, p := range positive {
		if p.v <= 0 {
			return bad(p.key, "must be a positive duration, got %s", p.v)
		}
	}
	counts := []struct {
		key    string
		v, min int
	}{
		{"probes.max_entries", c.Probes.MaxEntries, 16},
		{"collect.max_threads", c.Collect.MaxThreads, 1},
		{"signals.ring_size", c.Signals.RingSize, 16},
		{"signals.max_series", c.Signals.MaxSeries, 64},
		{"rules.max_open_findings", c.Rules.MaxOpenFindings, 1},
		{"rules.accept_overflow.min_drops", c.Rules.AcceptOverflow.MinDrops, 1},
		{"findings.history", c.Findings.History, 16},
		{"findings.max_batch", c.Findings.MaxBatch, 1},
		{"rules.fd_exhaustion.min_increase", c.Rules.FDExhaustion.MinIncrease, 1},
		{"rules.heap_leak.top_sites", c.Rules.HeapLeak.TopSites, 1},
		{"pprof.keep", c.Pprof.Keep, 2},
		{"sched.max_threads", c.Sched.MaxThreads, 16},
		{"sched.max_stacks", c.Sched.MaxStacks, 64},
		{"sched.max_episodes", c.Sched.MaxEpisodes, 16},
		{"profiling.frequency", c.Profiling.Frequency, 1},
		{"profiling.max_stacks", c.Profiling.MaxStacks, 64},
		{"profiling.max_samples", c.Profiling.MaxSamples, 64},
		{"rules.busy_worker.top_frames", c.Rules.BusyWorker.TopFrames, 1},
		{"rules.cpu_throttling.min_throttled_periods", c.Rules.CPUThrottling.MinThrottledPeriods, 1},
		{"rules.close_wait.min_increase", c.Rules.CloseWait.MinIncrease, 1},
		{"rules.close_wait.min_count", c.Rules.CloseWait.MinCount, 1},
		{"rules.port_exhaustion.min_count", c.Rules.PortExhaustion.MinCount, 1},
		{"rules.pool_exhaustion.min_conns", c.Rules.PoolExhaustion.MinConns, 1},
		{"rules.idle_timeout.min_closes", c.Rules.IdleTimeout.MinCloses, 2},
		{"rules.syn_backlog.min_drops", c.Rules.SYNBacklog.MinDrops, 1},
		{"rules.latency_spike.min_spans", c.Rules.LatencySpike.MinSpans, 1},
		{"traces.max_request_bytes", c.Traces.MaxRequestBytes, 1024},
		{"agent.grpc_max_message_bytes", c.Agent.GRPCMaxMessage, 64 << 10},
		{"traces.max_spans", c.Traces.MaxSpans, 64},
		{"traces.forward_queue", c.Traces.ForwardQueue, 1},
		{"rules.syn_backlog.min_sources", c.Rules.SYNBacklog.MinSources, 2},
		{"probes.max_conn_events", c.Probes.MaxConnEvents, 16},
	}
	for _, r := range []struct {
		key string
		v   float64
	}{
		{"rules.fd_exhaustion.near_ratio", c.Rules.FDExhaustion.NearRatio},
		{"rules.fd_exhaustion.steady", c.Rules.FDExhaustion.Steady},
		{"rules.rss_without_heap.min_ratio", c.Rules.RSSWithoutHeap.MinRatio},
		{"rules.heap_leak.steady", c.Rules.HeapLeak.Steady},
		{"rules.oom_ahead.near_ratio", c.Rules.OOMAhead.NearRatio},
		{"rules.cpu_throttling.min_throttled_ratio", c.Rules.CPUThrottling.MinThrottledRatio},
		{"rules.throughput_plateau.min_queued", c.Rules.ThroughputPlateau.MinQueued},
		{"rules.close_wait.steady", c.Rules.CloseWait.Steady},
		{"rules.port_exhaustion.near_ratio", c.Rules.PortExhaustion.NearRatio},
		{"rules.pool_exhaustion.min_queue", c.Rules.PoolExhaustion.MinQueue},
		{"rules.idle_timeout.tolerance", c.Rules.IdleTimeout.Tolerance},
		{"rules.stalled_shutdown.fraction", c.Rules.StalledShutdown.Fraction},
		{"rules.idle_timeout.min_share", c.Rules.IdleTimeout.MinShare},
	} {
		if r.v <= 0 || r.v > 1 {
			return bad(r.key, "must be a ratio in (0, 1], got %g", r.v)
		}
	}
	for _, b := range []struct {
		key string
		v   int64
	}{
		{"rules.rss_without_heap.min_gap_bytes", c.Rules.RSSWithoutHeap.MinGapBytes},
		{"rules.heap_leak.min_growth_bytes", c.Rules.HeapLeak.MinGrowthBytes},
		{"pprof.max_bytes", c.Pprof.MaxBytes},
	} {
		if b.v < 1 {
			return bad(b.key, "must be a positive number of bytes, got %d", b.v)
		}
	}
	if c.Profiling.Frequency > 1000 {
		return bad("profiling.frequency", "must be at most 1000 samples per second per CPU, got %d", c.Profiling.Frequency)
	}
	if _, err := regexp.Compile(c.Rules.Workers.Threads); err != nil {
		return bad("rules.workers.threads", "not a regular expression: %w", err)
	}
	if c.Rules.LatencySpike.Ratio < 1 {
		return bad("rules.latency_spike.ratio", "must be at least 1, got %g", c.Rules.LatencySpike.Ratio)
	}
	if c.Rules.LatencySpike.Window.D() <= c.Rules.LatencySpike.Recent.D() {
		return bad("rules.latency_spike.window", "must be longer than rules.latency_spike.recent")
	}
	if c.Rules.RSTStorm.MinRate <= 0 {
		return bad("rules.rst_storm.min_rate", "must be positive, got %g", c.Rules.RSTStorm.MinRate)
	}
	if c.Rules.ThroughputPlateau.MaxBusyCores <= 0 {
		return bad("rules.throughput_plateau.max_busy_cores", "must be positive, got %g", c.Rules.ThroughputPlateau.MaxBusyCores)
	}
	if c.Rules.WorkerImbalance.MinBusyCores <= 0 {
		return bad("rules.worker_imbalance.min_busy_cores", "must be positive, got %g", c.Rules.WorkerImbalance.MinBusyCores)
	}
	if c.Rules.WorkerImbalance.MinRatio < 1 {
		return bad("rules.worker_imbalance.min_ratio", "must be at least 1, got %g", c.Rules.WorkerImbalance.MinRatio)
	}
	if u := c.Pprof.HeapURL; u != "" && !strings.HasPrefix(u, "http://") && !strings.HasPrefix(u, "https://") {
		return bad("pprof.heap_url", "must be an http:// or https:// URL, got %q", u)
	}
	for _, n := range counts {
		if n.v < n.min {
			return bad(n.key, "must be at least %d, got %d", n.min, n.v)
		}
	}
	if rb := c.Probes.RingBufferBytes; rb < 4096 || rb&(rb-1) != 0 {
		return bad("probes.ring_buffer_bytes", "must be a power of two of at least 4096, got %d", rb)
	}
	if c.Rules.AcceptOverflow.Window.D() < c.Rules.AcceptOverflow.Recent.D() {
		return bad("rules.accept_overflow.window", "must not be shorter than rules.accept_overflow.recent")
	}
	// The ring must hold a whole rule window of fast samples, or the rule
	// would judge a 10 s window on the last second.
	if need := int(c.Rules.AcceptOverflow.Window.D()/c.Collect.FastInterval.D()) + 1; c.Signals.RingSize < need {
		return bad("signals.ring_size", "must hold rules.accept_overflow.window of collect.fast_interval samples: at least %d, got %d", need, c.Signals.RingSize)
	}
	switch c.Agent.LogLevel {
	case "debug", "info", "warn", "error":
	default:
		return bad("agent.log_level", "must be debug, info, warn or error, got %q", c.Agent.LogLevel)
	}
	switch c.Agent.LogFormat {
	case "text", "json":
	default:
		return bad("agent.log_format", "must be text or json, got %q", c.Agent.LogFormat)
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
	if c.Target.Port < 0 || c.Target.Port > 65535 {
		return bad("target.port", "must be 1-65535, got %d", c.Target.Port)
	}
	return nil
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

// Keys lists every dotted key of the config with a pointer to its field, for
// environment and flag overrides.
func (c *Config) Keys() map[string]reflect.Value {
	out := map[string]reflect.Value{}
	var walk func(prefix string, v reflect.Value)
	walk = func(prefix string, v reflect.Value) {
		t := v.Type()
		for i := 0; i < t.NumField(); i++ {
			name, _, _ := strings.Cut(t.Field(i).Tag.Get("toml"), ",")
			key := name
			if prefix != "" {
				key = prefix + "." + name
			}
			f := v.Field(i)
			if f.Kind() == reflect.Struct && f.Type() != reflect.TypeOf(Duration(0)) {
				walk(key, f)
				continue
			}
			out[key] = f
		}
	}
	walk("", reflect.ValueOf(c).Elem())
	return out
}

// Set assigns one key from a string, as flags and CULPRIT_* variables do.
func (c *Config) Set(key, value string) error {
	f, ok := c.Keys()[key]
	if !ok {
		return &ConfigError{Key: key, Err: errors.New("unknown key")}
	}
	bad := func(err error) error { return &ConfigError{Key: key, Err: err} }
	switch p := f.Addr().Interface().(type) {
	case *string:
		*p = value
	case *int:
		n, err := strconv.Atoi(value)
		if err != nil {
			return bad(fmt.Errorf("want an integer, got %q", value))
		}
		*p = n
	case *float64:
		f, err := strconv.ParseFloat(value, 64)
		if err != nil {
			return bad(fmt.Errorf("want a number, got %q", value))
		}
		*p = f
	case *int64:
		n, err := strconv.ParseInt(value, 10, 64)
		if err != nil {
			return bad(fmt.Errorf("want an integer, got %q", value))
		}
		*p = n
	case *bool:
		b, err := strconv.ParseBool(value)
		if err != nil {
			return bad(fmt.Errorf("want true or false, got %q", value))
		}
		*p = b
	case *Duration:
		if err := p.UnmarshalText([]byte(value)); err != nil {
			return bad(err)
		}
	case *[]string:
		*p = nil
		for _, s := range strings.Split(value, ",") {
			if s = strings.TrimSpace(s); s != "" {
				*p = append(*p, s)
			}
		}
	default:
		return bad(fmt.Errorf("cannot be set from text"))
	}
	return nil
}

// EnvName is the environment variable that overrides key.
func EnvName(key string) string {
	return "CULPRIT_" + strings.ToUpper(strings.ReplaceAll(key, ".", "_"))
}

// ApplyEnv applies every CULPRIT_* variable that names a key; environ is
// os.Environ() in the agent.
func (c *Config) ApplyEnv(environ []string) error {
	byEnv := map[string]string{}
	for k := range c.Keys() {
		byEnv[EnvName(k)] = k
	}
	for _, kv := range environ {
		name, value, _ := strings.Cut(kv, "=")
		key, ok := byEnv[name]
		if !ok {
			continue
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
