package main

import (
	"bytes"
	"cmp"
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"math"
	"os"
	"sort"
	"strconv"
	"strings"
	"time"

	tea "github.com/charmbracelet/bubbletea"
	"github.com/charmbracelet/lipgloss"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	culpritv1 "github.com/culprit-dev/culprit/proto/culprit/v1"
	"github.com/culprit-dev/culprit/signals"
)

// What the view keeps is bounded whatever runs for how long: each
// sparkline holds at most --history values, at most topMaxListeners
// listeners are tracked (a pod may have hundreds) and at most
// topMaxFindings findings (the agent bounds its own, but a view must not
// trust a peer for its memory).
const (
	topDefaultHistory = 60
	topMinHistory     = 10
	topMaxHistory     = 600
	topMaxListeners   = 16
	topMaxFindings    = 500
	// A snapshot that takes longer is reported as the agent not
	// answering, rather than freezing the signals silently.
	topSnapshotTimeout = 2 * time.Second
	// Below this the two sections cannot be laid out readably; the view
	// says so instead of drawing a garbled screen.
	topMinWidth  = 40
	topMinHeight = 8
)

// cmdTop is `culprit top`: a live view for someone exec'd into the pod.
// Findings come from WatchFindings (resumed by sequence across agent
// restarts, as `findings --follow` does), signals from GetSnapshot polled
// every --interval.
func cmdTop(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("culprit top", flag.ContinueOnError)
	fs.SetOutput(stderr)
	cn := connFlags(fs)
	interval := fs.Duration("interval", time.Second, "how often the signals are read (GetSnapshot)")
	history := fs.Int("history", topDefaultHistory, fmt.Sprintf("values each sparkline keeps (%d to %d)", topMinHistory, topMaxHistory))
	if err := fs.Parse(args); err != nil {
		return err
	}
	if *interval < 100*time.Millisecond || *interval > time.Minute {
		return fmt.Errorf("--interval %s: want 100ms to 1m", *interval)
	}
	if *history < topMinHistory || *history > topMaxHistory {
		return fmt.Errorf("--history %d: want %d to %d", *history, topMinHistory, topMaxHistory)
	}
	out, ok := stdout.(*os.File)
	if !ok || !isTerminal(out) {
		return errors.New("top draws on a terminal and stdout is not one: run it with kubectl exec -it, or use `culprit findings --follow` in a pipe")
	}
	conn, c, err := cn.dial()
	if err != nil {
		return err
	}
	defer conn.Close()

	tctx, cancel := context.WithCancel(ctx)
	defer cancel()
	m := newTopModel(tctx, c, *cn.addr, *interval, *history)
	// gRPC backs off reconnecting up to two minutes; the view promises a
	// retry every interval, and an agent that is back should show at once.
	m.reconnect = conn.ResetConnectBackoff
	p := tea.NewProgram(m, tea.WithAltScreen(), tea.WithContext(tctx), tea.WithOutput(out))
	watched := make(chan struct{})
	go func() {
		defer close(watched)
		watchForTop(tctx, c, m.wake, p.Send)
	}()
	_, err = p.Run()
	cancel()
	<-watched
	switch {
	case err == nil, errors.Is(err, tea.ErrInterrupted):
		return nil
	case errors.Is(err, tea.ErrProgramKilled) && ctx.Err() != nil:
		return nil // SIGTERM: leave quietly, as `findings --follow` does
	}
	return fmt.Errorf("top: %w", err)
}

func isTerminal(f *os.File) bool {
	st, err := f.Stat()
	return err == nil && st.Mode()&os.ModeCharDevice != 0
}

// Messages from the watcher goroutine and the snapshot poll.
type (
	topEventMsg struct{ ev *culpritv1.FindingEvent }
	// topWatchMsg: err nil means the stream is open again.
	topWatchMsg struct {
		err     error
		retryIn time.Duration
	}
	topSnapshotMsg struct {
		snap *culpritv1.Snapshot
		err  error
		at   time.Time
	}
	topPollMsg struct{}
)

// watchForTop follows WatchFindings until ctx ends, reconnecting with the
// cursor the way followFindings does, so an agent restart neither loses
// nor repeats events: the view stays exact across it. A value on wake
// cuts a backoff short: the poll saw the agent answer again.
func watchForTop(ctx context.Context, c culpritv1.DiagnosticsClient, wake <-chan struct{}, send func(tea.Msg)) {
	req := &culpritv1.WatchRequest{}
	backoff := 200 * time.Millisecond
	for {
		stream, err := c.WatchFindings(ctx, req)
		if err == nil {
			send(topWatchMsg{})
			for {
				ev, rerr := stream.Recv()
				if rerr != nil {
					err = rerr
					break
				}
				backoff = 200 * time.Millisecond
				send(topEventMsg{ev})
				if id := ev.GetInstanceId(); id != "" && id != req.InstanceId {
					// A new run numbers its events from 1 again.
					req.InstanceId, req.SinceSequence = id, 0
				}
				if ev.Sequence > req.SinceSequence && ev.Type != culpritv1.FindingEvent_TYPE_GAP {
					req.SinceSequence = ev.Sequence
				}
			}
		}
		if ctx.Err() != nil {
			return
		}
		if err == nil {
			err = io.EOF
		}
		send(topWatchMsg{err: err, retryIn: backoff})
		select {
		case <-ctx.Done():
			return
		case <-time.After(backoff):
		case <-wake:
		}
		backoff = min(backoff*2, 5*time.Second)
	}
}

