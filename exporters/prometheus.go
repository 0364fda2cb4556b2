package exporters

import (
	"log/slog"
	"net/http"
	"sort"
	"strings"
	"sync"
	"unicode/utf8"

	"github.com/culprit-dev/culprit/rules"
	"github.com/culprit-dev/culprit/signals"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
)

// namespace prefixes every metric the agent exports, signals included, so
// they never collide with the Go and process collectors' go_* and process_*.
const namespace = "culprit"

// Reasons a store series is left out of the exposition; each is exported as
// culprit_metrics_skipped_series{reason} so a broken Desc is visible.
const (
	skipInvalidName = "invalid_name"   // not lower snake_case, or a gauge ending in _total/_count/_sum/_bucket
	skipNameClash   = "name_clash"     // maps onto a name already exported
	skipKind        = "kind_conflict"  // same name declared as gauge and counter
	skipLabels      = "invalid_labels" // label name not snake_case, duplicated, or value not UTF-8
	skipDuplicate   = "duplicate"      // same name and labels as an earlier series after renaming
)

var skipReasons = []string{skipInvalidName, skipNameClash, skipKind, skipLabels, skipDuplicate}

// Bounds on what the collector remembers between scrapes.
const (
	maxWarned      = 256  // store names already logged as skipped
	maxActivePairs = 1024 // (rule, severity) pairs kept at 0 after their findings resolve
	eventBatch     = 1024 // journal events copied per read while counting
)

// PromOptions configures NewPrometheus.
type PromOptions struct {
	Store   *signals.Store
	Journal *rules.Journal
	Log     *slog.Logger
	// Listeners are the agent's capped listeners, exported as
	// culprit_listener_connections{listener} and friends.
	Listeners []*ConnLimiter
	// MaxScrapes is the scrapes rendered at once (default 4); more are
	// answered 503 at once, so a flood of scrapes costs no memory.
	MaxScrapes int
	// Resource labels target_info: the watched service and its pod, as
	// the OTLP log records of findings carry them, so series and records
	// join on the same service.name and k8s.* (nil: no target_info).
	Resource *Resource
	// Engine's counters become culprit_rules_evaluations_total,
	// culprit_findings_dropped_total and the culprit_engine_* metrics:
	// findings opened and open, time spent evaluating (nil: left out).
	Engine interface{ Stats() rules.EngineStats }
}

// maxInfoText bounds the title and remediation finding_info carries as
// labels, in bytes.
const maxInfoText = 1024

// Prometheus is a prometheus.Collector that reads the store and the journal
// at scrape time. It is unchecked (Describe sends nothing) because the set
// of signal names is only known when collectors have written them.
type Prometheus struct {
	store   *signals.Store
	journal *rules.Journal
	log     *slog.Logger

	findingsActive *prometheus.Desc
	eventsTotal    *prometheus.Desc
	series         *prometheus.Desc
	seriesMax      *prometheus.Desc
	dropped        *prometheus.Desc
	componentUp    *prometheus.Desc
	watchers       *prometheus.Desc
	skipped        *prometheus.Desc
	connsOpen      *prometheus.Desc
	connsMax       *prometheus.Desc
	connsClosed    *prometheus.Desc
	findingInfo    *prometheus.Desc
	evaluations    *prometheus.Desc
	findingsLost   *prometheus.Desc
	engineOpened   *prometheus.Desc
	engineOpen     *prometheus.Desc
	engineEvalTime *prometheus.Desc
	engineLastEval *prometheus.Desc
	engine         interface{ Stats() rules.EngineStats }
	listeners      []*ConnLimiter
	maxScrapes     int
	resource       *Resource
	findingName    string
	findingHelp    string
	own            []string // fqNames of the metrics above

	mu          sync.Mutex // guards the fields below; scrapes may overlap
	eventCursor uint64
	eventCounts map[string]float64 // by type
	activePairs map[[2]string]bool // (rule, severity) ever open
	warned      map[string]bool
	// infoText is each open finding's title and remediation as first
	// scraped: they carry live numbers, and as labels every change would
	// start a new series. Bounded by the open findings (ids that closed
	// are forgotten at the next scrape).
	infoText map[string][2]string
}

