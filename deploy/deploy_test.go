// Package deploy holds culprit's container image and Kubernetes manifests.
// Its tests decode every manifest strictly with the real Kubernetes API
// types, check what a working sidecar needs, start the real agent with the
// pod's arguments, environment and ConfigMap, and (as root) check that the
// capabilities the manifests grant are enough for every probe.
package deploy

import (
	"bufio"
	"bytes"
	"context"
	"debug/elf"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"maps"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"github.com/pelletier/go-toml/v2"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	kjson "sigs.k8s.io/json"
	"sigs.k8s.io/yaml"

	"github.com/culprit-dev/culprit/exporters"
	culpritv1 "github.com/culprit-dev/culprit/proto/culprit/v1"
)

const (
	culpritName = "culprit"
	metricsPort = "metrics"
	confKey     = "agent.conf" // the ConfigMap key, and the file name under the mount
)

// serviceMonitor is the part of the Prometheus Operator's CRD the manifest
// uses (its Go types are not in k8s.io/api). Strict decoding into it
// rejects any other field, as for the built-in kinds.
type serviceMonitor struct {
	APIVersion string `json:"apiVersion"`
	Kind       string `json:"kind"`
	Metadata   struct {
		Name   string            `json:"name"`
		Labels map[string]string `json:"labels"`
	} `json:"metadata"`
	Spec struct {
		Selector struct {
			MatchLabels map[string]string `json:"matchLabels"`
		} `json:"selector"`
		Endpoints []struct {
			Port     string `json:"port"`
			Path     string `json:"path"`
			Interval string `json:"interval"`
		} `json:"endpoints"`
	} `json:"spec"`
}

type manifests struct {
	deployments map[string]*appsv1.Deployment // by file name
	configMaps  []*corev1.ConfigMap
	services    []*corev1.Service
	monitors    []*serviceMonitor
}

// splitDocuments splits a multi-document YAML file on "---" lines,
// dropping empty documents.
func splitDocuments(b []byte) [][]byte {
	var docs [][]byte
	for _, d := range bytes.Split(append([]byte("\n"), b...), []byte("\n---\n")) {
		if len(bytes.TrimSpace(d)) > 0 {
			docs = append(docs, d)
		}
	}
	return docs
}

// decodeDocument decodes one document strictly (unknown and duplicate
// fields are errors) into the type its kind names.
func decodeDocument(doc []byte) (any, error) {
	var head struct {
		APIVersion string `json:"apiVersion"`
		Kind       string `json:"kind"`
	}
	if err := yaml.Unmarshal(doc, &head); err != nil {
		return nil, err
	}
	var (
		into       any
		apiVersion string
	)
	switch head.Kind {
	case "Deployment":
		into, apiVersion = &appsv1.Deployment{}, "apps/v1"
	case "ConfigMap":
		into, apiVersion = &corev1.ConfigMap{}, "v1"
	case "Service":
		into, apiVersion = &corev1.Service{}, "v1"
	case "ServiceMonitor":
		into, apiVersion = &serviceMonitor{}, "monitoring.coreos.com/v1"
	default:
		return nil, fmt.Errorf("unexpected kind %q", head.Kind)
	}
	if head.APIVersion != apiVersion {
		return nil, fmt.Errorf("%s: apiVersion %q, want %q", head.Kind, head.APIVersion, apiVersion)
	}
	if err := unmarshalStrict(doc, into); err != nil {
		return nil, fmt.Errorf("%s: %w", head.Kind, err)
	}
	return into, nil
}

// unmarshalStrict decodes YAML as the API server does with strict field
// validation: duplicate keys and unknown fields are errors, and field
// names are case-sensitive. (sigs.k8s.io/yaml's UnmarshalStrict ends in
// encoding/json, which would take "targetport" for "targetPort".)
func unmarshalStrict(doc []byte, into any) error {
	j, err := yaml.YAMLToJSONStrict(doc)
	if err != nil {
		return err
	}
	strict, err := kjson.UnmarshalStrict(j, into, kjson.DisallowDuplicateFields, kjson.DisallowUnknownFields)
	if err != nil {
		return err
	}
	return errors.Join(strict...)
}

// decodeFile decodes every document of one manifest file into m.
func decodeFile(name string, b []byte, m *manifests) error {
	for i, doc := range splitDocuments(b) {
		obj, err := decodeDocument(doc)
		if err != nil {
			return fmt.Errorf("%s document %d: %w", name, i, err)
		}
		switch o := obj.(type) {
		case *appsv1.Deployment:
			if _, dup := m.deployments[name]; dup {
				return fmt.Errorf("%s: more than one Deployment", name)
			}
			m.deployments[name] = o
		case *corev1.ConfigMap:
			m.configMaps = append(m.configMaps, o)
		case *corev1.Service:
			m.services = append(m.services, o)
		case *serviceMonitor:
			m.monitors = append(m.monitors, o)
		}
	}
	return nil
}

func load(t *testing.T) manifests {
	t.Helper()
	files, err := filepath.Glob("kubernetes/*.yaml")
	if err != nil || len(files) == 0 {
		t.Fatalf("no manifests under kubernetes/: %v", err)
	}
	m := manifests{deployments: map[string]*appsv1.Deployment{}}
	for _, f := range files {
		b, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		if err := decodeFile(filepath.Base(f), b, &m); err != nil {
			t.Fatal(err)
		}
	}
	return m
}

func TestManifestsDecodeStrictly(t *testing.T) {
	m := load(t)
	if len(m.deployments) != 2 || len(m.configMaps) != 1 || len(m.services) != 1 || len(m.monitors) != 1 {
		t.Fatalf("want 2 Deployments, 1 ConfigMap, 1 Service, 1 ServiceMonitor; have %d, %d, %d, %d",
			len(m.deployments), len(m.configMaps), len(m.services), len(m.monitors))
	}
}

