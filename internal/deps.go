// Package internal holds the project's internal packages. This file keeps
// in go.mod the modules that features being built import (the OpenTelemetry
// log SDK and exporters for findings as log records, bubbletea and
// lipgloss for `culprit top`), so parallel work does not edit go.mod at
// once. It goes when they are imported for real.
package internal

import (
	_ "github.com/charmbracelet/bubbletea"
	_ "github.com/charmbracelet/lipgloss"
	_ "go.opentelemetry.io/otel/exporters/otlp/otlplog/otlploggrpc"
	_ "go.opentelemetry.io/otel/exporters/otlp/otlplog/otlploghttp"
	_ "go.opentelemetry.io/otel/sdk/log"
)
