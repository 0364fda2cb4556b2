package collectors

import (
	"bytes"
	"path/filepath"
	"strconv"
)

// fnv64 is FNV-1a, inline: hash/fnv's would be one allocation a cycle.
type fnv64 struct{ h uint64 }

const (
	offset64 = 14695981039346656037
	prime64  = 1099511628211
)

func (f *fnv64) Write(b []byte) {
	for _, c := range b {
		f.h ^= uint64(c)
		f.h *= prime64
	}
}

// netnsActivity tells whether any TCP socket of a network namespace can
// have changed since the last look, from counters the kernel keeps per
// namespace: the Tcp line of net/snmp (segments in and out, opens,
// resets, retransmits: every state change but a timer's is a segment), and
// the sockets in use and in TIME_WAIT of net/sockstat and net/sockstat6
// (a new listener sends nothing; a TIME_WAIT socket expires silently). When
// none moved, no socket changed state, and no data was sent or received:
// the idle ages tcp_info reports all grew by the time that passed. It
// costs three small reads of files kept open (about 30 us), against a
// sock_diag dump that walks the kernel's whole established hash (262144
// buckets on this project's VM, shared by every namespace: ~1-2 ms before a
// single socket is reported).
//
// It tells two things apart: a change of state (opens, closes, resets,
// retransmits, errors, sockets in use or in TIME_WAIT: counts of sockets
// by state may have changed) and data alone (only InSegs and OutSegs
// moved: the same sockets in the same states, some of which sent or
// received).
type netnsActivity struct {
	snmp, sockstat, sockstat6 procFile
	buf                       []byte
	lastState, lastData       uint64
	have                      bool
	pid                       int
	paths                     [3]string // net/snmp, net/sockstat, net/sockstat6 of pid
	// segs are the indexes of InSegs and OutSegs on the Tcp line (from
	// its header line).
	segs [2]int
}

var (
	tcpLinePrefix   = []byte("Tcp:")
	tcp4StatPrefix  = []byte("TCP:")
	tcp6StatPrefix  = []byte("TCP6:")
	sockstatGlobals = [][]byte{[]byte("orphan"), []byte("alloc"), []byte("mem")} // host-wide, not the namespace's
	inSegs          = []byte("InSegs")
	outSegs         = []byte("OutSegs")
)

// changed reads the counters through pid's /proc/PID/net and reports
// whether they moved since the last call (true the first time, and when
// they cannot be read).
func (a *netnsActivity) changed(procRoot string, pid int) bool {
	state, data := a.changes(procRoot, pid)
	return state || data
}

// changes is changed told apart: state, when socket counts by state may
// have changed; data, when only segments moved.
func (a *netnsActivity) changes(procRoot string, pid int) (state, data bool) {
	if pid != a.pid || a.paths[0] == "" {
		a.snmp.close()
		a.sockstat.close()
		a.sockstat6.close()
		a.pid, a.have = pid, false
		// Built once per target: this runs every cycle of several
		// collectors.
		dir := filepath.Join(procRoot, strconv.Itoa(pid), "net")
		a.paths = [3]string{dir + "/snmp", dir + "/sockstat", dir + "/sockstat6"}
	}
	hs, hd := fnv64{offset64}, fnv64{offset64}
	b, err := a.snmp.read(&a.buf, a.paths[0])
	if err != nil {
		a.have = false
		return true, true
	}
	// The first Tcp: line names the fields, the second holds the values.
	seen := 0
	for line := range bytes.Lines(b) {
		if !bytes.HasPrefix(line, tcpLinePrefix) {
			continue
		}
		seen++
		i := 0
		for f := range bytes.FieldsSeq(line[len(tcpLinePrefix):]) {
			switch {
			case seen == 1 && bytes.Equal(f, inSegs):
				a.segs[0] = i + 1
			case seen == 1 && bytes.Equal(f, outSegs):
				a.segs[1] = i + 1
			case seen == 2 && (i+1 == a.segs[0] || i+1 == a.segs[1]):
				hd.Write(f)
			case seen == 2:
				hs.Write(f)
			}
			i++
		}
		if seen == 2 {
			break
		}
	}
	for i, f := range [2]*procFile{&a.sockstat, &a.sockstat6} {
		prefix := tcp4StatPrefix
		if i == 1 {
			prefix = tcp6StatPrefix
		}
		b, err := f.read(&a.buf, a.paths[1+i])
		if err != nil {
			continue // no IPv6
		}
		for line := range bytes.Lines(b) {
			if !bytes.HasPrefix(line, prefix) {
				continue
			}
			// "TCP: inuse 5 orphan 0 tw 2 alloc 9 mem 1": inuse and tw
			// are the namespace's; the rest are the host's.
			var name []byte
			for f := range bytes.FieldsSeq(line[len(prefix):]) {
				if name == nil {
					name = f
					continue
				}
				global := false
				for _, g := range sockstatGlobals {
					global = global || bytes.Equal(name, g)
				}
				if !global {
					hs.Write(name)
					hs.Write(f)
				}
				name = nil
			}
		}
	}
	state = !a.have || hs.h != a.lastState
	data = !a.have || hd.h != a.lastData
	a.lastState, a.lastData, a.have = hs.h, hd.h, true
	return state, data
}

func (a *netnsActivity) close() {
	a.snmp.close()
	a.sockstat.close()
	a.sockstat6.close()
	a.have = false
}
