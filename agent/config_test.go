package main

import (
	"errors"
	"io"
	"os"
	"reflect"
	"regexp"
	"strings"
	"testing"
	"time"
)

// agent.conf documents the defaults; if they drift apart, users read lies.
func TestAgentConfMatchesDefaults(t *testing.T) {
	data, err := os.ReadFile("../agent.conf")
	if err != nil {
		t.Fatal(err)
	}
	got, err := ParseConfig("agent.conf", data)
	if err != nil {
		t.Fatalf("agent.conf does not parse: %v", err)
	}
	if want := DefaultConfig(); !reflect.DeepEqual(got, want) {
		t.Fatalf("agent.conf differs from DefaultConfig():\n got %+v\nwant %+v", got, want)
	}
	// Every key is in the file, with a comment above it.
	lines := strings.Split(string(data), "\n")
	def := DefaultConfig()
	for key := range def.Keys() {
		n := lineOfKey(data, key)
		if n == 0 {
			t.Errorf("key %s is not documented in agent.conf", key)
			continue
		}
		if prev := strings.TrimSpace(lines[n-2]); !strings.HasPrefix(prev, "#") && !strings.Contains(lines[n-1], "#") {
			// Keys grouped under one comment (pid, port, cmd) are fine
			// when the group has one.
			j := n - 2
			for j >= 0 && regexp.MustCompile(`^\w+ = `).MatchString(lines[j]) {
				j--
			}
			if j < 0 || !strings.HasPrefix(strings.TrimSpace(lines[j]), "#") {
				t.Errorf("key %s (line %d) has no comment", key, n)
			}
		}
	}
}

func TestConfigErrorsNameKeyAndLine(t *testing.T) {
	cases := []struct {
		name, conf, want string
	}{
		{"unknown key", "[agent]\nhttp_addr = \"127.0.0.1:1\"\nhttp_adr = \"x\"\n", "bad.conf:3: agent.http_adr: unknown key"},
		{"bad duration", "[rules.accept_overflow]\n\nwindow = \"ten seconds\"\n", "bad.conf:3: rules.accept_overflow.window"},
		{"wrong type", "[signals]\nring_size = \"big\"\n", "bad.conf:2: signals.ring_size"},
		{"out of range", "[signals]\nmax_series = 3\n", "bad.conf:2: signals.max_series: must be at least 64, got 3"},
		{"not power of two", "[probes]\nring_buffer_bytes = 5000\n", "bad.conf:2: probes.ring_buffer_bytes"},
		{"two targets", "[target]\npid = 1\nport = 80\n", "bad.conf:1: target: set only one"},
		{"ring too small for window", "[signals]\nring_size = 20\n", "bad.conf:2: signals.ring_size: must hold"},
		{"syntax", "[agent\n", "bad.conf:1"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			_, err := ParseConfig("bad.conf", []byte(c.conf))
			if err == nil {
				t.Fatal("accepted")
			}
			var ce *ConfigError
			if !errors.As(err, &ce) {
				t.Fatalf("error %v is not a ConfigError", err)
			}
			if !strings.HasPrefix(err.Error(), c.want) {
				t.Fatalf("error %q, want prefix %q", err, c.want)
			}
		})
	}
}

func TestConfigPrecedence(t *testing.T) {
	f, err := os.CreateTemp(t.TempDir(), "agent.conf")
	if err != nil {
		t.Fatal(err)
	}
	f.WriteString("[agent]\ngrpc_addr = \"127.0.0.1:7001\"\nhttp_addr = \"127.0.0.1:7002\"\n[rules.accept_overflow]\nwindow = \"20s\"\n")
	f.Close()
	env := []string{"CULPRIT_AGENT_GRPC_ADDR=127.0.0.1:7101", "CULPRIT_RULES_ACCEPT_OVERFLOW_STALL_AFTER=1s", "UNRELATED=1"}
	cfg, err := agentConfig([]string{"--config", f.Name(), "--grpc-addr", "127.0.0.1:7201", "--set", "findings.history=99", "--port", "8080"}, env, io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	if cfg.Agent.GRPCAddr != "127.0.0.1:7201" {
		t.Errorf("flag did not win over env and file: %s", cfg.Agent.GRPCAddr)
	}
	if cfg.Agent.HTTPAddr != "127.0.0.1:7002" {
		t.Errorf("file value lost: %s", cfg.Agent.HTTPAddr)
	}
	if cfg.Rules.AcceptOverflow.StallAfter.D() != time.Second || cfg.Rules.AcceptOverflow.Window.D() != 20*time.Second {
		t.Errorf("env or file value lost: %+v", cfg.Rules.AcceptOverflow)
	}
	if cfg.Findings.History != 99 || cfg.Target.Port != 8080 {
		t.Errorf("--set or --port lost: %d %d", cfg.Findings.History, cfg.Target.Port)
	}
	_, err = agentConfig(nil, []string{"CULPRIT_SIGNALS_RING_SIZE=lots"}, io.Discard)
	if err == nil || !strings.Contains(err.Error(), "CULPRIT_SIGNALS_RING_SIZE") {
		t.Errorf("bad env value error %v does not name the variable", err)
	}
	_, err = agentConfig([]string{"--set", "no.such.key=1"}, nil, io.Discard)
	if err == nil || !strings.Contains(err.Error(), "no.such.key: unknown key") {
		t.Errorf("unknown --set key error: %v", err)
	}
}

func TestRefusesNonLoopbackWithoutOptIn(t *testing.T) {
	cfg := DefaultConfig()
	cfg.Agent.GRPCAddr = "0.0.0.0:9462"
	if err := checkLocal(cfg); err == nil || !strings.Contains(err.Error(), "agent.grpc_addr") {
		t.Fatalf("non-loopback listener accepted: %v", err)
	}
	cfg.Agent.AllowNonLocal = true
	if err := checkLocal(cfg); err != nil {
		t.Fatal(err)
	}
}

// A protected gRPC API (TLS or a token) may listen beyond loopback; the
// metrics endpoint still needs the explicit opt-in.
func TestNonLoopbackGRPCWithTokenOrTLS(t *testing.T) {
	for _, protect := range []func(*Config){
		func(c *Config) { c.Agent.TokenFile = "/run/secrets/culprit-token" },
		func(c *Config) { c.Agent.TLSCertFile, c.Agent.TLSKeyFile = "/tls/tls.crt", "/tls/tls.key" },
	} {
		cfg := DefaultConfig()
		cfg.Agent.GRPCAddr = "0.0.0.0:9462"
		protect(&cfg)
		if err := checkLocal(cfg); err != nil {
			t.Errorf("protected gRPC refused: %v", err)
		}
		cfg.Agent.HTTPAddr = "0.0.0.0:9461"
		if err := checkLocal(cfg); err == nil || !strings.Contains(err.Error(), "agent.http_addr") {
			t.Errorf("non-loopback metrics without opt-in: %v", err)
		}
	}
}
