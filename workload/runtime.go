package workload

import (
	"bytes"
	"debug/buildinfo"
	"debug/elf"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"math/bits"
	"os"
	"path"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
)

// Lang is the language (or, for the JVM and .NET, the virtual machine) a
// target runs on. Findings word their remedies in its terms: Rust advice
// for a Go service makes operators stop trusting the tool.
type Lang string

// The languages DetectRuntime tells apart.
const (
	LangUnknown Lang = "unknown"
	LangGo      Lang = "go"
	LangRust    Lang = "rust"
	LangC       Lang = "c"
	LangCPP     Lang = "cpp"
	LangJVM     Lang = "jvm"
	LangNode    Lang = "node"
	LangPython  Lang = "python"
	LangDotnet  Lang = "dotnet"
)

// Frameworks and servers DetectRuntime recognises. The names are how
// operators write them, so that Runtime.String reads as they would say it.
const (
	FwTokio      = "tokio"
	FwActix      = "actix-web"
	FwAsyncStd   = "async-std"
	FwHyper      = "hyper"
	FwAxum       = "axum"
	FwTonic      = "tonic"
	FwReqwest    = "reqwest"
	FwNginx      = "nginx"
	FwRedis      = "redis"
	FwEnvoy      = "envoy"
	FwLibuv      = "libuv"
	FwGunicorn   = "gunicorn"
	FwUvicorn    = "uvicorn"
	FwAsyncio    = "asyncio"
	FwGevent     = "gevent"
	FwNetty      = "Netty"
	FwAspNetCore = "ASP.NET Core"
)

// Allocators Runtime.Allocator names. Retention advice depends on it more
// than on the language: a Rust service on jemalloc and one on glibc malloc
// are tuned differently.
const (
	AllocGo       = "go"
	AllocGlibc    = "glibc"
	AllocMusl     = "musl"
	AllocJemalloc = "jemalloc"
	AllocMimalloc = "mimalloc"
	AllocTcmalloc = "tcmalloc"
)

// Framework is one framework, server or library found in the target.
type Framework struct {
	Name    string
	Version string // "" when it was not cheap to learn
}

// Runtime describes what a target process runs: its language, the
// runtime or framework that schedules its work, and its allocator.
type Runtime struct {
	Lang Lang
	// Version of the language runtime: Go's toolchain ("1.26.8"), the Rust
	// compiler, Node.js, Python ("3.11"), the JDK, .NET. "" when unknown.
	Version string
	// Frameworks, the most specific first (actix-web before tokio).
	Frameworks []Framework
	// Module is a Go program's main module path.
	Module    string
	Allocator string
	// Exe is the executable as /proc/PID/exe names it.
	Exe string
	// Sources says what each conclusion was drawn from, for logs and for
	// anyone who doubts it.
	Sources []string
}

// Has reports whether the named framework was found.
func (r Runtime) Has(name string) bool {
	for _, f := range r.Frameworks {
		if f.Name == name {
			return true
		}
	}
	return false
}

// Known reports whether the language was recognised.
func (r Runtime) Known() bool { return r.Lang != "" && r.Lang != LangUnknown }

// String reads well inside a finding: "Go 1.26", "Rust (actix-web, tokio)",
// "C (nginx 1.22.1)", "Node.js 20 (libuv)", "Python 3.11 (gunicorn)".
func (r Runtime) String() string {
	var name, ver string
	switch r.Lang {
	case LangGo:
		name, ver = "Go", majorMinor(r.Version)
	case LangRust:
		name = "Rust"
	case LangC:
		name = "C"
	case LangCPP:
		name = "C++"
	case LangJVM:
		name, ver = "Java", javaMajor(r.Version)
	case LangNode:
		name, ver = "Node.js", major(r.Version)
	case LangPython:
		name, ver = "Python", majorMinor(r.Version)
	case LangDotnet:
		name, ver = ".NET", major(r.Version)
	default:
		return "unknown runtime"
	}
	s := name
	if ver != "" {
		s += " " + ver
	}
	var fws []string
	for _, f := range r.Frameworks {
		// A client library says nothing about how the service runs.
		if f.Name == FwReqwest || len(fws) == 2 {
			continue
		}
		fw := f.Name
		if f.Version != "" && (f.Name == FwNginx || f.Name == FwRedis || f.Name == FwEnvoy) {
			fw += " " + f.Version
		}
		fws = append(fws, fw)
	}
	if len(fws) > 0 {
		s += " (" + strings.Join(fws, ", ") + ")"
	}
	return s
}

func major(v string) string {
	if i := strings.IndexByte(v, '.'); i > 0 {
		return v[:i]
	}
	return v
}

