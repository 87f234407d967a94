package store

import (
	"bytes"
	"context"
	"database/sql"
	"encoding/json"
	"errors"
	"math/big"
	"slices"
	"strings"
	"time"

	"github.com/jmoiron/sqlx"

	"imd/chat"
)

type messageRow struct {
	ID             string         `db:"id"`
	ConversationID string         `db:"conversation_id"`
	Seq            int64          `db:"seq"`
	SenderID       string         `db:"sender_id"`
	Text           string         `db:"text"`
	Metadata       []byte         `db:"metadata"`
	ClientMsgID    sql.NullString `db:"client_msg_id"`
	CreatedAt      time.Time      `db:"created_at"`
}

func (r messageRow) message() chat.Message {
	return chat.Message{
		ID:             r.ID,
		ConversationID: r.ConversationID,
		Seq:            r.Seq,
		SenderID:       r.SenderID,
		Text:           r.Text,
		Metadata:       nilIfEmpty(r.Metadata),
		ClientMsgID:    r.ClientMsgID.String,
		CreatedAt:      r.CreatedAt.UTC(),
	}
}

const messageCols = `id, conversation_id, seq, sender_id, text, metadata, client_msg_id, created_at`

// jsonArg passes a JSON document as text: lib/pq would send []byte as bytea,
// which a ::jsonb cast rejects. Empty is SQL NULL.
func jsonArg(b []byte) any {
	if len(b) == 0 {
		return nil
	}
	return string(b)
}

// The membership condition keeps a former member from reading back their
// messages through the idempotency path (G7); they get CodeNotFound from
// the sequencing UPDATE instead.
const replaySQL = `
SELECT ` + messageCols + `
FROM messages
WHERE conversation_id = $1 AND sender_id = $2 AND client_msg_id = $3
  AND EXISTS (SELECT 1 FROM members WHERE conversation_id = $1 AND user_id = $2)`

// replay returns the stored message of m's idempotency key if m is a retry
// of it: the same text and the same metadata as JSON values (sameJSON), so
// that a retry that re-serialises the same object differently is the same
// message. The comparison is here rather than in SQL because only
// PostgreSQL's jsonb normalises key order; SQLite's json() keeps it.
func replay(ctx context.Context, q sqlx.QueryerContext, m chat.NewMessage) (chat.Message, error) {
	var r messageRow
	if err := sqlx.GetContext(ctx, q, &r, replaySQL, m.ConversationID, m.SenderID, m.ClientMsgID); err != nil {
		return chat.Message{}, err
	}
	if r.Text != m.Text || !sameJSON(r.Metadata, m.Metadata) {
		return chat.Message{}, chat.Errorf(chat.CodeConflict,
			"client_msg_id was already used for a different message")
	}
	return r.message(), nil
}

// sameJSON reports whether two JSON documents (empty: none) hold the same
// value, as jsonb equality does: objects whatever their key order (the last
// of duplicate keys counts), arrays in order, numbers by value (1, 1.0 and
// 1e0 are equal, and large integers are compared exactly).
func sameJSON(a, b []byte) bool {
	if len(a) == 0 || len(b) == 0 {
		return len(a) == len(b)
	}
	va, err := decodeJSON(a)
	if err != nil {
		return false
	}
	vb, err := decodeJSON(b)
	if err != nil {
		return false
	}
	return equalJSON(va, vb)
}

func decodeJSON(b []byte) (any, error) {
	dec := json.NewDecoder(bytes.NewReader(b))
	dec.UseNumber()
	var v any
	if err := dec.Decode(&v); err != nil {
		return nil, err
	}
	return v, nil
}

func equalJSON(a, b any) bool {
	switch x := a.(type) {
	case map[string]any:
		y, ok := b.(map[string]any)
		if !ok || len(x) != len(y) {
			return false
		}
		for k, xv := range x {
			yv, ok := y[k]
			if !ok || !equalJSON(xv, yv) {
				return false
			}
		}
		return true
	case []any:
		y, ok := b.([]any)
		if !ok || len(x) != len(y) {
			return false
		}
		for i := range x {
			if !equalJSON(x[i], y[i]) {
				return false
			}
		}
		return true
	case json.Number:
		y, ok := b.(json.Number)
		if !ok {
			return false
		}
		return x == y || canonicalNumber(string(x)) == canonicalNumber(string(y))
	default: // string, bool, nil
		return a == b
	}
}

