package main

import (
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
	"text/tabwriter"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/types/known/durationpb"

	"github.com/culprit-dev/culprit/exporters"
	culpritv1 "github.com/culprit-dev/culprit/proto/culprit/v1"
)

// conn is how a CLI command reaches the agent: its address and, for a
// protected agent, TLS files and a token.
type conn struct {
	addr               *string
	ca, cert, key, sni *string
	tokenFile          *string
}

func connFlags(fs *flag.FlagSet) conn {
	return conn{
		addr:      fs.String("addr", "127.0.0.1:9462", "agent gRPC address"),
		ca:        fs.String("tls-ca", "", "verify the agent's TLS certificate with this PEM CA (turns TLS on)"),
		cert:      fs.String("tls-cert", "", "client certificate for mTLS (PEM)"),
		key:       fs.String("tls-key", "", "client key for mTLS (PEM)"),
		sni:       fs.String("tls-server-name", "", "name expected in the agent's certificate (default: the host of --addr)"),
		tokenFile: fs.String("token-file", "", "file holding the agent's bearer token (or set CULPRIT_TOKEN)"),
	}
}

func (c conn) dial() (*grpc.ClientConn, culpritv1.DiagnosticsClient, error) {
	token := os.Getenv("CULPRIT_TOKEN")
	if *c.tokenFile != "" {
		b, err := os.ReadFile(*c.tokenFile)
		if err != nil {
			return nil, nil, fmt.Errorf("--token-file: %w", err)
		}
		token = strings.TrimSpace(string(b))
	}
	opts, err := exporters.ClientSecurity{CAFile: *c.ca, CertFile: *c.cert, KeyFile: *c.key, ServerName: *c.sni, Token: token}.DialOptions()
	if err != nil {
		return nil, nil, err
	}
	cc, err := grpc.NewClient(*c.addr, opts...)
	if err != nil {
		return nil, nil, fmt.Errorf("connect to agent at %s: %w", *c.addr, err)
	}
	return cc, culpritv1.NewDiagnosticsClient(cc), nil
}

func parseSeverity(s string) (culpritv1.Severity, error) {
	switch strings.ToLower(s) {
	case "", "info":
		return culpritv1.Severity_SEVERITY_INFO, nil
	case "warning", "warn":
		return culpritv1.Severity_SEVERITY_WARNING, nil
	case "critical":
		return culpritv1.Severity_SEVERITY_CRITICAL, nil
	}
	return 0, fmt.Errorf("--severity %q: want info, warning or critical", s)
}

func cmdFindings(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("culprit findings", flag.ContinueOnError)
	fs.SetOutput(stderr)
	cn := connFlags(fs)
	addr := cn.addr
	follow := fs.Bool("follow", false, "stream findings as they open, change and resolve")
	asJSON := fs.Bool("json", false, "one JSON object per line")
	table := fs.Bool("table", false, "one line per finding, in columns (without --follow)")
	all := fs.Bool("all", false, "include recently resolved findings (without --follow)")
	since := fs.Uint64("since", 0, "with --follow: resume after this sequence number")
	instance := fs.String("instance", "", "with --since: the agent run that issued it (instance_id of its events); a different run answers with a GAP")
	sev := fs.String("severity", "info", "least severity shown: info, warning, critical")
	var ruleNames stringList
	fs.Var(&ruleNames, "rule", "only this rule (repeatable)")
	if err := fs.Parse(args); err != nil {
		return err
	}
	switch {
	case *asJSON && *table:
		return errors.New("findings: --json and --table are two output formats: choose one")
	case *table && (*follow || *all && *follow):
		return errors.New("findings: --table lists the open findings once; it does not go with --follow")
	case fs.NArg() > 0:
		return fmt.Errorf("findings: unexpected argument %q (flags go before it? see culprit findings -h)", fs.Arg(0))
	}
	minSev, err := parseSeverity(*sev)
	if err != nil {
		return err
	}
	conn, c, err := cn.dial()
	if err != nil {
		return err
	}
	defer conn.Close()
	out := &findingPrinter{w: stdout, json: *asJSON}
	if !*follow {
		resp, err := c.ListFindings(ctx, &culpritv1.ListRequest{IncludeResolved: *all, MinSeverity: minSev, Rules: ruleNames})
		if err != nil {
			return fmt.Errorf("list findings from %s: %w", *addr, err)
		}
		if len(resp.Findings) == 0 && !*asJSON {
			fmt.Fprintf(stdout, "no findings (as of sequence %d)\n", resp.Sequence)
			return nil
		}
		if *table && !*asJSON {
			printTable(stdout, resp.Findings, time.Now())
			return nil
		}
		for _, f := range resp.Findings {
			out.finding(f)
		}
		return nil
	}
	return followFindings(ctx, c, &culpritv1.WatchRequest{SinceSequence: *since, InstanceId: *instance, MinSeverity: minSev, Rules: ruleNames}, out, stderr)
}

