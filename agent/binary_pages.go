package main

import (
	"bytes"
	"context"
	"fmt"
	"log/slog"
	"os"
	"reflect"
	"strconv"
	"time"

	"golang.org/x/sys/unix"
)

// The agent's own binary is most of its resident memory: measured beside a
// quiet target, 22 of 35 MiB were file pages of its 24 MB executable, 96%
// of its code and read-only data. The process does not use that much: the
// start (package inits, the BTF and ELF parsing that loads the probes,
// config, the first symbolization) runs code it never runs again, and the
// kernel maps 64 KiB around every page touched (fault-around), so a few
// touches map most of the file. Unmapped once the start is over, the pages
// that come back are the ones the steady state runs: 12-13 MiB (measured
// after MADV_PAGEOUT). So the read-only mappings of the executable are
// dropped from the page tables (MADV_DONTNEED) binaryPagesAfter the start,
// and again every binaryPagesEvery for what a rare path (a profile request,
// a finding) touched. The pages stay in the page cache, shared and
// reclaimable; a page used again costs a minor fault (all of them together
// a few milliseconds of CPU). Writable mappings (.data, .bss) are never
// touched: their pages hold the program's state.
const (
	binaryPagesAfter = 30 * time.Second
	binaryPagesEvery = 10 * time.Minute
)

// releaseBinaryPages drops the executable's read-only pages from the page
// tables after binaryPagesAfter, then every binaryPagesEvery, until ctx
// ends.
func releaseBinaryPages(ctx context.Context, log *slog.Logger) {
	t := time.NewTimer(binaryPagesAfter)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		n, err := dropBinaryPages("/proc/self")
		if err != nil {
			log.Debug("could not release the binary's pages", "err", err)
		} else {
			log.Debug("released the binary's pages", "bytes", n)
		}
		t.Reset(binaryPagesEvery)
	}
}

// dropBinaryPages applies MADV_DONTNEED to the read-only mappings of the
// process's executable (procSelf is /proc/self) and returns their size.
func dropBinaryPages(procSelf string) (int, error) {
	b, err := os.ReadFile(procSelf + "/maps")
	if err != nil {
		return 0, fmt.Errorf("read %s/maps: %w", procSelf, err)
	}
	// The executable is the file mapped where this function's code is:
	// found by address, not by the inode stat gives, which overlayfs (a
	// container's root) reports differently from maps.
	pc := uint64(reflect.ValueOf(dropBinaryPages).Pointer())
	ranges := readOnlyMappings(b, pc)
	if len(ranges) == 0 {
		return 0, fmt.Errorf("no read-only mapping of the executable at %#x in %s/maps", pc, procSelf)
	}
	total := 0
	for _, r := range ranges {
		// A raw madvise: the range is the process's own code, which no
		// Go slice describes.
		if _, _, e := unix.Syscall(unix.SYS_MADVISE, uintptr(r[0]), uintptr(r[1]-r[0]), unix.MADV_DONTNEED); e != 0 {
			return total, fmt.Errorf("madvise %#x-%#x: %w", r[0], r[1], e)
		}
		total += int(r[1] - r[0])
	}
	return total, nil
}

// mapsLine is one line of a maps file: its range, whether it is writable,
// and the file it maps (device, inode and path as the line has them).
type mapsLine struct {
	start, end uint64
	writable   bool
	file       string
}

func parseMapsLine(l []byte) (mapsLine, bool) {
	// start-end perms offset dev inode path
	f := bytes.Fields(l)
	if len(f) < 6 || len(f[1]) < 4 {
		return mapsLine{}, false
	}
	lo, hi, ok := bytes.Cut(f[0], []byte{'-'})
	if !ok {
		return mapsLine{}, false
	}
	start, err1 := strconv.ParseUint(string(lo), 16, 64)
	end, err2 := strconv.ParseUint(string(hi), 16, 64)
	if err1 != nil || err2 != nil || end <= start || string(f[4]) == "0" {
		return mapsLine{}, false
	}
	return mapsLine{start: start, end: end, writable: f[1][1] == 'w', file: string(bytes.Join(f[3:], []byte{' '}))}, true
}

// readOnlyMappings returns the start and end of every mapping of a maps
// file that is not writable and maps the file mapped at pc.
func readOnlyMappings(maps []byte, pc uint64) [][2]uint64 {
	var lines []mapsLine
	exe := ""
	for l := range bytes.Lines(maps) {
		m, ok := parseMapsLine(l)
		if !ok {
			continue
		}
		if m.start <= pc && pc < m.end {
			exe = m.file
		}
		lines = append(lines, m)
	}
	var out [][2]uint64
	for _, m := range lines {
		if exe != "" && m.file == exe && !m.writable {
			out = append(out, [2]uint64{m.start, m.end})
		}
	}
	return out
}
