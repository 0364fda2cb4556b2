package deploy

// The fleet side of deploy/: the alerting rules (alerts/), their
// PrometheusRule, and the Grafana dashboard (grafana/). Prometheus' own
// parser and rule engine (promtool) judge the rules and every dashboard
// query, and a real agent, started as the pod starts it, says which
// metric names and labels exist: nothing here trusts a hand-typed list of
// what the agent exports.

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"go/ast"
	"go/parser"
	"go/token"
	"maps"
	"math"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	kjson "sigs.k8s.io/json"
	"sigs.k8s.io/yaml"

	"github.com/culprit-dev/culprit/internal/testenv"
	culpritv1 "github.com/culprit-dev/culprit/proto/culprit/v1"
	"github.com/culprit-dev/culprit/rules"
)

const (
	rulesFile     = "alerts/culprit.rules.yml"
	rulesTestFile = "alerts/culprit.rules.test.yml"
	promRuleFile  = "alerts/prometheusrule.yaml"
	dashboardFile = "grafana/culprit.json"
)

var update = flag.Bool("update", false, "rewrite "+promRuleFile+" from "+rulesFile)

// targetLabels are the labels a scrape in Kubernetes adds to every series
// (a ServiceMonitor, or the usual kubernetes-pods job); the alerts and the
// dashboard select and group by them. No agent series may carry one, or
// Prometheus would rename it exported_<name>.
var targetLabels = []string{"namespace", "pod"}

// ruleFile is a Prometheus rules file, as far as these rules use it.
// Decoding strictly into it rejects a misspelt field (rulefmt would too);
// Prometheus itself judges the rest through promtool.
type ruleFile struct {
	Groups []ruleGroup `json:"groups"`
}

type ruleGroup struct {
	Name     string      `json:"name"`
	Interval string      `json:"interval,omitempty"`
	Rules    []alertRule `json:"rules"`
}

type alertRule struct {
	Alert       string            `json:"alert"`
	Expr        string            `json:"expr"`
	For         string            `json:"for"`
	Labels      map[string]string `json:"labels"`
	Annotations map[string]string `json:"annotations"`
}

// prometheusRule is the Prometheus Operator's PrometheusRule as shipped
// (its Go types would pull in the operator's module for one struct).
type prometheusRule struct {
	APIVersion string `json:"apiVersion"`
	Kind       string `json:"kind"`
	Metadata   struct {
		Name   string            `json:"name"`
		Labels map[string]string `json:"labels"`
	} `json:"metadata"`
	Spec ruleFile `json:"spec"`
}

func loadRules(t *testing.T) ruleFile {
	t.Helper()
	b, err := os.ReadFile(rulesFile)
	if err != nil {
		t.Fatal(err)
	}
	var rf ruleFile
	if err := unmarshalStrict(b, &rf); err != nil {
		t.Fatalf("%s: %v", rulesFile, err)
	}
	return rf
}

func allAlerts(rf ruleFile) []alertRule {
	var out []alertRule
	for _, g := range rf.Groups {
		out = append(out, g.Rules...)
	}
	return out
}

// promRuleHeader opens the generated PrometheusRule.
const promRuleHeader = `# Generated from culprit.rules.yml by
#   go test ./deploy/ -run TestPrometheusRuleIsTheRulesFile -update
# Edit that file, not this one.
#
# culprit's alerts for the Prometheus Operator. Prometheus loads them if its
# ruleSelector matches these labels (kube-prometheus-stack, for one, wants
# release: <its release name>) and its ruleNamespaceSelector this namespace.
apiVersion: monitoring.coreos.com/v1
kind: PrometheusRule
metadata:
  name: culprit
  labels: {app.kubernetes.io/name: culprit}
spec:
`

// renderPrometheusRule puts the rules file, comments and all, under
// spec: (a PrometheusRule's spec is a rules file). Its opening comment,
// about the file itself, is left out.
func renderPrometheusRule(rulesYAML []byte) []byte {
	var b bytes.Buffer
	b.WriteString(promRuleHeader)
	body := string(rulesYAML)
	if i := strings.Index(body, "\ngroups:"); i >= 0 {
		body = body[i+1:]
	}
	for _, line := range strings.SplitAfter(body, "\n") {
		if strings.TrimSpace(line) != "" {
			b.WriteString("  ")
		}
		b.WriteString(line)
	}
	return b.Bytes()
}

// The PrometheusRule carries exactly the rules file's groups: it is
// generated from it, and decodes strictly to the same rules.
func TestPrometheusRuleIsTheRulesFile(t *testing.T) {
	src, err := os.ReadFile(rulesFile)
	if err != nil {
		t.Fatal(err)
	}
	want := renderPrometheusRule(src)
	if *update {
		if err := os.WriteFile(promRuleFile, want, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	got, err := os.ReadFile(promRuleFile)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, want) {
		t.Fatalf("%s is not generated from %s; run go test ./deploy/ -run %s -update\n%s",
			promRuleFile, rulesFile, t.Name(), cmp.Diff(string(want), string(got)))
	}
	var pr prometheusRule
	if err := unmarshalStrict(got, &pr); err != nil {
		t.Fatalf("%s: %v", promRuleFile, err)
	}
	if pr.APIVersion != "monitoring.coreos.com/v1" || pr.Kind != "PrometheusRule" || pr.Metadata.Name == "" {
		t.Errorf("%s is %s %s %q, want a named monitoring.coreos.com/v1 PrometheusRule", promRuleFile, pr.APIVersion, pr.Kind, pr.Metadata.Name)
	}
	if d := cmp.Diff(loadRules(t), pr.Spec); d != "" {
		t.Errorf("the PrometheusRule's groups differ from %s (-rules +PrometheusRule):\n%s", rulesFile, d)
	}
	// Strict decoding would catch a misspelt field in either file.
	for _, tc := range []struct{ old, new, want string }{
		{"annotations:", "annotation:", "annotation"},
		{"name: culprit.signals", "nme: culprit.signals", "nme"},
	} {
		for _, f := range []struct {
			name string
			b    []byte
			into any
		}{{rulesFile, src, &ruleFile{}}, {promRuleFile, got, &prometheusRule{}}} {
			bad := bytes.Replace(f.b, []byte(tc.old), []byte(tc.new), 1)
			if bytes.Equal(bad, f.b) {
				t.Fatalf("%q is no longer in %s: update this test", tc.old, f.name)
			}
			if err := unmarshalStrict(bad, f.into); err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Errorf("%s with %q: err = %v, want one naming %s", f.name, tc.new, err, tc.want)
			}
		}
	}
}

// runbookPiece is a sentence of an alert's runbook and where it comes
// from: the rules package's own text (literal: a string literal of
// rules/*.go contains it) or what its code returns.
type runbookPiece struct {
	text    string
	literal bool
}

