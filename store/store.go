// Package store is imd's database adapter: it implements chat.Store with
// sqlx over PostgreSQL (lib/pq, the server mode) or SQLite
// (modernc.org/sqlite, the embedded mode), and it is the only package that
// knows SQL. One code path serves both databases; dialect.go isolates the
// few things they spell differently.
//
// The database is the source of truth, so the guarantees of DESIGN.md §2
// that must survive crashes and races live in its transactions and
// constraints: a send commits its message, its seq (the conversation row
// lock orders them on PostgreSQL, the single writer on SQLite, G3) and its
// outbox event together (G1), in a transaction shared with the sends queued
// at the same time (group commit, committer.go); an idempotency key is a
// UNIQUE index, and looked up under the conversation's lock (G2); membership
// is checked inside the writing transaction (G7). Every mutation writes the
// outbox events that describe it in the same transaction, so a node dying
// after the commit loses no event.
//
// Errors leave this package as *chat.Error only (see dbErr): callers never see
// driver errors, and a database that cannot be reached is CodeUnavailable so
// that the HTTP layer answers 503 at once.
package store

import (
	"context"
	"database/sql"
	"database/sql/driver"
	"errors"
	"fmt"
	"io"
	"net"
	"strings"
	"syscall"
	"time"

	"github.com/jmoiron/sqlx"
	"github.com/lib/pq"
	"modernc.org/sqlite"
	sqlite3 "modernc.org/sqlite/lib"

	"imd/chat"
	"imd/migrations"
)

var _ chat.Store = (*Store)(nil)

// Pool sizing. DefaultMaxOpenConns bounds what one node may take of the
// server's max_connections (100 by default) while leaving room for a few
// nodes; idle connections are kept as many as open ones because sends come
// in bursts and reconnecting costs more than an idle backend, but are closed
// after DefaultConnMaxIdleTime so a quiet node gives them back.
const (
	DefaultMaxOpenConns    = 32
	DefaultMaxIdleConns    = 32
	DefaultConnMaxIdleTime = 5 * time.Minute
)

// Store implements chat.Store on PostgreSQL or SQLite.
type Store struct {
	d *dialect
	// db runs transactions and writes; on SQLite it is the one writer
	// connection. rdb runs reads outside transactions: on PostgreSQL it is
	// db, on SQLite a pool of read-only connections (see openSQLite).
	db, rdb *sqlx.DB
	// lanes group-commit sends (committer.go): a conversation's sends
	// always go through the same lane, lanes[laneOf(cid)].
	lanes []*committer
	// stmts are sendBatch's prepared statements.
	stmts sendStmts
	// committed receives each committed batch's events (OnSendCommitted).
	committed func([]chat.OutboxEvent)
}

// newStore returns a Store over its pools with DefaultSendLanes committers
// (see newStoreLanes).
func newStore(d *dialect, db, rdb *sqlx.DB) *Store {
	return newStoreLanes(d, db, rdb, DefaultSendLanes)
}

// newStoreLanes returns a Store over its pools, with its committers running:
// lanes of them on PostgreSQL, one on SQLite (its single writer runs one
// transaction at a time anyway).
func newStoreLanes(d *dialect, db, rdb *sqlx.DB, lanes int) *Store {
	s := &Store{d: d, db: db, rdb: rdb}
	if d.sqlite() {
		lanes = 1
	}
	s.lanes = make([]*committer, lanes)
	for i := range s.lanes {
		s.lanes[i] = newCommitter(s)
	}
	return s
}

// lane is the committer of conversation cid's sends.
func (s *Store) lane(cid string) *committer {
	if len(s.lanes) == 1 {
		return s.lanes[0]
	}
	return s.lanes[laneOf(cid, len(s.lanes))]
}

// Option configures Open.
type Option func(*options)

type options struct {
	sendLanes int
}

// WithSendLanes makes a PostgreSQL store commit sends in n lanes instead of
// DefaultSendLanes (see there for what more lanes cost); n must be 1 to
// MaxSendLanes. SQLite ignores it: its single writer runs one transaction at
// a time, so it always has one lane.
func WithSendLanes(n int) Option { return func(o *options) { o.sendLanes = n } }

