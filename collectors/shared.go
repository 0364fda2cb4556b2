package collectors

import (
	"fmt"
	"io"
	"os"
	"time"

	"github.com/culprit-dev/culprit/signals"
)

// sample is one value a pure parse function produces; Collect methods write
// a batch of them with one timestamp so that a rule comparing two signals
// of the same collector compares values read together.
type sample struct {
	Desc   *signals.Desc
	Labels signals.Labels
	Value  float64
}

func putSamples(store *signals.Store, t time.Time, ss []sample) {
	for _, s := range ss {
		store.Put(s.Desc, s.Labels, s.Value, t)
	}
}

// procRootOf returns Options.ProcRoot, defaulting to /proc.
func procRootOf(o Options) string {
	if o.ProcRoot == "" {
		return "/proc"
	}
	return o.ProcRoot
}

// readProcFile reads a small /proc file into *buf, reusing its storage:
// without stat, because procfs reports size 0, and without a new
// allocation per call for collectors that read many such files per tick.
func readProcFile(buf *[]byte, path string) ([]byte, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("open %s: %w", path, err)
	}
	defer f.Close()
	b := (*buf)[:0]
	for {
		if len(b) == cap(b) {
			b = append(b, 0)[:len(b)]
		}
		n, err := f.Read(b[len(b):cap(b)])
		b = b[:len(b)+n]
		if err == io.EOF {
			*buf = b
			return b, nil
		}
		if err != nil {
			*buf = b
			return nil, fmt.Errorf("read %s: %w", path, err)
		}
	}
}