func majorMinor(v string) string {
	f := strings.SplitN(v, ".", 3)
	if len(f) >= 2 {
		return f[0] + "." + f[1]
	}
	return v
}

// javaMajor turns "1.8.0_392" into 8 and "17.0.15" into 17.
func javaMajor(v string) string {
	if strings.HasPrefix(v, "1.") {
		return major(v[2:])
	}
	return major(v)
}

// Bounds on what detection reads. A target may run a binary of gigabytes
// (debug info, embedded assets); detection runs once per process and must
// cost tens of milliseconds and a few megabytes at most.
const (
	maxCmdline     = 64 << 10
	maxMapsBytes   = 4 << 20
	maxMapsPaths   = 4096
	maxComment     = 4 << 10
	maxSymbolScan  = 32 << 20 // per string table
	maxRodataScan  = 32 << 20
	maxScanPerFile = 64 << 20
	scanChunk      = 1 << 20
	maxReleaseFile = 64 << 10
	maxCapture     = 24 // bytes of version text taken after a marker
)

// DetectRuntime says what the process pid under procRoot runs. It reads,
// cheapest first: the command line, /proc/PID/maps (shared libraries name
// the JVM, Python, .NET, libnode and the allocator), and the executable
// through /proc/PID/exe (Go build info; then bounded scans of the ELF
// string tables and, where they decide, .rodata). An error means neither
// the executable nor the maps could be read (the process is gone, or the
// agent lacks CAP_SYS_PTRACE); the Runtime returned with it is still valid,
// and says LangUnknown unless the command line was enough.
func DetectRuntime(procRoot string, pid int) (Runtime, error) {
	dir := filepath.Join(procRoot, strconv.Itoa(pid))
	rt := Runtime{Lang: LangUnknown}
	args, err := readCmdline(dir)
	if err != nil {
		return rt, fmt.Errorf("pid %d: %w", pid, err)
	}
	if link, err := os.Readlink(filepath.Join(dir, "exe")); err == nil {
		rt.Exe = strings.TrimSuffix(link, " (deleted)")
	}
	maps, mapsErr := readMapsPaths(filepath.Join(dir, "maps"))
	// When a runtime's library is mapped (libjvm, libpython), the
	// executable is a launcher: its string tables need no scan.
	_, vm := vmFromMaps(maps, rt.Exe)
	// Open the executable through /proc/PID/exe, not its path: that works
	// for a process in another mount namespace and for a deleted binary.
	ex, exeErr := scanExecutable(filepath.Join(dir, "exe"), !vm)
	if mapsErr != nil && exeErr != nil {
		fromCmdline(&rt, args)
		return rt, fmt.Errorf("pid %d: read neither its executable (%v) nor its maps: %w", pid, exeErr, mapsErr)
	}
	root := filepath.Join(dir, "root")
	decide(&rt, ex, maps, args, root)
	return rt, nil
}

// DetectExe says what the executable at path runs, from the file alone:
// without a process there are no shared libraries or command line, so a
// JVM or a Python with libpython is not recognised here.
func DetectExe(path string) (Runtime, error) {
	rt := Runtime{Lang: LangUnknown, Exe: path}
	ex, err := scanExecutable(path, true)
	if err != nil {
		return rt, err
	}
	decide(&rt, ex, nil, nil, "/")
	return rt, nil
}

func readCmdline(dir string) ([]string, error) {
	f, err := os.Open(filepath.Join(dir, "cmdline"))
	if err != nil {
		return nil, fmt.Errorf("open cmdline: %w", err)
	}
	defer f.Close()
	b, err := io.ReadAll(io.LimitReader(f, maxCmdline))
	if err != nil {
		return nil, fmt.Errorf("read cmdline: %w", err)
	}
	b = bytes.TrimRight(b, "\x00")
	if len(b) == 0 {
		return nil, nil
	}
	return strings.Split(string(b), "\x00"), nil
}

// readMapsPaths returns the distinct file paths mapped into the process.
func readMapsPaths(p string) ([]string, error) {
	f, err := os.Open(p)
	if err != nil {
		return nil, fmt.Errorf("open maps: %w", err)
	}
	defer f.Close()
	b, err := io.ReadAll(io.LimitReader(f, maxMapsBytes))
	if err != nil {
		return nil, fmt.Errorf("read maps: %w", err)
	}
	return mapsPaths(b), nil
}

func mapsPaths(b []byte) []string {
	seen := map[string]bool{}
	var out []string
	for len(b) > 0 && len(out) < maxMapsPaths {
		line := b
		if i := bytes.IndexByte(b, '\n'); i >= 0 {
			line, b = b[:i], b[i+1:]
		} else {
			b = nil
		}
		// address perms offset dev inode pathname: the path is whatever
		// follows the fifth field, and may hold spaces.
		i := bytes.IndexByte(line, '/')
		if i < 0 {
			continue
		}
		p := strings.TrimSuffix(string(line[i:]), " (deleted)")
		if !seen[p] {
			seen[p] = true
			out = append(out, p)
		}
	}
	return out
}

