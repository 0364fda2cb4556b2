// Command capture writes the heap profile fixtures heap-1.pb.gz and
// heap-2.pb.gz next to this directory: two profiles of one process taken
// after a GC each, between which a map-backed cache and a slice of records
// grew and a transient buffer was freed. Run from the repository root:
//
//	go run ./collectors/testdata/pprof/capture collectors/testdata/pprof
//
// The fixtures are real runtime/pprof output (gzip-compressed protobuf,
// sampled at the default MemProfileRate), as net/http/pprof serves it.
package main

import (
	"fmt"
	"os"
	"path/filepath"
	"runtime"
	"runtime/pprof"
)

var (
	cache     = map[int][]byte{}
	records   [][]byte
	transient [][]byte
)

// leakIntoCache keeps n 4 KiB values in a map that is never pruned. The
// value and the map's own growth are allocated on different lines, so the
// fixture has both a slice site and a site reached through
// internal/runtime/maps.
//
//go:noinline
func leakIntoCache(n int) {
	for i := 0; i < n; i++ {
		v := make([]byte, 4096)
		cache[len(cache)] = v
	}
}

// appendRecords keeps n 64 KiB records.
//
//go:noinline
func appendRecords(n int) {
	for i := 0; i < n; i++ {
		records = append(records, make([]byte, 64<<10))
	}
}

// allocTransient holds n 64 KiB buffers until freeTransient.
//
//go:noinline
func allocTransient(n int) {
	for i := 0; i < n; i++ {
		transient = append(transient, make([]byte, 64<<10))
	}
}

func write(dir, name string) error {
	runtime.GC() // the heap profile is as of the last completed GC
	f, err := os.Create(filepath.Join(dir, name))
	if err != nil {
		return err
	}
	if err := pprof.Lookup("heap").WriteTo(f, 0); err != nil {
		f.Close()
		return err
	}
	return f.Close()
}

func main() {
	dir := "."
	if len(os.Args) > 1 {
		dir = os.Args[1]
	}
	leakIntoCache(2048) // 8 MiB
	appendRecords(64)   // 4 MiB
	allocTransient(96)  // 6 MiB
	if err := write(dir, "heap-1.pb.gz"); err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	leakIntoCache(4096) // +16 MiB
	appendRecords(128)  // +8 MiB
	transient = nil     // -6 MiB
	if err := write(dir, "heap-2.pb.gz"); err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
}