// topModel is the bubbletea model. Only the program's goroutine touches
// it; the watcher and the poll reach it by messages.
type topModel struct {
	ctx       context.Context
	client    culpritv1.DiagnosticsClient
	reconnect func()        // makes the connection retry now; nil in tests
	wake      chan struct{} // tells the watcher to retry now (capacity 1)
	addr      string
	interval  time.Duration
	history   int

	width, height int

	findings map[string]*culpritv1.Finding // open findings by id
	order    []string                      // their ids, most severe first
	selected string                        // id of the selected finding
	moved    bool                          // the person moved the selection
	evicted  int                           // findings dropped at topMaxFindings

	detail     *culpritv1.Finding // shown in full; nil in the list
	detailGone time.Time          // when it resolved; zero while open
	scroll     int

	snap         *culpritv1.Snapshot
	lastOK       time.Time // last snapshot answered
	pollErr      error
	failingSince time.Time
	polled       bool // a snapshot call has finished, well or not

	watchErr   error
	watchRetry time.Duration
	note       string // a notice shown in the status line until noteUntil
	noteUntil  time.Time

	sig *topSignals
}

func newTopModel(ctx context.Context, c culpritv1.DiagnosticsClient, addr string, interval time.Duration, history int) *topModel {
	return &topModel{
		ctx: ctx, client: c, addr: addr, interval: interval, history: history,
		findings: map[string]*culpritv1.Finding{},
		wake:     make(chan struct{}, 1),
		sig:      newTopSignals(history),
	}
}

func (m *topModel) Init() tea.Cmd { return m.poll() }

// poll asks for one snapshot. The next is scheduled when it answers, so a
// slow agent is never asked twice at once.
func (m *topModel) poll() tea.Cmd {
	ctx, c := m.ctx, m.client
	return func() tea.Msg {
		at := time.Now()
		cctx, cancel := context.WithTimeout(ctx, topSnapshotTimeout)
		defer cancel()
		s, err := c.GetSnapshot(cctx, &culpritv1.SnapshotRequest{})
		return topSnapshotMsg{snap: s, err: err, at: at}
	}
}

func (m *topModel) Update(msg tea.Msg) (tea.Model, tea.Cmd) {
	switch msg := msg.(type) {
	case tea.WindowSizeMsg:
		m.width, m.height = msg.Width, msg.Height
		m.clampScroll()
	case tea.KeyMsg:
		return m, m.key(msg.String())
	case topEventMsg:
		m.event(msg.ev)
	case topWatchMsg:
		m.watchErr, m.watchRetry = msg.err, msg.retryIn
	case topSnapshotMsg:
		m.polled = true
		if msg.err != nil {
			if m.pollErr == nil {
				m.failingSince = msg.at
			}
			m.pollErr = msg.err
			m.sig.missed()
			if m.reconnect != nil {
				m.reconnect()
			}
		} else {
			if m.pollErr != nil || m.watchErr != nil {
				select {
				case m.wake <- struct{}{}:
				default: // a wake-up is already pending
				}
			}
			m.pollErr = nil
			m.snap, m.lastOK = msg.snap, time.Now()
			m.sig.observe(msg.snap)
		}
		wait := max(0, m.interval-time.Since(msg.at))
		return m, tea.Tick(wait, func(time.Time) tea.Msg { return topPollMsg{} })
	case topPollMsg:
		return m, m.poll()
	}
	return m, nil
}

func (m *topModel) key(k string) tea.Cmd {
	if k == "q" || k == "ctrl+c" {
		return tea.Quit
	}
	if m.detail != nil {
		page := max(1, m.detailBodyHeight()-1)
		switch k {
		case "esc", "backspace", "left", "h":
			m.detail, m.scroll = nil, 0
			return nil
		case "up", "k":
			m.scroll--
		case "down", "j":
			m.scroll++
		case "pgup", "b":
			m.scroll -= page
		case "pgdown", " ", "f":
			m.scroll += page
		case "home", "g":
			m.scroll = 0
		case "end", "G":
			m.scroll = math.MaxInt32
		}
		m.clampScroll()
		return nil
	}
	i := m.selectedIndex()
	switch k {
	case "up", "k":
		i--
	case "down", "j":
		i++
	case "home", "g":
		i = 0
	case "end", "G":
		i = len(m.order) - 1
	case "enter", "right", "l":
		if f := m.findings[m.selected]; f != nil {
			m.detail, m.detailGone, m.scroll = f, time.Time{}, 0
		}
		return nil
	}
	if len(m.order) > 0 {
		m.selected = m.order[max(0, min(i, len(m.order)-1))]
		m.moved = true
	}
	return nil
}

func (m *topModel) selectedIndex() int {
	for i, id := range m.order {
		if id == m.selected {
			return i
		}
	}
	return 0
}

// event applies one finding event to the open set.
func (m *topModel) event(ev *culpritv1.FindingEvent) {
	switch ev.Type {
	case culpritv1.FindingEvent_TYPE_GAP:
		// CURRENT events (or this run's whole journal) follow and rebuild
		// the open set; what is kept now may have resolved meanwhile.
		idx := m.selectedIndex()
		m.findings = map[string]*culpritv1.Finding{}
		m.reorder(idx)
		m.note, m.noteUntil = "events were missed ("+ev.GetDetail()+"); the list was rebuilt", time.Now().Add(10*time.Second)
		return
	case culpritv1.FindingEvent_TYPE_RESOLVED:
		if f := ev.Finding; f != nil {
			idx := m.selectedIndex()
			delete(m.findings, f.Id)
			if m.detail != nil && m.detail.Id == f.Id {
				// Keep the last open state on screen: the person is
				// reading it. Say it resolved.
				m.detailGone = time.Now()
				if f.Resolved != nil {
					m.detailGone = f.Resolved.AsTime()
				}
			}
			m.reorder(idx)
		}
		return
	}
	f := ev.Finding
	if f == nil {
		return
	}
	m.findings[f.Id] = f
	if m.detail != nil && m.detail.Id == f.Id {
		m.detail, m.detailGone = f, time.Time{}
		m.clampScroll()
	}
	m.reorder(m.selectedIndex())
}

