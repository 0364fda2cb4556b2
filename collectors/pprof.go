package collectors

import (
	"bytes"
	"compress/gzip"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"strings"
	"sync"
	"time"

	"github.com/google/pprof/profile"

	"github.com/culprit-dev/culprit/signals"
	"github.com/culprit-dev/culprit/workload"
)

// The heap collector is not registered: it needs the profile store, which
// the registry's Factory cannot pass, so the agent builds it with
// NewPprofHeap when pprof.heap_url is set.

// Reasons of pprof_fetch_errors_total. The list is closed so that every
// series exists from the first attempt and rate() works on the first error.
const (
	reasonConnect    = "connect"
	reasonTimeout    = "timeout"
	reasonHTTPStatus = "http_status"
	reasonTooLarge   = "too_large"
	reasonMalformed  = "malformed"
)

var pprofReasons = [...]string{reasonConnect, reasonTimeout, reasonHTTPStatus, reasonTooLarge, reasonMalformed}

// Defaults for zero PprofOptions fields; they match agent.conf.
const (
	defaultPprofTimeout  = 5 * time.Second
	defaultPprofMaxBytes = 32 << 20
)

// PprofOptions configure the heap profile puller ([pprof] in agent.conf).
type PprofOptions struct {
	// URL serves the app's heap profile in pprof format (Go's
	// /debug/pprof/heap). Empty means the app has no heap source.
	URL string
	// Timeout bounds one fetch, body included (default 5s).
	Timeout time.Duration
	// MaxBytes bounds the response body and, for a gzip-compressed
	// profile, its decompressed size too, so that a small compressed body
	// cannot expand into unbounded memory (default 32 MiB).
	MaxBytes int64
	// Interval is the least time between two fetches: Collect may be
	// called far more often than a heap profile is worth taking.
	Interval time.Duration
}

var (
	errPprofTooLarge  = errors.New("heap profile too large")
	errPprofMalformed = errors.New("malformed heap profile")
	errPprofStatus    = errors.New("unexpected HTTP status")
)

// PprofHeap pulls the app's heap profile, writes its totals as signals and
// keeps the parsed profile in a signals.Profiles store under "heap" for
// the heap_leak rule to diff. It implements Collector and Closer.
type PprofHeap struct {
	po       PprofOptions
	url      string // for messages: the password, if any, redacted
	profiles *signals.Profiles
	client   *http.Client
	now      func() time.Time

	mu      sync.Mutex
	last    time.Time // of the last attempt, successful or not
	lastErr error     // its outcome, repeated until the next attempt
	fetches float64
	errs    map[string]float64
}

// NewPprofHeap returns the heap profile puller. o.Profiles may be nil, in
// which case only the totals are recorded.
func NewPprofHeap(o Options, po PprofOptions) *PprofHeap {
	profiles := o.Profiles
	if po.Timeout <= 0 {
		po.Timeout = defaultPprofTimeout
	}
	if po.MaxBytes <= 0 {
		po.MaxBytes = defaultPprofMaxBytes
	}
	shown := po.URL
	if u, err := url.Parse(po.URL); err == nil {
		shown = u.Redacted()
	}
	tr := http.DefaultTransport.(*http.Transport).Clone()
	// The app is the pod's own process: a proxy from the environment
	// would be wrong for it, and one idle connection is all a fetch every
	// few seconds needs.
	tr.Proxy = nil
	tr.MaxIdleConns = 1
	return &PprofHeap{
		po:       po,
		url:      shown,
		profiles: profiles,
		client:   &http.Client{Transport: tr},
		now:      time.Now,
		errs:     make(map[string]float64, len(pprofReasons)),
	}
}

func (c *PprofHeap) Name() string { return signals.CollectorPprofHeap }

// Close drops the idle connection to the app.
func (c *PprofHeap) Close() error {
	c.client.CloseIdleConnections()
	return nil
}

// Collect fetches a heap profile when Interval has passed since the last
// attempt. Between attempts it returns the last attempt's error, so that
// the collector's status stays degraded while the source is failing rather
// than flapping at every call.
func (c *PprofHeap) Collect(ctx context.Context, _ workload.Process, store *signals.Store) error {
	if c.po.URL == "" {
		return fmt.Errorf("no heap profile source (pprof.heap_url is empty): %w", ErrNoData)
	}
	now := c.now()
	c.mu.Lock()
	if !c.last.IsZero() && now.Sub(c.last) < c.po.Interval {
		err := c.lastErr
		c.mu.Unlock()
		return err
	}
	c.last = now
	c.mu.Unlock()

	hp, err := c.fetch(ctx)
	done := c.now()
	c.mu.Lock()
	defer c.mu.Unlock()
	switch {
	case err == nil:
		c.fetches++
	case ctx.Err() != nil:
		// The agent is stopping: not the app's failure, and not counted.
		c.lastErr = fmt.Errorf("fetch %s: %w", c.url, err)
		return c.lastErr
	default:
		c.errs[pprofErrorReason(err)]++
	}
	store.Put(signals.PprofFetchesTotal, nil, c.fetches, done)
	for _, r := range pprofReasons {
		store.Put(signals.PprofFetchErrorsTotal, signals.L("reason", r), c.errs[r], done)
	}
	if err != nil {
		c.lastErr = fmt.Errorf("fetch %s: %w", c.url, err)
		return c.lastErr
	}
	c.lastErr = nil
	putSamples(store, done, hp.samples())
	store.Put(signals.PprofLastSuccessTimestampSeconds, nil, float64(done.UnixNano())/1e9, done)
	if c.profiles != nil {
		c.profiles.Add("heap", done, hp.Profile)
	}
	return nil
}

