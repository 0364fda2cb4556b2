'use strict';
// A real Express service traced by the OpenTelemetry JS SDK: a target for
// culprit's tests (internal/testenv/node.go). Run with
// `node --perf-basic-prof server.js`, so that JIT-compiled JavaScript
// functions are named in /tmp/perf-PID.map.
//
// Routes:
//   /                   answers at once
//   /exec?ms=N          exportReportSync: execSync('sleep N/1000') (default
//                       800 ms). The event loop waits for the child in a
//                       nested epoll_pwait: every other request waits too.
//   /pbkdf2?ms=N        hashPasswordSync: crypto.pbkdf2Sync, round after
//                       round, for about N ms (default 500): CPU work on
//                       the event loop.
//
// Environment: PORT (0 picks one), OTEL_EXPORTER_OTLP_ENDPOINT (OTLP over
// HTTP/protobuf; no exporter when unset), OTEL_SERVICE_NAME.
// It prints "listening PORT" once it serves.

// The SDK first: instrumentations patch http and express as they load.
const { NodeTracerProvider, BatchSpanProcessor } = require('@opentelemetry/sdk-trace-node');
const { OTLPTraceExporter } = require('@opentelemetry/exporter-trace-otlp-proto');
const { registerInstrumentations } = require('@opentelemetry/instrumentation');
const { HttpInstrumentation } = require('@opentelemetry/instrumentation-http');
const { ExpressInstrumentation } = require('@opentelemetry/instrumentation-express');
const { resourceFromAttributes } = require('@opentelemetry/resources');

const spanProcessors = [];
if (process.env.OTEL_EXPORTER_OTLP_ENDPOINT || process.env.OTEL_EXPORTER_OTLP_TRACES_ENDPOINT) {
  // The exporter reads the endpoint from the environment, as an unchanged
  // app's would. A short delay, so tests see spans within a second.
  spanProcessors.push(new BatchSpanProcessor(new OTLPTraceExporter(), { scheduledDelayMillis: 100 }));
}
const provider = new NodeTracerProvider({
  resource: resourceFromAttributes({ 'service.name': process.env.OTEL_SERVICE_NAME || 'culprit-node-app' }),
  spanProcessors,
});
provider.register();
registerInstrumentations({ instrumentations: [new HttpInstrumentation(), new ExpressInstrumentation()] });

const crypto = require('crypto');
const { execSync } = require('child_process');
const express = require('express');

// ms reads the ms query parameter: a whole number of 0..60000, or def.
function ms(req, def) {
  if (req.query.ms === undefined) return def;
  const n = Number(req.query.ms);
  if (!Number.isInteger(n) || n < 0 || n > 60000) throw new RangeError(`ms must be 0..60000, got ${req.query.ms}`);
  return n;
}

// exportReportSync shells out and waits: a synchronous child process on the
// event loop.
function exportReportSync(millis) {
  execSync(`sleep ${(millis / 1000).toFixed(3)}`);
  return millis;
}

// hashPasswordSync derives keys synchronously for about millis ms:
// OpenSSL's PBKDF2 on the event loop's thread, in rounds of a fixed number
// of iterations until the time is up, so that the event loop is blocked as
// long on a fast machine as on a loaded one.
function hashPasswordSync(password, millis) {
  const deadline = process.hrtime.bigint() + BigInt(millis) * 1000000n;
  const perRound = 5000;
  let key;
  let rounds = 0;
  do {
    key = crypto.pbkdf2Sync(password, 'culprit-salt', perRound, 64, 'sha512');
    rounds++;
  } while (process.hrtime.bigint() < deadline);
  return { key: key.toString('hex').slice(0, 16), iterations: rounds * perRound };
}

const app = express();

app.get('/', (req, res) => {
  res.type('text/plain').send('ok\n');
});

app.get('/exec', (req, res) => {
  const took = exportReportSync(ms(req, 800));
  res.type('text/plain').send(`exported after ${took} ms\n`);
});

app.get('/pbkdf2', (req, res) => {
  const { key, iterations } = hashPasswordSync('correct horse battery staple', ms(req, 500));
  res.type('text/plain').send(`key ${key} (${iterations} iterations)\n`);
});

app.use((err, req, res, next) => {
  if (res.headersSent) return next(err);
  res.status(err instanceof RangeError ? 400 : 500).type('text/plain').send(`${err.message}\n`);
});

const server = app.listen(Number(process.env.PORT || 0), '127.0.0.1', () => {
  console.log(`listening ${server.address().port}`);
});

// On SIGTERM: stop accepting, send the spans still batched, exit.
process.on('SIGTERM', () => {
  server.close();
  setTimeout(() => process.exit(0), 2000).unref();
  provider.shutdown().finally(() => process.exit(0));
});