// The shipped files, each with one mistake, must fail to decode: proof
// that the strict decoding above would catch it.
func TestStrictDecodingRejectsMistakes(t *testing.T) {
	for _, tc := range []struct {
		file, old, new, want string
	}{
		{"pod-sidecar.yaml", "securityContext:", "securityContextt:", "securityContextt"},
		{"pod-native-sidecar.yaml", "\n          restartPolicy: Always", "\n          restartPolicyy: Always", "restartPolicyy"},
		{"pod-sidecar.yaml", "readOnlyRootFilesystem: true", "readOnlyRootFilesystem: true\n            readOnlyRootFilesystem: false", "readOnlyRootFilesystem"},
		{"configmap.yaml", "\ndata:", "\ndat:", "dat"},
		{"servicemonitor.yaml", "endpoints:", "endpoint:", "endpoint"},
		{"servicemonitor.yaml", "targetPort: metrics", "targetport: metrics", "targetport"},
		{"servicemonitor.yaml", "apiVersion: monitoring.coreos.com/v1", "apiVersion: monitoring.coreos.com/v1beta1", "v1beta1"},
	} {
		t.Run(tc.file+"/"+tc.want, func(t *testing.T) {
			b, err := os.ReadFile(filepath.Join("kubernetes", tc.file))
			if err != nil {
				t.Fatal(err)
			}
			if err := decodeFile(tc.file, b, &manifests{deployments: map[string]*appsv1.Deployment{}}); err != nil {
				t.Fatalf("the shipped file does not decode: %v", err)
			}
			if !bytes.Contains(b, []byte(tc.old)) {
				t.Fatalf("%q is no longer in %s: update this test", tc.old, tc.file)
			}
			bad := bytes.Replace(b, []byte(tc.old), []byte(tc.new), 1)
			err = decodeFile(tc.file, bad, &manifests{deployments: map[string]*appsv1.Deployment{}})
			if err == nil {
				t.Fatalf("%s with %q decoded without error", tc.file, tc.new)
			}
			if !strings.Contains(err.Error(), tc.want) {
				t.Errorf("error does not name %q: %v", tc.want, err)
			}
		})
	}
}

// culpritContainer returns the culprit container of a pod spec and whether
// it is a native sidecar.
func culpritContainer(t *testing.T, spec corev1.PodSpec) (corev1.Container, bool) {
	t.Helper()
	var found []corev1.Container
	native := false
	for _, c := range spec.InitContainers {
		if c.Name == culpritName {
			if c.RestartPolicy == nil || *c.RestartPolicy != corev1.ContainerRestartPolicyAlways {
				t.Errorf("culprit is an init container without restartPolicy: Always: the app would never start")
			}
			found, native = append(found, c), true
		}
	}
	for _, c := range spec.Containers {
		if c.Name == culpritName {
			if c.RestartPolicy != nil {
				t.Errorf("culprit in containers has a restartPolicy (only init containers take one)")
			}
			found = append(found, c)
		}
	}
	if len(found) != 1 {
		t.Fatalf("want one culprit container, have %d", len(found))
	}
	return found[0], native
}

// agentFlag is a flag of `culprit agent`, from its -h output.
type agentFlag struct{ takesValue bool }

var (
	buildOnce sync.Once
	builtBin  string
	buildErr  error
	buildDir  string
)

// TestMain removes the binary built once for all tests.
func TestMain(m *testing.M) {
	code := m.Run()
	if buildDir != "" {
		os.RemoveAll(buildDir)
	}
	os.Exit(code)
}

// culpritBinary builds the agent once, as deploy/Dockerfile does
// (CGO_ENABLED=0, -trimpath).
func culpritBinary(t *testing.T) string {
	t.Helper()
	buildOnce.Do(func() {
		buildDir, buildErr = os.MkdirTemp("", "culprit-deploy-test")
		if buildErr != nil {
			return
		}
		builtBin = filepath.Join(buildDir, "culprit")
		cmd := exec.Command("go", "build", "-trimpath", "-o", builtBin, "../agent")
		cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
		if out, err := cmd.CombinedOutput(); err != nil {
			buildErr = fmt.Errorf("go build: %v\n%s", err, out)
		}
	})
	if buildErr != nil {
		t.Fatal(buildErr)
	}
	return builtBin
}

// agentFlags parses the flags `culprit agent -h` lists.
func agentFlags(t *testing.T) map[string]agentFlag {
	t.Helper()
	out, _ := exec.Command(culpritBinary(t), "agent", "-h").CombinedOutput()
	flags := map[string]agentFlag{}
	for _, m := range regexp.MustCompile(`(?m)^  -([a-z][a-z0-9-]*)( \S+)?$`).FindAllStringSubmatch(string(out), -1) {
		flags[m[1]] = agentFlag{takesValue: m[2] != ""}
	}
	if len(flags) < 5 {
		t.Fatalf("could not read the flags of `culprit agent -h`:\n%s", out)
	}
	return flags
}

// confKeys flattens an agent.conf into dotted keys and their values.
func confKeys(t *testing.T, name string, data []byte) map[string]any {
	t.Helper()
	var tree map[string]any
	if err := toml.Unmarshal(data, &tree); err != nil {
		t.Fatalf("%s: %v", name, err)
	}
	out := map[string]any{}
	var walk func(prefix string, m map[string]any)
	walk = func(prefix string, m map[string]any) {
		for k, v := range m {
			if sub, ok := v.(map[string]any); ok {
				walk(prefix+k+".", sub)
				continue
			}
			out[prefix+k] = v
		}
	}
	walk("", tree)
	return out
}