// marker is a byte string whose presence in a binary says something.
type marker struct {
	id, pat string
	// version: the hit counts only when digits follow, and those
	// digits and dots are kept as the version.
	version bool
}

// rustCrates are found by their names as the Rust manglers write them:
// legacy "_ZN5tokio7runtime…" and "…$LT$tokio..net…", v0 "…Cs1a_5tokio…".
var rustCrates = []struct{ crate, fw, dir string }{
	{"actix_web", FwActix, "actix-web"},
	{"axum", FwAxum, "axum"},
	{"tonic", FwTonic, "tonic"},
	{"hyper", FwHyper, "hyper"},
	{"tokio", FwTokio, "tokio"},
	{"async_std", FwAsyncStd, "async-std"},
	{"reqwest", FwReqwest, "reqwest"},
}

// Markers sought in the symbol string tables (.dynstr, .strtab). A
// trailing NUL anchors the end of a symbol name.
var symbolMarkers = func() []marker {
	ms := []marker{
		{id: "rust", pat: "rust_begin_unwind"},
		{id: "rust", pat: "rust_eh_personality"},
		{id: "rust", pat: "__rust_alloc"},
		{id: "node", pat: "_ZN4node"},
		{id: "libuv", pat: "uv_run\x00"},
		{id: "envoy", pat: "_ZN5Envoy"},
		{id: "nginx", pat: "ngx_cycle"},
		{id: "redis.ae", pat: "aeMain\x00"},
		{id: "redis.cron", pat: "serverCron\x00"},
		{id: "python", pat: "Py_BytesMain\x00"},
		{id: "python", pat: "_PyEval_EvalFrameDefault\x00"},
		{id: "cpp", pat: "__gxx_personality_v0"},
		{id: "cpp", pat: "_ZNSt"},
		{id: "cpp", pat: "_Znwm\x00"},
		{id: "alloc.rjem", pat: "_rjem_malloc"},
		{id: "alloc.jemalloc", pat: "mallctl\x00"},
		{id: "alloc.mimalloc", pat: "mi_malloc\x00"},
		{id: "alloc.tcmalloc", pat: "tc_malloc\x00"},
	}
	for _, c := range rustCrates {
		n := strconv.Itoa(len(c.crate)) + c.crate
		for _, p := range []string{"N" + n, "C" + n, "_" + n, c.crate + ".."} {
			ms = append(ms, marker{id: "crate." + c.fw, pat: p})
		}
	}
	return ms
}()

// Markers sought in .rodata. Panic locations name the crates a Rust
// binary was built from, with their versions, even when it is stripped
// ("…/tokio-1.49.0/src/runtime/…"); servers embed their version strings.
var (
	rustcMarker        = marker{id: "rust", pat: "/rustc/"}
	nodeVersionMarker  = marker{id: "version.node", pat: "nodejs.org/download/release/v", version: true}
	nginxVersionMarker = marker{id: "version.nginx", pat: "nginx/", version: true}
	crateMarkers       = func() []marker {
		var ms []marker
		for _, c := range rustCrates {
			ms = append(ms, crateMarker(c.fw, c.dir))
		}
		return ms
	}()
)

// crateMarker finds a crate's source path in .rodata; its id is not the
// symbols' one, so that a crate already found by its symbols still gets
// its version.
func crateMarker(fw, dir string) marker {
	return marker{id: "version.crate." + fw, pat: "/" + dir + "-", version: true}
}

// exeFacts is what the executable showed.
type exeFacts struct {
	goInfo  *buildinfo.BuildInfo
	comment string
	hits    map[string]string // marker id -> version ("" for presence)
	symtab  bool              // had a .symtab (not stripped)
	scanned int64             // bytes scanned, for tests and logs
}

