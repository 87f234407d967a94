package store

import (
	"context"
	"database/sql"
	"database/sql/driver"
	"errors"
	"fmt"
	"net"
	"strings"

	"github.com/jmoiron/sqlx"
	"github.com/lib/pq"

	"imd/chat"
)

// A batch of sends on PostgreSQL, in two round trips.
//
// Through database/sql's transactions and prepared statements, sendBatch's
// steps took six round trips a batch: BEGIN, the plan settings, the lock,
// the check, the write, COMMIT. Each round trip is a wait for the database's
// answer and then for this process to be scheduled again, and on a busy
// machine those waits, not the database's work, were most of what a batch
// took: in `hot` (50 senders into one conversation) a batch of ~25 messages
// took ~11 ms, 1.2–1.9 ms a round trip, of which the database's CPU was ~3
// (docs/performance.md, item 27). Every sender of a batch waits for all of
// it, so with a given number of senders a batch's latency is the rate.
//
// lib/pq cannot pipeline, but one message of the simple query protocol
// carries several statements, and they run one after another:
//
//  1. BEGIN; the plan settings (batchPlans); EXECUTE the lock; EXECUTE the
//     check. Each statement takes its own snapshot (READ COMMITTED), so the
//     check sees what committed while the lock waited, as sendBatch needs.
//  2. EXECUTE the write; COMMIT. A statement that fails ends the message:
//     the COMMIT does not run, and the connection, in a failed transaction,
//     is closed (discard). So the write must fail rather than skip what it
//     cannot store (writeSendsPostgres).
//
// The statements are prepared once per connection, by name (sendPrepare,
// the same text as before), so EXECUTE runs the cached generic plan as the
// extended protocol's prepared statements did. A connection of the pool
// that does not have them yet answers the first EXECUTE with 26000 and is
// given them.
//
// The arguments travel as literals: each array's text form (what lib/pq
// would send as a parameter), quoted by pq.QuoteLiteral, which no content
// can break out of. The one thing a literal cannot carry is NUL (the
// protocol's strings end at it): the domain rejects it in text, JSON
// cannot hold it raw, and a batch that has one anyway fails before it is
// sent (executeSQL), so that the committer retries its requests alone.

// The prepared statements' names, per connection.
const (
	stmtLock  = "imd_send_lock"
	stmtCheck = "imd_send_check"
	stmtWrite = "imd_send_write"
)

// sendPrepare prepares a connection's statements for batches.
var sendPrepare = "PREPARE " + stmtLock + " AS " + postgresDialect.lockSQL() +
	";\nPREPARE " + stmtCheck + " AS " + postgresDialect.checkSQL() +
	";\nPREPARE " + stmtWrite + " AS " + writeSendsPostgres

// sendBatchPostgres runs sendBatch's steps in two round trips (above).
func (s *Store) sendBatchPostgres(ctx context.Context, ms []chat.NewMessage) ([]sendResult, error) {
	first, err := lockCheckSQL(ms)
	if err != nil {
		return nil, err
	}
	conn, convs, checks, err := s.lockAndCheck(ctx, first)
	if err != nil {
		return nil, dbErr(err)
	}
	committed := false
	defer func() {
		if committed {
			_ = conn.Close()
		} else {
			discard(conn) // mid-transaction: closing it is the rollback
		}
	}()
	p, err := planBatch(ms, convs, checks)
	if err != nil {
		return nil, dbErr(err)
	}
	var stored []chat.OutboxEvent
	if len(p.evs) == 0 {
		// Nothing new (replays, non-members): end the transaction, and
		// with it the locks.
		if _, err := conn.ExecContext(ctx, "COMMIT"); err != nil {
			return nil, dbErr(err)
		}
	} else if stored, err = s.writeAndCommit(ctx, conn, p); err != nil {
		return nil, err
	}
	committed = true
	return p.results(stored), nil
}

// lockCheckSQL is the first round trip of a batch of ms: the transaction,
// the locks of its conversations, the check of its requests.
func lockCheckSQL(ms []chat.NewMessage) (string, error) {
	lock, err := executeSQL(stmtLock, pq.Array(batchConversations(ms)))
	if err != nil {
		return "", err
	}
	cids, uids := make([]string, len(ms)), make([]string, len(ms))
	keys, mds := make([]sql.NullString, len(ms)), make([]sql.NullString, len(ms))
	for i, m := range ms {
		cids[i], uids[i] = m.ConversationID, m.SenderID
		keys[i] = sql.NullString{String: m.ClientMsgID, Valid: m.ClientMsgID != ""}
		mds[i] = sql.NullString{String: string(m.Metadata), Valid: len(m.Metadata) > 0}
	}
	check, err := executeSQL(stmtCheck, pq.Array(cids), pq.Array(uids), pq.Array(keys), pq.Array(mds))
	if err != nil {
		return "", err
	}
	return "BEGIN; " + batchPlans + ";\n" + lock + ";\n" + check, nil
}

