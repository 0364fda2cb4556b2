// Package testcollector runs a real OpenTelemetry Collector for tests: the
// one of ../collector (otelcol with the OTLP receiver and contrib's file
// exporter), built from its Go modules once per machine, listening for
// OTLP/gRPC and OTLP/HTTP on loopback and writing every log record it
// receives to a file that the test reads back.
package testcollector

import (
	"bufio"
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// Bounds of the helper: how long a cold build may take (CI's machine
// downloads ~500 MB of modules and compiles for about two and a half
// minutes), how long the collector may take to start and to stop.
const (
	buildTimeout = 8 * time.Minute
	startTimeout = 30 * time.Second
	stopTimeout  = 10 * time.Second
)

// collectorSources are the files whose content decides the binary; their
// hash names the cached build.
var collectorSources = []string{"go.mod", "go.sum", "main.go"}

// Binary returns the path of the collector binary, building it when this
// machine has not yet built these sources with this Go. The build goes to
// the user's cache directory, keyed by a hash of go.mod, go.sum, main.go
// and the Go version; an exclusive lock on the key makes test packages
// running in parallel wait for one build instead of racing.
func Binary(t testing.TB) string {
	t.Helper()
	bin, err := binary()
	if err != nil {
		t.Fatalf("OpenTelemetry Collector for tests: %v", err)
	}
	return bin
}

var (
	binOnce sync.Once
	binPath string
	binErr  error
)

func binary() (string, error) {
	binOnce.Do(func() { binPath, binErr = build() })
	return binPath, binErr
}

// SourceDir finds tools/otelcol/collector from the working directory (a
// package directory of this module, when tests run).
func SourceDir() (string, error) {
	dir, err := os.Getwd()
	if err != nil {
		return "", fmt.Errorf("working directory: %w", err)
	}
	for {
		src := filepath.Join(dir, "tools", "otelcol", "collector")
		if _, err := os.Stat(filepath.Join(src, "go.mod")); err == nil {
			return src, nil
		}
		parent := filepath.Dir(dir)
		if parent == dir {
			return "", errors.New("tools/otelcol/collector not found above the working directory")
		}
		dir = parent
	}
}

func build() (string, error) {
	src, err := SourceDir()
	if err != nil {
		return "", err
	}
	h := sha256.New()
	for _, name := range collectorSources {
		b, err := os.ReadFile(filepath.Join(src, name))
		if err != nil {
			return "", fmt.Errorf("read collector source: %w", err)
		}
		fmt.Fprintf(h, "%s %d\n", name, len(b))
		h.Write(b)
	}
	fmt.Fprintf(h, "%s %s/%s\n", runtime.Version(), runtime.GOOS, runtime.GOARCH)
	key := hex.EncodeToString(h.Sum(nil))[:16]
	cache, err := os.UserCacheDir()
	if err != nil {
		cache = os.TempDir()
	}
	dir := filepath.Join(cache, "culprit", "otelcol")
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return "", fmt.Errorf("cache directory: %w", err)
	}
	bin := filepath.Join(dir, "otelcol-"+key)
	if usable(bin) {
		return bin, nil
	}
	lock, err := os.OpenFile(bin+".lock", os.O_CREATE|os.O_RDWR, 0o644)
	if err != nil {
		return "", fmt.Errorf("build lock: %w", err)
	}
	defer lock.Close()
	if err := syscall.Flock(int(lock.Fd()), syscall.LOCK_EX); err != nil {
		return "", fmt.Errorf("take build lock %s: %w", lock.Name(), err)
	}
	defer syscall.Flock(int(lock.Fd()), syscall.LOCK_UN)
	if usable(bin) { // another package built it while this one waited
		return bin, nil
	}
	goCmd, err := exec.LookPath("go")
	if err != nil {
		return "", fmt.Errorf("the go command builds the collector: %w", err)
	}
	tmp := fmt.Sprintf("%s.tmp%d", bin, os.Getpid())
	cmd := exec.Command(goCmd, "build", "-trimpath", "-o", tmp, ".")
	cmd.Dir = src
	// Its own module, never a workspace; -mod=readonly: go.sum must
	// already hold every module (the proxy serves them, nothing else).
	cmd.Env = append(os.Environ(), "GOWORK=off", "GOFLAGS=-mod=readonly -buildvcs=false", "CGO_ENABLED=0")
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	start := time.Now()
	if err := cmd.Start(); err != nil {
		return "", fmt.Errorf("go build: %w", err)
	}
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	select {
	case err = <-done:
	case <-time.After(buildTimeout):
		cmd.Process.Kill()
		<-done
		err = fmt.Errorf("not done after %s", buildTimeout)
	}
	if err != nil {
		os.Remove(tmp)
		return "", fmt.Errorf("build the collector in %s (go build): %w\n%s", src, err, out.String())
	}
	if err := os.Rename(tmp, bin); err != nil {
		return "", fmt.Errorf("install the collector binary: %w", err)
	}
	fmt.Fprintf(os.Stderr, "testcollector: built the OpenTelemetry Collector in %s (%s)\n", time.Since(start).Round(time.Second), bin)
	return bin, nil
}

