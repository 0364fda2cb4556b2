package testenv

import (
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/user"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"
)

// Nginx is a real nginx: a master (PID, which serves nothing) and its
// worker processes (WorkerPIDs), with a private config in a temp dir,
// serving on 127.0.0.1 in its network namespace:
//
//	/ok           200 "ok\n" from the config (no file)
//	/index.html   a 1 KiB static file (also /)
//
// Keep-alive is on (75 s, 100,000 requests per connection), access logs
// off. As root, the workers run as nobody, as in production.
type Nginx struct {
	*HTTPTarget
	WorkerPIDs []int
}

// NginxOptions for StartNginx.
type NginxOptions struct {
	// Netns to serve in; nil makes a fresh private one.
	Netns *Netns
	// Workers is worker_processes (default 2).
	Workers int
	// Server is extra directives inside the server block (locations).
	Server string
	// Listen is extra parameters of its listen directive ("backlog=16",
	// "reuseport"); the address is the helper's.
	Listen string
}

// StartNginx starts nginx and waits until it serves its static file.
func StartNginx(t testing.TB, o NginxOptions) *Nginx {
	t.Helper()
	exe := lookProgram(t, "nginx", "apt-get install nginx")
	if o.Workers <= 0 {
		o.Workers = 2
	}
	dir := t.TempDir()
	www := filepath.Join(dir, "www")
	tmp := filepath.Join(dir, "tmp")
	for _, d := range []string{www, tmp, filepath.Join(dir, "logs")} {
		if err := os.Mkdir(d, 0o755); err != nil {
			t.Fatalf("testenv: nginx dir: %v", err)
		}
	}
	page := strings.Repeat("culprit nginx ", 80)[:1023] + "\n"
	if err := os.WriteFile(filepath.Join(www, "index.html"), []byte(page), 0o644); err != nil {
		t.Fatalf("testenv: nginx page: %v", err)
	}
	userLine := ""
	if os.Geteuid() == 0 {
		// As root the master drops its workers to an unprivileged user,
		// which must reach the document root: t.TempDir's directories are
		// 0700 (the bench script's first version measured 403s for this).
		u, g, err := nobody()
		if err != nil {
			t.Fatalf("testenv: nginx worker user: %v", err)
		}
		userLine = fmt.Sprintf("user %s %s;", u.Username, g)
		if err := traversable(dir); err != nil {
			t.Fatalf("testenv: nginx document root: %v", err)
		}
		uid, _ := strconv.Atoi(u.Uid)
		if err := os.Chown(tmp, uid, -1); err != nil {
			t.Fatalf("testenv: nginx temp dir: %v", err)
		}
	}
	ns := o.Netns
	if ns == nil {
		ns = NewNetns(t)
	}
	port, err := ns.FreePort()
	if err != nil {
		t.Fatalf("testenv: nginx port: %v", err)
	}
	addr := net.JoinHostPort("127.0.0.1", strconv.Itoa(port))
	conf := fmt.Sprintf(`# culprit testenv: a private nginx (internal/testenv/nginx.go)
%s
worker_processes %d;
daemon off;
master_process on;
pid %[3]s/nginx.pid;
error_log %[3]s/logs/error.log warn;
events { worker_connections 4096; }
http {
  access_log off;
  default_type text/html;
  sendfile on;
  keepalive_timeout 75s;
  keepalive_requests 100000;
  client_body_temp_path %[4]s/body;
  proxy_temp_path %[4]s/proxy;
  fastcgi_temp_path %[4]s/fastcgi;
  uwsgi_temp_path %[4]s/uwsgi;
  scgi_temp_path %[4]s/scgi;
  server {
    listen %[5]s %[6]s;
    root %[7]s;
    location = /ok { return 200 "ok\n"; }
%[8]s
  }
}
`, userLine, o.Workers, dir, tmp, addr, o.Listen, www, o.Server)
	confPath := filepath.Join(dir, "nginx.conf")
	if err := os.WriteFile(confPath, []byte(conf), 0o644); err != nil {
		t.Fatalf("testenv: nginx config: %v", err)
	}
	// -p and -e keep nginx away from /usr/share/nginx and /var/log/nginx,
	// which it would otherwise open before reading the config.
	args := []string{"-p", dir + "/", "-e", filepath.Join(dir, "logs", "error.log"), "-c", confPath}
	p := startProcess(t, ns, dir, exe, args, nil)
	n := &Nginx{HTTPTarget: newHTTPTarget(t, p, addr)}
	p.waitFor(t, "serving /ok", 15*time.Second, func() error { return n.expect200("/ok") })
	if err := n.expect200("/index.html"); err != nil {
		t.Fatalf("testenv: nginx serves /ok but not its file (%v): the workers cannot read %s? error log:\n%s", err, www, readTail(filepath.Join(dir, "logs", "error.log"), 20))
	}
	// The master forks its workers before they serve; count them.
	p.waitFor(t, fmt.Sprintf("running %d workers", o.Workers), 10*time.Second, func() error {
		kids, err := childPIDs(p.PID)
		if err != nil {
			return err
		}
		if len(kids) < o.Workers {
			return fmt.Errorf("%d of %d workers", len(kids), o.Workers)
		}
		slices.Sort(kids)
		n.WorkerPIDs = kids
		return nil
	})
	return n
}

