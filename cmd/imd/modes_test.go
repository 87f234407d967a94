package main

import (
	"bytes"
	"context"
	"errors"
	"io"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"imd/chat"
	"imd/internal/testenv"
	"imd/store"
)

// Tests of the two modes themselves: which back ends a configuration picks,
// and the refusal to run several nodes without Redis (single.go).

// TestConfigModes: DATABASE_URL and REDIS_URL unset is the embedded mode,
// with the database in the data directory; each URL switches its half.
func TestConfigModes(t *testing.T) {
	t.Parallel()
	parse := func(env map[string]string, args ...string) config {
		t.Helper()
		c, err := parseConfig("serve", args, func(k string) string { return env[k] }, io.Discard)
		require.NoError(t, err)
		return c
	}

	c := parse(nil)
	require.Equal(t, DefaultDataDir, c.dataDir)
	require.Equal(t, "sqlite:"+filepath.Join(DefaultDataDir, EmbeddedDBFile), c.databaseURL)
	require.True(t, c.embeddedDB)
	require.Empty(t, c.redisURL)
	abs, err := filepath.Abs(filepath.Join(DefaultDataDir, EmbeddedDBFile))
	require.NoError(t, err)
	require.True(t, strings.HasPrefix(c.mode(), "embedded: SQLite at "+abs+" "), c.mode())
	require.Contains(t, c.mode(), "in-memory real-time")

	c = parse(map[string]string{"IMD_DATA_DIR": "/var/lib/imd"})
	require.Equal(t, "sqlite:/var/lib/imd/imd.db", c.databaseURL)
	c = parse(map[string]string{"IMD_DATA_DIR": "/var/lib/imd"}, "--data-dir", "/srv/imd")
	require.Equal(t, "sqlite:/srv/imd/imd.db", c.databaseURL)
	file, ok := store.SQLitePath(c.databaseURL)
	require.True(t, ok)
	require.Equal(t, "/srv/imd/imd.db", file)

	c = parse(map[string]string{"DATABASE_URL": "postgres://u:secret@db:5432/imd?sslmode=disable", "REDIS_URL": "redis://:pw@cache:6379/0"})
	require.False(t, c.embeddedDB)
	require.Equal(t, "postgres://u:secret@db:5432/imd?sslmode=disable", c.databaseURL)
	require.Equal(t, "PostgreSQL at postgres://u:xxxxx@db:5432/imd + Redis at redis://:xxxxx@cache:6379/0", c.mode())
	require.NotContains(t, c.mode(), "secret")

	c = parse(map[string]string{"DATABASE_URL": "postgres://db/imd"})
	require.Equal(t, "PostgreSQL at postgres://db/imd + in-memory real-time (REDIS_URL unset: single node)", c.mode())
	c = parse(nil, "--database-url", "sqlite:/tmp/x.db", "--redis-url", "redis://cache:6379/0")
	require.False(t, c.embeddedDB)
	require.Equal(t, "SQLite at /tmp/x.db + Redis at redis://cache:6379/0", c.mode())

	_, err = parseConfig("serve", []string{"--data-dir", ""}, func(string) string { return "" }, io.Discard)
	require.Error(t, err)
}