var _ prometheus.Collector = (*Prometheus)(nil)

// NewPrometheus returns the collector. A nil store or journal exports
// nothing for that part rather than failing the scrape.
func NewPrometheus(o PromOptions) *Prometheus {
	log := o.Log
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	var own []string
	fq := func(name string) string {
		n := prometheus.BuildFQName(namespace, "", name)
		own = append(own, n)
		return n
	}
	p := &Prometheus{
		store:   o.Store,
		journal: o.Journal,
		log:     log,
		findingsActive: prometheus.NewDesc(fq("findings_active"),
			"Open findings by rule and severity.", []string{"rule", "severity"}, nil),
		eventsTotal: prometheus.NewDesc(fq("findings_events_total"),
			"Finding events by type since the agent started; type unknown counts events that left the journal before a scrape saw them.",
			[]string{"type"}, nil),
		series: prometheus.NewDesc(fq("signals_series"),
			"Series held in the signal store.", nil, nil),
		seriesMax: prometheus.NewDesc(fq("signals_series_max"),
			"Series the signal store may hold; samples of further series are dropped.", nil, nil),
		dropped: prometheus.NewDesc(fq("signals_dropped_samples_total"),
			"Samples the signal store refused because it held its maximum number of series.", nil, nil),
		componentUp: prometheus.NewDesc(fq("component_up"),
			"1 if the collector or probe is running, 0 if degraded, failed or disabled.", []string{"component", "kind", "state"}, nil),
		watchers: prometheus.NewDesc(fq("watchers"),
			"Clients following the finding journal (WatchFindings streams).", nil, nil),
		skipped: prometheus.NewDesc(fq("metrics_skipped_series"),
			"Signal series left out of this scrape, by reason; nonzero means a collector declared a signal Prometheus cannot take as is.",
			[]string{"reason"}, nil),
		connsOpen: prometheus.NewDesc(fq("listener_connections"),
			"Connections open on the agent's listener (by its config key).", []string{"listener"}, nil),
		connsMax: prometheus.NewDesc(fq("listener_connections_max"),
			"Connections the listener keeps open at most; beyond, the longest idle is closed or the new one refused.", []string{"listener"}, nil),
		connsClosed: prometheus.NewDesc(fq("listener_connections_closed_total"),
			"Connections the listener closed at its cap: evicted (idle, to make room) or refused (all busy).", []string{"listener", "reason"}, nil),
		findingInfo: prometheus.NewDesc(fq("finding_info"),
			"1 for each open finding, with its title and remediation as first exported (cut to 1 KiB), so that alerts can quote the fix.",
			[]string{"id", "rule", "key", "title", "remediation"}, nil),
		evaluations: prometheus.NewDesc(fq("rules_evaluations_total"),
			"Rule engine cycles run (every rule evaluated once per cycle).", nil, nil),
		findingsLost: prometheus.NewDesc(fq("findings_dropped_total"),
			"Findings not opened because rules.max_open_findings were open already.", nil, nil),
		engineOpened: prometheus.NewDesc(fq("engine_findings_opened_total"),
			"Findings the rule engine opened since the agent started.", nil, nil),
		engineOpen: prometheus.NewDesc(fq("engine_findings_open"),
			"Findings open now (at most rules.max_open_findings).", nil, nil),
		engineEvalTime: prometheus.NewDesc(fq("engine_evaluation_seconds_total"),
			"Time the rule engine spent evaluating rules; divided by culprit_rules_evaluations_total, the mean cost of a cycle.", nil, nil),
		engineLastEval: prometheus.NewDesc(fq("engine_last_evaluation_seconds"),
			"How long the rule engine's last cycle took.", nil, nil),
		engine:      o.Engine,
		listeners:   o.Listeners,
		maxScrapes:  o.MaxScrapes,
		resource:    o.Resource,
		findingName: fq("finding_active"),
		findingHelp: "1 for each open finding, labelled with its id, rule, severity, root cause, key and the rule's own labels.",
		eventCounts: make(map[string]float64),
		activePairs: make(map[[2]string]bool),
		warned:      make(map[string]bool),
		infoText:    make(map[string][2]string),
	}
	p.own = own
	return p
}

