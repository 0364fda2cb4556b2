package testenv

import (
	"context"
	"errors"
	"os"
	"strconv"
	"testing"
	"time"
)

// A real redis-server in a namespace of its own: it answers, a healthy
// load sees no error, and DEBUG SLEEP holds up another client's PING for
// as long as it sleeps.
func TestRedis(t *testing.T) {
	r := StartRedis(t, RedisOptions{})
	self, _ := os.Readlink("/proc/self/ns/net")
	if ns, _ := os.Readlink("/proc/" + strconv.Itoa(r.PID) + "/ns/net"); ns == self {
		t.Fatalf("redis shares the test's network namespace %s", self)
	}
	t.Logf("redis %s, pid %d, %s", r.Version, r.PID, r.Addr)
	c := r.MustDial(t)
	if v, err := c.Do("SET", "k", "v\r\n binary"); err != nil || v != "OK" {
		t.Fatalf("SET = %v, %v", v, err)
	}
	if v, err := c.Do("GET", "k"); err != nil || v != "v\r\n binary" {
		t.Fatalf("GET = %q, %v", v, err)
	}
	if v, err := c.Do("GET", "missing"); err != nil || v != nil {
		t.Fatalf("GET missing = %v, %v", v, err)
	}
	if v, err := c.Do("INCRBY", "n", "41"); err != nil || v != int64(41) {
		t.Fatalf("INCRBY = %v, %v", v, err)
	}
	if _, err := c.Do("RPUSH", "l", "a", "b"); err != nil {
		t.Fatal(err)
	}
	if v, err := c.Do("LRANGE", "l", "0", "-1"); err != nil || len(v.([]any)) != 2 || v.([]any)[1] != "b" {
		t.Fatalf("LRANGE = %v, %v", v, err)
	}
	var re RedisError
	if _, err := c.Do("NOSUCHCOMMAND"); !errors.As(err, &re) {
		t.Fatalf("unknown command: %v, want a RedisError", err)
	}
	if v, err := c.Do("PING"); err != nil || v != "PONG" {
		t.Fatalf("PING after an error reply = %v, %v", v, err)
	}

	load := r.StartLoad(t, RedisLoadOptions{Conns: 3, Rate: 300})
	time.Sleep(time.Second)
	st := load.Stop()
	t.Logf("healthy load: %v", st)
	if st.Errors > 0 || st.Requests < 150 || st.Conns != 3 {
		t.Errorf("healthy load: %v (first error %v)", st, st.FirstError)
	}

	const sleep = time.Second
	done := r.StartDebugSleep(t, sleep)
	start := time.Now()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	other, err := r.Dial(ctx) // the connect completes in the kernel; PING waits
	if err != nil {
		t.Fatal(err)
	}
	defer other.Close()
	if v, err := other.Do("PING"); err != nil || v != "PONG" {
		t.Fatalf("PING during DEBUG SLEEP = %v, %v", v, err)
	}
	held := time.Since(start)
	if err := <-done; err != nil {
		t.Fatalf("DEBUG SLEEP: %v", err)
	}
	t.Logf("PING held up %v by DEBUG SLEEP %v", held, sleep)
	if held < sleep*8/10 {
		t.Errorf("PING answered after %v, during a DEBUG SLEEP of %v", held, sleep)
	}
}