// lockAndCheck runs q (lockCheckSQL) on a connection of the pool and returns
// the connection, in the transaction q began, with q's two results. A
// connection without the statements gets them (sendPrepare).
//
// The connections the pool keeps may have died since their last use (the
// database restarted, a proxy cut them), and a batch must not fail for
// that: q runs again on the next connection, until one is alive or the
// pool has to open one (at most the pool's idle connections and one more).
// Nothing was written on a connection that died. database/sql did the same
// for BEGIN.
func (s *Store) lockAndCheck(ctx context.Context, q string) (*sqlx.Conn, []lockedConv, []checkRow, error) {
	idle := s.db.Stats().Idle
	for tries := 0; ; tries++ {
		conn, err := s.db.Connx(ctx)
		if err != nil {
			return nil, nil, nil, err
		}
		convs, checks, err := queryLockCheck(ctx, conn, q)
		if pe := pq.As(err); pe != nil && pe.Code == "26000" { // invalid_sql_statement_name
			if _, err = conn.ExecContext(ctx, "ROLLBACK;\n"+sendPrepare); err == nil {
				convs, checks, err = queryLockCheck(ctx, conn, q)
			}
		}
		if err == nil {
			return conn, convs, checks, nil
		}
		discard(conn)
		if !badConn(err) || ctx.Err() != nil || tries >= idle {
			return nil, nil, nil, err
		}
	}
}

// badConn reports whether err says the connection itself is gone (lib/pq:
// driver.ErrBadConn for an end of stream or a fatal error, the network's
// error for a failed write).
func badConn(err error) bool {
	_, netErr := errors.AsType[*net.OpError](err)
	return netErr || errors.Is(err, driver.ErrBadConn)
}

// queryLockCheck runs q and reads its two results.
func queryLockCheck(ctx context.Context, conn *sqlx.Conn, q string) (convs []lockedConv, checks []checkRow, err error) {
	rows, err := conn.QueryContext(ctx, q)
	if err != nil {
		return nil, nil, err
	}
	defer func() {
		if cerr := rows.Close(); err == nil {
			err = cerr
		}
	}()
	if err := sqlx.StructScan(rows, &convs); err != nil {
		return nil, nil, err
	}
	if !rows.NextResultSet() {
		if err := rows.Err(); err != nil {
			return nil, nil, err
		}
		return nil, nil, errors.New("store: send check: no result")
	}
	if err := sqlx.StructScan(rows, &checks); err != nil {
		return nil, nil, err
	}
	return convs, checks, nil
}

// writeAndCommit is the second round trip of a batch: p's write and the
// commit. It returns p's events as stored.
func (s *Store) writeAndCommit(ctx context.Context, conn *sqlx.Conn, p *batchPlan) ([]chat.OutboxEvent, error) {
	args, err := s.writeSendsArgs(&p.w, p.evs)
	if err != nil {
		return nil, dbErr(err)
	}
	write, err := executeSQL(stmtWrite, args...)
	if err != nil {
		return nil, err
	}
	var rows []insertedEvent
	if err := conn.SelectContext(ctx, &rows, write+";\nCOMMIT"); err != nil {
		if pe := pq.As(err); pe != nil && pe.Code == "23505" && pe.Constraint == "messages_idempotency_idx" {
			return nil, errKeyConflict
		}
		return nil, dbErr(err)
	}
	if len(rows) != len(p.evs) {
		// Cannot be (the insert returns a row per event it is given), and
		// comes after the commit: an error, as for an answer cut off.
		return nil, dbErr(fmt.Errorf("outbox: inserted %d events, want %d", len(rows), len(p.evs)))
	}
	out := make([]chat.OutboxEvent, len(p.evs))
	for i, ev := range p.evs {
		ev.ID, ev.CreatedAt = rows[i].ID, rows[i].CreatedAt.UTC()
		out[i] = ev
	}
	return out, nil
}

// executeSQL is the statement that executes the prepared statement name
// with args (pq.Array values, strings, NULLs) as literals.
func executeSQL(name string, args ...any) (string, error) {
	// The literals first, then the statement in one allocation: the write's
	// arguments carry every message of the batch, and a builder that grows
	// by doubling had allocated them about twice over.
	lits := make([]string, len(args))
	size := len("EXECUTE ()") + len(name)
	for i, a := range args {
		if v, ok := a.(driver.Valuer); ok {
			var err error
			if a, err = v.Value(); err != nil {
				return "", dbErr(err)
			}
		}
		switch v := a.(type) {
		case nil:
			lits[i] = "NULL"
		case string:
			if strings.IndexByte(v, 0) >= 0 {
				return "", &chat.Error{Code: chat.CodeInvalid, Message: "invalid value",
					Err: errors.New("store: NUL in a batch's argument")}
			}
			lits[i] = pq.QuoteLiteral(v)
		default:
			return "", fmt.Errorf("store: no literal for %T", a)
		}
		size += len(lits[i]) + len(", ")
	}
	var b strings.Builder
	b.Grow(size)
	b.WriteString("EXECUTE ")
	b.WriteString(name)
	b.WriteByte('(')
	for i, lit := range lits {
		if i > 0 {
			b.WriteString(", ")
		}
		b.WriteString(lit)
	}
	b.WriteByte(')')
	return b.String(), nil
}

// discard closes conn instead of giving it back to the pool: it may be in a
// transaction, or in a state its last error left.
func discard(conn *sqlx.Conn) {
	_ = conn.Raw(func(any) error { return driver.ErrBadConn })
}
