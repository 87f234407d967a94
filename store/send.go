package store

import (
	"context"
	"database/sql"
	"encoding/json"
	"errors"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/jmoiron/sqlx"
	"github.com/lib/pq"

	"imd/chat"
)

// The statements of a batch of sends (sendBatch). Their text does not depend
// on the size of the batch — the rows travel as arrays (PostgreSQL) or a JSON
// array (SQLite) — so each is parsed and planned once per connection and then
// only executed (SQLite: sendStmts; PostgreSQL: sendPrepare): planning a
// statement of VALUES lists of 8 parameters a row was most of what a batch
// cost PostgreSQL.

// lockSQL locks the batch's conversations ($1, the ids) in id order and reads
// their last seqs and, for direct conversations, the pair (directTo).
func (d *dialect) lockSQL() string {
	return `SELECT id, last_seq, direct_key FROM conversations WHERE id ` + d.inTexts(1) + ` ORDER BY id` + d.forUpdate
}

// directTo is who a direct conversation's events go to: the pair of its
// direct_key (the two user ids, sorted, joined by a space). Its members
// never change (a direct conversation cannot be left or changed), so the
// events a batch hands to the dispatcher carry them as To and dispatch
// looks no member set up for them: in a load of direct messages that
// lookup was a Redis round trip per dispatcher round and a script per
// conversation. The outbox rows themselves keep recipients NULL (all
// members): the sweeper's re-dispatch looks the same two up, and PostgreSQL
// is spared a JSON array per row.
func directTo(key sql.NullString) []string {
	if !key.Valid {
		return nil
	}
	return strings.Fields(key.String)
}

// checkSQL answers, for each request of a batch in request order (ord from
// 1): whether its sender is a member of its conversation; the message a
// member's idempotency key already names, if any; and, on PostgreSQL, the
// metadata of each request that will create a message (a member's, whose
// key is not stored and not used by an earlier request of the batch) as the
// database will store it (jsonb normalises it), so that nothing written
// needs reading back. Only those requests' metadata is cast: a replay or a
// non-member with metadata that is not JSON fails alone, as a conflict or
// not found, not the batch. SQLite stores metadata as given.
//
// PostgreSQL: $1–$4 are the arrays of conversation ids, sender ids, keys
// (NULL for none) and metadata (NULL for none). SQLite: $1 is a JSON array
// of {"c", "u", "k"} objects (sqliteReq).
func (d *dialect) checkSQL() string {
	reqs := `unnest($1::text[], $2::text[], $3::text[], $4::text[]) WITH ORDINALITY AS r(cid, uid, ckey, md, ord)`
	md := `CASE WHEN mb.user_id IS NOT NULL AND m.id IS NULL AND r.md IS NOT NULL
	             AND (r.ckey IS NULL OR row_number() OVER (PARTITION BY r.cid, r.uid, r.ckey ORDER BY r.ord) = 1)
	        THEN r.md::jsonb::text END`
	if d.sqlite() {
		reqs = `(SELECT value ->> 'c' AS cid, value ->> 'u' AS uid, value ->> 'k' AS ckey, key + 1 AS ord
		         FROM json_each($1)) AS r`
		md = `NULL`
	}
	return `SELECT r.ord, mb.user_id IS NOT NULL AS member,
	        ` + prefixed("m.", messageCols) + `, ` + md + ` AS md
	FROM ` + reqs + `
	LEFT JOIN members mb ON mb.conversation_id = r.cid AND mb.user_id = r.uid
	LEFT JOIN messages m ON mb.user_id IS NOT NULL AND m.conversation_id = r.cid AND m.sender_id = r.uid
	     AND m.client_msg_id = r.ckey AND m.client_msg_id IS NOT NULL
	ORDER BY r.ord`
}

// sqliteReq is one request of checkSQL's JSON array on SQLite.
type sqliteReq struct {
	CID string `json:"c"`
	UID string `json:"u"`
	Key string `json:"k,omitempty"`
}

