package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"os"
	"strings"
)

// This file is the `culprit agent` command: flags, environment and
// agent.conf made into one Config, the logger, and the run until a signal
// ends it (with the built-in demo when no target is given).

// stringList is a repeatable flag.
type stringList []string

func (s *stringList) String() string     { return strings.Join(*s, ",") }
func (s *stringList) Set(v string) error { *s = append(*s, v); return nil }

// agentConfig turns flags, environment and file into one Config: defaults,
// then the file, then CULPRIT_* variables, then flags.
func agentConfig(args []string, environ []string, stderr io.Writer) (Config, error) {
	fs := flag.NewFlagSet("culprit agent", flag.ContinueOnError)
	fs.SetOutput(stderr)
	path := fs.String("config", "", "agent.conf to read (default: built-in defaults, which agent.conf documents)")
	pid := fs.Int("pid", 0, "watch this PID (target.pid)")
	port := fs.Int("port", 0, "watch the process listening on this port (target.port)")
	cmd := fs.String("cmd", "", "watch the oldest process whose command line matches this regexp (target.cmd)")
	httpAddr := fs.String("http-addr", "", "metrics/health listener (agent.http_addr)")
	grpcAddr := fs.String("grpc-addr", "", "gRPC listener (agent.grpc_addr)")
	logLevel := fs.String("log-level", "", "debug, info, warn, error (agent.log_level)")
	var sets stringList
	fs.Var(&sets, "set", "set any agent.conf key: --set rules.accept_overflow.window=20s (repeatable)")
	if err := fs.Parse(args); err != nil {
		return Config{}, err
	}
	if fs.NArg() > 0 {
		return Config{}, fmt.Errorf("unexpected arguments: %v", fs.Args())
	}
	cfg, err := LoadConfig(*path)
	if err != nil {
		return cfg, err
	}
	if err := cfg.ApplyEnv(environ); err != nil {
		return cfg, err
	}
	flagSets := []struct{ key, value string }{}
	fs.Visit(func(f *flag.Flag) {
		switch f.Name {
		case "pid":
			flagSets = append(flagSets, struct{ key, value string }{"target.pid", fmt.Sprint(*pid)})
		case "port":
			flagSets = append(flagSets, struct{ key, value string }{"target.port", fmt.Sprint(*port)})
		case "cmd":
			flagSets = append(flagSets, struct{ key, value string }{"target.cmd", *cmd})
		case "http-addr":
			flagSets = append(flagSets, struct{ key, value string }{"agent.http_addr", *httpAddr})
		case "grpc-addr":
			flagSets = append(flagSets, struct{ key, value string }{"agent.grpc_addr", *grpcAddr})
		case "log-level":
			flagSets = append(flagSets, struct{ key, value string }{"agent.log_level", *logLevel})
		}
	})
	for _, s := range sets {
		k, v, ok := strings.Cut(s, "=")
		if !ok {
			return cfg, fmt.Errorf("--set %q: want key=value", s)
		}
		flagSets = append(flagSets, struct{ key, value string }{strings.TrimSpace(k), v})
	}
	for _, s := range flagSets {
		if err := cfg.Set(s.key, s.value); err != nil {
			var ce *ConfigError
			if errors.As(err, &ce) {
				ce.File = "flag"
			}
			return cfg, err
		}
	}
	if err := cfg.Validate(); err != nil {
		return cfg, err
	}
	return cfg, nil
}

// newLogger logs at agent.log_level, as text or (agent.log_format =
// json) as one JSON object a line for a log pipeline.
func newLogger(cfg Config, w io.Writer) *slog.Logger {
	var lvl slog.Level
	_ = lvl.UnmarshalText([]byte(cfg.Agent.LogLevel))
	o := &slog.HandlerOptions{Level: lvl}
	if cfg.Agent.LogFormat == "json" {
		return slog.New(slog.NewJSONHandler(w, o))
	}
	return slog.New(slog.NewTextHandler(w, o))
}

// cmdAgent is `culprit agent`: it runs the agent until ctx ends (SIGINT,
// SIGTERM) and stops it within agent.shutdown_timeout. With no target
// given it watches a built-in demo, so a first run shows something.
func cmdAgent(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	cfg, err := agentConfig(args, os.Environ(), stderr)
	if err != nil {
		return err
	}
	log := newLogger(cfg, stderr)
	var demo *demoChild // the built-in demo, when no target is given
	if cfg.Target.PID == 0 && cfg.Target.Port == 0 && cfg.Target.Cmd == "" {
		demo, err = startDemoChild(ctx, log, stderr)
		if err != nil {
			return fmt.Errorf("no target given and the built-in demo did not start: %w", err)
		}
		defer demo.stop()
		cfg.Target.PID = demo.pid
		if cfg.Pprof.HeapURL == "" {
			// gc=1: Go's heap profile is as of the last collection; without
			// it a fast leak reads at a fraction of its rate.
			cfg.Pprof.HeapURL = "http://" + demoControl + "/debug/pprof/heap?gc=1"
		}
		fmt.Fprintf(stdout, "No target given: watching the built-in demo (pid %d) on http://%s.\n"+
			"Make it stop accepting and load it:  curl -s -XPOST 'http://%s/fault/stop-accepting?seconds=15&load=64'\n"+
			"Or overflow its small backlog in bursts:  curl -s -XPOST 'http://%s/fault/burst?conns=300&rounds=5'\n",
			demo.pid, demoAddr, demoControl, demoControl)
	}
	// The process's threads, for the agent's process only: a test that
	// starts agents in its own process keeps its own.
	setMaxProcs(cfg, log)
	a, err := StartAgent(ctx, cfg, log)
	if err != nil {
		return err
	}
	fmt.Fprintf(stdout, "culprit %s: metrics on http://%s/metrics, findings on %s (culprit findings --follow --addr %s)\n",
		version, a.HTTPAddr, a.GRPCAddr, a.GRPCAddr)
	// A demo that dies leaves nothing to watch: say so and fail, rather
	// than wait for a target that will not come back.
	select {
	case <-ctx.Done():
	case <-demo.exited():
	}
	log.Info("shutting down")
	stopErr := a.Stop(cfg.Agent.ShutdownTimeout)
	if err := demo.unexpectedExit(ctx); err != nil {
		return errors.Join(err, stopErr)
	}
	return stopErr
}