func lit(s string) runbookPiece  { return runbookPiece{text: s, literal: true} }
func code(s string) runbookPiece { return runbookPiece{text: s} }

// runbooks says, for every alert, where its runbook comes from. The
// signal alerts carry the remediation the matching rule gives when it
// cannot tell the app's runtime (the zero Advisor); the finding alerts
// cannot (the finding's text is not on its series) and point at the CLI.
func runbooks() (fromRules map[string][]runbookPiece, fromCLI map[string]string) {
	adv := rules.Advisor{}
	fromRules = map[string][]runbookPiece{
		"CulpritAcceptQueueDrops": {
			code(adv.LoopStalled()),
			lit("Raise the server's listen backlog (its backlog setting, or the argument it passes to listen(2))"),
			lit("The kernel caps every backlog at net.core.somaxconn"),
			lit("(in a pod, securityContext.sysctls)"),
		},
		"CulpritFDsNearLimit": fdRunbook(adv),
		"CulpritFDsAtLimit":   fdRunbook(adv),
		"CulpritCPUThrottled": {
			lit("Raise the CPU limit above the service's usage (or remove it and keep requests), or request whole cores;"),
			lit("with a runtime that sizes its worker pool from the host's CPUs, set the worker count to the quota"),
		},
		"CulpritRunQueueLatency": {
			lit("the CPU limit above the service's usage (or remove it and keep requests), or request whole cores"),
			lit("pools sized from the host's cores oversubscribe it"),
			code(adv.CPUHeavy("The function culprit profile shows hottest")),
		},
	}
	fromCLI = map[string]string{
		"CulpritFindingCritical":     "/culprit findings --rule {{ $labels.rule }}",
		"CulpritFindingWarning":      "/culprit findings --rule {{ $labels.rule }}",
		"CulpritComponentNotRunning": "/culprit snapshot",
	}
	return fromRules, fromCLI
}

func fdRunbook(adv rules.Advisor) []runbookPiece {
	return []runbookPiece{
		lit("Raise RLIMIT_NOFILE (ulimit -n, or the container runtime's nofile limit) to cover peak listeners + connections + files + epoll instances"),
		code(adv.FDLeak("")),
		lit("Raising the limit only buys time."),
	}
}

// rulesLiterals returns every string literal of the rules package.
func rulesLiterals(t *testing.T) []string {
	t.Helper()
	fset := token.NewFileSet()
	files, err := filepath.Glob("../rules/*.go")
	if err != nil || len(files) == 0 {
		t.Fatalf("no ../rules/*.go: %v", err)
	}
	var out []string
	for _, f := range files {
		if strings.HasSuffix(f, "_test.go") {
			continue
		}
		af, err := parser.ParseFile(fset, f, nil, 0)
		if err != nil {
			t.Fatal(err)
		}
		ast.Inspect(af, func(n ast.Node) bool {
			if bl, ok := n.(*ast.BasicLit); ok && bl.Kind == token.STRING {
				if s, err := strconv.Unquote(bl.Value); err == nil {
					out = append(out, s)
				}
			}
			return true
		})
	}
	return out
}

func collapseSpace(s string) string { return strings.Join(strings.Fields(s), " ") }

var (
	execContainer = regexp.MustCompile(`exec\s+\S+\s+-c\s+(\S+)\s+--`)
	cliRule       = regexp.MustCompile(`--rule\s+([a-z_]+)`)
)

func TestAlertRules(t *testing.T) {
	rf := loadRules(t)
	fromRules, fromCLI := runbooks()
	literals := rulesLiterals(t)
	ruleNames := map[string]bool{}
	for _, r := range rules.New(rules.DefaultOptions(), 5*time.Second) {
		ruleNames[r.Name()] = true
	}
	seen := map[string]bool{}
	forOf := map[string]time.Duration{}
	for _, g := range rf.Groups {
		if seen["group "+g.Name] {
			t.Errorf("group %s twice", g.Name)
		}
		seen["group "+g.Name] = true
		for _, r := range g.Rules {
			if seen[r.Alert] || r.Alert == "" {
				t.Errorf("alert %q empty or twice", r.Alert)
			}
			seen[r.Alert] = true
			d, err := model.ParseDuration(r.For)
			if err != nil || d <= 0 {
				t.Errorf("%s: for %q: want a duration (%v)", r.Alert, r.For, err)
			}
			forOf[r.Alert] = time.Duration(d)
			if s := r.Labels["severity"]; s != "critical" && s != "warning" {
				t.Errorf("%s: severity %q, want critical or warning", r.Alert, s)
			}
			for _, a := range []string{"summary", "description", "runbook"} {
				if strings.TrimSpace(r.Annotations[a]) == "" {
					t.Errorf("%s: no %s annotation", r.Alert, a)
				}
			}
			// The commands in the annotations must work on the shipped pods.
			text := collapseSpace(strings.Join(slices.Sorted(maps.Values(r.Annotations)), " "))
			for _, m := range execContainer.FindAllStringSubmatch(text, -1) {
				if m[1] != culpritName {
					t.Errorf("%s: kubectl exec -c %s; the manifests' container is %s", r.Alert, m[1], culpritName)
				}
			}
			for _, m := range cliRule.FindAllStringSubmatch(text, -1) {
				if !ruleNames[m[1]] {
					t.Errorf("%s: culprit findings --rule %s: no such rule", r.Alert, m[1])
				}
			}

			runbook := collapseSpace(r.Annotations["runbook"])
			pieces, ok := fromRules[r.Alert]
			cli, viaCLI := fromCLI[r.Alert]
			switch {
			case ok:
				for _, p := range pieces {
					want := collapseSpace(p.text)
					if p.literal && !slices.ContainsFunc(literals, func(l string) bool { return strings.Contains(collapseSpace(l), want) }) {
						t.Errorf("%s: %q is in no string literal of rules/ any more: take the runbook from the rule's remediation again", r.Alert, want)
					}
					if !strings.Contains(runbook, want) {
						t.Errorf("%s: the runbook lacks the rule's remediation %q\nrunbook: %s", r.Alert, want, runbook)
					}
				}
			case viaCLI:
				if !strings.Contains(runbook, cli) {
					t.Errorf("%s: the runbook does not point at %q", r.Alert, cli)
				}
			default:
				t.Errorf("%s: say where its runbook comes from in runbooks()", r.Alert)
			}
		}
	}
	for name := range fromRules {
		if !seen[name] {
			t.Errorf("runbooks() names %s, which is no alert", name)
		}
	}

	// What the issue asks for: open findings by severity, warnings with a
	// longer for, and the key signals.
	findingAlert := func(sev string) string {
		for _, r := range allAlerts(rf) {
			refs, err := scanPromQL(r.Expr)
			if err != nil {
				continue
			}
			for _, s := range refs.selectors {
				if s.name == "culprit_finding_active" && slices.Contains(s.matchers, promMatcher{"severity", "=", sev}) {
					return r.Alert
				}
			}
		}
		t.Errorf("no alert on culprit_finding_active{severity=%q}", sev)
		return ""
	}
	if crit, warn := findingAlert("critical"), findingAlert("warning"); crit != "" && warn != "" && forOf[warn] <= forOf[crit] {
		t.Errorf("%s waits %v, not longer than %s's %v", warn, forOf[warn], crit, forOf[crit])
	}
	used := map[string]bool{}
	for _, r := range allAlerts(rf) {
		refs, err := scanPromQL(r.Expr)
		if err != nil {
			t.Errorf("%s: %v", r.Alert, err)
		}
		for _, s := range refs.selectors {
			used[s.name] = true
		}
	}
	for _, n := range []string{"culprit_listen_overflows_total", "culprit_process_fds_open", "culprit_process_fd_limit",
		"culprit_cgroup_cpu_throttled_periods_total", "culprit_cgroup_cpu_periods_total",
		"culprit_thread_runq_wait_seconds_total", "culprit_thread_runq_waits_total"} {
		if !used[n] {
			t.Errorf("no alert reads %s", n)
		}
	}
}