// scanExecutable reads what detection needs from an ELF file, within
// the bounds above: Go build info, .comment, and, with strs, the markers
// in its string tables.
func scanExecutable(p string, strs bool) (ex *exeFacts, err error) {
	f, err := os.Open(p)
	if err != nil {
		return nil, fmt.Errorf("open executable: %w", err)
	}
	defer f.Close()
	// debug/elf is not hardened against every malformed input, and the
	// files belong to processes we do not control.
	defer func() {
		if r := recover(); r != nil {
			ex, err = nil, fmt.Errorf("malformed ELF %s: %v", p, r)
		}
	}()
	if err := checkHeaders(f); err != nil {
		return nil, fmt.Errorf("ELF %s: %w", p, err)
	}
	ef, err := elf.NewFile(f)
	if err != nil {
		return nil, fmt.Errorf("parse ELF %s: %w", p, err)
	}
	defer ef.Close()
	ex = &exeFacts{hits: map[string]string{}}
	// buildinfo searches the whole data segment of a file without
	// .go.buildinfo; only call it when the section says Go.
	if ef.Section(".go.buildinfo") != nil {
		if bi, err := buildinfo.Read(f); err == nil {
			ex.goInfo = bi
			return ex, nil
		}
	}
	if s := ef.Section(".comment"); s != nil && s.Type != elf.SHT_NOBITS {
		b, _ := io.ReadAll(io.LimitReader(s.Open(), maxComment))
		ex.comment = string(b)
	}
	ex.symtab = ef.Section(".symtab") != nil
	if !strs {
		return ex, nil
	}
	buf := make([]byte, scanChunk)
	budget := int64(maxScanPerFile)
	scan := func(name string, limit int64, ms []marker) error {
		sec := ef.Section(name)
		if sec == nil || sec.Type == elf.SHT_NOBITS || budget <= 0 || len(ms) == 0 {
			return nil
		}
		n, err := scanMarkers(sec.Open(), min(budget, limit), ms, ex.hits, buf)
		ex.scanned += n
		budget -= n
		if err != nil {
			return fmt.Errorf("scan %s of %s: %w", name, p, err)
		}
		return nil
	}
	if err := scan(".dynstr", maxSymbolScan, symbolMarkers); err != nil {
		return nil, err
	}
	// .dynstr settles node, CPython and the servers, which export their
	// symbols; Rust's markers and crates are only in .strtab.
	if ex.isRust() || !ex.settled() {
		if err := scan(".strtab", maxSymbolScan, symbolMarkers); err != nil {
			return nil, err
		}
	}
	if err := scan(".rodata", maxRodataScan, rodataMarkers(ex)); err != nil {
		return nil, err
	}
	return ex, nil
}

// maxSectionNames bounds .shstrtab, which debug/elf reads whole; real
// files have a few kilobytes.
const maxSectionNames = 1 << 20

// checkHeaders bounds what elf.NewFile will read before it reads it: the
// section and program header tables are at most 65535 entries each (a few
// megabytes) unless extended numbering moves the count into section 0,
// which no executable needs and which is refused; and the section-name
// table, read whole, must be small. Everything else is read by the bounded
// scans.
func checkHeaders(r io.ReaderAt) error {
	var id [elf.EI_NIDENT]byte
	if _, err := r.ReadAt(id[:], 0); err != nil {
		return fmt.Errorf("read ELF ident: %w", err)
	}
	if string(id[:4]) != elf.ELFMAG {
		return errors.New("not an ELF file")
	}
	var bo binary.ByteOrder
	switch elf.Data(id[elf.EI_DATA]) {
	case elf.ELFDATA2LSB:
		bo = binary.LittleEndian
	case elf.ELFDATA2MSB:
		bo = binary.BigEndian
	default:
		return fmt.Errorf("unknown ELF data encoding %d", id[elf.EI_DATA])
	}
	var shoff uint64
	var shentsize, shnum, shstrndx uint16
	switch elf.Class(id[elf.EI_CLASS]) {
	case elf.ELFCLASS64:
		var h elf.Header64
		if err := binary.Read(io.NewSectionReader(r, 0, int64(binary.Size(h))), bo, &h); err != nil {
			return fmt.Errorf("read ELF header: %w", err)
		}
		shoff, shentsize, shnum, shstrndx = h.Shoff, h.Shentsize, h.Shnum, h.Shstrndx
	case elf.ELFCLASS32:
		var h elf.Header32
		if err := binary.Read(io.NewSectionReader(r, 0, int64(binary.Size(h))), bo, &h); err != nil {
			return fmt.Errorf("read ELF header: %w", err)
		}
		shoff, shentsize, shnum, shstrndx = uint64(h.Shoff), h.Shentsize, h.Shnum, h.Shstrndx
	default:
		return fmt.Errorf("unknown ELF class %d", id[elf.EI_CLASS])
	}
	if shoff == 0 {
		return nil // no sections: nothing more for elf.NewFile to read
	}
	if shnum == 0 || shstrndx == uint16(elf.SHN_XINDEX) {
		return errors.New("extended section numbering: refused, to bound the headers read")
	}
	if shstrndx >= shnum {
		return fmt.Errorf("section-name table index %d of %d sections", shstrndx, shnum)
	}
	off := int64(shoff) + int64(shstrndx)*int64(shentsize)
	var size uint64
	switch elf.Class(id[elf.EI_CLASS]) {
	case elf.ELFCLASS64:
		var sh elf.Section64
		if err := binary.Read(io.NewSectionReader(r, off, int64(binary.Size(sh))), bo, &sh); err != nil {
			return fmt.Errorf("read section-name table header: %w", err)
		}
		size = sh.Size
	default:
		var sh elf.Section32
		if err := binary.Read(io.NewSectionReader(r, off, int64(binary.Size(sh))), bo, &sh); err != nil {
			return fmt.Errorf("read section-name table header: %w", err)
		}
		size = uint64(sh.Size)
	}
	if size > maxSectionNames {
		return fmt.Errorf("section-name table of %d bytes: over the %d-byte bound", size, maxSectionNames)
	}
	return nil
}