func (h *HTTPTarget) expect200(path string) error {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	r, err := h.Get(ctx, path)
	if err != nil {
		return err
	}
	if r.Status != http.StatusOK {
		return fmt.Errorf("GET %s: %d %q", path, r.Status, strings.TrimSpace(r.Body))
	}
	return nil
}

// nobody returns the unprivileged user and its group's name (Debian's
// nobody is in nogroup, and nginx's "user nobody;" alone would look for a
// group named nobody).
func nobody() (*user.User, string, error) {
	u, err := user.Lookup("nobody")
	if err != nil {
		return nil, "", fmt.Errorf("look up user nobody: %w", err)
	}
	g, err := user.LookupGroupId(u.Gid)
	if err != nil {
		return nil, "", fmt.Errorf("group %s of nobody: %w", u.Gid, err)
	}
	return u, g.Name, nil
}

// traversable lets every user through dir and the directories above it,
// up to the system's temp dir (t.TempDir makes two 0700 levels). Nothing
// is made readable: o+x only.
func traversable(dir string) error {
	root := filepath.Clean(os.TempDir())
	for d := filepath.Clean(dir); d != root && strings.HasPrefix(d, root+"/"); d = filepath.Dir(d) {
		st, err := os.Stat(d)
		if err != nil {
			return fmt.Errorf("stat %s: %w", d, err)
		}
		if st.Mode().Perm()&0o001 == 0 {
			if err := os.Chmod(d, st.Mode().Perm()|0o011); err != nil {
				return fmt.Errorf("chmod o+x %s: %w", d, err)
			}
		}
	}
	return nil
}

