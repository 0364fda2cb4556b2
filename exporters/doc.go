// Package exporters publishes what the agent knows to the outside world: a
// gRPC Diagnostics service (a resumable stream of finding events read from
// the rules.Journal, plus list, get and a snapshot of every signal, with the
// standard health service and server reflection so grpcurl needs no proto
// files) and a Prometheus collector that renders the signal store, the open
// findings and the agent's own bounds at scrape time. Both only read: they
// hold no copy of the data, so a slow client or scraper costs a cursor or a
// scrape, never memory in the pipeline that collects signals and runs rules.
package exporters
