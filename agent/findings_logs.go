package main

import (
	"context"
	"fmt"
	"os"

	"github.com/culprit-dev/culprit/exporters"
	"github.com/culprit-dev/culprit/signals"
)

// This file wires the OTLP logs exporter of finding events
// (findings.otlp_*): a collector gets findings as log records beside the
// app's own, without a client of the gRPC API.

// startFindingsLogs exports finding events as OTLP log records when
// findings.otlp_endpoint is set. It reads the journal as a watcher does:
// the rules never wait for it.
func (a *Agent) startFindingsLogs(ctx context.Context, cfg Config) error {
	f := cfg.Findings
	if f.OTLPEndpoint == "" {
		a.Store.SetStatus(signals.Status{Component: "otlp_logs", Kind: "exporter", State: signals.StateDisabled, Detail: "findings.otlp_endpoint is empty"})
		return nil
	}
	fl, err := exporters.NewFindingsLogs(exporters.FindingsLogsOptions{
		Journal: a.Journal, Store: a.Store, Resource: a.resource, InstanceID: a.grpcSvc.InstanceID(), Version: version,
		Log: a.log.With("component", "otlp_logs"), Endpoint: f.OTLPEndpoint, Protocol: f.OTLPProtocol, Environ: os.Environ(),
		Queue: f.OTLPQueue, QueueBytes: f.OTLPQueueBytes, Batch: f.OTLPBatch, Interval: f.OTLPInterval, Timeout: f.OTLPTimeout,
	})
	if err != nil {
		return &ConfigError{Key: "findings.otlp_endpoint", Err: fmt.Errorf("export findings as OTLP log records: %w", err)}
	}
	a.logs = fl
	a.Store.SetStatus(signals.Status{Component: "otlp_logs", Kind: "exporter", State: signals.StateRunning, Detail: fl.Protocol() + " " + fl.Endpoint()})
	a.goRun(func() { fl.Run(ctx) })
	return nil
}
