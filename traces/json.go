package traces

import (
	"encoding/base64"
	"encoding/hex"
	"errors"
)

// jsonIDFields are OTLP's trace and span id fields, by JSON key, with their
// length in bytes. OTLP/JSON writes them in hex (the spec's one deviation
// from the proto3 JSON mapping), in every message that has them (Span,
// Link, LogRecord, Exemplar); protojson reads bytes fields as base64 only.
// The proto names are accepted as protojson accepts them.
var jsonIDFields = map[string]int{
	"traceId": 16, "trace_id": 16,
	"spanId": 8, "span_id": 8,
	"parentSpanId": 8, "parent_span_id": 8,
}

var errUnterminated = errors.New("unterminated JSON string")

// jsonShape is what a JSON body holds, for the decode cost estimate.
type jsonShape struct {
	objects, arrays int // each object becomes a message, each array a slice
	commas          int // at most one more element each (of arrays of numbers, say)
	hexIDs          int // ids rewritten from hex
}

// prepareJSON rewrites, in place, the hex-encoded ids of an OTLP/JSON body
// to base64 for protojson, and counts its objects and arrays. An id value
// is taken as hex when it is exactly twice its byte length of hex digits
// (32 for a trace id, 16 for a span id): base64 of the right length is 24
// or 22 characters for a trace id, 12 or 11 for a span id, so the two
// cannot be confused, and lenient clients that send base64 (the plain
// proto3 mapping) still work. Anything else is left for protojson to
// judge. Base64 is shorter than hex, so the output never overtakes the
// input and no second buffer is needed.
func prepareJSON(b []byte) ([]byte, jsonShape, error) {
	var sh jsonShape
	w := 0 // output index, never ahead of the input index i
	for i := 0; i < len(b); {
		switch c := b[i]; c {
		case '"':
			end := stringEnd(b, i)
			if end < 0 {
				return nil, sh, errUnterminated
			}
			keyStart := w
			w += copy(b[w:], b[i:end])
			key := b[keyStart+1 : w-1]
			i = end
			n, isID := jsonIDFields[string(key)] // no allocation: the compiler looks up without converting
			if !isID {
				continue
			}
			j := skipSpace(b, i)
			if j >= len(b) || b[j] != ':' {
				continue // a value that happens to read "traceId", not a key
			}
			j = skipSpace(b, j+1)
			if j >= len(b) || b[j] != '"' {
				continue
			}
			vend := stringEnd(b, j)
			if vend < 0 {
				return nil, sh, errUnterminated
			}
			val := b[j+1 : vend-1]
			if len(val) != 2*n || !isHex(val) {
				continue // base64, empty, or wrong: protojson decides
			}
			var raw [16]byte
			if _, err := hex.Decode(raw[:n], val); err != nil {
				continue
			}
			w += copy(b[w:], b[i:j]) // the colon and spaces
			b[w] = '"'
			base64.StdEncoding.Encode(b[w+1:], raw[:n])
			w += 1 + base64.StdEncoding.EncodedLen(n)
			b[w] = '"'
			w++
			i = vend
			sh.hexIDs++
		case '{':
			sh.objects++
			b[w] = c
			w, i = w+1, i+1
		case '[':
			sh.arrays++
			b[w] = c
			w, i = w+1, i+1
		case ',':
			sh.commas++
			b[w] = c
			w, i = w+1, i+1
		default:
			b[w] = c
			w, i = w+1, i+1
		}
	}
	return b[:w], sh, nil
}

// stringEnd returns the index after the closing quote of the JSON string
// that opens at b[i], or -1.
func stringEnd(b []byte, i int) int {
	for j := i + 1; j < len(b); j++ {
		switch b[j] {
		case '\\':
			j++ // the escaped byte; \u's hex digits need no care
		case '"':
			return j + 1
		}
	}
	return -1
}

func skipSpace(b []byte, i int) int {
	for i < len(b) && (b[i] == ' ' || b[i] == '\t' || b[i] == '\n' || b[i] == '\r') {
		i++
	}
	return i
}

func isHex(b []byte) bool {
	for _, c := range b {
		if !('0' <= c && c <= '9' || 'a' <= c && c <= 'f' || 'A' <= c && c <= 'F') {
			return false
		}
	}
	return true
}

// jsonCost estimates the heap protojson takes to decode a body of n bytes
// with this shape: every object a message struct (OTLP's largest, a Span,
// is under 300 bytes, plus its slot in a slice and the decoder's garbage:
// 384 in all), every array a growing slice, every element a slot of up
// to 8 bytes in it (16 with the slice doubling), and the strings and the
// tokenizer's garbage, twice the text. Measured against the real decoder
// in TestDecodeCostBoundsTheHeap: from 1.15 times what it allocates
// (empty objects) to 3.6 times (nested values); a realistic 4 MB export is
// priced 45 MB and fits the default budget.
func jsonCost(n int, sh jsonShape) int64 {
	return int64(sh.objects)*384 + int64(sh.arrays)*64 + int64(sh.commas)*16 + 2*int64(n)
}
