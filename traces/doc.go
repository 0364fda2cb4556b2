// Package traces makes culprit an OpenTelemetry trace receiver for its pod:
// OTLP over gRPC and over HTTP/protobuf (or JSON) on localhost, so an app's
// unchanged OTel SDK exporter can point at the sidecar. Received spans are
// validated, reduced to signals.Span and kept in a bounded store that the
// rules read; bad or oversized payloads are rejected with the status OTLP
// prescribes and counted. What is received can also be forwarded to the
// pod's real collector through a bounded queue, so adding culprit does not
// cut the app off its tracing backend.
package traces
