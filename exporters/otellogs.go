package exporters

import (
	"context"
	"crypto/sha1"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/url"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"
	"unicode"
	"unicode/utf8"

	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/exporters/otlp/otlplog/otlploggrpc"
	"go.opentelemetry.io/otel/exporters/otlp/otlplog/otlploghttp"
	otellog "go.opentelemetry.io/otel/log"
	sdklog "go.opentelemetry.io/otel/sdk/log"
	"go.opentelemetry.io/otel/sdk/resource"
	semconv "go.opentelemetry.io/otel/semconv/v1.43.0"
	"go.opentelemetry.io/otel/trace"
	"google.golang.org/grpc"
	"google.golang.org/grpc/backoff"
	"google.golang.org/grpc/credentials"

	"github.com/culprit-dev/culprit/rules"
	"github.com/culprit-dev/culprit/signals"
	"github.com/culprit-dev/culprit/workload"
)

// The OTLP protocols findings are exported with (findings.otlp_protocol),
// spelt as OTEL_EXPORTER_OTLP_PROTOCOL spells them.
const (
	OTLPProtocolGRPC = "grpc"
	OTLPProtocolHTTP = "http/protobuf"
)

// Environment variables that name the service and the pod in the exported
// records and in target_info. The K8S_* names are the ones the Kubernetes
// manifests fill from the downward API; they are not CULPRIT_* variables
// because the agent refuses CULPRIT_* names that are no agent.conf key.
const (
	EnvServiceName   = "OTEL_SERVICE_NAME"
	EnvPodName       = "K8S_POD_NAME"
	EnvNamespaceName = "K8S_NAMESPACE_NAME"
	EnvNodeName      = "K8S_NODE_NAME"
	EnvContainerName = "K8S_CONTAINER_NAME"
)

// Defaults of FindingsLogsOptions, equal to agent.conf's [findings] otlp_*.
const (
	DefaultOTLPQueue      = 1024
	DefaultOTLPQueueBytes = 4 << 20
	DefaultOTLPBatch      = 128
	DefaultOTLPInterval   = 500 * time.Millisecond
	DefaultOTLPTimeout    = time.Minute
)

// Retry pacing within findings.otlp_timeout. A collector in the pod or on
// the node restarts in seconds: waits grow from half a second to at most
// five, so a collector that came back gets the queue within seconds. One
// that stays away costs an attempt every five seconds: each failing gRPC
// attempt costs the client some 5-10 ms of CPU (measured: at two seconds
// that was 0.3-1.5 % of a core, at five about 0.1 %). gRPC's own
// reconnection is paced the same: its default backs off to two minutes,
// which would hold the queue that long after the collector returned.
const (
	retryInitial = 500 * time.Millisecond
	retryMax     = 5 * time.Second
	// attemptTimeout bounds one HTTP request; gRPC attempts end with the
	// whole export (findings.otlp_timeout) or fail fast while the
	// connection is down.
	attemptTimeout = 10 * time.Second
	// abortWait is how long Close waits, after giving up on exports, for
	// the batch processor to finish: an aborted export ends within
	// milliseconds.
	abortWait = 2 * time.Second
	// exportSlack lets the exporter's own bound (findings.otlp_timeout)
	// end an export before the batch processor's backstop does.
	exportSlack = 5 * time.Second
	// recordOverhead is what a record costs beyond its body and
	// attributes (timestamps, severity, ids, the slot in the queue).
	recordOverhead = 96
	// maxRecordAttributes is above the ~20 attributes a record carries,
	// so the SDK never drops one; sizes are bounded by the byte budget.
	maxRecordAttributes = 64
	// scopeName is the instrumentation scope of every record: what made
	// it, as service.name says what it is about.
	scopeName = "github.com/culprit-dev/culprit"
)

// exportResults are the values of culprit_findings_exported_total's result
// label, all exported from the start so that rate() works from the first
// scrape.
var exportResults = []string{"exported", "failed", "dropped", "lost"}

// Resource is the OpenTelemetry resource the agent's telemetry describes:
// the watched service (not culprit) and the pod it runs in. The log
// records of findings carry it, and /metrics exposes it as target_info.
type Resource struct {
	service   string // OTEL_SERVICE_NAME; "" to use the target's command name
	instance  string // service.instance.id
	k8s       []attribute.KeyValue
	tracker   *workload.Tracker
	mu        sync.Mutex
	lastComm  string // the target's command name when last seen
	hostnameF func() (string, error)
}

// NewResource reads OTEL_SERVICE_NAME and the K8S_* variables from environ
// (os.Environ() in the agent). Without OTEL_SERVICE_NAME, service.name is
// the command name of the target tracker last found. A variable that is
// set but empty counts as unset: a manifest's fieldRef the test copies
// without its value, or an unset downward field.
func NewResource(environ []string, tracker *workload.Tracker) (*Resource, error) {
	return newResource(environ, tracker, os.Hostname)
}

