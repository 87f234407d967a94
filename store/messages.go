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

// prefixed qualifies each of a list of columns ("a, b") with prefix ("m.").
func prefixed(prefix, cols string) string {
	return prefix + strings.ReplaceAll(cols, ", ", ", "+prefix)
}

// jsonArg passes a JSON document as text: lib/pq would send []byte as bytea,
// which a ::jsonb cast rejects. Empty is SQL NULL.
func jsonArg(b []byte) any {
	if len(b) == 0 {
		return nil
	}
	return string(b)
}

// replayOf is the outcome of m when orig holds its idempotency key: orig if m
// is a retry of it — the same text and the same metadata as JSON values
// (sameJSON), so that a retry that re-serialises the same object differently
// is the same message — else a conflict. The comparison is here rather than
// in SQL because only PostgreSQL's jsonb normalises key order; SQLite's
// json() keeps it.
func replayOf(orig chat.Message, m chat.NewMessage) sendResult {
	if orig.Text != m.Text || !sameJSON(orig.Metadata, m.Metadata) {
		return sendResult{err: chat.Errorf(chat.CodeConflict,
			"client_msg_id was already used for a different message")}
	}
	return sendResult{msg: orig}
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

// Send stores m (G1–G3) in a transaction shared with the sends queued at the
// same time (group commit, see committer.go and sendBatch), and returns after
// that transaction has committed.
// OnSendCommitted implements chat.CommitOrdered: fn gets the outbox events
// of each committed batch of sends, in commit order (per conversation, seq
// order), from the committer before it answers the batch's senders. One
// subscriber; set it before the first Send.
func (s *Store) OnSendCommitted(fn func([]chat.OutboxEvent)) { s.committed = fn }

// notifyCommitted hands a committed batch's events to the OnSendCommitted
// subscriber, if any.
func (s *Store) notifyCommitted(res []sendResult) {
	if s.committed == nil {
		return
	}
	var evs []chat.OutboxEvent
	for _, r := range res {
		if r.err == nil && r.created {
			evs = append(evs, r.events...)
		}
	}
	if len(evs) > 0 {
		s.committed(evs)
	}
}

func (s *Store) Send(ctx context.Context, m chat.NewMessage) (chat.Message, bool, chat.Changed, error) {
	res := s.lane(m.ConversationID).send(ctx, m)
	if res.err != nil {
		return chat.Message{}, false, chat.Changed{}, res.err
	}
	if !res.created {
		return res.msg, false, chat.Changed{}, nil
	}
	return res.msg, true, chat.Changed{Events: res.events}, nil
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
