package main

import (
	"strings"

	"github.com/culprit-dev/culprit/signals"
	"github.com/culprit-dev/culprit/traces"
)

// This file wires the OTLP receiver of the app's spans ([traces]) and
// the forwarder that passes them on to the pod's own collector.

// startTraces runs the OTLP receiver. A port already taken (a collector
// sidecar on 4317) costs the trace findings, not the agent: said loudly,
// and in the snapshot.
func (a *Agent) startTraces(cfg Config) {
	lost := a.lost(signals.ReceiverOTLP)
	if !cfg.Traces.Enabled {
		a.Store.SetStatus(signals.Status{Component: signals.ReceiverOTLP, Kind: signals.KindReceiver, State: signals.StateDisabled, Detail: "traces.enabled = false", Lost: lost})
		return
	}
	log := a.log.With("component", signals.ReceiverOTLP)
	if cfg.Traces.ForwardEndpoint != "" {
		fw, err := traces.NewForwarderOptions(traces.ForwardOptions{
			Endpoint: cfg.Traces.ForwardEndpoint, Queue: cfg.Traces.ForwardQueue, QueueBytes: cfg.Traces.ForwardQueueBytes,
			Store: a.Store, Log: log,
		})
		if err != nil {
			log.Warn("cannot forward spans; receiving them only", "endpoint", cfg.Traces.ForwardEndpoint, "err", err)
		} else {
			a.forward = fw
		}
	}
	t := cfg.Traces
	r := traces.NewReceiver(traces.Options{
		GRPCAddr: t.GRPCAddr, HTTPAddr: t.HTTPAddr,
		MaxRequestBytes: t.MaxRequestBytes, MaxInflightBytes: t.MaxInflightBytes, InflightWait: t.InflightWait,
		MaxConnections: t.MaxConnections, GRPCMaxStreams: t.GRPCMaxStreams, MaxHeaderBytes: t.MaxHeaderBytes,
		HeaderTimeout: t.HeaderTimeout, ReadTimeout: t.ReadTimeout, WriteTimeout: t.WriteTimeout, IdleTimeout: t.IdleTimeout,
		MaxStringBytes: t.MaxStringBytes,
		Spans:          a.Spans, Store: a.Store, Forward: a.forward, Log: log,
	})
	if err := r.Start(); err != nil {
		log.Warn("OTLP receiver unavailable; continuing without traces", "err", err, "lost", strings.Join(lost, "; "))
		a.Store.SetStatus(signals.Status{Component: signals.ReceiverOTLP, Kind: signals.KindReceiver, State: signals.StateFailed, Detail: err.Error(), Lost: lost})
		return
	}
	a.otlp = r
	a.OTLPGRPCAddr, a.OTLPHTTPAddr = r.GRPCAddr, r.HTTPAddr
	a.Store.SetStatus(signals.Status{Component: signals.ReceiverOTLP, Kind: signals.KindReceiver, State: signals.StateRunning, Detail: "grpc " + r.GRPCAddr + ", http " + r.HTTPAddr})
}