func newResource(environ []string, tracker *workload.Tracker, hostname func() (string, error)) (*Resource, error) {
	r := &Resource{tracker: tracker, hostnameF: hostname}
	get := func(name string, max int) (string, error) {
		v := strings.TrimSpace(lookupEnv(environ, name))
		if err := checkResourceValue(v, max); err != nil {
			return "", fmt.Errorf("environment %s: %w", name, err)
		}
		return v, nil
	}
	var err error
	if r.service, err = get(EnvServiceName, 255); err != nil {
		return nil, err
	}
	// Lengths are Kubernetes' own limits: DNS subdomains (pods, nodes)
	// and labels (namespaces, containers).
	vals := map[string]string{}
	for _, v := range []struct {
		env string
		max int
	}{{EnvPodName, 253}, {EnvNamespaceName, 63}, {EnvNodeName, 253}, {EnvContainerName, 63}} {
		if vals[v.env], err = get(v.env, v.max); err != nil {
			return nil, err
		}
	}
	for _, kv := range []struct {
		key attribute.Key
		env string
	}{{semconv.K8SPodNameKey, EnvPodName}, {semconv.K8SNamespaceNameKey, EnvNamespaceName},
		{semconv.K8SNodeNameKey, EnvNodeName}, {semconv.K8SContainerNameKey, EnvContainerName}} {
		if v := vals[kv.env]; v != "" {
			r.k8s = append(r.k8s, kv.key.String(v))
		}
	}
	ns, pod, ctr := vals[EnvNamespaceName], vals[EnvPodName], vals[EnvContainerName]
	switch {
	case ns != "" && pod != "" && ctr != "":
		// The semantic conventions' Kubernetes rule: one instance per
		// container of a pod, readable, and stable for the pod's life.
		r.instance = ns + "." + pod + "." + ctr
	default:
		// Outside Kubernetes: a UUID v5 of the host name, as the
		// conventions ask of an id derived from something stable.
		if h, err := r.hostnameF(); err == nil && h != "" {
			r.instance = uuidV5(serviceInstanceNamespace, h)
		}
	}
	return r, nil
}

// checkResourceValue refuses what no pod name or service name holds.
func checkResourceValue(v string, max int) error {
	if len(v) > max {
		return fmt.Errorf("%d bytes, at most %d", len(v), max)
	}
	if !utf8.ValidString(v) {
		return errors.New("not UTF-8")
	}
	if i := strings.IndexFunc(v, unicode.IsControl); i >= 0 {
		return fmt.Errorf("control character at byte %d", i)
	}
	return nil
}

// lookupEnv returns the last NAME=value of environ, as a shell would have
// set it.
func lookupEnv(environ []string, name string) string {
	v := ""
	for _, kv := range environ {
		if k, val, ok := strings.Cut(kv, "="); ok && k == name {
			v = val
		}
	}
	return v
}

// serviceInstanceNamespace is the UUID namespace the semantic conventions
// give for service.instance.id derived from a stable id.
var serviceInstanceNamespace = [16]byte{0x4d, 0x63, 0x00, 0x9a, 0x8d, 0x0f, 0x11, 0xee, 0xaa, 0xd7, 0x4c, 0x79, 0x6e, 0xd8, 0xe3, 0x20}

// uuidV5 is RFC 9562's name-based UUID (SHA-1).
func uuidV5(ns [16]byte, name string) string {
	h := sha1.New()
	h.Write(ns[:])
	h.Write([]byte(name))
	var u [16]byte
	copy(u[:], h.Sum(nil))
	u[6] = u[6]&0x0f | 0x50
	u[8] = u[8]&0x3f | 0x80
	return fmt.Sprintf("%x-%x-%x-%x-%x", u[0:4], u[4:6], u[6:8], u[8:10], u[10:16])
}