// canonicalNumber writes a JSON number as its significant digits and a
// power of ten ("-15e-1" for -1.50), so that equal values are equal strings.
// Exact, and linear in the text: a parse into big.Rat would let "1e999999999"
// cost a billion-digit power of ten.
func canonicalNumber(n string) string {
	sign := ""
	if rest, ok := strings.CutPrefix(n, "-"); ok {
		sign, n = "-", rest
	}
	mant, exp, _ := strings.Cut(strings.ToLower(n), "e")
	intPart, frac, _ := strings.Cut(mant, ".")
	digits := strings.TrimLeft(intPart+frac, "0")
	if digits == "" {
		return "0" // -0 and 0e5 are 0
	}
	trimmed := strings.TrimRight(digits, "0")
	e, ok := new(big.Int).SetString(strings.TrimPrefix(exp, "+"), 10)
	if !ok {
		e = new(big.Int) // no exponent
	}
	e.Add(e, big.NewInt(int64(len(digits)-len(trimmed)-len(frac))))
	return sign + trimmed + "e" + e.String()
}

// errReplayed aborts a send whose idempotency key a concurrent retry used first.
var errReplayed = errors.New("idempotency key taken concurrently")

// Send stores m (G1–G3) in one transaction:
//
//  1. with a ClientMsgID, look the key up first, without locking: a retry of a
//     committed send returns the original without touching the conversation row;
//  2. take the next seq with an UPDATE of the conversation row that also checks
//     membership, so the database, not a cache, decides who may write (G7); the
//     row lock it takes orders concurrent sends, so commit order is seq order (G3);
//  3. insert the message; ON CONFLICT on the idempotency index means a
//     concurrent retry with the same key committed first (it held the row lock
//     before us): roll back, so no seq is consumed, and return the original (G2);
//  4. move the sender's read position to the message (sending reads);
//  5. write the message.created outbox event.
func (s *Store) Send(ctx context.Context, m chat.NewMessage) (chat.Message, bool, chat.Changed, error) {
	var (
		msg chat.Message
		evs []chat.OutboxEvent
	)
	replayed := false
	err := s.inTx(ctx, func(tx *sqlx.Tx) error {
		if m.ClientMsgID != "" {
			orig, err := replay(ctx, tx, m)
			if err == nil {
				msg, replayed = orig, true
				return nil
			}
			if !errors.Is(err, sql.ErrNoRows) {
				return err
			}
		}
		var seq int64
		err := tx.GetContext(ctx, &seq,
			`UPDATE conversations
			 SET last_seq = last_seq + 1, last_activity_at = $3
			 WHERE id = $1
			   AND EXISTS (SELECT 1 FROM members WHERE conversation_id = $1 AND user_id = $2)
			 RETURNING last_seq`,
			m.ConversationID, m.SenderID, m.CreatedAt)
		if errors.Is(err, sql.ErrNoRows) {
			// No such conversation, or not a member: the same answer, so that
			// existence is not leaked.
			return chat.ErrNotFound
		}
		if err != nil {
			return err
		}
		var r messageRow
		err = tx.GetContext(ctx, &r,
			`INSERT INTO messages (conversation_id, seq, id, sender_id, text, metadata, client_msg_id, created_at)
			 VALUES ($1, $2, $3, $4, $5, $6`+s.d.jsonb+`, NULLIF($7, ''), $8)
			 ON CONFLICT (conversation_id, sender_id, client_msg_id) WHERE client_msg_id IS NOT NULL DO NOTHING
			 RETURNING `+messageCols,
			m.ConversationID, seq, m.ID, m.SenderID, m.Text, jsonArg(m.Metadata), m.ClientMsgID, m.CreatedAt)
		if errors.Is(err, sql.ErrNoRows) {
			return errReplayed
		}
		if err != nil {
			return err
		}
		msg = r.message()
		if _, err := tx.ExecContext(ctx,
			`UPDATE members SET last_read_seq = `+s.d.greatest+`(last_read_seq, $3)
			 WHERE conversation_id = $1 AND user_id = $2`,
			m.ConversationID, m.SenderID, seq); err != nil {
			return err
		}
		data, err := json.Marshal(msg)
		if err != nil {
			return err
		}
		evs, err = s.insertEvents(ctx, tx, m.CreatedAt, []chat.OutboxEvent{{
			ConversationID: m.ConversationID,
			Type:           chat.EventMessageCreated,
			Seq:            seq,
			Data:           data,
		}})
		return err
	})
	if errors.Is(err, errReplayed) { // inTx wrapped it as internal; errors.Is unwraps
		// The transaction is rolled back, so this attempt consumed no seq.
		// The winner has committed (our INSERT waited for it), so a fresh
		// statement sees its message.
		orig, err := replay(ctx, s.rdb, m)
		if err != nil {
			return chat.Message{}, false, chat.Changed{}, dbErr(err)
		}
		return orig, false, chat.Changed{}, nil
	}
	if err != nil {
		return chat.Message{}, false, chat.Changed{}, err
	}
	if replayed {
		return msg, false, chat.Changed{}, nil
	}
	return msg, true, chat.Changed{Events: evs}, nil
}

// DefaultHistoryLimit is the page size when a query gives none (API.md: 50).
const DefaultHistoryLimit = 50