// reorder sorts the open findings, evicts past topMaxFindings, and keeps
// the selection on the same finding, or at the same row when it left.
func (m *topModel) reorder(prevIdx int) {
	m.order = m.order[:0]
	for id := range m.findings {
		m.order = append(m.order, id)
	}
	sort.Slice(m.order, func(i, j int) bool {
		a, b := m.findings[m.order[i]], m.findings[m.order[j]]
		if a.Severity != b.Severity {
			return a.Severity > b.Severity
		}
		if ta, tb := a.GetFirstSeen().AsTime(), b.GetFirstSeen().AsTime(); !ta.Equal(tb) {
			return ta.Before(tb)
		}
		return a.Id < b.Id
	})
	for len(m.order) > topMaxFindings {
		// The least severe, newest go first: what is left is what matters.
		last := m.order[len(m.order)-1]
		delete(m.findings, last)
		m.order = m.order[:len(m.order)-1]
		m.evicted++
	}
	if !m.moved && len(m.order) > 0 {
		// Until the person picks one, the selection is the top row: the
		// most severe finding, new ones included.
		m.selected = m.order[0]
	}
	if _, ok := m.findings[m.selected]; !ok {
		m.selected = ""
		if len(m.order) > 0 {
			m.selected = m.order[max(0, min(prevIdx, len(m.order)-1))]
		}
	}
}

// ---- signals

// topSignals turns snapshots into the rows of the signals section and
// keeps their sparklines.
type topSignals struct {
	history  int
	series   map[string]*topRing
	counters map[string]topCounter // by name and labels
	instance string
	cur      topSample
	have     bool
}

type topCounter struct {
	v, rate float64
	t       time.Time
}

type topListener struct {
	addr, port            string
	queue, backlog, drops float64
	full                  bool
}

type topSample struct {
	listeners       []topListener
	hiddenListeners int
	fds, fdLimit    float64
	rss             float64
	cpu             float64 // cores
	cpuSource       string
	runqP99         float64
	busyName        string
	busyTid         string
	busyCores       float64
	busyMeanWait    float64 // seconds per wait (eBPF)
	busyWaitShare   float64 // share of the time runnable, not running (schedstat)
	throttled       float64 // share of CFS periods throttled
	quota           float64 // cores; NaN without a limit
}

func newTopSignals(history int) *topSignals {
	return &topSignals{history: history, series: map[string]*topRing{}, counters: map[string]topCounter{}}
}

func signalKey(sg *culpritv1.Signal) string {
	var b strings.Builder
	b.WriteString(sg.Name)
	for _, l := range sg.Labels {
		b.WriteByte(0)
		b.WriteString(l.Name)
		b.WriteByte('=')
		b.WriteString(l.Value)
	}
	return b.String()
}

func signalLabel(sg *culpritv1.Signal, name string) string {
	for _, l := range sg.Labels {
		if l.Name == name {
			return l.Value
		}
	}
	return ""
}

