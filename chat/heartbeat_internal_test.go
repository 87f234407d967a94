package chat

import (
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

// TestBeatPhase: streams opened together beat at phases spread over the
// whole period, and start at every point of the backstop cycle, so that
// their presence refreshes and backstops do not all come at once.
func TestBeatPhase(t *testing.T) {
	const every = time.Second
	var quarters [4]int
	var cycle [backstopEvery]int
	for range 2000 {
		first, beats := beatPhase(every)
		require.Greater(t, first, time.Duration(0))
		require.LessOrEqual(t, first, every)
		quarters[min(int(first*4/every), 3)]++
		require.GreaterOrEqual(t, beats, 0)
		require.Less(t, beats, backstopEvery)
		cycle[beats]++
	}
	// Uniform: ~500 each. Any of them under 300 in 2000 draws has a chance
	// below 1e-40.
	for q, n := range quarters {
		require.Greater(t, n, 300, "first beats in quarter %d of the period", q)
	}
	for b, n := range cycle {
		require.Greater(t, n, 300, "streams starting at beat %d of the backstop cycle", b)
	}
}
