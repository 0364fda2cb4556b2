// Package readbuf reads small /proc files whole into a buffer the caller
// keeps between reads: without stat, because procfs reports their size as
// 0, and without an allocation per read, for collectors and the
// symbolizer that read such files every cycle.
package readbuf