// observe reads one snapshot. Counters become rates between the times the
// agent stamped on them, not between polls: a collector that runs every
// 2 s read every second would otherwise alternate between 0 and double.
func (s *topSignals) observe(snap *culpritv1.Snapshot) {
	if snap.GetInstanceId() != s.instance {
		// Another run of the agent: its counters started over.
		s.instance = snap.GetInstanceId()
		clear(s.counters)
	}
	nan := math.NaN()
	next := make(map[string]topCounter, len(s.counters))
	rate := func(sg *culpritv1.Signal) float64 {
		k := signalKey(sg)
		t := snap.GetTime().AsTime()
		if sg.Time != nil {
			t = sg.Time.AsTime()
		}
		p, ok := s.counters[k]
		c := topCounter{v: sg.Value, t: t, rate: nan}
		switch {
		case !ok, sg.Value < p.v: // new, or reset: no rate yet
		case !t.After(p.t):
			c = p // not refreshed since: the last rate holds
		default:
			c.rate = (sg.Value - p.v) / t.Sub(p.t).Seconds()
		}
		next[k] = c
		return c.rate
	}

	smp := topSample{fds: nan, fdLimit: nan, rss: nan, cpu: nan, runqP99: nan, busyCores: nan,
		busyMeanWait: nan, busyWaitShare: nan, throttled: nan, quota: nan}
	listeners := map[string]*topListener{}
	listener := func(sg *culpritv1.Signal) *topListener {
		addr := signalLabel(sg, "addr")
		if addr == "0.0.0.0" || addr == "::" || addr == "" {
			addr = "*"
		} else if strings.Contains(addr, ":") {
			addr = "[" + addr + "]"
		}
		addr += ":" + signalLabel(sg, "port")
		l := listeners[addr]
		if l == nil {
			l = &topListener{addr: addr, port: signalLabel(sg, "port"), queue: nan, backlog: nan, drops: nan}
			listeners[addr] = l
		}
		return l
	}
	type thread struct {
		name                                    string
		bpfCPU, statCPU, wait, waits, schedWait float64
	}
	threads := map[string]*thread{}
	th := func(sg *culpritv1.Signal) *thread {
		tid := signalLabel(sg, "tid")
		t := threads[tid]
		if t == nil {
			t = &thread{name: signalLabel(sg, "thread"), bpfCPU: nan, statCPU: nan, wait: nan, waits: nan, schedWait: nan}
			threads[tid] = t
		}
		return t
	}
	var periods, throttledPeriods = nan, nan
	for _, sg := range snap.GetSignals() {
		switch sg.Name {
		case signals.ListenQueueLength.Name:
			listener(sg).queue = sg.Value
		case signals.ListenBacklog.Name:
			listener(sg).backlog = sg.Value
		case signals.ListenQueueFull.Name:
			listener(sg).full = sg.Value > 0
		case signals.ListenOverflowsTotal.Name:
			listener(sg).drops = rate(sg)
		case signals.ProcessFDsOpen.Name:
			smp.fds = sg.Value
		case signals.ProcessFDLimit.Name:
			if signalLabel(sg, "type") == "soft" {
				smp.fdLimit = sg.Value
			}
		case signals.ProcessResidentMemoryBytes.Name:
			smp.rss = sg.Value
		case signals.ThreadCPUSecondsTotal.Name:
			th(sg).bpfCPU = rate(sg)
		case signals.ThreadStatCPUSecondsTotal.Name:
			th(sg).statCPU = rate(sg)
		case signals.ThreadRunqWaitSecondsTotal.Name:
			th(sg).wait = rate(sg)
		case signals.ThreadRunqWaitsTotal.Name:
			th(sg).waits = rate(sg)
		case signals.ThreadSchedstatRunqWaitSecondsTotal.Name:
			th(sg).schedWait = rate(sg)
		case signals.ProcessRunqLatencyP99Seconds.Name:
			smp.runqP99 = sg.Value
		case signals.CgroupCPUPeriodsTotal.Name:
			periods = rate(sg)
		case signals.CgroupCPUThrottledPeriodsTotal.Name:
			throttledPeriods = rate(sg)
		case signals.CgroupCPUQuotaCores.Name:
			smp.quota = sg.Value
		}
	}
	s.counters = next

	// CPU: procfs utime+stime counts a thread that spins without ever
	// switching; the eBPF counter is the fallback when procfs is absent.
	for _, src := range []struct {
		name string
		get  func(*thread) float64
	}{{"procfs", func(t *thread) float64 { return t.statCPU }}, {"eBPF", func(t *thread) float64 { return t.bpfCPU }}} {
		total, seen := 0.0, false
		for tid, t := range threads {
			v := src.get(t)
			if math.IsNaN(v) {
				continue
			}
			total, seen = total+v, true
			if math.IsNaN(smp.busyCores) || v > smp.busyCores || (v == smp.busyCores && tid < smp.busyTid) {
				smp.busyCores, smp.busyTid, smp.busyName = v, tid, t.name
			}
		}
		if seen {
			smp.cpu, smp.cpuSource = total, src.name
			break
		}
	}
	if t := threads[smp.busyTid]; t != nil {
		if t.waits > 0 {
			smp.busyMeanWait = t.wait / t.waits
		}
		smp.busyWaitShare = t.schedWait
	}
	if periods > 0 && !math.IsNaN(throttledPeriods) {
		smp.throttled = throttledPeriods / periods
	} else if periods == 0 {
		smp.throttled = 0 // a quota, and nothing ran: nothing throttled
	}

	for _, l := range listeners {
		smp.listeners = append(smp.listeners, *l)
	}
	// Listeners that drop, then that queue, come first: they are why the
	// person is looking.
	sort.Slice(smp.listeners, func(i, j int) bool {
		a, b := smp.listeners[i], smp.listeners[j]
		if da, db := nanZero(a.drops), nanZero(b.drops); da != db {
			return da > db
		}
		if qa, qb := nanZero(a.queue), nanZero(b.queue); qa != qb {
			return qa > qb
		}
		return a.addr < b.addr
	})
	if len(smp.listeners) > topMaxListeners {
		smp.hiddenListeners = len(smp.listeners) - topMaxListeners
		smp.listeners = smp.listeners[:topMaxListeners]
	}

	s.cur, s.have = smp, true
	pushed := map[string]bool{}
	push := func(key string, v float64) {
		r := s.series[key]
		if r == nil {
			r = newTopRing(s.history)
			s.series[key] = r
		}
		r.push(v)
		pushed[key] = true
	}
	for _, l := range smp.listeners {
		push("queue "+l.addr, l.queue)
		push("drops "+l.addr, l.drops)
	}
	push("fds", smp.fds)
	push("rss", smp.rss)
	push("cpu", smp.cpu)
	push("runq", smp.runqP99)
	push("throttled", smp.throttled)
	s.pad(pushed)
}

// missed records a poll that got no answer: a gap in every sparkline, so
// the time the agent was away shows as a gap.
func (s *topSignals) missed() { s.pad(nil) }

// pad pushes a gap into the series not pushed this round and forgets those
// that hold nothing but gaps: a listener that closed leaves after one full
// window.
func (s *topSignals) pad(pushed map[string]bool) {
	for k, r := range s.series {
		if pushed[k] {
			continue
		}
		r.push(math.NaN())
		if r.empty() {
			delete(s.series, k)
		}
	}
}

func nanZero(v float64) float64 {
	if math.IsNaN(v) {
		return 0
	}
	return v
}

// topRing is a sparkline's values: the last cap, oldest first when read.
type topRing struct {
	vals []float64
	next int
	n    int
}

func newTopRing(capacity int) *topRing { return &topRing{vals: make([]float64, capacity)} }

func (r *topRing) push(v float64) {
	r.vals[r.next] = v
	r.next = (r.next + 1) % len(r.vals)
	r.n = min(r.n+1, len(r.vals))
}

// last returns up to k of the newest values, oldest first.
func (r *topRing) last(k int) []float64 {
	k = min(k, r.n)
	out := make([]float64, k)
	for i := range k {
		out[i] = r.vals[(r.next-k+i+2*len(r.vals))%len(r.vals)]
	}
	return out
}

func (r *topRing) empty() bool {
	for _, v := range r.last(r.n) {
		if !math.IsNaN(v) {
			return false
		}
	}
	return true
}