func usable(bin string) bool {
	st, err := os.Stat(bin)
	return err == nil && st.Mode().IsRegular() && st.Mode()&0o111 != 0
}

// Collector is a running collector.
type Collector struct {
	GRPCAddr string // host:port of the OTLP/gRPC receiver
	HTTPAddr string // host:port of the OTLP/HTTP receiver
	Output   string // the file exporter's file

	t      testing.TB
	bin    string
	dir    string
	config string
	mu     sync.Mutex
	cmd    *exec.Cmd
	done   chan struct{}
	log    *os.File
	starts int
}

// Start builds (once) and starts a collector on free loopback ports. It
// is stopped when the test ends.
func Start(t testing.TB) *Collector {
	t.Helper()
	c := &Collector{t: t, bin: Binary(t), dir: t.TempDir()}
	c.Output = filepath.Join(c.dir, "logs.json")
	var err error
	for attempt := 0; attempt < 3; attempt++ {
		// A port picked free can be taken before the collector binds it:
		// try again with others.
		c.GRPCAddr, c.HTTPAddr = freeAddr(t), freeAddr(t)
		if err = c.writeConfig(); err != nil {
			t.Fatal(err)
		}
		if err = c.start(); err == nil {
			t.Cleanup(func() { c.Stop() })
			return c
		}
	}
	t.Fatalf("start the collector: %v", err)
	return nil
}

func freeAddr(t testing.TB) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatalf("pick a free port: %v", err)
	}
	defer l.Close()
	return l.Addr().String()
}

// writeConfig writes the collector's configuration: OTLP in, the file out
// (appended, so a restarted collector adds to what the first one wrote,
// flushed every 100 ms), no internal metrics (their port, 8888, would
// clash between collectors of parallel tests).
func (c *Collector) writeConfig() error {
	c.config = filepath.Join(c.dir, "otelcol.yaml")
	cfg := fmt.Sprintf(`receivers:
  otlp:
    protocols:
      grpc:
        endpoint: %s
      http:
        endpoint: %s
exporters:
  file:
    path: %s
    format: json
    append: true
    flush_interval: 100ms
service:
  telemetry:
    metrics:
      level: none
    logs:
      level: info
  pipelines:
    logs:
      receivers: [otlp]
      exporters: [file]
`, c.GRPCAddr, c.HTTPAddr, strconv.Quote(c.Output))
	if err := os.WriteFile(c.config, []byte(cfg), 0o644); err != nil {
		return fmt.Errorf("write collector config: %w", err)
	}
	return nil
}

// start runs the binary and waits until both receivers accept connections.
func (c *Collector) start() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.cmd != nil {
		return errors.New("collector already running")
	}
	c.starts++
	logf, err := os.Create(filepath.Join(c.dir, fmt.Sprintf("otelcol-%d.log", c.starts)))
	if err != nil {
		return fmt.Errorf("collector log: %w", err)
	}
	cmd := exec.Command(c.bin, "--config", c.config)
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL} // never outlive the test
	if err := cmd.Start(); err != nil {
		logf.Close()
		return fmt.Errorf("run %s: %w", c.bin, err)
	}
	done := make(chan struct{})
	go func() { cmd.Wait(); close(done) }()
	deadline := time.Now().Add(startTimeout)
	for _, addr := range []string{c.GRPCAddr, c.HTTPAddr} {
		for {
			conn, err := net.DialTimeout("tcp", addr, time.Second)
			if err == nil {
				conn.Close()
				break
			}
			select {
			case <-done:
				logf.Close()
				return fmt.Errorf("the collector exited at start:\n%s", c.readLog(logf.Name()))
			case <-time.After(20 * time.Millisecond):
			}
			if time.Now().After(deadline) {
				cmd.Process.Kill()
				<-done
				logf.Close()
				return fmt.Errorf("the collector did not listen on %s within %s:\n%s", addr, startTimeout, c.readLog(logf.Name()))
			}
		}
	}
	c.cmd, c.done, c.log = cmd, done, logf
	return nil
}

