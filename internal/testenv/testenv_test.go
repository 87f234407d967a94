package testenv

import (
	"context"
	"fmt"
	"net/url"
	"runtime"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/jmoiron/sqlx"
	"github.com/redis/go-redis/v9"
)

func open(t *testing.T, dsn string) *sqlx.DB {
	t.Helper()
	db, err := sqlx.Connect("postgres", dsn)
	if err != nil {
		t.Fatalf("connect: %v", err)
	}
	t.Cleanup(func() { db.Close() })
	return db
}

func schemaOf(t *testing.T, dsn string) string {
	t.Helper()
	u, err := url.Parse(dsn)
	if err != nil {
		t.Fatal(err)
	}
	s := u.Query().Get("search_path")
	if !strings.HasPrefix(s, "t_") {
		t.Fatalf("search_path in %q = %q, want a t_ schema", dsn, s)
	}
	return s
}

func schemaExists(t *testing.T, db *sqlx.DB, schema string) bool {
	t.Helper()
	var n int
	if err := db.Get(&n, `SELECT count(*) FROM pg_namespace WHERE nspname = $1`, schema); err != nil {
		t.Fatal(err)
	}
	return n == 1
}

// The URL parameter must reach the server as a run-time parameter on every
// pooled connection, not just be accepted by the driver.
func TestDatabaseURLSetsSearchPath(t *testing.T) {
	t.Parallel()
	t.Logf("PostgreSQL %s, Redis %s", redact(baseDatabaseURL()), redact(baseRedisURL()))
	dsn := DatabaseURL(t)
	schema := schemaOf(t, dsn)
	db := open(t, dsn)
	db.SetMaxOpenConns(3)

	for i := 0; i < 3; i++ { // hold three connections at once: all of them
		conn, err := db.Connx(context.Background())
		if err != nil {
			t.Fatal(err)
		}
		defer conn.Close()
		var current, path string
		if err := conn.GetContext(context.Background(), &current, `SELECT current_schema()`); err != nil {
			t.Fatal(err)
		}
		if err := conn.GetContext(context.Background(), &path, `SHOW search_path`); err != nil {
			t.Fatal(err)
		}
		if current != schema || path != schema {
			t.Fatalf("conn %d: current_schema()=%q, search_path=%q; want %q", i, current, path, schema)
		}
	}
}

func TestDatabaseURLSchemasAreIsolated(t *testing.T) {
	t.Parallel()
	a, b := open(t, DatabaseURL(t)), open(t, DatabaseURL(t))
	for db, name := range map[*sqlx.DB]string{a: "alice", b: "bob"} {
		// Unqualified names: they resolve through search_path, as in the store.
		db.MustExec(`CREATE TABLE users (name text PRIMARY KEY)`)
		db.MustExec(`INSERT INTO users (name) VALUES ($1)`, name)
	}
	for db, want := range map[*sqlx.DB]string{a: "alice", b: "bob"} {
		var names []string
		if err := db.Select(&names, `SELECT name FROM users`); err != nil {
			t.Fatal(err)
		}
		if len(names) != 1 || names[0] != want {
			t.Fatalf("users = %v, want [%s]", names, want)
		}
	}
}

func TestDatabaseURLDropsSchemaAfterTest(t *testing.T) {
	t.Parallel()
	var schema string
	t.Run("user", func(t *testing.T) {
		dsn := DatabaseURL(t)
		schema = schemaOf(t, dsn)
		db := open(t, dsn) // closed before the drop: registered later
		db.MustExec(`CREATE TABLE messages (id bigint)`)
		db.MustExec(`INSERT INTO messages VALUES (1)`)
	})
	admin := open(t, baseDatabaseURL())
	if schemaExists(t, admin, schema) {
		t.Fatalf("schema %s still exists after its test ended", schema)
	}
}

