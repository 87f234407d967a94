package main

import (
	"io"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"imd/chat"
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

// TestConfigTokenCache: the token cache's TTL reaches the service; 0 turns
// the cache off (a negative TTL for chat.Config), negative is refused.
func TestConfigTokenCache(t *testing.T) {
	t.Parallel()
	parse := func(env map[string]string) (config, error) {
		return parseConfig("serve", nil, func(k string) string { return env[k] }, io.Discard)
	}
	c, err := parse(nil)
	require.NoError(t, err)
	require.Equal(t, chat.DefaultTokenCacheTTL, c.service().TokenCacheTTL)
	c, err = parse(map[string]string{"IMD_TOKEN_CACHE_TTL": "30s"})
	require.NoError(t, err)
	require.Equal(t, 30*time.Second, c.service().TokenCacheTTL)
	c, err = parse(map[string]string{"IMD_TOKEN_CACHE_TTL": "0"})
	require.NoError(t, err)
	require.Negative(t, c.service().TokenCacheTTL, "off")
	_, err = parse(map[string]string{"IMD_TOKEN_CACHE_TTL": "-1s"})
	require.Error(t, err)
}