// settled reports whether a marker has named the language for certain.
func (ex *exeFacts) settled() bool {
	for _, id := range []string{"node", "python", "envoy", "nginx"} {
		if _, ok := ex.hits[id]; ok {
			return true
		}
	}
	_, ae := ex.hits["redis.ae"]
	_, cron := ex.hits["redis.cron"]
	return ae && cron
}

// rodataMarkers says what .rodata can still tell, worth its scan: a Rust
// binary's crates and their versions, node's or nginx's version, or the
// language of a stripped binary whose symbols said nothing.
func rodataMarkers(ex *exeFacts) []marker {
	has := func(id string) bool { _, ok := ex.hits[id]; return ok }
	switch {
	case ex.isRust() && ex.symtab:
		// Only the versions of the crates the symbols showed: the scan
		// stops once they are found instead of reading all of .rodata
		// for crates that are not there.
		var ms []marker
		for _, c := range rustCrates {
			if has("crate." + c.fw) {
				ms = append(ms, crateMarker(c.fw, c.dir))
			}
		}
		return ms
	case ex.isRust():
		return crateMarkers
	case has("node"):
		return []marker{nodeVersionMarker}
	case has("nginx"):
		return []marker{nginxVersionMarker}
	case !ex.settled() && !has("cpp") && !ex.symtab:
		return append([]marker{rustcMarker}, crateMarkers...)
	}
	return nil
}

func (ex *exeFacts) isRust() bool {
	_, ok := ex.hits["rust"]
	return ok || strings.Contains(ex.comment, "rustc version")
}

// scanMarkers reads up to limit bytes of r in chunks and records the first
// hit of every marker whose id is not yet in hits. Memory is one chunk
// whatever the section's size, and reading stops once every id is found.
func scanMarkers(r io.Reader, limit int64, ms []marker, hits map[string]string, buf []byte) (int64, error) {
	var pending []marker
	keep := 0
	for _, m := range ms {
		if _, ok := hits[m.id]; !ok && len(m.pat) >= 4 {
			pending = append(pending, m)
			keep = max(keep, len(m.pat)+maxCapture)
		}
	}
	lr := io.LimitReader(r, limit)
	var total int64
	have := 0 // bytes at the start of buf carried over from the last chunk
	for len(pending) > 0 {
		n, err := io.ReadFull(lr, buf[have:])
		total += int64(n)
		eof := errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF)
		if err != nil && !eof {
			return total, fmt.Errorf("read: %w", err)
		}
		win := buf[:have+n]
		for i := 0; i < len(pending); i += 64 {
			searchWindow(pending[i:min(len(pending), i+64)], win, eof, hits)
		}
		pending = slices.DeleteFunc(pending, func(m marker) bool { _, ok := hits[m.id]; return ok })
		if eof {
			break
		}
		// Carry the tail over, so that a marker (and its version) that
		// straddles two chunks is still seen whole.
		have = copy(buf, win[max(0, len(win)-keep):])
	}
	return total, nil
}

// searchWindow finds up to 64 markers in one pass over win. Each position
// is filtered by its first four bytes through one table per byte (a bit
// per marker), so the cost is a few loads per byte whatever the number of
// markers: a bytes.Index per marker reads the window once per marker
// (node's 100 MB binary took 0.7 s that way), and filtering on the first
// byte alone still compares at every "_Z" of a C++ symbol table. Markers
// are at least four bytes long. A versioned hit too close to the end of a
// window that continues is left for the next window, which starts with
// this one's tail.
func searchWindow(ms []marker, win []byte, last bool, hits map[string]string) {
	var tab [4][256]uint64
	for k, m := range ms {
		for j := range 4 {
			tab[j][m.pat[j]] |= 1 << k
		}
	}
	var done uint64
	all := uint64(1)<<len(ms) - 1
	if len(ms) == 64 {
		all = ^uint64(0)
	}
	for i := 0; i+4 <= len(win) && done != all; i++ {
		cand := tab[0][win[i]] & tab[1][win[i+1]] & tab[2][win[i+2]] & tab[3][win[i+3]] &^ done
		for cand != 0 {
			k := bits.TrailingZeros64(cand)
			cand &= cand - 1
			m := ms[k]
			at := i + len(m.pat)
			if at > len(win) || string(win[i:at]) != m.pat {
				continue
			}
			if _, ok := hits[m.id]; ok {
				done |= 1 << k // another marker with the same id hit first
				continue
			}
			if !m.version {
				hits[m.id] = ""
				done |= 1 << k
				continue
			}
			if !last && at+maxCapture > len(win) {
				done |= 1 << k // seen again, whole, at the start of the next window
				continue
			}
			if v := versionAt(win[at:min(len(win), at+maxCapture)]); v != "" {
				hits[m.id] = v
				done |= 1 << k
			}
		}
	}
}

