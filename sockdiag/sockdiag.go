package sockdiag

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"net/netip"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"
)

// TCP states (include/net/tcp_states.h), as inet_diag reports them.
const (
	Established = 1
	SynSent     = 2
	SynRecv     = 3
	FinWait1    = 4
	FinWait2    = 5
	TimeWait    = 6
	Close       = 7
	CloseWait   = 8
	LastAck     = 9
	Listen      = 10
	Closing     = 11
	NumStates   = 12 // states are 1..NumStates-1
)

// StateNames index the states.
var StateNames = [NumStates]string{Established: "ESTABLISHED", SynSent: "SYN_SENT", SynRecv: "SYN_RECV",
	FinWait1: "FIN_WAIT1", FinWait2: "FIN_WAIT2", TimeWait: "TIME_WAIT", Close: "CLOSE", CloseWait: "CLOSE_WAIT",
	LastAck: "LAST_ACK", Listen: "LISTEN", Closing: "CLOSING"}

// States is a mask of states to dump.
type States uint32

// Of returns the mask of the given states.
func Of(states ...uint8) States {
	var m States
	for _, s := range states {
		m |= 1 << s
	}
	return m
}

// AllStates asks for every state, TCP_NEW_SYN_RECV (12) included; the
// kernel reports request sockets as SYN_RECV and time-wait ones as
// TIME_WAIT or FIN_WAIT2.
const AllStates States = 0x1fff

// Socket is one struct inet_diag_msg, decoded in place. The Conn reuses it
// for every socket of a dump: it is valid only during the callback.
type Socket struct {
	Family     uint8
	State      uint8
	LocalPort  uint16
	RemotePort uint16
	// Local and Remote are 16 bytes; IPv4 addresses are stored v4-mapped,
	// so a v4 connection and a v4-mapped one on a dual-stack socket agree.
	Local, Remote [16]byte
	Cookie        uint64
	// RQueue: for LISTEN the accept queue's length, else bytes received
	// and not read. WQueue: for LISTEN the queue's capacity, else bytes
	// not yet acknowledged.
	RQueue, WQueue uint32
	UID            uint32
	// Inode is the socket's inode, 0 for sockets no process holds (time-
	// wait and request sockets, connections closed by their process, and
	// connections not accepted yet).
	Inode uint32
	// Info is the struct tcp_info when it was asked for and the socket has
	// one (time-wait and request sockets do not); it aliases the read
	// buffer.
	Info []byte
}

// LocalAddr and RemoteAddr are the addresses as the socket's family has
// them: an AF_INET socket's as IPv4, an AF_INET6 socket's as IPv6 (a v4
// client of a dual-stack listener stays v4-mapped, as the kernel shows it).
func (s *Socket) LocalAddr() netip.Addr  { return s.addr(s.Local) }
func (s *Socket) RemoteAddr() netip.Addr { return s.addr(s.Remote) }

func (s *Socket) addr(b [16]byte) netip.Addr {
	a := netip.AddrFrom16(b)
	if s.Family == unix.AF_INET {
		return a.Unmap()
	}
	return a
}

// Offsets in struct tcp_info (include/uapi/linux/tcp.h) that culprit reads.
const (
	TCPInfoRetransmits  = 2
	TCPInfoLastDataSent = 44
	TCPInfoLastDataRecv = 52
	TCPInfoLastAckRecv  = 56
	tcpInfoMinLen       = 60 // every field read lies below
)