// Describe sends nothing, which makes the collector unchecked: the names
// and label sets of store signals change at run time.
func (p *Prometheus) Describe(chan<- *prometheus.Desc) {}

// Collect renders the store, the findings and the agent's bounds.
func (p *Prometheus) Collect(ch chan<- prometheus.Metric) {
	p.collectTargetInfo(ch)
	p.collectFindings(ch)
	p.collectStore(ch)
	if p.journal != nil {
		p.emit(ch, p.watchers, prometheus.GaugeValue, float64(p.journal.Watchers()))
	}
	for _, l := range p.listeners {
		st := l.Stats()
		p.emit(ch, p.connsOpen, prometheus.GaugeValue, float64(st.Open), st.Name)
		p.emit(ch, p.connsMax, prometheus.GaugeValue, float64(st.Max), st.Name)
		p.emit(ch, p.connsClosed, prometheus.CounterValue, float64(st.Evicted), st.Name, "evicted")
		p.emit(ch, p.connsClosed, prometheus.CounterValue, float64(st.Refused), st.Name, "refused")
	}
}

// targetInfoName and its help follow OpenTelemetry's Prometheus
// compatibility: resource attributes become the labels of one target_info
// series, dots turned into underscores. It is unprefixed: dashboards and
// the OTel Collector's Prometheus receiver look for this very name.
const (
	targetInfoName = "target_info"
	targetInfoHelp = "Target metadata: the OpenTelemetry resource of the service culprit watches (service.name, service.instance.id, k8s.*), as on the findings it exports as OTLP log records."
)

// collectTargetInfo renders the resource as it is now: service.name follows
// the target until OTEL_SERVICE_NAME fixes it.
func (p *Prometheus) collectTargetInfo(ch chan<- prometheus.Metric) {
	if p.resource == nil {
		return
	}
	var names, values []string
	for _, kv := range p.resource.Attributes() {
		name := promLabelName(string(kv.Key))
		if !validLabelName(name) || contains(names, name) {
			continue
		}
		names = append(names, name)
		values = append(values, utf8OK(kv.Value.String()))
	}
	m, err := prometheus.NewConstMetric(prometheus.NewDesc(targetInfoName, targetInfoHelp, names, nil), prometheus.GaugeValue, 1, values...)
	if err != nil {
		p.log.Debug("target_info left out of /metrics", "err", err)
		return
	}
	ch <- m
}

// promLabelName turns an attribute key into a label name: every character
// Prometheus does not take becomes an underscore (k8s.pod.name ->
// k8s_pod_name).
func promLabelName(key string) string {
	b := []byte(key)
	for i, c := range b {
		if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '_') {
			b[i] = '_'
		}
	}
	return string(b)
}

