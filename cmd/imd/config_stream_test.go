package main

import (
	"io"
	"testing"

	"github.com/stretchr/testify/require"
)

// TestConfigStreamEventBuffer: the per-stream event buffer is imd's own
// default (smaller than realtime's, docs/performance.md "idle"), reaches the
// realtime adapters, and can be set; zero or less is refused rather than
// silently becoming realtime's default.
func TestConfigStreamEventBuffer(t *testing.T) {
	t.Parallel()
	parse := func(env map[string]string, args ...string) (config, error) {
		return parseConfig("serve", args, func(k string) string { return env[k] }, io.Discard)
	}
	c, err := parse(nil)
	require.NoError(t, err)
	require.Equal(t, DefaultStreamEventBuffer, c.realtime().EventBuffer)

	c, err = parse(map[string]string{"IMD_STREAM_EVENT_BUFFER": "64"})
	require.NoError(t, err)
	require.Equal(t, 64, c.realtime().EventBuffer)
	c, err = parse(nil, "--stream-event-buffer", "4")
	require.NoError(t, err)
	require.Equal(t, 4, c.realtime().EventBuffer)

	for _, v := range []string{"0", "-1", "many"} {
		_, err = parse(map[string]string{"IMD_STREAM_EVENT_BUFFER": v})
		require.Error(t, err, v)
	}
}
