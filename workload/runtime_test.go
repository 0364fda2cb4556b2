package workload

import (
	"bufio"
	"bytes"
	"debug/elf"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"runtime"
	"runtime/debug"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/culprit-dev/culprit/internal/testenv"
)

// need returns the path of a program the test runs, or skips loudly.
func need(t *testing.T, name string) string {
	t.Helper()
	p, err := exec.LookPath(name)
	if err != nil {
		t.Skipf("SKIP: %s not installed: runtime detection for it is NOT TESTED", name)
	}
	return p
}

// startReady starts cmd and waits until a line of its output (stdout and
// stderr together) matches ready. The process is killed when the test ends.
func startReady(t *testing.T, cmd *exec.Cmd, ready string) {
	t.Helper()
	pr, pw := io.Pipe()
	cmd.Stdout, cmd.Stderr = pw, pw
	if err := cmd.Start(); err != nil {
		t.Fatalf("start %s: %v", cmd.Path, err)
	}
	t.Cleanup(func() {
		_ = cmd.Process.Kill()
		_ = cmd.Wait()
		_ = pw.Close()
	})
	re := regexp.MustCompile(ready)
	got := make(chan error, 1)
	var seen strings.Builder
	go func() {
		sc := bufio.NewScanner(pr)
		for sc.Scan() {
			if seen.Len() < 4096 {
				seen.WriteString(sc.Text() + "\n")
			}
			if re.MatchString(sc.Text()) {
				got <- nil
				// Keep draining so the child never blocks on a full pipe.
				_, _ = io.Copy(io.Discard, pr)
				return
			}
		}
		got <- fmt.Errorf("output ended before %q", ready)
	}()
	select {
	case err := <-got:
		if err != nil {
			t.Fatalf("%s: %v; output:\n%s", strings.Join(cmd.Args, " "), err, seen.String())
		}
	case <-time.After(30 * time.Second):
		t.Fatalf("%s: not ready after 30s", strings.Join(cmd.Args, " "))
	}
}

func freePort(t *testing.T) int {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}

// dump shows every field: %+v would print String().
func dump(r Runtime) string {
	return fmt.Sprintf("{lang=%s version=%q frameworks=%v module=%q allocator=%q exe=%q sources=%q}",
		r.Lang, r.Version, r.Frameworks, r.Module, r.Allocator, r.Exe, r.Sources)
}

func detect(t *testing.T, pid int) Runtime {
	t.Helper()
	start := time.Now()
	rt, err := DetectRuntime("/proc", pid)
	if err != nil {
		t.Fatalf("DetectRuntime(%d): %v", pid, err)
	}
	t.Logf("pid %d: %s in %v; %s", pid, rt, time.Since(start).Round(time.Microsecond), dump(rt))
	return rt
}

func output(t *testing.T, name string, args ...string) string {
	t.Helper()
	out, err := exec.Command(name, args...).CombinedOutput()
	if err != nil {
		t.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
	}
	return string(out)
}

func TestRuntimeSelfIsGo(t *testing.T) {
	rt := detect(t, os.Getpid())
	if rt.Lang != LangGo || rt.Allocator != AllocGo {
		t.Fatalf("the test binary: got %s, want Go", dump(rt))
	}
	if want := strings.TrimPrefix(runtime.Version(), "go"); rt.Version != want {
		t.Errorf("Version = %q, want %q (runtime.Version)", rt.Version, want)
	}
	bi, ok := debug.ReadBuildInfo()
	if !ok {
		t.Fatal("no build info in the test binary")
	}
	if rt.Module != bi.Main.Path {
		t.Errorf("Module = %q, want %q", rt.Module, bi.Main.Path)
	}
	if want := "Go " + majorMinor(rt.Version); rt.String() != want {
		t.Errorf("String() = %q, want %q", rt.String(), want)
	}
}

