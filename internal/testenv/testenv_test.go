package testenv

import (
	"os"
	"strconv"
	"strings"
	"testing"
)

func TestMain(m *testing.M) { Main(m) }

func TestServerInOwnNetns(t *testing.T) {
	s := Start(t, Options{Backlog: 4, Accept: true})
	self, err := os.Readlink("/proc/self/ns/net")
	if err != nil {
		t.Fatal(err)
	}
	child, err := os.Readlink("/proc/" + strconv.Itoa(s.PID) + "/ns/net")
	if err != nil {
		t.Fatal(err)
	}
	if self == child {
		t.Fatalf("child shares the test's network namespace %s", self)
	}
	if ans := s.MustDo(t, "dial 3"); !strings.HasPrefix(ans, "ok 3 ") {
		t.Fatalf("dial 3 = %q", ans)
	}
	s.MustDo(t, "close")
	if _, err := s.Do("bogus"); err == nil {
		t.Fatal("unknown command accepted")
	}
}
