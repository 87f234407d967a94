// Package testenv gives every test in imd its own slice of the real PostgreSQL
// and Redis that scripts/test provides.
//
// Why real services: the guarantees imd makes (durable acks, idempotency by a
// UNIQUE constraint, gap-free seq under row locks, Lua scripts, Pub/Sub) live in
// PostgreSQL and Redis themselves, so a mock would test our assumptions about
// them instead of them. Why a fresh schema and key prefix per test: tests can
// run in parallel and in any order without seeing each other's rows or keys,
// and without a slow per-test database or server.
//
//   - [DatabaseURL] creates an empty schema and returns DATABASE_URL with
//     search_path set to it (lib/pq sends unknown URL parameters as run-time
//     parameters), so migrations and queries land in that schema unchanged.
//     Use built-in functions such as gen_random_uuid() rather than extensions:
//     CREATE EXTENSION is per database, not per schema.
//   - [RedisURL] returns REDIS_URL; [KeyPrefix] returns a prefix for every key
//     and channel the code under test writes, and deletes those keys afterwards.
//   - [Eventually] is the only way to wait for something asynchronous: it polls
//     with a deadline, so tests never sleep for a guessed duration.
//
// An unreachable service fails the test (t.Fatal), never skips it: a skipped
// test proves nothing. Run the suite with scripts/test, which starts private
// services when none are configured.
package testenv

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"net/url"
	"os"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/jmoiron/sqlx"
	_ "github.com/lib/pq" // the "postgres" driver
	"github.com/redis/go-redis/v9"
)

// Defaults match scripts/services.sh, so `go test` works without scripts/test
// when PostgreSQL and Redis run on their standard local ports.
const (
	DefaultDatabaseURL = "postgres://postgres@127.0.0.1:5432/postgres?sslmode=disable"
	DefaultRedisURL    = "redis://127.0.0.1:6379/0"
)

// connectTimeout bounds every setup and cleanup call, so a hung service fails
// the test with a message instead of running into the global test timeout.
const connectTimeout = 10 * time.Second

// Pools are shared by all tests of a test binary and never closed: they are
// only used for schema and key bookkeeping.
var (
	mu       sync.Mutex
	adminDBs = map[string]*sqlx.DB{}
	clients  = map[string]*redis.Client{}
)

func baseDatabaseURL() string {
	if u := os.Getenv("DATABASE_URL"); u != "" {
		return u
	}
	return DefaultDatabaseURL
}

func baseRedisURL() string {
	if u := os.Getenv("REDIS_URL"); u != "" {
		return u
	}
	return DefaultRedisURL
}

func adminDB(dsn string) (*sqlx.DB, error) {
	mu.Lock()
	defer mu.Unlock()
	if db, ok := adminDBs[dsn]; ok {
		return db, nil
	}
	db, err := sqlx.Open("postgres", dsn)
	if err != nil {
		return nil, err
	}
	db.SetMaxOpenConns(8)
	db.SetMaxIdleConns(2)
	adminDBs[dsn] = db
	return db, nil
}

func redisClient(rawURL string) (*redis.Client, error) {
	mu.Lock()
	defer mu.Unlock()
	if c, ok := clients[rawURL]; ok {
		return c, nil
	}
	opts, err := redis.ParseURL(rawURL)
	if err != nil {
		return nil, err
	}
	c := redis.NewClient(opts)
	clients[rawURL] = c
	return c, nil
}

func randomHex(nbytes int) string {
	b := make([]byte, nbytes)
	_, _ = rand.Read(b) // never fails (crypto/rand panics instead)
	return hex.EncodeToString(b)
}

// DatabaseURL returns a connection URL for a new, empty PostgreSQL schema that
// only this test uses: DATABASE_URL (default [DefaultDatabaseURL]) with
// search_path=<schema>. The schema is dropped with everything in it when the
// test ends. Register the closing of your own pool with t.Cleanup after calling
// DatabaseURL (cleanups run last-in first-out, so it closes before the drop);
// idle connections don't matter, but an open transaction blocks the drop.
func DatabaseURL(t testing.TB) string {
	t.Helper()
	base := baseDatabaseURL()
	db, err := adminDB(base)
	if err != nil {
		t.Fatalf("testenv: DATABASE_URL %q is not usable: %v", redact(base), err)
		return ""
	}
	ctx, cancel := context.WithTimeout(context.Background(), connectTimeout)
	defer cancel()
	if err := db.PingContext(ctx); err != nil {
		t.Fatalf("testenv: PostgreSQL at %s is not reachable: %v\n"+
			"Run the tests with scripts/test: it uses DATABASE_URL or starts a private PostgreSQL.",
			redact(base), err)
		return ""
	}
	withSchema, schema, err := newSchemaURL(base)
	if err != nil {
		t.Fatalf("testenv: DATABASE_URL %q: %v", redact(base), err)
		return ""
	}
	if _, err := db.ExecContext(ctx, "CREATE SCHEMA "+schema); err != nil {
		t.Fatalf("testenv: create schema %s: %v", schema, err)
		return ""
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), connectTimeout)
		defer cancel()
		if _, err := db.ExecContext(ctx, "DROP SCHEMA IF EXISTS "+schema+" CASCADE"); err != nil {
			t.Errorf("testenv: drop schema %s: %v (a connection of this test still holds a transaction open?)", schema, err)
		}
	})
	return withSchema
}