// checkRow is a row of checkSQL.
type checkRow struct {
	Ord            int64          `db:"ord"`
	Member         bool           `db:"member"`
	ID             sql.NullString `db:"id"`
	ConversationID sql.NullString `db:"conversation_id"`
	Seq            sql.NullInt64  `db:"seq"`
	SenderID       sql.NullString `db:"sender_id"`
	Text           sql.NullString `db:"text"`
	Metadata       []byte         `db:"metadata"`
	ClientMsgID    sql.NullString `db:"client_msg_id"`
	CreatedAt      sql.NullTime   `db:"created_at"`
	MD             sql.NullString `db:"md"`
}

// writeSendsPostgres writes a batch in one statement: the outbox events
// ($1–$7, insertEventsPostgres), the conversations' last seqs and activity
// ($8–$10), the senders' read positions ($11–$13) and the messages
// ($14–$21). It returns one row per event, in event order. An idempotency
// key taken after all (the unique index is the backstop of the key look-up
// that sendBatch makes under the conversation locks) fails it, and with it
// the batch (errKeyConflict): a message skipped while its seq was counted
// would leave a gap (G3). The statement must fail rather than skip, because
// its transaction commits in the same round trip (send_pg.go). SQLite has
// no INSERT or UPDATE in a WITH, and runs them one statement each
// (sendBatch).
const writeSendsPostgres = `
WITH ev AS (` + insertEventsPostgres + `),
conv AS (
	UPDATE conversations SET last_seq = v.seq, last_activity_at = v.at
	FROM unnest($8::text[], $9::bigint[], $10::timestamptz[]) AS v(id, seq, at)
	WHERE conversations.id = v.id
),
rd AS (
	UPDATE members SET last_read_seq = GREATEST(last_read_seq, v.seq)
	FROM unnest($11::text[], $12::text[], $13::bigint[]) AS v(cid, uid, seq)
	WHERE members.conversation_id = v.cid AND members.user_id = v.uid
),
ins AS (
	INSERT INTO messages (conversation_id, seq, id, sender_id, text, metadata, client_msg_id, created_at)
	SELECT v.cid, v.seq, v.id, v.uid, v.text, v.md::jsonb, v.ckey, v.at
	FROM unnest($14::text[], $15::bigint[], $16::text[], $17::text[], $18::text[], $19::text[], $20::text[], $21::timestamptz[])
	     AS v(cid, seq, id, uid, text, md, ckey, at)
)
SELECT ev.id, ev.created_at FROM ev ORDER BY ev.id`

// batchPlans fixes how PostgreSQL plans the batch's statements, for the
// rest of its transaction only. Every statement of a batch finds its rows
// by key (conversation id, member pair, idempotency key), so the right
// plan is always the same: index lookups in nested loops, whatever the
// tables' statistics say (TestSendBatchPlansUseIndexes).
//
// Left to itself the planner goes by those statistics, and without an
// ANALYZE (autovacuum off, as on the benchmark machine, or a table that
// grew since the last one) it took the tables for a few pages and chose
// sequential scans and hash joins: the lock statement compared every
// conversation's id with the batch's ids, the last-seq update hashed
// all of conversations, the check all of members — every batch, costing
// more as the tables grew (perf: hash joins and visibility checks of
// scanned tuples were ~40 % of the committing backend). It also planned
// each execution anew (~0.2–0.3 ms for the check and for the write): a
// custom plan, which sees the arrays' lengths, always looks cheaper than
// the generic one. SET LOCAL, not a connection setting, so that every
// other query keeps the planner's own judgement. docs/performance.md has
// the measurements.
const batchPlans = `SET LOCAL plan_cache_mode = force_generic_plan; SET LOCAL enable_seqscan = off; ` +
	`SET LOCAL enable_hashjoin = off; SET LOCAL enable_mergejoin = off`

