package migrations

import (
	"context"
	"database/sql"
	"io/fs"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	_ "github.com/lib/pq"
	"github.com/stretchr/testify/require"
	_ "modernc.org/sqlite"

	"imd/internal/testenv"
)

func openDB(t *testing.T) *sql.DB {
	t.Helper()
	url := testenv.DatabaseURL(t)
	db, err := sql.Open("postgres", url)
	require.NoError(t, err)
	t.Cleanup(func() { _ = db.Close() }) // registered after DatabaseURL: closes before the schema is dropped
	return db
}

// openSQLite opens a new database file with the pragmas the store uses that
// matter to the schema (foreign keys, so that Down's drops are checked).
func openSQLite(t *testing.T) *sql.DB {
	t.Helper()
	path := filepath.Join(t.TempDir(), "imd.db")
	db, err := sql.Open("sqlite", path+"?_foreign_keys=1&_busy_timeout=5000&_journal_mode=WAL&_txlock=immediate")
	require.NoError(t, err)
	db.SetMaxOpenConns(1)
	t.Cleanup(func() { _ = db.Close() })
	return db
}

func testCtx(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	t.Cleanup(cancel)
	return ctx
}

// tablesInCurrentSchema lists the tables of the connection's current schema.
func tablesInCurrentSchema(t *testing.T, ctx context.Context, db *sql.DB) []string {
	t.Helper()
	return names(t, ctx, db,
		`SELECT tablename FROM pg_tables WHERE schemaname = current_schema() ORDER BY tablename`)
}

// sqliteTables lists the tables of a SQLite database, without SQLite's own
// (sqlite_sequence, which AUTOINCREMENT creates).
func sqliteTables(t *testing.T, ctx context.Context, db *sql.DB) []string {
	t.Helper()
	return names(t, ctx, db,
		`SELECT name FROM sqlite_schema WHERE type = 'table' AND name NOT LIKE 'sqlite_%' ORDER BY name`)
}

func names(t *testing.T, ctx context.Context, db *sql.DB, query string) []string {
	t.Helper()
	rows, err := db.QueryContext(ctx, query)
	require.NoError(t, err)
	defer rows.Close()
	var names []string
	for rows.Next() {
		var n string
		require.NoError(t, rows.Scan(&n))
		names = append(names, n)
	}
	require.NoError(t, rows.Err())
	return names
}

var allTables = []string{"conversations", "goose_db_version", "members", "messages", "outbox",
	"stream_tickets", "tokens", "users"}

// The schema of a test is the first of its search_path: the tables and
// goose's version table must land there, not in public.
func TestUpLandsInSearchPathSchema(t *testing.T) {
	t.Parallel()
	ctx := testCtx(t)
	db := openDB(t)

	require.NoError(t, Up(ctx, db, Postgres))
	require.Equal(t, allTables, tablesInCurrentSchema(t, ctx, db))

	var version int64
	require.NoError(t, db.QueryRowContext(ctx,
		`SELECT max(version_id) FROM goose_db_version`).Scan(&version))
	require.EqualValues(t, migrationCount(t, Postgres), version, "the last migration's version")
}

// migrationCount is how many migrations dialect has (versions 1..n).
func migrationCount(t *testing.T, d Dialect) int {
	t.Helper()
	files, err := fs.Glob(FS, string(d)+"/*.sql")
	require.NoError(t, err)
	require.NotEmpty(t, files)
	return len(files)
}

func TestUpIsIdempotent(t *testing.T) {
	t.Parallel()
	for _, d := range []Dialect{Postgres, SQLite} {
		t.Run(string(d), func(t *testing.T) {
			t.Parallel()
			ctx := testCtx(t)
			db := open(t, d)
			require.NoError(t, Up(ctx, db, d))
			require.NoError(t, Up(ctx, db, d))

			var applied int
			require.NoError(t, db.QueryRowContext(ctx,
				`SELECT count(*) FROM goose_db_version WHERE version_id > 0`).Scan(&applied))
			require.Equal(t, migrationCount(t, d), applied, "each migration is recorded once")
		})
	}
}

func open(t *testing.T, d Dialect) *sql.DB {
	if d == SQLite {
		return openSQLite(t)
	}
	return openDB(t)
}

func tables(t *testing.T, ctx context.Context, db *sql.DB, d Dialect) []string {
	if d == SQLite {
		return sqliteTables(t, ctx, db)
	}
	return tablesInCurrentSchema(t, ctx, db)
}

// Nodes starting together each call Up: the advisory lock makes them take
// turns, and the later ones find nothing pending.
func TestUpConcurrently(t *testing.T) {
	t.Parallel()
	ctx := testCtx(t)
	url := testenv.DatabaseURL(t)
	const nodes = 3
	dbs := make([]*sql.DB, nodes)
	for i := range dbs {
		db, err := sql.Open("postgres", url)
		require.NoError(t, err)
		t.Cleanup(func() { _ = db.Close() })
		dbs[i] = db
	}
	errs := make([]error, nodes)
	var wg sync.WaitGroup
	for i, db := range dbs {
		wg.Go(func() { errs[i] = Up(ctx, db, Postgres) })
	}
	wg.Wait()
	for _, err := range errs {
		require.NoError(t, err)
	}
	require.Equal(t, allTables, tablesInCurrentSchema(t, ctx, dbs[0]))
}

// The Down sections must undo the Up sections completely, so a rollback
// leaves a schema where Up works again.
func TestDownThenUp(t *testing.T) {
	t.Parallel()
	for _, d := range []Dialect{Postgres, SQLite} {
		t.Run(string(d), func(t *testing.T) {
			t.Parallel()
			ctx := testCtx(t)
			db := open(t, d)
			require.NoError(t, Up(ctx, db, d))
			require.Equal(t, allTables, tables(t, ctx, db, d))

			p, err := newProvider(ctx, db, d)
			require.NoError(t, err)
			_, err = p.DownTo(ctx, 0)
			require.NoError(t, err)
			require.Equal(t, []string{"goose_db_version"}, tables(t, ctx, db, d))

			require.NoError(t, Up(ctx, db, d))
			require.Equal(t, allTables, tables(t, ctx, db, d))
		})
	}
}

// Every version exists in both dialects, under the same name: a migration
// written for one database only would leave the other mode a schema behind.
func TestDialectsInStep(t *testing.T) {
	list := func(d Dialect) []string {
		files, err := fs.Glob(FS, string(d)+"/*.sql")
		require.NoError(t, err)
		var out []string
		for _, f := range files {
			out = append(out, strings.TrimPrefix(f, string(d)+"/"))
			body, err := fs.ReadFile(FS, f)
			require.NoError(t, err)
			require.Contains(t, string(body), "-- +goose Up", f)
			require.Contains(t, string(body), "-- +goose Down", f)
		}
		return out
	}
	pg, lite := list(Postgres), list(SQLite)
	require.NotEmpty(t, pg)
	require.Equal(t, pg, lite)
}

func TestUnknownDialect(t *testing.T) {
	err := Up(testCtx(t), openSQLite(t), "oracle")
	require.ErrorContains(t, err, "unknown dialect")
}

func TestLockIDDependsOnSchema(t *testing.T) {
	require.NotEqual(t, lockID("a"), lockID("b"))
	require.Equal(t, lockID("a"), lockID("a"))
}
