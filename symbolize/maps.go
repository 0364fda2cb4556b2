package symbolize

import (
	"bytes"
	"slices"
	"strconv"
	"strings"
)

// mapping is one executable region of /proc/PID/maps. Only executable
// regions are kept because stack addresses can only point into code.
type mapping struct {
	Start, End uint64 // [Start, End) in the process's address space
	Offset     uint64 // file offset mapped at Start
	Inode      uint64
	Path       string // without the " (deleted)" suffix; "" for anonymous memory
	Deleted    bool
}

const deletedSuffix = " (deleted)"

// parseMaps parses the text of /proc/PID/maps. Malformed lines are skipped
// rather than failing the whole file: a partially understood address space
// still symbolizes most frames. The result is sorted by Start.
func parseMaps(data []byte) []mapping {
	var out []mapping
	for len(data) > 0 {
		var line []byte
		if i := bytes.IndexByte(data, '\n'); i >= 0 {
			line, data = data[:i], data[i+1:]
		} else {
			line, data = data, nil
		}
		// Most lines are data (a python process maps ~250 regions, ~30
		// of them code): they are left as bytes rather than each made a
		// string to be parsed and dropped.
		if !executableLine(line) {
			continue
		}
		if m, ok := parseMapsLine(string(line)); ok {
			out = append(out, m)
		}
	}
	slices.SortFunc(out, func(a, b mapping) int {
		switch {
		case a.Start < b.Start:
			return -1
		case a.Start > b.Start:
			return 1
		}
		return 0
	})
	return out
}

// executableLine reports whether the perms field (the second) of a maps
// line says executable; parseMapsLine checks the rest.
func executableLine(line []byte) bool {
	i := 0
	for i < len(line) && (line[i] == ' ' || line[i] == '\t') {
		i++
	}
	for i < len(line) && line[i] != ' ' && line[i] != '\t' {
		i++
	}
	for i < len(line) && (line[i] == ' ' || line[i] == '\t') {
		i++
	}
	return i+2 < len(line) && line[i+2] == 'x'
}

// parseMapsLine parses "start-end perms offset dev inode [path]" and reports
// false for malformed or non-executable lines.
func parseMapsLine(line string) (mapping, bool) {
	var m mapping
	rng, rest, ok := nextField(line)
	if !ok {
		return m, false
	}
	perms, rest, ok := nextField(rest)
	if !ok || len(perms) != 4 || perms[2] != 'x' {
		return m, false
	}
	off, rest, ok := nextField(rest)
	if !ok {
		return m, false
	}
	dev, rest, ok := nextField(rest)
	if !ok || !strings.Contains(dev, ":") {
		return m, false
	}
	ino, rest, ok := nextField(rest)
	if !ok {
		return m, false
	}
	lo, hi, ok := strings.Cut(rng, "-")
	if !ok {
		return m, false
	}
	var err error
	if m.Start, err = strconv.ParseUint(lo, 16, 64); err != nil {
		return m, false
	}
	if m.End, err = strconv.ParseUint(hi, 16, 64); err != nil || m.End <= m.Start {
		return m, false
	}
	if m.Offset, err = strconv.ParseUint(off, 16, 64); err != nil {
		return m, false
	}
	if m.Inode, err = strconv.ParseUint(ino, 10, 64); err != nil {
		return m, false
	}
	// The path is the rest of the line and may itself contain spaces.
	path := strings.TrimSpace(rest)
	if p, ok := strings.CutSuffix(path, deletedSuffix); ok && !isPseudoPath(p) {
		path, m.Deleted = p, true
	}
	m.Path = path
	return m, true
}

// nextField returns the first space-separated field of s and the remainder.
func nextField(s string) (field, rest string, ok bool) {
	s = strings.TrimLeft(s, " \t")
	if s == "" {
		return "", "", false
	}
	i := strings.IndexAny(s, " \t")
	if i < 0 {
		return s, "", true
	}
	return s[:i], s[i:], true
}

// isPseudoPath reports names such as [vdso], [vsyscall] or [anon:x] that
// are not files.
func isPseudoPath(p string) bool {
	return strings.HasPrefix(p, "[") && strings.HasSuffix(p, "]")
}

// findMapping returns the index of the mapping containing addr, or -1.
func findMapping(maps []mapping, addr uint64) int {
	i, _ := slices.BinarySearchFunc(maps, addr, func(m mapping, a uint64) int {
		switch {
		case m.End <= a:
			return -1
		case m.Start > a:
			return 1
		}
		return 0
	})
	if i < len(maps) && maps[i].Start <= addr && addr < maps[i].End {
		return i
	}
	return -1
}

// isFileBacked reports whether m maps a file that may have symbols: not
// anonymous memory and not a pseudo path, except the vDSO, which the
// symbolizer reads from its own process.
func isFileBacked(m mapping) bool {
	return m.Path == "[vdso]" || (m.Path != "" && !isPseudoPath(m.Path))
}