func (p *Prometheus) collectFindings(ch chan<- prometheus.Metric) {
	if p.journal == nil {
		return
	}
	open, _ := p.journal.Open()
	active := make(map[[2]string]int)
	for _, f := range open {
		pair := [2]string{f.Rule, f.Severity.String()}
		active[pair]++
		names := []string{"id", "rule", "severity", "cause", "key"}
		values := []string{f.ID, f.Rule, f.Severity.String(), f.Cause, f.Key}
		extra := make([]string, 0, len(f.Labels))
		for k := range f.Labels {
			if validLabelName(k) && !contains(names, k) {
				extra = append(extra, k)
			}
		}
		sort.Strings(extra)
		for _, k := range extra {
			names = append(names, k)
			values = append(values, f.Labels[k])
		}
		for i := range values {
			values[i] = strings.ToValidUTF8(values[i], "\uFFFD")
		}
		m, err := prometheus.NewConstMetric(prometheus.NewDesc(p.findingName, p.findingHelp, names, nil), prometheus.GaugeValue, 1, values...)
		if err != nil {
			p.log.Debug("finding left out of /metrics", "id", f.ID, "err", err)
			continue
		}
		ch <- m
	}
	p.collectFindingInfo(ch, open)
	if p.engine != nil {
		st := p.engine.Stats()
		p.emit(ch, p.evaluations, prometheus.CounterValue, float64(st.Evaluations))
		p.emit(ch, p.findingsLost, prometheus.CounterValue, float64(st.Dropped))
		p.emit(ch, p.engineOpened, prometheus.CounterValue, float64(st.Opened))
		p.emit(ch, p.engineOpen, prometheus.GaugeValue, float64(st.Open))
		p.emit(ch, p.engineEvalTime, prometheus.CounterValue, st.EvalTime.Seconds())
		p.emit(ch, p.engineLastEval, prometheus.GaugeValue, st.LastEval.Seconds())
	}

	p.mu.Lock()
	for pair := range active {
		if len(p.activePairs) < maxActivePairs {
			p.activePairs[pair] = true
		}
	}
	// Keep resolved pairs at 0 so `culprit_findings_active > 0` alerts
	// resolve on a value rather than on a vanished series.
	pairs := make(map[[2]string]int, len(p.activePairs)+len(active))
	for pair := range p.activePairs {
		pairs[pair] = 0
	}
	p.mu.Unlock()
	for pair, n := range active {
		pairs[pair] = n
	}
	for pair, n := range pairs {
		p.emit(ch, p.findingsActive, prometheus.GaugeValue, float64(n),
			strings.ToValidUTF8(pair[0], "\uFFFD"), pair[1])
	}

	for typ, n := range p.countEvents() {
		p.emit(ch, p.eventsTotal, prometheus.CounterValue, n, typ)
	}
}

// countEvents reads the journal from where the last scrape stopped. Events
// that already left the ring are counted as "unknown", so the sum over
// types always equals the journal's sequence.
func (p *Prometheus) countEvents() map[string]float64 {
	p.mu.Lock()
	defer p.mu.Unlock()
	for {
		evs, gap := p.journal.After(p.eventCursor, eventBatch)
		if len(evs) == 0 {
			break
		}
		if gap {
			p.eventCounts["unknown"] += float64(evs[0].Sequence - p.eventCursor - 1)
		}
		for _, ev := range evs {
			p.eventCounts[ev.Type.String()]++
		}
		p.eventCursor = evs[len(evs)-1].Sequence
	}
	out := map[string]float64{"opened": 0, "updated": 0, "resolved": 0, "unknown": 0}
	for typ, n := range p.eventCounts {
		out[typ] = n
	}
	return out
}

// family is what one store name became in this scrape.
type family struct {
	fqName string
	kind   signals.Kind
	help   string
	skip   string // reason, or "" when exported
}

