package store

import (
	"context"
	"database/sql"
	"encoding/json"
	"errors"
	"slices"
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

// replayRow is a stored message found by its idempotency key, with whether
// it matches the retry. Metadata is compared as jsonb, because jsonb
// normalises key order and whitespace: a retry that re-serialises the same
// object differently is the same message.
type replayRow struct {
	messageRow
	Same bool `db:"same"`
}

// The membership condition keeps a former member from reading back their
// messages through the idempotency path (G7); they get CodeNotFound from
// the sequencing UPDATE instead.
const replaySQL = `
SELECT ` + messageCols + `,
       (text = $4 AND metadata IS NOT DISTINCT FROM $5::jsonb) AS same
FROM messages
WHERE conversation_id = $1 AND sender_id = $2 AND client_msg_id = $3
  AND EXISTS (SELECT 1 FROM members WHERE conversation_id = $1 AND user_id = $2)`

func replay(ctx context.Context, q sqlx.QueryerContext, m chat.NewMessage) (chat.Message, error) {
	var r replayRow
	if err := sqlx.GetContext(ctx, q, &r, replaySQL,
		m.ConversationID, m.SenderID, m.ClientMsgID, m.Text, jsonArg(m.Metadata)); err != nil {
		return chat.Message{}, err
	}
	if !r.Same {
		return chat.Message{}, chat.Errorf(chat.CodeConflict,
			"client_msg_id was already used for a different message")
	}
	return r.message(), nil
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
			 VALUES ($1, $2, $3, $4, $5, $6::jsonb, NULLIF($7, ''), $8)
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
			`UPDATE members SET last_read_seq = GREATEST(last_read_seq, $3)
			 WHERE conversation_id = $1 AND user_id = $2`,
			m.ConversationID, m.SenderID, seq); err != nil {
			return err
		}
		data, err := json.Marshal(msg)
		if err != nil {
			return err
		}
		evs, err = insertEvents(ctx, tx, m.CreatedAt, []chat.OutboxEvent{{
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
		orig, err := replay(ctx, s.db, m)
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
		err = s.db.SelectContext(ctx, &rows,
			`SELECT `+messageCols+` FROM messages
			 WHERE conversation_id = $1 AND seq > $2 ORDER BY seq LIMIT $3`,
			cid, q.AfterSeq, limit+1)
	case q.BeforeSeq > 0:
		err = s.db.SelectContext(ctx, &rows,
			`SELECT `+messageCols+` FROM messages
			 WHERE conversation_id = $1 AND seq < $2 ORDER BY seq DESC LIMIT $3`,
			cid, q.BeforeSeq, limit+1)
	default:
		err = s.db.SelectContext(ctx, &rows,
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
	if err := s.db.GetContext(ctx, &r,
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
// look at why.
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
			`UPDATE members m SET last_read_seq = $3
			 FROM conversations c
			 WHERE c.id = m.conversation_id AND m.conversation_id = $1 AND m.user_id = $2
			   AND m.last_read_seq < $3 AND $3 <= c.last_seq
			 RETURNING m.last_read_seq`,
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
		evs, err = insertEvents(ctx, tx, time.Time{}, []chat.OutboxEvent{{
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
