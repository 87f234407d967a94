package store

import (
	"context"
	"database/sql"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/jmoiron/sqlx"
	"github.com/stretchr/testify/require"

	"imd/chat"
)

func openSQLiteT(t *testing.T, readers int) (*Store, string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	path := filepath.Join(t.TempDir(), "imd.db")
	s, err := openSQLite(ctx, path, readers)
	require.NoError(t, err)
	t.Cleanup(func() { _ = s.Close() })
	require.NoError(t, s.Migrate(ctx))
	return s, path
}

// The settings G1 and the concurrency design rest on are in effect on every
// connection of both pools, not just the first one.
func TestSQLitePragmas(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	s, _ := openSQLiteT(t, sqliteReaders())
	check := func(db *sqlx.DB, queryOnly int) {
		// Hold every connection of the pool at once, so each is checked.
		n := db.Stats().MaxOpenConnections
		conns := make([]*sql.Conn, n)
		for i := range conns {
			c, err := db.Conn(ctx)
			require.NoError(t, err)
			conns[i] = c
		}
		for _, c := range conns {
			var mode string
			var sync, fk, busy, qo int
			require.NoError(t, c.QueryRowContext(ctx, "PRAGMA journal_mode").Scan(&mode))
			require.NoError(t, c.QueryRowContext(ctx, "PRAGMA synchronous").Scan(&sync))
			require.NoError(t, c.QueryRowContext(ctx, "PRAGMA foreign_keys").Scan(&fk))
			require.NoError(t, c.QueryRowContext(ctx, "PRAGMA busy_timeout").Scan(&busy))
			require.NoError(t, c.QueryRowContext(ctx, "PRAGMA query_only").Scan(&qo))
			require.Equal(t, "wal", mode)
			require.Equal(t, 2, sync, "synchronous=FULL (G1)")
			require.Equal(t, 1, fk)
			require.EqualValues(t, DefaultSQLiteBusyTimeout.Milliseconds(), busy)
			require.Equal(t, queryOnly, qo)
		}
		for _, c := range conns {
			require.NoError(t, c.Close())
		}
	}
	require.Equal(t, 1, s.db.Stats().MaxOpenConnections, "one writer")
	check(s.db, 0)
	require.Equal(t, sqliteReaders(), s.rdb.Stats().MaxOpenConnections)
	check(s.rdb, 1)
}

// Reads do not queue behind a write transaction: a reader sees the last
// commit while the writer is busy, then the new one once it commits.
func TestSQLiteReadsDuringWrite(t *testing.T) {
	t.Parallel()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	s, _ := openSQLiteT(t, sqliteReaders())
	require.NoError(t, s.CreateUser(ctx, chat.User{ID: "ann", DisplayName: "Ann", CreatedAt: chat.Now()}))
	inside, release := make(chan struct{}), make(chan struct{})
	done := make(chan error, 1)
	go func() {
		done <- s.inTx(ctx, func(tx *sqlx.Tx) error {
			if _, err := tx.ExecContext(ctx, `UPDATE users SET display_name = 'Ann B.' WHERE id = 'ann'`); err != nil {
				return err
			}
			close(inside)
			<-release
			return nil
		})
	}()
	<-inside
	u, err := s.User(ctx, "ann") // would wait for release if reads shared the writer
	require.NoError(t, err)
	require.Equal(t, "Ann", u.DisplayName, "the last committed state")
	close(release)
	require.NoError(t, <-done)
	u, err = s.User(ctx, "ann")
	require.NoError(t, err)
	require.Equal(t, "Ann B.", u.DisplayName)
}

// A write sent to a reader by mistake fails instead of bypassing the writer.
func TestSQLiteReadersAreReadOnly(t *testing.T) {
	t.Parallel()
	s, _ := openSQLiteT(t, 2)
	_, err := s.rdb.Exec(`INSERT INTO users (id, display_name, created_at) VALUES ('x', 'X', 0)`)
	require.ErrorContains(t, err, "readonly")
}

// The single-pool variant (readers <= 0) is a complete store too.
func TestSQLiteSinglePool(t *testing.T) {
	t.Parallel()
	s, _ := openSQLiteT(t, 0)
	require.Same(t, s.db, s.rdb)
	ctx := context.Background()
	require.NoError(t, s.CreateUser(ctx, chat.User{ID: "u", DisplayName: "U", CreatedAt: chat.Now()}))
	_, err := s.User(ctx, "u")
	require.NoError(t, err)
}

// SQLITE_BUSY (a lock held by another process beyond busy_timeout) is
// unavailable, as a real driver error, not a hand-made one.
func TestSQLiteBusyIsUnavailable(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	_, path := openSQLiteT(t, 0)
	holder, err := sql.Open("sqlite", path)
	require.NoError(t, err)
	t.Cleanup(func() { _ = holder.Close() })
	conn, err := holder.Conn(ctx)
	require.NoError(t, err)
	defer conn.Close()
	_, err = conn.ExecContext(ctx, "BEGIN IMMEDIATE")
	require.NoError(t, err)
	defer conn.ExecContext(ctx, "ROLLBACK") //nolint:errcheck

	impatient, err := sql.Open("sqlite", path+"?_busy_timeout=0&_txlock=immediate")
	require.NoError(t, err)
	t.Cleanup(func() { _ = impatient.Close() })
	_, err = impatient.BeginTx(ctx, nil)
	require.Error(t, err)
	require.Contains(t, err.Error(), "SQLITE_BUSY")
	require.Equal(t, chat.CodeUnavailable, chat.ErrorCode(dbErr(err)), "%v", err)
}