// versionAt returns the leading "1.22.1" of b, which must start with a
// digit and contain a dot.
func versionAt(b []byte) string {
	n := 0
	for n < len(b) && (b[n] >= '0' && b[n] <= '9' || b[n] == '.') {
		n++
	}
	v := strings.TrimRight(string(b[:n]), ".")
	if v == "" || v[0] < '0' || v[0] > '9' || !strings.Contains(v, ".") {
		return ""
	}
	return v
}

var (
	pythonExe   = regexp.MustCompile(`^python(\d+\.\d+)?`)
	libpython   = regexp.MustCompile(`/libpython(\d+\.\d+)[^/]*\.so`)
	libnode     = regexp.MustCompile(`/libnode\.so(\.\d+)?$`)
	dotnetVer   = regexp.MustCompile(`/Microsoft\.NETCore\.App/(\d+\.\d+\.\d+[^/]*)/libcoreclr\.so$`)
	javaRelease = regexp.MustCompile(`(?m)^JAVA_VERSION="([^"]+)"`)
	javaPathVer = regexp.MustCompile(`(?:jdk|jre|java)-?(\d+(?:\.\d+)*)`)
	cmdGunicorn = regexp.MustCompile(`\bgunicorn\b`)
	cmdUvicorn  = regexp.MustCompile(`\buvicorn\b`)
	rustcVer    = regexp.MustCompile(`rustc version (\d+\.\d+\.\d+)`)
	goVer       = regexp.MustCompile(`go(\d+\.\d+(?:\.\d+)?)`)
)

// decide joins what the executable, the maps and the command line showed.
// Evidence of a virtual machine in the maps outranks the executable's own
// symbols: /usr/bin/java is a small C launcher, and the interesting code
// is in libjvm.so. Go build info outranks everything: it cannot be faked
// by accident.
func decide(rt *Runtime, ex *exeFacts, maps []string, args []string, root string) {
	if ex != nil && ex.goInfo != nil {
		rt.Lang, rt.Allocator = LangGo, AllocGo
		// "go1.26.8", or "go1.26.8 X:boringcrypto", or "devel go1.27-…".
		rt.Version = ex.goInfo.GoVersion
		if m := goVer.FindStringSubmatch(rt.Version); m != nil {
			rt.Version = m[1]
		}
		rt.Module = ex.goInfo.Main.Path
		if rt.Module == "" {
			rt.Module = ex.goInfo.Path
		}
		rt.Sources = append(rt.Sources, "Go build info of the executable")
		return
	}
	if vm, ok := vmFromMaps(maps, rt.Exe); ok {
		fromVM(rt, vm, maps, root)
	} else if ex != nil {
		fromSymbols(rt, ex)
	}
	if rt.Lang == LangC && len(rt.Frameworks) == 0 && mapsCPlusPlus(maps) {
		// A C++ program that exports no mangled names (hidden visibility,
		// no exceptions) still loads the C++ runtime.
		rt.Lang = LangCPP
		rt.Sources = append(rt.Sources, "maps: a C++ standard library")
	}
	if ex != nil && rt.Lang == LangRust {
		if m := rustcVer.FindStringSubmatch(ex.comment); m != nil {
			rt.Version = m[1]
		}
	}
	if rt.Lang == LangNode && rt.Version == "" && ex != nil {
		rt.Version = ex.hits["version.node"]
	}
	if rt.Lang == LangPython {
		fromPythonCmdline(rt, args, maps)
	}
	if !rt.Known() {
		fromCmdline(rt, args)
	}
	allocator(rt, ex, maps)
}

// vmLibrary is a shared library that is, in effect, the runtime.
type vmLibrary struct {
	lang Lang
	path string
}