// promtoolPath returns promtool, which CI installs (Debian's prometheus
// package); elsewhere the test is skipped, loudly.
func promtoolPath(t *testing.T) string {
	t.Helper()
	p, err := exec.LookPath("promtool")
	if err != nil {
		if os.Getenv("CI") != "" {
			t.Fatal("promtool missing: .ci/run must install Debian's prometheus package")
		}
		fmt.Fprintln(os.Stderr, "!!! SKIP "+t.Name()+": promtool not on PATH (apt-get install prometheus): Prometheus' parser did not check the rules and queries !!!")
		t.Skip("promtool not on PATH")
	}
	return p
}

func promtool(t *testing.T, args ...string) (string, error) {
	t.Helper()
	out, err := exec.Command(promtoolPath(t), args...).CombinedOutput()
	return string(out), err
}

// Prometheus' parser accepts the rules (and their templates) in both
// files, and its rule engine passes the unit tests: series in, alerts
// out. Each mutation below must make them fail, so a pass means something.
func TestAlertRulesPromtool(t *testing.T) {
	if out, err := promtool(t, "check", "rules", rulesFile); err != nil {
		t.Errorf("promtool check rules %s: %v\n%s", rulesFile, err, out)
	}
	// The operator hands a PrometheusRule's spec to Prometheus as a rules
	// file: check exactly that.
	b, err := os.ReadFile(promRuleFile)
	if err != nil {
		t.Fatal(err)
	}
	var pr prometheusRule
	if err := unmarshalStrict(b, &pr); err != nil {
		t.Fatal(err)
	}
	spec, err := json.Marshal(pr.Spec)
	if err != nil {
		t.Fatal(err)
	}
	specFile := filepath.Join(t.TempDir(), "spec.yml")
	if err := os.WriteFile(specFile, spec, 0o644); err != nil {
		t.Fatal(err)
	}
	if out, err := promtool(t, "check", "rules", specFile); err != nil {
		t.Errorf("promtool check rules on the PrometheusRule's spec: %v\n%s", err, out)
	}
	if out, err := promtool(t, "test", "rules", rulesTestFile); err != nil {
		t.Errorf("promtool test rules %s: %v\n%s", rulesTestFile, err, out)
	}

	src, err := os.ReadFile(rulesFile)
	if err != nil {
		t.Fatal(err)
	}
	tests, err := os.ReadFile(rulesTestFile)
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct{ why, old, new, cmd string }{
		{"a parse error", "rate(culprit_listen_overflows_total[5m])", "rate(culprit_listen_overflows_total[5m]", "check"},
		{"a broken template", "{{ $labels.addr }}:{{ $labels.port }} overflowing", "{{ $labels.addr }:{{ $labels.port }} overflowing", "check"},
		{"an alert that starts over when a finding opens again", `max without (id) (culprit_finding_active{severity="critical"})`, `culprit_finding_active{severity="critical"}`, "test"},
		{"a disabled collector paging", `state=~"failed|degraded"`, `state!="running"`, "test"},
		{"FDs at 85% not firing", `culprit_process_fd_limit{type="soft"} > 0.8`, `culprit_process_fd_limit{type="soft"} > 0.9`, "test"},
		{"a thread that rarely waits firing", "and rate(culprit_thread_runq_wait_seconds_total[5m]) > 0.05", "", "test"},
		{"drops under the threshold firing", "rate(culprit_listen_overflows_total[5m]) > 0.1", "rate(culprit_listen_overflows_total[5m]) > 0.01", "test"},
	} {
		t.Run(tc.why, func(t *testing.T) {
			if !bytes.Contains(src, []byte(tc.old)) {
				t.Fatalf("%q is no longer in %s: update this test", tc.old, rulesFile)
			}
			dir := t.TempDir()
			bad := bytes.Replace(src, []byte(tc.old), []byte(tc.new), 1)
			if err := os.WriteFile(filepath.Join(dir, filepath.Base(rulesFile)), bad, 0o644); err != nil {
				t.Fatal(err)
			}
			if err := os.WriteFile(filepath.Join(dir, filepath.Base(rulesTestFile)), tests, 0o644); err != nil {
				t.Fatal(err)
			}
			var args []string
			if tc.cmd == "check" {
				args = []string{"check", "rules", filepath.Join(dir, filepath.Base(rulesFile))}
			} else {
				args = []string{"test", "rules", filepath.Join(dir, filepath.Base(rulesTestFile))}
			}
			if out, err := promtool(t, args...); err == nil {
				t.Errorf("promtool %s passed with %s (%q):\n%s", strings.Join(args[:2], " "), tc.why, tc.new, out)
			}
		})
	}
}

// dashboard is the part of Grafana's dashboard model the file uses.
// Strict decoding rejects anything else at these levels, so a misspelt
// key fails here rather than being dropped by Grafana; field and panel
// options are Grafana's to judge and are kept raw.
type dashboard struct {
	UID           string          `json:"uid"`
	Title         string          `json:"title"`
	Description   string          `json:"description"`
	Tags          []string        `json:"tags"`
	Timezone      string          `json:"timezone"`
	Editable      bool            `json:"editable"`
	GraphTooltip  int             `json:"graphTooltip"`
	SchemaVersion int             `json:"schemaVersion"`
	Version       int             `json:"version"`
	Refresh       string          `json:"refresh"`
	Time          json.RawMessage `json:"time"`
	Annotations   json.RawMessage `json:"annotations"`
	Links         json.RawMessage `json:"links"`
	Templating    struct {
		List []dashVariable `json:"list"`
	} `json:"templating"`
	Panels []dashPanel `json:"panels"`
}

