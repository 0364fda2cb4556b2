package traces

import (
	"encoding/hex"
	"errors"
	"fmt"
	"strings"
	"time"
	"unicode/utf8"

	commonpb "go.opentelemetry.io/proto/otlp/common/v1"
	tracepb "go.opentelemetry.io/proto/otlp/trace/v1"

	"github.com/culprit-dev/culprit/signals"
)

var (
	errTraceID = errors.New("trace_id must be 16 bytes, not all zero")
	errSpanID  = errors.New("span_id must be 8 bytes, not all zero")
	errTimes   = errors.New("end_time_unix_nano before start_time_unix_nano, or unset")
)

// converter turns OTLP spans into signals.Span, cutting every string it
// keeps to maxString bytes: a span's strings are kept for minutes, and a
// client's 4 MB span names once held 430 MB of heap through the store.
type converter struct {
	maxString int
	truncated int // strings cut
}

// convert turns OTLP resource spans into spans, skipping (and counting)
// the invalid ones; the first error explains the rejections.
func (c *converter) convert(rss []*tracepb.ResourceSpans) (out []signals.Span, rejected int, first error) {
	for _, rs := range rss {
		service := c.cut(attrString(rs.GetResource().GetAttributes(), "service.name"))
		for _, ss := range rs.GetScopeSpans() {
			for _, sp := range ss.GetSpans() {
				s, err := c.convertSpan(sp, service)
				if err != nil {
					rejected++
					if first == nil {
						first = fmt.Errorf("span %q: %w", c.quote(sp.GetName()), err)
					}
					continue
				}
				out = append(out, s)
			}
		}
	}
	return out, rejected, first
}

func (c *converter) convertSpan(sp *tracepb.Span, service string) (signals.Span, error) {
	if !validID(sp.GetTraceId(), 16) {
		return signals.Span{}, errTraceID
	}
	if !validID(sp.GetSpanId(), 8) {
		return signals.Span{}, errSpanID
	}
	st, en := sp.GetStartTimeUnixNano(), sp.GetEndTimeUnixNano()
	if st == 0 || en < st {
		return signals.Span{}, errTimes
	}
	attrs := sp.GetAttributes()
	s := signals.Span{
		TraceID:  hex.EncodeToString(sp.GetTraceId()),
		SpanID:   hex.EncodeToString(sp.GetSpanId()),
		Service:  service,
		Name:     c.cut(sp.GetName()),
		Route:    c.cut(attrString(attrs, "http.route")),
		Kind:     signals.SpanKind(sp.GetKind()),
		Start:    time.Unix(0, int64(st)),
		End:      time.Unix(0, int64(en)),
		Error:    sp.GetStatus().GetCode() == tracepb.Status_STATUS_CODE_ERROR,
		DBSystem: c.cut(firstString(attrs, "db.system.name", "db.system")),
		Peer:     c.cut(firstString(attrs, "server.address", "net.peer.name", "peer.service")),
		ThreadID: int(attrInt(attrs, "thread.id")),
	}
	if len(sp.GetParentSpanId()) == 8 {
		s.ParentID = hex.EncodeToString(sp.GetParentSpanId())
	}
	if s.Route == "" {
		s.Route = s.Name
	}
	return s, nil
}

// cut returns s, or its first maxString bytes (whole UTF-8 characters) in
// a copy of their own: a substring would keep the whole original alive.
func (c *converter) cut(s string) string {
	if len(s) <= c.maxString {
		return s
	}
	c.truncated++
	return strings.Clone(s[:utf8Prefix(s, c.maxString)])
}

// quote is s cut for an error message, without counting it.
func (c *converter) quote(s string) string {
	if len(s) <= c.maxString {
		return s
	}
	return s[:utf8Prefix(s, c.maxString)] + "..."
}

// utf8Prefix is the length of the longest prefix of s of at most n bytes
// that does not split a character.
func utf8Prefix(s string, n int) int {
	for n > 0 && n < len(s) && !utf8.RuneStart(s[n]) {
		n--
	}
	return n
}

func validID(b []byte, n int) bool {
	if len(b) != n {
		return false
	}
	for _, c := range b {
		if c != 0 {
			return true
		}
	}
	return false
}

func attrString(kvs []*commonpb.KeyValue, key string) string {
	for _, kv := range kvs {
		if kv.GetKey() == key {
			return kv.GetValue().GetStringValue()
		}
	}
	return ""
}

func firstString(kvs []*commonpb.KeyValue, keys ...string) string {
	for _, k := range keys {
		if v := attrString(kvs, k); v != "" {
			return v
		}
	}
	return ""
}

func attrInt(kvs []*commonpb.KeyValue, key string) int64 {
	for _, kv := range kvs {
		if kv.GetKey() == key {
			return kv.GetValue().GetIntValue()
		}
	}
	return 0
}
