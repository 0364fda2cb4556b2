package collectors

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"syscall"
	"time"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/culprit-dev/culprit/signals"
	"github.com/culprit-dev/culprit/target"
)

func init() {
	register("fds", false, func(o Options) (Collector, error) { return newFDsCollector(o), nil })
}

var (
	openFDsDesc = &signals.Desc{Name: "process_open_fds", Kind: signals.Gauge,
		Help: "Open file descriptors of the target by what they point at (socket, file, pipe, anon_eventfd, ...)."}
	fdsOpenDesc = &signals.Desc{Name: "process_fds_open", Kind: signals.Gauge,
		Help: "Open file descriptors of the target."}
	fdLimitDesc = &signals.Desc{Name: "process_fd_limit", Kind: signals.Gauge,
		Help: "RLIMIT_NOFILE of the target (type soft or hard)."}
	tcpSocketsDesc = &signals.Desc{Name: "process_tcp_sockets", Kind: signals.Gauge,
		Help: "TCP sockets the target holds open, by state: CLOSE_WAIT growing means the app never closes sockets its peers closed."}
)

// tcpStateNames index the kernel's TCP states (include/net/tcp_states.h).
var tcpStateNames = [...]string{1: "ESTABLISHED", 2: "SYN_SENT", 3: "SYN_RECV", 4: "FIN_WAIT1", 5: "FIN_WAIT2",
	6: "TIME_WAIT", 7: "CLOSE", 8: "CLOSE_WAIT", 9: "LAST_ACK", 10: "LISTEN", 11: "CLOSING"}

// fdKinds are written every time, 0 when absent, so that growth of one
// kind can be read from its own series.
var fdKindNames = []string{"socket", "file", "pipe", "anon_eventfd", "anon_eventpoll", "anon_timerfd", "anon_inotify", "anon_other", "other"}

// maxFDsExamined bounds one Collect: past it the kinds are counted on a
// prefix while the total stays exact (it is the directory's length).
const maxFDsExamined = 1 << 20

// fdKind classifies a /proc/PID/fd link target.
func fdKind(link []byte) string {
	switch {
	case bytes.HasPrefix(link, []byte("socket:[")):
		return "socket"
	case bytes.HasPrefix(link, []byte("pipe:[")):
		return "pipe"
	case bytes.HasPrefix(link, []byte("/")):
		return "file"
	case bytes.Equal(link, []byte("anon_inode:[eventfd]")):
		return "anon_eventfd"
	case bytes.Equal(link, []byte("anon_inode:[eventpoll]")):
		return "anon_eventpoll"
	case bytes.Equal(link, []byte("anon_inode:[timerfd]")):
		return "anon_timerfd"
	case bytes.Equal(link, []byte("anon_inode:inotify")):
		return "anon_inotify"
	case bytes.HasPrefix(link, []byte("anon_inode:")):
		return "anon_other"
	}
	return "other"
}

// parseNofile reads "Max open files" from /proc/PID/limits; unlimited
// values are reported as absent (ok false).
func parseNofile(limits []byte) (soft, hard float64, softOK, hardOK bool, err error) {
	for _, line := range bytes.Split(limits, []byte("\n")) {
		if !bytes.HasPrefix(line, []byte("Max open files")) {
			continue
		}
		f := bytes.Fields(line[len("Max open files"):])
		if len(f) < 2 {
			return 0, 0, false, false, fmt.Errorf("short Max open files line %q: %w", line, errParse)
		}
		if v, err := strconv.ParseFloat(string(f[0]), 64); err == nil {
			soft, softOK = v, true
		}
		if v, err := strconv.ParseFloat(string(f[1]), 64); err == nil {
			hard, hardOK = v, true
		}
		return soft, hard, softOK, hardOK, nil
	}
	return 0, 0, false, false, fmt.Errorf("no Max open files line: %w", errParse)
}

type fdsCollector struct {
	procRoot string
	selfIno  uint64
	buf      []byte
	link     []byte
}

