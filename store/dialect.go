package store

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/url"
	"os"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"time"

	"github.com/jmoiron/sqlx"
	"github.com/lib/pq"
	_ "modernc.org/sqlite" // the "sqlite" driver

	"imd/chat"
	"imd/migrations"
)

// dialect is everything the store's SQL does differently on PostgreSQL and
// SQLite. The rest — every query's shape, the transactions, the guarantees —
// is one code path over both. What differs, and where:
//
//   - placeholders: none. Queries are written with PostgreSQL's $N, which
//     modernc.org/sqlite binds to the Nth argument as well (it also accepts
//     a $N that repeats, which sqlx.Rebind's ? style could not express);
//   - id lists (= ANY($n::text[]) with pq.Array): [dialect.inTexts],
//     [dialect.inInts], [dialect.unnestTexts] and their arguments
//     [dialect.texts], [dialect.ints]; SQLite reads a JSON array with json_each;
//   - tables of rows (a batch of sends): VALUES lists of parameters, the same
//     text on both but for PostgreSQL's casts ([dialect.values],
//     [dialect.valueRows]);
//   - the database clock and interval arithmetic: now, [dialect.plusMicros];
//   - GREATEST, which SQLite spells as the two-argument MAX; MAX is NULL if
//     an argument is, GREATEST ignores NULLs, so callers COALESCE nullable
//     operands;
//   - row locks: forUpdate and skipLocked are empty on SQLite, whose write
//     transactions are serialised as a whole (one writer connection, BEGIN
//     IMMEDIATE), which is stronger than the row locks they stand for;
//   - jsonb: a ::jsonb cast of the metadata parameter on PostgreSQL; on
//     SQLite a TEXT column with a json_valid CHECK (migrations/sqlite). The
//     idempotency replay compares metadata as JSON values in Go (sameJSON)
//     on both, because SQLite's json() keeps key order;
//   - SQL both accept, chosen over the PostgreSQL-only form: substr/length
//     instead of split_part (viewSQL), a subquery instead of UPDATE … FROM
//     where RETURNING names the target (MarkRead; UPDATE … FROM without
//     RETURNING is fine, sendBatch), two statements instead of a DELETE in a WITH
//     (CreateTicket), "WHERE true" before an INSERT … SELECT's ON CONFLICT;
//   - outbox rows: insertEvents has one statement per dialect (unnest of
//     parallel arrays / json_each of one JSON array), and recipient lists come
//     back as a PostgreSQL array or a JSON array (stringList reads both);
//   - errors: dbErr maps *pq.Error by SQLSTATE and constraint name, and
//     *sqlite.Error by result code and, for unique violations, the columns
//     SQLite names instead of the constraint (sqliteUniqueColumns);
//   - times: timestamptz on PostgreSQL; INTEGER Unix microseconds in
//     TIMESTAMP-declared columns on SQLite, converted by the driver in both
//     directions (sqliteDSN), so rows scan into time.Time unchanged;
//   - reads: Store.rdb, a pool of read-only connections beside the one
//     writer on SQLite, the same pool as writes on PostgreSQL;
//   - connections and migrations: [Open], [openSQLite] and [migrations.Up].
type dialect struct {
	name       string
	migrations migrations.Dialect

	// now is the database clock as a value comparable with time columns.
	now string
	// greatest is the function returning the larger of two values.
	greatest string
	// forUpdate ends a SELECT whose rows the transaction writes next.
	forUpdate string
	// skipLocked ends the outbox claim's inner SELECT: sweepers on several
	// nodes take disjoint batches.
	skipLocked string
	// jsonb follows a placeholder holding a JSON document.
	jsonb string
	// insertEventsSQL writes a batch of outbox events (see insertEvents).
	insertEventsSQL string
}

var postgresDialect = &dialect{
	name:            "postgres",
	migrations:      migrations.Postgres,
	now:             "now()",
	greatest:        "GREATEST",
	forUpdate:       " FOR UPDATE",
	skipLocked:      " FOR UPDATE SKIP LOCKED",
	jsonb:           "::jsonb",
	insertEventsSQL: insertEventsPostgres,
}

