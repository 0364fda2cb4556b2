package main

import (
	"errors"
	"strings"
	"testing"
)

// Any agent.conf either parses into a valid config or is refused with a
// ConfigError naming the file; never a panic.
func FuzzParseConfig(f *testing.F) {
	f.Add([]byte("[agent]\nhttp_addr = \"127.0.0.1:9461\"\n"))
	f.Add([]byte("[signals]\nring_size = 3\n"))
	f.Add([]byte("[rules.accept_overflow]\nwindow = \"1h\"\nrecent = \"2h\"\n"))
	f.Add([]byte("[probes\nenabled = tru"))
	f.Add([]byte("[traces]\nmax_spans = -1\n[rules.workers]\nthreads = \"(\"\n"))
	f.Fuzz(func(t *testing.T, data []byte) {
		cfg, err := ParseConfig("fuzz.conf", data)
		if err != nil {
			var ce *ConfigError
			if !errors.As(err, &ce) && !strings.Contains(err.Error(), "fuzz.conf") {
				t.Fatalf("error neither a ConfigError nor naming the file: %v", err)
			}
			return
		}
		if err := cfg.Validate(); err != nil {
			t.Fatalf("ParseConfig returned a config that does not validate: %v", err)
		}
	})
}