// sendStmts are the prepared statements of a SQLite batch (sendBatchSQLite),
// prepared on first use (after the migrations) and kept for the life of the
// store. PostgreSQL's are prepared per connection, by name (send_pg.go).
type sendStmts struct {
	mu          sync.Mutex
	lock, check *sqlx.Stmt
}

// sendStatements returns the statements, preparing them if need be. It
// runs before the batch's transaction: the writer's one connection is free
// then.
func (s *Store) sendStatements(ctx context.Context) (*sendStmts, error) {
	p := &s.stmts
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.lock != nil {
		return p, nil
	}
	lock, err := s.db.PreparexContext(ctx, s.d.lockSQL())
	if err != nil {
		return nil, err
	}
	check, err := s.db.PreparexContext(ctx, s.d.checkSQL())
	if err != nil {
		_ = lock.Close()
		return nil, err
	}
	p.lock, p.check = lock, check
	return p, nil
}

// close closes the prepared statements, if any.
func (p *sendStmts) close() {
	p.mu.Lock()
	defer p.mu.Unlock()
	for _, st := range []*sqlx.Stmt{p.lock, p.check} {
		if st != nil {
			_ = st.Close()
		}
	}
	p.lock, p.check = nil, nil
}

// errKeyConflict fails a batch of which the database would not insert every
// message because an idempotency key was taken (see writeSendsPostgres).
// Retryable: nothing is stored, and a retry finds the key.
var errKeyConflict = chat.Unavailable("database", errors.New("store: an idempotency key of the batch was taken on insert"))

// lockedConv is a row of lockSQL.
type lockedConv struct {
	ID        string         `db:"id"`
	LastSeq   int64          `db:"last_seq"`
	DirectKey sql.NullString `db:"direct_key"`
}

// sendBatch stores ms in one transaction and returns the outcome of each, in
// order, or an error of the transaction as a whole (nothing stored):
//
//  1. lock the batch's conversations, in id order so that batches of several
//     nodes (or lanes) cannot deadlock: on PostgreSQL with FOR UPDATE (the
//     lock orders sends, so commit order is seq order, G3); SQLite's single
//     writer already runs one transaction at a time (BEGIN IMMEDIATE);
//  2. with the locks held, in a statement of its own (READ COMMITTED sees
//     what committed while we waited for the locks; a statement that took
//     the locks too would not), checkSQL: membership, so the database, not
//     a cache, decides who may write (G7) — a non-member, or a conversation
//     that does not exist, is CodeNotFound without saying which; the
//     idempotency keys already stored, whose requests are replays of the
//     original (G2), or conflicts when the text or metadata differ
//     (members' keys only: a former member cannot read a message back
//     through a replay, G7); and the stored form of new messages' metadata.
//     A key used twice within the batch is created by its first request and
//     replayed by the others;
//  3. number the new messages from the locked last_seq, in request order,
//     and build the messages and their message.created events as stored
//     (planBatch);
//  4. write: the conversations' last_seq and activity, the messages (the
//     idempotency index stays the backstop: a conflict on it fails the
//     batch, errKeyConflict; another unique violation, a message id used
//     before, fails it as a conflict, which the committer retries one
//     request at a time), the senders' read positions (sending reads), and
//     one message.created outbox event per new message, in seq order — one
//     statement on PostgreSQL (writeSendsPostgres), four on SQLite.
//
// The steps are the same on both databases; how they reach the database is
// not: PostgreSQL's run in two round trips (sendBatchPostgres), SQLite's in
// a transaction of the writer connection (sendBatchSQLite).
func (s *Store) sendBatch(ctx context.Context, ms []chat.NewMessage) ([]sendResult, error) {
	if s.d.sqlite() {
		return s.sendBatchSQLite(ctx, ms)
	}
	return s.sendBatchPostgres(ctx, ms)
}

// batchConversations are the conversations of ms, sorted (the lock order)
// and each once.
func batchConversations(ms []chat.NewMessage) []string {
	cids := make([]string, 0, len(ms))
	for _, m := range ms {
		cids = append(cids, m.ConversationID)
	}
	slices.Sort(cids)
	return slices.Compact(cids)
}

