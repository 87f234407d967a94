package migrations

import (
	"context"
	"database/sql"
	"sync"
	"testing"
	"time"

	_ "github.com/lib/pq"
	"github.com/stretchr/testify/require"

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

func testCtx(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	t.Cleanup(cancel)
	return ctx
}

// tablesInCurrentSchema lists the tables of the connection's current schema.
func tablesInCurrentSchema(t *testing.T, ctx context.Context, db *sql.DB) []string {
	t.Helper()
	rows, err := db.QueryContext(ctx,
		`SELECT tablename FROM pg_tables WHERE schemaname = current_schema() ORDER BY tablename`)
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

	require.NoError(t, Up(ctx, db))
	require.Equal(t, allTables, tablesInCurrentSchema(t, ctx, db))

	var version int64
	require.NoError(t, db.QueryRowContext(ctx,
		`SELECT max(version_id) FROM goose_db_version`).Scan(&version))
	require.EqualValues(t, 1, version)
}

func TestUpIsIdempotent(t *testing.T) {
	t.Parallel()
	ctx := testCtx(t)
	db := openDB(t)
	require.NoError(t, Up(ctx, db))
	require.NoError(t, Up(ctx, db))

	var applied int
	require.NoError(t, db.QueryRowContext(ctx,
		`SELECT count(*) FROM goose_db_version WHERE version_id > 0`).Scan(&applied))
	require.Equal(t, 1, applied, "each migration is recorded once")
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
		wg.Go(func() { errs[i] = Up(ctx, db) })
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
	ctx := testCtx(t)
	db := openDB(t)
	require.NoError(t, Up(ctx, db))

	p, err := newProvider(ctx, db)
	require.NoError(t, err)
	_, err = p.DownTo(ctx, 0)
	require.NoError(t, err)
	require.Equal(t, []string{"goose_db_version"}, tablesInCurrentSchema(t, ctx, db))

	require.NoError(t, Up(ctx, db))
	require.Equal(t, allTables, tablesInCurrentSchema(t, ctx, db))
}

func TestLockIDDependsOnSchema(t *testing.T) {
	require.NotEqual(t, lockID("a"), lockID("b"))
	require.Equal(t, lockID("a"), lockID("a"))
}