func TestRuntimeCaddyIsGo(t *testing.T) {
	caddy := need(t, "caddy")
	home := t.TempDir()
	cmd := exec.Command(caddy, "respond", "--listen", "127.0.0.1:0", "hello")
	cmd.Env = append(os.Environ(), "XDG_DATA_HOME="+home, "XDG_CONFIG_HOME="+home, "HOME="+home)
	startReady(t, cmd, `^Server address: `)
	rt := detect(t, cmd.Process.Pid)

	// go version -m reads the same build info by another implementation.
	// (go test puts $GOROOT/bin first on the test's PATH.)
	m := output(t, need(t, "go"), "version", "-m", caddy)
	wantVer := regexp.MustCompile(`: go(\S+)`).FindStringSubmatch(m)
	wantMod := regexp.MustCompile(`(?m)^\s+mod\s+(\S+)`).FindStringSubmatch(m)
	if wantMod == nil {
		wantMod = regexp.MustCompile(`(?m)^\s+path\s+(\S+)`).FindStringSubmatch(m)
	}
	if wantVer == nil || wantMod == nil {
		t.Fatalf("go version -m printed %q", m)
	}
	if rt.Lang != LangGo || rt.Version != wantVer[1] || rt.Module != wantMod[1] {
		t.Errorf("caddy: got %s %q module %q, want go %q module %q", rt.Lang, rt.Version, rt.Module, wantVer[1], wantMod[1])
	}
}

func rustcVersion(t *testing.T, rustc string) string {
	t.Helper()
	m := regexp.MustCompile(`rustc (\d+\.\d+\.\d+)`).FindStringSubmatch(output(t, rustc, "--version"))
	if m == nil {
		t.Fatal("rustc --version printed no version")
	}
	return m[1]
}

// TestRuntimeRustProcess: a running Rust binary built from source with no
// crates. Its threads are named like Tokio's ("tokio-runtime-w"), but no
// Tokio code is in it, and detection reads code, not thread names.
func TestRuntimeRustProcess(t *testing.T) {
	rustc := testenv.Rustc(t)
	w := testenv.StartRustWorker(t, testenv.BuildRustWorker(t), "idle")
	rt := detect(t, w.PID)
	if rt.Lang != LangRust {
		t.Fatalf("rustworker: got %s, want Rust", dump(rt))
	}
	if want := rustcVersion(t, rustc); rt.Version != want {
		t.Errorf("Version = %q, want %q (rustc --version)", rt.Version, want)
	}
	if len(rt.Frameworks) != 0 {
		t.Errorf("Frameworks = %v, want none (the program uses std only)", rt.Frameworks)
	}
	if rt.Allocator != AllocGlibc {
		t.Errorf("Allocator = %q, want glibc", rt.Allocator)
	}
	if rt.String() != "Rust" {
		t.Errorf("String() = %q", rt.String())
	}
}

