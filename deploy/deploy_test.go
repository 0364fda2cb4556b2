// Package deploy holds culprit's container image and Kubernetes manifests;
// its test decodes every manifest strictly with the real Kubernetes API
// types and checks what a working sidecar needs.
package deploy

import (
	"bytes"
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	"sigs.k8s.io/yaml"
)

// serviceMonitor is the part of the Prometheus Operator's CRD the
// manifest uses (the CRD's Go types are not in k8s.io/api).
type serviceMonitor struct {
	APIVersion string `json:"apiVersion"`
	Kind       string `json:"kind"`
	Metadata   struct {
		Name string `json:"name"`
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
	deployments map[string]*appsv1.Deployment
	configMaps  []*corev1.ConfigMap
	services    []*corev1.Service
	monitors    []*serviceMonitor
}

// decodeStrict fails on any field the type does not have.
func decodeStrict(doc []byte, into any) error { return yaml.UnmarshalStrict(doc, into) }

func load(t *testing.T) manifests {
	t.Helper()
	files, err := filepath.Glob("kubernetes/*.yaml")
	if err != nil || len(files) == 0 {
		t.Fatalf("no manifests: %v", err)
	}
	m := manifests{deployments: map[string]*appsv1.Deployment{}}
	for _, f := range files {
		b, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		for i, doc := range bytes.Split(b, []byte("\n---\n")) {
			var head struct{ Kind string }
			if err := yaml.Unmarshal(doc, &head); err != nil {
				t.Fatalf("%s document %d: %v", f, i, err)
			}
			var into any
			switch head.Kind {
			case "Deployment":
				d := &appsv1.Deployment{}
				m.deployments[filepath.Base(f)] = d
				into = d
			case "ConfigMap":
				c := &corev1.ConfigMap{}
				m.configMaps = append(m.configMaps, c)
				into = c
			case "Service":
				s := &corev1.Service{}
				m.services = append(m.services, s)
				into = s
			case "ServiceMonitor":
				s := &serviceMonitor{}
				m.monitors = append(m.monitors, s)
				into = s
			default:
				t.Fatalf("%s document %d: unexpected kind %q", f, i, head.Kind)
			}
			if err := decodeStrict(doc, into); err != nil {
				t.Fatalf("%s document %d (%s): %v", f, i, head.Kind, err)
			}
		}
	}
	return m
}

func TestStrictDecodingCatchesTypos(t *testing.T) {
	doc := []byte("apiVersion: apps/v1\nkind: Deployment\nspec:\n  template:\n    spec:\n      containers:\n        - name: x\n          securityContextt: {}\n")
	if err := decodeStrict(doc, &appsv1.Deployment{}); err == nil {
		t.Fatal("a misspelt field decoded without error")
	}
}

// culprit returns the culprit container of a pod spec and whether it is a
// native sidecar.
func culprit(t *testing.T, spec corev1.PodSpec) (corev1.Container, bool) {
	t.Helper()
	for _, c := range spec.InitContainers {
		if c.Name == "culprit" {
			if c.RestartPolicy == nil || *c.RestartPolicy != corev1.ContainerRestartPolicyAlways {
				t.Errorf("culprit init container without restartPolicy: Always is not a sidecar: it blocks the app")
			}
			return c, true
		}
	}
	for _, c := range spec.Containers {
		if c.Name == "culprit" {
			return c, false
		}
	}
	t.Fatal("no culprit container")
	return corev1.Container{}, false
}

// buildCulprit builds the agent for this test (the Go build cache makes
// the second build cheap).
func buildCulprit(t *testing.T) string {
	t.Helper()
	bin := filepath.Join(t.TempDir(), "culprit")
	if out, err := exec.Command("go", "build", "-o", bin, "../agent").CombinedOutput(); err != nil {
		t.Fatalf("build: %v\n%s", err, out)
	}
	return bin
}

func TestPodManifests(t *testing.T) {
	m := load(t)
	help, _ := exec.Command(buildCulprit(t), "agent", "-h").CombinedOutput()
	kinds := map[bool]string{}
	for file, d := range m.deployments {
		spec := d.Spec.Template.Spec
		c, native := culprit(t, spec)
		kinds[native] = file
		if spec.ShareProcessNamespace == nil || !*spec.ShareProcessNamespace {
			t.Errorf("%s: shareProcessNamespace must be true: culprit reads the app's /proc", file)
		}
		sc := c.SecurityContext
		if sc == nil || sc.Capabilities == nil {
			t.Fatalf("%s: no capabilities", file)
		}
		for _, want := range []corev1.Capability{"BPF", "PERFMON", "SYS_PTRACE"} {
			if !slices.Contains(sc.Capabilities.Add, want) {
				t.Errorf("%s: capability %s missing", file, want)
			}
		}
		if slices.Contains(sc.Capabilities.Add, "SYS_ADMIN") || slices.Contains(sc.Capabilities.Add, "ALL") {
			t.Errorf("%s: adds more than it needs: %v", file, sc.Capabilities.Add)
		}
		if !slices.Contains(sc.Capabilities.Drop, "ALL") {
			t.Errorf("%s: does not drop ALL", file)
		}
		if sc.Privileged != nil && *sc.Privileged {
			t.Errorf("%s: privileged", file)
		}
		for probe, path := range map[*corev1.Probe]string{c.ReadinessProbe: "/readyz", c.LivenessProbe: "/healthz"} {
			if probe == nil || probe.HTTPGet == nil || probe.HTTPGet.Path != path || probe.HTTPGet.Port.String() != "metrics" {
				t.Errorf("%s: probe on %s missing or wrong: %+v", file, path, probe)
			}
		}
		port := ""
		for _, p := range c.Ports {
			if p.Name == "metrics" {
				port = strconv.Itoa(int(p.ContainerPort))
			}
		}
		ann := d.Spec.Template.Annotations
		if ann["prometheus.io/scrape"] != "true" || ann["prometheus.io/port"] != port || ann["prometheus.io/path"] != "/metrics" {
			t.Errorf("%s: scrape annotations %v do not match the metrics port %q", file, ann, port)
		}
		for _, a := range c.Args {
			if strings.HasPrefix(a, "--") && !strings.Contains(string(help), "-"+strings.TrimLeft(a, "-")) {
				t.Errorf("%s: flag %s is not one `culprit agent` takes", file, a)
			}
		}
		if c.Resources.Limits.Memory().IsZero() || c.Resources.Limits.Cpu().IsZero() {
			t.Errorf("%s: no resource limits", file)
		}
	}
	if kinds[true] == "" || kinds[false] == "" {
		t.Errorf("want one classic and one native sidecar manifest, have %v", kinds)
	}
	if len(m.monitors) != 1 || len(m.services) != 1 {
		t.Fatalf("want one Service and one ServiceMonitor")
	}
	svc, mon := m.services[0], m.monitors[0]
	for k, v := range mon.Spec.Selector.MatchLabels {
		if svc.Labels[k] != v {
			t.Errorf("the ServiceMonitor selects %s=%s, which the Service does not carry", k, v)
		}
	}
	if len(mon.Spec.Endpoints) != 1 || mon.Spec.Endpoints[0].Port != svc.Spec.Ports[0].Name {
		t.Errorf("the ServiceMonitor scrapes a port the Service does not name")
	}
}

// The shipped agent.conf override is accepted by the real binary: it
// starts (and would have exited at once naming file, line and key if not).
func TestConfigMapIsAValidAgentConf(t *testing.T) {
	m := load(t)
	if len(m.configMaps) != 1 || m.configMaps[0].Data["agent.conf"] == "" {
		t.Fatal("want one ConfigMap with agent.conf")
	}
	conf := filepath.Join(t.TempDir(), "agent.conf")
	if err := os.WriteFile(conf, []byte(m.configMaps[0].Data["agent.conf"]), 0o644); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, buildCulprit(t), "agent", "--config", conf, "--pid", strconv.Itoa(os.Getpid()),
		"--http-addr", "127.0.0.1:0", "--grpc-addr", "127.0.0.1:0", "--set", "traces.grpc_addr=127.0.0.1:0", "--set", "traces.http_addr=127.0.0.1:0")
	out, err := cmd.CombinedOutput()
	if ctx.Err() == nil {
		t.Fatalf("the agent exited on the ConfigMap's agent.conf: %v\n%s", err, out)
	}
}

func TestDockerfile(t *testing.T) {
	b, err := os.ReadFile("Dockerfile")
	if err != nil {
		t.Fatal(err)
	}
	s := string(b)
	froms := regexp.MustCompile(`(?m)^FROM `).FindAllStringIndex(s, -1)
	if len(froms) != 2 {
		t.Errorf("want a two-stage build, have %d FROM lines", len(froms))
	}
	for _, want := range []string{"CGO_ENABLED=0", "gcr.io/distroless/static", "./agent", "ENTRYPOINT"} {
		if !strings.Contains(s, want) {
			t.Errorf("Dockerfile lacks %q", want)
		}
	}
}
