package readbuf

import (
	"bytes"
	"errors"
	"os"
	"path/filepath"
	"testing"
)

// A /proc file reports size 0 yet has content; a buffer is reused, grown
// only when the file outgrows it, and a file kept open reads fresh.
func TestReadsProcFilesWholeIntoOneBuffer(t *testing.T) {
	var buf []byte
	b, err := File("/proc/self/status", &buf)
	if err != nil || !bytes.Contains(b, []byte("VmRSS:")) {
		t.Fatalf("File(/proc/self/status) = %q, %v", b, err)
	}
	before := cap(buf)
	if _, err := File("/proc/self/status", &buf); err != nil || cap(buf) != before {
		t.Errorf("second read: cap %d -> %d, err %v: the buffer was not reused", before, cap(buf), err)
	}
	if n := testing.AllocsPerRun(10, func() { _, _ = File("/proc/self/stat", &buf) }); n > 4 {
		t.Errorf("File allocates %.0f times a read, want only the open's", n)
	}

	p := filepath.Join(t.TempDir(), "f")
	if err := os.WriteFile(p, []byte("one"), 0o600); err != nil {
		t.Fatal(err)
	}
	f, err := os.Open(p)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if b, err := ReadAt(f, &buf); err != nil || string(b) != "one" {
		t.Fatalf("ReadAt = %q, %v", b, err)
	}
	if err := os.WriteFile(p, []byte("two, longer"), 0o600); err != nil {
		t.Fatal(err)
	}
	if b, err := ReadAt(f, &buf); err != nil || string(b) != "two, longer" {
		t.Errorf("ReadAt of the kept file after a change = %q, %v", b, err)
	}
	if _, err := File(filepath.Join(t.TempDir(), "missing"), &buf); err == nil || !errors.Is(err, os.ErrNotExist) {
		t.Errorf("File of a missing path: %v, want a wrapped not-exist error", err)
	}
}
