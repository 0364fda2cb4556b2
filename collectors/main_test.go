package collectors

import (
	"testing"

	"github.com/culprit-dev/culprit/internal/testenv"
)

// TestMain lets testenv re-execute this test binary as the server child.
func TestMain(m *testing.M) { testenv.Main(m) }