type dashDatasource struct {
	Type string `json:"type"`
	UID  string `json:"uid"`
}

type dashVariable struct {
	Name       string          `json:"name"`
	Label      string          `json:"label"`
	Type       string          `json:"type"`
	Datasource *dashDatasource `json:"datasource"`
	Query      string          `json:"query"`
	Definition string          `json:"definition"`
	Current    json.RawMessage `json:"current"`
	Hide       int             `json:"hide"`
	Refresh    int             `json:"refresh"`
	Regex      string          `json:"regex"`
	Sort       int             `json:"sort"`
	IncludeAll bool            `json:"includeAll"`
	AllValue   string          `json:"allValue"`
	Multi      bool            `json:"multi"`
}

type dashPanel struct {
	ID              int             `json:"id"`
	Type            string          `json:"type"`
	Title           string          `json:"title"`
	Description     string          `json:"description"`
	Datasource      *dashDatasource `json:"datasource"`
	GridPos         gridPos         `json:"gridPos"`
	FieldConfig     json.RawMessage `json:"fieldConfig"`
	Options         json.RawMessage `json:"options"`
	Transformations json.RawMessage `json:"transformations"`
	Collapsed       bool            `json:"collapsed"`
	Panels          []dashPanel     `json:"panels"`
	Targets         []dashTarget    `json:"targets"`
}

type gridPos struct {
	H int `json:"h"`
	W int `json:"w"`
	X int `json:"x"`
	Y int `json:"y"`
}

type dashTarget struct {
	RefID        string          `json:"refId"`
	Datasource   *dashDatasource `json:"datasource"`
	Expr         string          `json:"expr"`
	LegendFormat string          `json:"legendFormat"`
	Range        bool            `json:"range"`
	Instant      bool            `json:"instant"`
	Format       string          `json:"format"`
}

func loadDashboard(t *testing.T) dashboard {
	t.Helper()
	b, err := os.ReadFile(dashboardFile)
	if err != nil {
		t.Fatal(err)
	}
	var d dashboard
	strict, err := kjson.UnmarshalStrict(b, &d, kjson.DisallowDuplicateFields, kjson.DisallowUnknownFields)
	if err != nil {
		t.Fatalf("%s: %v", dashboardFile, err)
	}
	if err := errors.Join(strict...); err != nil {
		t.Fatalf("%s: %v", dashboardFile, err)
	}
	return d
}

// dashQuery is one PromQL query of the dashboard, named for messages and
// for promtool's rule names.
type dashQuery struct {
	name string // panel_<id>_<refId> or var_<name>
	expr string // as written, with Grafana's variables
}

var labelValues = regexp.MustCompile(`^label_values\((.+),\s*([a-zA-Z_][a-zA-Z0-9_]*)\)$`)

// queries returns every query of the dashboard: panel targets, and the
// selector of each label_values() variable.
func (d dashboard) queries(t *testing.T) []dashQuery {
	t.Helper()
	var out []dashQuery
	for _, v := range d.Templating.List {
		if v.Type != "query" {
			continue
		}
		m := labelValues.FindStringSubmatch(v.Query)
		if m == nil {
			t.Errorf("variable %s: query %q is not label_values(selector, label)", v.Name, v.Query)
			continue
		}
		out = append(out, dashQuery{"var_" + v.Name, m[1]})
	}
	for _, p := range d.Panels {
		for _, tg := range p.Targets {
			out = append(out, dashQuery{fmt.Sprintf("panel_%d_%s", p.ID, tg.RefID), tg.Expr})
		}
	}
	return out
}

// grafanaVars stands in for what Grafana substitutes before a query
// reaches Prometheus: one namespace, one pod (a multi-value pod becomes a
// regex alternation, which =~ takes the same way), a rate window.
var grafanaVars = strings.NewReplacer("$__rate_interval", "1m", "$namespace", "demo", "$pod", "web-0")

func expandGrafana(expr string) (string, error) {
	out := grafanaVars.Replace(expr)
	if strings.Contains(out, "$") {
		return "", fmt.Errorf("%q: a Grafana variable this test does not substitute", expr)
	}
	return out, nil
}

