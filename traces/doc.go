// Package traces makes culprit the OpenTelemetry endpoint of its pod: OTLP
// over gRPC and over HTTP (protobuf or JSON, hex ids as the spec says) on
// localhost, so an app's unchanged OTel SDK can point at the sidecar.
// Spans are validated, cut to bounded strings and kept in signals.Spans for
// the rules; metrics and logs, which an SDK sends to the same endpoint,
// are accepted and only forwarded. Everything received can be forwarded to
// the pod's real collector through a queue bounded in requests and bytes,
// so adding culprit does not cut the app off its backend.
//
// The endpoint is reachable by every process in the pod, so it is bounded
// before it authenticates or decodes anything: connections per listener
// (an idle or silent one is evicted for a new one), header sizes and
// timeouts, a deadline on every body or message, and one budget in bytes
// over everything held for requests in flight, bodies and what decoding
// them will take (priced from the encoded bytes before decoding: decoding
// multiplies memory up to 170 times). Bad or oversized input is refused
// with OTLP's status and counted in otlp_requests_total{result}.
package traces