// sqliteNow is SQLite's clock (millisecond resolution) in the microseconds
// that time columns hold; round() because unixepoch('subsec') is a float.
const sqliteNow = "(CAST(round(unixepoch('subsec') * 1000) AS INTEGER) * 1000)"

var sqliteDialect = &dialect{
	name:            "sqlite",
	migrations:      migrations.SQLite,
	now:             sqliteNow,
	greatest:        "MAX",
	forUpdate:       "",
	skipLocked:      "",
	jsonb:           "",
	insertEventsSQL: insertEventsSQLite,
}

func (d *dialect) sqlite() bool { return d == sqliteDialect }

// inTexts is "IN the list of strings in parameter p" (an argument made by texts).
func (d *dialect) inTexts(p int) string {
	if d.sqlite() {
		return "IN (SELECT value FROM json_each($" + strconv.Itoa(p) + "))"
	}
	return "= ANY($" + strconv.Itoa(p) + "::text[])"
}

// inInts is inTexts for a list of integers (an argument made by ints).
func (d *dialect) inInts(p int) string {
	if d.sqlite() {
		return "IN (SELECT value FROM json_each($" + strconv.Itoa(p) + "))"
	}
	return "= ANY($" + strconv.Itoa(p) + "::bigint[])"
}

// unnestTexts is a table alias(id, ord) of the strings in parameter p and
// their positions from 1.
func (d *dialect) unnestTexts(p int, alias string) string {
	if d.sqlite() {
		return "(SELECT value AS id, key + 1 AS ord FROM json_each($" + strconv.Itoa(p) + ")) AS " + alias
	}
	return "unnest($" + strconv.Itoa(p) + "::text[]) WITH ORDINALITY AS " + alias + "(id, ord)"
}

// texts is the argument for inTexts and unnestTexts.
func (d *dialect) texts(ss []string) any {
	if d.sqlite() {
		return jsonArray(ss)
	}
	return pq.Array(ss)
}

// ints is the argument for inInts.
func (d *dialect) ints(ns []int64) any {
	if d.sqlite() {
		return jsonArray(ns)
	}
	return pq.Array(ns)
}

func jsonArray[T any](vs []T) string {
	if len(vs) == 0 {
		return "[]"
	}
	b, err := json.Marshal(vs)
	if err != nil { // strings and integers always marshal
		panic(err)
	}
	return string(b)
}

// valueRows is n rows of len(types) parameters, numbered from $1 row by row,
// for a VALUES list: "($1, $2::bigint), ($3, $4::bigint)". A type casts its
// column's parameters on PostgreSQL, where a VALUES column takes its type
// from its values and a bare parameter would be text; SQLite has no such
// casts and needs none. "" leaves a parameter bare (text, or typed by an
// INSERT's target column).
//
// VALUES lists carry the rows of SQLite's batched send writes
// (writeSendsSQLite; PostgreSQL's take arrays, send.go): the drivers
// bind each value natively, so every byte of a text arrives as given and
// each dialect's usual errors come back for bad values, and one statement
// text serves both databases. At most MaxSendBatch rows of 8 parameters:
// far below the limits (PostgreSQL 65,535, SQLite 32,766 parameters).
func (d *dialect) valueRows(n int, types ...string) string {
	var b strings.Builder
	p := 1
	for i := range n {
		if i > 0 {
			b.WriteString(", ")
		}
		b.WriteByte('(')
		for j, typ := range types {
			if j > 0 {
				b.WriteString(", ")
			}
			b.WriteString("$" + strconv.Itoa(p))
			p++
			if typ != "" && !d.sqlite() {
				b.WriteString("::" + typ)
			}
		}
		b.WriteByte(')')
	}
	return b.String()
}

// values is a table alias(names…) of n rows of parameters (valueRows); a
// column is "name" or "name type". Both databases name a VALUES list's
// columns column1, column2…, which the subquery renames (SQLite has no
// column aliases after a table alias).
func (d *dialect) values(n int, alias string, cols ...string) string {
	types := make([]string, len(cols))
	var b strings.Builder
	b.WriteString("(SELECT ")
	for j, col := range cols {
		name, typ, _ := strings.Cut(col, " ")
		types[j] = typ
		if j > 0 {
			b.WriteString(", ")
		}
		b.WriteString("column" + strconv.Itoa(j+1) + " AS " + name)
	}
	b.WriteString(" FROM (VALUES " + d.valueRows(n, types...) + ") AS " + alias + "_rows) AS " + alias)
	return b.String()
}