func TestDashboard(t *testing.T) {
	d := loadDashboard(t)
	if d.UID == "" || d.Title == "" || d.SchemaVersion == 0 || !slices.Contains(d.Tags, "culprit") {
		t.Errorf("uid %q, title %q, schemaVersion %d, tags %v: want all set, tagged culprit", d.UID, d.Title, d.SchemaVersion, d.Tags)
	}
	wantDS := dashDatasource{Type: "prometheus", UID: "${datasource}"}
	vars := map[string]dashVariable{}
	for _, v := range d.Templating.List {
		vars[v.Name] = v
		if v.Type == "query" && (v.Datasource == nil || *v.Datasource != wantDS) {
			t.Errorf("variable %s: datasource %+v, want %+v", v.Name, v.Datasource, wantDS)
		}
	}
	if v := vars["datasource"]; v.Type != "datasource" || v.Query != "prometheus" {
		t.Errorf("no datasource variable of type prometheus: %+v", v)
	}
	if v := vars["namespace"]; v.Type != "query" || v.Multi || v.IncludeAll {
		t.Errorf("namespace must be one namespace: %+v", v)
	}
	// All pods of the namespace is the namespace view.
	if v := vars["pod"]; v.Type != "query" || !v.Multi || !v.IncludeAll || !strings.Contains(v.Query, `namespace="$namespace"`) {
		t.Errorf("pod must be multi-value with All, within $namespace: %+v", v)
	}

	ids := map[int]bool{}
	var boxes []dashPanel
	for _, p := range d.Panels {
		if ids[p.ID] || p.ID == 0 {
			t.Errorf("panel %q: id %d zero or taken", p.Title, p.ID)
		}
		ids[p.ID] = true
		g := p.GridPos
		if g.W <= 0 || g.H <= 0 || g.X < 0 || g.X+g.W > 24 {
			t.Errorf("panel %d %q: gridPos %+v outside the 24 columns", p.ID, p.Title, g)
		}
		for _, o := range boxes {
			h := o.GridPos
			if g.X < h.X+h.W && h.X < g.X+g.W && g.Y < h.Y+h.H && h.Y < g.Y+g.H {
				t.Errorf("panels %d and %d overlap", o.ID, p.ID)
			}
		}
		boxes = append(boxes, p)
		if p.Type == "row" {
			if p.Collapsed || len(p.Panels) > 0 || len(p.Targets) > 0 {
				t.Errorf("row %d %q: keep rows open and empty, so every panel is checked here", p.ID, p.Title)
			}
			continue
		}
		if p.Title == "" || p.Description == "" {
			t.Errorf("panel %d: title %q, description %q: say what it shows", p.ID, p.Title, p.Description)
		}
		if p.Datasource == nil || *p.Datasource != wantDS {
			t.Errorf("panel %d %q: datasource %+v, want %+v", p.ID, p.Title, p.Datasource, wantDS)
		}
		if len(p.Targets) == 0 {
			t.Errorf("panel %d %q has no query", p.ID, p.Title)
		}
		refs := map[string]bool{}
		for _, tg := range p.Targets {
			if refs[tg.RefID] || tg.RefID == "" || strings.TrimSpace(tg.Expr) == "" {
				t.Errorf("panel %d: target %q empty or twice", p.ID, tg.RefID)
			}
			refs[tg.RefID] = true
			if tg.Datasource == nil || *tg.Datasource != wantDS {
				t.Errorf("panel %d target %s: datasource %+v, want %+v", p.ID, tg.RefID, tg.Datasource, wantDS)
			}
		}
	}

	// Every series a panel reads is the selected pods': a selector
	// without them would mix every namespace of the Prometheus.
	used := map[string]bool{}
	for _, q := range d.queries(t) {
		refs, err := scanPromQL(q.expr)
		if err != nil {
			t.Errorf("%s: %v", q.name, err)
			continue
		}
		if _, err := expandGrafana(q.expr); err != nil {
			t.Errorf("%s: %v", q.name, err)
		}
		for _, s := range refs.selectors {
			used[s.name] = true
			if q.name != "var_namespace" && !slices.Contains(s.matchers, promMatcher{"namespace", "=", "$namespace"}) {
				t.Errorf("%s: %s is not limited to namespace=\"$namespace\"", q.name, s.name)
			}
			if !strings.HasPrefix(q.name, "var_") && !slices.Contains(s.matchers, promMatcher{"pod", "=~", "$pod"}) {
				t.Errorf("%s: %s is not limited to pod=~\"$pod\"", q.name, s.name)
			}
		}
	}
	// What the issue asks the dashboard to show.
	for _, n := range []string{"culprit_findings_active", "culprit_listen_queue_length", "culprit_listen_overflows_total",
		"culprit_thread_runq_wait_seconds_total", "culprit_process_fds_open", "culprit_process_fd_limit",
		"culprit_process_memory_rss_bytes", "culprit_heap_inuse_bytes", "culprit_cgroup_cpu_throttled_periods_total"} {
		if !used[n] {
			t.Errorf("no panel reads %s", n)
		}
	}
}

// Every dashboard query, variables substituted as Grafana would, goes
// through Prometheus' parser: each becomes a recording rule of a
// temporary rules file for promtool check rules.
func TestDashboardQueriesParse(t *testing.T) {
	promtoolPath(t)
	var rs []map[string]string
	for _, q := range loadDashboard(t).queries(t) {
		e, err := expandGrafana(q.expr)
		if err != nil {
			t.Error(err)
			continue
		}
		rs = append(rs, map[string]string{"record": "culprit_dashboard:" + q.name, "expr": e})
	}
	file := writeJSON(t, "queries.yml", map[string]any{"groups": []any{map[string]any{"name": "dashboard", "rules": rs}}})
	if out, err := promtool(t, "check", "rules", file); err != nil {
		t.Errorf("promtool check rules on the dashboard's queries: %v\n%s", err, out)
	}
	// And a query Prometheus cannot parse fails there (so the pass above
	// is the parser's).
	bad := writeJSON(t, "bad.yml", map[string]any{"groups": []any{map[string]any{"name": "dashboard",
		"rules": []any{map[string]string{"record": "culprit_dashboard:bad", "expr": "sum by (pod) (rate(culprit_listen_overflows_total[1m])"}}}}})
	if out, err := promtool(t, "check", "rules", bad); err == nil {
		t.Errorf("promtool check rules accepted an unbalanced query:\n%s", out)
	}
}

// writeJSON writes v as JSON (which is YAML) into the test's temp dir.
func writeJSON(t *testing.T, name string, v any) string {
	t.Helper()
	b, err := json.MarshalIndent(v, "", " ")
	if err != nil {
		t.Fatal(err)
	}
	p := filepath.Join(t.TempDir(), name)
	if err := os.WriteFile(p, b, 0o644); err != nil {
		t.Fatal(err)
	}
	return p
}

// promSelector is a vector selector of a PromQL expression: a metric name
// and its label matchers.
type promSelector struct {
	name     string
	matchers []promMatcher
}

type promMatcher struct{ label, op, value string }

// promRefs is what an expression refers to: its selectors and the labels
// of its by/without/on/ignoring/group_left/group_right clauses.
type promRefs struct {
	selectors []promSelector
	grouping  []string
}

var (
	promGrouping = map[string]bool{"by": true, "without": true, "on": true, "ignoring": true, "group_left": true, "group_right": true}
	// Keywords and aggregation operators, which may stand before their
	// parenthesis with a by/without clause between.
	promKeywords = map[string]bool{"and": true, "or": true, "unless": true, "bool": true, "offset": true, "atan2": true,
		"inf": true, "nan": true, "sum": true, "min": true, "max": true, "avg": true, "group": true, "stddev": true,
		"stdvar": true, "count": true, "count_values": true, "bottomk": true, "topk": true, "quantile": true,
		"limitk": true, "limit_ratio": true}
)

func isIdentStart(c byte) bool {
	return c == '_' || c == ':' || c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z'
}
func isIdentChar(c byte) bool { return isIdentStart(c) || c >= '0' && c <= '9' }