// ServiceName is service.name: OTEL_SERVICE_NAME, else the target's
// command name (kept after the target exits, so a restart does not flip
// it), else "unknown_service" as the SDKs say when nothing is known.
func (r *Resource) ServiceName() string {
	if r == nil {
		return "unknown_service"
	}
	if r.service != "" {
		return r.service
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.tracker != nil {
		if p, ok := r.tracker.Current(); ok && p.Comm != "" {
			r.lastComm = p.Comm
		}
	}
	if r.lastComm == "" {
		return "unknown_service"
	}
	return r.lastComm
}

// Attributes are the resource attributes now, service.name first.
func (r *Resource) Attributes() []attribute.KeyValue {
	attrs := []attribute.KeyValue{semconv.ServiceName(r.ServiceName())}
	if r == nil {
		return attrs
	}
	if r.instance != "" {
		attrs = append(attrs, semconv.ServiceInstanceID(r.instance))
	}
	return append(attrs, r.k8s...)
}

// ResolveOTLPProtocol is findings.otlp_protocol when set, else what the
// OpenTelemetry SDKs would use: OTEL_EXPORTER_OTLP_LOGS_PROTOCOL, then
// OTEL_EXPORTER_OTLP_PROTOCOL, else grpc. The error names where a bad
// value came from.
func ResolveOTLPProtocol(configured string, environ []string) (string, error) {
	v, from := strings.TrimSpace(configured), "findings.otlp_protocol"
	if v == "" {
		for _, name := range []string{"OTEL_EXPORTER_OTLP_LOGS_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL"} {
			if x := strings.TrimSpace(lookupEnv(environ, name)); x != "" {
				v, from = x, "environment "+name
				break
			}
		}
	}
	switch v {
	case "":
		return OTLPProtocolGRPC, nil
	case OTLPProtocolGRPC, OTLPProtocolHTTP:
		return v, nil
	case "http/json":
		return "", fmt.Errorf("%s: http/json is not supported by the OpenTelemetry Go log exporters: use grpc or http/protobuf", from)
	}
	return "", fmt.Errorf("%s: want grpc or http/protobuf, got %s", from, quoteValue(v))
}

// otlpTarget is where records go, parsed from findings.otlp_endpoint.
type otlpTarget struct {
	hostPort string
	insecure bool
	path     string // OTLP/HTTP only
}

func (t otlpTarget) String() string {
	scheme := "https"
	if t.insecure {
		scheme = "http"
	}
	return scheme + "://" + t.hostPort + t.path
}

// parseOTLPEndpoint takes host:port (plaintext: a collector in the pod or
// on the node) or an http:// or https:// URL. OTLP/HTTP posts to the URL's
// path, /v1/logs when it has none; OTLP/gRPC takes no path.
func parseOTLPEndpoint(raw, protocol string) (otlpTarget, error) {
	bad := func(format string, a ...any) (otlpTarget, error) {
		return otlpTarget{}, fmt.Errorf("findings.otlp_endpoint %s: %s", quoteValue(raw), fmt.Sprintf(format, a...))
	}
	raw = strings.TrimSpace(raw)
	t := otlpTarget{insecure: true, path: "/v1/logs"}
	host := raw
	if strings.Contains(raw, "://") {
		u, err := url.Parse(raw)
		if err != nil {
			return bad("not a URL: %v", err)
		}
		switch u.Scheme {
		case "http":
		case "https":
			t.insecure = false
		default:
			return bad("scheme %s: want http or https", quoteValue(u.Scheme))
		}
		if u.User != nil || u.RawQuery != "" || u.Fragment != "" {
			return bad("no user, query or fragment: set headers with OTEL_EXPORTER_OTLP_HEADERS")
		}
		host = u.Host
		if p := u.EscapedPath(); p != "" && p != "/" {
			if protocol == OTLPProtocolGRPC {
				return bad("OTLP/gRPC takes no path (%s)", p)
			}
			t.path = p
		}
	}
	h, port, err := net.SplitHostPort(host)
	if err != nil {
		return bad("want host:port or an http(s):// URL with a port (OTLP/gRPC listens on 4317, OTLP/HTTP on 4318)")
	}
	if n, err := strconv.Atoi(port); err != nil || n < 1 || n > 65535 {
		return bad("port %s is not 1-65535", quoteValue(port))
	}
	if h == "" {
		return bad("no host")
	}
	t.hostPort = host
	return t, nil
}

// quoteValue shows a bad value in an error, cut short.
func quoteValue(s string) string {
	if len(s) > 64 {
		return strconv.Quote(s[:64]) + fmt.Sprintf("... (%d bytes)", len(s))
	}
	return strconv.Quote(s)
}

// FindingsLogsOptions configures NewFindingsLogs: the [findings] otlp_*
// keys of agent.conf, and what the agent wires in.
type FindingsLogsOptions struct {
	Journal *rules.Journal
	// Store receives culprit_findings_exported_total{result} and the
	// queue gauges; may be nil.
	Store    *signals.Store
	Resource *Resource
	// InstanceID names this run of the agent (GRPCServer.InstanceID), so
	// a record's sequence is never taken for another run's.
	InstanceID string
	Version    string
	Log        *slog.Logger

	Endpoint string // findings.otlp_endpoint
	Protocol string // findings.otlp_protocol; "" to follow the environment
	// Environ is read for OTEL_EXPORTER_OTLP_LOGS_PROTOCOL and
	// OTEL_EXPORTER_OTLP_PROTOCOL. (The SDK's exporters read the other
	// OTEL_EXPORTER_OTLP_* variables, headers and compression among
	// them, from the process.)
	Environ []string

	// Queue and QueueBytes bound the records held for export, queued or
	// being sent (findings.otlp_queue, findings.otlp_queue_bytes). Beyond
	// them events stay in the journal and are read when room frees up.
	Queue      int
	QueueBytes int
	Batch      int           // records per export request (findings.otlp_batch)
	Interval   time.Duration // longest a record waits for a batch to fill (findings.otlp_interval)
	// Timeout bounds how long one batch is tried, retries with backoff
	// included (findings.otlp_timeout); then it is dropped and counted.
	Timeout time.Duration
}

// FindingsLogs exports every finding event as an OTLP log record, with the
// OpenTelemetry SDK's batch processor and OTLP exporter (gRPC or HTTP).
// It reads the journal as a cursor, as a gRPC watcher does, in its own
// goroutine: the rules and the journal never wait for it, and a collector
// that is down costs a counter, never a queue beyond its bounds.
type FindingsLogs struct {
	o        FindingsLogsOptions
	protocol string
	target   otlpTarget
	log      *slog.Logger
	queue    *logQueue
	abort    context.Context // cancelled when Close stops waiting for exports
	abortFn  context.CancelFunc
	freed    chan struct{} // an export finished: room in the queue
	stopRun  chan struct{}
	runDone  chan struct{}
	expDone  chan struct{} // the batch processor shut the exporter down: no export follows

	// Owned by the goroutine in Run, then by Close.
	cursor uint64
	logger otellog.Logger
	resKey attribute.Distinct

	expDoneOnce sync.Once

	mu          sync.Mutex
	running     bool
	closed      bool
	queued      int
	queuedBytes int
	counts      map[string]float64
	failing     bool
}

// NewFindingsLogs checks the options and builds the exporter; it connects
// to nothing yet (gRPC connects on the first export).
func NewFindingsLogs(o FindingsLogsOptions) (*FindingsLogs, error) {
	if o.Journal == nil {
		return nil, errors.New("findings log export: no journal")
	}
	if strings.TrimSpace(o.Endpoint) == "" {
		return nil, errors.New("findings.otlp_endpoint is empty: nothing to export to")
	}
	if o.Log == nil {
		o.Log = slog.New(slog.DiscardHandler)
	}
	for _, d := range []struct {
		v   *int
		def int
		key string
	}{{&o.Queue, DefaultOTLPQueue, "otlp_queue"}, {&o.QueueBytes, DefaultOTLPQueueBytes, "otlp_queue_bytes"}, {&o.Batch, DefaultOTLPBatch, "otlp_batch"}} {
		if *d.v < 0 {
			return nil, fmt.Errorf("findings.%s: must be positive, got %d", d.key, *d.v)
		}
		if *d.v == 0 {
			*d.v = d.def
		}
	}
	if o.Interval <= 0 {
		o.Interval = DefaultOTLPInterval
	}
	if o.Timeout <= 0 {
		o.Timeout = DefaultOTLPTimeout
	}
	// A batch larger than the queue could never fill.
	o.Batch = min(o.Batch, o.Queue)
	protocol, err := ResolveOTLPProtocol(o.Protocol, o.Environ)
	if err != nil {
		return nil, err
	}
	tgt, err := parseOTLPEndpoint(o.Endpoint, protocol)
	if err != nil {
		return nil, err
	}
	exp, err := newLogExporter(protocol, tgt, o.Timeout)
	if err != nil {
		return nil, fmt.Errorf("findings log exporter for %s (%s): %w", tgt, protocol, err)
	}
	abort, abortFn := context.WithCancel(context.Background())
	f := &FindingsLogs{
		o: o, protocol: protocol, target: tgt,
		log:     o.Log.With("endpoint", tgt.String(), "protocol", protocol),
		abort:   abort,
		abortFn: abortFn,
		freed:   make(chan struct{}, 1),
		stopRun: make(chan struct{}),
		runDone: make(chan struct{}),
		expDone: make(chan struct{}),
		counts:  make(map[string]float64, len(exportResults)),
	}
	bp := sdklog.NewBatchProcessor(&countingExporter{next: exp, f: f},
		// The processor's own queue is as large as ours, so it never
		// drops a record: we stop feeding it first.
		sdklog.WithMaxQueueSize(o.Queue),
		sdklog.WithExportMaxBatchSize(o.Batch),
		sdklog.WithExportInterval(o.Interval),
		sdklog.WithExportTimeout(o.Timeout+exportSlack))
	f.queue = &logQueue{f: f, next: bp}
	f.publish()
	return f, nil
}

// Protocol is the OTLP protocol in use, after the environment's say.
func (f *FindingsLogs) Protocol() string { return f.protocol }

// Endpoint is where records go, as a URL.
func (f *FindingsLogs) Endpoint() string { return f.target.String() }

func newLogExporter(protocol string, t otlpTarget, timeout time.Duration) (sdklog.Exporter, error) {
	ctx := context.Background()
	switch protocol {
	case OTLPProtocolGRPC:
		opts := []otlploggrpc.Option{
			otlploggrpc.WithEndpoint(t.hostPort),
			otlploggrpc.WithTimeout(timeout),
			otlploggrpc.WithRetry(otlploggrpc.RetryConfig{Enabled: true, InitialInterval: retryInitial, MaxInterval: retryMax, MaxElapsedTime: timeout}),
			otlploggrpc.WithDialOption(grpc.WithConnectParams(grpc.ConnectParams{
				Backoff:           backoff.Config{BaseDelay: retryInitial, Multiplier: 1.6, Jitter: 0.2, MaxDelay: retryMax},
				MinConnectTimeout: attemptTimeout,
			})),
		}
		if t.insecure {
			opts = append(opts, otlploggrpc.WithInsecure())
		} else {
			opts = append(opts, otlploggrpc.WithTLSCredentials(credentials.NewTLS(&tls.Config{MinVersion: tls.VersionTLS12})))
		}
		return otlploggrpc.New(ctx, opts...)
	case OTLPProtocolHTTP:
		tr, ok := http.DefaultTransport.(*http.Transport)
		if !ok {
			return nil, errors.New("http.DefaultTransport is not an *http.Transport")
		}
		tr = tr.Clone()
		tr.TLSClientConfig = &tls.Config{MinVersion: tls.VersionTLS12}
		opts := []otlploghttp.Option{
			otlploghttp.WithEndpoint(t.hostPort),
			otlploghttp.WithURLPath(t.path),
			otlploghttp.WithRetry(otlploghttp.RetryConfig{Enabled: true, InitialInterval: retryInitial, MaxInterval: retryMax, MaxElapsedTime: timeout}),
			otlploghttp.WithHTTPClient(&http.Client{Transport: transientDials{tr}, Timeout: min(timeout, attemptTimeout)}),
		}
		if t.insecure {
			opts = append(opts, otlploghttp.WithInsecure())
		}
		return otlploghttp.New(ctx, opts...)
	}
	return nil, fmt.Errorf("unknown OTLP protocol %s", quoteValue(protocol))
}

// transientDials marks connection failures as temporary. The OTLP/HTTP
// exporter retries only errors that say so, and a refused connection does
// not: without this a collector that is restarting would lose every batch
// at once instead of within findings.otlp_timeout.
type transientDials struct{ next http.RoundTripper }

func (t transientDials) RoundTrip(r *http.Request) (*http.Response, error) {
	resp, err := t.next.RoundTrip(r)
	if err != nil && transientNetError(err) {
		return nil, temporaryError{err}
	}
	return resp, err
}

func transientNetError(err error) bool {
	var op *net.OpError
	if errors.As(err, &op) && op.Op == "dial" {
		return true
	}
	return errors.Is(err, syscall.ECONNREFUSED) || errors.Is(err, syscall.ECONNRESET) ||
		errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF)
}

