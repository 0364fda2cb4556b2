package main

import (
	"context"
	"fmt"
	"io"
	"math"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	tea "github.com/charmbracelet/bubbletea"
	"github.com/charmbracelet/lipgloss"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/durationpb"
	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/culprit-dev/culprit/internal/testenv"
	culpritv1 "github.com/culprit-dev/culprit/proto/culprit/v1"
	"github.com/culprit-dev/culprit/signals"
)

// ---- the real thing: culprit top in a real terminal (tmux)

// tmuxPane is one culprit top running in a detached tmux session on a
// private tmux server (its socket in the test's temporary directory), so
// tests never touch a person's own tmux nor leave sockets behind.
type tmuxPane struct {
	t    *testing.T
	sock string
}

// topBinary is the culprit binary for the terminal tests, once tmux is
// known to be there: a developer machine without it skips loudly, CI
// fails.
func topBinary(t *testing.T) string {
	t.Helper()
	if _, err := exec.LookPath("tmux"); err != nil {
		if os.Getenv("CI") != "" {
			t.Fatal("tmux missing: .ci/run must install Debian's tmux package")
		}
		fmt.Fprintln(os.Stderr, "SKIP culprit top terminal test: tmux not on PATH (apt-get install tmux)")
		t.Skip("tmux not on PATH (apt-get install tmux)")
	}
	return culpritBinary(t)
}

// startTop runs `bin top args...` in a w×h terminal.
func startTop(t *testing.T, bin string, w, h int, args ...string) *tmuxPane {
	t.Helper()
	p := &tmuxPane{t: t, sock: filepath.Join(t.TempDir(), "tmux")}
	// The shell stays top's parent and prints its exit status on the
	// pane: tmux 3.3 was seen leaving an exited pane process unreaped
	// (a zombie, the pane never marked dead), so #{pane_dead} cannot be
	// relied on. The pane then stays open for the test to read.
	cmd := topShellQuote(bin) + " top"
	for _, a := range args {
		cmd += " " + topShellQuote(a)
	}
	cmd += `; echo "culprit top exited: status $?"; exec cat`
	p.tmux("-f", "/dev/null", "new-session", "-d", "-s", "top", "-x", strconv.Itoa(w), "-y", strconv.Itoa(h), cmd)
	t.Cleanup(func() { exec.Command("tmux", "-S", p.sock, "kill-server").Run() })
	return p
}

func topShellQuote(s string) string { return "'" + strings.ReplaceAll(s, "'", `'\''`) + "'" }

func (p *tmuxPane) tmux(args ...string) string {
	p.t.Helper()
	out, err := exec.Command("tmux", append([]string{"-S", p.sock}, args...)...).CombinedOutput()
	if err != nil {
		p.t.Fatalf("tmux %s: %v\n%s", strings.Join(args, " "), err, out)
	}
	return string(out)
}

func (p *tmuxPane) capture() string { return p.tmux("capture-pane", "-p", "-t", "top") }

// keys sends key names as tmux spells them (Down, Enter, Escape, q).
func (p *tmuxPane) keys(keys ...string) {
	p.t.Helper()
	p.tmux(append([]string{"send-keys", "-t", "top"}, keys...)...)
}

func (p *tmuxPane) resize(w, h int) {
	p.t.Helper()
	p.tmux("resize-window", "-t", "top", "-x", strconv.Itoa(w), "-y", strconv.Itoa(h))
}

