package collectors

import (
	"fmt"
	"os"
	"time"

	"github.com/culprit-dev/culprit/internal/readbuf"
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
func readProcFile(buf *[]byte, path string) ([]byte, error) { return readbuf.File(path, buf) }

// procFile is a /proc file kept open between reads: a collector that reads
// the same file ten times a second saves the open and close (a path walk
// through /proc/PID) each time. A read goes from offset 0, which makes the
// kernel generate the file again.
type procFile struct {
	f    *os.File
	path string
}

func (p *procFile) close() {
	if p.f != nil {
		p.f.Close()
		p.f = nil
	}
}

// read reads the whole file at path into *buf; an error closes it, to be
// opened again next time.
func (p *procFile) read(buf *[]byte, path string) ([]byte, error) {
	if p.f != nil && p.path != path {
		p.close()
	}
	if p.f == nil {
		f, err := os.Open(path)
		if err != nil {
			return nil, fmt.Errorf("open %s: %w", path, err)
		}
		p.f, p.path = f, path
	}
	b, err := readbuf.ReadAt(p.f, buf)
	if err != nil {
		p.close()
		return nil, fmt.Errorf("read %s: %w", path, err)
	}
	return b, nil
}

// fileCache keeps the files a collector reads every cycle open and reads
// each again from offset 0 (pread): one syscall a file a cycle instead of
// open, fstat, read and close, and no buffer allocated. The bytes read are
// valid until the next read. Bounded: past maxCachedFiles paths (a target
// that moved between cgroups) it closes them all and starts over. Not safe
// for concurrent use (one per collector).
type fileCache struct {
	files map[string]*procFile
	buf   []byte
}

const maxCachedFiles = 32

func (c *fileCache) read(path string) ([]byte, error) {
	f := c.files[path]
	if f == nil {
		if len(c.files) >= maxCachedFiles {
			c.close()
		}
		if c.files == nil {
			c.files = make(map[string]*procFile)
		}
		fh, err := os.Open(path)
		if err != nil {
			return nil, err
		}
		f = &procFile{f: fh, path: path}
		c.files[path] = f
	}
	b, err := f.read(&c.buf, path)
	if err != nil {
		delete(c.files, path) // closed by read
	}
	return b, err
}

func (c *fileCache) close() {
	for _, f := range c.files {
		f.close()
	}
	clear(c.files)
}