// Netlink and inet_diag constants x/sys/unix does not name.
const (
	inetDiagInfo     = 2      // INET_DIAG_INFO: struct tcp_info attribute
	tcpDiagGetSock   = 18     // TCPDIAG_GETSOCK: inet_diag v1 request, both families
	inetDiagReqV1Len = 60     // struct inet_diag_req
	inetDiagReqV2Len = 56     // struct inet_diag_req_v2
	inetDiagMsgLen   = 72     // struct inet_diag_msg
	nlaTypeMask      = 0x3fff // NLA_TYPE_MASK: attribute type without its flags
	nlmFDumpIntr     = 0x10   // NLM_F_DUMP_INTR: the tables changed under the dump
	inetDiagReqBC    = 1      // INET_DIAG_REQ_BYTECODE: a filter after the request
	inetDiagBCJmp    = 1      // INET_DIAG_BC_JMP: take the "no" jump
	inetDiagBCSEq    = 11     // INET_DIAG_BC_S_EQ: local port equal
	// MaxExcludedPorts bounds DumpExcluding's ports: the filter tests each
	// of them against every socket of the namespace in the kernel.
	MaxExcludedPorts = 64
	// The kernel fills dump messages up to 32 KiB per read.
	recvBuf = 64 << 10
	// DefaultTimeout bounds one read of an answer when the context has no
	// sooner deadline; a dump normally takes a few milliseconds.
	DefaultTimeout = 2 * time.Second
)

// ErrInterrupted means the kernel marked the dump interrupted: the socket
// tables changed while it walked them, so a socket may be missing or
// counted twice. Callers that need every listener retry.
var ErrInterrupted = errors.New("sock_diag dump interrupted by a table change")

// Conn is a sock_diag socket in one network namespace. It is not safe for
// concurrent use.
type Conn struct {
	fd    int
	netns uint64
	seq   uint32
	req   []byte // the request, with its filter
	buf   []byte
	noV1  bool // the kernel refused an inet_diag v1 request: v2 per family
	sock  Socket
	intr  bool
	stop  bool
	count int
}

