package main

import (
	"io"
	"testing"

	"github.com/stretchr/testify/require"

	"imd/store"
)

// TestConfigSendLanes: the store's send lanes default to store's one, can be
// set by flag or environment, and a count out of range or not a number is
// refused with an error naming IMD_SEND_LANES rather than left to the store.
func TestConfigSendLanes(t *testing.T) {
	t.Parallel()
	parse := func(env map[string]string, args ...string) (config, error) {
		return parseConfig("serve", args, func(k string) string { return env[k] }, io.Discard)
	}
	c, err := parse(nil)
	require.NoError(t, err)
	require.Equal(t, store.DefaultSendLanes, c.sendLanes)
	require.Len(t, c.store(), 1)

	c, err = parse(map[string]string{"IMD_SEND_LANES": "2"})
	require.NoError(t, err)
	require.Equal(t, 2, c.sendLanes)
	c, err = parse(nil, "--send-lanes", "4")
	require.NoError(t, err)
	require.Equal(t, 4, c.sendLanes)

	for _, v := range []string{"0", "-1", "many", "1000"} {
		_, err = parse(map[string]string{"IMD_SEND_LANES": v})
		require.ErrorContains(t, err, "IMD_SEND_LANES", v)
	}
}