// scanPromQL finds the metric names and labels an expression refers to.
// Whether the expression is valid PromQL is promtool's to say (every
// expression scanned here also goes through it); this scanner only has
// to find names, which PromQL's lexical rules make unambiguous: an
// identifier that is no keyword and not followed by "(" is a metric name.
// A selector without a metric name is refused: its series could not be
// checked against what the agent exports.
func scanPromQL(s string) (promRefs, error) {
	var r promRefs
	skipSpace := func(i int) int {
		for i < len(s) && strings.IndexByte(" \t\r\n", s[i]) >= 0 {
			i++
		}
		return i
	}
	for i := 0; i < len(s); {
		c := s[i]
		switch {
		case strings.IndexByte(" \t\r\n", c) >= 0:
			i++
		case c == '#':
			for i < len(s) && s[i] != '\n' {
				i++
			}
		case c == '"' || c == '\'' || c == '`':
			_, j, err := scanString(s, i)
			if err != nil {
				return r, err
			}
			i = j
		case c == '[':
			j := strings.IndexByte(s[i:], ']')
			if j < 0 {
				return r, fmt.Errorf("%q: unclosed [", s)
			}
			i += j + 1
		case c == '{':
			return r, fmt.Errorf("%q: a selector without a metric name at offset %d", s, i)
		case isIdentStart(c):
			j := i
			for j < len(s) && isIdentChar(s[j]) {
				j++
			}
			word := s[i:j]
			k := skipSpace(j)
			var next byte
			if k < len(s) {
				next = s[k]
			}
			i = j
			switch {
			case promGrouping[word]:
				if next == '(' {
					end := strings.IndexByte(s[k:], ')')
					if end < 0 {
						return r, fmt.Errorf("%q: unclosed %s (", s, word)
					}
					for _, l := range strings.Split(s[k+1:k+end], ",") {
						if l = strings.TrimSpace(l); l != "" {
							r.grouping = append(r.grouping, l)
						}
					}
					i = k + end + 1
				}
			case promKeywords[word] || next == '(':
				// An operator, keyword or function.
			default:
				sel := promSelector{name: word}
				if next == '{' {
					ms, end, err := scanMatchers(s, k)
					if err != nil {
						return r, err
					}
					sel.matchers, i = ms, end
				}
				r.selectors = append(r.selectors, sel)
			}
		case c >= '0' && c <= '9' || c == '.':
			// A number or a duration: 0.05, 1e-3, 0x1f, 5m, 1h30m.
			j := i + 1
			for j < len(s) && (isIdentChar(s[j]) || s[j] == '.' || (s[j] == '+' || s[j] == '-') && (s[j-1] == 'e' || s[j-1] == 'E')) {
				j++
			}
			i = j
		default:
			i++
		}
	}
	return r, nil
}

// scanMatchers reads {label op "value", ...} from s[i] == '{'.
func scanMatchers(s string, i int) ([]promMatcher, int, error) {
	var ms []promMatcher
	i++
	for {
		for i < len(s) && strings.IndexByte(" \t\r\n,", s[i]) >= 0 {
			i++
		}
		if i >= len(s) {
			return nil, i, fmt.Errorf("%q: unclosed {", s)
		}
		if s[i] == '}' {
			return ms, i + 1, nil
		}
		j := i
		for j < len(s) && isIdentChar(s[j]) {
			j++
		}
		label := s[i:j]
		for j < len(s) && s[j] == ' ' {
			j++
		}
		op := ""
		for _, o := range []string{"=~", "!~", "!=", "="} {
			if strings.HasPrefix(s[j:], o) {
				op = o
				break
			}
		}
		if label == "" || op == "" {
			return nil, j, fmt.Errorf("%q: bad label matcher at offset %d", s, i)
		}
		j += len(op)
		for j < len(s) && s[j] == ' ' {
			j++
		}
		v, end, err := scanString(s, j)
		if err != nil {
			return nil, j, err
		}
		ms = append(ms, promMatcher{label, op, v})
		i = end
	}
}

// scanString reads a PromQL string literal starting at s[i].
func scanString(s string, i int) (string, int, error) {
	if i >= len(s) || strings.IndexByte("\"'`", s[i]) < 0 {
		return "", i, fmt.Errorf("%q: want a string at offset %d", s, i)
	}
	q := s[i]
	j := i + 1
	for j < len(s) && s[j] != q {
		if s[j] == '\\' && q != '`' {
			j++
		}
		j++
	}
	if j >= len(s) {
		return "", j, fmt.Errorf("%q: unclosed string at offset %d", s, i)
	}
	raw := s[i : j+1]
	if q == '\'' {
		raw = strconv.Quote(strings.ReplaceAll(raw[1:len(raw)-1], `\'`, `'`))
	}
	v, err := strconv.Unquote(raw)
	if err != nil {
		return "", j, fmt.Errorf("%q: string %s: %v", s, raw, err)
	}
	return v, j + 1, nil
}

func TestScanPromQL(t *testing.T) {
	for _, tc := range []struct {
		expr      string
		selectors []promSelector
		grouping  []string
	}{
		{`max without (id) (culprit_finding_active{severity="critical"})`,
			[]promSelector{{"culprit_finding_active", []promMatcher{{"severity", "=", "critical"}}}}, []string{"id"}},
		{`culprit_process_fds_open / ignoring (type) culprit_process_fd_limit{type="soft"} > 0.8`,
			[]promSelector{{"culprit_process_fds_open", nil}, {"culprit_process_fd_limit", []promMatcher{{"type", "=", "soft"}}}}, []string{"type"}},
		{"sum by(pod, addr)(rate(a{x=~\"}{,\", y!='b\\'c'}[$__rate_interval] offset 5m)) and on() b_total > 1e-3 # c{",
			[]promSelector{{"a", []promMatcher{{"x", "=~", "}{,"}, {"y", "!=", "b'c"}}}, {"b_total", nil}}, []string{"pod", "addr"}},
		{"topk(3, sum(x) by (k)) * on (k) group_left (v) info_total",
			[]promSelector{{"x", nil}, {"info_total", nil}}, []string{"k", "k", "v"}},
	} {
		r, err := scanPromQL(tc.expr)
		if err != nil {
			t.Errorf("%s: %v", tc.expr, err)
			continue
		}
		if d := cmp.Diff(tc.selectors, r.selectors, cmp.AllowUnexported(promSelector{}, promMatcher{})); d != "" {
			t.Errorf("%s: selectors (-want +got):\n%s", tc.expr, d)
		}
		if !slices.Equal(tc.grouping, r.grouping) {
			t.Errorf("%s: grouping %q, want %q", tc.expr, r.grouping, tc.grouping)
		}
	}
	for _, bad := range []string{`{__name__="x"}`, `x{y="z"`, `x{y}`, `rate(x[5m`} {
		if _, err := scanPromQL(bad); err == nil {
			t.Errorf("%s: scanned without error", bad)
		}
	}
}

// fleetQueries is every PromQL expression of the alerts, the dashboard
// and the alerts' unit-test input series, by where it is.
func fleetQueries(t *testing.T) map[string]string {
	t.Helper()
	out := map[string]string{}
	for _, r := range allAlerts(loadRules(t)) {
		out["alert "+r.Alert] = r.Expr
	}
	for _, q := range loadDashboard(t).queries(t) {
		out["dashboard "+q.name] = q.expr
	}
	for i, s := range alertTestSeries(t) {
		out[fmt.Sprintf("%s input series %d", rulesTestFile, i)] = s
	}
	return out
}

