package testenv

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"
)

// Redis is a real redis-server on 127.0.0.1 in its network namespace,
// with a private config: no persistence (save "", appendonly no), DEBUG
// allowed (redis 7 refuses it by default), logging to LogPath. PID is the
// server; its main thread (tid = PID) runs the event loop that every
// command goes through.
type Redis struct {
	*Process
	Addr    string // 127.0.0.1:PORT inside Netns
	Version string // "7.0.15"
}

// RedisOptions for StartRedis.
type RedisOptions struct {
	// Netns to serve in; nil makes a fresh private one.
	Netns *Netns
	// Config is extra redis.conf lines ("maxclients 64").
	Config []string
}

var redisVersion = regexp.MustCompile(`\bv=(\d+)\.(\d+)\.(\d+)`)

// StartRedis starts redis-server and waits until it answers PING.
func StartRedis(t testing.TB, o RedisOptions) *Redis {
	t.Helper()
	exe := lookProgram(t, "redis-server", "apt-get install redis-server")
	out, err := exec.Command(exe, "--version").Output()
	if err != nil {
		t.Fatalf("testenv: %s --version: %v", exe, err)
	}
	m := redisVersion.FindStringSubmatch(string(out))
	if m == nil {
		t.Fatalf("testenv: %s --version printed %q", exe, out)
	}
	major, _ := strconv.Atoi(m[1])
	ns := o.Netns
	if ns == nil {
		ns = NewNetns(t)
	}
	port, err := ns.FreePort()
	if err != nil {
		t.Fatalf("testenv: redis port: %v", err)
	}
	dir := t.TempDir()
	conf := []string{
		"# culprit testenv: a private redis (internal/testenv/redis.go)",
		"bind 127.0.0.1",
		"port " + strconv.Itoa(port),
		"daemonize no",
		`save ""`,
		"appendonly no",
		"dir " + dir,
		`logfile ""`, // stdout, which is LogPath
	}
	if major >= 7 {
		// DEBUG SLEEP is how tests block the event loop; 7.0 turned the
		// DEBUG command off by default (older versions reject the line).
		conf = append(conf, "enable-debug-command yes")
	}
	confPath := filepath.Join(dir, "redis.conf")
	if err := os.WriteFile(confPath, []byte(strings.Join(append(conf, o.Config...), "\n")+"\n"), 0o644); err != nil {
		t.Fatalf("testenv: redis config: %v", err)
	}
	p := startProcess(t, ns, dir, exe, []string{confPath}, nil)
	r := &Redis{Process: p, Addr: net.JoinHostPort("127.0.0.1", strconv.Itoa(port)), Version: m[1] + "." + m[2] + "." + m[3]}
	p.waitFor(t, "answering PING", 10*time.Second, func() error {
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		defer cancel()
		c, err := r.Dial(ctx)
		if err != nil {
			return err
		}
		defer c.Close()
		v, err := c.Do("PING")
		if err != nil {
			return err
		}
		if v != "PONG" {
			return fmt.Errorf("PING answered %v", v)
		}
		return nil
	})
	return r
}

// RedisConn is one client connection speaking RESP2. It is not safe for
// concurrent use (neither is a real one).
type RedisConn struct {
	c net.Conn
	r *bufio.Reader
	w *bufio.Writer
	// Timeout bounds each command, from sending to the whole reply
	// (default 30 s).
	Timeout time.Duration
}

// Dial connects to the server from inside its namespace.
func (r *Redis) Dial(ctx context.Context) (*RedisConn, error) {
	c, err := r.Netns.DialContext(ctx, "tcp", r.Addr)
	if err != nil {
		return nil, fmt.Errorf("redis: %w", err)
	}
	return &RedisConn{c: c, r: bufio.NewReader(c), w: bufio.NewWriter(c), Timeout: 30 * time.Second}, nil
}