func (c *Collector) readLog(name string) string {
	b, _ := os.ReadFile(name)
	const keep = 8 << 10
	if len(b) > keep {
		b = b[len(b)-keep:]
	}
	return string(b)
}

// Stop ends the collector with SIGTERM, as Kubernetes would, and waits:
// what it received is in the file when Stop returns.
func (c *Collector) Stop() {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.cmd == nil {
		return
	}
	c.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-c.done:
	case <-time.After(stopTimeout):
		c.cmd.Process.Kill()
		<-c.done
		c.t.Errorf("the collector did not stop within %s of SIGTERM", stopTimeout)
	}
	c.log.Close()
	c.cmd, c.done, c.log = nil, nil, nil
}

// Restart starts a stopped collector again on the same ports and file.
func (c *Collector) Restart(t testing.TB) {
	t.Helper()
	if err := c.start(); err != nil {
		t.Fatalf("restart the collector: %v", err)
	}
}

// Log is what the collector printed in its runs so far, for a failure
// message.
func (c *Collector) Log() string {
	var b strings.Builder
	for i := 1; i <= c.starts; i++ {
		fmt.Fprintf(&b, "--- run %d ---\n%s", i, c.readLog(filepath.Join(c.dir, fmt.Sprintf("otelcol-%d.log", i))))
	}
	return b.String()
}

// Record is one log record as the collector wrote it, with its resource
// and scope. Attribute values are string, int64, float64, bool, []any or
// map[string]any.
type Record struct {
	Resource       map[string]any
	Scope          string
	ScopeVersion   string
	Time           time.Time
	ObservedTime   time.Time
	SeverityNumber int
	SeverityText   string
	EventName      string
	Body           any
	Attributes     map[string]any
	TraceID        string // hex, "" when none
	SpanID         string
}

// Records reads every log record in the output file so far.
func (c *Collector) Records() ([]Record, error) {
	f, err := os.Open(c.Output)
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("read collector output: %w", err)
	}
	defer f.Close()
	return ParseFile(f)
}