// vmFromMaps finds the runtimes that live in shared libraries. A process
// can map two (Python calling Java through JPype): the one the executable
// is named after wins, else the first in the order below.
func vmFromMaps(maps []string, exe string) (vmLibrary, bool) {
	var found []vmLibrary
	for _, p := range maps {
		base := path.Base(p)
		switch {
		case base == "libjvm.so":
			found = append(found, vmLibrary{LangJVM, p})
		case base == "libcoreclr.so":
			found = append(found, vmLibrary{LangDotnet, p})
		case libnode.MatchString(p):
			found = append(found, vmLibrary{LangNode, p})
		case libpython.MatchString(p):
			found = append(found, vmLibrary{LangPython, p})
		}
	}
	if len(found) == 0 {
		return vmLibrary{}, false
	}
	named := map[Lang]bool{
		LangJVM:    path.Base(exe) == "java",
		LangDotnet: path.Base(exe) == "dotnet",
		LangNode:   isNodeName(exe),
		LangPython: pythonExe.MatchString(path.Base(exe)),
	}
	for _, v := range found {
		if named[v.lang] {
			return v, true
		}
	}
	for _, lang := range []Lang{LangJVM, LangDotnet, LangNode, LangPython} {
		for _, v := range found {
			if v.lang == lang {
				return v, true
			}
		}
	}
	return vmLibrary{}, false
}

// fromVM fills in what the runtime's library and its neighbours show.
func fromVM(rt *Runtime, vm vmLibrary, maps []string, root string) {
	rt.Lang = vm.lang
	rt.Sources = append(rt.Sources, "maps: "+vm.path)
	switch vm.lang {
	case LangJVM:
		rt.Version = javaVersion(vm.path, root)
	case LangDotnet:
		if m := dotnetVer.FindStringSubmatch(vm.path); m != nil {
			rt.Version = m[1]
		}
	case LangPython:
		rt.Version = libpython.FindStringSubmatch(vm.path)[1]
	case LangNode:
		rt.addFramework(FwLibuv, "")
		// libnode holds the version string: a bounded scan of its
		// .rodata, as for a static node executable.
		if lf, err := scanExecutable(filepath.Join(root, vm.path), true); err == nil {
			rt.Version = lf.hits["version.node"]
		}
	}
	for _, p := range maps {
		switch {
		case vm.lang == LangJVM && strings.Contains(p, "netty_transport_native"):
			rt.addFramework(FwNetty, "")
		case vm.lang == LangDotnet && strings.Contains(p, "/Microsoft.AspNetCore.App/"):
			rt.addFramework(FwAspNetCore, "")
		}
	}
}

// javaVersion reads JAVA_VERSION from the JDK's release file, found above
// libjvm.so (lib/server/libjvm.so, or jre/lib/amd64/server/libjvm.so in JDK
// 8), through the process's root; else a version in the path.
func javaVersion(libjvm, root string) string {
	dir := path.Dir(libjvm)
	for range 5 {
		dir = path.Dir(dir)
		f, err := os.Open(filepath.Join(root, dir, "release"))
		if err != nil {
			continue
		}
		b, _ := io.ReadAll(io.LimitReader(f, maxReleaseFile))
		f.Close()
		if m := javaRelease.FindSubmatch(b); m != nil {
			return string(m[1])
		}
	}
	if m := javaPathVer.FindStringSubmatch(libjvm); m != nil {
		return m[1]
	}
	return ""
}

// fromSymbols reads the language from the executable's markers, the most
// specific first: Rust binaries link C and C++ code, and node is C++.
func fromSymbols(rt *Runtime, ex *exeFacts) {
	has := func(id string) bool { _, ok := ex.hits[id]; return ok }
	switch {
	case ex.isRust():
		rt.Lang = LangRust
		for _, c := range rustCrates {
			v, inRodata := ex.hits["version.crate."+c.fw]
			if _, inSymbols := ex.hits["crate."+c.fw]; inSymbols || inRodata {
				rt.addFramework(c.fw, v)
			}
		}
		rt.Sources = append(rt.Sources, "Rust symbols or .comment in the executable")
	case has("node") || has("libuv") && isNodeName(rt.Exe):
		rt.Lang = LangNode
		rt.addFramework(FwLibuv, "")
		rt.Sources = append(rt.Sources, "node:: symbols in the executable")
	case has("python") || pythonExe.MatchString(path.Base(rt.Exe)):
		rt.Lang = LangPython
		if m := pythonExe.FindStringSubmatch(path.Base(rt.Exe)); m != nil {
			rt.Version = m[1]
		}
		rt.Sources = append(rt.Sources, "CPython symbols in the executable")
	case has("envoy"):
		rt.Lang = LangCPP
		rt.addFramework(FwEnvoy, "")
		rt.Sources = append(rt.Sources, "Envoy:: symbols in the executable")
	case has("nginx"):
		rt.Lang = LangC
		rt.addFramework(FwNginx, ex.hits["version.nginx"])
		rt.Sources = append(rt.Sources, "ngx_ symbols in the executable")
	case has("redis.ae") && has("redis.cron"):
		rt.Lang = LangC
		rt.addFramework(FwRedis, "")
		rt.Sources = append(rt.Sources, "aeMain and serverCron in the executable")
	case has("cpp"):
		rt.Lang = LangCPP
		rt.Sources = append(rt.Sources, "C++ runtime symbols in the executable")
	default:
		// A native executable with none of the markers above: in practice
		// C. Its advice is the native, runtime-neutral kind anyway.
		rt.Lang = LangC
		rt.Sources = append(rt.Sources, "native ELF without Go, Rust, C++ or runtime markers")
	}
}

