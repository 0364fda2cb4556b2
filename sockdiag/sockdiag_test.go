package sockdiag

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"testing"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/culprit-dev/culprit/internal/testenv"
)

// loopbackPair is a listener and both ends of a connection to it, closed
// when the test ends.
func loopbackPair(t *testing.T) (net.Listener, net.Conn, net.Conn) {
	t.Helper()
	l, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.Close() })
	cl, err := net.Dial("tcp4", l.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cl.Close() })
	srv, err := l.Accept()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { srv.Close() })
	return l, cl, srv
}

// A real dump of this process's own namespace finds a listener and both
// ends of a connection to it, with the inodes /proc/self/fd shows and the
// queues the kernel keeps: unread bytes on the server end.
func TestDumpOwnNamespace(t *testing.T) {
	l, cl, srv := loopbackPair(t)
	if _, err := cl.Write([]byte("hello")); err != nil { // unread on the server end
		t.Fatal(err)
	}
	inode := func(c any) uint32 { return testenv.SocketInode(t, c.(interface{ File() (*os.File, error) })) }
	lport := uint16(l.Addr().(*net.TCPAddr).Port)
	want := map[uint32]string{inode(l): "LISTEN", inode(cl): "ESTABLISHED client", inode(srv): "ESTABLISHED server"}

	c, err := Open("/proc", os.Getpid(), 0)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	var unread uint32 = 1 << 31
	for attempt := 0; attempt < 50 && unread != 5; attempt++ {
		got := map[uint32]string{}
		err = c.Dump(context.Background(), AllStates, true, func(s *Socket) bool {
			if _, ok := want[s.Inode]; !ok {
				return true
			}
			switch {
			case s.State == Listen && s.LocalPort == lport:
				got[s.Inode] = "LISTEN"
			case s.State == Established && s.RemotePort == lport:
				got[s.Inode] = "ESTABLISHED client"
			case s.State == Established && s.LocalPort == lport:
				got[s.Inode] = "ESTABLISHED server"
				unread = s.RQueue
				if s.Info == nil {
					t.Error("no tcp_info on an established socket")
				}
				if s.LocalAddr() != netip.MustParseAddr("127.0.0.1") || s.Cookie == 0 {
					t.Errorf("local %v cookie %d", s.LocalAddr(), s.Cookie)
				}
			}
			return true
		})
		if err != nil && !errors.Is(err, ErrInterrupted) {
			t.Fatal(err)
		}
		if fmt.Sprint(got) != fmt.Sprint(want) {
			t.Fatalf("dump saw %v, want %v", got, want)
		}
	}
	if unread != 5 {
		t.Errorf("server end RQueue = %d, want the 5 unread bytes", unread)
	}
	if !c.UsesV1() {
		t.Error("the kernel refused the inet_diag v1 request")
	}

	// Only LISTEN sockets when asked: the state mask reaches the kernel.
	err = c.Dump(context.Background(), Of(Listen), false, func(s *Socket) bool {
		if s.State != Listen {
			t.Errorf("state %d in a LISTEN-only dump", s.State)
		}
		if s.Info != nil {
			t.Error("tcp_info not asked for, but present")
		}
		return true
	})
	if err != nil && !errors.Is(err, ErrInterrupted) {
		t.Fatal(err)
	}

	// The steady state allocates nothing.
	fn := func(*Socket) bool { return true }
	if n := testing.AllocsPerRun(20, func() { c.Dump(context.Background(), AllStates, true, fn) }); n != 0 {
		t.Errorf("a dump allocates %v times", n)
	}

	// Stopping the dump closes the Conn: its socket still holds the answer.
	if err := c.Dump(context.Background(), AllStates, false, func(*Socket) bool { return false }); !errors.Is(err, ErrStopped) {
		t.Errorf("stopped dump: %v", err)
	}
	if err := c.Dump(context.Background(), AllStates, false, fn); err == nil {
		t.Error("a stopped Conn dumps again")
	}
}