var sparkLevels = []rune("▁▂▃▄▅▆▇█")

// sparkline draws vals in width cells, newest at the right edge, a gap
// (unknown or no answer) as a space. zeroBased scales from 0 (a queue or
// a rate: 0 is the healthy floor); otherwise from the window's minimum
// (RSS, FDs: the growth is what shows).
func sparkline(vals []float64, width int, zeroBased bool) string {
	if width <= 0 {
		return ""
	}
	if len(vals) > width {
		vals = vals[len(vals)-width:]
	}
	lo, hi := math.Inf(1), math.Inf(-1)
	for _, v := range vals {
		if !math.IsNaN(v) {
			lo, hi = math.Min(lo, v), math.Max(hi, v)
		}
	}
	if zeroBased && lo > 0 {
		lo = 0
	}
	var b strings.Builder
	b.WriteString(strings.Repeat(" ", width-len(vals)))
	for _, v := range vals {
		switch {
		case math.IsNaN(v) || math.IsInf(v, 0):
			b.WriteByte(' ')
		case hi <= lo:
			b.WriteRune(sparkLevels[0])
		default:
			i := int(math.Round((v - lo) / (hi - lo) * float64(len(sparkLevels)-1)))
			b.WriteRune(sparkLevels[max(0, min(i, len(sparkLevels)-1))])
		}
	}
	return b.String()
}

// ---- drawing

var (
	topBold     = lipgloss.NewStyle().Bold(true)
	topDim      = lipgloss.NewStyle().Faint(true)
	topReverse  = lipgloss.NewStyle().Reverse(true)
	topCritical = lipgloss.NewStyle().Foreground(lipgloss.Color("9")).Bold(true)
	topWarning  = lipgloss.NewStyle().Foreground(lipgloss.Color("11"))
	topInfo     = lipgloss.NewStyle().Foreground(lipgloss.Color("12"))
	topGood     = lipgloss.NewStyle().Foreground(lipgloss.Color("10"))
	topAlarm    = lipgloss.NewStyle().Foreground(lipgloss.Color("15")).Background(lipgloss.Color("1")).Bold(true)
)

func sevName(s culpritv1.Severity) string {
	return strings.ToLower(strings.TrimPrefix(s.String(), "SEVERITY_"))
}

func sevStyle(s culpritv1.Severity) lipgloss.Style {
	switch s {
	case culpritv1.Severity_SEVERITY_CRITICAL:
		return topCritical
	case culpritv1.Severity_SEVERITY_WARNING:
		return topWarning
	}
	return topInfo
}

// fit cuts s to w cells (ending in "…" when cut) and pads it to w.
func fit(s string, w int) string {
	if w <= 0 {
		return ""
	}
	if n := lipgloss.Width(s); n <= w {
		return s + strings.Repeat(" ", w-n)
	}
	var b strings.Builder
	used := 0
	for _, r := range s {
		rw := lipgloss.Width(string(r))
		if used+rw > w-1 {
			break
		}
		b.WriteRune(r)
		used += rw
	}
	b.WriteString("…")
	return b.String() + strings.Repeat(" ", max(0, w-used-1))
}

// humanAge is how long ago, coarse as a person reads it: 12s, 4m, 1h05m, 3d.
func humanAge(d time.Duration) string {
	switch {
	case d < 0:
		return "0s"
	case d < time.Minute:
		return strconv.Itoa(int(d/time.Second)) + "s"
	case d < time.Hour:
		return strconv.Itoa(int(d/time.Minute)) + "m"
	case d < 48*time.Hour:
		return fmt.Sprintf("%dh%02dm", int(d/time.Hour), int(d%time.Hour/time.Minute))
	}
	return strconv.Itoa(int(d/(24*time.Hour))) + "d"
}

func (m *topModel) size() (int, int) {
	w, h := m.width, m.height
	if w <= 0 || h <= 0 {
		return 80, 24 // before the terminal told its size
	}
	return w, h
}

func (m *topModel) View() string {
	w, h := m.size()
	var lines []string
	switch {
	case w < topMinWidth || h < topMinHeight:
		lines = m.tinyView(w, h)
	case m.detail != nil:
		lines = m.detailView(w, h)
	default:
		lines = m.listView(w, h)
	}
	if len(lines) > h {
		lines = lines[:h]
	}
	return strings.Join(lines, "\n")
}

// tinyView still says what matters, the count of open findings and
// whether the agent answers, and what size the view needs.
func (m *topModel) tinyView(w, h int) []string {
	crit := 0
	for _, f := range m.findings {
		if f.Severity == culpritv1.Severity_SEVERITY_CRITICAL {
			crit++
		}
	}
	lines := []string{
		topBold.Render(fit(fmt.Sprintf("culprit: %d open, %d critical", len(m.findings), crit), w)),
		fit(fmt.Sprintf("window %dx%d too small: need %dx%d", w, h, topMinWidth, topMinHeight), w),
	}
	if m.pollErr != nil {
		lines = append(lines, topAlarm.Render(fit("agent unreachable; retrying", w)))
	}
	return lines
}

func (m *topModel) headerLine(w int) string {
	var b strings.Builder
	b.WriteString("culprit top")
	if s := m.snap; s != nil {
		if t := s.GetTarget(); t.GetFound() {
			fmt.Fprintf(&b, "  target %s[%d]", t.Comm, t.Pid)
		} else if t != nil {
			fmt.Fprintf(&b, "  target not found (%s)", cmp.Or(t.GetReason(), t.GetSelector()))
		}
		var bad []string
		for _, c := range s.GetComponents() {
			if c.State != "running" && c.State != "disabled" {
				bad = append(bad, c.Name)
			}
		}
		if len(bad) > 0 {
			fmt.Fprintf(&b, "  degraded: %s", strings.Join(bad, ","))
		}
	}
	fmt.Fprintf(&b, "  agent %s", m.addr)
	if s := m.snap; s != nil && s.Version != "" {
		fmt.Fprintf(&b, " (%s)", s.Version)
	}
	clock := time.Now().Format("15:04:05")
	head := fit(b.String(), max(0, w-len(clock)-1))
	return topBold.Render(head) + " " + clock
}