// followFindings streams and, when the agent goes away, reconnects with the
// last sequence seen and the run that issued it, so nothing is lost or
// repeated: a restarted agent numbers its events from 1 again, and only
// the instance id tells its sequence 5 from the old run's.
func followFindings(ctx context.Context, c culpritv1.DiagnosticsClient, req *culpritv1.WatchRequest, out *findingPrinter, stderr io.Writer) error {
	backoff := 200 * time.Millisecond
	for {
		stream, err := c.WatchFindings(ctx, req)
		if err == nil {
			for {
				ev, rerr := stream.Recv()
				if rerr != nil {
					err = rerr
					break
				}
				backoff = 200 * time.Millisecond
				out.event(ev)
				if id := ev.GetInstanceId(); id != "" && id != req.InstanceId {
					// A new run: its sequences start over, so the old
					// cursor means nothing there.
					req.InstanceId, req.SinceSequence = id, 0
				}
				if ev.Type == culpritv1.FindingEvent_TYPE_GAP && ev.GetDetail() != "" {
					fmt.Fprintf(stderr, "culprit: events missed: %s\n", ev.GetDetail())
				}
				if ev.Sequence > req.SinceSequence && ev.Type != culpritv1.FindingEvent_TYPE_GAP {
					req.SinceSequence = ev.Sequence
				}
			}
		}
		if ctx.Err() != nil || errors.Is(err, context.Canceled) {
			return nil
		}
		if s, ok := status.FromError(err); ok && s.Code() != codes.Unavailable && s.Code() != codes.Canceled && err != io.EOF {
			return fmt.Errorf("watch findings: %w", err)
		}
		fmt.Fprintf(stderr, "culprit: agent unavailable (%v); retrying from sequence %d of run %s\n", err, req.SinceSequence, cmp.Or(req.InstanceId, "unknown"))
		select {
		case <-ctx.Done():
			return nil
		case <-time.After(backoff):
		}
		backoff = min(backoff*2, 5*time.Second)
	}
}

type findingPrinter struct {
	w     io.Writer
	json  bool
	shown map[string]string // finding id -> cause and severity last printed in full
}

var marshal = protojson.MarshalOptions{UseProtoNames: true}

func (p *findingPrinter) event(ev *culpritv1.FindingEvent) {
	if p.json {
		b, _ := marshal.Marshal(ev)
		fmt.Fprintln(p.w, string(b))
		return
	}
	typ := strings.TrimPrefix(ev.Type.String(), "TYPE_")
	if ev.Type == culpritv1.FindingEvent_TYPE_UPDATED && p.shown[ev.Finding.GetId()] == ev.Finding.GetCause()+ev.Finding.GetSeverity().String() {
		// Only the numbers moved: one line, so a long incident stays readable.
		fmt.Fprintf(p.w, "%s  %-8s %-8s %-16s %s  [#%d]\n", ev.Time.AsTime().Local().Format("15:04:05.000"), typ,
			strings.ToLower(strings.TrimPrefix(ev.Finding.Severity.String(), "SEVERITY_")), ev.Finding.Rule, ev.Finding.Symptom, ev.Sequence)
		return
	}
	if ev.Finding != nil {
		if p.shown == nil {
			p.shown = map[string]string{}
		}
		p.shown[ev.Finding.Id] = ev.Finding.Cause + ev.Finding.Severity.String()
		if ev.Type == culpritv1.FindingEvent_TYPE_RESOLVED {
			delete(p.shown, ev.Finding.Id)
		}
	}
	if ev.Type == culpritv1.FindingEvent_TYPE_GAP {
		fmt.Fprintf(p.w, "%s  GAP      some events were dropped before this client read them; open findings follow\n", ev.Time.AsTime().Local().Format("15:04:05.000"))
		return
	}
	p.text(typ, ev.Time.AsTime(), ev.Finding)
}

