// Makes the OTLP/JSON fixtures beside it: real OTel JS SDK spans, metrics
// and logs, serialized by the real @opentelemetry/otlp-transformer JSON
// serializers (what @opentelemetry/exporter-*-otlp-http sends as
// application/json: hex ids, times as decimal strings). Run with the
// node-app's packages (internal/testenv/testdata/node-app, otlp-transformer
// 0.223.0) on NODE_PATH, or a node_modules link beside it:
//
//	node gen.js .
//
// Ids and times are new at each run; the tests (conformance_test.go) name
// those of the files checked in, so update them with the files.
const api = require('@opentelemetry/api');
const { BasicTracerProvider, InMemorySpanExporter, SimpleSpanProcessor } = require('@opentelemetry/sdk-trace-base');
const { resourceFromAttributes } = require('@opentelemetry/resources');
const { JsonTraceSerializer, JsonMetricsSerializer, JsonLogsSerializer } = require('@opentelemetry/otlp-transformer');
const { MeterProvider, InMemoryMetricExporter, PeriodicExportingMetricReader, AggregationTemporality } = require('@opentelemetry/sdk-metrics');
const { LoggerProvider, InMemoryLogRecordExporter, SimpleLogRecordProcessor } = require('@opentelemetry/sdk-logs');
const fs = require('fs');

const resource = resourceFromAttributes({ 'service.name': 'checkout-js' });
const exp = new InMemorySpanExporter();
const tp = new BasicTracerProvider({ resource, spanProcessors: [new SimpleSpanProcessor(exp)] });
const tr = tp.getTracer('culprit-fixture', '1.0.0');
tr.startActiveSpan('GET /orders/:id', { kind: api.SpanKind.SERVER, attributes: { 'http.route': '/orders/:id', 'http.request.method': 'GET', 'thread.id': 7 } }, (root) => {
  const db = tr.startSpan('SELECT orders', { kind: api.SpanKind.CLIENT, attributes: { 'db.system.name': 'postgresql', 'server.address': 'db.internal' } }, api.trace.setSpan(api.context.active(), root));
  db.end();
  root.setStatus({ code: api.SpanStatusCode.ERROR, message: 'boom' });
  root.end();
});
fs.writeFileSync(process.argv[2] + '/otel-js-traces.json', Buffer.from(JsonTraceSerializer.serializeRequest(exp.getFinishedSpans())));

(async () => {
  const mexp = new InMemoryMetricExporter(AggregationTemporality.CUMULATIVE);
  const reader = new PeriodicExportingMetricReader({ exporter: mexp, exportIntervalMillis: 100000 });
  const mp = new MeterProvider({ resource, readers: [reader] });
  const c = mp.getMeter('culprit-fixture').createCounter('http.server.requests');
  c.add(3, { 'http.route': '/orders/:id' });
  mp.getMeter('culprit-fixture').createHistogram('http.server.duration').record(12.5);
  await reader.forceFlush();
  fs.writeFileSync(process.argv[2] + '/otel-js-metrics.json', Buffer.from(JsonMetricsSerializer.serializeRequest(mexp.getMetrics()[0])));

  const lexp = new InMemoryLogRecordExporter();
  const lp = new LoggerProvider({ resource, processors: [new SimpleLogRecordProcessor({ exporter: lexp })] });
  tr.startActiveSpan('log-parent', (s) => {
    lp.getLogger('culprit-fixture').emit({ body: 'order 42 shipped', severityText: 'INFO', severityNumber: 9, attributes: { 'order.id': 42 }, context: api.trace.setSpan(api.context.active(), s) });
    s.end();
  });
  await lp.forceFlush();
  fs.writeFileSync(process.argv[2] + '/otel-js-logs.json', Buffer.from(JsonLogsSerializer.serializeRequest(lexp.getFinishedLogRecords())));
})();
