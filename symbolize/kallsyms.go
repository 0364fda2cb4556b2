package symbolize

import (
	"bufio"
	"fmt"
	"io"
	"slices"
	"strconv"
	"strings"
)

// kallsyms holds the kernel's text symbols sorted by address. Names live in
// one string because a kernel has well over 100k symbols and one allocation
// per name would dominate the load time.
type kallsyms struct {
	addrs []uint64
	ends  []uint32 // names[ends[i-1]:ends[i]] is the name of addrs[i]
	names string
}

// parseKallsyms parses "addr type name [module]" lines. Only text symbols are
// kept. It reports ok=false when every address is zero, which is what an
// unprivileged reader (kptr_restrict) sees: names without addresses cannot
// symbolize anything.
func parseKallsyms(r io.Reader) (ks *kallsyms, ok bool, err error) {
	type entry struct {
		addr      uint64
		global    bool
		off, size uint32 // of the name in raw
	}
	var (
		entries []entry
		raw     []byte
		nonZero bool
	)
	// ReadSlice avoids a string per line: the file has over 100k of them.
	br := bufio.NewReaderSize(r, 256<<10)
	for {
		line, err := br.ReadSlice('\n')
		for err == bufio.ErrBufferFull {
			// No real line is that long; skip the rest of it.
			line = nil
			_, err = br.ReadSlice('\n')
		}
		if len(line) > 0 {
			if addr, global, name, ok := parseKallsymsLine(line); ok {
				nonZero = nonZero || addr != 0
				entries = append(entries, entry{addr: addr, global: global, off: uint32(len(raw)), size: uint32(len(name))})
				raw = append(raw, name...)
			}
		}
		if err == io.EOF {
			break
		}
		if err != nil {
			return nil, false, fmt.Errorf("read kallsyms: %w", err)
		}
	}
	if !nonZero {
		return nil, false, nil
	}
	// Among aliases at one address prefer the global symbol.
	slices.SortStableFunc(entries, func(a, b entry) int {
		switch {
		case a.addr < b.addr:
			return -1
		case a.addr > b.addr:
			return 1
		case a.global && !b.global:
			return -1
		case !a.global && b.global:
			return 1
		}
		return 0
	})
	entries = slices.CompactFunc(entries, func(a, b entry) bool { return a.addr == b.addr })

	ks = &kallsyms{addrs: make([]uint64, len(entries)), ends: make([]uint32, len(entries))}
	var sb strings.Builder
	sb.Grow(len(raw))
	for i, e := range entries {
		ks.addrs[i] = e.addr
		sb.Write(raw[e.off : e.off+e.size])
		ks.ends[i] = uint32(sb.Len())
	}
	ks.names = sb.String()
	return ks, true, nil
}

// parseKallsymsLine returns the address, globalness and name of a text
// symbol line.
func parseKallsymsLine(line []byte) (addr uint64, global bool, name []byte, ok bool) {
	a, rest := nextByteField(line)
	t, rest := nextByteField(rest)
	name, _ = nextByteField(rest)
	if len(a) == 0 || len(t) != 1 || len(name) == 0 {
		return 0, false, nil, false
	}
	switch t[0] {
	case 'T', 'W':
		global = true
	case 't', 'w':
	default:
		return 0, false, nil, false
	}
	addr, err := strconv.ParseUint(string(a), 16, 64) // does not allocate
	if err != nil {
		return 0, false, nil, false
	}
	return addr, global, name, true
}

// nextByteField is nextField for bytes, splitting on any ASCII white space.
func nextByteField(b []byte) (field, rest []byte) {
	i := 0
	for i < len(b) && isSpace(b[i]) {
		i++
	}
	j := i
	for j < len(b) && !isSpace(b[j]) {
		j++
	}
	return b[i:j], b[j:]
}

func isSpace(c byte) bool { return c == ' ' || c == '\t' || c == '\n' || c == '\r' }

// lookup returns the symbol at or below addr. kallsyms has no sizes, so the
// nearest lower symbol is the best available answer.
func (k *kallsyms) lookup(addr uint64) (string, bool) {
	if k == nil || len(k.addrs) == 0 {
		return "", false
	}
	i, found := slices.BinarySearch(k.addrs, addr)
	if !found {
		i--
	}
	if i < 0 {
		return "", false
	}
	start := uint32(0)
	if i > 0 {
		start = k.ends[i-1]
	}
	return k.names[start:k.ends[i]], true
}
