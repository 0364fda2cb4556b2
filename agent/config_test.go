package main

import (
	"errors"
	"fmt"
	"io"
	"math"
	"os"
	"path/filepath"
	"reflect"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/culprit-dev/culprit/rules"
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
	if cfg.Rules.AcceptOverflow.StallAfter != time.Second || cfg.Rules.AcceptOverflow.Window != 20*time.Second {
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

// A collector named in collect.disabled that does not exist is refused,
// naming the key and the collectors there are: `--set
// collect.disabled=["sockets"]` (a TOML list written as a flag's comma
// list) left the sockets collector running with no word said.
func TestCollectDisabledNamesCollectors(t *testing.T) {
	cfg, err := agentConfig([]string{"--set", "collect.disabled=sockets, netstat"}, nil, io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(cfg.Collect.Disabled, []string{"sockets", "netstat"}) {
		t.Errorf("collect.disabled = %q, want sockets and netstat", cfg.Collect.Disabled)
	}
	for _, v := range []string{`["sockets"]`, "socket", "sockets,nosuch"} {
		_, err := agentConfig([]string{"--set", "collect.disabled=" + v}, nil, io.Discard)
		if err == nil || !strings.Contains(err.Error(), "collect.disabled") || !strings.Contains(err.Error(), "accept_queue, cgroup") {
			t.Errorf("collect.disabled=%s: %v, want an error naming the key and the collectors", v, err)
		}
	}
	f := filepath.Join(t.TempDir(), "agent.conf")
	if err := os.WriteFile(f, []byte("[collect]\ndisabled = [\"threads\", \"thread\"]\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := agentConfig([]string{"--config", f}, nil, io.Discard); err == nil || !strings.Contains(err.Error(), `"thread"`) {
		t.Errorf("a misspelt collector in the file: %v, want it refused by name", err)
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

// A protected gRPC API (a token, or mTLS) may listen beyond loopback; TLS
// alone authenticates no one and is not protection. The metrics endpoint
// still needs the explicit opt-in.
func TestNonLoopbackGRPCWithTokenOrTLS(t *testing.T) {
	tlsOnly := DefaultConfig()
	tlsOnly.Agent.GRPCAddr = "0.0.0.0:9462"
	tlsOnly.Agent.TLSCertFile, tlsOnly.Agent.TLSKeyFile = "/tls/tls.crt", "/tls/tls.key"
	if err := checkLocal(tlsOnly); err == nil || !strings.Contains(err.Error(), "agent.grpc_addr") {
		t.Errorf("TLS without client auth or a token counted as protection: %v", err)
	}
	for _, protect := range []func(*Config){
		func(c *Config) { c.Agent.TokenFile = "/run/secrets/culprit-token" },
		func(c *Config) {
			c.Agent.TLSCertFile, c.Agent.TLSKeyFile, c.Agent.TLSClientCAFile = "/tls/tls.crt", "/tls/tls.key", "/tls/ca.crt"
		},
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

// Every numeric key has bounds, and both are enforced: a value just past
// either end is refused with the key's name, the end itself is accepted.
// A key without bounds would let "ring size 2e9" or "interval = 1ns"
// through to an out-of-memory kill or a busy loop.
func TestEveryNumericKeyIsBounded(t *testing.T) {
	def := DefaultConfig()
	for key, f := range def.keys() {
		numeric := f.v.CanInt() || f.v.CanFloat()
		tag, has := f.f.Tag.Lookup("range")
		if !numeric {
			if has {
				t.Errorf("%s: range tag on a %s", key, f.v.Kind())
			}
			continue
		}
		if !has {
			t.Errorf("%s: numeric key without a range tag", key)
			continue
		}
		b, err := parseRange(tag, f.v.Type() == durationType)
		if err != nil {
			t.Errorf("%s: %v", key, err)
			continue
		}
		if err := def.keys()[key].check(); err != nil {
			t.Errorf("%s: the default is out of its own bounds: %v", key, err)
		}
		for _, tc := range []struct {
			x  float64
			ok bool
		}{
			{b.lo, !b.loOpen}, {b.hi, !b.hiOpen},
			{below(b.lo, f), false}, {above(b.hi, f), false},
		} {
			c := DefaultConfig()
			g := c.keys()[key]
			if f.v.CanInt() {
				g.v.SetInt(int64(tc.x))
			} else {
				g.v.SetFloat(tc.x)
			}
			err := g.check()
			if (err == nil) != tc.ok {
				t.Errorf("%s = %s: check() = %v, want ok=%v", key, b.format(tc.x), err, tc.ok)
			}
		}
		if f.v.CanFloat() {
			c := DefaultConfig()
			g := c.keys()[key]
			g.v.SetFloat(math.NaN())
			if g.check() == nil {
				t.Errorf("%s = NaN accepted", key)
			}
		}
	}
}

// below and above step just past a bound: one unit for integers and
// durations, a small fraction for floats.
func below(x float64, f field) float64 {
	if f.v.CanInt() {
		return x - 1
	}
	return x - math.Max(math.Abs(x)*1e-6, 1e-9)
}

func above(x float64, f field) float64 {
	if f.v.CanInt() {
		return x + 1
	}
	return x + math.Max(math.Abs(x)*1e-6, 1e-9)
}

// Each key of [rules.*] reaches its rule as written: a key missing from
// the wiring would otherwise silently become zero. Every rules key is set
// to a value different from its default, through the same path a file
// takes, and the rule built from the config must hold it.
func TestEveryRuleKeyReachesItsRule(t *testing.T) {
	cfg := DefaultConfig()
	var conf strings.Builder
	table := ""
	keys := cfg.keys()
	var names []string
	for k := range keys {
		if strings.HasPrefix(k, "rules.") && strings.Count(k, ".") == 2 && !strings.HasPrefix(k, "rules.workers.") {
			names = append(names, k)
		}
	}
	slices.Sort(names)
	want := map[string]string{} // key -> value as text
	for _, k := range names {
		f := keys[k]
		b, _ := parseRange(f.f.Tag.Get("range"), f.v.Type() == durationType)
		// A value inside the bounds, different from the default.
		var v string
		switch {
		case f.v.Type() == durationType:
			d := time.Duration(f.v.Int())
			n := d + time.Second
			if float64(n) > b.hi {
				n = d - time.Millisecond
			}
			v = strconv.Quote(n.String())
			want[k] = n.String()
		case f.v.CanInt():
			n := f.v.Int() + 1
			if float64(n) > b.hi {
				n -= 2
			}
			v = strconv.FormatInt(n, 10)
			want[k] = v
		case f.v.CanFloat():
			x := f.v.Float() * 0.9
			if x <= b.lo || (b.loOpen && x <= b.lo) {
				x = f.v.Float() * 1.05
			}
			v = strconv.FormatFloat(x, 'g', -1, 64)
			want[k] = v
		default:
			continue
		}
		tbl := k[:strings.LastIndex(k, ".")]
		if tbl != table {
			fmt.Fprintf(&conf, "[%s]\n", tbl)
			table = tbl
		}
		fmt.Fprintf(&conf, "%s = %s\n", k[strings.LastIndex(k, ".")+1:], v)
	}
	// latency_spike.window must stay longer than its recent, and
	// accept_overflow's window at least its recent: the values above keep that.
	parsed, err := ParseConfig("rules.conf", []byte(conf.String()))
	if err != nil {
		t.Fatalf("%v\n%s", err, conf.String())
	}
	built := map[string]reflect.Value{}
	for _, r := range rules.New(parsed.Rules, parsed.Pprof.Interval) {
		built[r.Name()] = reflect.ValueOf(r).Elem().FieldByName("o")
	}
	for _, k := range names {
		parts := strings.Split(k, ".")
		o, ok := built[parts[1]]
		if !ok || !o.IsValid() {
			t.Errorf("%s: no rule %q holding options in a field o", k, parts[1])
			continue
		}
		var got string
		for i := 0; i < o.NumField(); i++ {
			name, _, _ := strings.Cut(o.Type().Field(i).Tag.Get("toml"), ",")
			if name != parts[2] {
				continue
			}
			fv := o.Field(i)
			switch {
			case fv.Type() == durationType:
				got = time.Duration(fv.Int()).String()
			case fv.CanInt():
				got = strconv.FormatInt(fv.Int(), 10)
			case fv.CanFloat():
				got = strconv.FormatFloat(fv.Float(), 'g', -1, 64)
			}
		}
		if got != want[k] {
			t.Errorf("%s: the rule holds %q, the file said %q", k, got, want[k])
		}
	}
}

// The config is bounded before it is parsed: /dev/zero is refused quickly
// and a huge bad value is quoted cut, not echoed whole.
func TestConfigInputIsBounded(t *testing.T) {
	if _, err := LoadConfig("/dev/zero"); err == nil || !strings.Contains(err.Error(), "larger than") {
		t.Errorf("/dev/zero: %v", err)
	}
	big := strings.Repeat("x", 50<<20)
	_, err := ParseConfig("big.conf", []byte("[agent]\nlog_level = \""+big[:maxConfigBytes-100]+"\"\n"))
	if err == nil || len(err.Error()) > 512 {
		t.Errorf("a huge bad value: error of %d bytes", len(fmt.Sprint(err)))
	}
	c := DefaultConfig()
	if err := c.Set("agent.log_level", big); err == nil || len(err.Error()) > 512 {
		t.Errorf("--set with a 50 MB value: error of %d bytes", len(fmt.Sprint(err)))
	}
}

// A misspelt CULPRIT_* variable is an error, like a misspelt key in the
// file; the CLI's own variables are not keys and pass.
func TestMisspeltEnvironmentVariableIsAnError(t *testing.T) {
	c := DefaultConfig()
	err := c.ApplyEnv([]string{"CULPRIT_RULES_ACCEPT_OVERFLOW_WINDOWS=20s"})
	if err == nil || !strings.Contains(err.Error(), "CULPRIT_RULES_ACCEPT_OVERFLOW_WINDOWS") {
		t.Errorf("misspelt variable: %v", err)
	}
	if err := c.ApplyEnv([]string{"CULPRIT_TOKEN=abc", "CULPRIT_RULES_ACCEPT_OVERFLOW_WINDOW=20s", "PATH=/bin"}); err != nil {
		t.Errorf("valid environment refused: %v", err)
	}
}