// plusMicros is the time t plus micros microseconds (both SQL expressions).
func (d *dialect) plusMicros(t, micros string) string {
	if d.sqlite() {
		return "(" + t + " + (" + micros + "))"
	}
	return "(" + t + " + (" + micros + ") * interval '1 microsecond')"
}

// stringList scans a list of strings stored as a PostgreSQL text[] or as a
// JSON array (SQLite); NULL is nil.
type stringList []string

func (l *stringList) Scan(src any) error {
	var b []byte
	switch v := src.(type) {
	case nil:
		*l = nil
		return nil
	case string:
		b = []byte(v)
	case []byte:
		b = v
	default:
		return fmt.Errorf("store: cannot scan %T into a string list", src)
	}
	if len(b) > 0 && b[0] == '[' { // a PostgreSQL array literal starts with '{'
		var ss []string
		if err := json.Unmarshal(b, &ss); err != nil {
			return fmt.Errorf("store: string list: %w", err)
		}
		*l = ss
		return nil
	}
	var a pq.StringArray
	if err := a.Scan(b); err != nil {
		return err
	}
	*l = stringList(a)
	return nil
}

// SQLite connection settings.
//
// MaxSQLiteReaders caps the read pool (see sqliteReaders): each connection
// keeps its own page cache, and more readers than cores only contend.
//
// DefaultSQLiteBusyTimeout is how long a statement waits for a lock held by
// another connection before failing with SQLITE_BUSY (CodeUnavailable). The
// store's own writes queue for its single writer connection in Go instead,
// so this only covers other processes on the file (a backup, the sqlite3
// shell, a second store) and WAL checkpoints.
const (
	MaxSQLiteReaders         = 8
	DefaultSQLiteBusyTimeout = 5 * time.Second
)

// sqliteReaders is the size of the read pool: one connection per core but
// one, which is left to the writer. SQLite in pure Go is CPU-bound, and
// readers that take every core starve the writer: on 2 cores, under a flood
// of reads, 4 readers let ~50 sends/s through where 1 reader lets ~220
// through, and 1 reader also served more reads (BenchmarkSendWithReads).
func sqliteReaders() int {
	return min(MaxSQLiteReaders, max(1, runtime.GOMAXPROCS(0)-1))
}

// SQLitePath returns the database file of a SQLite URL — sqlite:<path>,
// sqlite://<path> or file:<path> (sqlite:///abs and file:///abs are absolute)
// — and whether databaseURL is one.
func SQLitePath(databaseURL string) (string, bool) {
	for _, prefix := range []string{"sqlite://", "sqlite:", "file://", "file:"} {
		if rest, ok := strings.CutPrefix(databaseURL, prefix); ok {
			return rest, true
		}
	}
	return "", false
}