// Open connects to databaseURL, checks that the database answers and
// returns a Store. The URL selects the database:
//
//   - postgres://… or postgresql://… (or a lib/pq key=value string):
//     PostgreSQL, with a pool sized for one node of several;
//   - sqlite:<path>, sqlite://<path> or file:<path>: the SQLite database
//     file at path, created with its directory when missing (see openSQLite).
//
// An unreachable database is CodeUnavailable; an option out of range is an
// error before anything is opened.
func Open(ctx context.Context, databaseURL string, opts ...Option) (*Store, error) {
	o := options{sendLanes: DefaultSendLanes}
	for _, opt := range opts {
		opt(&o)
	}
	if o.sendLanes < 1 || o.sendLanes > MaxSendLanes {
		return nil, chat.Internal(fmt.Errorf("store: %d send lanes: must be 1 to %d", o.sendLanes, MaxSendLanes))
	}
	if path, ok := SQLitePath(databaseURL); ok {
		return openSQLite(ctx, path, sqliteReaders())
	}
	if !strings.HasPrefix(databaseURL, "postgres://") && !strings.HasPrefix(databaseURL, "postgresql://") &&
		!strings.Contains(databaseURL, "=") {
		return nil, chat.Internal(errUnknownURL)
	}
	db, err := sqlx.Open("postgres", withBinaryParameters(databaseURL))
	if err != nil {
		return nil, chat.Internal(fmt.Errorf("store: open: %w", err))
	}
	db.SetMaxOpenConns(DefaultMaxOpenConns)
	db.SetMaxIdleConns(DefaultMaxIdleConns)
	db.SetConnMaxIdleTime(DefaultConnMaxIdleTime)
	if err := db.PingContext(ctx); err != nil {
		_ = db.Close()
		return nil, dbErr(err)
	}
	return newStoreLanes(postgresDialect, db, db, o.sendLanes), nil
}

// withBinaryParameters turns on lib/pq's binary_parameters unless the URL
// sets it: without it lib/pq prepares every parameterized statement first,
// two round trips per statement instead of one, which group commit's
// handful of statements per batch pays on every send.
func withBinaryParameters(dsn string) string {
	if strings.Contains(dsn, "binary_parameters") {
		return dsn
	}
	if strings.HasPrefix(dsn, "postgres://") || strings.HasPrefix(dsn, "postgresql://") {
		if strings.Contains(dsn, "?") {
			return dsn + "&binary_parameters=yes"
		}
		return dsn + "?binary_parameters=yes"
	}
	return dsn + " binary_parameters=yes"
}

// New wraps an existing pool (of the "postgres" driver), with
// DefaultSendLanes.
func New(db *sqlx.DB) *Store { return newStore(postgresDialect, db, db) }

// DB returns the pool that writes (on SQLite, the writer connection), for
// wiring (readiness, migrations) and tests.
func (s *Store) DB() *sqlx.DB { return s.db }

// Dialect names the database: "postgres" or "sqlite".
func (s *Store) Dialect() string { return s.d.name }

// Close stops the committers — a batch of sends in flight finishes, sends still
// queued fail as unavailable, as do sends after Close — then closes the pools.
func (s *Store) Close() error {
	for _, c := range s.lanes {
		c.close()
	}
	s.stmts.close()
	err := s.db.Close()
	if s.rdb != s.db {
		err = errors.Join(err, s.rdb.Close())
	}
	return err
}

// Migrate applies the pending migrations of the store's dialect; on
// PostgreSQL safe when several nodes start at once.
func (s *Store) Migrate(ctx context.Context) error {
	if err := migrations.Up(ctx, s.db.DB, s.d.migrations); err != nil {
		return dbErr(err)
	}
	return nil
}