// socketStates counts the target's TCP sockets by state: one sock_diag
// dump of its namespace (every state, so it walks the established hash:
// about 2 ms, hence at the normal interval, never the fast one), matched
// to the socket inodes of its fd table.
func (c *fdsCollector) socketStates(tgt target.Process, held map[uint32]bool, store *signals.Store, now time.Time) error {
	var socks []*netlink.Socket
	dump := func() error {
		for _, fam := range []uint8{unix.AF_INET, unix.AF_INET6} {
			s, err := netlink.SocketDiagTCP(fam)
			if err != nil && !(fam == unix.AF_INET6 && errors.Is(err, unix.ENOENT)) {
				return fmt.Errorf("sock_diag dump: %w", err)
			}
			socks = append(socks, s...)
		}
		return nil
	}
	var err error
	if tgt.NetnsIno == 0 || tgt.NetnsIno == c.selfIno {
		err = dump()
	} else {
		ns, oerr := openTargetNetns(c.procRoot, tgt.PID, tgt.NetnsIno)
		if oerr != nil {
			return fmt.Errorf("pid %d: %w", tgt.PID, oerr)
		}
		err = inNetns(ns, dump)
		ns.Close()
	}
	if err != nil {
		return fmt.Errorf("pid %d: %w", tgt.PID, err)
	}
	var byState [len(tcpStateNames)]float64
	for _, s := range socks {
		if held[s.INode] && int(s.State) < len(byState) {
			byState[s.State]++
		}
	}
	for st, name := range tcpStateNames {
		if name != "" {
			store.Put(tcpSocketsDesc, signals.L("state", name), byState[st], now)
		}
	}
	return nil
}

func newFDsCollector(o Options) *fdsCollector {
	root := o.ProcRoot
	if root == "" {
		root = "/proc"
	}
	self, _ := selfNetnsIno()
	return &fdsCollector{procRoot: root, selfIno: self, link: make([]byte, 256)}
}

func (*fdsCollector) Name() string { return "fds" }

func (c *fdsCollector) Collect(_ context.Context, tgt target.Process, store *signals.Store) error {
	now := time.Now()
	pidDir := filepath.Join(c.procRoot, strconv.Itoa(tgt.PID))
	fdDir := filepath.Join(pidDir, "fd")
	d, err := os.Open(fdDir)
	if err != nil {
		return fmt.Errorf("pid %d: open fd table: %w", tgt.PID, err)
	}
	names, err := d.Readdirnames(-1)
	d.Close()
	if err != nil {
		return fmt.Errorf("pid %d: read fd table: %w", tgt.PID, err)
	}
	counts := make(map[string]float64, len(fdKindNames))
	sockets := map[uint32]bool{}
	for i, n := range names {
		if i >= maxFDsExamined {
			break
		}
		l, err := readlinkInto(filepath.Join(fdDir, n), &c.link)
		if err != nil {
			continue // closed between readdir and readlink
		}
		k := fdKind(l)
		counts[k]++
		if k == "socket" {
			if ino, err := strconv.ParseUint(string(l[len("socket:["):len(l)-1]), 10, 32); err == nil {
				sockets[uint32(ino)] = true
			}
		}
	}
	if err := c.socketStates(tgt, sockets, store, now); err != nil {
		return err
	}
	for _, k := range fdKindNames {
		store.Put(openFDsDesc, signals.L("kind", k), counts[k], now)
	}
	store.Put(fdsOpenDesc, nil, float64(len(names)), now)

	b, err := readProcFile(&c.buf, filepath.Join(pidDir, "limits"))
	if err != nil {
		return fmt.Errorf("pid %d: %w", tgt.PID, err)
	}
	soft, hard, softOK, hardOK, err := parseNofile(b)
	if err != nil {
		return fmt.Errorf("pid %d: limits: %w", tgt.PID, err)
	}
	if softOK {
		store.Put(fdLimitDesc, signals.L("type", "soft"), soft, now)
	}
	if hardOK {
		store.Put(fdLimitDesc, signals.L("type", "hard"), hard, now)
	}
	return nil
}

// errParse marks a /proc file that is not in the expected format.
var errParse = errors.New("unexpected /proc format")

func readlinkRaw(path string, buf []byte) (int, error) { return syscall.Readlink(path, buf) }

// readlinkInto is os.Readlink without an allocation per call: one
// Collect reads one link per descriptor, thousands on a busy server.
func readlinkInto(path string, buf *[]byte) ([]byte, error) {
	for {
		n, err := readlinkRaw(path, *buf)
		if err != nil {
			return nil, err
		}
		if n < len(*buf) {
			return (*buf)[:n], nil
		}
		*buf = make([]byte, 2*len(*buf))
	}
}
