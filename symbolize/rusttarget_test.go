package symbolize

import (
	"strings"
	"testing"

	"github.com/culprit-dev/culprit/internal/testenv"
)

// A real Rust binary: its own functions carry legacy mangled names
// (_ZN10rustworker12save_session17h…E) and the standard library's v0 names
// (_RNv…); both come out as their authors wrote them.
func TestUserRustBinary(t *testing.T) {
	w := testenv.StartRustWorker(t, testenv.BuildRustWorker(t), "idle")
	s := New(Options{})
	for _, c := range []struct {
		name string
		addr uint64
		want string
	}{
		{"legacy mangling", w.SaveSession, "rustworker::save_session"},
		{"v0 mangling (std)", w.ProcessID, "std::process::id"},
	} {
		t.Run(c.name, func(t *testing.T) {
			f := s.User(w.PID, []uint64{c.addr + 1})[0]
			if f.Func != c.want {
				t.Errorf("Func = %q, want %q (%+v)", f.Func, c.want, f)
			}
			if f.Module != w.Exe {
				t.Errorf("Module = %q, want %q", f.Module, w.Exe)
			}
		})
	}
}

func TestDemangled(t *testing.T) {
	for in, want := range map[string]string{
		"_ZN1w12save_session17h645688450877549aE":                                          "w::save_session",
		"_RNvNvMs0_NtNtNtCsjrHSEGnQ3l9_3std3sys6thread4unixNtB7_6Thread3new12thread_start": "<std::sys::thread::unix::Thread>::new::thread_start",
		"_ZNSt6vectorIiSaIiEE9push_backERKi":                                               "std::vector::push_back",
		"runtime.futex":                                                                    "runtime.futex",
		"_ZN_not_really_mangled":                                                           "_ZN_not_really_mangled",
		"_R":                                                                               "_R",
	} {
		if got := demangled(in); got != want {
			t.Errorf("demangled(%q) = %q, want %q", in, got, want)
		}
	}
	if strings.Contains(demangled("_ZN3foo3barE"), "_ZN") {
		t.Errorf("a plain C++ name was not demangled")
	}
}