func (p *Prometheus) collectStore(ch chan<- prometheus.Metric) {
	if p.store == nil {
		return
	}
	st := p.store.Stats()
	p.emit(ch, p.series, prometheus.GaugeValue, float64(st.Series))
	p.emit(ch, p.seriesMax, prometheus.GaugeValue, float64(st.MaxSeries))
	p.emit(ch, p.dropped, prometheus.CounterValue, float64(st.Dropped))
	for _, s := range p.store.Statuses() {
		up := 0.0
		if s.State == signals.StateRunning {
			up = 1
		}
		p.emit(ch, p.componentUp, prometheus.GaugeValue, up,
			utf8OK(s.Component), utf8OK(s.Kind), utf8OK(s.State))
	}

	skipped := make(map[string]int, len(skipReasons))
	// A store signal mapping onto one of the agent's own names is skipped
	// so that it cannot corrupt the agent's series.
	taken := make(map[string]bool, len(p.own)) // exported fqNames
	for _, n := range p.own {
		taken[n] = true
	}
	families := make(map[string]*family)
	descs := make(map[string]*prometheus.Desc) // fqName + label names
	emitted := make(map[string]bool)           // fqName + labels, against duplicates
	for _, c := range p.store.Snapshot() {
		if c.Desc == nil {
			skipped[skipInvalidName]++
			continue
		}
		fam, ok := families[c.Desc.Name]
		if !ok {
			fam = p.newFamily(c.Desc, taken)
			families[c.Desc.Name] = fam
		}
		reason := fam.skip
		if reason == "" && c.Desc.Kind != fam.kind {
			reason = skipKind
		}
		names := make([]string, len(c.Labels))
		values := make([]string, len(c.Labels))
		for i, l := range c.Labels {
			if reason == "" && (!validLabelName(l.Name) || (i > 0 && l.Name == c.Labels[i-1].Name)) {
				reason = skipLabels
			}
			names[i], values[i] = l.Name, utf8OK(l.Value)
		}
		if reason == "" {
			id := fam.fqName + signals.Labels(relabel(names, values)).String()
			if emitted[id] {
				reason = skipDuplicate
			}
			emitted[id] = true
		}
		if reason != "" {
			skipped[reason]++
			p.warnOnce(c.Desc.Name, reason, c.Labels)
			continue
		}
		dk := fam.fqName + "\xff" + strings.Join(names, "\xff")
		d, ok := descs[dk]
		if !ok {
			d = prometheus.NewDesc(fam.fqName, fam.help, names, nil)
			descs[dk] = d
		}
		vt := prometheus.GaugeValue
		if fam.kind == signals.Counter {
			vt = prometheus.CounterValue
		}
		m, err := prometheus.NewConstMetric(d, vt, c.Sample.V, values...)
		if err != nil {
			skipped[skipLabels]++
			p.warnOnce(c.Desc.Name, err.Error(), c.Labels)
			continue
		}
		ch <- m
	}
	for _, r := range skipReasons {
		p.emit(ch, p.skipped, prometheus.GaugeValue, float64(skipped[r]), r)
	}
}

// newFamily decides the exported name of a store signal. Counters get the
// _total suffix promtool wants; a gauge already named like a counter or a
// histogram part cannot be renamed without guessing, so it is skipped.
func (p *Prometheus) newFamily(d *signals.Desc, taken map[string]bool) *family {
	fam := &family{kind: d.Kind, help: d.Help}
	if fam.help == "" {
		fam.help = "Signal " + d.Name + " measured by the culprit agent."
	}
	if !validMetricName(d.Name) {
		fam.skip = skipInvalidName
		return fam
	}
	fam.fqName = prometheus.BuildFQName(namespace, "", d.Name)
	if d.Kind == signals.Counter {
		if !strings.HasSuffix(fam.fqName, "_total") {
			fam.fqName += "_total"
		}
	} else {
		for _, suf := range []string{"_total", "_count", "_sum", "_bucket"} {
			if strings.HasSuffix(d.Name, suf) {
				fam.skip = skipInvalidName
				return fam
			}
		}
	}
	if taken[fam.fqName] {
		fam.skip = skipNameClash
		return fam
	}
	taken[fam.fqName] = true
	return fam
}

func (p *Prometheus) warnOnce(name, reason string, ls signals.Labels) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.warned[name] || len(p.warned) >= maxWarned {
		return
	}
	p.warned[name] = true
	p.log.Warn("signal left out of /metrics; fix its Desc or labels", "signal", name, "labels", ls.String(), "reason", reason)
}

// emit sends one of the agent's own metrics; an error is a bug in this
// file, logged rather than panicking the scrape.
func (p *Prometheus) emit(ch chan<- prometheus.Metric, d *prometheus.Desc, vt prometheus.ValueType, v float64, labels ...string) {
	m, err := prometheus.NewConstMetric(d, vt, v, labels...)
	if err != nil {
		p.log.Error("build metric", "desc", d.String(), "err", err)
		return
	}
	ch <- m
}

