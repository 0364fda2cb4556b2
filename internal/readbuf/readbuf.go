package readbuf

import (
	"fmt"
	"io"
	"os"
)

// ReadAt reads all of f, from offset 0, into *buf, growing it as needed,
// and returns the bytes read (valid until the next read into *buf). A read
// from offset 0 makes the kernel generate a /proc file again, so a file
// kept open reads fresh every time.
func ReadAt(f io.ReaderAt, buf *[]byte) ([]byte, error) {
	b := (*buf)[:0]
	for {
		if len(b) == cap(b) {
			b = append(b, 0)[:len(b)]
		}
		n, err := f.ReadAt(b[len(b):cap(b)], int64(len(b)))
		b = b[:len(b)+n]
		if err == io.EOF || (err == nil && n == 0) {
			*buf = b
			return b, nil
		}
		if err != nil {
			*buf = b
			return nil, err
		}
	}
}

// File opens path, reads it whole into *buf (ReadAt) and closes it.
func File(path string, buf *[]byte) ([]byte, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("open %s: %w", path, err)
	}
	defer f.Close()
	b, err := ReadAt(f, buf)
	if err != nil {
		return nil, fmt.Errorf("read %s: %w", path, err)
	}
	return b, nil
}