func TestKeyPrefixDeletesOnlyItsKeys(t *testing.T) {
	t.Parallel()
	opts, err := redis.ParseURL(RedisURL(t))
	if err != nil {
		t.Fatal(err)
	}
	rdb := redis.NewClient(opts)
	t.Cleanup(func() { rdb.Close() })
	ctx := context.Background()
	outer := KeyPrefix(t) // a neighbour's keys, which must survive

	rdb.Set(ctx, outer+"keep", "1", 0)
	var inner string
	t.Run("user", func(t *testing.T) {
		inner = KeyPrefix(t)
		if inner == outer || !strings.HasSuffix(inner, ":") {
			t.Fatalf("prefixes %q and %q", inner, outer)
		}
		pipe := rdb.Pipeline()
		for i := 0; i < 1200; i++ { // more than one SCAN page
			pipe.Set(ctx, fmt.Sprintf("%suser:%d", inner, i), i, 0)
		}
		pipe.RPush(ctx, inner+"offline:{u1}", "e1", "e2")
		if _, err := pipe.Exec(ctx); err != nil {
			t.Fatal(err)
		}
	})

	left, err := rdb.Keys(ctx, inner+"*").Result()
	if err != nil {
		t.Fatal(err)
	}
	if len(left) != 0 {
		t.Fatalf("%d keys with prefix %s left after cleanup, e.g. %s", len(left), inner, left[0])
	}
	if n, _ := rdb.Exists(ctx, outer+"keep").Result(); n != 1 {
		t.Fatalf("cleanup of %s deleted the neighbour key %skeep", inner, outer)
	}
}

// fakeTB records a fatal failure and ends its goroutine, as testing.T does.
type fakeTB struct {
	testing.TB
	mu     sync.Mutex
	failed string
}

func (f *fakeTB) Helper() {}
func (f *fakeTB) Fatalf(format string, args ...any) {
	f.mu.Lock()
	f.failed = fmt.Sprintf(format, args...)
	f.mu.Unlock()
	runtime.Goexit()
}

// runFake runs fn with a fakeTB on its own goroutine and returns the fatal
// message, or "" if fn returned normally.
func runFake(fn func(tb testing.TB)) string {
	f := &fakeTB{}
	done := make(chan struct{})
	go func() {
		defer close(done)
		fn(f)
	}()
	<-done
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.failed
}

func TestUnreachableServicesFailInsteadOfSkipping(t *testing.T) {
	// Ports nothing listens on.
	t.Setenv("DATABASE_URL", "postgres://postgres@127.0.0.1:1/postgres?sslmode=disable&connect_timeout=2")
	t.Setenv("REDIS_URL", "redis://127.0.0.1:1/0")
	msg := runFake(func(tb testing.TB) { DatabaseURL(tb) })
	if !strings.Contains(msg, "scripts/test") {
		t.Errorf("DatabaseURL with PostgreSQL down: fatal message %q, want a pointer to scripts/test", msg)
	}
	msg = runFake(func(tb testing.TB) { RedisURL(tb) })
	if !strings.Contains(msg, "scripts/test") {
		t.Errorf("RedisURL with Redis down: fatal message %q, want a pointer to scripts/test", msg)
	}
}

func TestEventually(t *testing.T) {
	t.Parallel()
	calls := 0
	Eventually(t, time.Second, func() bool { calls++; return calls == 3 })
	if calls != 3 {
		t.Fatalf("cond called %d times, want 3 (stop at the first true)", calls)
	}

	start := time.Now()
	msg := runFake(func(tb testing.TB) {
		Eventually(tb, 50*time.Millisecond, func() bool { return false }, "stream got %d events", 7)
	})
	if elapsed := time.Since(start); elapsed < 50*time.Millisecond || elapsed > 2*time.Second {
		t.Errorf("timed out after %v, want about 50ms", elapsed)
	}
	if !strings.Contains(msg, "stream got 7 events") {
		t.Errorf("fatal message %q does not carry the description", msg)
	}
}
