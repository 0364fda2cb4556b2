package collectors

import (
	"context"
	"errors"
	"fmt"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/culprit-dev/culprit/signals"
	"github.com/culprit-dev/culprit/workload"
)

func init() {
	register(signals.CollectorNetstat, false, func(o Options) (Collector, error) { return newNetstatCollector(o) })
}

// netstatCounter maps one /proc/net/netstat or /proc/net/snmp field to a
// signal. The table is explicit rather than generated from every field so
// that the names rules depend on are greppable and stay stable when a
// kernel adds counters.
type netstatCounter struct {
	desc         *signals.Desc
	proto, field string // as in the file: "TcpExt", "ListenOverflows"
}

var netstatCounters = []netstatCounter{
	{signals.TCPExtListenOverflowsTotal, "TcpExt", "ListenOverflows"},
	{signals.TCPExtListenDropsTotal, "TcpExt", "ListenDrops"},
	{signals.TCPExtReqQFullDropTotal, "TcpExt", "TCPReqQFullDrop"},
	{signals.TCPExtReqQFullDoCookiesTotal, "TcpExt", "TCPReqQFullDoCookies"},
	{signals.TCPExtSyncookiesSentTotal, "TcpExt", "SyncookiesSent"},
	{signals.TCPExtSyncookiesRecvTotal, "TcpExt", "SyncookiesRecv"},
	{signals.TCPExtSyncookiesFailedTotal, "TcpExt", "SyncookiesFailed"},
	{signals.TCPExtTimeWaitOverflowTotal, "TcpExt", "TCPTimeWaitOverflow"},
	{signals.TCPExtAbortOnDataTotal, "TcpExt", "TCPAbortOnData"},
	{signals.TCPExtAbortOnCloseTotal, "TcpExt", "TCPAbortOnClose"},
	{signals.TCPExtAbortOnTimeoutTotal, "TcpExt", "TCPAbortOnTimeout"},
	{signals.TCPExtAbortOnMemoryTotal, "TcpExt", "TCPAbortOnMemory"},
	{signals.TCPExtTimeWaitTotal, "TcpExt", "TW"},
	{signals.TCPExtSynRetransTotal, "TcpExt", "TCPSynRetrans"},
	{signals.TCPActiveOpensTotal, "Tcp", "ActiveOpens"},
	{signals.TCPPassiveOpensTotal, "Tcp", "PassiveOpens"},
	{signals.TCPAttemptFailsTotal, "Tcp", "AttemptFails"},
	{signals.TCPEstabResetsTotal, "Tcp", "EstabResets"},
	{signals.TCPInErrsTotal, "Tcp", "InErrs"},
	{signals.TCPOutRstsTotal, "Tcp", "OutRsts"},
	{signals.TCPRetransSegsTotal, "Tcp", "RetransSegs"},
}

// parseNetSNMP parses the format /proc/net/netstat and /proc/net/snmp
// share: pairs of lines "Proto: Name1 Name2 ..." and "Proto: v1 v2 ...".
// Keys are "Proto.Name". procfs has parsers for both files, but its
// netstat parser drops TCPAbortOnTimeout and TCPAbortOnMemory (v0.23.0),
// and the one format is simple enough to parse whole.
func parseNetSNMP(b []byte) (map[string]float64, error) {
	lines := strings.Split(strings.TrimSpace(string(b)), "\n")
	if len(lines)%2 != 0 {
		return nil, fmt.Errorf("odd number of lines (%d): %w", len(lines), errNetSNMP)
	}
	out := make(map[string]float64, 256)
	for i := 0; i < len(lines); i += 2 {
		names, values := strings.Fields(lines[i]), strings.Fields(lines[i+1])
		if len(names) == 0 || len(names) != len(values) || names[0] != values[0] || !strings.HasSuffix(names[0], ":") {
			return nil, fmt.Errorf("lines %d-%d do not pair up: %w", i+1, i+2, errNetSNMP)
		}
		proto := strings.TrimSuffix(names[0], ":")
		for j := 1; j < len(names); j++ {
			v, err := strconv.ParseFloat(values[j], 64)
			if err != nil {
				return nil, fmt.Errorf("%s %s: %w", proto, names[j], err)
			}
			out[proto+"."+names[j]] = v
		}
	}
	return out, nil
}

var errNetSNMP = errors.New("not in /proc/net/netstat format")

// netstatSamples turns the parsed files into samples. Fields the kernel
// does not have are skipped rather than reported as zero, so that a rule
// can tell "never happened" from "not measured".
func netstatSamples(netstat, snmp map[string]float64) []sample {
	out := make([]sample, 0, len(netstatCounters)+1)
	for _, c := range netstatCounters {
		src := netstat
		if c.proto == "Tcp" {
			src = snmp
		}
		if v, ok := src[c.proto+"."+c.field]; ok {
			out = append(out, sample{Desc: c.desc, Value: v})
		}
	}
	if v, ok := snmp["Tcp.CurrEstab"]; ok {
		out = append(out, sample{Desc: signals.TCPCurrEstab, Value: v})
	}
	return out
}

// netstatCollector reads the TCP counters of the target's network
// namespace: /proc/PID/net is the namespace of PID, whichever the agent is in.
//
// A cycle reads net/snmp and net/sockstat (netnsActivity, ~30 us): when
// the namespace's TCP counters there did not move, none of the TcpExt
// counters of net/netstat can have (each counts something a segment in or
// out, or a socket's end, brought), and the last values are written again
// without reading net/netstat (the kernel formats ~300 counters for it).
type netstatCollector struct {
	procRoot string
	activity netnsActivity
	files    [2]procFile
	buf      []byte
	last     []sample
	pid      int
}

func newNetstatCollector(o Options) (*netstatCollector, error) {
	return &netstatCollector{procRoot: procRootOf(o)}, nil
}

func (c *netstatCollector) Name() string { return signals.CollectorNetstat }

func (c *netstatCollector) Collect(_ context.Context, tgt workload.Process, store *signals.Store) error {
	if tgt.PID != c.pid {
		c.pid, c.last = tgt.PID, nil
		c.files[0].close()
		c.files[1].close()
	}
	if !c.activity.changed(c.procRoot, tgt.PID) && len(c.last) > 0 {
		putSamples(store, time.Now(), c.last)
		return nil
	}
	dir := filepath.Join(c.procRoot, strconv.Itoa(tgt.PID), "net")
	var parsed [2]map[string]float64
	for i, name := range [2]string{"netstat", "snmp"} {
		path := filepath.Join(dir, name)
		b, err := c.files[i].read(&c.buf, path)
		if err == nil {
			parsed[i], err = parseNetSNMP(b)
		}
		if err != nil {
			c.activity.close() // read it all again next time
			return fmt.Errorf("pid %d: %s: %w", tgt.PID, path, err)
		}
	}
	ss := netstatSamples(parsed[0], parsed[1])
	if len(ss) == 0 {
		return fmt.Errorf("pid %d: no TCP counters in %s/netstat or snmp: %w", tgt.PID, dir, ErrNoData)
	}
	c.last = ss
	putSamples(store, time.Now(), ss)
	return nil
}
