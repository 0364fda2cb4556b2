package testenv

import (
	"context"
	"embed"
	"fmt"
	"net"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"testing"
	"time"
)

//go:embed testdata/node-app/package.json testdata/node-app/package-lock.json testdata/node-app/server.js
var nodeAppSource embed.FS

// The functions of testdata/node-app/server.js that the faults run, as
// node --perf-basic-prof names them in /tmp/perf-PID.map ("JS:~NAME" or
// "JS:*NAME" and the file's position).
const (
	// NodeExecFunction calls execSync (/exec).
	NodeExecFunction = "exportReportSync"
	// NodeCPUFunction calls crypto.pbkdf2Sync (/pbkdf2).
	NodeCPUFunction = "hashPasswordSync"
)

// NodeApp is testdata/node-app/server.js running under
// `node --perf-basic-prof`: a real Express service with the OpenTelemetry
// JS SDK (HTTP and Express instrumentation, OTLP/HTTP protobuf exporter),
// on 127.0.0.1 in its network namespace. Routes: / fast; /exec?ms=N
// (default 800) execSync('sleep ...') on the event loop; /pbkdf2?ms=N
// (default 500) pbkdf2Sync on the event loop. PID is node, whose main
// thread runs the event loop.
type NodeApp struct {
	*HTTPTarget
	// PerfMap is /tmp/perf-PID.map, node's names for JIT-compiled code;
	// removed when the app stops.
	PerfMap string
	// OTLPEndpoint is the exporter's endpoint as the app sees it (inside
	// its namespace), "" without one.
	OTLPEndpoint string
}

// NodeOptions for StartNodeApp.
type NodeOptions struct {
	// Netns to serve in; nil makes a fresh private one.
	Netns *Netns
	// OTLPEndpoint is OTEL_EXPORTER_OTLP_ENDPOINT for the app's OTLP/HTTP
	// exporter ("http://127.0.0.1:4318": the agent's receiver); "" exports
	// nothing. A loopback endpoint is taken to be in the test's own
	// namespace and is relayed into the app's (Netns.Forward), as a
	// sidecar's receiver would be in the pod's.
	OTLPEndpoint string
	// ServiceName is OTEL_SERVICE_NAME (default "culprit-node-app").
	ServiceName string
	// Env is more of the app's environment.
	Env []string
}

// StartNodeApp installs the app's packages (once per machine, cached)
// and starts it.
func StartNodeApp(t testing.TB, o NodeOptions) *NodeApp {
	t.Helper()
	nodeExe := lookProgram(t, "node", "apt-get install nodejs npm")
	modules := NodeModules(t)
	dir := t.TempDir()
	src, err := nodeAppSource.ReadFile("testdata/node-app/server.js")
	if err != nil {
		t.Fatalf("testenv: embedded server.js: %v", err)
	}
	script := filepath.Join(dir, "server.js")
	if err := os.WriteFile(script, src, 0o644); err != nil {
		t.Fatalf("testenv: node app: %v", err)
	}
	// require() looks for node_modules beside the script.
	if err := os.Symlink(filepath.Join(modules, "node_modules"), filepath.Join(dir, "node_modules")); err != nil {
		t.Fatalf("testenv: node app: %v", err)
	}
	ns := o.Netns
	if ns == nil {
		ns = NewNetns(t)
	}
	port, err := ns.FreePort()
	if err != nil {
		t.Fatalf("testenv: node app port: %v", err)
	}
	if o.ServiceName == "" {
		o.ServiceName = "culprit-node-app"
	}
	env := []string{"PORT=" + strconv.Itoa(port), "OTEL_SERVICE_NAME=" + o.ServiceName, "NODE_ENV=production"}
	endpoint := ""
	if o.OTLPEndpoint != "" {
		endpoint = otlpInNetns(t, ns, o.OTLPEndpoint)
		env = append(env, "OTEL_EXPORTER_OTLP_ENDPOINT="+endpoint)
	}
	p := startProcess(t, ns, dir, nodeExe, []string{"--perf-basic-prof", script}, append(env, o.Env...))
	a := &NodeApp{
		HTTPTarget:   newHTTPTarget(t, p, net.JoinHostPort("127.0.0.1", strconv.Itoa(port))),
		PerfMap:      fmt.Sprintf("/tmp/perf-%d.map", p.PID),
		OTLPEndpoint: endpoint,
	}
	p.cleanups = append(p.cleanups, func() { _ = os.Remove(a.PerfMap) })
	p.waitFor(t, "serving /", 30*time.Second, func() error { return a.expect200("/") })
	return a
}

// otlpInNetns returns endpoint as the app in ns reaches it: a loopback
// host:port of the test's namespace becomes a relay's address in ns.
func otlpInNetns(t testing.TB, ns *Netns, endpoint string) string {
	t.Helper()
	u, err := url.Parse(endpoint)
	if err != nil || u.Host == "" {
		t.Fatalf("testenv: OTLP endpoint %q: want scheme://host:port (%v)", endpoint, err)
	}
	if ns.Own() {
		return endpoint
	}
	host := u.Hostname()
	if ip := net.ParseIP(host); host != "localhost" && (ip == nil || !ip.IsLoopback()) {
		return endpoint // not on loopback: nothing to relay
	}
	port := u.Port()
	if port == "" {
		port = "4318"
	}
	u.Host = ns.Forward(t, net.JoinHostPort(host, port))
	return u.String()
}

// NodeModules installs testdata/node-app's packages with `npm ci` from
// its package-lock.json into the cache (CacheDir), keyed by the lock and
// package.json, once per machine; it returns the directory holding
// node_modules. npm ci needs the npm registry the first time.
func NodeModules(t testing.TB) string {
	t.Helper()
	npm := lookProgram(t, "npm", "apt-get install npm")
	files, err := embeddedFiles(nodeAppSource, "testdata/node-app")
	if err != nil {
		t.Fatalf("testenv: %v", err)
	}
	manifest := map[string][]byte{"package.json": files["package.json"], "package-lock.json": files["package-lock.json"]}
	return cached(t, "node-app-"+hashKey(manifest), "node-app", func(dst string) error {
		if err := os.Mkdir(dst, 0o755); err != nil {
			return fmt.Errorf("node app dir: %w", err)
		}
		for name, b := range manifest {
			if err := os.WriteFile(filepath.Join(dst, name), b, 0o644); err != nil {
				return fmt.Errorf("node app dir: %w", err)
			}
		}
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
		defer cancel()
		// --ignore-scripts: no package needs an install script, and
		// none should run one on a test machine.
		cmd := exec.CommandContext(ctx, npm, "ci", "--prefix", dst, "--no-audit", "--no-fund", "--ignore-scripts", "--loglevel=error")
		cmd.Dir = dst
		cmd.Env = cleanEnv()
		start := time.Now()
		if out, err := cmd.CombinedOutput(); err != nil {
			return fmt.Errorf("npm ci --prefix %s: %w\n%s", dst, err, out)
		}
		t.Logf("testenv: npm ci of node-app in %v", time.Since(start).Round(100*time.Millisecond))
		return nil
	})
}
