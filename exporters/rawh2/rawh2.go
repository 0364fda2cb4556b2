// Package rawh2 speaks just enough HTTP/2 to send a gRPC request whose
// headers a real client refuses to send: grpc-go honours the server's
// SETTINGS_MAX_HEADER_LIST_SIZE, so a test of that limit needs a client
// that does not. It is for tests of the agent's bounds; nothing in the
// agent uses it.
package rawh2

import (
	"context"
	"encoding/binary"
	"fmt"
	"io"
	"net"
	"time"
)

// Frame types and flags (RFC 9113, section 6).
const (
	frameHeaders      = 0x1
	frameSettings     = 0x4
	frameGoAway       = 0x7
	frameContinuation = 0x9
	flagEndHeaders    = 0x4
	maxFramePayload   = 16384 // SETTINGS_MAX_FRAME_SIZE until the peer says more
)

// Result is what one oversized request did.
type Result struct {
	Written      int64 // bytes of the header block the server took before it stopped us
	ServerClosed bool  // the server closed the connection or sent GOAWAY
	Elapsed      time.Duration
}

// SendHugeHeader dials addr, sends the connection preface and a POST to
// path (a gRPC method) whose header name carries a value of size bytes,
// spread over CONTINUATION frames, and reports how much of it the server
// took before closing the connection. The value is never held in memory:
// the frames reuse one buffer. It stops when the server closes, when
// everything was sent, or when ctx ends.
func SendHugeHeader(ctx context.Context, addr, path, name string, size int) (Result, error) {
	var d net.Dialer
	c, err := d.DialContext(ctx, "tcp", addr)
	if err != nil {
		return Result{}, fmt.Errorf("dial %s: %w", addr, err)
	}
	defer c.Close()
	if dl, ok := ctx.Deadline(); ok {
		c.SetDeadline(dl)
	}
	start := time.Now()
	closed := make(chan struct{})
	go func() { // the server's side: SETTINGS, then GOAWAY or EOF
		defer close(closed)
		readUntilGoAway(c)
	}()

	if _, err := io.WriteString(c, "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"); err != nil {
		return Result{}, fmt.Errorf("write preface: %w", err)
	}
	if err := writeFrame(c, frameSettings, 0, 0, nil); err != nil {
		return Result{}, fmt.Errorf("write settings: %w", err)
	}
	// The header block: the request's pseudo-headers and gRPC headers,
	// then name: <size bytes>, as HPACK literals without indexing.
	var block []byte
	block = append(block, 0x83, 0x86) // :method POST, :scheme http (static table)
	block = literal(block, ":path", path)
	block = literal(block, ":authority", addr)
	block = literal(block, "content-type", "application/grpc")
	block = literal(block, "te", "trailers")
	block = append(block, 0x00)
	block = hpackInt(block, 7, 0, uint64(len(name)))
	block = append(block, name...)
	block = hpackInt(block, 7, 0, uint64(size))

	res := Result{}
	filler := make([]byte, maxFramePayload)
	for i := range filler {
		filler[i] = 'a'
	}
	typ := byte(frameHeaders)
	remaining := size
	first := true
	for {
		payload := block
		if !first || len(payload) == 0 {
			payload = filler[:min(remaining, maxFramePayload)]
		}
		last := !first && remaining <= maxFramePayload
		flags := byte(0)
		if last {
			flags = flagEndHeaders
		}
		select {
		case <-closed:
			res.ServerClosed = true
			res.Elapsed = time.Since(start)
			return res, nil
		default:
		}
		if err := writeFrame(c, typ, flags, 1, payload); err != nil {
			<-closed // the reader ends too: the connection is gone
			res.ServerClosed = true
			res.Elapsed = time.Since(start)
			return res, nil
		}
		if !first {
			res.Written += int64(len(payload))
			remaining -= len(payload)
		}
		if last {
			break
		}
		first, typ = false, frameContinuation
	}
	res.Elapsed = time.Since(start)
	select {
	case <-closed:
		res.ServerClosed = true
	case <-time.After(time.Second):
	}
	return res, nil
}

func literal(b []byte, name, value string) []byte {
	b = append(b, 0x00) // literal header field without indexing, new name
	b = hpackInt(b, 7, 0, uint64(len(name)))
	b = append(b, name...)
	b = hpackInt(b, 7, 0, uint64(len(value)))
	return append(b, value...)
}

// hpackInt appends v with an n-bit prefix (RFC 7541, section 5.1).
func hpackInt(b []byte, n uint, first byte, v uint64) []byte {
	limit := uint64(1)<<n - 1
	if v < limit {
		return append(b, first|byte(v))
	}
	b = append(b, first|byte(limit))
	v -= limit
	for v >= 128 {
		b = append(b, byte(v&0x7f)|0x80)
		v >>= 7
	}
	return append(b, byte(v))
}

func writeFrame(w io.Writer, typ, flags byte, stream uint32, payload []byte) error {
	var h [9]byte
	h[0], h[1], h[2] = byte(len(payload)>>16), byte(len(payload)>>8), byte(len(payload))
	h[3], h[4] = typ, flags
	binary.BigEndian.PutUint32(h[5:], stream&0x7fffffff)
	if _, err := w.Write(h[:]); err != nil {
		return err
	}
	_, err := w.Write(payload)
	return err
}

// readUntilGoAway reads frames until GOAWAY, an error or EOF.
func readUntilGoAway(r io.Reader) {
	var h [9]byte
	for {
		if _, err := io.ReadFull(r, h[:]); err != nil {
			return
		}
		n := int(h[0])<<16 | int(h[1])<<8 | int(h[2])
		if _, err := io.CopyN(io.Discard, r, int64(n)); err != nil {
			return
		}
		if h[3] == frameGoAway {
			return
		}
	}
}