// sendBatchSQLite runs sendBatch's steps in a transaction of the writer
// connection.
func (s *Store) sendBatchSQLite(ctx context.Context, ms []chat.NewMessage) ([]sendResult, error) {
	stmts, err := s.sendStatements(ctx)
	if err != nil {
		return nil, dbErr(err)
	}
	var res []sendResult
	err = s.inTx(ctx, func(tx *sqlx.Tx) error {
		var convs []lockedConv
		if err := tx.StmtxContext(ctx, stmts.lock).SelectContext(ctx, &convs, s.d.texts(batchConversations(ms))); err != nil {
			return err
		}
		reqs := make([]sqliteReq, len(ms))
		for i, m := range ms {
			reqs[i] = sqliteReq{m.ConversationID, m.SenderID, m.ClientMsgID}
		}
		b, err := json.Marshal(reqs)
		if err != nil {
			return err
		}
		var checks []checkRow
		if err := tx.StmtxContext(ctx, stmts.check).SelectContext(ctx, &checks, string(b)); err != nil {
			return err
		}
		p, err := planBatch(ms, convs, checks)
		if err != nil {
			return err
		}
		var stored []chat.OutboxEvent
		if len(p.evs) > 0 {
			if stored, err = s.writeSendsSQLite(ctx, tx, &p.w, p.evs); err != nil {
				return err
			}
		}
		res = p.results(stored)
		return nil
	})
	if err != nil {
		return nil, err
	}
	return res, nil
}

// batchPlan is what a batch writes and answers, decided from the locked
// conversations and the check (steps 3 and 4 of sendBatch).
type batchPlan struct {
	ms       []chat.NewMessage
	res      []sendResult // the outcomes decided without writing: not found, replays
	creators []int        // the requests that create a message, in seq order per conversation
	dupOf    map[int]int  // a later request of a key new in the batch → its creator
	msgs     []chat.Message
	direct   map[string][]string // direct conversations' pairs (directTo)
	w        sendWrites
	evs      []chat.OutboxEvent // one per creator, as the write stores them
}