// startErr runs a node with env expecting it to refuse to start, and
// returns its error.
func startErr(t *testing.T, env map[string]string) error {
	t.Helper()
	full := map[string]string{"IMD_ADDR": "127.0.0.1:0", "IMD_LOG_LEVEL": "error"}
	for k, v := range env {
		full[k] = v
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	var stderr bytes.Buffer
	err := runWith(ctx, nil, func(k string) string { return full[k] }, io.Discard, &stderr,
		options{ready: func(string) { cancel() }})
	require.Error(t, err, "the node started (and was stopped by the test)")
	require.NoError(t, ctx.Err(), "the node did not return before the deadline")
	return err
}

// TestStartRefusesSecondProcessOnDataDir: SQLite (the embedded mode, with or
// without Redis) allows one process per data directory; the second is
// refused at start, and the directory is free again once the first stops.
// No services needed: it runs in both modes.
func TestStartRefusesSecondProcessOnDataDir(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	env := map[string]string{"IMD_ADDR": "127.0.0.1:0", "DATABASE_URL": "", "REDIS_URL": "", "IMD_DATA_DIR": dir,
		"IMD_ADMIN_TOKEN": testAdminToken, "IMD_SEND_RATE": "0", "IMD_LOG_LEVEL": "error"}
	first := runNode(t, env, options{})
	register(t, first.URL, "alice")
	require.FileExists(t, filepath.Join(dir, EmbeddedDBFile))
	b, err := os.ReadFile(filepath.Join(dir, LockFile))
	require.NoError(t, err)
	require.Equal(t, strconv.Itoa(os.Getpid())+"\n", string(b), "the lock file names its holder")

	err = startErr(t, env)
	require.ErrorContains(t, err, "the data directory "+dir+" "+msgDataDirInUse)
	// `imd migrate` must not change the schema under the running server either.
	var stdout bytes.Buffer
	err = runWith(context.Background(), []string{"migrate"}, func(k string) string { return env[k] }, &stdout, io.Discard, options{})
	require.ErrorContains(t, err, msgDataDirInUse)

	// Stopped: a new process may use it, and finds the data.
	first.stop(t)
	second := runNode(t, env, options{})
	r := newClient(t, second.URL, "").do("POST", "/v1/auth/login", map[string]any{"username": "alice", "password": "password-alice"})
	require.Equal(t, 200, r.Status, "%s", r.Body)
}

// TestStartServicesRefusesSecondNodeWithoutRedis: on PostgreSQL, a node
// without REDIS_URL is the only node on its database (schema): a second one,
// with or without Redis, is refused at start, and the lock goes with the
// first node.
func TestStartServicesRefusesSecondNodeWithoutRedis(t *testing.T) {
	t.Parallel()
	db := testenv.DatabaseURL(t)
	env := map[string]string{"IMD_ADDR": "127.0.0.1:0", "DATABASE_URL": db, "REDIS_URL": "", "IMD_ADMIN_TOKEN": testAdminToken, "IMD_LOG_LEVEL": "error"}
	first := runNode(t, env, options{})

	err := startErr(t, env)
	require.ErrorContains(t, err, msgNoRedisElse)
	var ref *refusedError
	require.True(t, errors.As(err, &ref), "%v", err)

	withRedis := map[string]string{"DATABASE_URL": db, "REDIS_URL": testenv.RedisURL(t), "IMD_REDIS_PREFIX": testenv.KeyPrefix(t)}
	require.ErrorContains(t, startErr(t, withRedis), msgRedisNodeRefused)

	// Another schema (another deployment) is not affected.
	other := runNode(t, map[string]string{"IMD_ADDR": "127.0.0.1:0", "DATABASE_URL": testenv.DatabaseURL(t), "IMD_LOG_LEVEL": "error"}, options{})
	require.Equal(t, 200, newClient(t, other.URL, "").do("GET", "/healthz", nil).Status)

	// Released when the first node stops.
	first.stop(t)
	runNode(t, env, options{})
}

// TestStartServicesLockTakenAgain: the lock lives in a PostgreSQL session;
// when that session is lost (here: terminated), the node takes the lock
// again on a new one, and keeps refusing a second node.
func TestStartServicesLockTakenAgain(t *testing.T) {
	t.Parallel()
	db := testenv.DatabaseURL(t)
	env := map[string]string{"IMD_ADDR": "127.0.0.1:0", "DATABASE_URL": db, "REDIS_URL": "", "IMD_LOG_LEVEL": "error"}
	runNode(t, env, options{lockKeepalive: 20 * time.Millisecond})
	admin := apiDB(t, db)
	// The sessions holding the lock of this schema (the two-key form:
	// classid and objid are the keys as unsigned 32-bit numbers).
	holders := func() []int {
		t.Helper()
		var pids []int
		require.NoError(t, admin.Select(&pids, `SELECT pid FROM pg_locks
			WHERE locktype = 'advisory' AND objsubid = 2 AND granted
			  AND database = (SELECT oid FROM pg_database WHERE datname = current_database())
			  AND classid = (hashtext($1)::bigint & 4294967295)::oid
			  AND objid = (hashtext(current_schema())::bigint & 4294967295)::oid`, pgLockNamespace))
		return pids
	}
	before := holders()
	require.Len(t, before, 1)
	var terminated bool
	require.NoError(t, admin.Get(&terminated, `SELECT pg_terminate_backend($1)`, before[0]))
	require.True(t, terminated)
	testenv.Eventually(t, 10*time.Second, func() bool {
		h := holders()
		return len(h) == 1 && h[0] != before[0]
	}, "the lock taken again on a new session")
	require.ErrorContains(t, startErr(t, env), msgNoRedisElse)
}

// TestStartServicesRefusesNodeWithoutRedisAmongRedisNodes: nodes with Redis
// may be many; a node without Redis cannot join them (it would see none of
// their events).
func TestStartServicesRefusesNodeWithoutRedisAmongRedisNodes(t *testing.T) {
	t.Parallel()
	c := newCluster(t)
	c.start(t, nodeOpts{})
	c.start(t, nodeOpts{}) // two with Redis: fine
	err := startErr(t, map[string]string{"DATABASE_URL": c.dbURL, "REDIS_URL": ""})
	require.ErrorContains(t, err, msgNodesWithRedis)
}

// subCounter wraps a node's real-time adapter to count its live
// subscriptions per user: when a long poll or a stream has subscribed, in
// either mode (the Redis tests can also ask Redis, rtNumSub).
type subCounter struct {
	mu sync.Mutex
	n  map[string]int
}

func newSubCounter() *subCounter { return &subCounter{n: map[string]int{}} }

func (c *subCounter) wrap(rt chat.Realtime) chat.Realtime {
	return &countingRealtime{Realtime: rt, c: c}
}

// count is uid's live subscriptions.
func (c *subCounter) count(uid string) int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.n[uid]
}

type countingRealtime struct {
	chat.Realtime
	c *subCounter
}

func (r *countingRealtime) Subscribe(ctx context.Context, uid string) (chat.Subscription, error) {
	s, err := r.Realtime.Subscribe(ctx, uid)
	if err != nil {
		return nil, err
	}
	r.c.mu.Lock()
	r.c.n[uid]++
	r.c.mu.Unlock()
	return &countedSub{Subscription: s, c: r.c, uid: uid}, nil
}

type countedSub struct {
	chat.Subscription
	c    *subCounter
	uid  string
	once sync.Once
}

func (s *countedSub) Close() {
	s.once.Do(func() {
		s.c.mu.Lock()
		s.c.n[s.uid]--
		s.c.mu.Unlock()
	})
	s.Subscription.Close()
}

// rtSubscribed is how many subscriptions uid has: on Redis, what Redis
// counts for the cluster's channel (PUBSUB NUMSUB); embedded, what node n
// holds.
func rtSubscribed(t *testing.T, c *cluster, n *node, uid string) int {
	t.Helper()
	if c.embedded {
		return n.subs.count(uid)
	}
	if c.rdb == nil {
		c.rdb = rtRedis(t)
	}
	return int(rtNumSub(t, c.rdb, c.prefix, uid))
}
