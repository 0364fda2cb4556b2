package symbolize

import (
	"bufio"
	"bytes"
	"debug/elf"
	"fmt"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"testing"

	"github.com/culprit-dev/culprit/internal/testenv"
)

// readelfRows runs binutils' readelf -wF, the oracle: for each row of each
// FDE, the address and the CFA, rbp and ra rules as readelf prints them
// ("rsp+8", "c-16", "u"; rbp "" when the table has no rbp column).
func readelfRows(t *testing.T, path string) (rows map[uint64][3]string, fdes int) {
	t.Helper()
	if _, err := exec.LookPath("readelf"); err != nil {
		t.Skip("SKIP: no readelf (binutils): .eh_frame parsing is NOT checked against it")
	}
	// readelf also follows debug links to separate debug files, whose
	// NOBITS .eh_frame makes it exit 1 after printing the real one.
	out, err := exec.Command("readelf", "-wF", path).Output()
	if err != nil && len(out) == 0 {
		t.Fatalf("readelf -wF %s: %v", path, err)
	}
	if i := bytes.Index(out[1:], []byte("Contents of the .eh_frame section")); i >= 0 {
		out = out[:i+1]
	}
	rows = map[uint64][3]string{}
	cieRows := map[string][3]string{}
	var cols []string
	var cie string // the CIE whose table follows, or ""
	var lo uint64
	sc := bufio.NewScanner(bytes.NewReader(out))
	for sc.Scan() {
		f := strings.Fields(sc.Text())
		switch {
		case len(f) >= 4 && f[3] == "CIE":
			cols, lo, cie = nil, 0, f[0]
		case len(f) >= 4 && f[3] == "FDE":
			var hi uint64
			for _, x := range f {
				if pcs, ok := strings.CutPrefix(x, "pc="); ok {
					r := strings.Split(pcs, "..")
					lo, _ = strconv.ParseUint(r[0], 16, 64)
					hi, _ = strconv.ParseUint(r[len(r)-1], 16, 64)
				}
			}
			cols, cie = nil, ""
			if hi > lo {
				fdes++
				// Without a table of its own, the FDE has its CIE's rule.
				rows[lo] = cieRows[strings.TrimPrefix(f[4], "cie=")]
			} else {
				lo = 0
			}
		case len(f) > 1 && f[0] == "LOC":
			cols = f
		case cols != nil && (lo != 0 || cie != "") && len(f) == len(cols):
			loc, err := strconv.ParseUint(f[0], 16, 64)
			if err != nil {
				continue
			}
			var r [3]string
			for i, c := range cols {
				switch c {
				case "CFA":
					r[0] = f[i]
				case "rbp":
					r[1] = f[i]
				case "ra":
					r[2] = f[i]
				}
			}
			if cie != "" {
				cieRows[cie] = r
				continue
			}
			rows[loc] = r
		}
	}
	return rows, fdes
}