// sockMsg builds one netlink message as the kernel sends a socket: header,
// inet_diag_msg and, when info is not nil, an INET_DIAG_INFO attribute
// after another attribute.
func sockMsg(seq uint32, family, state uint8, src, dst netip.AddrPort, info *unix.TCPInfo) []byte {
	body := make([]byte, inetDiagMsgLen)
	body[0], body[1] = family, state
	binary.BigEndian.PutUint16(body[4:6], src.Port())
	binary.BigEndian.PutUint16(body[6:8], dst.Port())
	copy(body[8:24], src.Addr().AsSlice())
	copy(body[24:40], dst.Addr().AsSlice())
	binary.NativeEndian.PutUint32(body[68:72], 4242)
	if info != nil {
		// INET_DIAG_SHUTDOWN, one byte padded to four, as the kernel puts first.
		body = append(body, 5, 0, 8, 0, 0, 0, 0, 0)
		raw := unsafe.Slice((*byte)(unsafe.Pointer(info)), unsafe.Sizeof(*info))
		attr := make([]byte, 4, 4+len(raw))
		binary.NativeEndian.PutUint16(attr[0:2], uint16(4+len(raw)))
		binary.NativeEndian.PutUint16(attr[2:4], inetDiagInfo)
		body = append(body, append(attr, raw...)...)
		for len(body)%4 != 0 {
			body = append(body, 0)
		}
	}
	return nlMsg(seq, unix.SOCK_DIAG_BY_FAMILY, body, 0)
}

func nlMsg(seq uint32, typ uint16, body []byte, flags uint16) []byte {
	b := make([]byte, unix.NLMSG_HDRLEN, unix.NLMSG_HDRLEN+len(body))
	binary.NativeEndian.PutUint32(b[0:4], uint32(unix.NLMSG_HDRLEN+len(body)))
	binary.NativeEndian.PutUint16(b[4:6], typ)
	binary.NativeEndian.PutUint16(b[6:8], unix.NLM_F_MULTI|flags)
	binary.NativeEndian.PutUint32(b[8:12], seq)
	return append(b, body...)
}

func errMsg(seq uint32, errno unix.Errno) []byte {
	b := make([]byte, 4)
	binary.NativeEndian.PutUint32(b, uint32(-int32(errno)))
	return nlMsg(seq, unix.NLMSG_ERROR, b, 0)
}

// TestParse feeds crafted answers through the parser, for what a loopback
// namespace does not produce on demand: stale sequence numbers, messages
// after DONE, errors, interrupted dumps, a v4 client of a dual-stack
// listener.
func TestParse(t *testing.T) {
	ap := netip.MustParseAddrPort
	v6 := func(s string) netip.AddrPort { // a v4 endpoint as a dual-stack socket shows it
		a := ap(s)
		return netip.AddrPortFrom(netip.AddrFrom16(a.Addr().As16()), a.Port())
	}
	cw := &unix.TCPInfo{State: CloseWait, Retransmits: 2, Last_data_recv: 9000, Last_ack_recv: 7000}
	var dump []byte
	add := func(b []byte) { dump = append(dump, b...) }
	add(sockMsg(1, unix.AF_INET6, Listen, ap("[::]:8080"), ap("[::]:0"), nil))
	add(sockMsg(1, unix.AF_INET6, CloseWait, v6("10.0.0.1:8080"), v6("10.9.9.9:40000"), cw))
	add(sockMsg(7, unix.AF_INET6, CloseWait, v6("10.0.0.1:8080"), v6("10.9.9.9:40001"), cw)) // stale sequence: skipped
	add(sockMsg(1, unix.AF_INET, Established, ap("10.0.0.1:51000"), ap("10.1.1.1:5432"), nil))
	add(nlMsg(1, unix.NLMSG_DONE, make([]byte, 4), 0))
	// A stray message after DONE in the same read is not looked at.
	add(sockMsg(1, unix.AF_INET6, CloseWait, v6("10.0.0.1:8080"), v6("10.9.9.9:40002"), cw))

	c := &Conn{seq: 1}
	var got []string
	done, err := c.parse(dump, func(s *Socket) bool {
		var retrans uint8
		if s.Info != nil {
			retrans = s.Info[TCPInfoRetransmits]
		}
		got = append(got, fmt.Sprintf("%s %v>%v ino %d retrans %d", StateNames[s.State],
			netip.AddrPortFrom(s.LocalAddr(), s.LocalPort), netip.AddrPortFrom(s.RemoteAddr(), s.RemotePort), s.Inode, retrans))
		return true
	})
	if !done || err != nil {
		t.Fatalf("parse = %v, %v; want done", done, err)
	}
	want := []string{
		"LISTEN [::]:8080>[::]:0 ino 4242 retrans 0",
		"CLOSE_WAIT [::ffff:10.0.0.1]:8080>[::ffff:10.9.9.9]:40000 ino 4242 retrans 2",
		"ESTABLISHED 10.0.0.1:51000>10.1.1.1:5432 ino 4242 retrans 0",
	}
	if fmt.Sprint(got) != fmt.Sprint(want) {
		t.Errorf("parsed\n%q\nwant\n%q", got, want)
	}
	if c.count != 3 {
		t.Errorf("count %d", c.count)
	}

	// Errors end the answer.
	c.seq = 3
	if done, err := c.parse(errMsg(3, unix.ENOENT), func(*Socket) bool { return true }); !done || !errors.Is(err, unix.ENOENT) {
		t.Errorf("NLMSG_ERROR ENOENT: %v, %v", done, err)
	}
	if _, err := c.parse(errMsg(3, unix.ENOENT)[:18], func(*Socket) bool { return true }); err == nil {
		t.Error("a message longer than the read is not an error")
	}
	// An interrupted dump is noted.
	c.intr = false
	c.parse(nlMsg(3, unix.NLMSG_DONE, make([]byte, 4), nlmFDumpIntr), func(*Socket) bool { return true })
	if !c.intr {
		t.Error("NLM_F_DUMP_INTR not noted")
	}
	// The callback stops the answer.
	c.seq = 4
	dump = dump[:0]
	for i := 0; i < 3; i++ {
		add(sockMsg(4, unix.AF_INET, TimeWait, ap(fmt.Sprintf("10.0.0.1:%d", 50000+i)), ap("10.1.1.1:80"), nil))
	}
	n := 0
	if done, err := c.parse(dump, func(*Socket) bool { n++; return n < 2 }); !done || err != nil || n != 2 || !c.stop {
		t.Errorf("stopped: done %v err %v n %d", done, err, n)
	}
	if a := testing.AllocsPerRun(100, func() { c.parse(dump, func(*Socket) bool { return true }) }); a != 0 {
		t.Errorf("parse allocates %v times", a)
	}
}

