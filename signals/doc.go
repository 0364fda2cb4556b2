// Package signals is the agent's signal store: every measurement a collector
// or probe makes lands here as a sample in a labelled series, each series a
// ring buffer of fixed size, and the number of series itself is capped, so
// the agent's memory does not grow with the app's behaviour. Rules and
// exporters only read from it; nothing downstream writes back.
//
// Every signal is declared once, in the catalogue (catalog.go): writers
// put through its Descs and readers read through the same ones, since the
// store's read methods take a *Desc, not a name.
package signals