func (p *findingPrinter) finding(f *culpritv1.Finding) {
	if p.json {
		b, _ := marshal.Marshal(f)
		fmt.Fprintln(p.w, string(b))
		return
	}
	p.text(strings.TrimPrefix(f.State.String(), "FINDING_STATE_"), f.LastSeen.AsTime(), f)
}

// text is the human form, meant to be scanned like `hubble observe`: one
// headline, then the cause, the evidence and the fix indented under it.
func (p *findingPrinter) text(what string, t time.Time, f *culpritv1.Finding) {
	sev := strings.ToLower(strings.TrimPrefix(f.Severity.String(), "SEVERITY_"))
	fmt.Fprintf(p.w, "%s  %-8s %-8s %-16s %s  [#%d]\n", t.Local().Format("15:04:05.000"), what, sev, f.Rule, f.Title, f.Sequence)
	if what == "RESOLVED" {
		fmt.Fprintf(p.w, "    resolved after %s\n", f.Resolved.AsTime().Sub(f.FirstSeen.AsTime()).Round(100*time.Millisecond))
		return
	}
	fmt.Fprintf(p.w, "    symptom: %s\n", f.Symptom)
	fmt.Fprintf(p.w, "    cause:   %s (%s, confidence %.0f%%)\n", f.RootCause, f.Cause, 100*f.Confidence)
	for _, e := range f.Evidence {
		fmt.Fprintf(p.w, "    evidence: %s = %s", e.Signal, evidenceValue(e.Value, e.Unit, e.Threshold))
		if w := e.Window.AsDuration(); e.Window != nil && w > 0 {
			fmt.Fprintf(p.w, " over %s", humanSeconds(w.Seconds()))
		}
		if e.Threshold != 0 {
			fmt.Fprintf(p.w, " (threshold %s)", evidenceValue(e.Threshold, e.Unit, e.Value))
		}
		if e.Note != "" {
			fmt.Fprintf(p.w, "  — %s", e.Note)
		}
		fmt.Fprintln(p.w)
	}
	for _, a := range f.Artifacts {
		if strings.Contains(a.Value, "\n") {
			// A stack: one frame per line, under its heading.
			fmt.Fprintf(p.w, "    %s:  %s\n", a.Kind, a.Detail)
			for _, l := range strings.Split(a.Value, "\n") {
				fmt.Fprintf(p.w, "             %s\n", l)
			}
			continue
		}
		fmt.Fprintf(p.w, "    %s: %s  %s\n", a.Kind, a.Value, a.Detail)
	}
	fmt.Fprintf(p.w, "    fix:     %s\n", f.Remediation)
}

// evidenceValue is an evidence value in human units, by its unit: bytes
// as KiB/MiB/GiB, seconds as a duration, ratios as a percentage (or, for
// ratios beyond 1 such as "p99 now / p99 before", a multiple), counts as
// numbers without float noise and with the noun agreeing ("1 fd"). other
// is the value it is compared with (threshold or value), so a share and
// its threshold read the same way. --json keeps the exact value.
func evidenceValue(v float64, unit string, other float64) string {
	switch {
	case unit == "bytes":
		return humanBytes(v)
	case strings.HasPrefix(unit, "bytes/"):
		return humanBytes(v) + strings.TrimPrefix(unit, "bytes")
	case unit == "seconds":
		return humanSeconds(v)
	case strings.HasPrefix(unit, "seconds "):
		return humanSeconds(v) + strings.TrimPrefix(unit, "seconds")
	case unit == "ratio" && math.Abs(v) <= 1 && math.Abs(other) <= 1:
		return humanPercent(v)
	case unit == "ratio":
		return humanNum(v) + "×"
	case unit == "":
		return humanNum(v)
	case strings.HasPrefix(unit, "/"):
		return humanNum(v) + unit
	case strings.Contains(unit, "/"):
		return humanNum(v) + " " + unit
	case v == 1:
		return "1 " + singular(unit)
	}
	return humanNum(v) + " " + unit
}