// TestRuntimeRustCrates builds a program against a library crate named
// tokio, laid out as cargo lays out a registry crate (…/tokio-V/src/lib.rs),
// so its symbols and panic locations are those a real Tokio dependency
// leaves. Legacy and v0 mangling, with and without symbols: a stripped
// binary is recognised from .rodata, where it also gives the version.
func TestRuntimeRustCrates(t *testing.T) {
	rustc := testenv.Rustc(t)
	dir := t.TempDir()
	const ver = "1.77.3"
	crateDir := filepath.Join(dir, "registry", "tokio-"+ver, "src")
	if err := os.MkdirAll(crateDir, 0o755); err != nil {
		t.Fatal(err)
	}
	lib := `pub mod runtime {
    #[inline(never)]
    pub fn block_on(v: &[u64], i: usize) -> u64 { v[i] * 3 } // panic location: this file
}`
	main := `use std::io::Read;
fn main() {
    let v: Vec<u64> = std::env::args().map(|a| a.len() as u64).collect();
    println!("ready {}", tokio::runtime::block_on(&v, 0));
    let _ = std::io::stdin().read(&mut [0u8; 1]);
}`
	if err := os.WriteFile(filepath.Join(crateDir, "lib.rs"), []byte(lib), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "main.rs"), []byte(main), 0o644); err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct {
		name  string
		flags []string
		strip bool
	}{
		{"legacy", nil, false},
		{"v0", []string{"-C", "symbol-mangling-version=v0"}, false},
		{"stripped", []string{"-C", "strip=symbols"}, true},
	} {
		t.Run(c.name, func(t *testing.T) {
			out := filepath.Join(dir, c.name)
			args := append([]string{"--edition=2021", "--crate-type=rlib", "--crate-name=tokio", "-O",
				"--out-dir", out, filepath.Join(crateDir, "lib.rs")}, c.flags...)
			output(t, rustc, args...)
			exe := filepath.Join(out, "app")
			args = append([]string{"--edition=2021", "-O", "--extern", "tokio=" + filepath.Join(out, "libtokio.rlib"),
				"-o", exe, filepath.Join(dir, "main.rs")}, c.flags...)
			output(t, rustc, args...)
			if c.strip {
				if s := output(t, "readelf", "-SW", exe); strings.Contains(s, ".symtab") {
					t.Fatalf("-C strip=symbols left a .symtab")
				}
			}
			cmd := exec.Command(exe)
			stdin, err := cmd.StdinPipe()
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { stdin.Close() })
			startReady(t, cmd, `^ready`)
			rt := detect(t, cmd.Process.Pid)
			if rt.Lang != LangRust || !rt.Has(FwTokio) {
				t.Fatalf("got %s, want Rust with tokio", dump(rt))
			}
			if rt.Has(FwActix) || rt.Has(FwHyper) || rt.Has(FwAsyncStd) {
				t.Errorf("frameworks %v: only tokio is linked", rt.Frameworks)
			}
			if rt.Frameworks[0].Version != ver {
				t.Errorf("tokio version %q, want %q from the crate's path", rt.Frameworks[0].Version, ver)
			}
			if rt.String() != "Rust (tokio)" {
				t.Errorf("String() = %q", rt.String())
			}
		})
	}
}

// TestRuntimeRustupExe: rustup is a real Rust binary built with Tokio,
// hyper and reqwest. What nm finds in its symbols is the expectation.
func TestRuntimeRustupExe(t *testing.T) {
	rustc := testenv.Rustc(t)
	rustup := filepath.Join(filepath.Dir(rustc), "rustup")
	if real, err := filepath.EvalSymlinks(rustc); err == nil && filepath.Base(real) == "rustup" {
		rustup = real
	}
	if _, err := os.Stat(rustup); err != nil {
		t.Skipf("SKIP: no rustup next to %s: a real Tokio binary is NOT TESTED", rustc)
	}
	start := time.Now()
	rt, err := DetectExe(rustup)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("%s: %s in %v; %s", rustup, rt, time.Since(start), dump(rt))
	checkRustCrates(t, rustup, rt)
}

// TestRuntimeTokioHyperApp: testenv's Tokio + hyper 0.14 service, built by
// cargo from Debian's crates, detected while it runs.
func TestRuntimeTokioHyperApp(t *testing.T) {
	exe := testenv.BuildTokioHyper(t)
	cmd := exec.Command(exe, "--port", "0")
	startReady(t, cmd, `^listening \d+`)
	rt := detect(t, cmd.Process.Pid)
	if !rt.Has(FwTokio) || !rt.Has(FwHyper) {
		t.Errorf("tokio-hyper app: %s, want Rust with tokio and hyper", dump(rt))
	}
	checkRustCrates(t, exe, rt)
}

