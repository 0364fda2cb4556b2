package main

import (
	"os"
	"testing"
)

func TestReadOnlyMappings(t *testing.T) {
	maps := `00400000-00e44000 r-xp 00000000 fd:01 1234 /bin/culprit
00e44000-019af000 r--p 00a44000 fd:01 1234 /bin/culprit
019af000-01ab2000 rw-p 015af000 fd:01 1234 /bin/culprit
01ab2000-01b00000 rw-p 00000000 00:00 0
7f0000000000-7f0000001000 r--p 00000000 fd:02 1234 /other/device/same/inode
7f0000002000-7f0000003000 r-xp 00000000 fd:01 99 /lib/libc.so
7f0000004000-7f0000005000 r--p 00000000 fd:01 77 /bin/culprit (deleted)
`
	got := readOnlyMappings([]byte(maps), 0x401234)
	want := [][2]uint64{{0x400000, 0xe44000}, {0xe44000, 0x19af000}}
	if len(got) != len(want) || got[0] != want[0] || got[1] != want[1] {
		t.Fatalf("readOnlyMappings = %x, want %x", got, want)
	}
	if got := readOnlyMappings([]byte(maps), 0x1ab3000); len(got) != 0 {
		t.Errorf("pc in anonymous memory: %x, want nothing", got)
	}
}

// TestDropBinaryPages: the test binary's own code and read-only data are
// dropped from its page tables (RssFile falls), and it keeps running.
func TestDropBinaryPages(t *testing.T) {
	before := procStatus(os.Getpid())["RssFile"]
	n, err := dropBinaryPages("/proc/self")
	if err != nil {
		t.Fatal(err)
	}
	after := procStatus(os.Getpid())["RssFile"]
	if n == 0 {
		t.Fatal("no read-only mapping of the executable found")
	}
	if after >= before {
		t.Errorf("RssFile %d kB before, %d kB after dropping %d bytes", before>>10, after>>10, n)
	}
	t.Logf("dropped %d MiB of mappings: RssFile %.1f -> %.1f MiB", n>>20, mib(before), mib(after))
}