// Ping reports whether the database answers (readiness).
func (s *Store) Ping(ctx context.Context) error {
	if err := s.db.PingContext(ctx); err != nil {
		return dbErr(err)
	}
	if s.rdb != s.db {
		return dbErr(s.rdb.PingContext(ctx))
	}
	return nil
}

// inTx runs fn in a transaction and commits it unless fn fails. Every error
// comes back mapped by dbErr. PostgreSQL: READ COMMITTED. SQLite: the
// writer connection's BEGIN IMMEDIATE, so transactions run one at a time.
//
// Lock order, to keep transactions free of deadlocks: a transaction that
// writes both a conversations row and members rows locks the conversation
// first (Send, AddMembers, RemoveMember all do), and one that locks several
// conversations locks them in id order (a batch of sends).
func (s *Store) inTx(ctx context.Context, fn func(tx *sqlx.Tx) error) error {
	tx, err := s.db.BeginTxx(ctx, nil)
	if err != nil {
		return dbErr(err)
	}
	defer func() { _ = tx.Rollback() }() // a no-op after Commit
	if err := fn(tx); err != nil {
		return dbErr(err)
	}
	return dbErr(tx.Commit())
}

// conflictMessages are client-safe messages for unique violations, by
// constraint name (PostgreSQL's default names for the constraints of
// migrations/00001_init.sql).
var conflictMessages = map[string]string{
	"users_pkey":                   "username is taken",
	"tokens_pkey":                  "token id already exists",
	"tokens_secret_hash_key":       "token already exists",
	"stream_tickets_pkey":          "ticket already exists",
	"conversations_pkey":           "conversation id already exists",
	"conversations_direct_key_key": "direct conversation already exists",
	"messages_id_key":              "message id already exists",
	"messages_idempotency_idx":     "client_msg_id already used",
}

// sqliteUniqueColumns maps the columns a SQLite unique violation names
// ("UNIQUE constraint failed: users.id") to the PostgreSQL constraint name
// of the same key (migrations/sqlite mirrors migrations/postgres), so that
// both dialects share conflictMessages.
var sqliteUniqueColumns = map[string]string{
	"users.id":                   "users_pkey",
	"tokens.id":                  "tokens_pkey",
	"tokens.secret_hash":         "tokens_secret_hash_key",
	"stream_tickets.secret_hash": "stream_tickets_pkey",
	"conversations.id":           "conversations_pkey",
	"conversations.direct_key":   "conversations_direct_key_key",
	"messages.id":                "messages_id_key",
	"messages.conversation_id, messages.sender_id, messages.client_msg_id": "messages_idempotency_idx",
}

// foreignKeyFields name the input field behind a foreign-key violation, by
// constraint name. SQLite does not say which foreign key failed, so there
// the field is "id".
var foreignKeyFields = map[string]string{
	"tokens_user_id_fkey":           "user_id",
	"stream_tickets_user_id_fkey":   "user_id",
	"members_user_id_fkey":          "user_id",
	"members_conversation_id_fkey":  "conversation_id",
	"messages_conversation_id_fkey": "conversation_id",
}

