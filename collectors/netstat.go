package collectors

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"path/filepath"
	"strconv"
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
	out := make(map[string]float64, 256)
	err := scanNetSNMP(b, func(proto, name []byte, v float64) {
		out[string(proto)+"."+string(name)] = v
	})
	if err != nil {
		return nil, err
	}
	return out, nil
}

// scanNetSNMP walks the pairs of lines of parseNetSNMP's format and calls
// fn for every field, in file order, with the protocol (without its colon),
// the field's name and its value; the slices alias b. It checks what
// parseNetSNMP checks, and fails as it does, but allocates nothing: the
// netstat collector reads both files every second while segments move in
// the namespace, and a map of ~300 keys built from strings each time was
// its largest allocation (~50 KB a second).
func scanNetSNMP(b []byte, fn func(proto, name []byte, v float64)) error {
	b = bytes.TrimSpace(b)
	if lines := bytes.Count(b, []byte{'\n'}) + 1; lines%2 != 0 {
		return fmt.Errorf("odd number of lines (%d): %w", lines, errNetSNMP)
	}
	for i := 0; len(b) > 0; i += 2 {
		var names, values []byte
		names, b, _ = bytes.Cut(b, []byte{'\n'})
		values, b, _ = bytes.Cut(b, []byte{'\n'})
		if err := scanNetSNMPPair(names, values, i, fn); err != nil {
			return err
		}
	}
	return nil
}

// scanNetSNMPPair is one pair of lines of scanNetSNMP; i is the index of
// the names line.
func scanNetSNMPPair(names, values []byte, i int, fn func(proto, name []byte, v float64)) error {
	mismatch := func() error { return fmt.Errorf("lines %d-%d do not pair up: %w", i+1, i+2, errNetSNMP) }
	proto, names := nextSNMPField(names)
	vproto, values := nextSNMPField(values)
	if len(proto) == 0 || !bytes.Equal(proto, vproto) || proto[len(proto)-1] != ':' {
		return mismatch()
	}
	proto = proto[:len(proto)-1]
	// The fields must pair up before any value is judged, as they were
	// counted first.
	if countFields(names) != countFields(values) {
		return mismatch()
	}
	for {
		var name, value []byte
		name, names = nextSNMPField(names)
		value, values = nextSNMPField(values)
		if len(name) == 0 {
			return nil
		}
		v, err := parseCounter(value)
		if err != nil {
			return fmt.Errorf("%s %s: %w", proto, name, err)
		}
		fn(proto, name, v)
	}
}

// nextSNMPField splits the first field off b on ASCII white space, as
// bytes.Fields would (the files hold no other kind).
func nextSNMPField(b []byte) (field, rest []byte) {
	i := 0
	for i < len(b) && asciiSpace(b[i]) {
		i++
	}
	j := i
	for j < len(b) && !asciiSpace(b[j]) {
		j++
	}
	return b[i:j], b[j:]
}

func asciiSpace(c byte) bool {
	return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\v' || c == '\f'
}

// countFields counts the fields of b as bytes.Fields splits them.
func countFields(b []byte) int {
	n := 0
	for f, rest := nextSNMPField(b); len(f) > 0; f, rest = nextSNMPField(rest) {
		n++
	}
	return n
}

// parseCounter is strconv.ParseFloat for a field of these files: an
// integer of up to 15 digits (every counter a kernel has counted so far)
// is exact in a float64 and converted without a string; anything else
// goes through ParseFloat.
func parseCounter(f []byte) (float64, error) {
	digits, neg := f, false
	if len(digits) > 0 && digits[0] == '-' {
		digits, neg = digits[1:], true
	}
	if len(digits) > 0 && len(digits) <= 15 {
		var v int64
		ok := true
		for _, c := range digits {
			if c < '0' || c > '9' {
				ok = false
				break
			}
			v = v*10 + int64(c-'0')
		}
		if ok {
			if neg {
				return -float64(v), nil
			}
			return float64(v), nil
		}
	}
	return strconv.ParseFloat(string(f), 64)
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
// A cycle that reads them allocates nothing: the files are scanned in
// place into the slots of the counters written (netstatSlots).
type netstatCollector struct {
	procRoot string
	activity netnsActivity
	files    [2]procFile
	paths    [2]string // net/netstat and net/snmp of pid
	buf      []byte
	last     []sample
	pid      int
	vals     [2][]float64 // by file, values by slot (netstatSlots)
	have     [2][]bool
}

// netstatSlots index the counters written by the file that holds them (0:
// net/netstat, 1: net/snmp), protocol and field: the slot of a counter is
// its index in netstatCounters, Tcp.CurrEstab's is len(netstatCounters).
var netstatSlots = func() [2]map[string]map[string]int {
	var m [2]map[string]map[string]int
	add := func(file int, proto, field string, slot int) {
		if m[file] == nil {
			m[file] = map[string]map[string]int{}
		}
		if m[file][proto] == nil {
			m[file][proto] = map[string]int{}
		}
		m[file][proto][field] = slot
	}
	for i, c := range netstatCounters {
		file := 0
		if c.proto == "Tcp" {
			file = 1
		}
		add(file, c.proto, c.field, i)
	}
	add(1, "Tcp", "CurrEstab", len(netstatCounters))
	return m
}()

func newNetstatCollector(o Options) (*netstatCollector, error) {
	c := &netstatCollector{procRoot: procRootOf(o)}
	for i := range c.vals {
		c.vals[i] = make([]float64, len(netstatCounters)+1)
		c.have[i] = make([]bool, len(netstatCounters)+1)
	}
	return c, nil
}

func (c *netstatCollector) Name() string { return signals.CollectorNetstat }

func (c *netstatCollector) Collect(_ context.Context, tgt workload.Process, store *signals.Store) error {
	if tgt.PID != c.pid || c.paths[0] == "" {
		c.pid, c.last = tgt.PID, nil
		c.files[0].close()
		c.files[1].close()
		dir := filepath.Join(c.procRoot, strconv.Itoa(tgt.PID), "net")
		c.paths = [2]string{filepath.Join(dir, "netstat"), filepath.Join(dir, "snmp")}
	}
	if !c.activity.changed(c.procRoot, tgt.PID) && len(c.last) > 0 {
		putSamples(store, time.Now(), c.last)
		return nil
	}
	for i, path := range c.paths {
		vals, have, slots := c.vals[i], c.have[i], netstatSlots[i]
		clear(have)
		b, err := c.files[i].read(&c.buf, path)
		if err == nil {
			err = scanNetSNMP(b, func(proto, name []byte, v float64) {
				if slot, ok := slots[string(proto)][string(name)]; ok {
					vals[slot], have[slot] = v, true
				}
			})
		}
		if err != nil {
			c.activity.close() // read it all again next time
			return fmt.Errorf("pid %d: %s: %w", tgt.PID, path, err)
		}
	}
	// As netstatSamples makes them, into last's storage.
	ss := c.last[:0]
	for i, cnt := range netstatCounters {
		file := 0
		if cnt.proto == "Tcp" {
			file = 1
		}
		if c.have[file][i] {
			ss = append(ss, sample{Desc: cnt.desc, Value: c.vals[file][i]})
		}
	}
	if n := len(netstatCounters); c.have[1][n] {
		ss = append(ss, sample{Desc: signals.TCPCurrEstab, Value: c.vals[1][n]})
	}
	if len(ss) == 0 {
		return fmt.Errorf("pid %d: no TCP counters in %s or %s: %w", tgt.PID, c.paths[0], c.paths[1], ErrNoData)
	}
	c.last = ss
	putSamples(store, time.Now(), ss)
	return nil
}
