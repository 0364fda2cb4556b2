package workload

import (
	"io"
	"net"
	"os"
	"os/exec"
	"strconv"
	"testing"
	"time"

	"github.com/culprit-dev/culprit/internal/testenv"
)

// socketInode is the inode of a connection or listener's socket.
func socketInode(t *testing.T, f *os.File) uint32 {
	t.Helper()
	return testenv.FDInode(t, "/proc/self/fd/"+strconv.Itoa(int(f.Fd())))
}

// holder starts a process that holds files (a sleep given them as extra
// descriptors) and returns it.
func holder(t *testing.T, files ...*os.File) *exec.Cmd {
	t.Helper()
	cmd := exec.Command("sleep", "300")
	cmd.ExtraFiles = files
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	return cmd
}

// ownersOfHolder is a SocketOwners (real /proc) whose target is a holder
// that holds nothing.
func ownersOfHolder(t *testing.T, o SocketOwnersOptions) *SocketOwners {
	t.Helper()
	cmd := holder(t)
	res, err := NewResolver("/proc")
	if err != nil {
		t.Fatal(err)
	}
	tgt, err := res.Resolve(Selector{PID: cmd.Process.Pid})
	if err != nil {
		t.Fatal(err)
	}
	owners := NewSocketOwners("/proc", o)
	owners.SetTarget(tgt)
	return owners
}

// Sockets held by the target, by a neighbour and by the agent itself are
// told apart by reading fd tables; an inode nobody holds is remembered as
// unknown, and looked for again only after OthersRescan.
func TestSocketOwners(t *testing.T) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	files := func() *os.File {
		f, err := l.(*net.TCPListener).File()
		if err != nil {
			t.Fatal(err)
		}
		return f
	}
	tf, nf := files(), files()
	sharedIno := socketInode(t, tf)
	// Three more listeners, one each: the target's, the neighbour's, ours.
	mk := func() (*os.File, uint32) {
		ll, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		f, err := ll.(*net.TCPListener).File()
		if err != nil {
			t.Fatal(err)
		}
		ll.Close()
		return f, socketInode(t, f)
	}
	tgtF, tgtIno := mk()
	nbF, nbIno := mk()
	ownF, ownIno := mk()
	defer ownF.Close()
	tgtCmd := holder(t, tgtF, tf)
	nbCmd := holder(t, nbF, nf)
	tgtF.Close()
	nbF.Close()
	tf.Close()
	nf.Close()

	res, err := NewResolver("/proc")
	if err != nil {
		t.Fatal(err)
	}
	var tgt Process
	for i := 0; i < 50; i++ {
		if tgt, err = res.Resolve(Selector{PID: tgtCmd.Process.Pid}); err == nil && tgt.Comm == "sleep" {
			break
		}
		time.Sleep(20 * time.Millisecond)
	}
	o := NewSocketOwners("/proc", SocketOwnersOptions{OthersRescan: time.Hour})
	o.SetTarget(tgt)
	if _, ok := o.Owner(tgtIno); ok {
		t.Fatal("known before any scan")
	}
	now := time.Now()
	if n := o.Refresh(now, []uint32{tgtIno, nbIno, ownIno, 1}); n == 0 {
		t.Fatal("Refresh read no fd table")
	}
	for _, tc := range []struct {
		ino  uint32
		role Role
		pid  int
	}{
		{tgtIno, RoleTarget, tgtCmd.Process.Pid},
		{nbIno, RoleOther, nbCmd.Process.Pid},
		{ownIno, RoleAgent, os.Getpid()},
		{1, RoleUnknown, 0}, // nobody holds inode 1 as a socket
	} {
		got, ok := o.Owner(tc.ino)
		if !ok || got.Role != tc.role || got.PID != tc.pid {
			t.Errorf("inode %d: %+v %v, want role %d pid %d", tc.ino, got, ok, tc.role, tc.pid)
		}
	}
	if got, _ := o.Owner(nbIno); got.Label() != "sleep" {
		t.Errorf("neighbour label %q, want its command name", got.Label())
	}
	// A listener the target, the neighbour and the agent all hold (l) is
	// the target's: its claim wins.
	o.Refresh(now, []uint32{sharedIno})
	if got, _ := o.Owner(sharedIno); got.Role != RoleTarget {
		t.Errorf("shared listener: %+v, want the target's", got)
	}
	// Unknown inodes do not cause a scan per cycle.
	if n := o.Refresh(now.Add(2*time.Second), []uint32{1}); n == 0 {
		// The target's table may be read again (its rescan is 1 s); the
		// others' must not be, which the count below shows.
		t.Log("no rescan")
	}
	before := o.Stats().FDsRead
	o.Refresh(now.Add(2500*time.Millisecond), []uint32{1})
	if after := o.Stats().FDsRead; after != before {
		t.Errorf("an inode known to be nobody's caused a rescan (%d -> %d fds read)", before, after)
	}
	if !o.IsTarget(tgtCmd.Process.Pid) || o.IsTarget(nbCmd.Process.Pid) {
		t.Errorf("IsTarget: group %v", o.Group())
	}
}