// planBatch numbers the new messages of ms and builds what the write
// stores. The error is a request's that the database would have rejected
// (metadata that is not JSON, on SQLite).
func planBatch(ms []chat.NewMessage, convs []lockedConv, checks []checkRow) (*batchPlan, error) {
	type pair struct{ cid, uid string }
	type key struct {
		pair
		key string
	}
	if len(checks) != len(ms) {
		return nil, errors.New("store: send check: wrong number of rows")
	}
	p := &batchPlan{ms: ms, res: make([]sendResult, len(ms)), dupOf: map[int]int{}, msgs: make([]chat.Message, len(ms)),
		direct: map[string][]string{}}
	last := make(map[string]int64, len(convs))
	for _, c := range convs {
		last[c.ID] = c.LastSeq
		if to := directTo(c.DirectKey); to != nil {
			p.direct[c.ID] = to
		}
	}

	// 3. Who creates, and with which seq.
	firstOf := map[key]int{} // the creator of a key new in this batch
	for i, m := range ms {
		c := checks[i]
		if _, locked := last[m.ConversationID]; !locked || !c.Member {
			p.res[i].err = chat.ErrNotFound // no such conversation, or not a member
			continue
		}
		if c.ID.Valid {
			p.res[i] = replayOf(messageRow{ID: c.ID.String, ConversationID: c.ConversationID.String,
				Seq: c.Seq.Int64, SenderID: c.SenderID.String, Text: c.Text.String, Metadata: c.Metadata,
				ClientMsgID: c.ClientMsgID, CreatedAt: c.CreatedAt.Time}.message(), m)
			continue
		}
		if m.ClientMsgID != "" {
			k := key{pair{m.ConversationID, m.SenderID}, m.ClientMsgID}
			if j, ok := firstOf[k]; ok {
				p.dupOf[i] = j
				continue
			}
			firstOf[k] = i
		}
		last[m.ConversationID]++
		md := m.Metadata
		if c.MD.Valid {
			md = json.RawMessage(c.MD.String)
		}
		p.msgs[i] = chat.Message{ID: m.ID, ConversationID: m.ConversationID, Seq: last[m.ConversationID],
			SenderID: m.SenderID, Text: m.Text, Metadata: nilIfEmpty(md), ClientMsgID: m.ClientMsgID,
			CreatedAt: storedTime(m.CreatedAt)}
		p.creators = append(p.creators, i)
	}

	// 4. The writes. Per conversation: its new last seq and the time of
	// its last new message; per sender: the seq of their last one.
	w := &p.w
	bumped := map[string]int{}
	read := map[pair]int{}
	p.evs = make([]chat.OutboxEvent, len(p.creators))
	for n, i := range p.creators { // ascending seq within each conversation
		msg := p.msgs[i]
		if j, ok := bumped[msg.ConversationID]; ok {
			w.convSeqs[j], w.convAts[j] = msg.Seq, msg.CreatedAt
		} else {
			bumped[msg.ConversationID] = len(w.convs)
			w.convs, w.convSeqs, w.convAts = append(w.convs, msg.ConversationID), append(w.convSeqs, msg.Seq), append(w.convAts, msg.CreatedAt)
		}
		rp := pair{msg.ConversationID, msg.SenderID}
		if j, ok := read[rp]; ok {
			w.readSeqs[j] = msg.Seq
		} else {
			read[rp] = len(w.readCids)
			w.readCids, w.readUids, w.readSeqs = append(w.readCids, rp.cid), append(w.readUids, rp.uid), append(w.readSeqs, msg.Seq)
		}
		w.msgs = append(w.msgs, msg)
		data, err := json.Marshal(msg)
		if err != nil {
			// Metadata that is not JSON, on SQLite (PostgreSQL's check
			// statement has rejected it already): what its json_valid
			// CHECK would have answered.
			return nil, &chat.Error{Code: chat.CodeInvalid, Message: "invalid value", Err: err}
		}
		p.evs[n] = chat.OutboxEvent{ConversationID: msg.ConversationID, Type: chat.EventMessageCreated,
			Seq: msg.Seq, Data: data, CreatedAt: msg.CreatedAt}
	}
	return p, nil
}

// results are the batch's outcomes once its events are stored (stored:
// p.evs with the ids and times the database gave them).
func (p *batchPlan) results(stored []chat.OutboxEvent) []sendResult {
	for n, i := range p.creators {
		stored[n].To = p.direct[stored[n].ConversationID] // after the write: see directTo
		p.res[i] = sendResult{msg: p.msgs[i], created: true, events: []chat.OutboxEvent{stored[n]}}
	}
	for i, j := range p.dupOf {
		p.res[i] = replayOf(p.res[j].msg, p.ms[i])
	}
	return p.res
}

// storedTime is t as a time column stores it, in UTC: to the microsecond.
// Rounded here, so that the database stores exactly what Send returns
// without reading it back.
func storedTime(t time.Time) time.Time {
	return t.Round(time.Microsecond).UTC()
}

// sendWrites is what a batch writes besides its events: per conversation,
// its new last seq and last activity; per sender, the seq of their last
// new message (sending reads); the new messages, in seq order per
// conversation.
type sendWrites struct {
	convs              []string
	convSeqs           []int64
	convAts            []time.Time
	readCids, readUids []string
	readSeqs           []int64
	msgs               []chat.Message
}

