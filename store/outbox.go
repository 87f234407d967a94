package store

import (
	"cmp"
	"context"
	"database/sql"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"slices"
	"time"

	"github.com/jmoiron/sqlx"
	"github.com/lib/pq"

	"imd/chat"
)

type outboxRow struct {
	ID             int64      `db:"id"`
	ConversationID string     `db:"conversation_id"`
	Type           string     `db:"type"`
	Seq            int64      `db:"seq"`
	Data           []byte     `db:"data"`
	Recipients     stringList `db:"recipients"`
	Extra          stringList `db:"extra"`
	CreatedAt      time.Time  `db:"created_at"`
}

func (r outboxRow) event() chat.OutboxEvent {
	return chat.OutboxEvent{
		ID:             r.ID,
		ConversationID: r.ConversationID,
		Type:           chat.EventType(r.Type),
		Seq:            r.Seq,
		Data:           nilIfEmpty(r.Data),
		To:             nilIfNone(r.Recipients),
		Extra:          nilIfNone(r.Extra),
		CreatedAt:      r.CreatedAt.UTC(),
	}
}

func nilIfEmpty(b []byte) json.RawMessage {
	if len(b) == 0 {
		return nil
	}
	return b
}

func nilIfNone(s []string) []string {
	if len(s) == 0 {
		return nil
	}
	return s
}

type insertedEvent struct {
	ID        int64     `db:"id"`
	CreatedAt time.Time `db:"created_at"`
}

const outboxCols = `id, conversation_id, type, seq, data, recipients, extra, created_at`

// insertEventsPostgres writes any number of events in one round trip (a group
// addition writes one member.added per new member, a batch of sends one
// message.created per message). Arrays cannot nest per row, so each row's
// recipient lists travel as a JSON array in a text element (empty for none).
// The ORDER BY makes the ids follow the order of the events, which the
// dispatcher keeps. created_at is the event's mutation's own time when it has
// one (e.at, RFC 3339; empty for none), so that the dispatcher's
// session-cache touches use the same time as conversations.last_activity_at;
// else the database's.
const insertEventsPostgres = `
INSERT INTO outbox (conversation_id, type, seq, data, recipients, extra, created_at)
SELECT e.cid, e.type, e.seq, NULLIF(e.data, ''::bytea),
       CASE WHEN e.rcpt = '' THEN NULL ELSE ARRAY(SELECT jsonb_array_elements_text(e.rcpt::jsonb)) END,
       CASE WHEN e.extra = '' THEN NULL ELSE ARRAY(SELECT jsonb_array_elements_text(e.extra::jsonb)) END,
       COALESCE(NULLIF(e.at, '')::timestamptz, date_trunc('milliseconds', now()))
FROM unnest($1::text[], $2::text[], $3::bigint[], $4::bytea[], $5::text[], $6::text[], $7::text[])
     WITH ORDINALITY AS e(cid, type, seq, data, rcpt, extra, at, ord)
ORDER BY e.ord
RETURNING id, created_at`

// insertEventsSQLite is insertEventsPostgres for SQLite, which has neither
// arrays nor unnest: the events travel as one JSON array of sqliteEvent
// objects ($1), read by json_each in array order (key). Recipient lists stay
// JSON arrays (-> returns them as JSON text, NULL when absent); the payload
// travels in hex so that its bytes are stored exactly. WHERE true: without
// it SQLite may not parse a SELECT's end in an INSERT. created_at as above
// (at: Unix microseconds, absent for none).
const insertEventsSQLite = `
INSERT INTO outbox (conversation_id, type, seq, data, recipients, extra, created_at)
SELECT e.value ->> 'cid', e.value ->> 'type', e.value ->> 'seq', unhex(e.value ->> 'data'),
       e.value -> 'to', e.value -> 'extra',
       COALESCE(e.value ->> 'at', ` + sqliteNow + `)
FROM json_each($1) AS e
WHERE true
ORDER BY e.key
RETURNING id, created_at`

// sqliteEvent is one element of insertEventsSQLite's JSON array.
type sqliteEvent struct {
	CID   string   `json:"cid"`
	Type  string   `json:"type"`
	Seq   int64    `json:"seq"`
	Data  string   `json:"data,omitempty"` // hex
	To    []string `json:"to,omitempty"`
	Extra []string `json:"extra,omitempty"`
	At    *int64   `json:"at,omitempty"` // Unix microseconds
}

// insertEvents writes evs to the outbox inside tx and returns them with the
// ids and times the database gave them. An event's time is its CreatedAt if
// set, else at, the time of the mutation; zero when it has none (the
// database clock stamps the event then).
func (s *Store) insertEvents(ctx context.Context, tx *sqlx.Tx, at time.Time, evs []chat.OutboxEvent) ([]chat.OutboxEvent, error) {
	if len(evs) == 0 {
		return nil, nil
	}
	n := len(evs)
	args, err := s.insertEventsArgs(at, evs)
	if err != nil {
		return nil, err
	}
	var rows []insertedEvent
	if err := tx.SelectContext(ctx, &rows, s.d.insertEventsSQL, args...); err != nil {
		return nil, err
	}
	if len(rows) != n {
		return nil, fmt.Errorf("outbox: inserted %d events, want %d", len(rows), n)
	}
	// Ids are drawn in insertion order, which is the order of evs.
	slices.SortFunc(rows, func(a, b insertedEvent) int { return cmp.Compare(a.ID, b.ID) })
	out := slices.Clone(evs)
	for i := range out {
		out[i].ID = rows[i].ID
		out[i].CreatedAt = rows[i].CreatedAt.UTC()
		out[i].Data = nilIfEmpty(out[i].Data)
		out[i].To = nilIfNone(out[i].To)
		out[i].Extra = nilIfNone(out[i].Extra)
	}
	return out, nil
}