// checkRustCrates compares what detection found in a Rust binary with what
// nm finds in its symbols, and each version with the crate paths in it.
func checkRustCrates(t *testing.T, exe string, rt Runtime) {
	t.Helper()
	need(t, "nm")
	if rt.Lang != LangRust {
		t.Fatalf("%s: got %s, want Rust", exe, dump(rt))
	}
	syms := output(t, "nm", "-C", "--defined-only", exe)
	data, err := os.ReadFile(exe)
	if err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct{ fw, path, dir string }{
		{FwTokio, "tokio::", "tokio"}, {FwHyper, "hyper::", "hyper"}, {FwActix, "actix_web::", "actix-web"},
		{FwAsyncStd, "async_std::", "async-std"}, {FwReqwest, "reqwest::", "reqwest"}, {FwAxum, "axum::", "axum"},
	} {
		want := strings.Contains(syms, " "+c.path) || strings.Contains(syms, "<"+c.path)
		if rt.Has(c.fw) != want {
			t.Errorf("%s: Has(%s) = %v, nm says %v", exe, c.fw, rt.Has(c.fw), want)
		}
		for _, f := range rt.Frameworks {
			if f.Name == c.fw && f.Version != "" && !bytes.Contains(data, []byte("/"+c.dir+"-"+f.Version+"/")) {
				t.Errorf("%s: %s version %q is not in any crate path of the binary", exe, c.fw, f.Version)
			}
		}
	}
}

func buildC(t *testing.T, compiler, src, ext string) string {
	t.Helper()
	cc := need(t, compiler)
	dir := t.TempDir()
	file := filepath.Join(dir, "prog."+ext)
	if err := os.WriteFile(file, []byte(src), 0o644); err != nil {
		t.Fatal(err)
	}
	exe := filepath.Join(dir, "prog")
	output(t, cc, "-O2", "-o", exe, file)
	return exe
}

func TestRuntimeCAndCPP(t *testing.T) {
	cExe := buildC(t, "gcc", `#include <stdio.h>
#include <unistd.h>
int main(void) { puts("ready"); fflush(stdout); pause(); return 0; }`, "c")
	cmd := exec.Command(cExe)
	startReady(t, cmd, `^ready`)
	rt := detect(t, cmd.Process.Pid)
	if rt.Lang != LangC || len(rt.Frameworks) != 0 || rt.Allocator != AllocGlibc || rt.String() != "C" {
		t.Errorf("gcc-built program: got %s (%s), want plain C on glibc", dump(rt), rt)
	}

	cppExe := buildC(t, "g++", `#include <iostream>
#include <string>
#include <unistd.h>
int main() { std::string s = "ready"; std::cout << s << std::endl; pause(); }`, "cc")
	cmd = exec.Command(cppExe)
	startReady(t, cmd, `^ready`)
	rt = detect(t, cmd.Process.Pid)
	if rt.Lang != LangCPP || rt.String() != "C++" {
		t.Errorf("g++-built program: got %s (%s), want C++", dump(rt), rt)
	}
}