// defaults are the keys of the repository's agent.conf, which documents
// every key with its default (a test in agent/ keeps it equal to the
// built-in defaults).
func defaults(t *testing.T) map[string]any {
	t.Helper()
	b, err := os.ReadFile("../agent.conf")
	if err != nil {
		t.Fatal(err)
	}
	return confKeys(t, "agent.conf", b)
}

// envName is the variable that overrides key (agent/config.go's EnvName).
func envName(key string) string {
	return "CULPRIT_" + strings.ToUpper(strings.ReplaceAll(key, ".", "_"))
}

// flagKeys maps the agent's shorthand flags to the keys they set.
var flagKeys = map[string]string{
	"pid": "target.pid", "port": "target.port", "cmd": "target.cmd",
	"http-addr": "agent.http_addr", "grpc-addr": "agent.grpc_addr", "log-level": "agent.log_level",
}

// dockerEntrypoint returns the ENTRYPOINT of deploy/Dockerfile.
func dockerEntrypoint(t *testing.T) []string {
	t.Helper()
	b, err := os.ReadFile("Dockerfile")
	if err != nil {
		t.Fatal(err)
	}
	m := regexp.MustCompile(`(?m)^ENTRYPOINT (\[.*\])\s*$`).FindAllSubmatch(b, -1)
	if len(m) != 1 {
		t.Fatalf("want one exec-form ENTRYPOINT in the Dockerfile, have %d", len(m))
	}
	var ep []string
	if err := json.Unmarshal(m[0][1], &ep); err != nil {
		t.Fatalf("ENTRYPOINT: %v", err)
	}
	if len(ep) < 2 || ep[0] != "/culprit" || ep[1] != "agent" {
		t.Fatalf("ENTRYPOINT %q does not run /culprit agent", ep)
	}
	return ep
}

// effective is the configuration the culprit container runs with, as the
// agent layers it: defaults, the file (the ConfigMap), CULPRIT_*
// variables, flags. Values are TOML values from files and strings from
// the environment and flags.
type effective struct {
	config string         // --config
	keys   map[string]any // every key
	set    map[string]any // the keys the pod sets, and how
}

func (e effective) str(key string) string { return fmt.Sprint(e.keys[key]) }

func effectiveConfig(t *testing.T, c corev1.Container, conf string) effective {
	t.Helper()
	def := defaults(t)
	e := effective{keys: map[string]any{}, set: map[string]any{}}
	for k, v := range def {
		e.keys[k] = v
	}
	assign := func(where, key string, v any) {
		if _, ok := def[key]; !ok {
			t.Errorf("%s sets %s, which is not an agent.conf key", where, key)
			return
		}
		e.keys[key], e.set[key] = v, v
	}
	for k, v := range confKeys(t, "the ConfigMap's agent.conf", []byte(conf)) {
		assign("the ConfigMap's agent.conf", k, v)
	}
	byEnv := map[string]string{}
	for k := range def {
		byEnv[envName(k)] = k
	}
	for _, ev := range c.Env {
		if !strings.HasPrefix(ev.Name, "CULPRIT_") {
			continue
		}
		key, ok := byEnv[ev.Name]
		if !ok {
			// The agent ignores CULPRIT_* names that are no key: a typo
			// would be a setting silently not made.
			t.Errorf("env %s names no agent.conf key", ev.Name)
			continue
		}
		if ev.ValueFrom != nil {
			t.Errorf("env %s: valueFrom cannot be checked here; use value", ev.Name)
			continue
		}
		assign("env "+ev.Name, key, ev.Value)
	}
	flags := agentFlags(t)
	args := append(slices.Clone(dockerEntrypoint(t)[2:]), c.Args...)
	if len(c.Command) > 0 {
		t.Errorf("command %q replaces the image's entrypoint; set args only", c.Command)
	}
	for i := 0; i < len(args); i++ {
		a := args[i]
		if !strings.HasPrefix(a, "-") {
			t.Errorf("argument %q is not a flag (`culprit agent` takes no positional arguments)", a)
			continue
		}
		name, value, hasValue := strings.Cut(strings.TrimLeft(a, "-"), "=")
		f, ok := flags[name]
		if !ok {
			t.Errorf("flag %s is not one `culprit agent` takes", a)
			continue
		}
		if f.takesValue && !hasValue {
			if i+1 == len(args) {
				t.Errorf("flag %s lacks its value", a)
				continue
			}
			i++
			value = args[i]
		}
		switch name {
		case "config":
			e.config = value
		case "set":
			k, v, ok := strings.Cut(value, "=")
			if !ok {
				t.Errorf("--set %q: want key=value", value)
				continue
			}
			assign("--set", strings.TrimSpace(k), v)
		default:
			key, ok := flagKeys[name]
			if !ok {
				t.Errorf("flag %s: this test does not know which key it sets", a)
				continue
			}
			assign("--"+name, key, value)
		}
	}
	return e
}

func isLoopback(t *testing.T, addr string) bool {
	t.Helper()
	host, _, err := net.SplitHostPort(addr)
	if err != nil {
		t.Errorf("%q is not host:port: %v", addr, err)
		return false
	}
	ip := net.ParseIP(host)
	return host == "localhost" || (ip != nil && ip.IsLoopback())
}

func containerEnv(c corev1.Container, name string) (string, bool) {
	for _, e := range c.Env {
		if e.Name == name {
			return e.Value, true
		}
	}
	return "", false
}

