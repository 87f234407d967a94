package main

import (
	"io"
	"testing"

	"github.com/stretchr/testify/require"

	"imd/chat"
)

// TestConfigFanoutFast: the fan-out fast path's group size defaults to
// chat's with Redis and to off without, can be set by flag or environment,
// 0 turns it off (chat's -1), and a negative size or not a number is
// refused naming IMD_FANOUT_FAST.
func TestConfigFanoutFast(t *testing.T) {
	t.Parallel()
	parse := func(env map[string]string, args ...string) (config, error) {
		return parseConfig("serve", args, func(k string) string { return env[k] }, io.Discard)
	}
	c, err := parse(map[string]string{"REDIS_URL": "redis://127.0.0.1:6379/0"})
	require.NoError(t, err)
	require.Equal(t, chat.DefaultFanoutFast, c.service().FanoutFast)
	c, err = parse(nil)
	require.NoError(t, err)
	require.Negative(t, c.service().FanoutFast, "off by default without Redis (in-memory logs)")
	c, err = parse(nil, "--fanout-fast", "32")
	require.NoError(t, err)
	require.Equal(t, 32, c.service().FanoutFast, "unless asked for")

	c, err = parse(map[string]string{"IMD_FANOUT_FAST": "2"})
	require.NoError(t, err)
	require.Equal(t, 2, c.service().FanoutFast)
	c, err = parse(nil, "--fanout-fast", "100")
	require.NoError(t, err)
	require.Equal(t, 100, c.service().FanoutFast)
	c, err = parse(map[string]string{"IMD_FANOUT_FAST": "0"})
	require.NoError(t, err)
	require.Negative(t, c.service().FanoutFast, "0 is off, which chat.Config spells negative")

	for _, v := range []string{"-1", "many"} {
		_, err = parse(map[string]string{"IMD_FANOUT_FAST": v})
		require.ErrorContains(t, err, "IMD_FANOUT_FAST", v)
	}
}