// Every row of every FDE of a real file, against readelf.
func checkEHFrame(t *testing.T, path string) {
	f, err := elf.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	sec := f.Section(".eh_frame")
	if sec == nil {
		t.Fatalf("%s has no .eh_frame", path)
	}
	data, err := sec.Data()
	if err != nil {
		t.Fatal(err)
	}
	tab, err := parseEHFrame(data, sec.Addr)
	if err != nil {
		t.Fatal(err)
	}
	want, fdes := readelfRows(t, path)
	if len(tab.fdes) != fdes {
		t.Errorf("indexed %d FDEs, readelf lists %d", len(tab.fdes), fdes)
	}
	var exprs map[uint64]string
	checked, unsupported, derefs := 0, 0, 0
	for loc, w := range want {
		got, ok := tab.row(loc)
		deref := false
		if w[0] == "exp" {
			if exprs == nil {
				exprs = readelfCFAExprs(t, path)
			}
			wantReg, wantOff, wantAdd, understood := derefExpr(exprs[loc])
			switch {
			case !understood && ok:
				t.Errorf("%#x: CFA is the expression %q, yet row() answered %+v", loc, exprs[loc], got)
			case understood && !ok && w[2] == "c-8" && !strings.HasPrefix(w[1], "exp") && !strings.HasPrefix(w[1], "r"):
				t.Errorf("%#x: no row for the CFA expression %q", loc, exprs[loc])
			case understood && ok && (!got.cfaDeref || got.cfaReg != wantReg || got.cfaOff != wantOff || got.cfaAdd != wantAdd):
				t.Errorf("%#x: CFA %q read as %+v", loc, exprs[loc], got)
			}
			if !understood || !ok {
				unsupported++
				continue
			}
			deref = true
			derefs++
		}
		if !deref && !strings.HasPrefix(w[0], "rsp+") && !strings.HasPrefix(w[0], "rbp+") {
			// The CFA in another register (OpenSSL's rax, rsi, r11 in
			// prologues and epilogues): no value for it on a stack.
			if ok {
				t.Errorf("%#x: CFA %s, yet row() answered %+v", loc, w[0], got)
			}
			unsupported++
			continue
		}
		if w[2] != "c-8" || strings.HasPrefix(w[1], "exp") || strings.HasPrefix(w[1], "r") {
			unsupported++
			continue
		}
		if !ok {
			t.Errorf("%#x: no row, readelf says CFA %s rbp %s ra %s", loc, w[0], w[1], w[2])
			continue
		}
		reg := map[uint64]string{dwRSP: "rsp", dwRBP: "rbp"}[got.cfaReg]
		cfa := reg + "+" + strconv.FormatInt(got.cfaOff, 10)
		if deref {
			cfa = "exp"
		}
		rbp := ""
		if got.rbpSaved {
			rbp = fmt.Sprintf("c%d", got.rbpOff)
		}
		wantRBP := w[1]
		if wantRBP == "u" {
			wantRBP = ""
		}
		if cfa != w[0] || rbp != wantRBP || got.raOff != -8 {
			t.Errorf("%#x: got CFA %s rbp %q ra c%d, readelf says CFA %s rbp %q ra %s", loc, cfa, rbp, got.raOff, w[0], w[1], w[2])
		}
		checked++
	}
	t.Logf("%s: %d FDEs, %d rows match readelf (%d with a CFA read from the stack), %d rows use rules this unwinder declines", path, len(tab.fdes), checked, derefs, unsupported)
	if checked < 100 {
		t.Errorf("only %d rows checked", checked)
	}
}

// readelfCFAExprs runs readelf -wf, the raw CFA programs, and returns the
// CFA expression in force at each location where one is ("" where the
// CFA is a register rule), following remember/restore_state as the
// unwinder must.
func readelfCFAExprs(t *testing.T, path string) map[uint64]string {
	t.Helper()
	out, err := exec.Command("readelf", "-wf", path).Output()
	if err != nil && len(out) == 0 {
		t.Fatalf("readelf -wf %s: %v", path, err)
	}
	if i := bytes.Index(out[1:], []byte("Contents of the .eh_frame section")); i >= 0 {
		out = out[:i+1]
	}
	exprs := map[uint64]string{}
	var (
		loc   uint64
		cur   string
		saved []string
	)
	sc := bufio.NewScanner(bytes.NewReader(out))
	for sc.Scan() {
		line := strings.TrimSpace(sc.Text())
		f := strings.Fields(line)
		switch {
		case len(f) >= 4 && f[3] == "FDE":
			cur, saved, loc = "", nil, 0
			for _, x := range f {
				if pcs, ok := strings.CutPrefix(x, "pc="); ok {
					loc, _ = strconv.ParseUint(strings.Split(pcs, "..")[0], 16, 64)
				}
			}
		case strings.HasPrefix(line, "DW_CFA_advance_loc") || strings.HasPrefix(line, "DW_CFA_set_loc"):
			loc, _ = strconv.ParseUint(f[len(f)-1], 16, 64)
		case strings.HasPrefix(line, "DW_CFA_def_cfa_expression ("):
			cur = strings.TrimSuffix(strings.TrimPrefix(line, "DW_CFA_def_cfa_expression ("), ")")
		case strings.HasPrefix(line, "DW_CFA_def_cfa:") || strings.HasPrefix(line, "DW_CFA_def_cfa_sf:"):
			cur = ""
		case strings.HasPrefix(line, "DW_CFA_remember_state"):
			saved = append(saved, cur)
		case strings.HasPrefix(line, "DW_CFA_restore_state") && len(saved) > 0:
			cur, saved = saved[len(saved)-1], saved[:len(saved)-1]
		}
		if cur != "" {
			exprs[loc] = cur
		} else {
			delete(exprs, loc)
		}
	}
	return exprs
}