// statusLine says whether what is on screen is live. When the agent does
// not answer it says so on an alarm-coloured bar, and since when: the
// findings and signals above are then as of the last answer.
func (m *topModel) statusLine(w int) string {
	switch {
	case m.pollErr != nil:
		what := "unreachable"
		if c := status.Code(m.pollErr); c != codes.Unavailable && c != codes.DeadlineExceeded {
			// Retrying will not help a refused token or certificate by
			// itself, but the agent's configuration may change under us.
			what = "refuses the view"
		}
		s := fmt.Sprintf("✗ agent %s %s (%s) for %s; retrying every %s", m.addr, what, shortErr(m.pollErr),
			humanAge(time.Since(m.failingSince)), m.interval)
		if !m.lastOK.IsZero() {
			s += "; data as of " + m.lastOK.Format("15:04:05")
		}
		return topAlarm.Render(fit(s, w))
	case !m.polled:
		return topDim.Render(fit("… connecting to "+m.addr, w))
	case m.watchErr != nil:
		return topAlarm.Render(fit(fmt.Sprintf("✗ findings stream from %s down (%s); retrying in %s", m.addr, shortErr(m.watchErr), m.watchRetry), w))
	case m.note != "" && time.Now().Before(m.noteUntil):
		return topWarning.Render(fit("! "+m.note, w))
	}
	return topGood.Render(fit(fmt.Sprintf("● connected to %s, updated %s ago", m.addr, humanSeconds(time.Since(m.lastOK).Round(100*time.Millisecond).Seconds())), w))
}

// shortErr is an RPC error as a person reads it: the dial error's last
// words ("connection refused") rather than gRPC's nested description.
func shortErr(err error) string {
	if errors.Is(err, io.EOF) {
		return "stream ended"
	}
	s, ok := status.FromError(err)
	if !ok {
		return err.Error()
	}
	msg := strings.Trim(s.Message(), `"`)
	switch s.Code() {
	case codes.Unavailable:
		if i := strings.LastIndex(msg, ": "); i >= 0 {
			msg = msg[i+2:]
		}
		return strings.Trim(msg, `"`)
	case codes.DeadlineExceeded:
		return "no answer within " + topSnapshotTimeout.String()
	}
	return s.Code().String() + ": " + msg
}

func (m *topModel) listView(w, h int) []string {
	footer := []string{m.statusLine(w)}
	help := "↑/↓ select  enter open  q quit"
	if h >= 12 {
		footer = append(footer, topDim.Render(fit(help, w)))
	}
	avail := h - 1 - len(footer)

	sig := m.signalLines(w)
	nf := 1 + max(1, len(m.order)) // the findings' title and rows
	// Findings first: they are the answer. The signals take what is left
	// after a blank line, but keep their title and three lines while the
	// findings scroll, so the target's state never vanishes entirely.
	sigRows := min(len(sig), avail-nf-1)
	if want := min(4, len(sig)); sigRows < want && avail-1-want >= 4 {
		sigRows = want
	}
	if sigRows < 2 {
		sigRows = 0 // a title alone says nothing
	}
	findRows := avail - 1
	if sigRows > 0 {
		findRows -= sigRows + 1
	}

	lines := []string{m.headerLine(w)}
	lines = append(lines, m.findingLines(w, findRows)...)
	if sigRows > 0 {
		lines = append(lines, "")
		lines = append(lines, sig[:sigRows]...)
		if sigRows < len(sig) {
			lines[len(lines)-1] = topDim.Render(fit(fmt.Sprintf("  … %d more signals: a taller window shows them", len(sig)-sigRows+1), w))
		}
	}
	for len(lines) < h-len(footer) {
		lines = append(lines, "")
	}
	return append(lines, footer...)
}

// findingLines is the title line and at most rows findings, scrolled so the
// selected one shows.
func (m *topModel) findingLines(w, rows int) []string {
	counts := map[culpritv1.Severity]int{}
	for _, f := range m.findings {
		counts[f.Severity]++
	}
	title := fmt.Sprintf("FINDINGS  %d open", len(m.order))
	var parts []string
	for _, s := range []culpritv1.Severity{culpritv1.Severity_SEVERITY_CRITICAL, culpritv1.Severity_SEVERITY_WARNING, culpritv1.Severity_SEVERITY_INFO} {
		if counts[s] > 0 {
			parts = append(parts, fmt.Sprintf("%d %s", counts[s], sevName(s)))
		}
	}
	if len(parts) > 0 {
		title += ": " + strings.Join(parts, ", ")
	}
	if m.evicted > 0 {
		title += fmt.Sprintf(" (%d least severe not kept: over %d open)", m.evicted, topMaxFindings)
	}
	first := 0
	if len(m.order) > rows {
		first = max(0, min(m.selectedIndex()-rows/2, len(m.order)-rows))
		title += fmt.Sprintf("  [%d-%d of %d]", first+1, first+rows, len(m.order))
	}
	out := []string{topBold.Render(fit(title, w))}
	if len(m.order) == 0 {
		msg := "  no open findings"
		if !m.polled {
			msg = "  waiting for the agent…"
		}
		return append(out, topDim.Render(fit(msg, w)))
	}
	ruleW := 0
	if w >= 70 {
		for _, id := range m.order {
			f := m.findings[id]
			ruleW = max(ruleW, lipgloss.Width(f.Rule+"/"+f.Cause))
		}
		ruleW = min(ruleW, max(16, w/3))
	}
	const sevW, ageW = 8, 6
	titleW := w - 2 - sevW - 1 - ageW - 1
	if ruleW > 0 {
		titleW -= ruleW + 2
	}
	now := time.Now()
	for _, id := range m.order[first:min(len(m.order), first+rows)] {
		f := m.findings[id]
		mark := "  "
		if id == m.selected {
			mark = "▸ "
		}
		sev := fit(sevName(f.Severity), sevW)
		rest := ""
		if ruleW > 0 {
			rest += fit(f.Rule+"/"+f.Cause, ruleW) + "  "
		}
		rest += fit(f.Title, titleW) + " " + fmt.Sprintf("%*s", ageW, humanAge(now.Sub(f.GetFirstSeen().AsTime())))
		if id == m.selected {
			out = append(out, topReverse.Render(mark+sev+" "+rest))
			continue
		}
		out = append(out, mark+sevStyle(f.Severity).Render(sev)+" "+rest)
	}
	return out
}

