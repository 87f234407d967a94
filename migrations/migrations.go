// Package migrations owns imd's database schema as versioned SQL files, one
// directory per SQL dialect: postgres/ (the server mode) and sqlite/ (the
// embedded mode). The two directories hold the same versions, each written
// in its dialect; a test keeps them in step.
//
// Why versioned SQL embedded in the binary: the schema a binary needs always
// ships with it, so there is nothing to copy next to it and no way to run a
// binary against files of another version. Each file is a goose migration
// (-- +goose Up / -- +goose Down), applied in order and recorded in the
// goose_db_version table. cmd/imd applies them at start and `imd migrate`
// applies them alone; both call [Up] (through store.Migrate).
package migrations

import (
	"context"
	"database/sql"
	"embed"
	"fmt"
	"hash/fnv"
	"io/fs"

	"github.com/pressly/goose/v3"
	"github.com/pressly/goose/v3/lock"
)

// FS holds the migrations, named <dialect>/NNNNN_description.sql.
//
//go:embed postgres/*.sql sqlite/*.sql
var FS embed.FS

// Dialect selects a database's migration directory and goose dialect.
type Dialect string

// The dialects; each value is also the name of its directory in [FS].
const (
	Postgres Dialect = "postgres"
	SQLite   Dialect = "sqlite"
)

// Up applies every pending migration of dialect to db.
//
// PostgreSQL: the migrations land in the schema that db's connections
// default to (the first schema of their search_path). Several nodes may
// start at once: a PostgreSQL session advisory lock makes them take turns,
// and each applies only what is still pending when it gets the lock. goose's
// version table name is unqualified, so it lands in the current schema along
// with the tables; for the same reason the lock key is derived from the
// current schema, so that migrations of unrelated schemas in one database
// (one per test) do not wait for each other.
//
// SQLite: no lock is taken here. One process owns the database file (the
// wiring holds a file lock on it), and goose runs each migration in a
// transaction, which SQLite serialises anyway.
func Up(ctx context.Context, db *sql.DB, dialect Dialect) error {
	p, err := newProvider(ctx, db, dialect)
	if err != nil {
		return err
	}
	if _, err := p.Up(ctx); err != nil {
		return fmt.Errorf("migrations: up: %w", err)
	}
	return nil
}

// lockRetrySeconds is how often a node waiting for another's migration
// checks the lock again; lockRetries bounds the wait (5 minutes) so that a
// stuck migration fails the start instead of hanging it forever.
const (
	lockRetrySeconds = 1
	lockRetries      = 300
)

func newProvider(ctx context.Context, db *sql.DB, dialect Dialect) (*goose.Provider, error) {
	files, err := fs.Sub(FS, string(dialect))
	if err != nil {
		return nil, fmt.Errorf("migrations: %w", err)
	}
	opts := []goose.ProviderOption{
		// Only the SQL files here: nothing registered globally by other packages.
		goose.WithDisableGlobalRegistry(true),
	}
	var gd goose.Dialect
	switch dialect {
	case Postgres:
		gd = goose.DialectPostgres
		locker, err := postgresLocker(ctx, db)
		if err != nil {
			return nil, err
		}
		opts = append(opts, goose.WithSessionLocker(locker))
	case SQLite:
		gd = goose.DialectSQLite3
	default:
		return nil, fmt.Errorf("migrations: unknown dialect %q", dialect)
	}
	p, err := goose.NewProvider(gd, db, files, opts...)
	if err != nil {
		return nil, fmt.Errorf("migrations: %w", err)
	}
	return p, nil
}

// postgresLocker is the advisory lock that makes concurrent migrations of
// one schema take turns.
func postgresLocker(ctx context.Context, db *sql.DB) (lock.SessionLocker, error) {
	var schema sql.NullString
	if err := db.QueryRowContext(ctx, "SELECT current_schema()").Scan(&schema); err != nil {
		return nil, fmt.Errorf("migrations: current schema: %w", err)
	}
	if !schema.Valid {
		// No schema of the search_path exists: goose would fail later with a
		// less helpful "no schema has been selected to create in".
		return nil, fmt.Errorf("migrations: no schema of the search_path exists")
	}
	locker, err := lock.NewPostgresSessionLocker(
		lock.WithLockID(lockID(schema.String)),
		lock.WithLockTimeout(lockRetrySeconds, lockRetries),
	)
	if err != nil {
		return nil, fmt.Errorf("migrations: locker: %w", err)
	}
	return locker, nil
}

// lockID is the advisory lock key for migrating schema. Advisory locks are
// per database, so the schema name is part of the key.
func lockID(schema string) int64 {
	h := fnv.New64a()
	h.Write([]byte("imd-migrations:" + schema))
	return int64(h.Sum64())
}