func TestTCPInfoOffsets(t *testing.T) {
	var ti unix.TCPInfo
	for _, tc := range []struct {
		name      string
		got, want uintptr
	}{
		{"retransmits", TCPInfoRetransmits, unsafe.Offsetof(ti.Retransmits)},
		{"last_data_sent", TCPInfoLastDataSent, unsafe.Offsetof(ti.Last_data_sent)},
		{"last_data_recv", TCPInfoLastDataRecv, unsafe.Offsetof(ti.Last_data_recv)},
		{"last_ack_recv", TCPInfoLastAckRecv, unsafe.Offsetof(ti.Last_ack_recv)},
	} {
		if tc.got != tc.want {
			t.Errorf("tcp_info %s at %d, x/sys/unix says %d", tc.name, tc.got, tc.want)
		}
	}
	if uintptr(tcpInfoMinLen) != unsafe.Offsetof(ti.Last_ack_recv)+4 {
		t.Errorf("tcpInfoMinLen %d", tcpInfoMinLen)
	}
}

// DumpExcluding leaves out the sockets on the excluded local ports, the
// kernel's filter accepts the longest list allowed, and v1 and v2 requests
// filter alike.
func TestDumpExcluding(t *testing.T) {
	l, cl, _ := loopbackPair(t)
	lport := uint16(l.Addr().(*net.TCPAddr).Port)
	cport := uint16(cl.LocalAddr().(*net.TCPAddr).Port)
	c, err := Open("/proc", os.Getpid(), 0)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	// Ports no socket uses, then the listener's last: the last test is
	// the one the jumps must get right.
	long := make([]uint16, 0, MaxExcludedPorts)
	for p := uint16(1); len(long) < MaxExcludedPorts-1; p++ {
		if p != lport && p != cport {
			long = append(long, p)
		}
	}
	long = append(long, lport)
	for _, v2 := range []bool{false, true} {
		if v2 {
			c.UseV2()
		}
		for _, exclude := range [][]uint16{{lport}, long} {
			seen := map[uint16]int{}
			err := c.DumpExcluding(context.Background(), AllStates, true, exclude, func(s *Socket) bool {
				// The client's socket by its remote too: the test runs in
				// the host's namespace beside other packages' tests, whose
				// connections to other remotes may share its local port
				// (fresh-clone CI: 2 on the client's port).
				if s.LocalPort == lport || (s.LocalPort == cport && s.RemotePort == lport) {
					seen[s.LocalPort]++
				}
				return true
			})
			if err != nil {
				t.Fatalf("v2 %v, %d ports: %v", v2, len(exclude), err)
			}
			if seen[lport] != 0 || seen[cport] != 1 {
				t.Errorf("v2 %v, %d ports excluded: %d sockets on the listener's port (want 0), %d on the client's (want 1)",
					v2, len(exclude), seen[lport], seen[cport])
			}
		}
	}
	if err := c.DumpExcluding(context.Background(), AllStates, false, make([]uint16, MaxExcludedPorts+1), func(*Socket) bool { return true }); err == nil {
		t.Error("a filter past MaxExcludedPorts was accepted")
	}
}