// singular is the singular of a plural unit: fds -> fd, addresses ->
// address, cores -> core.
func singular(unit string) string {
	switch {
	case strings.HasSuffix(unit, "sses"), strings.HasSuffix(unit, "shes"), strings.HasSuffix(unit, "ches"):
		return strings.TrimSuffix(unit, "es")
	case strings.HasSuffix(unit, "ss"):
		return unit
	}
	return strings.TrimSuffix(unit, "s")
}

// humanNum is a number for people: integers as integers, small numbers
// with two or three significant digits, others with at most one decimal,
// from 1000 on none; never in exponent form.
func humanNum(x float64) string {
	switch {
	case math.IsNaN(x) || math.IsInf(x, 0):
		return "unknown"
	case x == math.Trunc(x) && math.Abs(x) < 1e15:
		return strconv.FormatInt(int64(x), 10)
	}
	a, prec := math.Abs(x), 0
	switch {
	case a < 0.01:
		prec = 4
	case a < 0.1:
		prec = 3
	case a < 10:
		prec = 2
	case a < 1000:
		prec = 1
	}
	s := strconv.FormatFloat(x, 'f', prec, 64)
	if strings.Contains(s, ".") {
		s = strings.TrimRight(strings.TrimRight(s, "0"), ".")
	}
	return s
}

func humanBytes(b float64) string {
	for _, u := range []struct {
		size float64
		name string
	}{{1 << 40, "TiB"}, {1 << 30, "GiB"}, {1 << 20, "MiB"}, {1 << 10, "KiB"}} {
		if math.Abs(b) >= u.size {
			return humanNum(math.Round(b/u.size*10)/10) + " " + u.name
		}
	}
	return humanNum(math.Round(b)) + " B"
}

// humanSeconds is a duration: "350 ms", "2.1 s", "4m30s".
func humanSeconds(s float64) string {
	d := time.Duration(s * float64(time.Second))
	switch {
	case math.IsNaN(s) || math.IsInf(s, 0):
		return "unknown"
	case math.Abs(s) >= 60:
		return d.Round(time.Second).String()
	case math.Abs(s) >= 1:
		return humanNum(math.Round(s*10)/10) + " s"
	case math.Abs(s) >= 0.001 || s == 0:
		return humanNum(math.Round(s*1000)) + " ms"
	}
	return humanNum(math.Round(s*1e6)) + " µs"
}

func humanPercent(share float64) string {
	p := 100 * share
	if p != 0 && math.Abs(p) < 1 {
		return humanNum(math.Round(p*10)/10) + "%"
	}
	return humanNum(math.Round(p)) + "%"
}

func cmdSnapshot(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("culprit snapshot", flag.ContinueOnError)
	fs.SetOutput(stderr)
	cn := connFlags(fs)
	addr := cn.addr
	asJSON := fs.Bool("json", false, "print the snapshot as JSON")
	if err := fs.Parse(args); err != nil {
		return err
	}
	conn, c, err := cn.dial()
	if err != nil {
		return err
	}
	defer conn.Close()
	s, err := c.GetSnapshot(ctx, &culpritv1.SnapshotRequest{})
	if err != nil {
		return fmt.Errorf("snapshot from %s: %w", *addr, err)
	}
	if *asJSON {
		b, err := protojson.MarshalOptions{UseProtoNames: true, Multiline: true}.Marshal(s)
		if err != nil {
			return fmt.Errorf("encode snapshot: %w", err)
		}
		fmt.Fprintln(stdout, string(b))
		return nil
	}
	t := s.Target
	if t != nil && t.Found {
		fmt.Fprintf(stdout, "target: %s[%d] %s (selector: %s)\n", t.Comm, t.Pid, t.Cmdline, t.Selector)
	} else if t != nil {
		fmt.Fprintf(stdout, "target: not found (selector: %s)\n", t.Selector)
	}
	fmt.Fprintln(stdout, "components:")
	for _, c := range s.Components {
		fmt.Fprintf(stdout, "  %-14s %-9s %-9s %s\n", c.Name, c.Kind, c.State, c.Detail)
		for _, l := range c.Lost {
			fmt.Fprintf(stdout, "      lost: %s\n", l)
		}
	}
	fmt.Fprintln(stdout, "signals:")
	sort.SliceStable(s.Signals, func(i, j int) bool { return s.Signals[i].Name < s.Signals[j].Name })
	for _, sg := range s.Signals {
		var ls []string
		for _, l := range sg.Labels {
			ls = append(ls, fmt.Sprintf("%s=%q", l.Name, l.Value))
		}
		// Exact, but never in exponent form: a byte count reads as digits.
		fmt.Fprintf(stdout, "  %s{%s} %s\n", sg.Name, strings.Join(ls, ","), strconv.FormatFloat(sg.Value, 'f', -1, 64))
	}
	return nil
}