type temporaryError struct{ error }

func (temporaryError) Temporary() bool { return true }
func (e temporaryError) Unwrap() error { return e.error }

// logQueue sits before the SDK's batch processor and counts what it holds,
// so the pump in Run never gives it more than findings.otlp_queue records
// and findings.otlp_queue_bytes bytes.
type logQueue struct {
	f    *FindingsLogs
	next *sdklog.BatchProcessor
}

var _ sdklog.Processor = (*logQueue)(nil)

func (q *logQueue) Enabled(context.Context, sdklog.EnabledParameters) bool { return true }

func (q *logQueue) OnEmit(ctx context.Context, r *sdklog.Record) error {
	q.f.hold(recordBytes(r))
	return q.next.OnEmit(ctx, r)
}

func (q *logQueue) Shutdown(ctx context.Context) error   { return q.next.Shutdown(ctx) }
func (q *logQueue) ForceFlush(ctx context.Context) error { return q.next.ForceFlush(ctx) }

// countingExporter counts each batch's outcome and frees its room. It
// answers nil to the batch processor: the outcome is counted and logged
// here, and the SDK would print the error again to stderr.
type countingExporter struct {
	next sdklog.Exporter
	f    *FindingsLogs
}

func (c *countingExporter) Export(ctx context.Context, records []sdklog.Record) error {
	if len(records) == 0 {
		return nil
	}
	// Close may give up on an export still retrying; it must not then
	// run on for findings.otlp_timeout.
	ctx, cancel := context.WithCancel(ctx)
	stop := context.AfterFunc(c.f.abort, cancel)
	start := time.Now()
	err := c.next.Export(ctx, records)
	stop()
	cancel()
	c.f.settle(records, err, time.Since(start))
	return nil
}