// alertTestSeries returns the input series of the promtool unit tests.
func alertTestSeries(t *testing.T) []string {
	t.Helper()
	b, err := os.ReadFile(rulesTestFile)
	if err != nil {
		t.Fatal(err)
	}
	var f struct {
		Tests []struct {
			InputSeries []struct {
				Series string `json:"series"`
			} `json:"input_series"`
		} `json:"tests"`
	}
	// Not strict: promtool's own format, which promtool test rules reads.
	if err := yaml.Unmarshal(b, &f); err != nil {
		t.Fatal(err)
	}
	var out []string
	for _, tc := range f.Tests {
		for _, s := range tc.InputSeries {
			out = append(out, s.Series)
		}
	}
	if len(out) == 0 {
		t.Fatalf("%s has no input series", rulesTestFile)
	}
	return out
}

// realAgentMetrics runs the agent as the pod runs it (the manifest's
// arguments, environment and ConfigMap) on the built-in demo service,
// with what a real pod has that a bare test process lacks: a CPU quota
// (the CFS counters exist only under one), a heap profile URL (the
// ConfigMap says to set it), and an open finding (its series exist only
// while one is open). It returns the culprit_* families of its /metrics
// once every name in want is there, or when 30s have passed, and the
// findings open then, from its gRPC API.
func realAgentMetrics(t *testing.T, want map[string]bool) (map[string]*dto.MetricFamily, []*culpritv1.Finding) {
	t.Helper()
	bin := culpritBinary(t)
	port, control := freePort(t), freePort(t)
	demo := exec.Command(bin, "demo", "--addr", "127.0.0.1:"+strconv.Itoa(port), "--control", "127.0.0.1:"+strconv.Itoa(control))
	if err := demo.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { demo.Process.Kill(); demo.Wait() })
	waitListening(t, port)
	testenv.CPUCgroup(t, 0.5, demo.Process.Pid)

	m := load(t)
	c, _ := culpritContainer(t, m.deployments["pod-sidecar.yaml"].Spec.Template.Spec)
	c.Args = []string{"--port", strconv.Itoa(port),
		"--set", fmt.Sprintf("pprof.heap_url=http://127.0.0.1:%d/debug/pprof/heap", control)}
	a := startAgent(t, agentCommand(t, c, m.configMaps[0].Data[confKey]))
	deadline := time.Now().Add(10 * time.Second)
	for code, _ := get(t, "http://"+a.httpAddr+"/readyz"); code != http.StatusOK; code, _ = get(t, "http://"+a.httpAddr+"/readyz") {
		if time.Now().After(deadline) {
			t.Fatalf("the agent did not find the demo within 10s:\n%s", a.stderr)
		}
		time.Sleep(100 * time.Millisecond)
	}
	// The demo stops accepting and connects to itself: accept_overflow
	// opens a critical finding within a second and keeps it while polled.
	resp, err := http.Post(fmt.Sprintf("http://127.0.0.1:%d/fault/stop-accepting?seconds=40&load=64", control), "", nil)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode/100 != 2 {
		t.Fatalf("the demo refused the stop-accepting fault: %s", resp.Status)
	}

	var fams map[string]*dto.MetricFamily
	for deadline := time.Now().Add(30 * time.Second); ; time.Sleep(250 * time.Millisecond) {
		code, body := get(t, "http://"+a.httpAddr+"/metrics")
		if code != http.StatusOK {
			t.Fatalf("/metrics: %d %s", code, body)
		}
		p := expfmt.NewTextParser(model.LegacyValidation)
		all, err := p.TextToMetricFamilies(strings.NewReader(body))
		if err != nil {
			t.Fatalf("/metrics does not parse: %v", err)
		}
		fams = map[string]*dto.MetricFamily{}
		for n, f := range all {
			if strings.HasPrefix(n, "culprit_") {
				fams[n] = f
			}
		}
		missing := 0
		for n := range want {
			if fams[n] == nil {
				missing++
			}
		}
		if missing == 0 || time.Now().After(deadline) {
			return fams, openFindings(t, a.grpcAddr)
		}
	}
}