// dbErr is the one place that turns database errors into *chat.Error.
// Errors that already are *chat.Error pass through unchanged.
func dbErr(err error) error {
	if err == nil {
		return nil
	}
	if ce, ok := errors.AsType[*chat.Error](err); ok {
		return ce
	}
	if errors.Is(err, sql.ErrNoRows) {
		return chat.ErrNotFound
	}
	if unavailable(err) {
		return chat.Unavailable("database", err)
	}
	if pe := pq.As(err); pe != nil {
		switch pe.Code {
		case "23505": // unique_violation
			msg, ok := conflictMessages[pe.Constraint]
			if !ok {
				msg = "already exists"
			}
			return &chat.Error{Code: chat.CodeConflict, Message: msg, Err: err}
		case "23503": // foreign_key_violation
			field, ok := foreignKeyFields[pe.Constraint]
			if !ok {
				field = "id"
			}
			e := chat.Invalid(field, "unknown id")
			e.Err = err
			return e
		case "23514", "22P02", "22001", "22021", "22003", "22P05":
			// check_violation (a kind or role outside its set), invalid text
			// representation (metadata that is not JSON), string too long,
			// bad encoding (NUL), number out of range, untranslatable
			// character (metadata with \u0000, which jsonb cannot hold): bad
			// input that the domain did not catch.
			return &chat.Error{Code: chat.CodeInvalid, Message: "invalid value", Err: err}
		}
	}
	if se, ok := errors.AsType[*sqlite.Error](err); ok {
		switch se.Code() {
		case sqlite3.SQLITE_CONSTRAINT_UNIQUE, sqlite3.SQLITE_CONSTRAINT_PRIMARYKEY:
			msg, ok := conflictMessages[sqliteUniqueColumns[sqliteConstraintDetail(se)]]
			if !ok {
				msg = "already exists"
			}
			return &chat.Error{Code: chat.CodeConflict, Message: msg, Err: err}
		case sqlite3.SQLITE_CONSTRAINT_FOREIGNKEY:
			e := chat.Invalid("id", "unknown id")
			e.Err = err
			return e
		case sqlite3.SQLITE_CONSTRAINT_CHECK, sqlite3.SQLITE_TOOBIG, sqlite3.SQLITE_MISMATCH:
			// As the PostgreSQL codes above: a kind or role outside its set,
			// metadata that is not JSON (json_valid), a value too big.
			return &chat.Error{Code: chat.CodeInvalid, Message: "invalid value", Err: err}
		}
	}
	return chat.Internal(err)
}

// sqliteConstraintDetail is what a SQLite constraint error says failed: the
// columns of a unique key ("users.id"), a CHECK's name or expression.
func sqliteConstraintDetail(se *sqlite.Error) string {
	msg := se.Error()
	_, detail, ok := strings.Cut(msg, " constraint failed: ")
	if !ok {
		return ""
	}
	// The driver appends the result code: "… users.id (2067)".
	if i := strings.LastIndex(detail, " ("); i >= 0 {
		detail = detail[:i]
	}
	return detail
}

// unavailable reports errors that mean "the database cannot be reached or
// cannot serve now": the request may be retried, and the client should hear
// so quickly (503) rather than wait for a timeout.
func unavailable(err error) bool {
	switch {
	case errors.Is(err, driver.ErrBadConn), errors.Is(err, sql.ErrConnDone),
		errors.Is(err, context.DeadlineExceeded),
		errors.Is(err, io.EOF), errors.Is(err, io.ErrUnexpectedEOF),
		errors.Is(err, syscall.ECONNREFUSED), errors.Is(err, syscall.ECONNRESET),
		errors.Is(err, syscall.EPIPE):
		return true
	}
	if _, ok := errors.AsType[net.Error](err); ok {
		return true
	}
	// database/sql does not export its "closed pool" error.
	if strings.Contains(err.Error(), "sql: database is closed") {
		return true
	}
	if pe := pq.As(err); pe != nil {
		switch {
		case pe.Code.Class() == "08", // connection exception
			pe.Code.Class() == "53",                                    // insufficient resources (too many connections, disk full)
			pe.Code == "57P01", pe.Code == "57P02", pe.Code == "57P03", // shutdown, crash, starting up
			pe.Code == "57014": // query canceled (statement timeout or cancelled request)
			return true
		}
	}
	if se, ok := errors.AsType[*sqlite.Error](err); ok {
		// By primary code (an extended code's low byte): a lock held by
		// another connection beyond busy_timeout (BUSY, LOCKED), a cancelled
		// or timed-out request (INTERRUPT), the disk or the file (IOERR,
		// FULL, CANTOPEN), memory, a lock protocol failure.
		switch se.Code() & 0xff {
		case sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED, sqlite3.SQLITE_INTERRUPT,
			sqlite3.SQLITE_IOERR, sqlite3.SQLITE_FULL, sqlite3.SQLITE_CANTOPEN,
			sqlite3.SQLITE_NOMEM, sqlite3.SQLITE_PROTOCOL:
			return true
		}
	}
	return false
}