// Shutdown comes last from the batch processor, after its final export:
// Close learns from it that nothing it holds will be counted any more.
func (c *countingExporter) Shutdown(ctx context.Context) error {
	defer c.f.expDoneOnce.Do(func() { close(c.f.expDone) })
	if err := c.next.Shutdown(ctx); err != nil {
		return fmt.Errorf("shut down OTLP log exporter: %w", err)
	}
	return nil
}

func (c *countingExporter) ForceFlush(ctx context.Context) error {
	if err := c.next.ForceFlush(ctx); err != nil {
		return fmt.Errorf("flush OTLP log exporter: %w", err)
	}
	return nil
}

// hold counts a record handed to the batch processor.
func (f *FindingsLogs) hold(size int) {
	f.mu.Lock()
	f.queued++
	f.queuedBytes += size
	f.mu.Unlock()
}

// room says whether a record of size may be queued now. A record that could
// never fit is reported as such, so it is dropped instead of waited for.
func (f *FindingsLogs) room(size int) (ok, never bool) {
	if size > f.o.QueueBytes {
		return false, true
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.queued < f.o.Queue && f.queuedBytes+size <= f.o.QueueBytes, false
}

// settle records the outcome of one export and frees its room.
func (f *FindingsLogs) settle(records []sdklog.Record, err error, took time.Duration) {
	size := 0
	for i := range records {
		size += recordBytes(&records[i])
	}
	result := "exported"
	if err != nil {
		result = "failed"
	}
	f.mu.Lock()
	f.queued -= len(records)
	f.queuedBytes -= size
	f.counts[result] += float64(len(records))
	wasFailing := f.failing
	f.failing = err != nil
	f.mu.Unlock()
	select {
	case f.freed <- struct{}{}:
	default:
	}
	switch {
	case err != nil && !wasFailing:
		f.log.Warn("finding log records not delivered to the collector; counted in culprit_findings_exported_total{result=\"failed\"}",
			"records", len(records), "tried_for", took.Round(time.Millisecond), "err", err)
	case err != nil:
		f.log.Debug("finding log records not delivered", "records", len(records), "tried_for", took.Round(time.Millisecond), "err", err)
	case wasFailing:
		f.log.Info("finding log records delivered to the collector again", "records", len(records))
	}
	f.publish()
}

// count adds n events that never reached the batch processor.
func (f *FindingsLogs) count(result string, n uint64) {
	f.mu.Lock()
	f.counts[result] += float64(n)
	f.mu.Unlock()
	f.publish()
}

// publish writes the counters and queue gauges to the store.
func (f *FindingsLogs) publish() {
	if f.o.Store == nil {
		return
	}
	f.mu.Lock()
	counts := make(map[string]float64, len(f.counts))
	for k, v := range f.counts {
		counts[k] = v
	}
	queued, bytes := f.queued, f.queuedBytes
	f.mu.Unlock()
	now := time.Now()
	for _, r := range exportResults {
		f.o.Store.Put(signals.FindingsExported, signals.L("result", r), counts[r], now)
	}
	f.o.Store.Put(signals.FindingsExportQueue, nil, float64(queued), now)
	f.o.Store.Put(signals.FindingsExportQueueBytes, nil, float64(bytes), now)
}

// Counts returns the export outcomes so far, by result.
func (f *FindingsLogs) Counts() map[string]float64 {
	f.mu.Lock()
	defer f.mu.Unlock()
	out := make(map[string]float64, len(exportResults))
	for _, r := range exportResults {
		out[r] = f.counts[r]
	}
	return out
}

// Run follows the journal from its first event until ctx is done or Close
// is called, handing each event to the batch processor while the queue
// has room. It never blocks the journal's writer; when the queue is full
// it waits for an export to finish, and the journal keeps the events
// meanwhile (findings.history of them).
func (f *FindingsLogs) Run(ctx context.Context) {
	f.mu.Lock()
	if f.running || f.closed {
		f.mu.Unlock()
		return
	}
	f.running = true
	f.mu.Unlock()
	defer close(f.runDone)
	// Subscribe before the first read, so an event appended between the
	// read and the wait still leaves a token.
	tokens, unsubscribe := f.o.Journal.Subscribe()
	defer unsubscribe()
	f.log.Info("exporting findings as OTLP log records", "service.name", f.o.Resource.ServiceName())
	for {
		select {
		case <-ctx.Done():
			return
		case <-f.stopRun:
			return
		default:
		}
		if f.pump() {
			continue
		}
		select {
		case <-ctx.Done():
			return
		case <-f.stopRun:
			return
		case <-tokens:
		case <-f.freed:
		}
	}
}

// pump moves the events after the cursor into the batch processor while
// there is room. It returns true when it moved some and may move more.
func (f *FindingsLogs) pump() bool {
	evs, gap := f.o.Journal.After(f.cursor, f.o.Batch)
	if len(evs) == 0 {
		return false
	}
	if gap {
		lost := evs[0].Sequence - f.cursor - 1
		f.log.Warn("finding events left the journal before they could be exported (the collector was away longer than findings.history lasts)",
			"events", lost, "after_sequence", f.cursor)
		f.count("lost", lost)
		f.cursor = evs[0].Sequence - 1
	}
	moved := false
	defer func() {
		if moved {
			f.publish()
		}
	}()
	for _, ev := range evs {
		rec, ctx := f.record(ev)
		size := recordBytes(&rec)
		ok, never := f.room(size)
		if never {
			f.log.Warn("finding log record larger than findings.otlp_queue_bytes; dropped",
				"sequence", ev.Sequence, "finding", ev.Finding.ID, "bytes", size, "limit", f.o.QueueBytes)
			f.count("dropped", 1)
			f.cursor = ev.Sequence
			moved = true
			continue
		}
		if !ok {
			return moved
		}
		f.loggerNow().Emit(ctx, rec)
		f.cursor = ev.Sequence
		moved = true
	}
	return moved
}

// loggerNow returns a logger whose resource names the service as it is
// now: service.name follows the target until OTEL_SERVICE_NAME fixes it.
// Every provider shares the one batch processor and exporter (the OTLP
// exporter groups records by resource), and none is shut down but that
// processor, in Close.
func (f *FindingsLogs) loggerNow() otellog.Logger {
	attrs := f.o.Resource.Attributes()
	set := attribute.NewSet(attrs...)
	key := set.Equivalent()
	if f.logger != nil && key == f.resKey {
		return f.logger
	}
	lp := sdklog.NewLoggerProvider(
		sdklog.WithResource(resource.NewWithAttributes(semconv.SchemaURL, attrs...)),
		sdklog.WithProcessor(f.queue),
		sdklog.WithAttributeCountLimit(maxRecordAttributes),
		sdklog.WithAttributeValueLengthLimit(-1))
	if f.logger != nil {
		f.log.Info("findings are now exported for another service", "service.name", f.o.Resource.ServiceName())
	}
	f.logger = lp.Logger(scopeName, otellog.WithInstrumentationVersion(f.o.Version))
	f.resKey = key
	return f.logger
}

// Severities of the records. A critical finding is ERROR, not FATAL: FATAL
// is for a source that crashes, and a critical finding is a service that
// drops or stalls work, what backends alert on at ERROR. A resolution is
// news, not a problem: INFO, with the finding's severity as an attribute.
func otelSeverity(typ rules.EventType, s rules.Severity) (otellog.Severity, string) {
	if typ == rules.EventResolved {
		return otellog.SeverityInfo, rules.SeverityInfo.String()
	}
	switch s {
	case rules.SeverityCritical:
		return otellog.SeverityError, s.String()
	case rules.SeverityWarning:
		return otellog.SeverityWarn, s.String()
	}
	return otellog.SeverityInfo, rules.SeverityInfo.String()
}

// record converts a journal event. The context carries the first trace id
// among the finding's trace artifacts, which the SDK copies into the
// record's trace context (a trace id alone: the artifact names the
// request's trace, not one span of it).
func (f *FindingsLogs) record(ev rules.Event) (otellog.Record, context.Context) {
	fd := ev.Finding
	var r otellog.Record
	r.SetEventName("culprit.finding." + ev.Type.String())
	r.SetTimestamp(ev.Time)
	r.SetObservedTimestamp(time.Now())
	sev, text := otelSeverity(ev.Type, fd.Severity)
	r.SetSeverity(sev)
	r.SetSeverityText(text)
	r.SetBody(attribute.StringValue(fd.Title))
	attrs := []attribute.KeyValue{
		attribute.String("culprit.finding.event", ev.Type.String()),
		attribute.Int64("culprit.finding.sequence", int64(min(ev.Sequence, 1<<63-1))),
		attribute.String("culprit.finding.id", fd.ID),
		attribute.String("culprit.finding.rule", fd.Rule),
		attribute.String("culprit.finding.cause", fd.Cause),
		attribute.String("culprit.finding.key", fd.Key),
		attribute.String("culprit.finding.severity", fd.Severity.String()),
		attribute.Float64("culprit.finding.confidence", fd.Confidence),
	}
	for _, s := range []struct{ key, v string }{
		{"culprit.finding.symptom", fd.Symptom},
		{"culprit.finding.root_cause", fd.RootCause},
		{"culprit.finding.remediation", fd.Remediation},
		{"culprit.agent.instance_id", f.o.InstanceID},
	} {
		if s.v != "" {
			attrs = append(attrs, attribute.String(s.key, s.v))
		}
	}
	if len(fd.Labels) > 0 {
		keys := make([]string, 0, len(fd.Labels))
		for k := range fd.Labels {
			keys = append(keys, k)
		}
		slices.Sort(keys)
		m := make([]attribute.KeyValue, 0, len(keys))
		for _, k := range keys {
			m = append(m, attribute.String(k, fd.Labels[k]))
		}
		attrs = append(attrs, attribute.Map("culprit.finding.labels", m...))
	}
	if len(fd.Evidence) > 0 {
		ev := make([]attribute.Value, 0, len(fd.Evidence))
		for _, e := range fd.Evidence {
			m := []attribute.KeyValue{attribute.String("signal", e.Signal), attribute.Float64("value", e.Value)}
			if e.Unit != "" {
				m = append(m, attribute.String("unit", e.Unit))
			}
			if e.Threshold != 0 {
				m = append(m, attribute.Float64("threshold", e.Threshold))
			}
			if e.Window > 0 {
				m = append(m, attribute.Float64("window_seconds", e.Window.Seconds()))
			}
			if e.Note != "" {
				m = append(m, attribute.String("note", e.Note))
			}
			ev = append(ev, attribute.MapValue(m...))
		}
		attrs = append(attrs, attribute.Slice("culprit.finding.evidence", ev...))
	}
	ctx := context.Background()
	if len(fd.Artifacts) > 0 {
		arts := make([]attribute.Value, 0, len(fd.Artifacts))
		var traceID trace.TraceID
		var others []string
		for _, a := range fd.Artifacts {
			m := []attribute.KeyValue{attribute.String("kind", a.Kind), attribute.String("value", a.Value)}
			if a.Detail != "" {
				m = append(m, attribute.String("detail", a.Detail))
			}
			arts = append(arts, attribute.MapValue(m...))
			if a.Kind != "trace" {
				continue
			}
			id, err := trace.TraceIDFromHex(a.Value)
			switch {
			case err != nil:
				// Not a W3C trace id: the artifact still says it.
			case !traceID.IsValid():
				traceID = id
			default:
				others = append(others, a.Value)
			}
		}
		attrs = append(attrs, attribute.Slice("culprit.finding.artifacts", arts...))
		if traceID.IsValid() {
			ctx = trace.ContextWithSpanContext(ctx, trace.NewSpanContext(trace.SpanContextConfig{TraceID: traceID}))
		}
		if len(others) > 0 {
			attrs = append(attrs, attribute.StringSlice("culprit.finding.other_trace_ids", others))
		}
	}
	r.AddAttributes(attrs...)
	return r, ctx
}

// sized is what recordBytes reads; both the API's record and the SDK's
// have it.
type sized interface {
	Body() attribute.Value
	WalkAttributes(func(attribute.KeyValue) bool)
}

// recordBytes estimates a record's memory and wire size: the bound of
// findings.otlp_queue_bytes is kept in this unit.
func recordBytes(r sized) int {
	n := recordOverhead + valueBytes(r.Body())
	r.WalkAttributes(func(kv attribute.KeyValue) bool {
		n += len(kv.Key) + valueBytes(kv.Value)
		return true
	})
	return n
}

func valueBytes(v attribute.Value) int {
	const word = 8
	switch v.Type() {
	case attribute.STRING:
		return len(v.AsString()) + word
	case attribute.BYTESLICE:
		return len(v.AsByteSlice()) + word
	case attribute.STRINGSLICE:
		n := word
		for _, s := range v.AsStringSlice() {
			n += len(s) + word
		}
		return n
	case attribute.BOOLSLICE:
		return word + len(v.AsBoolSlice())
	case attribute.INT64SLICE:
		return word * (1 + len(v.AsInt64Slice()))
	case attribute.FLOAT64SLICE:
		return word * (1 + len(v.AsFloat64Slice()))
	case attribute.SLICE:
		n := word
		for _, e := range v.AsSlice() {
			n += valueBytes(e)
		}
		return n
	case attribute.MAP:
		n := word
		for _, kv := range v.AsMap() {
			n += len(kv.Key) + valueBytes(kv.Value)
		}
		return n
	}
	return word
}

// Close stops Run, hands the processor what the journal holds after the
// cursor (the engine has stopped, so this is the final word), and flushes
// it to the collector, all within timeout (and abortWait for an export it
// gives up on to end). What is still undelivered then
// is counted, never waited for: a collector that is down costs the agent's
// shutdown nothing but the timeout.
func (f *FindingsLogs) Close(timeout time.Duration) {
	f.mu.Lock()
	if f.closed {
		f.mu.Unlock()
		return
	}
	f.closed = true
	running := f.running
	f.mu.Unlock()
	close(f.stopRun)
	if running {
		<-f.runDone
	}
	deadline := time.Now().Add(timeout)
	for time.Now().Before(deadline) {
		if f.pump() {
			continue
		}
		if evs, _ := f.o.Journal.After(f.cursor, 1); len(evs) == 0 {
			break
		}
		select { // events left, no room: wait for an export to finish
		case <-f.freed:
		case <-time.After(time.Until(deadline)):
		}
	}
	if seq := f.o.Journal.Sequence(); seq > f.cursor {
		f.log.Warn("agent stopping: finding events not handed to the exporter in time", "events", seq-f.cursor)
		f.count("dropped", seq-f.cursor)
		f.cursor = seq
	}
	ctx, cancel := context.WithDeadline(context.Background(), deadline)
	err := f.queue.Shutdown(ctx)
	cancel()
	f.abortFn() // an export still retrying gives up now
	if err != nil && !errors.Is(err, context.DeadlineExceeded) {
		f.log.Warn("finding log export did not shut down cleanly", "err", err)
	}
	// Once aborted, the processor's last export ends at once; records it
	// then skips (its context is done) never reach countingExporter, so
	// what is still held when it has finished is counted here.
	select {
	case <-f.expDone:
		f.mu.Lock()
		left := f.queued
		f.counts["dropped"] += float64(left)
		f.queued, f.queuedBytes = 0, 0
		f.mu.Unlock()
		if left > 0 {
			f.log.Warn("agent stopping: finding log records not delivered within the shutdown timeout", "records", left)
		}
	case <-time.After(abortWait):
		f.log.Warn("finding log export still busy after the shutdown timeout; leaving it", "waited", abortWait)
	}
	f.publish()
}