// Messages returns a page ascending by seq. Each bound is a range scan of
// the primary key fetching one row more than asked, to learn has_more
// without a count.
func (s *Store) Messages(ctx context.Context, cid string, q chat.HistoryQuery) ([]chat.Message, bool, error) {
	limit := q.Limit
	if limit <= 0 {
		limit = DefaultHistoryLimit
	}
	if q.After && q.BeforeSeq > 0 {
		return nil, false, chat.Invalid("before_seq", "give before_seq or after_seq, not both")
	}
	var (
		rows []messageRow
		err  error
	)
	switch {
	case q.After:
		err = s.rdb.SelectContext(ctx, &rows,
			`SELECT `+messageCols+` FROM messages
			 WHERE conversation_id = $1 AND seq > $2 ORDER BY seq LIMIT $3`,
			cid, q.AfterSeq, limit+1)
	case q.BeforeSeq > 0:
		err = s.rdb.SelectContext(ctx, &rows,
			`SELECT `+messageCols+` FROM messages
			 WHERE conversation_id = $1 AND seq < $2 ORDER BY seq DESC LIMIT $3`,
			cid, q.BeforeSeq, limit+1)
	default:
		err = s.rdb.SelectContext(ctx, &rows,
			`SELECT `+messageCols+` FROM messages
			 WHERE conversation_id = $1 ORDER BY seq DESC LIMIT $2`,
			cid, limit+1)
	}
	if err != nil {
		return nil, false, dbErr(err)
	}
	more := len(rows) > limit
	if more {
		rows = rows[:limit]
	}
	if !q.After {
		slices.Reverse(rows)
	}
	out := make([]chat.Message, 0, len(rows))
	for _, r := range rows {
		out = append(out, r.message())
	}
	return out, more, nil
}

// Message returns the message at seq; CodeNotFound if there is none.
func (s *Store) Message(ctx context.Context, cid string, seq int64) (chat.Message, error) {
	var r messageRow
	if err := s.rdb.GetContext(ctx, &r,
		`SELECT `+messageCols+` FROM messages WHERE conversation_id = $1 AND seq = $2`, cid, seq); err != nil {
		return chat.Message{}, dbErr(err)
	}
	return r.message(), nil
}

// unreadSQL counts messages after a read position not sent by the reader
// (API.md: sending marks one's own message read). Shared with the
// conversation views' definition.
const unreadSQL = `SELECT count(*) FROM messages
	WHERE conversation_id = $1 AND seq > $2 AND sender_id <> $3`

// MarkRead moves uid's read position forward to seq. The UPDATE only
// matches when the position moves and seq is within the conversation, so
// "moved" needs no read-then-write race; only when it did not match do we
// look at why. (A subquery rather than UPDATE … FROM: SQLite's RETURNING
// cannot name the target through an alias.)
func (s *Store) MarkRead(ctx context.Context, cid, uid string, seq int64) (chat.ReadState, chat.Changed, error) {
	if seq < 0 {
		return chat.ReadState{}, chat.Changed{}, chat.Invalid("seq", "must not be negative")
	}
	var (
		st  chat.ReadState
		evs []chat.OutboxEvent
	)
	err := s.inTx(ctx, func(tx *sqlx.Tx) error {
		err := tx.GetContext(ctx, &st.LastReadSeq,
			`UPDATE members SET last_read_seq = $3
			 WHERE conversation_id = $1 AND user_id = $2 AND last_read_seq < $3
			   AND $3 <= (SELECT last_seq FROM conversations WHERE id = $1)
			 RETURNING last_read_seq`,
			cid, uid, seq)
		moved := err == nil
		if errors.Is(err, sql.ErrNoRows) {
			var cur struct {
				LastReadSeq int64 `db:"last_read_seq"`
				LastSeq     int64 `db:"last_seq"`
			}
			if err := tx.GetContext(ctx, &cur,
				`SELECT m.last_read_seq, c.last_seq
				 FROM members m JOIN conversations c ON c.id = m.conversation_id
				 WHERE m.conversation_id = $1 AND m.user_id = $2`, cid, uid); err != nil {
				return err // no row: not a member
			}
			if seq > cur.LastSeq {
				return chat.Invalid("seq", "beyond the conversation's last message")
			}
			st.LastReadSeq = cur.LastReadSeq
		} else if err != nil {
			return err
		}
		if err := tx.GetContext(ctx, &st.UnreadCount, unreadSQL, cid, st.LastReadSeq, uid); err != nil {
			return err
		}
		if !moved {
			return nil
		}
		data, err := json.Marshal(chat.ReceiptEvent{ConversationID: cid, UserID: uid, Seq: st.LastReadSeq})
		if err != nil {
			return err
		}
		evs, err = s.insertEvents(ctx, tx, time.Time{}, []chat.OutboxEvent{{
			ConversationID: cid,
			Type:           chat.EventReceiptRead,
			Data:           data,
		}})
		return err
	})
	if err != nil {
		return chat.ReadState{}, chat.Changed{}, err
	}
	return st, chat.Changed{Events: evs}, nil
}