func TestSidecars(t *testing.T) {
	m := load(t)
	if len(m.configMaps) != 1 {
		t.Fatal("want one ConfigMap")
	}
	cm := m.configMaps[0]
	conf, ok := cm.Data[confKey]
	if !ok {
		t.Fatalf("ConfigMap %s has no %s", cm.Name, confKey)
	}
	kinds := map[bool]string{}
	culprits := map[string]corev1.Container{}
	for _, file := range slices.Sorted(maps.Keys(m.deployments)) {
		d := m.deployments[file]
		t.Run(file, func(t *testing.T) {
			pod := d.Spec.Template
			spec := pod.Spec
			c, native := culpritContainer(t, spec)
			if prev, dup := kinds[native]; dup {
				t.Errorf("%s is the same kind of sidecar as %s", file, prev)
			}
			kinds[native] = file
			culprits[file] = c

			if spec.ShareProcessNamespace == nil || !*spec.ShareProcessNamespace {
				t.Error("shareProcessNamespace must be true: culprit reads the app's /proc")
			}
			if spec.HostPID || spec.HostNetwork {
				t.Error("hostPID/hostNetwork: culprit watches its own pod, not the node")
			}

			// Capabilities: the needed ones, nothing else.
			sc := c.SecurityContext
			if sc == nil || sc.Capabilities == nil {
				t.Fatal("no securityContext.capabilities")
			}
			add := sc.Capabilities.Add
			for _, want := range []corev1.Capability{"BPF", "PERFMON", "SYS_PTRACE"} {
				if !slices.Contains(add, want) {
					t.Errorf("capability %s is not added", want)
				}
			}
			for _, a := range add {
				if !slices.Contains([]corev1.Capability{"BPF", "PERFMON", "SYS_PTRACE", "SYS_RESOURCE", "SYSLOG"}, a) {
					t.Errorf("capability %s is more than culprit needs", a)
				}
			}
			if !slices.Equal(sc.Capabilities.Drop, []corev1.Capability{"ALL"}) {
				t.Errorf("drop = %v, want [ALL]", sc.Capabilities.Drop)
			}
			if sc.Privileged != nil && *sc.Privileged {
				t.Error("privileged")
			}
			if sc.AllowPrivilegeEscalation == nil || *sc.AllowPrivilegeEscalation {
				t.Error("allowPrivilegeEscalation must be false")
			}
			if sc.ReadOnlyRootFilesystem == nil || !*sc.ReadOnlyRootFilesystem {
				t.Error("readOnlyRootFilesystem must be true")
			}
			if sc.RunAsNonRoot != nil && *sc.RunAsNonRoot || sc.RunAsUser != nil && *sc.RunAsUser != 0 {
				t.Error("culprit must run as uid 0: added capabilities are effective for root only")
			}
			if sc.SeccompProfile == nil || sc.SeccompProfile.Type != corev1.SeccompProfileTypeRuntimeDefault {
				t.Error("seccompProfile must be RuntimeDefault")
			}

			// The configuration the container runs with.
			e := effectiveConfig(t, c, conf)
			if e.config == "" {
				t.Fatal("no --config")
			}
			mounted := false
			for _, vm := range c.VolumeMounts {
				if path.Join(vm.MountPath, confKey) != e.config {
					continue
				}
				for _, v := range spec.Volumes {
					if v.Name == vm.Name && v.ConfigMap != nil && v.ConfigMap.Name == cm.Name && len(v.ConfigMap.Items) == 0 {
						mounted = true
					}
				}
			}
			if !mounted {
				t.Errorf("ConfigMap %s is not mounted so that its %s is --config %s", cm.Name, confKey, e.config)
			}

			// Metrics and probes: on the port the agent listens on.
			var port int32
			for _, p := range c.Ports {
				if p.Name == metricsPort {
					port = p.ContainerPort
				}
			}
			if port == 0 {
				t.Fatalf("no container port named %s", metricsPort)
			}
			httpAddr := e.str("agent.http_addr")
			if _, p, _ := net.SplitHostPort(httpAddr); p != strconv.Itoa(int(port)) {
				t.Errorf("agent.http_addr %s is not the metrics port %d", httpAddr, port)
			}
			if !isLoopback(t, httpAddr) && e.str("agent.allow_non_local") != "true" {
				t.Errorf("agent.http_addr %s is not loopback and agent.allow_non_local is not true: the agent would refuse to start", httpAddr)
			}
			for _, key := range []string{"agent.grpc_addr", "traces.grpc_addr", "traces.http_addr"} {
				if a := e.str(key); a != "" && !isLoopback(t, a) {
					t.Errorf("%s = %s: only the metrics endpoint leaves the pod", key, a)
				}
			}
			for probe, p := range map[string]*corev1.Probe{"/readyz": c.ReadinessProbe, "/healthz": c.LivenessProbe} {
				if p == nil || p.HTTPGet == nil || p.HTTPGet.Path != probe {
					t.Errorf("no httpGet probe on %s", probe)
					continue
				}
				if pp := p.HTTPGet.Port; pp.String() != metricsPort && pp.IntValue() != int(port) {
					t.Errorf("probe %s on port %s, not the metrics port", probe, pp.String())
				}
				if p.HTTPGet.Scheme != "" && p.HTTPGet.Scheme != corev1.URISchemeHTTP {
					t.Errorf("probe %s: scheme %s, the agent serves plain HTTP", probe, p.HTTPGet.Scheme)
				}
			}
			ann := pod.Annotations
			if ann["prometheus.io/scrape"] != "true" || ann["prometheus.io/port"] != strconv.Itoa(int(port)) || ann["prometheus.io/path"] != "/metrics" {
				t.Errorf("scrape annotations %v do not match the metrics port %d", ann, port)
			}

			// The target: the app's port or command, never a PID.
			if e.str("target.pid") != "0" {
				t.Error("target.pid: PIDs are not stable in a pod; select by port or cmd")
			}
			if tp := e.str("target.port"); tp != "0" {
				listens := false
				for _, app := range spec.Containers {
					for _, p := range app.Ports {
						listens = listens || (app.Name != culpritName && strconv.Itoa(int(p.ContainerPort)) == tp)
					}
				}
				if !listens {
					t.Errorf("target.port %s is no port of an app container", tp)
				}
			} else if e.str("target.cmd") == "" {
				t.Error("no target: without one the agent watches its built-in demo")
			}

			// Shutdown: the rule's grace period is the pod's.
			if spec.TerminationGracePeriodSeconds == nil {
				t.Fatal("terminationGracePeriodSeconds unset")
			}
			grace, err := time.ParseDuration(e.str("rules.stalled_shutdown.grace"))
			if err != nil {
				t.Fatalf("rules.stalled_shutdown.grace: %v", err)
			}
			if want := time.Duration(*spec.TerminationGracePeriodSeconds) * time.Second; grace != want {
				t.Errorf("rules.stalled_shutdown.grace = %s, terminationGracePeriodSeconds = %s", grace, want)
			}
			if _, ok := e.set["rules.stalled_shutdown.grace"]; !ok {
				t.Error("rules.stalled_shutdown.grace is not set by the pod: it matches only by chance")
			}

			// Resources, and a Go heap limit below the memory limit.
			for _, rl := range []corev1.ResourceList{c.Resources.Requests, c.Resources.Limits} {
				if rl.Cpu().IsZero() || rl.Memory().IsZero() {
					t.Errorf("cpu and memory requests and limits are needed: %v / %v", c.Resources.Requests, c.Resources.Limits)
				}
			}
			if gml, ok := containerEnv(c, "GOMEMLIMIT"); ok {
				n, err := parseGoBytes(gml)
				if err != nil {
					t.Errorf("GOMEMLIMIT %q: %v", gml, err)
				} else if n >= c.Resources.Limits.Memory().Value() {
					t.Errorf("GOMEMLIMIT %s is not below the memory limit %s", gml, c.Resources.Limits.Memory())
				}
			}
		})
	}
	if kinds[true] == "" || kinds[false] == "" {
		t.Errorf("want one classic and one native sidecar manifest, have %v", kinds)
	}
	if t.Failed() {
		return
	}
	// The two layouts run the same culprit container.
	var files []string
	for _, f := range kinds {
		files = append(files, f)
	}
	a, b := culprits[files[0]], culprits[files[1]]
	a.RestartPolicy, b.RestartPolicy = nil, nil
	if diff := cmp.Diff(a, b); diff != "" {
		t.Errorf("the culprit containers of %s and %s differ (-+):\n%s", files[0], files[1], diff)
	}
}