// newSchemaURL picks a fresh schema name and returns base with its search_path
// set to it. base may be a URL or a key=value connection string.
func newSchemaURL(base string) (dsn, schema string, err error) {
	schema = "t_" + randomHex(8) // lower case: a valid unquoted identifier
	if !strings.HasPrefix(base, "postgres://") && !strings.HasPrefix(base, "postgresql://") {
		return base + " search_path=" + schema, schema, nil
	}
	u, err := url.Parse(base)
	if err != nil {
		return "", "", err
	}
	q := u.Query()
	q.Set("search_path", schema)
	u.RawQuery = q.Encode()
	return u.String(), schema, nil
}

// RedisURL returns REDIS_URL (default [DefaultRedisURL]) after checking that
// Redis answers there. Name every key and channel with [KeyPrefix].
func RedisURL(t testing.TB) string {
	t.Helper()
	raw := baseRedisURL()
	c, err := redisClient(raw)
	if err != nil {
		t.Fatalf("testenv: REDIS_URL %q is not usable: %v", redact(raw), err)
		return ""
	}
	ctx, cancel := context.WithTimeout(context.Background(), connectTimeout)
	defer cancel()
	if err := c.Ping(ctx).Err(); err != nil {
		t.Fatalf("testenv: Redis at %s does not answer PING: %v\n"+
			"Run the tests with scripts/test: it uses REDIS_URL or starts a private Redis.",
			redact(raw), err)
		return ""
	}
	return raw
}

// KeyPrefix returns a prefix such as "t3f9a0c1d2e4b5a69:" unique to this test,
// for all Redis keys and channels it creates. When the test ends, every key
// starting with it is deleted (SCAN + UNLINK), in the database of REDIS_URL.
func KeyPrefix(t testing.TB) string {
	t.Helper()
	raw := RedisURL(t)
	c, err := redisClient(raw)
	if err != nil {
		t.Fatalf("testenv: %v", err)
		return ""
	}
	prefix := "t" + randomHex(8) + ":" // hex: no glob characters to escape in MATCH
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), connectTimeout)
		defer cancel()
		if err := deleteKeys(ctx, c, prefix+"*"); err != nil {
			t.Errorf("testenv: delete keys %s*: %v", prefix, err)
		}
	})
	return prefix
}

func deleteKeys(ctx context.Context, c *redis.Client, match string) error {
	var cursor uint64
	for {
		keys, next, err := c.Scan(ctx, cursor, match, 500).Result()
		if err != nil {
			return err
		}
		if len(keys) > 0 {
			if err := c.Unlink(ctx, keys...).Err(); err != nil {
				return err
			}
		}
		if next == 0 {
			return nil
		}
		cursor = next
	}
}

// pollInterval is short because conditions are cheap local checks and a slow
// poll would dominate the run time of real-time tests.
const pollInterval = 5 * time.Millisecond

// Eventually calls cond every 5 ms until it returns true, and fails the test
// with t.Fatalf if that has not happened within timeout. msgAndArgs, if given,
// is a format string and its arguments describing what was awaited. Like
// t.Fatalf, call it from the test's goroutine; cond runs on that goroutine too.
func Eventually(t testing.TB, timeout time.Duration, cond func() bool, msgAndArgs ...any) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	ticker := time.NewTicker(pollInterval)
	defer ticker.Stop()
	for {
		if cond() {
			return
		}
		if !time.Now().Before(deadline) {
			t.Fatalf("testenv: condition not met within %v: %s", timeout, describe(msgAndArgs))
			return
		}
		<-ticker.C
	}
}

func describe(msgAndArgs []any) string {
	if len(msgAndArgs) == 0 {
		return "(no description)"
	}
	if format, ok := msgAndArgs[0].(string); ok {
		return fmt.Sprintf(format, msgAndArgs[1:]...)
	}
	return fmt.Sprint(msgAndArgs...)
}

// redact hides a password in a URL before it is printed.
func redact(raw string) string {
	u, err := url.Parse(raw)
	if err != nil || u.User == nil {
		return raw
	}
	return u.Redacted()
}
