package traces

import (
	"compress/gzip"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"mime"
	"net"
	"net/http"
	"os"
	"strings"
	"time"

	"google.golang.org/genproto/googleapis/rpc/status"
	"google.golang.org/grpc/codes"
	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"
)

var errBodyTooLarge = errors.New("body larger than traces.max_request_bytes")

// newHTTPServer is OTLP/HTTP, bounded before it reads a body: headers
// within HeaderTimeout and MaxHeaderBytes, a body only once its bytes are
// taken from the in-flight budget, then within ReadTimeout.
func (r *Receiver) newHTTPServer() *http.Server {
	mux := http.NewServeMux()
	for _, k := range allSignals {
		mux.HandleFunc("POST "+k.path, func(w http.ResponseWriter, req *http.Request) { r.serveHTTP(k, w, req) })
	}
	o := r.o
	return &http.Server{
		Handler:           mux,
		ReadHeaderTimeout: o.HeaderTimeout,
		// Outer bounds for every path through a request, the error ones
		// included (the server drains an unread body after the handler);
		// serveHTTP sets tighter deadlines once a request is admitted.
		ReadTimeout:    o.HeaderTimeout + o.InflightWait + o.ReadTimeout,
		WriteTimeout:   o.HeaderTimeout + 2*o.InflightWait + o.ReadTimeout + o.WriteTimeout,
		IdleTimeout:    o.IdleTimeout,
		MaxHeaderBytes: o.MaxHeaderBytes,
		ConnState: func(c net.Conn, st http.ConnState) {
			lc, ok := c.(*limitedConn)
			if !ok {
				return
			}
			switch st {
			case http.StateActive:
				lc.set(connBusy)
			case http.StateIdle:
				lc.set(connIdle)
			}
		},
		ErrorLog: slog.NewLogLogger(o.Log.Handler(), slog.LevelDebug),
	}
}

// serveHTTP is one OTLP/HTTP export: protobuf or JSON, plain or gzipped.
// Errors answer with a google.rpc.Status in the request's encoding.
func (r *Receiver) serveHTTP(k *signalKind, w http.ResponseWriter, req *http.Request) {
	ct, _, _ := mime.ParseMediaType(req.Header.Get("Content-Type"))
	isJSON := ct == "application/json"
	if ct != "application/x-protobuf" && !isJSON {
		r.reply(w, k, "application/x-protobuf", failed("unsupported", http.StatusUnsupportedMediaType, codes.InvalidArgument,
			"Content-Type must be application/x-protobuf or application/json, not %q", req.Header.Get("Content-Type")))
		return
	}
	enc := strings.ToLower(strings.TrimSpace(req.Header.Get("Content-Encoding")))
	gz := enc == "gzip"
	if !gz && enc != "" && enc != "identity" {
		r.reply(w, k, ct, failed("unsupported", http.StatusUnsupportedMediaType, codes.InvalidArgument,
			"Content-Encoding %q is not supported: send gzip or no encoding", enc))
		return
	}
	// The body's bytes are taken from the budget before one is read: its
	// declared length, or, when unknown (chunked, gzip), room for a
	// buffer that grows to the largest request.
	want := 2 * int64(r.o.MaxRequestBytes)
	if !gz && req.ContentLength >= 0 {
		if req.ContentLength > int64(r.o.MaxRequestBytes) {
			r.reply(w, k, ct, r.tooLarge())
			return
		}
		want = req.ContentLength
	}
	h := &hold{b: r.budget}
	defer h.release()
	if err := h.grow(req.Context(), want, r.o.InflightWait); err != nil {
		r.reply(w, k, ct, busy(err))
		return
	}
	rc := http.NewResponseController(w)
	_ = rc.SetReadDeadline(time.Now().Add(r.o.ReadTimeout)) // a client sending a byte a second is cut here
	body, err := r.readBody(req, gz)
	var maxErr *http.MaxBytesError
	switch {
	case errors.Is(err, errBodyTooLarge), errors.As(err, &maxErr):
		r.reply(w, k, ct, r.tooLarge())
		return
	case isTimeout(err):
		r.reply(w, k, ct, failed("timeout", http.StatusRequestTimeout, codes.DeadlineExceeded,
			"the body did not arrive within traces.read_timeout (%s)", r.o.ReadTimeout))
		return
	case err != nil:
		r.reply(w, k, ct, failed("malformed", http.StatusBadRequest, codes.InvalidArgument, "read body: %v", err))
		return
	}
	_ = rc.SetWriteDeadline(time.Now().Add(r.o.InflightWait + r.o.WriteTimeout))
	r.reply(w, k, ct, r.export(req.Context(), k, "http", body, isJSON, h))
}

// readBody reads the whole body: into one buffer of the declared length,
// or, when that is unknown, a growing one of at most MaxRequestBytes
// (decompressed, for gzip: a small zip bomb must not become a large
// allocation).
func (r *Receiver) readBody(req *http.Request, gz bool) ([]byte, error) {
	limit := int64(r.o.MaxRequestBytes)
	if !gz && req.ContentLength >= 0 {
		b := make([]byte, req.ContentLength)
		if _, err := io.ReadFull(req.Body, b); err != nil {
			return nil, fmt.Errorf("read %d-byte body: %w", req.ContentLength, err)
		}
		return b, nil
	}
	var src io.Reader = http.MaxBytesReader(nil, req.Body, 2*limit) // compressed bytes, bounded too
	if gz {
		zr, err := gzip.NewReader(src)
		if err != nil {
			if isTimeout(err) {
				return nil, err
			}
			return nil, fmt.Errorf("bad gzip body: %w", err)
		}
		defer zr.Close()
		src = zr
	}
	b, err := io.ReadAll(io.LimitReader(src, limit+1))
	if err != nil {
		if gz && !isTimeout(err) {
			return nil, fmt.Errorf("bad gzip body: %w", err)
		}
		return nil, err
	}
	if int64(len(b)) > limit {
		return nil, errBodyTooLarge
	}
	return b, nil
}

func isTimeout(err error) bool {
	var ne net.Error
	return errors.Is(err, os.ErrDeadlineExceeded) || (errors.As(err, &ne) && ne.Timeout())
}

// reply counts the request and writes its answer.
func (r *Receiver) reply(w http.ResponseWriter, k *signalKind, ct string, o outcome) {
	r.count("http", k, o.result)
	code := http.StatusOK
	msg := o.resp
	if msg == nil {
		code = o.httpCode
		msg = &status.Status{Code: int32(o.code), Message: o.msg}
	}
	if o.result == "busy" {
		w.Header().Set("Retry-After", "1") // OTLP clients honour it on 503
	}
	writeMessage(w, ct, code, msg)
}

func writeMessage(w http.ResponseWriter, ct string, httpCode int, m proto.Message) {
	var b []byte
	if ct == "application/json" {
		b, _ = protojson.Marshal(m) // a message we built: cannot fail
	} else {
		b, _ = proto.Marshal(m)
	}
	w.Header().Set("Content-Type", ct)
	w.WriteHeader(httpCode)
	_, _ = w.Write(b)
}