func TestRuntimeRedis(t *testing.T) {
	redis := need(t, "redis-server")
	port := freePort(t)
	cmd := exec.Command(redis, "--port", strconv.Itoa(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
		"--dir", t.TempDir(), "--daemonize", "no")
	startReady(t, cmd, `Ready to accept connections`)
	rt := detect(t, cmd.Process.Pid)
	if rt.Lang != LangC || !rt.Has(FwRedis) {
		t.Fatalf("redis-server: got %s, want C (redis)", dump(rt))
	}
	// redis-server --version names the allocator it was built with.
	v := output(t, redis, "--version")
	m := regexp.MustCompile(`malloc=([a-z]+)`).FindStringSubmatch(v)
	if m == nil {
		t.Fatalf("redis-server --version printed %q", v)
	}
	want := map[string]string{"jemalloc": AllocJemalloc, "libc": AllocGlibc, "tcmalloc": AllocTcmalloc}[m[1]]
	if rt.Allocator != want {
		t.Errorf("Allocator = %q, redis-server says malloc=%s", rt.Allocator, m[1])
	}
}

func TestRuntimeNginx(t *testing.T) {
	nginx := need(t, "nginx")
	// testenv's nginx: one master and its worker, stopped the way that
	// leaves no worker behind (SIGTERM, which the master passes on).
	ngx := testenv.StartNginx(t, testenv.NginxOptions{Workers: 1})
	rt := detect(t, ngx.PID)
	if rt.Lang != LangC || !rt.Has(FwNginx) {
		t.Fatalf("nginx master: got %s, want C (nginx)", dump(rt))
	}
	m := regexp.MustCompile(`nginx/(\S+)`).FindStringSubmatch(output(t, nginx, "-v"))
	if m == nil {
		t.Fatal("nginx -v printed no version")
	}
	if rt.Frameworks[0].Version != m[1] || rt.String() != "C (nginx "+m[1]+")" {
		t.Errorf("got %s, version %q; nginx -v says %s", rt, rt.Frameworks[0].Version, m[1])
	}
	// The workers serve; detection must name them the same.
	for _, kid := range Children("/proc", ngx.PID, 4) {
		if k := detect(t, kid); k.String() != rt.String() {
			t.Errorf("worker %d: %s, master: %s", kid, k, rt)
		}
	}
}

func TestRuntimeNode(t *testing.T) {
	node := need(t, "node")
	cmd := exec.Command(node, "-e", `console.log("ready"); setInterval(() => {}, 1000)`)
	startReady(t, cmd, `^ready`)
	rt := detect(t, cmd.Process.Pid)
	want := strings.TrimPrefix(strings.TrimSpace(output(t, node, "--version")), "v")
	if rt.Lang != LangNode || !rt.Has(FwLibuv) || rt.Version != want {
		t.Fatalf("node: got %s, want Node.js %s with libuv", dump(rt), want)
	}
	if s := "Node.js " + major(want) + " (libuv)"; rt.String() != s {
		t.Errorf("String() = %q, want %q", rt.String(), s)
	}
}

// TestRuntimeNodeCost measures detection of the biggest binary on this
// machine (node, ~100 MB with a 5 MB .dynstr and a 47 MB .rodata), and
// checks that the bytes read stay under the bound.
func TestRuntimeNodeCost(t *testing.T) {
	node := need(t, "node")
	real, err := filepath.EvalSymlinks(node)
	if err != nil {
		t.Fatal(err)
	}
	ex, err := scanExecutable(real, true)
	if err != nil {
		t.Fatal(err)
	}
	if ex.scanned > maxScanPerFile {
		t.Errorf("scanned %d bytes, bound %d", ex.scanned, maxScanPerFile)
	}
	const rounds = 5
	start := time.Now()
	for range rounds {
		if _, err := DetectExe(real); err != nil {
			t.Fatal(err)
		}
	}
	st, _ := os.Stat(real)
	t.Logf("DetectExe(%s, %d MB): %v each, %d KB of string tables and .rodata scanned",
		real, st.Size()>>20, time.Since(start)/rounds, ex.scanned>>10)
}

func pythonVersion(t *testing.T, python string) string {
	t.Helper()
	return strings.TrimSpace(output(t, python, "-c", `import sys; print("%d.%d" % sys.version_info[:2])`))
}

func TestRuntimePython(t *testing.T) {
	python := need(t, "python3")
	want := pythonVersion(t, python)

	cmd := exec.Command(python, "-u", "-m", "http.server", "--bind", "127.0.0.1", "0")
	startReady(t, cmd, `^Serving HTTP on`)
	rt := detect(t, cmd.Process.Pid)
	if rt.Lang != LangPython || rt.Version != want {
		t.Fatalf("python3 -m http.server: got %s, want Python %s", dump(rt), want)
	}
	if rt.Has(FwGunicorn) || rt.Has(FwUvicorn) {
		t.Errorf("frameworks %v for http.server", rt.Frameworks)
	}

	cmd = exec.Command(python, "-u", "-c", `import asyncio
async def main():
    print("ready")
    await asyncio.sleep(60)
asyncio.run(main())`)
	startReady(t, cmd, `^ready`)
	rt = detect(t, cmd.Process.Pid)
	if rt.Lang != LangPython || !rt.Has(FwAsyncio) {
		t.Errorf("asyncio program: got %s, want Python with asyncio", dump(rt))
	}
}

// TestRuntimePythonStatic: Debian's python3.11 links CPython statically,
// so there is no libpython in its maps; its symbols say Python.
func TestRuntimePythonStatic(t *testing.T) {
	var python string
	for _, p := range []string{"/usr/bin/python3.11", "/usr/bin/python3.12", "/usr/bin/python3.13"} {
		if _, err := os.Stat(p); err == nil {
			python = p
			break
		}
	}
	if python == "" {
		t.Skip("SKIP: no /usr/bin/python3.X: a statically linked CPython is NOT TESTED")
	}
	cmd := exec.Command(python, "-u", "-c", `print("ready"); import time; time.sleep(60)`)
	startReady(t, cmd, `^ready`)
	rt := detect(t, cmd.Process.Pid)
	if want := pythonVersion(t, python); rt.Lang != LangPython || rt.Version != want {
		t.Errorf("%s: got %s, want Python %s", python, dump(rt), want)
	}
}

func TestRuntimeJava(t *testing.T) {
	java := need(t, "java")
	dir := t.TempDir()
	src := filepath.Join(dir, "Sleep.java")
	if err := os.WriteFile(src, []byte(`public class Sleep {
  public static void main(String[] a) throws Exception { System.out.println("ready"); Thread.sleep(60000); }
}`), 0o644); err != nil {
		t.Fatal(err)
	}
	// The source-file launcher (JDK 11+) compiles in memory: no javac.
	cmd := exec.Command(java, "-Xshare:auto", "-XX:TieredStopAtLevel=1", src)
	startReady(t, cmd, `^ready`)
	rt := detect(t, cmd.Process.Pid)
	props := output(t, java, "-XshowSettings:properties", "-version")
	m := regexp.MustCompile(`java\.version = (\S+)`).FindStringSubmatch(props)
	if m == nil {
		t.Fatal("java printed no java.version")
	}
	if rt.Lang != LangJVM || rt.Version != m[1] {
		t.Fatalf("java: got %s, want JVM %s", dump(rt), m[1])
	}
	if want := "Java " + javaMajor(m[1]); rt.String() != want {
		t.Errorf("String() = %q, want %q", rt.String(), want)
	}
}

func TestRuntimeGoneProcess(t *testing.T) {
	cmd := exec.Command("true")
	if err := cmd.Run(); err != nil {
		t.Fatal(err)
	}
	rt, err := DetectRuntime("/proc", cmd.Process.Pid)
	if !errors.Is(err, fs.ErrNotExist) || rt.Known() {
		t.Errorf("a reaped pid: got %s, %v; want unknown and ErrNotExist", dump(rt), err)
	}
}

// TestRuntimeMapsParsing covers runtimes this machine does not have
// (.NET, libnode, musl, a preloaded allocator), from maps lines in the
// kernel's format.
func TestRuntimeMapsParsing(t *testing.T) {
	maps := `55d0c0a00000-55d0c0a01000 r--p 00000000 08:01 1234   /usr/share/dotnet/dotnet
7f0000000000-7f0000100000 r-xp 00000000 08:01 2345   /usr/share/dotnet/shared/Microsoft.NETCore.App/8.0.11/libcoreclr.so
7f0000200000-7f0000300000 r--s 00000000 08:01 3456   /usr/share/dotnet/shared/Microsoft.AspNetCore.App/8.0.11/Microsoft.AspNetCore.Server.Kestrel.Core.dll
7f0000400000-7f0000500000 r-xp 00000000 08:01 4567   /usr/lib/x86_64-linux-gnu/libjemalloc.so.2
7f0000600000-7f0000700000 r-xp 00000000 08:01 5678   /lib/x86_64-linux-gnu/libc.so.6
7f0000800000-7f0000900000 rw-p 00000000 00:00 0      [heap]
7f0000a00000-7f0000b00000 r-xp 00000000 08:01 6789   /opt/my app/lib with space.so (deleted)
`
	paths := mapsPaths([]byte(maps))
	if len(paths) != 6 || paths[5] != "/opt/my app/lib with space.so" {
		t.Fatalf("paths %q", paths)
	}
	rt := Runtime{Lang: LangUnknown, Exe: "/usr/share/dotnet/dotnet"}
	decide(&rt, nil, paths, nil, "/nonexistent")
	if rt.Lang != LangDotnet || rt.Version != "8.0.11" || !rt.Has(FwAspNetCore) || rt.Allocator != AllocJemalloc {
		t.Errorf("dotnet maps: %s", dump(rt))
	}
	if rt.String() != ".NET 8 (ASP.NET Core)" {
		t.Errorf("String() = %q", rt.String())
	}

	// Python embedding a JVM (JPype): the executable's name decides.
	paths = mapsPaths([]byte(`7f0000000000-7f0000100000 r-xp 00000000 08:01 1 /usr/lib/jvm/java-21-openjdk-amd64/lib/server/libjvm.so
7f0000200000-7f0000300000 r-xp 00000000 08:01 2 /usr/lib/x86_64-linux-gnu/libpython3.12.so.1.0
7f0000400000-7f0000500000 r-xp 00000000 08:01 3 /lib/ld-musl-x86_64.so.1
`))
	rt = Runtime{Lang: LangUnknown, Exe: "/usr/bin/python3.12"}
	decide(&rt, nil, paths, []string{"/usr/bin/python3.12", "-m", "gunicorn", "-k", "uvicorn.workers.UvicornWorker", "app:app"}, "/nonexistent")
	if rt.Lang != LangPython || rt.Version != "3.12" || rt.Allocator != AllocMusl {
		t.Errorf("python with a JVM: %s", dump(rt))
	}
	if !rt.Has(FwGunicorn) || !rt.Has(FwUvicorn) || !rt.Has(FwAsyncio) {
		t.Errorf("gunicorn with uvicorn workers: %v", rt.Frameworks)
	}
	rt = Runtime{Lang: LangUnknown, Exe: "/usr/lib/jvm/java-21-openjdk-amd64/bin/java"}
	decide(&rt, nil, paths, nil, "/nonexistent")
	if rt.Lang != LangJVM || rt.Version != "21" {
		t.Errorf("java with libjvm, no release file readable: %s", dump(rt))
	}
}

// TestRuntimeScanBounds: markers straddling chunk boundaries are found
// (with their versions), nothing past the limit is read, and memory is the
// one chunk buffer whatever the size.
func TestRuntimeScanBounds(t *testing.T) {
	ms := []marker{{id: "nginx", pat: "ngx_cycle"}, {id: "v", pat: "nginx/", version: true}}
	for _, at := range []int{0, scanChunk - 4, scanChunk - 8, scanChunk + 3, 3*scanChunk - 2} {
		data := make([]byte, 4*scanChunk)
		copy(data[at:], "ngx_cycle\x00")
		copy(data[at+len("ngx_cycle")+7:], "nginx/1.25.3\x00")
		hits := map[string]string{}
		n, err := scanMarkers(bytes.NewReader(data), int64(len(data)), ms, hits, make([]byte, scanChunk))
		if err != nil {
			t.Fatal(err)
		}
		if _, ok := hits["nginx"]; !ok || hits["v"] != "1.25.3" {
			t.Errorf("markers at %d: hits %v", at, hits)
		}
		if n > int64(at+scanChunk+64) {
			t.Errorf("markers at %d: read %d bytes after both were found", at, n)
		}
	}
	// Past the limit: not read, not found.
	data := make([]byte, 3*scanChunk)
	copy(data[2*scanChunk+10:], "ngx_cycle")
	hits := map[string]string{}
	n, err := scanMarkers(bytes.NewReader(data), 2*scanChunk, ms, hits, make([]byte, scanChunk))
	if err != nil {
		t.Fatal(err)
	}
	if n != 2*scanChunk || len(hits) != 0 {
		t.Errorf("limit 2 chunks: read %d, hits %v", n, hits)
	}
	// A version marker followed by no digits is no hit.
	hits = map[string]string{}
	if _, err := scanMarkers(strings.NewReader("nginx/x nginx/ nginx/2"), 100, ms[1:], hits, make([]byte, scanChunk)); err != nil {
		t.Fatal(err)
	}
	if _, ok := hits["v"]; ok {
		t.Errorf("no dotted version after the marker, got %v", hits)
	}
}

// TestRuntimeCostLargeBinaries logs detection's cost on the biggest ELF
// files this machine has (C++ and Rust shared libraries of 100+ MB whose
// string tables exceed the bounds), and checks the bound on bytes read.
func TestRuntimeCostLargeBinaries(t *testing.T) {
	var files []string
	for _, g := range []string{"/usr/lib/x86_64-linux-gnu/libLLVM*.so", "/root/.rustup/toolchains/*/lib/librustc_driver-*.so", "/usr/lib/jvm/*/lib/server/libjvm.so"} {
		// One of each kind: under -race a 150 MB library takes seconds.
		if m, _ := filepath.Glob(g); len(m) > 0 {
			files = append(files, m[len(m)-1])
		}
	}
	if len(files) == 0 {
		t.Skip("SKIP: no large ELF files found: detection cost on them is NOT MEASURED")
	}
	for _, f := range files {
		start := time.Now()
		ex, err := scanExecutable(f, true)
		if err != nil {
			t.Errorf("%s: %v", f, err)
			continue
		}
		took := time.Since(start)
		rt := Runtime{Lang: LangUnknown, Exe: f}
		decide(&rt, ex, nil, nil, "/")
		st, _ := os.Stat(f)
		t.Logf("%s (%d MB): %s, %d KB scanned in %v", f, st.Size()>>20, rt, ex.scanned>>10, took.Round(time.Millisecond))
		if ex.scanned > maxScanPerFile {
			t.Errorf("%s: scanned %d bytes, bound %d", f, ex.scanned, maxScanPerFile)
		}
	}
}

// TestRuntimeMarkers: searchWindow filters on four bytes and keeps a bit
// per marker in a uint64.
func TestRuntimeMarkers(t *testing.T) {
	for name, ms := range map[string][]marker{
		"symbols": symbolMarkers, "crates": crateMarkers,
		"rodata": append([]marker{rustcMarker, nodeVersionMarker, nginxVersionMarker}, crateMarkers...),
	} {
		if len(ms) > 64 {
			t.Errorf("%s: %d markers, more than one pass of 64", name, len(ms))
		}
		for _, m := range ms {
			if len(m.pat) < 4 {
				t.Errorf("%s: marker %q is shorter than 4 bytes and would never be searched", name, m.pat)
			}
		}
	}
}

// TestRuntimeELFBounds: a file whose headers would make debug/elf read
// without bound is refused before it is parsed.
func TestRuntimeELFBounds(t *testing.T) {
	orig, err := os.ReadFile("/bin/true")
	if err != nil {
		t.Skipf("SKIP: no /bin/true to patch: %v", err)
	}
	ef, err := elf.NewFile(bytes.NewReader(orig))
	if err != nil {
		t.Fatal(err)
	}
	if ef.Class != elf.ELFCLASS64 || ef.ByteOrder != binary.LittleEndian {
		t.Skip("SKIP: /bin/true is not little-endian ELF64: the patch offsets below do not apply")
	}
	var h elf.Header64
	if err := binary.Read(bytes.NewReader(orig), binary.LittleEndian, &h); err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	write := func(name string, patch func(b []byte)) string {
		b := bytes.Clone(orig)
		patch(b)
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, b, 0o755); err != nil {
			t.Fatal(err)
		}
		return p
	}
	if _, err := DetectExe(write("intact", func([]byte) {})); err != nil {
		t.Fatalf("unpatched copy refused: %v", err)
	}
	// Section64.Size is at offset 32 of the section header.
	sizeAt := int(h.Shoff) + int(h.Shstrndx)*int(h.Shentsize) + 32
	huge := write("huge-shstrtab", func(b []byte) { binary.LittleEndian.PutUint64(b[sizeAt:], 1<<40) })
	// Header64.Shnum is at offset 60.
	ext := write("extended", func(b []byte) { binary.LittleEndian.PutUint16(b[60:], 0) })
	for _, p := range []string{huge, ext} {
		if rt, err := DetectExe(p); err == nil {
			t.Errorf("%s: accepted as %s", filepath.Base(p), dump(rt))
		} else {
			t.Logf("%s: %v", filepath.Base(p), err)
		}
	}
}