// insertEventsArgs are the arguments of the dialect's insertEventsSQL.
func (s *Store) insertEventsArgs(at time.Time, evs []chat.OutboxEvent) ([]any, error) {
	n := len(evs)
	when := func(e chat.OutboxEvent) time.Time {
		if !e.CreatedAt.IsZero() {
			return e.CreatedAt
		}
		return at
	}
	if s.d.sqlite() {
		rows := make([]sqliteEvent, n)
		for i, e := range evs {
			rows[i] = sqliteEvent{CID: e.ConversationID, Type: string(e.Type), Seq: e.Seq,
				Data: hex.EncodeToString(e.Data), To: e.To, Extra: e.Extra}
			if t := when(e); !t.IsZero() {
				us := t.UnixMicro()
				rows[i].At = &us
			}
		}
		b, err := json.Marshal(rows)
		if err != nil {
			return nil, err
		}
		return []any{string(b)}, nil
	}
	cids, types, rcpts, extras, ats := make([]string, n), make([]string, n), make([]string, n), make([]string, n), make([]string, n)
	seqs, datas := make([]int64, n), make([][]byte, n)
	for i, e := range evs {
		cids[i], types[i], seqs[i], datas[i] = e.ConversationID, string(e.Type), e.Seq, e.Data
		var err error
		if rcpts[i], err = jsonList(e.To); err != nil {
			return nil, err
		}
		if extras[i], err = jsonList(e.Extra); err != nil {
			return nil, err
		}
		if t := when(e); !t.IsZero() {
			ats[i] = t.UTC().Format(time.RFC3339Nano)
		}
	}
	return []any{pq.Array(cids), pq.Array(types), pq.Array(seqs), pq.Array(datas), pq.Array(rcpts),
		pq.Array(extras), pq.Array(ats)}, nil
}

func jsonList(ids []string) (string, error) {
	if len(ids) == 0 {
		return "", nil
	}
	b, err := json.Marshal(ids)
	return string(b), err
}

// DefaultClaimLimit is used when ClaimEvents is given no positive limit: a
// sweeper batch small enough to dispatch well within a lease.
const DefaultClaimLimit = 100

// ClaimEvents leases up to limit events created before olderThan that no
// other node holds. FOR UPDATE SKIP LOCKED lets sweepers on several nodes
// claim disjoint batches at once; the lease (not the row lock, which ends
// with the statement) keeps others off the claimed rows until it runs out, so
// a node that dies mid-dispatch only delays its batch. On SQLite the one
// UPDATE is atomic under the single writer, which is all SKIP LOCKED adds.
func (s *Store) ClaimEvents(ctx context.Context, olderThan time.Time, lease time.Duration, limit int) ([]chat.OutboxEvent, error) {
	if limit <= 0 {
		limit = DefaultClaimLimit
	}
	var rows []outboxRow
	if err := s.db.SelectContext(ctx, &rows,
		`UPDATE outbox SET lease_until = `+s.d.plusMicros(s.d.now, "$2")+`
		 WHERE id IN (
			SELECT id FROM outbox
			WHERE created_at < $1 AND lease_until < `+s.d.now+`
			ORDER BY id
			LIMIT $3`+s.d.skipLocked+`)
		 RETURNING `+outboxCols,
		olderThan, lease.Microseconds(), limit); err != nil {
		return nil, dbErr(err)
	}
	slices.SortFunc(rows, func(a, b outboxRow) int { return cmp.Compare(a.ID, b.ID) })
	out := make([]chat.OutboxEvent, 0, len(rows))
	for _, r := range rows {
		out = append(out, r.event())
	}
	return out, nil
}

// EventsDone deletes dispatched events; ids already gone are ignored (two
// nodes may both have dispatched an event whose lease ran out).
func (s *Store) EventsDone(ctx context.Context, ids []int64) error {
	if len(ids) == 0 {
		return nil
	}
	_, err := s.db.ExecContext(ctx, `DELETE FROM outbox WHERE id `+s.d.inInts(1), s.d.ints(ids))
	return dbErr(err)
}

// PendingMessages implements chat.Outbox. The outbox is a queue, small
// while Redis keeps up; after an outage it holds everything sent meanwhile,
// and that is when logs are refilled. So each conversation's lowest seq is
// one entry of the partial index outbox_message_seq_idx (ORDER BY seq LIMIT
// 1), however many of its messages are pending.
func (s *Store) PendingMessages(ctx context.Context, cids []string) (map[string]int64, error) {
	out := make(map[string]int64, len(cids))
	if len(cids) == 0 {
		return out, nil
	}
	var rows []struct {
		ConversationID string        `db:"conversation_id"`
		Seq            sql.NullInt64 `db:"seq"` // NULL: none pending
	}
	if err := s.rdb.SelectContext(ctx, &rows, s.pendingMessagesSQL(), s.d.texts(cids)); err != nil {
		return nil, dbErr(err)
	}
	for _, r := range rows {
		if r.Seq.Valid {
			out[r.ConversationID] = r.Seq.Int64
		}
	}
	return out, nil
}

// pendingMessagesSQL is PendingMessages' query. The type is a literal, not a
// parameter, so that the planner can match the index's predicate.
func (s *Store) pendingMessagesSQL() string {
	return `SELECT c.id AS conversation_id,
		(SELECT o.seq FROM outbox o
		 WHERE o.type = '` + string(chat.EventMessageCreated) + `' AND o.conversation_id = c.id
		 ORDER BY o.seq LIMIT 1) AS seq
		FROM ` + s.d.unnestTexts(1, "c")
}