// Open opens a sock_diag socket in the network namespace netnsIno of pid
// (0: the agent's own). procRoot is normally /proc.
func Open(procRoot string, pid int, netnsIno uint64) (*Conn, error) {
	fd := -1
	err := InTargetNetns(procRoot, pid, netnsIno, func() error {
		var err error
		fd, err = unix.Socket(unix.AF_NETLINK, unix.SOCK_RAW|unix.SOCK_CLOEXEC, unix.NETLINK_SOCK_DIAG)
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("open sock_diag socket in netns %d: %w", netnsIno, err)
	}
	return &Conn{fd: fd, netns: netnsIno, buf: make([]byte, recvBuf)}, nil
}

// UsesV1 reports whether dumps use the single inet_diag v1 request (the
// kernel did not refuse it).
func (c *Conn) UsesV1() bool { return !c.noV1 }

// UseV2 makes dumps use the per-family v2 requests, as on a kernel that
// refuses v1 (for comparisons in tests and benchmarks).
func (c *Conn) UseV2() { c.noV1 = true }

// Netns is the namespace inode the Conn was opened for.
func (c *Conn) Netns() uint64 { return c.netns }

// Close releases the socket.
func (c *Conn) Close() error {
	if c.fd < 0 {
		return nil
	}
	err := unix.Close(c.fd)
	c.fd = -1
	return err
}

// Dump walks the TCP sockets of the namespace in the given states, IPv4
// and IPv6, calling fn for each; fn returning false stops the dump (the
// rest of the answer is left unread, so the Conn must then be closed:
// Dump does that and reports Stopped). info asks for each socket's
// tcp_info.
//
// It asks with one inet_diag v1 request (TCPDIAG_GETSOCK), which the
// kernel answers for both families in a single walk of its socket hashes.
// With v2 requests (SOCK_DIAG_BY_FAMILY), one per family, the kernel walks
// the established hash, which both families and every namespace share,
// once for each: at 100k TIME_WAIT sockets 37-39 ms against 28-37 ms with
// v1 (2 loaded cores), nearly all of it in the kernel's walk. A kernel
// that refuses v1 gets the two v2 requests.
//
// An interrupted dump is read to its end and reported as ErrInterrupted.
func (c *Conn) Dump(ctx context.Context, states States, info bool, fn func(*Socket) bool) error {
	return c.DumpExcluding(ctx, states, info, nil, fn)
}

// DumpExcluding is Dump without the sockets whose local port is one of
// exclude (at most MaxExcludedPorts): the kernel still walks every socket,
// but it tests those with a filter (inet_diag bytecode) and leaves them
// out of the answer. Filling in and copying out a socket is most of what a
// dump costs (~1 us a socket, against ~40 ns for the walk and the test):
// the sockets collector, refreshing only the idle ages of outbound
// connections, leaves out the connections to the namespace's listeners.
func (c *Conn) DumpExcluding(ctx context.Context, states States, info bool, exclude []uint16, fn func(*Socket) bool) error {
	if len(exclude) > MaxExcludedPorts {
		return fmt.Errorf("sock_diag filter: %d ports, at most %d", len(exclude), MaxExcludedPorts)
	}
	if c.fd < 0 {
		return fmt.Errorf("sock_diag socket closed")
	}
	timeout := DefaultTimeout // per read: a big dump is many reads
	if dl, ok := ctx.Deadline(); ok {
		timeout = max(min(timeout, time.Until(dl)), time.Millisecond)
	}
	tv := unix.NsecToTimeval(int64(timeout))
	if err := unix.SetsockoptTimeval(c.fd, unix.SOL_SOCKET, unix.SO_RCVTIMEO, &tv); err != nil {
		return fmt.Errorf("SO_RCVTIMEO: %w", err)
	}
	c.intr, c.stop, c.count = false, false, 0
	if !c.noV1 {
		err := c.request(ctx, tcpDiagGetSock, unix.AF_UNSPEC, states, info, exclude, fn)
		// A refused filter says nothing of v1: the caller hears of it.
		if err == nil || c.count > 0 || len(exclude) > 0 || !(errors.Is(err, unix.EINVAL) || errors.Is(err, unix.ENOENT) || errors.Is(err, unix.EOPNOTSUPP)) {
			return c.finish(err)
		}
		c.noV1 = true
	}
	// IPv6 first, as v1 answers.
	for _, fam := range [...]uint8{unix.AF_INET6, unix.AF_INET} {
		err := c.request(ctx, unix.SOCK_DIAG_BY_FAMILY, fam, states, info, exclude, fn)
		if fam == unix.AF_INET6 && errors.Is(err, unix.ENOENT) {
			continue // IPv6 disabled: nothing to dump
		}
		if err != nil || c.stop {
			return c.finish(err)
		}
	}
	return c.finish(nil)
}

// ErrStopped is returned when the callback stopped the dump; the Conn is
// closed (its socket still holds the rest of the answer).
var ErrStopped = errors.New("sock_diag dump stopped by the caller")

func (c *Conn) finish(err error) error {
	switch {
	case err != nil:
		c.Close() // a broken or half-read socket is not reused
		return fmt.Errorf("sock_diag dump: %w", err)
	case c.stop:
		c.Close()
		return ErrStopped
	case c.intr:
		return ErrInterrupted
	}
	return nil
}

// request sends one dump request and reads its answer.
func (c *Conn) request(ctx context.Context, typ uint16, family uint8, states States, info bool, exclude []uint16, fn func(*Socket) bool) error {
	c.seq++
	reqLen := inetDiagReqV2Len
	if typ == tcpDiagGetSock {
		reqLen = inetDiagReqV1Len
	}
	n := unix.NLMSG_HDRLEN + reqLen
	if len(exclude) > 0 {
		n += excludeFilterLen(len(exclude))
	}
	if cap(c.req) < n {
		c.req = make([]byte, n)
	}
	r := c.req[:n]
	clear(r)
	q := r[unix.NLMSG_HDRLEN:]
	var ext uint8
	if info {
		ext = 1 << (inetDiagInfo - 1)
	}
	if typ == tcpDiagGetSock { // struct inet_diag_req
		q[0] = family
		q[3] = ext
		binary.NativeEndian.PutUint32(q[52:56], uint32(states))
	} else { // struct inet_diag_req_v2
		q[0] = family
		q[1] = unix.IPPROTO_TCP
		q[2] = ext
		binary.NativeEndian.PutUint32(q[4:8], uint32(states))
	}
	if len(exclude) > 0 {
		putExcludeFilter(r[unix.NLMSG_HDRLEN+reqLen:], exclude)
	}
	binary.NativeEndian.PutUint32(r[0:4], uint32(len(r)))
	binary.NativeEndian.PutUint16(r[4:6], typ)
	binary.NativeEndian.PutUint16(r[6:8], unix.NLM_F_REQUEST|unix.NLM_F_DUMP)
	binary.NativeEndian.PutUint32(r[8:12], c.seq)
	for {
		_, err := unix.Write(c.fd, r)
		if err == unix.EINTR {
			continue
		}
		if err != nil {
			return fmt.Errorf("send request: %w", err)
		}
		break
	}
	for {
		if err := ctx.Err(); err != nil {
			return err
		}
		n, err := c.read()
		switch {
		case err == unix.EINTR:
			continue
		case err == unix.EAGAIN:
			return fmt.Errorf("no answer in time: %w", err)
		case err != nil:
			return err
		case n == 0:
			return fmt.Errorf("sock_diag socket closed")
		}
		done, err := c.parse(c.buf[:n], fn)
		if done || err != nil {
			return err
		}
	}
}

// putExcludeFilter writes into b an INET_DIAG_REQ_BYTECODE attribute
// (excludeFilterLen bytes) that rejects sockets whose local port is one of
// ports. Each port is three ops (struct inet_diag_bc_op: code, a one-byte
// "yes" jump, a two-byte "no" jump): an INET_DIAG_BC_S_EQ test whose
// second op holds the port, jumping to the third when equal and over it
// when not; the third, INET_DIAG_BC_JMP, always takes its "no" jump, 4
// bytes past the end of the filter, which is how the kernel rejects. A
// socket that runs off the end is kept. The reject cannot be the test's
// own "yes" jump: one byte does not reach past a filter of more than ~20
// ports. The kernel's audit walks the "yes" jumps, so the JMP's points at
// the next test.
func putExcludeFilter(b []byte, ports []uint16) {
	code := excludeFilterLen(len(ports)) - unix.SizeofRtAttr
	binary.NativeEndian.PutUint16(b[0:2], uint16(unix.SizeofRtAttr+code))
	binary.NativeEndian.PutUint16(b[2:4], inetDiagReqBC)
	ops := b[unix.SizeofRtAttr:]
	for i, p := range ports {
		op := ops[12*i:]
		op[0], op[1] = inetDiagBCSEq, 8 // equal: to the JMP
		binary.NativeEndian.PutUint16(op[2:4], 12)
		binary.NativeEndian.PutUint16(op[6:8], p) // the port op: code, yes 0, no = the port
		left := code - 12*i - 8                   // bytes from the JMP to the end
		op[8], op[9] = inetDiagBCJmp, 4
		binary.NativeEndian.PutUint16(op[10:12], uint16(left+4))
	}
}

// excludeFilterLen is the size of putExcludeFilter's attribute.
func excludeFilterLen(ports int) int { return unix.SizeofRtAttr + 12*ports }

// parse walks the netlink messages of one read. done reports the end of
// the answer (NLMSG_DONE, an error, or the callback's stop). Messages of
// another sequence number (a stale answer) are skipped.
func (c *Conn) parse(b []byte, fn func(*Socket) bool) (done bool, err error) {
	for len(b) >= unix.NLMSG_HDRLEN {
		l := int(binary.NativeEndian.Uint32(b[0:4]))
		if l < unix.NLMSG_HDRLEN || l > len(b) {
			return true, fmt.Errorf("netlink message of %d bytes in a read of %d", l, len(b))
		}
		typ := binary.NativeEndian.Uint16(b[4:6])
		flags := binary.NativeEndian.Uint16(b[6:8])
		mseq := binary.NativeEndian.Uint32(b[8:12])
		m := b[unix.NLMSG_HDRLEN:l]
		b = b[min(nlAlign(l), len(b)):]
		if mseq != c.seq {
			continue
		}
		if flags&nlmFDumpIntr != 0 {
			c.intr = true
		}
		switch typ {
		case unix.NLMSG_DONE:
			if len(m) >= 4 {
				if e := int32(binary.NativeEndian.Uint32(m)); e < 0 {
					return true, unix.Errno(-e)
				}
			}
			return true, nil
		case unix.NLMSG_ERROR:
			if len(m) < 4 {
				return true, fmt.Errorf("short netlink error message")
			}
			if e := int32(binary.NativeEndian.Uint32(m)); e < 0 {
				return true, unix.Errno(-e)
			}
		case unix.SOCK_DIAG_BY_FAMILY, tcpDiagGetSock: // v2 and v1 answers
			if !decode(&c.sock, m) {
				continue // not a socket; the kernel does not send these
			}
			c.count++
			if !fn(&c.sock) {
				c.stop = true
				return true, nil
			}
		}
	}
	return false, nil
}

// decode fills s from an inet_diag_msg and its attributes, in place.
func decode(s *Socket, m []byte) bool {
	if len(m) < inetDiagMsgLen {
		return false
	}
	s.Family, s.State = m[0], m[1]
	s.LocalPort = binary.BigEndian.Uint16(m[4:6])
	s.RemotePort = binary.BigEndian.Uint16(m[6:8])
	switch s.Family {
	case unix.AF_INET:
		s.Local = [16]byte{10: 0xff, 11: 0xff}
		copy(s.Local[12:], m[8:12])
		s.Remote = [16]byte{10: 0xff, 11: 0xff}
		copy(s.Remote[12:], m[24:28])
	case unix.AF_INET6:
		copy(s.Local[:], m[8:24])
		copy(s.Remote[:], m[24:40])
	default:
		return false
	}
	s.Cookie = binary.NativeEndian.Uint64(m[44:52])
	s.RQueue = binary.NativeEndian.Uint32(m[56:60])
	s.WQueue = binary.NativeEndian.Uint32(m[60:64])
	s.UID = binary.NativeEndian.Uint32(m[64:68])
	s.Inode = binary.NativeEndian.Uint32(m[68:72])
	s.Info = nil
	if len(m) > inetDiagMsgLen && s.State != Listen {
		s.Info = tcpInfoAttr(m[inetDiagMsgLen:])
	}
	return true
}

// tcpInfoAttr finds the struct tcp_info among a message's attributes, or
// returns nil (time-wait and request sockets carry none).
func tcpInfoAttr(b []byte) []byte {
	for len(b) >= unix.SizeofRtAttr {
		l := int(binary.NativeEndian.Uint16(b[0:2]))
		typ := binary.NativeEndian.Uint16(b[2:4]) & nlaTypeMask
		if l < unix.SizeofRtAttr || l > len(b) {
			return nil
		}
		if typ == inetDiagInfo {
			if v := b[unix.SizeofRtAttr:l]; len(v) >= tcpInfoMinLen {
				return v
			}
			return nil
		}
		b = b[min(nlAlign(l), len(b)):]
	}
	return nil
}

func nlAlign(n int) int { return (n + unix.NLMSG_ALIGNTO - 1) &^ (unix.NLMSG_ALIGNTO - 1) }

// read returns the next part of a dump's answer. The kernel writes each
// part while it is read (netlink_dump runs in recvmsg), so a read is
// kernel work of up to a millisecond or two, not a wait: it is made
// without telling the Go scheduler (a raw, non-blocking recvfrom). Made
// as an ordinary system call, each read woke the runtime's sysmon, which
// took the P away from the read and polled every 20 us for a while after
// it. Only when nothing is queued (not seen in a dump) does it wait, with
// SO_RCVTIMEO, as an ordinary blocking read.
func (c *Conn) read() (int, error) {
	n, _, e := unix.RawSyscall6(unix.SYS_RECVFROM, uintptr(c.fd), uintptr(unsafe.Pointer(unsafe.SliceData(c.buf))), uintptr(len(c.buf)), unix.MSG_DONTWAIT, 0, 0)
	if e == 0 {
		return int(n), nil
	}
	if e != unix.EAGAIN {
		return 0, e
	}
	return unix.Read(c.fd, c.buf)
}