// WaitFor polls the output until a record matches, or fails the test.
func (c *Collector) WaitFor(t testing.TB, timeout time.Duration, what string, match func(Record) bool) Record {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		recs, err := c.Records()
		if err != nil {
			t.Fatal(err)
		}
		for _, r := range recs {
			if match(r) {
				return r
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("no log record %s in the collector's output within %s; it holds %d:\n%s\ncollector log:\n%s",
				what, timeout, len(recs), Summary(recs), c.Log())
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// Summary lists records one a line, for failure messages.
func Summary(recs []Record) string {
	var b strings.Builder
	for _, r := range recs {
		fmt.Fprintf(&b, "  %s %s %v seq=%v %v\n", r.EventName, r.SeverityText, r.Body, r.Attributes["culprit.finding.sequence"], r.Resource["service.name"])
	}
	return b.String()
}

// ParseFile reads the file exporter's JSON format: one OTLP/JSON
// ExportLogsServiceRequest a line. OTLP/JSON writes trace and span ids as
// hex and 64-bit integers as strings, which protojson does not read as
// OTLP means them, hence this small decoder. A last line without its
// newline is one the collector is still writing (its buffered writer
// flushes on a timer, mid-line for large requests): it is left for the
// next read.
func ParseFile(r io.Reader) ([]Record, error) {
	var out []Record
	br := bufio.NewReaderSize(r, 1<<20)
	for n := 1; ; n++ {
		raw, err := br.ReadBytes('\n')
		if errors.Is(err, io.EOF) {
			return out, nil
		}
		if err != nil {
			return out, fmt.Errorf("read collector output: %w", err)
		}
		line := bytes.TrimSpace(raw)
		if len(line) == 0 {
			continue
		}
		var req struct {
			ResourceLogs []struct {
				Resource struct {
					Attributes []jsonKV `json:"attributes"`
				} `json:"resource"`
				ScopeLogs []struct {
					Scope struct {
						Name    string `json:"name"`
						Version string `json:"version"`
					} `json:"scope"`
					LogRecords []struct {
						TimeUnixNano         string    `json:"timeUnixNano"`
						ObservedTimeUnixNano string    `json:"observedTimeUnixNano"`
						SeverityNumber       int       `json:"severityNumber"`
						SeverityText         string    `json:"severityText"`
						EventName            string    `json:"eventName"`
						Body                 jsonValue `json:"body"`
						Attributes           []jsonKV  `json:"attributes"`
						TraceID              string    `json:"traceId"`
						SpanID               string    `json:"spanId"`
					} `json:"logRecords"`
				} `json:"scopeLogs"`
			} `json:"resourceLogs"`
		}
		if err := json.Unmarshal(line, &req); err != nil {
			return out, fmt.Errorf("line %d of the collector output: %w", n, err)
		}
		for _, rl := range req.ResourceLogs {
			res, err := kvMap(rl.Resource.Attributes)
			if err != nil {
				return out, fmt.Errorf("line %d: resource: %w", n, err)
			}
			for _, sl := range rl.ScopeLogs {
				for _, lr := range sl.LogRecords {
					attrs, err := kvMap(lr.Attributes)
					if err != nil {
						return out, fmt.Errorf("line %d: attributes: %w", n, err)
					}
					body, err := lr.Body.decode()
					if err != nil {
						return out, fmt.Errorf("line %d: body: %w", n, err)
					}
					out = append(out, Record{
						Resource: res, Scope: sl.Scope.Name, ScopeVersion: sl.Scope.Version,
						Time: unixNano(lr.TimeUnixNano), ObservedTime: unixNano(lr.ObservedTimeUnixNano),
						SeverityNumber: lr.SeverityNumber, SeverityText: lr.SeverityText, EventName: lr.EventName,
						Body: body, Attributes: attrs, TraceID: lr.TraceID, SpanID: lr.SpanID,
					})
				}
			}
		}
	}
}

func unixNano(s string) time.Time {
	n, err := strconv.ParseInt(s, 10, 64)
	if err != nil || n == 0 {
		return time.Time{}
	}
	return time.Unix(0, n)
}

type jsonKV struct {
	Key   string    `json:"key"`
	Value jsonValue `json:"value"`
}

// jsonValue is OTLP/JSON's AnyValue.
type jsonValue struct {
	StringValue *string          `json:"stringValue"`
	IntValue    *json.RawMessage `json:"intValue"` // a string in OTLP/JSON; a number is accepted too
	DoubleValue *float64         `json:"doubleValue"`
	BoolValue   *bool            `json:"boolValue"`
	ArrayValue  *struct {
		Values []jsonValue `json:"values"`
	} `json:"arrayValue"`
	KvlistValue *struct {
		Values []jsonKV `json:"values"`
	} `json:"kvlistValue"`
	BytesValue *string `json:"bytesValue"`
}

func (v jsonValue) decode() (any, error) {
	switch {
	case v.StringValue != nil:
		return *v.StringValue, nil
	case v.IntValue != nil:
		s := strings.Trim(string(*v.IntValue), `"`)
		n, err := strconv.ParseInt(s, 10, 64)
		if err != nil {
			return nil, fmt.Errorf("intValue %s: %w", *v.IntValue, err)
		}
		return n, nil
	case v.DoubleValue != nil:
		return *v.DoubleValue, nil
	case v.BoolValue != nil:
		return *v.BoolValue, nil
	case v.ArrayValue != nil:
		out := make([]any, 0, len(v.ArrayValue.Values))
		for _, e := range v.ArrayValue.Values {
			d, err := e.decode()
			if err != nil {
				return nil, err
			}
			out = append(out, d)
		}
		return out, nil
	case v.KvlistValue != nil:
		return kvMap(v.KvlistValue.Values)
	case v.BytesValue != nil:
		return *v.BytesValue, nil
	}
	return nil, nil
}

func kvMap(kvs []jsonKV) (map[string]any, error) {
	m := make(map[string]any, len(kvs))
	for _, kv := range kvs {
		v, err := kv.Value.decode()
		if err != nil {
			return nil, fmt.Errorf("%s: %w", kv.Key, err)
		}
		m[kv.Key] = v
	}
	return m, nil
}