// parseGoBytes parses a GOMEMLIMIT value: a number of bytes with an
// optional B, KiB, MiB, GiB or TiB suffix.
func parseGoBytes(s string) (int64, error) {
	for i, unit := range []string{"TiB", "GiB", "MiB", "KiB", "B"} {
		if n, ok := strings.CutSuffix(s, unit); ok {
			v, err := strconv.ParseInt(n, 10, 64)
			return v << (10 * (4 - i)), err
		}
	}
	return strconv.ParseInt(s, 10, 64)
}

// TestSidecarsNameTheirPod: the culprit container gets the pod's names
// from the downward API under the variables exporters.NewResource reads,
// and the app container's name, so target_info and the exported findings'
// resource say which pod and container they are about. Filled in as the
// kubelet would, the variables give the resource the semantic conventions
// ask for.
func TestSidecarsNameTheirPod(t *testing.T) {
	m := load(t)
	downward := map[string]string{ // fieldPath -> what the kubelet would put
		"metadata.name": "web-5f7b9c-x2k4q", "metadata.namespace": "shop", "spec.nodeName": "node-a",
	}
	for _, file := range slices.Sorted(maps.Keys(m.deployments)) {
		spec := m.deployments[file].Spec.Template.Spec
		t.Run(file, func(t *testing.T) {
			c, _ := culpritContainer(t, spec)
			want := map[string]string{
				exporters.EnvPodName:       "metadata.name",
				exporters.EnvNamespaceName: "metadata.namespace",
				exporters.EnvNodeName:      "spec.nodeName",
			}
			environ := []string{}
			seen := map[string]bool{}
			for _, e := range c.Env {
				if seen[e.Name] {
					t.Errorf("env %s set twice", e.Name)
				}
				seen[e.Name] = true
				switch e.Name {
				case exporters.EnvPodName, exporters.EnvNamespaceName, exporters.EnvNodeName:
					if e.Value != "" || e.ValueFrom == nil || e.ValueFrom.FieldRef == nil || e.ValueFrom.FieldRef.FieldPath != want[e.Name] {
						t.Errorf("env %s must come from the downward API field %s", e.Name, want[e.Name])
						continue
					}
					environ = append(environ, e.Name+"="+downward[want[e.Name]])
				case exporters.EnvContainerName:
					app := false
					for _, ac := range spec.Containers {
						app = app || (ac.Name == e.Value && ac.Name != culpritName)
					}
					if !app {
						t.Errorf("env %s = %q is not the name of an app container: findings describe the app", e.Name, e.Value)
					}
					environ = append(environ, e.Name+"="+e.Value)
				case exporters.EnvServiceName:
					if e.Value == "" && e.ValueFrom == nil {
						t.Errorf("env %s is set empty", e.Name)
					}
					environ = append(environ, e.Name+"="+e.Value)
				}
			}
			for _, name := range []string{exporters.EnvPodName, exporters.EnvNamespaceName, exporters.EnvNodeName, exporters.EnvContainerName} {
				if !seen[name] {
					t.Errorf("env %s is not set: target_info and exported findings would not name the pod", name)
				}
			}
			res, err := exporters.NewResource(environ, nil)
			if err != nil {
				t.Fatalf("the agent would refuse the pod's variables: %v", err)
			}
			got := map[string]string{}
			for _, kv := range res.Attributes() {
				got[string(kv.Key)] = kv.Value.String()
			}
			ctr, _ := containerEnv(c, exporters.EnvContainerName)
			for k, v := range map[string]string{
				"k8s.pod.name": downward["metadata.name"], "k8s.namespace.name": downward["metadata.namespace"],
				"k8s.node.name": downward["spec.nodeName"], "k8s.container.name": ctr,
				"service.instance.id": downward["metadata.namespace"] + "." + downward["metadata.name"] + "." + ctr,
			} {
				if got[k] != v {
					t.Errorf("resource %s = %q, want %q (resource %v)", k, got[k], v, got)
				}
			}
		})
	}
}