func openFindings(t *testing.T, grpcAddr string) []*culpritv1.Finding {
	t.Helper()
	conn, err := grpc.NewClient(grpcAddr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	resp, err := culpritv1.NewDiagnosticsClient(conn).ListFindings(ctx, &culpritv1.ListRequest{})
	if err != nil {
		t.Fatal(err)
	}
	return resp.Findings
}

// The alerts, the dashboard and the alerts' unit tests name only metrics
// and labels a real agent exports, and every dashboard query returns data
// from that agent's series.
func TestFleetQueriesMatchARealAgent(t *testing.T) {
	if os.Geteuid() != 0 {
		if os.Getenv("CI") != "" {
			t.Fatal("needs root (the sched probe's series, a CPU cgroup); CI runs as root")
		}
		fmt.Fprintln(os.Stderr, "!!! SKIP "+t.Name()+": not root: the metric names of the alerts and the dashboard were not checked against a real agent !!!")
		t.Skip("needs root: the sched probe's per-thread series and a CPU cgroup")
	}
	queries := fleetQueries(t)
	refs := map[string]promRefs{}
	wantNames := map[string]bool{}
	for where, q := range queries {
		r, err := scanPromQL(q)
		if err != nil {
			t.Fatalf("%s: %v", where, err)
		}
		refs[where] = r
		for _, s := range r.selectors {
			wantNames[s.name] = true
		}
	}
	fams, findings := realAgentMetrics(t, wantNames)

	labelsOf := map[string]map[string]bool{}  // name -> every label name of its series
	labelSets := map[string]map[string]bool{} // name -> label-name sets ("a,b")
	for n, f := range fams {
		labelsOf[n], labelSets[n] = map[string]bool{}, map[string]bool{}
		for _, m := range f.Metric {
			var names []string
			for _, lp := range m.Label {
				labelsOf[n][lp.GetName()] = true
				names = append(names, lp.GetName())
				if slices.Contains(targetLabels, lp.GetName()) {
					t.Errorf("%s carries a %s label: Prometheus renames it exported_%s and the alerts and dashboard read the target's", n, lp.GetName(), lp.GetName())
				}
			}
			slices.Sort(names)
			labelSets[n][strings.Join(names, ",")] = true
		}
	}

	for _, where := range slices.Sorted(maps.Keys(refs)) {
		r := refs[where]
		known := slices.Clone(targetLabels)
		for _, s := range r.selectors {
			if fams[s.name] == nil {
				t.Errorf("%s: %s is not a metric the agent exports", where, s.name)
				continue
			}
			known = append(known, slices.Collect(maps.Keys(labelsOf[s.name]))...)
			if strings.Contains(where, "input series") {
				continue // their labels: testSeriesLikeTheAgents
			}
			for _, m := range s.matchers {
				if !labelsOf[s.name][m.label] && !slices.Contains(targetLabels, m.label) {
					t.Errorf("%s: %s has no label %s (it has %v)", where, s.name, m.label, slices.Sorted(maps.Keys(labelsOf[s.name])))
				}
			}
		}
		for _, l := range r.grouping {
			if !slices.Contains(known, l) {
				t.Errorf("%s: groups by %s, a label none of its metrics has", where, l)
			}
		}
	}

	t.Run("unit-test series look like the agent's", func(t *testing.T) {
		testSeriesLikeTheAgents(t, fams, labelSets, findings)
	})
	t.Run("dashboard queries return data", func(t *testing.T) {
		dashboardReturnsData(t, fams)
	})
}

// testSeriesLikeTheAgents checks that the unit tests' input series carry
// the label names of one of the agent's series of that name, plus the
// target's. culprit_finding_active is the exception: on top of the labels
// every finding has, it carries its rule's own (Observation.Labels),
// which differ by rule. Those common labels are the real series' less the
// real open finding's own labels (from the API); a test series must have
// them, its other labels must be label names the rules write, and its
// rule, severity and cause must be real values.
func testSeriesLikeTheAgents(t *testing.T, fams map[string]*dto.MetricFamily, labelSets map[string]map[string]bool, findings []*culpritv1.Finding) {
	var common []string
	for _, f := range findings {
		for _, m := range fams["culprit_finding_active"].GetMetric() {
			if !slices.ContainsFunc(m.Label, func(lp *dto.LabelPair) bool { return lp.GetName() == "id" && lp.GetValue() == f.Id }) || common != nil {
				continue
			}
			common = []string{}
			for _, l := range m.Label {
				if _, own := f.Labels[l.GetName()]; !own {
					common = append(common, l.GetName())
				}
			}
		}
	}
	if len(common) == 0 {
		t.Fatalf("no open finding both on /metrics and in ListFindings (%d listed): cannot tell a finding's common labels", len(findings))
	}
	literals := rulesLiterals(t)
	ruleNames := map[string]bool{}
	for _, r := range rules.New(rules.DefaultOptions(), 5*time.Second) {
		ruleNames[r.Name()] = true
	}
	severities := []string{rules.SeverityInfo.String(), rules.SeverityWarning.String(), rules.SeverityCritical.String()}
	for i, series := range alertTestSeries(t) {
		r, err := scanPromQL(series)
		if err != nil || len(r.selectors) != 1 {
			t.Errorf("input series %d %q: %v", i, series, err)
			continue
		}
		s := r.selectors[0]
		var names []string
		values := map[string]string{}
		for _, m := range s.matchers {
			values[m.label] = m.value
			if !slices.Contains(targetLabels, m.label) {
				names = append(names, m.label)
			}
		}
		slices.Sort(names)
		if s.name != "culprit_finding_active" {
			if labelSets[s.name] != nil && !labelSets[s.name][strings.Join(names, ",")] {
				t.Errorf("%s{%s}: the agent exports %s with the labels %v", s.name, strings.Join(names, ","), s.name, slices.Sorted(maps.Keys(labelSets[s.name])))
			}
			continue
		}
		for _, l := range common {
			if _, ok := values[l]; !ok {
				t.Errorf("%q lacks %s, which every finding's series has", series, l)
			}
		}
		for _, l := range names {
			if !slices.Contains(common, l) && !slices.Contains(literals, l) {
				t.Errorf("%q: label %s is none the rules write", series, l)
			}
		}
		if !ruleNames[values["rule"]] || !slices.Contains(severities, values["severity"]) || !slices.Contains(literals, values["cause"]) {
			t.Errorf("%q: rule %q, severity %q, cause %q: want a rule, a severity and a cause the rules have", series, values["rule"], values["severity"], values["cause"])
		}
	}
}

// dashboardReturnsData loads the real agent's series into promtool's test
// storage (as scraped from pod web-0 of namespace demo, every 15s for 10
// minutes, counters growing) and evaluates every dashboard query there:
// each must return something. A label or value the agent never exports
// returns nothing, which the last check shows promtool reports.
func dashboardReturnsData(t *testing.T, fams map[string]*dto.MetricFamily) {
	promtoolPath(t)
	var series []map[string]string
	for _, n := range slices.Sorted(maps.Keys(fams)) {
		f := fams[n]
		for _, m := range f.Metric {
			var v float64
			step := "0"
			switch f.GetType() {
			case dto.MetricType_COUNTER:
				v, step = m.GetCounter().GetValue(), "1"
			case dto.MetricType_GAUGE:
				v = m.GetGauge().GetValue()
			default:
				t.Errorf("%s is a %v: the dashboard checks only know counters and gauges", n, f.GetType())
				continue
			}
			if math.IsNaN(v) || math.IsInf(v, 0) {
				continue
			}
			ls := []string{`namespace="demo"`, `pod="web-0"`}
			for _, lp := range m.Label {
				ls = append(ls, lp.GetName()+"="+strconv.Quote(lp.GetValue()))
			}
			series = append(series, map[string]string{
				"series": n + "{" + strings.Join(ls, ",") + "}",
				"values": strconv.FormatFloat(v, 'f', -1, 64) + "+" + step + "x40",
			})
		}
	}
	var alertRules []map[string]string
	var cases []map[string]any
	add := func(name, expr string, fires bool) {
		alertRules = append(alertRules, map[string]string{"alert": name, "expr": "count(" + expr + ")"})
		exp := []map[string]any{}
		if fires {
			exp = append(exp, map[string]any{})
		}
		cases = append(cases, map[string]any{"eval_time": "10m", "alertname": name, "exp_alerts": exp})
	}
	for _, q := range loadDashboard(t).queries(t) {
		e, err := expandGrafana(q.expr)
		if err != nil {
			t.Fatal(err)
		}
		add("query_"+q.name, e, true)
	}
	// The control: a selector with a label its metric lacks selects nothing.
	add("control_no_such_label", `culprit_process_fds_open{namespace="demo", type="soft"}`, false)

	dir := t.TempDir()
	rulesPath := filepath.Join(dir, "queries.yml")
	b, _ := json.Marshal(map[string]any{"groups": []any{map[string]any{"name": "dashboard", "rules": alertRules}}})
	if err := os.WriteFile(rulesPath, b, 0o644); err != nil {
		t.Fatal(err)
	}
	b, _ = json.Marshal(map[string]any{
		"rule_files":          []string{rulesPath},
		"evaluation_interval": "1m",
		"tests":               []any{map[string]any{"interval": "15s", "input_series": series, "alert_rule_test": cases}},
	})
	testPath := filepath.Join(dir, "test.yml")
	if err := os.WriteFile(testPath, b, 0o644); err != nil {
		t.Fatal(err)
	}
	if out, err := promtool(t, "test", "rules", testPath); err != nil {
		t.Errorf("dashboard queries against the real agent's %d series: %v\n%s", len(series), err, out)
	}
}