// conflictMessages are keyed by PostgreSQL constraint name; on SQLite the
// same keys are found by their columns. Every message must be reachable on
// SQLite, and every column list must be a unique key of the SQLite schema
// (a migration that changes one must fail here, not degrade a 409).
func TestSQLiteUniqueColumnsExist(t *testing.T) {
	t.Parallel()
	s, _ := openSQLiteT(t, 0)
	reachable := map[string]bool{}
	for _, name := range sqliteUniqueColumns {
		reachable[name] = true
	}
	for name := range conflictMessages {
		require.True(t, reachable[name], "no SQLite columns for %s", name)
	}

	var keys []string
	var tables []string
	require.NoError(t, s.db.Select(&tables, `SELECT name FROM sqlite_schema WHERE type = 'table' AND name NOT LIKE 'sqlite_%'`))
	for _, table := range tables {
		var idx []struct {
			Seq     int    `db:"seq"`
			Name    string `db:"name"`
			Unique  bool   `db:"unique"`
			Origin  string `db:"origin"`
			Partial bool   `db:"partial"`
		}
		require.NoError(t, s.db.Select(&idx, `SELECT seq, name, "unique", origin, partial FROM pragma_index_list($1)`, table))
		for _, ix := range idx {
			if !ix.Unique {
				continue
			}
			var cols []string
			require.NoError(t, s.db.Select(&cols, `SELECT $1 || '.' || name FROM pragma_index_info($2) ORDER BY seqno`, table, ix.Name))
			keys = append(keys, strings.Join(cols, ", "))
		}
	}
	for cols := range sqliteUniqueColumns {
		require.True(t, slices.Contains(keys, cols), "%q is not a unique key of the SQLite schema (have %v)", cols, keys)
	}
}

func TestSameJSON(t *testing.T) {
	for _, tc := range []struct {
		a, b string
		same bool
	}{
		{``, ``, true},
		{`{}`, ``, false},
		{`{"a":1,"b":[1,2],"c":{"d":"e"}}`, `{ "c": {"d": "e"}, "b": [1, 2], "a": 1 }`, true},
		{`{"a":1}`, `{"a":1.0}`, true},
		{`{"a":100}`, `{"a":1e2}`, true},
		{`{"a":0.5}`, `{"a":5E-1}`, true},
		{`{"a":-0}`, `{"a":0}`, true},
		{`{"a":12345678901234567890}`, `{"a":12345678901234567891}`, false},
		{`{"a":1}`, `{"a":2}`, false},
		{`{"a":1}`, `{"a":"1"}`, false},
		{`[1,2]`, `[2,1]`, false},
		{`{"a":1}`, `{"a":1,"b":null}`, false},
		{`{"a":null}`, `{"a":null}`, true},
		{`{"a":1,"a":2}`, `{"a":2}`, true}, // the last duplicate wins, as in jsonb
		{`{"a":1e999999999}`, `{"a":1e999999998}`, false},
		{`{"a":true}`, `{"a":false}`, false},
		{`{"a":`, `{"a":1}`, false},
	} {
		require.Equal(t, tc.same, sameJSON([]byte(tc.a), []byte(tc.b)), "%s vs %s", tc.a, tc.b)
		require.Equal(t, tc.same, sameJSON([]byte(tc.b), []byte(tc.a)), "%s vs %s", tc.b, tc.a)
	}
}

func TestStringListScan(t *testing.T) {
	for _, tc := range []struct {
		src  any
		want []string
	}{
		{nil, nil},
		{`{a,b}`, []string{"a", "b"}},
		{[]byte(`{"x y",z}`), []string{"x y", "z"}},
		{`["a","b"]`, []string{"a", "b"}},
		{[]byte(`["{not pg}","c"]`), []string{"{not pg}", "c"}},
	} {
		var l stringList
		require.NoError(t, l.Scan(tc.src), "%v", tc.src)
		require.Equal(t, tc.want, []string(l), "%v", tc.src)
	}
	var l stringList
	require.Error(t, l.Scan(42))
}

func TestWithBinaryParameters(t *testing.T) {
	for in, want := range map[string]string{
		"postgres://u@h/db":                      "postgres://u@h/db?binary_parameters=yes",
		"postgres://u@h/db?sslmode=disable":      "postgres://u@h/db?sslmode=disable&binary_parameters=yes",
		"host=h dbname=db":                       "host=h dbname=db binary_parameters=yes",
		"postgres://h/db?binary_parameters=no":   "postgres://h/db?binary_parameters=no",
		"postgresql://h/db?search_path=t_abc123": "postgresql://h/db?search_path=t_abc123&binary_parameters=yes",
	} {
		if got := withBinaryParameters(in); got != want {
			t.Errorf("%q: got %q, want %q", in, got, want)
		}
	}
}