// MustDial is Dial that fails the test on error; the connection closes
// when the test ends.
func (r *Redis) MustDial(t testing.TB) *RedisConn {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	c, err := r.Dial(ctx)
	if err != nil {
		t.Fatalf("testenv: %v", err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// Close closes the connection.
func (c *RedisConn) Close() error { return c.c.Close() }

// RedisError is an error reply ("-ERR ..."): the server's answer, not a
// failure to talk to it.
type RedisError string

func (e RedisError) Error() string { return "redis: " + string(e) }

// Do sends one command and reads its reply: a string (simple or bulk),
// an int64, nil (a null bulk or array), or []any. An error reply is
// returned as a RedisError.
func (c *RedisConn) Do(args ...string) (any, error) {
	if len(args) == 0 {
		return nil, errors.New("redis: empty command")
	}
	if err := c.Send(args...); err != nil {
		return nil, err
	}
	return c.Receive()
}

// Send writes one command without reading its reply (for a command that
// blocks the server, whose reply Receive waits for later).
func (c *RedisConn) Send(args ...string) error {
	if err := c.c.SetDeadline(time.Now().Add(c.Timeout)); err != nil {
		return fmt.Errorf("redis: deadline: %w", err)
	}
	fmt.Fprintf(c.w, "*%d\r\n", len(args))
	for _, a := range args {
		fmt.Fprintf(c.w, "$%d\r\n%s\r\n", len(a), a)
	}
	if err := c.w.Flush(); err != nil {
		return fmt.Errorf("redis: send %s: %w", args[0], err)
	}
	return nil
}

// Receive reads one reply.
func (c *RedisConn) Receive() (any, error) {
	if err := c.c.SetDeadline(time.Now().Add(c.Timeout)); err != nil {
		return nil, fmt.Errorf("redis: deadline: %w", err)
	}
	v, err := c.reply(0)
	if err != nil {
		var re RedisError
		if errors.As(err, &re) {
			return nil, re
		}
		return nil, fmt.Errorf("redis: read reply: %w", err)
	}
	return v, nil
}

// maxBulk bounds one bulk string: a test's values are small, and a
// corrupt length must not become a huge allocation.
const maxBulk = 64 << 20

func (c *RedisConn) reply(depth int) (any, error) {
	if depth > 16 {
		return nil, errors.New("arrays nested too deep")
	}
	line, err := c.r.ReadString('\n')
	if err != nil {
		return nil, err
	}
	if len(line) < 3 || !strings.HasSuffix(line, "\r\n") {
		return nil, fmt.Errorf("bad reply line %q", line)
	}
	kind, rest := line[0], line[1:len(line)-2]
	switch kind {
	case '+':
		return rest, nil
	case '-':
		return nil, RedisError(rest)
	case ':':
		n, err := strconv.ParseInt(rest, 10, 64)
		if err != nil {
			return nil, fmt.Errorf("integer reply %q: %w", rest, err)
		}
		return n, nil
	case '$':
		n, err := strconv.Atoi(rest)
		if err != nil || n < -1 || n > maxBulk {
			return nil, fmt.Errorf("bulk length %q", rest)
		}
		if n == -1 {
			return nil, nil
		}
		b := make([]byte, n+2)
		if _, err := io.ReadFull(c.r, b); err != nil {
			return nil, err
		}
		if string(b[n:]) != "\r\n" {
			return nil, errors.New("bulk string not ended by CRLF")
		}
		return string(b[:n]), nil
	case '*':
		n, err := strconv.Atoi(rest)
		if err != nil || n < -1 || n > 1<<20 {
			return nil, fmt.Errorf("array length %q", rest)
		}
		if n == -1 {
			return nil, nil
		}
		out := make([]any, 0, n)
		for range n {
			v, err := c.reply(depth + 1)
			var re RedisError
			if errors.As(err, &re) {
				out = append(out, re) // an error inside an array (EXEC) is a value
				continue
			}
			if err != nil {
				return nil, err
			}
			out = append(out, v)
		}
		return out, nil
	}
	return nil, fmt.Errorf("unknown reply type %q", kind)
}

// StartDebugSleep sends DEBUG SLEEP d on a connection of its own, which
// blocks redis's event loop for d: every other client waits. It returns
// once the server's main thread is asleep in it (read from
// /proc/PID/task/PID/wchan), so whatever the test sends next is held up.
// The channel receives the command's result when redis answers.
func (r *Redis) StartDebugSleep(t testing.TB, d time.Duration) <-chan error {
	t.Helper()
	c := r.MustDial(t)
	c.Timeout = d + 30*time.Second
	secs := strconv.FormatFloat(d.Seconds(), 'f', 3, 64)
	if err := c.Send("DEBUG", "SLEEP", secs); err != nil {
		t.Fatalf("testenv: %v", err)
	}
	res := make(chan error, 1)
	go func() {
		v, err := c.Receive()
		if err == nil && v != "OK" {
			err = fmt.Errorf("DEBUG SLEEP answered %v", v)
		}
		res <- err
	}()
	wchan := fmt.Sprintf("/proc/%d/task/%d/wchan", r.PID, r.PID)
	deadline := time.Now().Add(5 * time.Second)
	for {
		b, err := os.ReadFile(wchan)
		if err == nil && strings.Contains(string(b), "nanosleep") {
			return res
		}
		select {
		case err := <-res:
			// Answered before we saw it sleep (a very short d).
			out := make(chan error, 1)
			out <- err
			return out
		default:
		}
		if time.Now().After(deadline) {
			t.Fatalf("testenv: redis's main thread not asleep in DEBUG SLEEP after 5 s (wchan %q, %v)", b, err)
		}
		time.Sleep(time.Millisecond)
	}
}

// RedisLoadOptions for Redis.StartLoad: a healthy steady load.
type RedisLoadOptions struct {
	// Conns is how many client connections (default 4).
	Conns int
	// Rate is commands per second over all connections (default 200).
	Rate float64
	// Duration bounds the load (default and at most 10 minutes).
	Duration time.Duration
}

// StartLoad runs clients that cycle PING, SET key value, GET key (and
// check each reply) at a steady rate until Stop. Each command is one
// request of the stats.
func (r *Redis) StartLoad(t testing.TB, o RedisLoadOptions) *Load {
	t.Helper()
	worker := 0
	return startLoad(t, o.Conns, o.Rate, o.Duration, func(l *Load) loadWorker {
		worker++
		key := fmt.Sprintf("culprit:load:%d", worker)
		var c *RedisConn
		step := 0
		return loadWorker{
			op: func(ctx context.Context) error {
				if c == nil {
					var err error
					l.dialed()
					if c, err = r.Dial(ctx); err != nil {
						return err
					}
				}
				step++
				var want any
				var args []string
				switch step % 3 {
				case 1:
					args, want = []string{"PING"}, "PONG"
				case 2:
					args, want = []string{"SET", key, strconv.Itoa(step)}, "OK"
				default:
					args, want = []string{"GET", key}, strconv.Itoa(step-1)
				}
				v, err := c.Do(args...)
				if err == nil && v != want {
					err = fmt.Errorf("%s answered %v, want %v", args[0], v, want)
				}
				if err != nil {
					step = 0 // start the cycle again: a GET must follow its SET
					var re RedisError
					if !errors.As(err, &re) {
						c.Close() // a broken connection: the next op redials
						c = nil
					}
					return err
				}
				return nil
			},
			close: func() {
				if c != nil {
					c.Close()
				}
			},
		}
	})
}