func readTail(path string, n int) string {
	b, err := os.ReadFile(path)
	if err != nil {
		return fmt.Sprintf("(%v)", err)
	}
	lines := strings.Split(strings.TrimRight(string(b), "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

// HTTPTarget is a real program serving HTTP on Addr (127.0.0.1:PORT) in
// its network namespace. Its methods reach it from inside that namespace.
type HTTPTarget struct {
	*Process
	Addr string
	URL  string // http://Addr

	client *http.Client
}

func newHTTPTarget(t testing.TB, p *Process, addr string) *HTTPTarget {
	tr := &http.Transport{
		DialContext:         p.Netns.DialContext,
		MaxIdleConnsPerHost: 64,
		IdleConnTimeout:     30 * time.Second,
	}
	t.Cleanup(tr.CloseIdleConnections)
	return &HTTPTarget{Process: p, Addr: addr, URL: "http://" + addr, client: &http.Client{Transport: tr}}
}

// Client is an HTTP client whose connections are made inside the
// target's namespace (keep-alive, shared by the test's calls: concurrent
// requests get connections of their own).
func (h *HTTPTarget) Client() *http.Client { return h.client }

// HTTPResult is one answer.
type HTTPResult struct {
	Status  int
	Header  http.Header
	Body    string
	Elapsed time.Duration // from sending the request to the end of the body
}

// Get requests path (with its query) and reads the whole answer.
func (h *HTTPTarget) Get(ctx context.Context, path string) (*HTTPResult, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, h.URL+path, nil)
	if err != nil {
		return nil, fmt.Errorf("GET %s: %w", path, err)
	}
	start := time.Now()
	resp, err := h.client.Do(req)
	if err != nil {
		return nil, fmt.Errorf("GET %s: %w", path, err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		return nil, fmt.Errorf("GET %s: read body: %w", path, err)
	}
	return &HTTPResult{Status: resp.StatusCode, Header: resp.Header, Body: string(b), Elapsed: time.Since(start)}, nil
}

// MustGet is Get with a 30 s timeout that fails the test on a transport
// error or a non-2xx answer.
func (h *HTTPTarget) MustGet(t testing.TB, path string) *HTTPResult {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	r, err := h.Get(ctx, path)
	if err != nil {
		t.Fatalf("testenv: %v", err)
	}
	if r.Status/100 != 2 {
		t.Fatalf("testenv: GET %s: %d %q", path, r.Status, strings.TrimSpace(r.Body))
	}
	return r
}

// HTTPLoadOptions for StartLoad: a healthy steady load.
type HTTPLoadOptions struct {
	// Conns is how many keep-alive connections carry it (default 4); each
	// is used by one client in turn, as a pooled client would.
	Conns int
	// Rate is the requests per second over all connections (default 200).
	// Requests are paced, never bursting to catch up.
	Rate float64
	// Path is what is requested (default "/").
	Path string
	// Duration bounds the load (default and at most 10 minutes); Stop or
	// the end of the test end it sooner.
	Duration time.Duration
}

// StartLoad sends a steady keep-alive HTTP load to the target from
// inside its namespace until Stop.
func (h *HTTPTarget) StartLoad(t testing.TB, o HTTPLoadOptions) *Load {
	t.Helper()
	if o.Path == "" {
		o.Path = "/"
	}
	url := h.URL + o.Path
	return startLoad(t, o.Conns, o.Rate, o.Duration, func(l *Load) loadWorker {
		// One transport, one connection per worker: the load's
		// connection count is exact, and a new dial means the server
		// closed a keep-alive connection.
		tr := &http.Transport{
			DialContext: func(ctx context.Context, network, addr string) (net.Conn, error) {
				l.dialed()
				return h.Netns.DialContext(ctx, network, addr)
			},
			MaxConnsPerHost:     1,
			MaxIdleConnsPerHost: 1,
		}
		c := &http.Client{Transport: tr, Timeout: 30 * time.Second}
		return loadWorker{
			op: func(ctx context.Context) error {
				req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
				if err != nil {
					return err
				}
				resp, err := c.Do(req)
				if err != nil {
					return err
				}
				_, err = io.Copy(io.Discard, resp.Body)
				resp.Body.Close()
				if err != nil {
					return fmt.Errorf("read body: %w", err)
				}
				if resp.StatusCode/100 != 2 {
					return fmt.Errorf("GET %s: %s", o.Path, resp.Status)
				}
				return nil
			},
			close: tr.CloseIdleConnections,
		}
	})
}

// Load is a steady load running in the background (HTTPTarget.StartLoad,
// Redis.StartLoad).
type Load struct {
	cancel context.CancelFunc
	done   chan struct{}
	start  time.Time

	mu       sync.Mutex
	lat      []time.Duration
	errs     int
	firstErr error
	dials    int
	stats    *LoadStats // set by Stop
}

// LoadStats is what a load saw.
type LoadStats struct {
	Requests int // answered well
	Errors   int // failed (transport errors, non-2xx, Redis errors)
	// FirstError is the first failure, for the test's message.
	FirstError error
	// Conns is how many connections were opened: the load's Conns when
	// keep-alive held throughout.
	Conns         int
	P50, P99, Max time.Duration // of the good answers
	Elapsed       time.Duration
}

func (s LoadStats) String() string {
	return fmt.Sprintf("%d requests in %v (%.0f/s), %d errors, %d connections, p50 %v p99 %v max %v",
		s.Requests, s.Elapsed.Round(time.Millisecond), float64(s.Requests)/max(s.Elapsed.Seconds(), 1e-9),
		s.Errors, s.Conns, s.P50, s.P99, s.Max)
}

// loadWorker is one connection's client: op makes one request.
type loadWorker struct {
	op    func(ctx context.Context) error
	close func()
}

func (l *Load) dialed() {
	l.mu.Lock()
	l.dials++
	l.mu.Unlock()
}

func (l *Load) record(d time.Duration, err error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if err != nil {
		l.errs++
		if l.firstErr == nil {
			l.firstErr = err
		}
		return
	}
	l.lat = append(l.lat, d)
}

// startLoad runs conns workers, each pacing its requests so that all of
// them make rate requests a second, staggered over the interval.
func startLoad(t testing.TB, conns int, rate float64, d time.Duration, newWorker func(*Load) loadWorker) *Load {
	t.Helper()
	if conns <= 0 {
		conns = 4
	}
	if rate <= 0 {
		rate = 200
	}
	if d <= 0 || d > 10*time.Minute {
		d = 10 * time.Minute
	}
	ctx, cancel := context.WithTimeout(context.Background(), d)
	l := &Load{cancel: cancel, done: make(chan struct{}), start: time.Now()}
	interval := time.Duration(float64(conns) / rate * float64(time.Second))
	var wg sync.WaitGroup
	for i := range conns {
		w := newWorker(l)
		wg.Add(1)
		go func() {
			defer wg.Done()
			defer w.close()
			next := l.start.Add(interval * time.Duration(i) / time.Duration(conns))
			for {
				if wait := time.Until(next); wait > 0 {
					select {
					case <-ctx.Done():
						return
					case <-time.After(wait):
					}
				}
				if ctx.Err() != nil {
					return
				}
				t0 := time.Now()
				err := w.op(ctx)
				if ctx.Err() != nil {
					return // cut by Stop: not the server's failure
				}
				l.record(time.Since(t0), err)
				next = next.Add(interval)
				if now := time.Now(); now.After(next) {
					next = now // late: carry on at the rate, no burst
				}
			}
		}()
	}
	go func() {
		wg.Wait()
		close(l.done)
	}()
	t.Cleanup(func() { l.Stop() })
	return l
}

// Stop ends the load, waits for its clients, and returns what it saw.
// It may be called again; it returns the same.
func (l *Load) Stop() LoadStats {
	l.cancel()
	<-l.done
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.stats == nil {
		s := l.snapshot()
		l.stats = &s
	}
	return *l.stats
}

// Stats returns what the load saw so far, without stopping it.
func (l *Load) Stats() LoadStats {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.stats != nil {
		return *l.stats
	}
	return l.snapshot()
}

func (l *Load) snapshot() LoadStats {
	lat := slices.Clone(l.lat)
	slices.Sort(lat)
	s := LoadStats{Requests: len(lat), Errors: l.errs, FirstError: l.firstErr, Conns: l.dials, Elapsed: time.Since(l.start)}
	if n := len(lat); n > 0 {
		s.P50, s.P99, s.Max = lat[n/2], lat[min(n-1, n*99/100)], lat[n-1]
	}
	return s
}