// cmdProfile asks the agent for a CPU profile of the target and writes it
// where `go tool pprof` can open it.
func cmdProfile(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("culprit profile", flag.ContinueOnError)
	fs.SetOutput(stderr)
	cn := connFlags(fs)
	addr := cn.addr
	dur := fs.Duration("duration", 10*time.Second, "profile from now on for this long")
	secs := fs.Int("seconds", 0, "the same as --duration, in seconds (as go tool pprof's -seconds)")
	look := fs.Duration("lookback", 0, "instead, return the samples of this past window at once")
	tids := fs.String("tid", "", "only these threads (comma-separated tids)")
	out := fs.String("o", "cpu.pb.gz", "output file (pprof format)")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if *secs > 0 {
		*dur = time.Duration(*secs) * time.Second
	}
	req := &culpritv1.CaptureProfileRequest{}
	if *look > 0 {
		req.Lookback = durationpb.New(*look)
	} else {
		req.Duration = durationpb.New(*dur)
	}
	for _, s := range strings.Split(*tids, ",") {
		if s = strings.TrimSpace(s); s == "" {
			continue
		}
		n, err := strconv.Atoi(s)
		if err != nil {
			return fmt.Errorf("--tid: %q is not a thread id", s)
		}
		req.Tids = append(req.Tids, int32(n))
	}
	conn, c, err := cn.dial()
	if err != nil {
		return err
	}
	defer conn.Close()
	if *look == 0 {
		fmt.Fprintf(stderr, "profiling for %s...\n", *dur)
	}
	resp, err := c.CaptureProfile(ctx, req)
	if err != nil {
		return fmt.Errorf("profile from %s: %w", *addr, err)
	}
	if err := os.WriteFile(*out, resp.Pprof, 0o644); err != nil {
		return fmt.Errorf("write profile: %w", err)
	}
	fmt.Fprintf(stdout, "wrote %s: %d samples over %s; open it with: go tool pprof -top %s\n", *out, resp.Samples, resp.Duration.AsDuration().Round(time.Millisecond), *out)
	return nil
}

// printTable lists findings one per line, most severe first, as a person
// scans them: severity, state, age, rule, cause, what.
func printTable(w io.Writer, fs []*culpritv1.Finding, now time.Time) {
	sort.SliceStable(fs, func(i, j int) bool {
		if fs[i].Severity != fs[j].Severity {
			return fs[i].Severity > fs[j].Severity
		}
		return fs[i].FirstSeen.AsTime().Before(fs[j].FirstSeen.AsTime())
	})
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "SEVERITY\tSTATE\tAGE\tRULE\tCAUSE\tFINDING")
	for _, f := range fs {
		sev := strings.ToLower(strings.TrimPrefix(f.Severity.String(), "SEVERITY_"))
		state := strings.ToLower(strings.TrimPrefix(f.State.String(), "FINDING_STATE_"))
		age := now.Sub(f.FirstSeen.AsTime()).Round(time.Second)
		title := f.Title
		if len(title) > 100 {
			title = title[:97] + "..."
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\n", sev, state, age, f.Rule, f.Cause, title)
	}
	tw.Flush()
}
