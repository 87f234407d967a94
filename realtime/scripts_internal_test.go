package realtime

import (
	"context"
	"testing"

	"github.com/redis/go-redis/v9"
	"github.com/stretchr/testify/require"

	"imd/internal/testenv"
)

// A restarted Redis has forgotten our scripts: a pipeline of EVALSHA then
// gets NOSCRIPT replies, and exactly those calls must run again (each call
// runs once: appends are not to be doubled).
func TestRunScriptsLoadsUnknownScripts(t *testing.T) {
	t.Parallel()
	prefix := testenv.KeyPrefix(t)
	opts, err := redis.ParseURL(testenv.RedisURL(t))
	require.NoError(t, err)
	rdb := redis.NewClient(opts)
	t.Cleanup(func() { _ = rdb.Close() })
	r := New(rdb, Config{Prefix: prefix})
	t.Cleanup(func() { _ = r.Close() })

	// The prefix makes the script text, hence its SHA, new to the server.
	s := redis.NewScript("-- " + prefix + "\nreturn redis.call('INCR', KEYS[1])")
	calls := []scriptCall{{keys: []string{prefix + "a"}}, {keys: []string{prefix + "b"}}, {keys: []string{prefix + "a"}}}
	cmds, err := r.runScripts(context.Background(), s, calls)
	require.NoError(t, err)
	var got []int64
	for _, c := range cmds {
		n, err := c.Int64()
		require.NoError(t, err)
		got = append(got, n)
	}
	require.Equal(t, []int64{1, 1, 2}, got)
}