// waitFor captures the pane until ok holds, and returns that screen.
func (p *tmuxPane) waitFor(what string, timeout time.Duration, ok func(screen string) bool) string {
	p.t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		s := p.capture()
		if ok(s) {
			return s
		}
		if time.Now().After(deadline) {
			p.t.Fatalf("culprit top never showed %s within %s; the pane:\n%s", what, timeout, s)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

var topExitLine = regexp.MustCompile(`culprit top exited: status ([0-9]+)`)

// waitExit waits for top to exit and returns its exit status, as the
// shell that started it reports it.
func (p *tmuxPane) waitExit(timeout time.Duration) int {
	p.t.Helper()
	screen := p.waitFor("its exit", timeout, topExitLine.MatchString)
	n, err := strconv.Atoi(topExitLine.FindStringSubmatch(screen)[1])
	if err != nil {
		p.t.Fatalf("exit status in %q: %v", screen, err)
	}
	return n
}

func screenHas(subs ...string) func(string) bool {
	return func(s string) bool {
		for _, sub := range subs {
			if !strings.Contains(s, sub) {
				return false
			}
		}
		return true
	}
}

var topNumberRun = regexp.MustCompile(`[0-9]+([.,][0-9]+)*`)

// normalized blanks out numbers and folds whitespace: a finding's numbers
// move between updates, and wrapping turns spaces into line breaks.
func topNormalized(s string) string {
	return strings.Join(strings.Fields(topNumberRun.ReplaceAllString(s, "#")), " ")
}

// selectedRow is the screen line with the selection marker.
func topSelectedRow(screen string) string {
	for _, l := range strings.Split(screen, "\n") {
		if strings.HasPrefix(l, "▸ ") {
			return l
		}
	}
	return ""
}

// The scenario, in a real terminal: a listener stops accepting,
// the finding shows in the list most severe first with the listener's
// queue FULL, Down/Enter opens its whole text (symptom, cause, every
// evidence, artifacts, fix), Esc goes back, a small window degrades and
// recovers, and q quits with status 0.
func TestTopInTerminal(t *testing.T) {
	const w, h = 200, 70
	bin := topBinary(t)
	sc := newScenario(t, testenv.Options{Backlog: 4, Accept: false})
	events, _ := watch(t, sc.c, 0)
	p := startTop(t, bin, w, h, "--addr", sc.a.GRPCAddr)
	port := strconv.Itoa(sc.s.Port)
	p.waitFor("the target and an empty list", 20*time.Second, screenHas("culprit top  target", "no open findings", "connected to "+sc.a.GRPCAddr, ":"+port+" queue"))

	sc.s.MustDo(t, "dialasync 40")
	ev, _ := next(t, events, 10*time.Second, isAcceptOverflow("app_not_accepting", culpritv1.FindingEvent_TYPE_OPENED))
	f := ev.Finding
	screen := p.waitFor("the finding's row and the full queue", 10*time.Second, screenHas(f.Title, "critical", "accept_overflow/app_not_accepting", "FULL"))
	t.Logf("the list:\n%s", screen)

	p.keys("Down")
	for range 20 {
		if strings.Contains(topSelectedRow(p.capture()), f.Title) {
			break
		}
		p.keys("Up")
		time.Sleep(150 * time.Millisecond)
	}
	p.keys("Enter")
	p.waitFor("the detail view", 5*time.Second, screenHas("FINDING  critical  accept_overflow/app_not_accepting", "symptom:", "fix:"))
	// The finding's numbers move while it is open: compare with its state
	// now until a capture falls between two updates.
	var want []string
	screen = p.waitFor("the finding's whole text", 15*time.Second, func(s string) bool {
		cur, err := sc.c.GetFinding(context.Background(), &culpritv1.GetFindingRequest{Id: f.Id})
		if err != nil {
			return false
		}
		want = []string{"symptom: " + cur.Symptom, "cause: " + cur.RootCause, "fix: " + cur.Remediation, cur.Title}
		for _, e := range cur.Evidence {
			want = append(want, "evidence: "+e.Signal, e.Note)
		}
		for _, a := range cur.Artifacts {
			want = append(want, a.Kind+":", a.Value, a.Detail)
		}
		got := topNormalized(s)
		for _, part := range want {
			if !strings.Contains(got, topNormalized(part)) {
				return false
			}
		}
		return true
	})
	if strings.Contains(screen, "more below") {
		t.Errorf("the finding's text did not fit %dx%d; scrolling is not what this test checks:\n%s", w, h, screen)
	}
	t.Logf("the detail view:\n%s", screen)

	p.keys("Escape")
	p.waitFor("the list again", 5*time.Second, func(s string) bool {
		return strings.Contains(s, "FINDINGS") && strings.Contains(s, f.Title) && !strings.Contains(s, "symptom:")
	})

	p.resize(36, 6)
	screen = p.waitFor("the small-window notice", 5*time.Second, screenHas("too small", "critical"))
	t.Logf("36x6:\n%s", screen)
	p.resize(w, h)
	p.waitFor("the list after the window grew", 5*time.Second, screenHas("FINDINGS", f.Title, "SIGNALS"))

	p.keys("q")
	if st := p.waitExit(5 * time.Second); st != 0 {
		t.Fatalf("culprit top exited with status %d:\n%s", st, p.capture())
	}
}

// The agent is not there when top starts, comes up, and goes away again:
// the status line says unreachable and retrying, the view connects on its
// own, and keeps the last data, saying as of when.
func TestTopAgentUnreachable(t *testing.T) {
	bin := topBinary(t)
	addr := freeAddr(t)
	p := startTop(t, bin, 160, 40, "--addr", addr, "--interval", "500ms")
	screen := p.waitFor("the unreachable status", 10*time.Second, screenHas("agent "+addr+" unreachable (connection refused)", "retrying every 500ms"))
	t.Logf("before the agent:\n%s", screen)

	s := testenv.Start(t, testenv.Options{Backlog: 16, Accept: true})
	cfg := testConfig(t, s.PID)
	cfg.Agent.GRPCAddr = addr
	a, err := StartAgent(context.Background(), cfg, newLogger(cfg, io.Discard))
	if err != nil {
		t.Fatalf("start agent on %s: %v", addr, err)
	}
	stop := sync.OnceValue(func() error { return a.Stop(5 * time.Second) })
	t.Cleanup(func() {
		if err := stop(); err != nil {
			t.Errorf("stop agent: %v", err)
		}
	})
	start := time.Now()
	screen = p.waitFor("the view connected", 15*time.Second, screenHas("connected to "+addr, fmt.Sprintf("[%d]  ", s.PID)))
	t.Logf("connected %s after the agent started:\n%s", time.Since(start).Round(10*time.Millisecond), screen)

	if err := stop(); err != nil {
		t.Fatalf("stop agent: %v", err)
	}
	screen = p.waitFor("unreachable again, with the last data", 10*time.Second, screenHas("unreachable", "data as of", fmt.Sprintf("[%d]  ", s.PID)))
	t.Logf("after the agent left:\n%s", screen)

	p.keys("q")
	if st := p.waitExit(5 * time.Second); st != 0 {
		t.Fatalf("culprit top exited with status %d:\n%s", st, p.capture())
	}
}

// ---- the model, without a terminal

func topTS(t time.Time) *timestamppb.Timestamp { return timestamppb.New(t) }

func topSignal(d *signals.Desc, v float64, at time.Time, labels ...string) *culpritv1.Signal {
	sg := &culpritv1.Signal{Name: d.Name, Value: v, Time: topTS(at)}
	for i := 0; i+1 < len(labels); i += 2 {
		sg.Labels = append(sg.Labels, &culpritv1.Label{Name: labels[i], Value: labels[i+1]})
	}
	return sg
}

func topTestFindings(now time.Time) (warn, crit *culpritv1.Finding) {
	warn = &culpritv1.Finding{
		Id: "fd_exhaustion/pid", Rule: "fd_exhaustion", Cause: "fd_leak", Title: "file descriptors leak: pipes grow 120/min",
		Severity: culpritv1.Severity_SEVERITY_WARNING, State: culpritv1.FindingState_FINDING_STATE_OPEN,
		FirstSeen: topTS(now.Add(-3 * time.Minute)), LastSeen: topTS(now),
		Symptom:     "open file descriptors grew from 40 to 400 in 3 minutes",
		RootCause:   "pipes are opened and never closed; at this rate the limit of 1024 is reached in 5 minutes",
		Evidence:    []*culpritv1.Evidence{{Signal: `process_open_fds{kind="pipe"}`, Value: 360, Unit: "fds", Window: durationpb.New(3 * time.Minute), Note: "the kind that grows"}},
		Artifacts:   []*culpritv1.Artifact{{Kind: "stack", Value: "main.leak\nmain.main", Detail: "where the pipes are opened"}},
		Remediation: "close the pipes: find the os.Pipe without a Close",
		Sequence:    7,
	}
	crit = &culpritv1.Finding{
		Id: "accept_overflow/8080", Rule: "accept_overflow", Cause: "app_not_accepting", Title: "Accept queue of 127.0.0.1:8080 overflowing: the app is not accepting",
		Severity: culpritv1.Severity_SEVERITY_CRITICAL, State: culpritv1.FindingState_FINDING_STATE_OPEN,
		FirstSeen: topTS(now.Add(-12 * time.Second)), LastSeen: topTS(now),
		Symptom: "30 connections dropped", RootCause: "the accept loop is starved", Remediation: "unblock the accept loop",
		Sequence: 9,
	}
	return warn, crit
}

func topRunes(s string) tea.KeyMsg { return tea.KeyMsg{Type: tea.KeyRunes, Runes: []rune(s)} }

func TestTopModelKeys(t *testing.T) {
	now := time.Now()
	m := newTopModel(context.Background(), nil, "127.0.0.1:9462", time.Second, 60)
	m.Update(tea.WindowSizeMsg{Width: 140, Height: 40})
	warn, crit := topTestFindings(now)
	m.Update(topEventMsg{&culpritv1.FindingEvent{Type: culpritv1.FindingEvent_TYPE_CURRENT, Finding: warn}})
	m.Update(topEventMsg{&culpritv1.FindingEvent{Type: culpritv1.FindingEvent_TYPE_OPENED, Finding: crit}})
	m.Update(topSnapshotMsg{at: now, snap: &culpritv1.Snapshot{Time: topTS(now), InstanceId: "run1",
		Target:  &culpritv1.Target{Found: true, Pid: 42, Comm: "web"},
		Signals: []*culpritv1.Signal{topSignal(signals.ProcessFDsOpen, 400, now), topSignal(signals.ProcessFDLimit, 1024, now, "type", "soft")}}})

	v := m.View()
	if i, j := strings.Index(v, crit.Title), strings.Index(v, warn.Title); i < 0 || j < 0 || i > j {
		t.Fatalf("want the critical finding above the warning:\n%s", v)
	}
	if !strings.Contains(topSelectedRow(v), crit.Title) {
		t.Errorf("the most severe finding is not selected first:\n%s", v)
	}
	for _, s := range []string{"target web[42]", "2 open: 1 critical, 1 warning", "accept_overflow/app_not_accepting", "12s", "3m", "400 / 1024", "39% of the soft limit"} {
		if !strings.Contains(v, s) {
			t.Errorf("list view lacks %q:\n%s", s, v)
		}
	}

	m.Update(tea.KeyMsg{Type: tea.KeyDown})
	m.Update(tea.KeyMsg{Type: tea.KeyDown}) // past the end: stays on the last
	if v := m.View(); !strings.Contains(topSelectedRow(v), warn.Title) {
		t.Fatalf("down did not select the second finding:\n%s", v)
	}
	m.Update(tea.KeyMsg{Type: tea.KeyEnter})
	v = m.View()
	for _, s := range []string{"symptom: " + warn.Symptom, "cause:   " + warn.RootCause + " (fd_leak, confidence 0%)",
		`evidence: process_open_fds{kind="pipe"} = 360 fds over 3m0s  — the kind that grows`, "stack:  where the pipes are opened",
		"main.leak", "main.main", "fix:     " + warn.Remediation, "open for 3m", "esc back"} {
		if !strings.Contains(v, s) {
			t.Errorf("detail view lacks %q:\n%s", s, v)
		}
	}
	// It resolves while read: the text stays, marked.
	resolved := proto.Clone(warn).(*culpritv1.Finding)
	resolved.State, resolved.Resolved = culpritv1.FindingState_FINDING_STATE_RESOLVED, topTS(now)
	m.Update(topEventMsg{&culpritv1.FindingEvent{Type: culpritv1.FindingEvent_TYPE_RESOLVED, Finding: resolved}})
	if v := m.View(); !strings.Contains(v, "resolved at") || !strings.Contains(v, warn.Symptom) || !strings.Contains(v, "ENDED") {
		t.Errorf("a finding resolved while shown should stay, marked resolved:\n%s", v)
	}
	m.Update(tea.KeyMsg{Type: tea.KeyEsc})
	v = m.View()
	if !strings.Contains(v, "FINDINGS  1 open") || strings.Contains(v, warn.Title) || !strings.Contains(topSelectedRow(v), crit.Title) {
		t.Errorf("back in the list: want only the critical finding, selected:\n%s", v)
	}
	// A GAP empties the list: the CURRENT events that follow rebuild it.
	m.Update(topEventMsg{&culpritv1.FindingEvent{Type: culpritv1.FindingEvent_TYPE_GAP, Detail: "the agent restarted"}})
	if v := m.View(); !strings.Contains(v, "no open findings") || !strings.Contains(v, "the agent restarted") {
		t.Errorf("after a GAP:\n%s", v)
	}
	if _, cmd := m.Update(topRunes("q")); cmd == nil || cmd() != tea.Quit() {
		t.Error("q does not quit")
	}
}

// Whatever the window, the view never draws more lines than it has, nor
// wider ones (the terminal would scroll or wrap them into garbage), and
// says what it needs when it is too small.
func TestTopViewFitsEveryWindow(t *testing.T) {
	now := time.Now()
	m := newTopModel(context.Background(), nil, "[2001:db8::1]:9462", time.Second, 60)
	warn, crit := topTestFindings(now)
	for i := range 30 {
		f := proto.Clone(warn).(*culpritv1.Finding)
		f.Id, f.Title = fmt.Sprintf("f%d", i), fmt.Sprintf("finding number %d with a title long enough to be cut somewhere ä中文", i)
		m.Update(topEventMsg{&culpritv1.FindingEvent{Type: culpritv1.FindingEvent_TYPE_OPENED, Finding: f}})
	}
	m.Update(topEventMsg{&culpritv1.FindingEvent{Type: culpritv1.FindingEvent_TYPE_OPENED, Finding: crit}})
	for i := range 3 {
		at := now.Add(time.Duration(i) * time.Second)
		var sigs []*culpritv1.Signal
		for port := 8000; port < 8030; port++ {
			queue, drops := 0.0, 0.0
			if port == 8003 { // one listener in trouble among quiet ones
				queue, drops = 129, float64(100*i)
			}
			sigs = append(sigs,
				topSignal(signals.ListenQueueLength, queue, at, "addr", "::", "port", strconv.Itoa(port)),
				topSignal(signals.ListenBacklog, 128, at, "addr", "::", "port", strconv.Itoa(port)),
				topSignal(signals.ListenQueueFull, map[bool]float64{true: 1}[queue > 128], at, "addr", "::", "port", strconv.Itoa(port)),
				topSignal(signals.ListenOverflowsTotal, drops, at, "addr", "::", "port", strconv.Itoa(port)))
		}
		m.Update(topSnapshotMsg{at: at, snap: &culpritv1.Snapshot{Time: topTS(at), Signals: sigs, Target: &culpritv1.Target{Found: true, Pid: 1, Comm: "a-rather-long-command-name"}}})
	}
	for _, detail := range []bool{false, true} {
		for _, w := range []int{1, 10, 39, 40, 41, 60, 79, 80, 120, 200} {
			for _, h := range []int{1, 3, 7, 8, 9, 11, 12, 24, 60} {
				m.Update(tea.WindowSizeMsg{Width: w, Height: h})
				if detail && m.detail == nil {
					m.Update(tea.KeyMsg{Type: tea.KeyEnter})
				}
				v := m.View()
				lines := strings.Split(v, "\n")
				if len(lines) > h {
					t.Errorf("%dx%d detail=%v: %d lines", w, h, detail, len(lines))
				}
				for _, l := range lines {
					if lipgloss.Width(l) > w {
						t.Errorf("%dx%d detail=%v: line of %d cells: %q", w, h, detail, lipgloss.Width(l), l)
						break
					}
				}
				small := w < topMinWidth || h < topMinHeight
				if small && h >= 2 && w >= 30 && !strings.Contains(v, "too small") {
					t.Errorf("%dx%d: no notice that the window is too small:\n%s", w, h, v)
				}
				if !small && !detail && !strings.Contains(v, "FINDINGS") {
					t.Errorf("%dx%d: no findings section:\n%s", w, h, v)
				}
			}
		}
	}
	m.Update(tea.WindowSizeMsg{Width: 120, Height: 50})
	m.Update(tea.KeyMsg{Type: tea.KeyEsc})
	v := m.View()
	if !strings.Contains(v, "more signals") || !strings.Contains(v, "fds open") || !strings.Contains(v, "*:8003 queue") || !strings.Contains(v, "129 / 128") {
		t.Errorf("30 listeners in 50 lines: want the process's signals shown and the rest said to be hidden:\n%s", v)
	}
	if m.sig.cur.hiddenListeners != 30-topMaxListeners {
		t.Errorf("hidden listeners = %d, want %d", m.sig.cur.hiddenListeners, 30-topMaxListeners)
	}
}

// Counters become rates between the agent's own timestamps; a counter not
// refreshed since keeps its rate; a new agent run starts over; and the
// sparklines keep at most history values, forgetting a listener that left.
func TestTopSignalsRatesAndBounds(t *testing.T) {
	s := newTopSignals(10)
	t0 := time.Now()
	snap := func(inst string, at time.Time, drops, tid1, tid2 float64, withListener bool) *culpritv1.Snapshot {
		sigs := []*culpritv1.Signal{
			topSignal(signals.ThreadStatCPUSecondsTotal, tid1, at, "tid", "101", "thread", "worker-0"),
			topSignal(signals.ThreadStatCPUSecondsTotal, tid2, at, "tid", "102", "thread", "worker-1"),
			topSignal(signals.ThreadRunqWaitSecondsTotal, tid1/100, at, "tid", "101", "thread", "worker-0"),
			topSignal(signals.ThreadRunqWaitsTotal, tid1*10, at, "tid", "101", "thread", "worker-0"),
			topSignal(signals.CgroupCPUPeriodsTotal, tid1*10, at),
			topSignal(signals.CgroupCPUThrottledPeriodsTotal, tid1*5, at),
			topSignal(signals.CgroupCPUQuotaCores, 0.5, at),
		}
		if withListener {
			sigs = append(sigs, topSignal(signals.ListenOverflowsTotal, drops, at, "addr", "10.0.0.1", "port", "8080"))
		}
		return &culpritv1.Snapshot{Time: topTS(at), InstanceId: inst, Signals: sigs}
	}
	s.observe(snap("a", t0, 10, 5, 1, true))
	if c := s.cur; !math.IsNaN(c.cpu) || !math.IsNaN(c.listeners[0].drops) {
		t.Fatalf("first snapshot: no rate can be known yet: cpu %v drops %v", c.cpu, c.listeners[0].drops)
	}
	s.observe(snap("a", t0.Add(2*time.Second), 30, 7, 1.5, true))
	c := s.cur
	if c.listeners[0].drops != 10 || c.listeners[0].addr != "10.0.0.1:8080" {
		t.Errorf("drops = %v/s on %s, want 10/s on 10.0.0.1:8080", c.listeners[0].drops, c.listeners[0].addr)
	}
	if c.cpu != 1.25 || c.busyTid != "101" || c.busyName != "worker-0" || c.busyCores != 1 {
		t.Errorf("cpu %v cores, busiest %s/%s at %v; want 1.25, worker-0/101 at 1", c.cpu, c.busyName, c.busyTid, c.busyCores)
	}
	if math.Abs(c.busyMeanWait-0.001) > 1e-9 || c.throttled != 0.5 || c.quota != 0.5 {
		t.Errorf("mean wait %v (want 1 ms), throttled %v (want 0.5), quota %v", c.busyMeanWait, c.throttled, c.quota)
	}
	// The same stamps again: the collectors have not run since.
	s.observe(snap("a", t0.Add(2*time.Second), 30, 7, 1.5, true))
	if s.cur.listeners[0].drops != 10 || s.cur.cpu != 1.25 {
		t.Errorf("not refreshed: want the last rates, got drops %v cpu %v", s.cur.listeners[0].drops, s.cur.cpu)
	}
	s.observe(snap("b", t0.Add(3*time.Second), 1, 0.1, 0.1, true))
	if !math.IsNaN(s.cur.cpu) || !math.IsNaN(s.cur.listeners[0].drops) {
		t.Errorf("a new agent run: counters start over, no rate yet; got cpu %v drops %v", s.cur.cpu, s.cur.listeners[0].drops)
	}
	for i := range 1000 {
		s.observe(snap("b", t0.Add(time.Duration(4+i)*time.Second), float64(i), float64(i), float64(i), i < 500))
	}
	for k, r := range s.series {
		if len(r.vals) != 10 || r.n > 10 {
			t.Errorf("series %s holds %d values (capacity %d), want at most 10", k, r.n, len(r.vals))
		}
	}
	if _, ok := s.series["drops 10.0.0.1:8080"]; ok {
		t.Error("a listener gone for longer than the history is still kept")
	}
	if got := sparkline(s.series["cpu"].last(10), 10, true); got != "██████████" {
		t.Errorf("a steady 1 core: sparkline %q", got)
	}
}

func TestTopSparkline(t *testing.T) {
	nan := math.NaN()
	for _, c := range []struct {
		vals      []float64
		width     int
		zeroBased bool
		want      string
	}{
		{[]float64{0, 1, 2, 3, 4, 5, 6, 7}, 8, true, "▁▂▃▄▅▆▇█"},
		{[]float64{5, 5, 5}, 5, true, "  ███"},
		{[]float64{5, 5, 5}, 5, false, "  ▁▁▁"},
		{[]float64{100, nan, 107}, 3, false, "▁ █"},
		{[]float64{1, 2, 3, 4}, 2, true, "▆█"},
		{nil, 3, true, "   "},
	} {
		if got := sparkline(c.vals, c.width, c.zeroBased); got != c.want {
			t.Errorf("sparkline(%v, %d, %v) = %q, want %q", c.vals, c.width, c.zeroBased, got, c.want)
		}
	}
	r := newTopRing(4)
	for i := range 10 {
		r.push(float64(i))
	}
	if got := fmt.Sprint(r.last(10)); got != "[6 7 8 9]" {
		t.Errorf("ring of 4 after 0..9: %s", got)
	}
}

func TestTopWrapLine(t *testing.T) {
	line := "    cause:   the accept queue of 127.0.0.1:8080 (backlog 8) has been full for 425ms and the app accepted no connection: its accept loop is starved"
	got := wrapLine(line, 50)
	for i, l := range got {
		if lipgloss.Width(l) > 50 {
			t.Errorf("line %d is %d cells: %q", i, lipgloss.Width(l), l)
		}
		if i > 0 && !strings.HasPrefix(l, strings.Repeat(" ", 13)+"") {
			t.Errorf("continuation %q is not under the value", l)
		}
	}
	if strings.Join(strings.Fields(strings.Join(got, " ")), " ") != strings.Join(strings.Fields(line), " ") {
		t.Errorf("wrapping changed the words:\n%s", strings.Join(got, "\n"))
	}
	if !strings.HasPrefix(got[0], "    cause:   the accept") {
		t.Errorf("first line lost its spacing: %q", got[0])
	}
	long := wrapLine("    stack: "+strings.Repeat("x", 120), 40)
	for _, l := range long {
		if lipgloss.Width(l) > 40 {
			t.Errorf("a long word overflows: %q", l)
		}
	}
	if strings.Count(strings.Join(long, ""), "x") != 120 {
		t.Errorf("a long word lost characters: %q", long)
	}
}

// A finding longer than the window scrolls: the fix, at its end, is
// reached with End and PgDn, and Home goes back to the symptom.
func TestTopDetailScroll(t *testing.T) {
	now := time.Now()
	m := newTopModel(context.Background(), nil, "127.0.0.1:9462", time.Second, 60)
	m.Update(tea.WindowSizeMsg{Width: 60, Height: 12})
	warn, _ := topTestFindings(now)
	warn.Artifacts = append(warn.Artifacts, &culpritv1.Artifact{Kind: "stack", Value: strings.Repeat("frame\n", 30) + "last.frame", Detail: "a deep stack"})
	m.Update(topEventMsg{&culpritv1.FindingEvent{Type: culpritv1.FindingEvent_TYPE_OPENED, Finding: warn}})
	m.Update(tea.KeyMsg{Type: tea.KeyEnter})
	v := m.View()
	if !strings.Contains(v, "symptom:") || strings.Contains(v, "fix:") || !strings.Contains(v, "more below") {
		t.Fatalf("the top of a long finding:\n%s", v)
	}
	m.Update(tea.KeyMsg{Type: tea.KeyEnd})
	if v := m.View(); !strings.Contains(v, "fix:") || strings.Contains(v, "more below") {
		t.Fatalf("End should show the end:\n%s", v)
	}
	m.Update(tea.KeyMsg{Type: tea.KeyHome})
	for range 20 {
		m.Update(tea.KeyMsg{Type: tea.KeyPgDown})
	}
	if v := m.View(); !strings.Contains(v, "fix:") || !strings.Contains(v, "last.frame") {
		t.Fatalf("PgDn past the end should stop at the end:\n%s", v)
	}
	m.Update(tea.KeyMsg{Type: tea.KeyHome})
	if v := m.View(); !strings.Contains(v, "symptom:") {
		t.Fatalf("Home should go back to the top:\n%s", v)
	}
}