func relabel(names, values []string) signals.Labels {
	ls := make(signals.Labels, len(names))
	for i := range names {
		ls[i] = signals.Label{Name: names[i], Value: values[i]}
	}
	return ls
}

// validMetricName accepts lower snake_case only: promtool rejects camelCase
// and colons are reserved for recording rules.
func validMetricName(s string) bool {
	if s == "" || (s[0] >= '0' && s[0] <= '9') {
		return false
	}
	for i := 0; i < len(s); i++ {
		c := s[i]
		if !(c >= 'a' && c <= 'z' || c >= '0' && c <= '9' || c == '_') {
			return false
		}
	}
	return true
}

// validLabelName is validMetricName without the names Prometheus reserves.
func validLabelName(s string) bool {
	return validMetricName(s) && !strings.HasPrefix(s, "__")
}

func utf8OK(s string) string {
	if utf8.ValidString(s) {
		return s
	}
	return strings.ToValidUTF8(s, "\uFFFD")
}

func contains(list []string, s string) bool {
	for _, x := range list {
		if x == s {
			return true
		}
	}
	return false
}

// NewRegistry returns a registry with p and the agent's own process (CPU,
// memory, file descriptors) and Go runtime metrics. Registration errors
// are logged, not fatal: /metrics without one collector beats no agent.
func NewRegistry(p *Prometheus) *prometheus.Registry {
	reg := prometheus.NewRegistry()
	log := slog.New(slog.DiscardHandler)
	if p != nil {
		log = p.log
	}
	cs := []prometheus.Collector{
		collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}),
		collectors.NewGoCollector(),
	}
	if p != nil {
		cs = append(cs, p)
	}
	for _, c := range cs {
		if err := reg.Register(c); err != nil {
			log.Error("register metrics collector", "err", err)
		}
	}
	return reg
}

// Handler serves reg in the exposition format. A metric that fails to
// gather is logged and left out instead of failing the whole scrape.
func (p *Prometheus) Handler(reg *prometheus.Registry) http.Handler {
	log := slog.New(slog.DiscardHandler)
	scrapes := 4
	if p != nil {
		log = p.log
		if p.maxScrapes > 0 {
			scrapes = p.maxScrapes
		}
	}
	return promhttp.HandlerFor(reg, promhttp.HandlerOpts{
		ErrorLog:            slog.NewLogLogger(log.Handler(), slog.LevelError),
		ErrorHandling:       promhttp.ContinueOnError,
		MaxRequestsInFlight: scrapes,
	})
}

// collectFindingInfo renders culprit_finding_info for the open findings,
// with the text each had when first scraped.
func (p *Prometheus) collectFindingInfo(ch chan<- prometheus.Metric, open []rules.Finding) {
	p.mu.Lock()
	texts := make([][2]string, len(open))
	seen := make(map[string]bool, len(open))
	for i, f := range open {
		txt, ok := p.infoText[f.ID]
		if !ok {
			txt = [2]string{clip(utf8OK(f.Title), maxInfoText), clip(utf8OK(f.Remediation), maxInfoText)}
			p.infoText[f.ID] = txt
		}
		texts[i] = txt
		seen[f.ID] = true
	}
	for id := range p.infoText {
		if !seen[id] {
			delete(p.infoText, id)
		}
	}
	p.mu.Unlock()
	for i, f := range open {
		p.emit(ch, p.findingInfo, prometheus.GaugeValue, 1, utf8OK(f.ID), utf8OK(f.Rule), utf8OK(f.Key), texts[i][0], texts[i][1])
	}
}

// clip cuts s to at most n bytes at a rune boundary, marking the cut.
func clip(s string, n int) string {
	if len(s) <= n {
		return s
	}
	const mark = "…"
	cut := n - len(mark)
	for cut > 0 && !utf8.RuneStart(s[cut]) {
		cut--
	}
	return s[:cut] + mark
}