func TestServiceMonitor(t *testing.T) {
	m := load(t)
	svc, mon := m.services[0], m.monitors[0]
	var port *corev1.ServicePort
	for i, p := range svc.Spec.Ports {
		if p.Name == metricsPort {
			port = &svc.Spec.Ports[i]
		}
	}
	if port == nil {
		t.Fatalf("Service %s has no port named %s", svc.Name, metricsPort)
	}
	if port.TargetPort.String() != metricsPort {
		t.Errorf("Service port %s targets %s, not the container port named %s", port.Name, port.TargetPort.String(), metricsPort)
	}
	// The Service selects the classic sidecar's pods, which name the port.
	d := m.deployments["pod-sidecar.yaml"]
	if d == nil {
		t.Fatal("no pod-sidecar.yaml")
	}
	for k, v := range svc.Spec.Selector {
		if d.Spec.Template.Labels[k] != v {
			t.Errorf("the Service selects %s=%s, which the pods of %s do not carry", k, v, d.Name)
		}
	}
	if len(svc.Spec.Selector) == 0 {
		t.Error("the Service selects nothing")
	}
	if len(mon.Spec.Selector.MatchLabels) == 0 {
		t.Error("the ServiceMonitor selects every Service")
	}
	for k, v := range mon.Spec.Selector.MatchLabels {
		if svc.Labels[k] != v {
			t.Errorf("the ServiceMonitor selects %s=%s, which the Service does not carry", k, v)
		}
	}
	if len(mon.Spec.Endpoints) != 1 || mon.Spec.Endpoints[0].Port != metricsPort || mon.Spec.Endpoints[0].Path != "/metrics" {
		t.Errorf("the ServiceMonitor does not scrape /metrics on the Service's %s port: %+v", metricsPort, mon.Spec.Endpoints)
	}
	if iv := mon.Spec.Endpoints[0].Interval; iv != "" {
		if _, err := time.ParseDuration(iv); err != nil {
			t.Errorf("interval %q: %v", iv, err)
		}
	}
}

// runningAgent is a culprit agent started by a test.
type runningAgent struct {
	cmd      *exec.Cmd
	httpAddr string
	grpcAddr string
	stderr   *syncBuffer
	done     chan struct{} // closed when the process has exited
	err      error         // its exit status, once done
}

type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// loopbackOverrides keep a test agent off the pod's fixed ports (flags win
// over the environment).
var loopbackOverrides = []string{"--http-addr", "127.0.0.1:0", "--grpc-addr", "127.0.0.1:0",
	"--set", "traces.grpc_addr=127.0.0.1:0", "--set", "traces.http_addr=127.0.0.1:0"}

// agentCommand is the culprit container's command line and environment
// on this machine: the image's entrypoint with --config pointing at a copy
// of the ConfigMap's agent.conf, the container's args and CULPRIT_* env.
func agentCommand(t *testing.T, c corev1.Container, conf string, prefix ...string) *exec.Cmd {
	t.Helper()
	confFile := filepath.Join(t.TempDir(), confKey)
	if err := os.WriteFile(confFile, []byte(conf), 0o644); err != nil {
		t.Fatal(err)
	}
	ep := dockerEntrypoint(t)
	args := slices.Clone(ep[1:])
	for i := range args {
		if (args[i] == "--config" || args[i] == "-config") && i+1 < len(args) {
			args[i+1] = confFile
		}
	}
	args = append(append(args, c.Args...), loopbackOverrides...)
	argv := append(slices.Clone(prefix), culpritBinary(t))
	argv = append(argv, args...)
	cmd := exec.Command(argv[0], argv[1:]...)
	for _, kv := range os.Environ() {
		if !strings.HasPrefix(kv, "CULPRIT_") && !strings.HasPrefix(kv, "GOMEMLIMIT=") {
			cmd.Env = append(cmd.Env, kv)
		}
	}
	for _, e := range c.Env {
		cmd.Env = append(cmd.Env, e.Name+"="+e.Value)
	}
	return cmd
}

var listening = regexp.MustCompile(`metrics on http://(\S+)/metrics, findings on (\S+) `)

// startAgent starts cmd and waits for the line naming its listeners.
func startAgent(t *testing.T, cmd *exec.Cmd) *runningAgent {
	t.Helper()
	a := &runningAgent{cmd: cmd, stderr: &syncBuffer{}, done: make(chan struct{})}
	cmd.Stderr = a.stderr
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	addrs := make(chan []string, 1)
	go func() {
		sc := bufio.NewScanner(stdout)
		for sc.Scan() {
			if m := listening.FindStringSubmatch(sc.Text()); m != nil {
				addrs <- m[1:]
			}
		}
		io.Copy(io.Discard, stdout)
	}()
	go func() { a.err = cmd.Wait(); close(a.done) }()
	t.Cleanup(func() { a.stop(t) })
	select {
	case m := <-addrs:
		a.httpAddr, a.grpcAddr = m[0], m[1]
	case <-a.done:
		t.Fatalf("the agent exited at start (%v):\n%s", a.err, a.stderr)
	case <-time.After(15 * time.Second):
		t.Fatalf("the agent did not say where it listens within 15s:\n%s", a.stderr)
	}
	return a
}