// derefExpr parses the one CFA expression the unwinder evaluates,
// "DW_OP_breg7 (rsp): 152; DW_OP_deref; DW_OP_plus_uconst: 8", as readelf
// prints it.
func derefExpr(e string) (reg uint64, off, add int64, ok bool) {
	parts := strings.Split(e, "; ")
	if len(parts) < 2 || len(parts) > 3 || parts[1] != "DW_OP_deref" {
		return 0, 0, 0, false
	}
	switch {
	case strings.HasPrefix(parts[0], "DW_OP_breg7 (rsp): "):
		reg = dwRSP
	case strings.HasPrefix(parts[0], "DW_OP_breg6 (rbp): "):
		reg = dwRBP
	default:
		return 0, 0, 0, false
	}
	off, err := strconv.ParseInt(parts[0][strings.LastIndexByte(parts[0], ' ')+1:], 10, 64)
	if err != nil {
		return 0, 0, 0, false
	}
	if len(parts) == 3 {
		a, ok := strings.CutPrefix(parts[2], "DW_OP_plus_uconst: ")
		if !ok {
			return 0, 0, 0, false
		}
		if add, err = strconv.ParseInt(a, 10, 64); err != nil {
			return 0, 0, 0, false
		}
	}
	return reg, off, add, true
}

func TestEHFrameMatchesReadelf(t *testing.T) {
	t.Run("libc", func(t *testing.T) {
		libc := "/lib/x86_64-linux-gnu/libc.so.6"
		if _, err := elf.Open(libc); err != nil {
			t.Skipf("SKIP: %s: %v", libc, err)
		}
		checkEHFrame(t, libc)
	})
	t.Run("rust", func(t *testing.T) { checkEHFrame(t, testenv.BuildRustWorker(t)) })
	// OpenSSL's perlasm: CFAs read from the stack (DW_OP_deref), the
	// PLT's expressions, remember/restore_state around them.
	t.Run("libcrypto", func(t *testing.T) {
		lib := "/usr/lib/x86_64-linux-gnu/libcrypto.so.3"
		if _, err := elf.Open(lib); err != nil {
			if os.Getenv("CI") == "true" {
				t.Fatalf("%s: %v (CI installs libssl3)", lib, err)
			}
			t.Skipf("SKIP: %s: %v: OpenSSL's CFA expressions NOT checked", lib, err)
		}
		checkEHFrame(t, lib)
	})
}

// Truncated and corrupted sections are rejected or indexed partially,
// never a panic.
func FuzzParseEHFrame(f *testing.F) {
	if data, err := elfSection("/lib/x86_64-linux-gnu/libc.so.6", ".eh_frame", 4096); err == nil {
		f.Add(data, uint64(0x1000))
	}
	f.Add([]byte{}, uint64(0))
	f.Fuzz(func(t *testing.T, data []byte, addr uint64) {
		tab, _ := parseEHFrame(data, addr)
		if tab == nil {
			return
		}
		for _, fd := range tab.fdes {
			tab.row(fd.lo)
			tab.row(fd.hi - 1)
		}
	})
}

func elfSection(path, name string, n int) ([]byte, error) {
	f, err := elf.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	sec := f.Section(name)
	if sec == nil {
		return nil, fmt.Errorf("no %s", name)
	}
	data, err := sec.Data()
	if err != nil {
		return nil, err
	}
	return data[:min(n, len(data))], nil
}