// openSQLite opens the database file at path (creating it and its
// directory) with two pools: one writer connection and `readers` reader
// connections. readers <= 0 makes one pool of one connection for everything.
//
// Why one writer: SQLite allows one write transaction at a time per file.
// Several writer connections would each wait for the lock in SQLite's busy
// handler, which sleeps and polls (unfair, milliseconds of added latency);
// one connection makes writes queue in database/sql instead, in order, and
// makes SQLITE_BUSY between our own writers impossible. Transactions begin
// IMMEDIATE, taking the write lock at BEGIN, so one never has to upgrade a
// read lock (the SQLITE_BUSY of a deferred transaction, which busy_timeout
// cannot wait out) — that matters only when another process writes too.
//
// Why separate readers: with one pool of one connection every read (the
// token look-up of every request, history, conversation lists) queues
// behind every write and its fsync; readers in WAL mode read the last
// committed state without waiting. Measured on 2 cores (store benchmarks,
// a shared machine, medians of 3): sends alone, or requests of two reads
// and a send, run at about the same rate either way (1,300–1,600 msgs/s);
// with as many clients reading as sending, one connection gives ~1,200
// sends/s and ~600 reads/s at 10 ms read p50, two pools ~700 sends/s and
// ~3,700 reads/s at 1.5 ms. Most requests being reads, two pools;
// sqliteReaders keeps a core for the writer. The readers are query_only,
// so a write sent to them by mistake fails loudly.
func openSQLite(ctx context.Context, path string, readers int) (*Store, error) {
	if path == "" || path == ":memory:" || strings.HasPrefix(path, "file::memory:") {
		// Each connection would get its own empty database.
		return nil, chat.Internal(fmt.Errorf("store: SQLite needs a database file, not %q", path))
	}
	if strings.ContainsAny(path, "?#") {
		return nil, chat.Internal(fmt.Errorf("store: SQLite URL %q: no parameters allowed (the store sets the pragmas itself)", path))
	}
	if err := os.MkdirAll(filepath.Dir(path), 0o750); err != nil {
		return nil, chat.Internal(fmt.Errorf("store: database directory: %w", err))
	}
	w, err := sqlx.Open("sqlite", sqliteDSN(path, false))
	if err != nil {
		return nil, chat.Internal(fmt.Errorf("store: open: %w", err))
	}
	// The connection is kept for the life of the store: reopening it would
	// redo the pragmas and drop its page cache.
	w.SetMaxOpenConns(1)
	w.SetMaxIdleConns(1)
	w.SetConnMaxIdleTime(0)
	w.SetConnMaxLifetime(0)
	if err := w.PingContext(ctx); err != nil { // creates the file and turns WAL on
		_ = w.Close()
		return nil, dbErr(err)
	}
	if readers <= 0 {
		return newStore(sqliteDialect, w, w), nil
	}
	r, err := sqlx.Open("sqlite", sqliteDSN(path, true))
	if err != nil {
		_ = w.Close()
		return nil, chat.Internal(fmt.Errorf("store: open: %w", err))
	}
	r.SetMaxOpenConns(readers)
	r.SetMaxIdleConns(readers)
	r.SetConnMaxIdleTime(DefaultConnMaxIdleTime)
	if err := r.PingContext(ctx); err != nil {
		_ = r.Close()
		_ = w.Close()
		return nil, dbErr(err)
	}
	return newStore(sqliteDialect, w, r), nil
}

// sqliteDSN is the modernc.org/sqlite data source for path: the pragmas are
// DSN parameters, so the driver applies them to every connection it opens
// (a pragma run once on the pool would reach one connection only).
//
//   - journal_mode=WAL: readers do not block the writer nor it them, and a
//     commit appends to the log instead of rewriting pages;
//   - synchronous=FULL: every commit fsyncs the WAL before it returns. G1
//     (an ack means durable) needs it: with NORMAL, a WAL-mode commit survives
//     a crash of the process but not of the machine (power loss, kernel
//     panic), which can take the last acknowledged messages with it;
//   - foreign_keys=ON: SQLite does not enforce REFERENCES otherwise;
//   - busy_timeout: see DefaultSQLiteBusyTimeout;
//   - _txlock=immediate: BEGIN IMMEDIATE (see openSQLite);
//   - _time_integer_format=unix_micro, _inttotime=1: time.Time arguments are
//     bound as Unix microseconds, and integers read from TIMESTAMP-declared
//     columns come back as UTC time.Time (migrations/sqlite explains why);
//   - query_only on readers.
//
// The driver's validated shorthand keys are used rather than _pragma=…, which
// runs its value as SQL text unchecked.
func sqliteDSN(path string, reader bool) string {
	q := url.Values{}
	q.Set("_busy_timeout", strconv.FormatInt(DefaultSQLiteBusyTimeout.Milliseconds(), 10))
	q.Set("_journal_mode", "WAL")
	q.Set("_synchronous", "FULL")
	q.Set("_foreign_keys", "1")
	q.Set("_time_integer_format", "unix_micro")
	q.Set("_inttotime", "1")
	if reader {
		q.Set("_query_only", "1")
	} else {
		q.Set("_txlock", "immediate")
	}
	return path + "?" + q.Encode()
}

// errUnknownURL is returned for URLs of neither dialect.
var errUnknownURL = errors.New("store: database URL must start with postgres://, postgresql://, sqlite: or file:")