// stop ends the agent with SIGINT (as SIGTERM would) and waits for it.
func (a *runningAgent) stop(t *testing.T) {
	select {
	case <-a.done:
		return
	default:
	}
	a.cmd.Process.Signal(os.Interrupt)
	select {
	case <-a.done:
	case <-time.After(10 * time.Second):
		a.cmd.Process.Kill()
		<-a.done
		t.Errorf("the agent did not stop within 10s of SIGINT")
	}
}

func get(t *testing.T, url string) (int, string) {
	t.Helper()
	resp, err := (&http.Client{Timeout: 5 * time.Second}).Get(url)
	if err != nil {
		t.Fatalf("GET %s: %v", url, err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b)
}

// The agent starts and serves with exactly the pod's arguments,
// environment and ConfigMap; the same with a misspelt key stops at once,
// naming file, line and key (so a pass above is not vacuous).
func TestAgentRunsWithThePodsConfig(t *testing.T) {
	m := load(t)
	conf := m.configMaps[0].Data[confKey]
	c, _ := culpritContainer(t, m.deployments["pod-sidecar.yaml"].Spec.Template.Spec)

	a := startAgent(t, agentCommand(t, c, conf))
	for _, path := range []string{"/healthz", "/metrics"} {
		if code, body := get(t, "http://"+a.httpAddr+path); code != http.StatusOK {
			t.Errorf("GET %s: %d %s", path, code, body)
		}
	}
	if _, body := get(t, "http://"+a.httpAddr+"/metrics"); !strings.Contains(body, "culprit_") {
		t.Error("/metrics serves no culprit_ series")
	}
	// The ConfigMap sets log_format = "json": the file was read.
	if strings.Contains(conf, `log_format = "json"`) {
		deadline := time.Now().Add(5 * time.Second)
		for a.stderr.String() == "" && time.Now().Before(deadline) {
			time.Sleep(50 * time.Millisecond)
		}
		line, _, _ := strings.Cut(a.stderr.String(), "\n")
		var rec map[string]any
		if err := json.Unmarshal([]byte(line), &rec); err != nil || rec["msg"] == nil {
			t.Errorf("log_format = \"json\" from the ConfigMap not in effect; first log line: %q", line)
		}
	}
	a.stop(t)
	if a.err != nil {
		t.Errorf("the agent did not exit cleanly on SIGINT: %v\n%s", a.err, a.stderr)
	}

	bad := "[agent]\nlog_formt = \"json\"\n"
	cmd := agentCommand(t, c, bad)
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	select {
	case err := <-done:
		if err == nil || !regexp.MustCompile(`culprit: \S+agent\.conf:2: agent\.log_formt: unknown key`).MatchString(out.String()) {
			t.Errorf("a misspelt key: exit %v, output:\n%s", err, out.String())
		}
	case <-time.After(5 * time.Second):
		cmd.Process.Kill()
		<-done
		t.Error("the agent kept running on an agent.conf with a misspelt key")
	}
}

// setprivCaps is the setpriv bounding set for a container that drops ALL
// and adds caps.
func setprivCaps(caps []corev1.Capability) string {
	s := "-all"
	for _, c := range caps {
		s += ",+" + strings.ToLower(string(c))
	}
	return s
}

func snapshot(t *testing.T, grpcAddr string) *culpritv1.Snapshot {
	t.Helper()
	conn, err := grpc.NewClient(grpcAddr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	s, err := culpritv1.NewDiagnosticsClient(conn).GetSnapshot(ctx, &culpritv1.SnapshotRequest{})
	if err != nil {
		t.Fatal(err)
	}
	return s
}

// The capabilities the manifests grant, and nothing else (setpriv empties
// the bounding set as drop: [ALL] does; no_new_privs as
// allowPrivilegeEscalation: false), are enough on this kernel: the agent,
// root like in the image, finds a root target holding every capability
// (as an app container's root process holds the runtime's default set)
// and loads every eBPF probe. Without SYS_PTRACE it cannot tell which
// process owns the port, which is why the manifests add it.
func TestManifestCapabilitiesSuffice(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root to drop capabilities from")
	}
	setpriv, err := exec.LookPath("setpriv")
	if err != nil {
		t.Fatal("setpriv (util-linux) missing")
	}
	m := load(t)
	conf := m.configMaps[0].Data[confKey]
	c, _ := culpritContainer(t, m.deployments["pod-sidecar.yaml"].Spec.Template.Spec)
	sc := c.SecurityContext
	if !slices.Equal(sc.Capabilities.Drop, []corev1.Capability{"ALL"}) {
		t.Fatalf("this test assumes drop: [ALL], have %v", sc.Capabilities.Drop)
	}

	// The app: the built-in demo service, as root with every capability.
	port := freePort(t)
	demo := exec.Command(culpritBinary(t), "demo", "--addr", "127.0.0.1:"+strconv.Itoa(port), "--control", "127.0.0.1:"+strconv.Itoa(freePort(t)))
	if err := demo.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { demo.Process.Kill(); demo.Wait() })
	waitListening(t, port)
	c.Args = []string{"--port", strconv.Itoa(port)}

	run := func(t *testing.T, caps []corev1.Capability) *runningAgent {
		prefix := []string{setpriv, "--bounding-set", setprivCaps(caps), "--inh-caps=-all"}
		if sc.AllowPrivilegeEscalation != nil && !*sc.AllowPrivilegeEscalation {
			prefix = append(prefix, "--no-new-privs")
		}
		return startAgent(t, agentCommand(t, c, conf, append(prefix, "--")...))
	}

	t.Run("as granted", func(t *testing.T) {
		a := run(t, sc.Capabilities.Add)
		deadline := time.Now().Add(10 * time.Second)
		for {
			code, body := get(t, "http://"+a.httpAddr+"/readyz")
			if code == http.StatusOK {
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("/readyz: %d %s\n%s", code, body, a.stderr)
			}
			time.Sleep(100 * time.Millisecond)
		}
		s := snapshot(t, a.grpcAddr)
		if !s.Target.GetFound() || int(s.Target.GetPid()) != demo.Process.Pid {
			t.Errorf("target %+v, want the demo, pid %d", s.Target, demo.Process.Pid)
		}
		probes := 0
		for _, cs := range s.Components {
			if cs.Kind != "probe" {
				continue
			}
			probes++
			if cs.State != "running" {
				t.Errorf("probe %s: %s %s (lost: %v)", cs.Name, cs.State, cs.Detail, cs.Lost)
			}
		}
		if probes == 0 {
			t.Errorf("the snapshot lists no probe: %+v", s.Components)
		}
	})

	t.Run("without SYS_PTRACE", func(t *testing.T) {
		var caps []corev1.Capability
		for _, c := range sc.Capabilities.Add {
			if c != "SYS_PTRACE" {
				caps = append(caps, c)
			}
		}
		a := run(t, caps)
		time.Sleep(2 * time.Second) // four refind intervals
		if code, body := get(t, "http://"+a.httpAddr+"/readyz"); code != http.StatusServiceUnavailable || !strings.Contains(body, "target not found") {
			t.Errorf("without SYS_PTRACE /readyz answered %d %q; if the target can be found without it, the manifests need not add it", code, body)
		}
	})
}