func mapsCPlusPlus(maps []string) bool {
	for _, p := range maps {
		if b := path.Base(p); strings.HasPrefix(b, "libstdc++.so") || strings.HasPrefix(b, "libc++.so") {
			return true
		}
	}
	return false
}

func isNodeName(p string) bool {
	b := path.Base(p)
	return b == "node" || b == "nodejs"
}

// fromPythonCmdline finds the servers and event loops of a Python process:
// the command line names gunicorn and uvicorn (also as gunicorn's process
// title "gunicorn: master [app]"); loaded extension modules show asyncio
// (_asyncio, uvloop) and gevent. An import is not proof that a loop runs,
// but a service that imports asyncio almost always serves with it.
func fromPythonCmdline(rt *Runtime, args, maps []string) {
	cmd := strings.Join(args, " ")
	if cmdGunicorn.MatchString(cmd) {
		rt.addFramework(FwGunicorn, "")
	}
	if cmdUvicorn.MatchString(cmd) {
		rt.addFramework(FwUvicorn, "")
		rt.addFramework(FwAsyncio, "")
	}
	for _, p := range maps {
		switch {
		case strings.Contains(p, "/gevent/"):
			rt.addFramework(FwGevent, "")
		case strings.Contains(path.Base(p), "_asyncio.") || strings.Contains(p, "/uvloop/"):
			rt.addFramework(FwAsyncio, "")
		}
	}
}

// fromCmdline is the last resort, when neither the maps nor the executable
// could be read: argv[0] alone is weak evidence, so only names that are
// unambiguous count.
func fromCmdline(rt *Runtime, args []string) {
	if len(args) == 0 {
		return
	}
	a0 := args[0]
	switch {
	case strings.HasPrefix(a0, "nginx: "):
		rt.Lang = LangC
		rt.addFramework(FwNginx, "")
	case strings.HasPrefix(a0, "gunicorn: "):
		rt.Lang = LangPython
		rt.addFramework(FwGunicorn, "")
	default:
		return
	}
	rt.Sources = append(rt.Sources, "process title "+strconv.Quote(a0))
}

// allocator names the malloc the process uses: a preloaded or linked
// allocator library in the maps, allocator symbols in the executable
// (tikv-jemallocator's _rjem_ prefix), else the C library.
func allocator(rt *Runtime, ex *exeFacts, maps []string) {
	if rt.Allocator != "" {
		return
	}
	libc := ""
	for _, p := range maps {
		b := path.Base(p)
		switch {
		case strings.HasPrefix(b, "libjemalloc.so"):
			rt.Allocator = AllocJemalloc
		case strings.HasPrefix(b, "libtcmalloc"):
			rt.Allocator = AllocTcmalloc
		case strings.HasPrefix(b, "libmimalloc"):
			rt.Allocator = AllocMimalloc
		case strings.HasPrefix(b, "ld-musl"), strings.HasPrefix(b, "libc.musl"):
			libc = AllocMusl
		case strings.HasPrefix(b, "libc.so.6"):
			libc = AllocGlibc
		}
		if rt.Allocator != "" {
			return
		}
	}
	if ex != nil {
		for _, a := range []struct{ id, alloc string }{
			{"alloc.rjem", AllocJemalloc}, {"alloc.jemalloc", AllocJemalloc},
			{"alloc.mimalloc", AllocMimalloc}, {"alloc.tcmalloc", AllocTcmalloc},
		} {
			if _, ok := ex.hits[a.id]; ok {
				rt.Allocator = a.alloc
				return
			}
		}
	}
	rt.Allocator = libc
}

func (r *Runtime) addFramework(name, version string) {
	for i, f := range r.Frameworks {
		if f.Name == name {
			if f.Version == "" {
				r.Frameworks[i].Version = version
			}
			return
		}
	}
	r.Frameworks = append(r.Frameworks, Framework{Name: name, Version: version})
}
