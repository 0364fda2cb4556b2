package testenv

import (
	"encoding/binary"
	"fmt"
	"math/rand/v2"
	"net"
	"runtime"
	"testing"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

// SYNFlood sends n SYNs to port of the process pid's network namespace,
// from `sources` distinct spoofed addresses of 192.0.2.0/24 (TEST-NET-1),
// whose handshakes can never complete: what a SYN flood is.
//
// It makes a flooder network namespace joined to the target's by a veth
// pair (10.9.0.2 <-> 10.9.0.1), routes 192.0.2.0/24 back through it, and
// sends hand-built SYNs on a raw socket. The flooder namespace forwards
// nothing, so the SYN-ACKs die there and the target's half-open
// connections stay in SYN_RECV. The target must listen on 0.0.0.0 and
// accept traffic from a martian-looking source: rp_filter is turned off
// in its namespace. Needs root.
func SYNFlood(t testing.TB, pid, port, n, sources int) {
	t.Helper()
	if sources < 1 || sources > 254 {
		t.Fatalf("testenv: SYNFlood: sources must be 1..254, got %d", sources)
	}
	errc := make(chan error, 1)
	done := make(chan struct{})
	t.Cleanup(func() { close(done) })
	go func() {
		// This thread moves to a new namespace and is never unlocked, so
		// the runtime retires it with the goroutine and no other goroutine
		// runs in the flooder namespace. It stays until the test ends: the
		// namespace (and the veth, and the route back) lives as long as
		// its thread, and a flood's sources do not vanish once they sent
		// (without the route, the half-open connections die at their
		// first SYN-ACK retransmit, a second later).
		runtime.LockOSThread()
		errc <- flood(pid, port, n, sources)
		<-done
	}()
	if err := <-errc; err != nil {
		t.Fatalf("testenv: SYN flood: %v", err)
	}
}

func flood(pid, port, n, sources int) error {
	target, err := netns.GetFromPid(pid)
	if err != nil {
		return fmt.Errorf("target netns: %w", err)
	}
	defer target.Close()
	th, err := netlink.NewHandleAt(target)
	if err != nil {
		return fmt.Errorf("netlink in the target netns: %w", err)
	}
	defer th.Close()
	if err := unix.Unshare(unix.CLONE_NEWNET); err != nil {
		return fmt.Errorf("new netns (needs root): %w", err)
	}
	veth := &netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: "flood0"}, PeerName: "flood1"}
	if err := netlink.LinkAdd(veth); err != nil {
		return fmt.Errorf("veth: %w", err)
	}
	peer, err := netlink.LinkByName("flood1")
	if err != nil {
		return err
	}
	if err := netlink.LinkSetNsFd(peer, int(target)); err != nil {
		return fmt.Errorf("move veth end: %w", err)
	}
	local, err := netlink.LinkByName("flood0")
	if err != nil {
		return err
	}
	if err := setUp(netlink.AddrAdd, netlink.LinkSetUp, local, "10.9.0.2/24"); err != nil {
		return err
	}
	remote, err := th.LinkByName("flood1")
	if err != nil {
		return err
	}
	if err := setUp(th.AddrAdd, th.LinkSetUp, remote, "10.9.0.1/24"); err != nil {
		return err
	}
	_, spoofed, _ := net.ParseCIDR("192.0.2.0/24")
	if err := th.RouteAdd(&netlink.Route{Dst: spoofed, Gw: net.IPv4(10, 9, 0, 2)}); err != nil {
		return fmt.Errorf("route back: %w", err)
	}
	fd, err := unix.Socket(unix.AF_INET, unix.SOCK_RAW, unix.IPPROTO_RAW)
	if err != nil {
		return fmt.Errorf("raw socket: %w", err)
	}
	defer unix.Close(fd)
	dst := [4]byte{10, 9, 0, 1}
	for i := range n {
		src := [4]byte{192, 0, 2, byte(1 + i%sources)}
		pkt := synPacket(src, dst, uint16(1024+rand.IntN(60000)), uint16(port))
		if err := unix.Sendto(fd, pkt, 0, &unix.SockaddrInet4{Addr: dst}); err != nil {
			return fmt.Errorf("send SYN %d: %w", i, err)
		}
	}
	return nil
}

func setUp(addrAdd func(netlink.Link, *netlink.Addr) error, linkUp func(netlink.Link) error, l netlink.Link, cidr string) error {
	a, err := netlink.ParseAddr(cidr)
	if err != nil {
		return err
	}
	if err := addrAdd(l, a); err != nil {
		return fmt.Errorf("address %s on %s: %w", cidr, l.Attrs().Name, err)
	}
	if err := linkUp(l); err != nil {
		return fmt.Errorf("%s up: %w", l.Attrs().Name, err)
	}
	return nil
}

// synPacket builds an IPv4 TCP SYN. The kernel fills in the IP checksum
// and ID of a raw IPPROTO_RAW packet; the TCP checksum is ours.
func synPacket(src, dst [4]byte, sport, dport uint16) []byte {
	p := make([]byte, 40)
	p[0] = 0x45 // IPv4, 20-byte header
	binary.BigEndian.PutUint16(p[2:], 40)
	p[8] = 64 // TTL
	p[9] = unix.IPPROTO_TCP
	copy(p[12:16], src[:])
	copy(p[16:20], dst[:])
	tcp := p[20:]
	binary.BigEndian.PutUint16(tcp[0:], sport)
	binary.BigEndian.PutUint16(tcp[2:], dport)
	binary.BigEndian.PutUint32(tcp[4:], rand.Uint32())
	tcp[12] = 5 << 4 // data offset
	tcp[13] = 0x02   // SYN
	binary.BigEndian.PutUint16(tcp[14:], 64240)
	// Checksum over the pseudo-header and the TCP header.
	var sum uint32
	pseudo := append(append(append([]byte{}, src[:]...), dst[:]...), 0, unix.IPPROTO_TCP, 0, 20)
	for _, b := range [][]byte{pseudo, tcp} {
		for i := 0; i+1 < len(b); i += 2 {
			sum += uint32(binary.BigEndian.Uint16(b[i:]))
		}
	}
	for sum>>16 != 0 {
		sum = sum&0xffff + sum>>16
	}
	binary.BigEndian.PutUint16(tcp[16:], ^uint16(sum))
	return p
}