func freePort(t *testing.T) int {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}

func waitListening(t *testing.T, port int) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		c, err := net.DialTimeout("tcp", "127.0.0.1:"+strconv.Itoa(port), time.Second)
		if err == nil {
			c.Close()
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("nothing listens on %d: %v", port, err)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// dockerLines returns the Dockerfile's instructions, continuation lines
// joined, comments dropped.
func dockerLines(t *testing.T) []string {
	t.Helper()
	b, err := os.ReadFile("Dockerfile")
	if err != nil {
		t.Fatal(err)
	}
	var out []string
	cur := ""
	for _, l := range strings.Split(string(b), "\n") {
		l = strings.TrimSpace(l)
		if strings.HasPrefix(l, "#") || (l == "" && cur == "") {
			continue
		}
		if s, ok := strings.CutSuffix(l, "\\"); ok {
			cur += s + " "
			continue
		}
		out = append(out, cur+l)
		cur = ""
	}
	return out
}

func TestDockerfile(t *testing.T) {
	var froms, runs, copies []string
	for _, l := range dockerLines(t) {
		instr, rest, _ := strings.Cut(l, " ")
		switch strings.ToUpper(instr) {
		case "FROM":
			froms = append(froms, rest)
		case "RUN":
			runs = append(runs, rest)
		case "COPY":
			copies = append(copies, rest)
		case "USER":
			if rest != "0" && rest != "root" && rest != "0:0" {
				t.Errorf("USER %s: culprit needs uid 0 for its added capabilities to take effect", rest)
			}
		}
	}
	if len(froms) != 2 {
		t.Fatalf("want a two-stage build, have %d FROM lines: %q", len(froms), froms)
	}
	builder := regexp.MustCompile(`^golang:1\.26(\.\d+)?-bookworm\s+(?i:AS)\s+(\S+)$`).FindStringSubmatch(froms[0])
	if builder == nil {
		t.Fatalf("first stage %q is not golang:1.26-bookworm AS <name>", froms[0])
	}
	final := froms[1]
	if !regexp.MustCompile(`^gcr\.io/distroless/static-debian12(:latest)?(@sha256:[0-9a-f]{64})?$`).MatchString(final) {
		t.Errorf("final stage %q is not gcr.io/distroless/static-debian12 (root; the :nonroot variant cannot use the capabilities)", final)
	}
	build := ""
	for _, r := range runs {
		if strings.Contains(r, "go build") {
			build = r
		}
	}
	for _, want := range []string{"CGO_ENABLED=0 go build", "-trimpath", "-o /culprit", "./agent"} {
		if !strings.Contains(build, want) {
			t.Errorf("the build step %q lacks %q", build, want)
		}
	}
	for _, want := range []string{"--from=" + builder[2] + " /culprit /culprit", "agent.conf /etc/culprit/agent.conf"} {
		if !slices.Contains(copies, want) {
			t.Errorf("no COPY %s", want)
		}
	}
	if ep := dockerEntrypoint(t); !slices.Equal(ep, []string{"/culprit", "agent", "--config", "/etc/culprit/agent.conf"}) {
		t.Errorf("ENTRYPOINT %q", ep)
	}

	// What the build needs is not ignored.
	ign, err := os.ReadFile("Dockerfile.dockerignore")
	if err != nil {
		t.Fatal(err)
	}
	needed := []string{"go.mod", "go.sum", "agent.conf", "agent/main.go", "probes/sched_bpfel.o", "proto/culprit/v1/diagnostics.pb.go"}
	for _, p := range strings.Split(string(ign), "\n") {
		p = strings.TrimSpace(p)
		if p == "" || strings.HasPrefix(p, "#") || strings.HasPrefix(p, "!") {
			continue
		}
		for _, f := range needed {
			base, isDeep := strings.CutPrefix(p, "**/")
			matched, _ := path.Match(p, f)
			if isDeep {
				matched, _ = path.Match(base, path.Base(f))
			}
			if matched || strings.HasPrefix(f, strings.TrimSuffix(p, "/")+"/") {
				t.Errorf("Dockerfile.dockerignore pattern %q drops %s, which the build needs", p, f)
			}
		}
	}

	// The binary built as the Dockerfile builds it is static: it runs on
	// distroless/static, which has no C library.
	f, err := elf.Open(culpritBinary(t))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	for _, p := range f.Progs {
		if p.Type == elf.PT_INTERP {
			t.Error("the agent binary needs a dynamic loader; distroless/static has none")
		}
	}
}