// fetch GETs and parses one heap profile.
func (c *PprofHeap) fetch(ctx context.Context) (heapProfile, error) {
	ctx, cancel := context.WithTimeout(ctx, c.po.Timeout)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, c.po.URL, nil)
	if err != nil {
		return heapProfile{}, err
	}
	resp, err := c.client.Do(req)
	if err != nil {
		// *url.Error repeats the URL, which Collect's message names once.
		if ue := (*url.Error)(nil); errors.As(err, &ue) {
			err = ue.Err
		}
		return heapProfile{}, err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return heapProfile{}, fmt.Errorf("%w %s", errPprofStatus, resp.Status)
	}
	if resp.ContentLength > c.po.MaxBytes {
		return heapProfile{}, fmt.Errorf("%d bytes announced, limit %d: %w", resp.ContentLength, c.po.MaxBytes, errPprofTooLarge)
	}
	b, err := io.ReadAll(io.LimitReader(resp.Body, c.po.MaxBytes+1))
	if err != nil {
		return heapProfile{}, fmt.Errorf("read body: %w", err)
	}
	if int64(len(b)) > c.po.MaxBytes {
		return heapProfile{}, fmt.Errorf("body over %d bytes: %w", c.po.MaxBytes, errPprofTooLarge)
	}
	return parseHeap(b, c.po.MaxBytes)
}

// pprofErrorReason classifies a failed fetch. A timeout is checked first
// because the transport reports it wrapped in the same *url.Error as a
// refused connection.
func pprofErrorReason(err error) string {
	var ne net.Error
	switch {
	case errors.Is(err, context.DeadlineExceeded), errors.As(err, &ne) && ne.Timeout():
		return reasonTimeout
	case errors.Is(err, errPprofTooLarge):
		return reasonTooLarge
	case errors.Is(err, errPprofStatus):
		return reasonHTTPStatus
	case errors.Is(err, errPprofMalformed):
		return reasonMalformed
	}
	// Refused, reset, unresolvable or an unusable URL: the app could not
	// be reached.
	return reasonConnect
}

// heapProfile is a parsed heap profile and its totals.
type heapProfile struct {
	Profile      *profile.Profile
	InuseBytes   float64
	InuseObjects float64
	AllocBytes   float64
	HasObjects   bool
	HasAlloc     bool
}

func (h heapProfile) samples() []sample {
	ss := make([]sample, 0, 3)
	ss = append(ss, sample{Desc: signals.HeapInuseBytes, Value: h.InuseBytes})
	if h.HasObjects {
		ss = append(ss, sample{Desc: signals.HeapInuseObjects, Value: h.InuseObjects})
	}
	if h.HasAlloc {
		ss = append(ss, sample{Desc: signals.HeapAllocBytesTotal, Value: h.AllocBytes})
	}
	return ss
}

var gzipMagic = []byte{0x1f, 0x8b}

// parseHeap parses a heap profile, gzip-compressed (what Go serves) or
// plain, and sums its live heap. It decompresses itself, because
// profile.Parse would decompress without a bound; decompressed data over
// maxBytes is rejected as too large. Any other failure wraps
// errPprofMalformed.
func parseHeap(b []byte, maxBytes int64) (hp heapProfile, err error) {
	if bytes.HasPrefix(b, gzipMagic) {
		zr, zerr := gzip.NewReader(bytes.NewReader(b))
		if zerr == nil {
			b, zerr = io.ReadAll(io.LimitReader(zr, maxBytes+1))
		}
		if zerr != nil {
			return heapProfile{}, fmt.Errorf("gunzip: %v: %w", zerr, errPprofMalformed)
		}
		if int64(len(b)) > maxBytes {
			return heapProfile{}, fmt.Errorf("over %d bytes decompressed: %w", maxBytes, errPprofTooLarge)
		}
		// profile.ParseData would gunzip a second layer without a bound.
		if bytes.HasPrefix(b, gzipMagic) {
			return heapProfile{}, fmt.Errorf("gzip inside gzip: %w", errPprofMalformed)
		}
	}
	// The input is the app's: a parser bug it triggers must cost one
	// profile, not the agent.
	defer func() {
		if r := recover(); r != nil {
			hp, err = heapProfile{}, fmt.Errorf("parser panic: %v: %w", r, errPprofMalformed)
		}
	}()
	p, err := profile.ParseData(b)
	if err != nil {
		return heapProfile{}, fmt.Errorf("%v: %w", err, errPprofMalformed)
	}
	return heapTotals(p)
}

// heapTotals sums the sample types the heap signals come from. ParseData
// has checked that every sample has one value per sample type.
func heapTotals(p *profile.Profile) (heapProfile, error) {
	bi, ok := signals.SampleIndex(p, signals.InuseSpace)
	if !ok {
		return heapProfile{}, fmt.Errorf("%w (sample types: %s): %w", signals.ErrNoInuseSpace, sampleTypeNames(p), errPprofMalformed)
	}
	oi, hasObjects := signals.SampleIndex(p, signals.InuseObjects)
	ai, hasAlloc := signals.SampleIndex(p, signals.AllocSpace)
	hp := heapProfile{Profile: p, HasObjects: hasObjects, HasAlloc: hasAlloc}
	for _, s := range p.Sample {
		hp.InuseBytes += float64(s.Value[bi])
		if hasObjects {
			hp.InuseObjects += float64(s.Value[oi])
		}
		if hasAlloc {
			hp.AllocBytes += float64(s.Value[ai])
		}
	}
	return hp, nil
}

func sampleTypeNames(p *profile.Profile) string {
	names := make([]string, 0, len(p.SampleType))
	for _, st := range p.SampleType {
		if st != nil {
			names = append(names, st.Type)
		}
	}
	return strings.Join(names, ",")
}