// signalLines is the signals section: a title and one line per signal,
// label, value now, sparkline, and a note.
func (m *topModel) signalLines(w int) []string {
	span := time.Duration(m.history) * m.interval
	spanText := span.Round(time.Second).String()
	if span < 2*time.Minute {
		spanText = strconv.Itoa(int(span.Round(time.Second)/time.Second)) + " s"
	}
	out := []string{topBold.Render(fit(fmt.Sprintf("SIGNALS  last %s, one value per %s", spanText, m.interval), w))}
	if !m.sig.have {
		return append(out, topDim.Render(fit("  waiting for the first snapshot…", w)))
	}
	type row struct {
		label, short, value, key, note string
		zeroBased, alarm               bool
		text                           string // a line of its own instead
	}
	// Listeners that queue or drop come first, then the process, then the
	// quiet listeners: when the window is short, what is cut matters least.
	var hot, quiet []row
	c := m.sig.cur
	for _, l := range c.listeners {
		note := ""
		if l.full {
			note = "FULL: new connections are dropped"
		}
		rs := []row{
			{label: l.addr + " queue", short: ":" + l.port + " queue", value: num(l.queue) + " / " + num(l.backlog), key: "queue " + l.addr, zeroBased: true, note: note, alarm: l.full},
			{label: l.addr + " drops", short: ":" + l.port + " drops", value: rateStr(l.drops), key: "drops " + l.addr, zeroBased: true, alarm: l.drops > 0},
		}
		if l.full || l.drops > 0 || l.queue > 0 {
			hot = append(hot, rs...)
		} else {
			quiet = append(quiet, rs...)
		}
	}
	if c.hiddenListeners > 0 {
		quiet = append(quiet, row{text: fmt.Sprintf("  (%d quieter listeners not shown)", c.hiddenListeners)})
	}
	if len(c.listeners) == 0 {
		quiet = append(quiet, row{text: "  no listener seen in the target's network namespace"})
	}
	fd := row{label: "fds open / limit", value: num(c.fds) + " / " + num(c.fdLimit), key: "fds"}
	if c.fdLimit > 0 && !math.IsNaN(c.fds) {
		fd.note = humanPercent(c.fds/c.fdLimit) + " of the soft limit"
		fd.alarm = c.fds/c.fdLimit >= 0.8
	}
	rss := row{label: "rss", value: "–", key: "rss"}
	if !math.IsNaN(c.rss) {
		rss.value = humanBytes(c.rss)
	}
	cpu := row{label: "cpu", value: "–", key: "cpu", zeroBased: true}
	if !math.IsNaN(c.cpu) {
		cpu.value = humanNum(math.Round(c.cpu*100)/100) + " cores"
		cpu.note = "all threads (" + c.cpuSource + ")"
	}
	runq := row{label: "run-queue p99", value: "–", key: "runq", zeroBased: true, alarm: c.runqP99 >= 0.01}
	if !math.IsNaN(c.runqP99) {
		runq.value = humanSeconds(c.runqP99)
	}
	if c.busyTid != "" && !math.IsNaN(c.busyCores) {
		runq.note = fmt.Sprintf("busiest %s/%s %s cores", c.busyName, c.busyTid, humanNum(math.Round(c.busyCores*100)/100))
		switch {
		case !math.IsNaN(c.busyMeanWait):
			runq.note += ", mean wait " + humanSeconds(c.busyMeanWait)
		case !math.IsNaN(c.busyWaitShare):
			runq.note += ", waits " + humanPercent(c.busyWaitShare) + " of the time"
		}
	}
	thr := row{label: "cpu throttled", value: "–", key: "throttled", zeroBased: true, note: "no CPU limit seen", alarm: c.throttled >= 0.1}
	if !math.IsNaN(c.throttled) {
		thr.value = humanPercent(c.throttled) + " periods"
	}
	if !math.IsNaN(c.quota) {
		thr.note = "quota " + humanNum(math.Round(c.quota*100)/100) + " cores"
	}
	rows := append(append(hot, fd, rss, cpu, runq, thr), quiet...)

	labelW, valueW := 0, 12
	for _, r := range rows {
		labelW = max(labelW, lipgloss.Width(r.label)+1)
		valueW = max(valueW, lipgloss.Width(r.value)+1)
	}
	labelW, valueW = min(labelW, max(14, w/3)), min(valueW, 16)
	room := w - 2 - labelW - valueW
	noteW := min(56, room*2/5)
	sparkW := min(m.history, room-noteW-2)
	if sparkW < 5 {
		sparkW = 0
	}
	noteW = max(0, room-sparkW-2)
	for _, r := range rows {
		if r.text != "" {
			out = append(out, topDim.Render(fit(r.text, w)))
			continue
		}
		label := r.label
		if lipgloss.Width(label) >= labelW && r.short != "" {
			label = r.short // the port says which listener when the address does not fit
		}
		v := fit(r.value, valueW)
		if r.alarm {
			v = topCritical.Render(v)
		}
		spark := strings.Repeat(" ", sparkW)
		if rg := m.sig.series[r.key]; rg != nil && sparkW > 0 {
			spark = sparkline(rg.last(sparkW), sparkW, r.zeroBased)
		}
		line := "  " + fit(label, labelW-1) + " " + v + spark
		if noteW > 0 && r.note != "" {
			line += "  " + topDim.Render(fit(r.note, noteW))
		}
		out = append(out, line)
	}
	return out
}

