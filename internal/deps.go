// Package internal holds the project's internal packages. This file kept
// in go.mod the modules that features being built imported before they
// did; they are all imported for real now (the OpenTelemetry log SDK and
// exporters by exporters/otellogs.go), so it holds nothing else.
package internal