// TestSocketOwnersUnknownExpireTogether: inodes nobody visible holds,
// met at different times, are looked for again by one full scan per
// UnknownLife, not one scan each.
func TestSocketOwnersUnknownExpireTogether(t *testing.T) {
	o := ownersOfHolder(t, SocketOwnersOptions{OthersRescan: time.Millisecond, UnknownLife: time.Minute})
	t0 := time.Now()
	clock := t0
	o.now = func() time.Time { return clock }
	scans := func(at time.Duration, missing ...uint32) uint64 {
		clock = t0.Add(at)
		before := o.Stats().FDsRead
		o.Refresh(clock, missing)
		return o.Stats().FDsRead - before
	}
	// Inodes 1 and 2 are nobody's sockets; 2 is met 20 s after 1.
	if scans(0, 1) == 0 {
		t.Fatal("the first refresh read no fd table")
	}
	if scans(20*time.Second, 1, 2) == 0 {
		t.Fatal("a new unknown inode was not looked for")
	}
	// 1 would have expired at 60 s: the scan at 20 s looked for it too.
	if n := scans(65*time.Second, 1, 2); n != 0 {
		t.Errorf("an inode the last full scan looked for caused another (%d fds read)", n)
	}
	// Both expire at 80 s, together: one scan.
	if scans(81*time.Second, 1, 2) == 0 {
		t.Error("expired unknown inodes were not looked for again")
	}
	if n := scans(90*time.Second, 1, 2); n != 0 {
		t.Errorf("a second scan for inodes the last one looked for (%d fds read)", n)
	}
}

// A full scan of the other processes waits othersScanGap times as long as
// the last one took (however short OthersRescan is): beside a neighbour
// whose descriptors take long to read and a namespace whose connections
// churn, labels of others' sockets must not cost more than a sliver of a
// core. The target's own table is read every TargetRescan all the same.
func TestSocketOwnersOthersScanFollowsItsCost(t *testing.T) {
	o := ownersOfHolder(t, SocketOwnersOptions{OthersRescan: time.Millisecond, TargetRescan: time.Millisecond})
	t0 := time.Now()
	o.Refresh(t0, []uint32{1})
	if o.othersAt != t0 || o.othersTook <= 0 {
		t.Fatalf("the first refresh did no full scan (at %v, took %v)", o.othersAt, o.othersTook)
	}
	o.othersTook = 100 * time.Millisecond // as a scan of a large namespace takes
	before := o.Stats().FDsRead
	o.Refresh(t0.Add(5*time.Second), []uint32{2})
	if o.othersAt != t0 {
		t.Errorf("a full scan 5 s after one that took 100 ms (gap %v)", othersScanGap*100*time.Millisecond)
	}
	if o.Stats().FDsRead == before {
		t.Error("the target's table was not read again for a new inode")
	}
	at := t0.Add(othersScanGap*100*time.Millisecond + time.Second)
	o.Refresh(at, []uint32{3})
	if o.othersAt != at {
		t.Errorf("no full scan once the gap had passed")
	}
}

// A full scan does not read again the fd table of a process that holds as
// many descriptors as it did and made no read or write call since (a
// neighbour holding idle connections): its sockets keep their owner. A
// process that replaced a connection with another, at the same count of
// descriptors, and talked on it is read again, and its new socket found.
func TestSocketOwnersKeepsUnchangedTables(t *testing.T) {
	if _, err := exec.LookPath("bash"); err != nil {
		t.Skip("SKIP: no bash for the churning process (/dev/tcp)")
	}
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			go func() {
				b := make([]byte, 64)
				for {
					if _, err := c.Read(b); err != nil {
						c.Close()
						return
					}
				}
			}()
		}
	}()
	// The idle neighbour: 20 connections it holds and never uses.
	var files []*os.File
	for range 20 {
		c, err := net.Dial("tcp", l.Addr().String())
		if err != nil {
			t.Fatal(err)
		}
		f, err := c.(*net.TCPConn).File()
		c.Close()
		if err != nil {
			t.Fatal(err)
		}
		defer f.Close()
		files = append(files, f)
	}
	idleIno := socketInode(t, files[7])
	idle := holder(t, files...)
	for _, f := range files {
		f.Close() // the neighbour's alone now
	}
	// The churner: each line it reads, it replaces fd 5 with a new
	// connection and writes on it.
	port := strconv.Itoa(l.Addr().(*net.TCPAddr).Port)
	churn := exec.Command("bash", "-c", `while read -r _; do exec 5<>/dev/tcp/127.0.0.1/`+port+`; echo x >&5; echo ok; done`)
	in, err := churn.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	out, err := churn.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := churn.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { churn.Process.Kill(); churn.Wait() })
	answers := make([]byte, 3)
	reconnect := func() uint32 {
		t.Helper()
		if _, err := in.Write([]byte("\n")); err != nil {
			t.Fatal(err)
		}
		if _, err := io.ReadFull(out, answers); err != nil || string(answers) != "ok\n" {
			t.Fatalf("churner: %q %v", answers, err)
		}
		return testenv.FDInode(t, "/proc/"+strconv.Itoa(churn.Process.Pid)+"/fd/5")
	}
	first := reconnect()

	o := ownersOfHolder(t, SocketOwnersOptions{OthersRescan: time.Millisecond, TargetRescan: time.Millisecond})
	t0 := time.Now()
	o.Refresh(t0, []uint32{first})
	if got, ok := o.Owner(first); !ok || got.PID != churn.Process.Pid {
		t.Fatalf("the churner's first connection: owner %+v %v", got, ok)
	}
	second := reconnect()
	if second == first {
		t.Fatal("the churner kept its connection")
	}
	kept := o.Stats().TablesKept
	o.othersTook = 0
	o.Refresh(t0.Add(time.Second), []uint32{second})
	if got, ok := o.Owner(second); !ok || got.PID != churn.Process.Pid {
		t.Errorf("the churner's new connection, same count of descriptors: owner %+v %v, want pid %d", got, ok, churn.Process.Pid)
	}
	if o.Stats().TablesKept == kept {
		t.Error("no table kept: the idle neighbour's was read again")
	}
	if got, ok := o.Owner(idleIno); !ok || got.PID != idle.Process.Pid {
		t.Errorf("the idle neighbour's socket from its kept table: owner %+v %v, want pid %d", got, ok, idle.Process.Pid)
	}
}