func num(v float64) string {
	if math.IsNaN(v) {
		return "–"
	}
	return humanNum(v)
}

func rateStr(v float64) string {
	if math.IsNaN(v) {
		return "–"
	}
	return humanNum(math.Round(v*10)/10) + "/s"
}

// ---- the whole text of one finding

// detailText is the finding as `culprit findings` prints it, so the words
// a person learnt there are the same here, wrapped to the window.
func detailText(f *culpritv1.Finding, w int, ended bool) []string {
	var buf bytes.Buffer
	// ENDED rather than RESOLVED: the CLI shortens a resolved finding to
	// one line, and here the person wants its last whole state.
	what := "OPEN"
	if ended {
		what = "ENDED"
	}
	(&findingPrinter{w: &buf}).text(what, f.GetLastSeen().AsTime(), f)
	var out []string
	for _, l := range strings.Split(strings.TrimRight(buf.String(), "\n"), "\n") {
		out = append(out, wrapLine(l, w)...)
	}
	return out
}

// wrapLine breaks a line at spaces to w cells. Continuation lines start
// under the value of a "label: value" line, so the label column stays
// clear, as in the CLI's stack frames. The spacing between words is kept.
func wrapLine(line string, w int) []string {
	if w <= 1 || lipgloss.Width(line) <= w {
		return []string{line}
	}
	body := strings.TrimLeft(line, " ")
	indent := min(len(line)-len(body), w/2)
	hang := indent + 2
	if i := strings.Index(body, ": "); i > 0 && i < 24 && !strings.Contains(body[:i], " ") {
		hang = indent + i + 1 + len(body[i+1:]) - len(strings.TrimLeft(body[i+1:], " "))
	}
	hang = min(hang, w/2)
	pad := strings.Repeat(" ", hang)

	var out []string
	cur, curW, empty := strings.Repeat(" ", indent), indent, true
	for body != "" {
		word := body
		if i := strings.IndexByte(body, ' '); i >= 0 {
			word = body[:i]
		}
		body = body[len(word):]
		sep := body[:len(body)-len(strings.TrimLeft(body, " "))]
		body = body[len(sep):]
		ww := lipgloss.Width(word)
		if !empty && curW+ww > w {
			out = append(out, strings.TrimRight(cur, " "))
			cur, curW, empty = pad, hang, true
		}
		for curW+ww > w {
			// A word longer than a whole line: cut it.
			head, tail := splitWidth(word, w-curW)
			out = append(out, cur+head)
			cur, curW = pad, hang
			word, ww = tail, lipgloss.Width(tail)
		}
		cur += word + sep
		curW += ww + len(sep)
		empty = false
	}
	return append(out, strings.TrimRight(cur, " "))
}

// splitWidth cuts s after at most n cells (at least one rune).
func splitWidth(s string, n int) (string, string) {
	used := 0
	for i, r := range s {
		rw := lipgloss.Width(string(r))
		if used+rw > n && i > 0 {
			return s[:i], s[i:]
		}
		used += rw
	}
	return s, ""
}

func (m *topModel) detailBodyHeight() int {
	_, h := m.size()
	return max(1, h-2-m.footerHeight(h))
}

func (m *topModel) footerHeight(h int) int {
	if h >= 12 {
		return 2
	}
	return 1
}

func (m *topModel) clampScroll() {
	if m.detail == nil {
		m.scroll = 0
		return
	}
	w, _ := m.size()
	n := len(detailText(m.detail, w, !m.detailGone.IsZero()))
	m.scroll = max(0, min(m.scroll, n-m.detailBodyHeight()))
}

func (m *topModel) detailView(w, h int) []string {
	f := m.detail
	body := detailText(f, w, !m.detailGone.IsZero())
	bodyH := m.detailBodyHeight()
	head := fmt.Sprintf("FINDING  %s  %s/%s  open for %s", sevName(f.Severity), f.Rule, f.Cause, humanAge(time.Since(f.GetFirstSeen().AsTime())))
	if !m.detailGone.IsZero() {
		head = fmt.Sprintf("FINDING  %s  %s/%s  resolved at %s; its last state:", sevName(f.Severity), f.Rule, f.Cause, m.detailGone.Local().Format("15:04:05"))
	}
	lines := []string{m.headerLine(w), sevStyle(f.Severity).Render(fit(head, w))}
	end := min(len(body), m.scroll+bodyH)
	lines = append(lines, body[min(m.scroll, end):end]...)
	for len(lines) < h-m.footerHeight(h) {
		lines = append(lines, "")
	}
	lines = append(lines, m.statusLine(w))
	if m.footerHeight(h) == 2 {
		pos := fmt.Sprintf("lines %d-%d of %d", min(m.scroll+1, end), end, len(body))
		if end < len(body) {
			pos += ", more below"
		}
		// The position first: it is what a narrow window must not cut.
		lines = append(lines, topDim.Render(fit(pos+"   ↑/↓ pgup/pgdn scroll  esc back  q quit", w)))
	}
	return lines
}
