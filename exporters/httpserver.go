package exporters

import (
	"fmt"
	"log/slog"
	"net/http"
	"time"
)

// HTTPLimits bound the metrics and health server. Zero fields take
// DefaultHTTPLimits.
type HTTPLimits struct {
	MaxConns          int           // open connections; the longest idle goes first when full
	ReadHeaderTimeout time.Duration // request line and headers
	ReadTimeout       time.Duration // the whole request
	WriteTimeout      time.Duration // from the end of the headers to the end of the response
	IdleTimeout       time.Duration // a keep-alive connection between requests
	MaxHeaderBytes    int           // request line and headers
	MaxBodyBytes      int64         // every endpoint is a GET: a larger body is refused with 413
}

// DefaultHTTPLimits are the limits used for zero fields.
func DefaultHTTPLimits() HTTPLimits {
	return HTTPLimits{
		MaxConns:          256,
		ReadHeaderTimeout: 5 * time.Second,
		ReadTimeout:       10 * time.Second,
		WriteTimeout:      30 * time.Second, // a scrape of many series to a slow reader
		IdleTimeout:       60 * time.Second,
		MaxHeaderBytes:    16 << 10,
		MaxBodyBytes:      4 << 10,
	}
}

func (l HTTPLimits) withDefaults() HTTPLimits {
	d := DefaultHTTPLimits()
	if l.MaxConns <= 0 {
		l.MaxConns = d.MaxConns
	}
	if l.ReadHeaderTimeout <= 0 {
		l.ReadHeaderTimeout = d.ReadHeaderTimeout
	}
	if l.ReadTimeout <= 0 {
		l.ReadTimeout = d.ReadTimeout
	}
	if l.WriteTimeout <= 0 {
		l.WriteTimeout = d.WriteTimeout
	}
	if l.IdleTimeout <= 0 {
		l.IdleTimeout = d.IdleTimeout
	}
	if l.MaxHeaderBytes <= 0 {
		l.MaxHeaderBytes = d.MaxHeaderBytes
	}
	if l.MaxBodyBytes <= 0 {
		l.MaxBodyBytes = d.MaxBodyBytes
	}
	return l
}

// NewHTTPServer returns a bounded server for h: requests and responses
// have deadlines, headers and bodies have sizes, and each request marks
// its connection busy until its response is done. Serve it on a
// ConnLimiter of lim.MaxConns connections marked ForHTTP (a connection
// counts as busy only from a complete request to its response, so slow
// senders and idle keep-alives make room for a probe).
func NewHTTPServer(h http.Handler, lim HTTPLimits, log *slog.Logger) *http.Server {
	lim = lim.withDefaults()
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	return &http.Server{
		Handler:           boundedHandler(h, lim.MaxBodyBytes),
		ReadHeaderTimeout: lim.ReadHeaderTimeout,
		ReadTimeout:       lim.ReadTimeout,
		WriteTimeout:      lim.WriteTimeout,
		IdleTimeout:       lim.IdleTimeout,
		MaxHeaderBytes:    lim.MaxHeaderBytes,
		ConnContext:       connContext,
		ConnState:         connState,
		// Per-connection errors (timeouts, resets) are the flood's
		// noise, not the agent's: debug level.
		ErrorLog: slog.NewLogLogger(log.Handler(), slog.LevelDebug),
	}
}

// boundedHandler marks the connection busy while h runs and refuses
// bodies: no endpoint reads one, and the server would otherwise drain up
// to 256 KiB of it to reuse the connection.
func boundedHandler(h http.Handler, maxBody int64) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		done := markBusy(r.Context())
		defer done()
		if r.ContentLength > maxBody || (r.ContentLength < 0 && len(r.TransferEncoding) > 0) {
			w.Header().Set("Connection", "close")
			http.Error(w, fmt.Sprintf("request body over %d bytes: these endpoints take none", maxBody), http.StatusRequestEntityTooLarge)
			return
		}
		r.Body = http.MaxBytesReader(w, r.Body, maxBody)
		h.ServeHTTP(w, r)
	})
}