// writeSendsArgs are writeSendsPostgres's parameters for w and evs.
func (s *Store) writeSendsArgs(w *sendWrites, evs []chat.OutboxEvent) ([]any, error) {
	args, err := s.insertEventsArgs(time.Time{}, evs)
	if err != nil {
		return nil, err
	}
	n := len(w.msgs)
	cids, seqs, ids, uids, texts := make([]string, n), make([]int64, n), make([]string, n), make([]string, n), make([]string, n)
	mds, keys, ats := make([]sql.NullString, n), make([]sql.NullString, n), make([]string, n)
	for i, m := range w.msgs {
		cids[i], seqs[i], ids[i], uids[i], texts[i] = m.ConversationID, m.Seq, m.ID, m.SenderID, m.Text
		mds[i] = sql.NullString{String: string(m.Metadata), Valid: len(m.Metadata) > 0}
		keys[i] = sql.NullString{String: m.ClientMsgID, Valid: m.ClientMsgID != ""}
		ats[i] = pgTime(m.CreatedAt)
	}
	convAts := make([]string, len(w.convAts))
	for i, t := range w.convAts {
		convAts[i] = pgTime(t)
	}
	args = append(args,
		pq.Array(w.convs), pq.Array(w.convSeqs), pq.Array(convAts),
		pq.Array(w.readCids), pq.Array(w.readUids), pq.Array(w.readSeqs),
		pq.Array(cids), pq.Array(seqs), pq.Array(ids), pq.Array(uids), pq.Array(texts), pq.Array(mds), pq.Array(keys), pq.Array(ats))
	return args, nil
}

// pgTime is t as timestamptz text, to the microsecond.
func pgTime(t time.Time) string {
	return t.UTC().Format("2006-01-02T15:04:05.999999Z")
}

// writeSendsSQLite writes a batch one statement at a time and returns evs
// as stored.
func (s *Store) writeSendsSQLite(ctx context.Context, tx *sqlx.Tx, w *sendWrites, evs []chat.OutboxEvent) ([]chat.OutboxEvent, error) {
	args := make([]any, 0, 3*len(w.convs))
	for i, cid := range w.convs {
		args = append(args, cid, w.convSeqs[i], w.convAts[i])
	}
	if _, err := tx.ExecContext(ctx,
		`UPDATE conversations SET last_seq = v.seq, last_activity_at = v.at
		 FROM `+s.d.values(len(w.convs), "v", "id", "seq bigint", "at timestamptz")+`
		 WHERE conversations.id = v.id`, args...); err != nil {
		return nil, err
	}

	args = make([]any, 0, 8*len(w.msgs))
	for _, m := range w.msgs {
		var ckey any
		if m.ClientMsgID != "" {
			ckey = m.ClientMsgID
		}
		args = append(args, m.ConversationID, m.Seq, m.ID, m.SenderID, m.Text, jsonArg(m.Metadata), ckey, m.CreatedAt)
	}
	r, err := tx.ExecContext(ctx,
		`INSERT INTO messages (conversation_id, seq, id, sender_id, text, metadata, client_msg_id, created_at)
		 VALUES `+s.d.valueRows(len(w.msgs), "", "", "", "", "", "jsonb", "", "")+`
		 ON CONFLICT (conversation_id, sender_id, client_msg_id) WHERE client_msg_id IS NOT NULL DO NOTHING`, args...)
	if err != nil {
		return nil, err
	}
	if n, err := r.RowsAffected(); err != nil {
		return nil, err
	} else if n != int64(len(w.msgs)) {
		return nil, errKeyConflict
	}

	args = make([]any, 0, 3*len(w.readCids))
	for i := range w.readCids {
		args = append(args, w.readCids[i], w.readUids[i], w.readSeqs[i])
	}
	if _, err := tx.ExecContext(ctx,
		`UPDATE members SET last_read_seq = `+s.d.greatest+`(last_read_seq, v.seq)
		 FROM `+s.d.values(len(w.readCids), "v", "cid", "uid", "seq bigint")+`
		 WHERE members.conversation_id = v.cid AND members.user_id = v.uid`, args...); err != nil {
		return nil, err
	}
	return s.insertEvents(ctx, tx, time.Time{}, evs)
}
