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
func (s *Store) Send(ctx context.Context, m chat.NewMessage) (chat.Message, bool, chat.Changed, error) {
	res := s.c.send(ctx, m)
	if res.err != nil {
		return chat.Message{}, false, chat.Changed{}, res.err
	}
	if !res.created {
		return res.msg, false, chat.Changed{}, nil
	}
	return res.msg, true, chat.Changed{Events: res.events}, nil
}

// errKeyConflict fails a batch of which the database did not insert every
// message because an idempotency key was taken: the unique index is the
// backstop of the key look-up that sendBatch makes under the conversation
// locks, and a message skipped while its seq was counted would leave a gap
// (G3). Retryable: nothing is stored, and a retry finds the key.
var errKeyConflict = chat.Unavailable("database", errors.New("store: an idempotency key of the batch was taken on insert"))

// sendBatch stores ms in one transaction and returns the outcome of each, in
// order, or an error of the transaction as a whole (nothing stored):
//
//  1. lock the batch's conversations, in id order so that batches of several
//     nodes cannot deadlock: on PostgreSQL with FOR UPDATE (the lock orders
//     sends, so commit order is seq order, G3); SQLite's single writer
//     already runs one transaction at a time (BEGIN IMMEDIATE);
//  2. with the locks held, in statements of their own (READ COMMITTED sees
//     what committed while we waited for the locks): check membership, so
//     the database, not a cache, decides who may write (G7) — a non-member,
//     or a conversation that does not exist, is CodeNotFound without saying
//     which; then look up the idempotency keys already stored, whose
//     requests are replays of the original (G2), or conflicts when the text
//     or metadata differ (members' keys only: a former member cannot read
//     a message back through a replay, G7). A key used twice within the
//     batch is created by its first request and replayed by the others;
//  3. number the new messages from the locked last_seq, in request order;
//  4. write, one statement each: the conversations' last_seq and activity,
//     the messages (the idempotency index stays the backstop: a conflict
//     on it fails the batch, errKeyConflict; another unique violation, a
//     message id used before, fails it as a conflict, which the committer
//     retries one request at a time), the senders' read positions (sending
//     reads), and one message.created outbox event per new message, in
//     seq order.
//
// Statements take their rows as VALUES lists of parameters (dialect.values).
func (s *Store) sendBatch(ctx context.Context, ms []chat.NewMessage) ([]sendResult, error) {
	type pair struct{ cid, uid string }
	type key struct {
		pair
		key string
	}
	var res []sendResult
	err := s.inTx(ctx, func(tx *sqlx.Tx) error {
		res = make([]sendResult, len(ms))

		// 1. The locks, and the conversations' last seqs.
		var cids []string
		for _, m := range ms {
			cids = append(cids, m.ConversationID)
		}
		slices.Sort(cids)
		cids = slices.Compact(cids)
		var convs []struct {
			ID      string `db:"id"`
			LastSeq int64  `db:"last_seq"`
		}
		if err := tx.SelectContext(ctx, &convs,
			`SELECT id, last_seq FROM conversations WHERE id `+s.d.inTexts(1)+` ORDER BY id`+s.d.forUpdate,
			s.d.texts(cids)); err != nil {
			return err
		}
		last := make(map[string]int64, len(convs))
		for _, c := range convs {
			last[c.ID] = c.LastSeq
		}

		// 2. Membership, then the stored idempotency keys of members.
		var pairs []pair
		seen := map[pair]bool{}
		for _, m := range ms {
			p := pair{m.ConversationID, m.SenderID}
			if _, ok := last[p.cid]; ok && !seen[p] {
				seen[p] = true
				pairs = append(pairs, p)
			}
		}
		member := make(map[pair]bool, len(pairs))
		if len(pairs) > 0 {
			args := make([]any, 0, 2*len(pairs))
			for _, p := range pairs {
				args = append(args, p.cid, p.uid)
			}
			var rows []struct {
				CID string `db:"cid"`
				UID string `db:"uid"`
			}
			if err := tx.SelectContext(ctx, &rows,
				`SELECT k.cid, k.uid FROM `+s.d.values(len(pairs), "k", "cid", "uid")+`
				 JOIN members m ON m.conversation_id = k.cid AND m.user_id = k.uid`, args...); err != nil {
				return err
			}
			for _, r := range rows {
				member[pair{r.CID, r.UID}] = true
			}
		}
		var keys []key
		seenKey := map[key]bool{}
		for _, m := range ms {
			k := key{pair{m.ConversationID, m.SenderID}, m.ClientMsgID}
			if k.key != "" && member[k.pair] && !seenKey[k] {
				seenKey[k] = true
				keys = append(keys, k)
			}
		}
		stored := make(map[key]chat.Message)
		if len(keys) > 0 {
			args := make([]any, 0, 3*len(keys))
			for _, k := range keys {
				args = append(args, k.cid, k.uid, k.key)
			}
			var rows []messageRow
			if err := tx.SelectContext(ctx, &rows,
				`SELECT `+prefixed("m.", messageCols)+`
				 FROM `+s.d.values(len(keys), "k", "cid", "uid", "ckey")+`
				 JOIN messages m ON m.conversation_id = k.cid AND m.sender_id = k.uid AND m.client_msg_id = k.ckey`,
				args...); err != nil {
				return err
			}
			for _, r := range rows {
				stored[key{pair{r.ConversationID, r.SenderID}, r.ClientMsgID.String}] = r.message()
			}
		}

		// 3. Who creates, and with which seq.
		var (
			creators []int
			firstOf  = map[key]int{} // the creator of a key new in this batch
			dupOf    = map[int]int{} // a later request of such a key → its creator
			seqs     = make([]int64, len(ms))
		)
		for i, m := range ms {
			p := pair{m.ConversationID, m.SenderID}
			if !member[p] {
				res[i].err = chat.ErrNotFound // no such conversation, or not a member
				continue
			}
			if m.ClientMsgID != "" {
				k := key{p, m.ClientMsgID}
				if orig, ok := stored[k]; ok {
					res[i] = replayOf(orig, m)
					continue
				}
				if j, ok := firstOf[k]; ok {
					dupOf[i] = j
					continue
				}
				firstOf[k] = i
			}
			last[p.cid]++
			seqs[i] = last[p.cid]
			creators = append(creators, i)
		}
		if len(creators) == 0 {
			return nil
		}

		// 4. The writes. Per conversation: its new last seq and the time of
		// its last new message; per sender: the seq of their last one.
		type bump struct {
			seq int64
			at  time.Time
		}
		bumps := map[string]bump{}
		reads := map[pair]int64{}
		var bumped []string
		var readers []pair
		for _, i := range creators { // ascending seq within each conversation
			m := ms[i]
			if _, ok := bumps[m.ConversationID]; !ok {
				bumped = append(bumped, m.ConversationID)
			}
			bumps[m.ConversationID] = bump{seqs[i], m.CreatedAt}
			p := pair{m.ConversationID, m.SenderID}
			if _, ok := reads[p]; !ok {
				readers = append(readers, p)
			}
			reads[p] = seqs[i]
		}
		args := make([]any, 0, 3*len(bumped))
		for _, cid := range bumped {
			args = append(args, cid, bumps[cid].seq, bumps[cid].at)
		}
		if _, err := tx.ExecContext(ctx,
			`UPDATE conversations SET last_seq = v.seq, last_activity_at = v.at
			 FROM `+s.d.values(len(bumped), "v", "id", "seq bigint", "at timestamptz")+`
			 WHERE conversations.id = v.id`, args...); err != nil {
			return err
		}

		args = make([]any, 0, 8*len(creators))
		for _, i := range creators {
			m := ms[i]
			var ckey any
			if m.ClientMsgID != "" {
				ckey = m.ClientMsgID
			}
			args = append(args, m.ConversationID, seqs[i], m.ID, m.SenderID, m.Text, jsonArg(m.Metadata), ckey, m.CreatedAt)
		}
		var rows []messageRow
		if err := tx.SelectContext(ctx, &rows,
			`INSERT INTO messages (conversation_id, seq, id, sender_id, text, metadata, client_msg_id, created_at)
			 VALUES `+s.d.valueRows(len(creators), "", "", "", "", "", "jsonb", "", "")+`
			 ON CONFLICT (conversation_id, sender_id, client_msg_id) WHERE client_msg_id IS NOT NULL DO NOTHING
			 RETURNING `+messageCols, args...); err != nil {
			return err
		}
		if len(rows) != len(creators) {
			return errKeyConflict
		}
		type place struct {
			cid string
			seq int64
		}
		inserted := make(map[place]chat.Message, len(rows))
		for _, r := range rows {
			inserted[place{r.ConversationID, r.Seq}] = r.message()
		}

		args = make([]any, 0, 3*len(readers))
		for _, p := range readers {
			args = append(args, p.cid, p.uid, reads[p])
		}
		if _, err := tx.ExecContext(ctx,
			`UPDATE members SET last_read_seq = `+s.d.greatest+`(last_read_seq, v.seq)
			 FROM `+s.d.values(len(readers), "v", "cid", "uid", "seq bigint")+`
			 WHERE members.conversation_id = v.cid AND members.user_id = v.uid`, args...); err != nil {
			return err
		}

		evs := make([]chat.OutboxEvent, len(creators))
		for n, i := range creators {
			msg, ok := inserted[place{ms[i].ConversationID, seqs[i]}]
			if !ok {
				return errKeyConflict
			}
			data, err := json.Marshal(msg)
			if err != nil {
				return err
			}
			res[i] = sendResult{msg: msg, created: true}
			evs[n] = chat.OutboxEvent{ConversationID: msg.ConversationID, Type: chat.EventMessageCreated,
				Seq: msg.Seq, Data: data, CreatedAt: msg.CreatedAt}
		}
		evs, err := s.insertEvents(ctx, tx, time.Time{}, evs)
		if err != nil {
			return err
		}
		for n, i := range creators {
			res[i].events = []chat.OutboxEvent{evs[n]}
		}
		for i, j := range dupOf {
			res[i] = replayOf(res[j].msg, ms[i])
		}
		return nil
	})
	if err != nil {
		return nil, err
	}
	return res, nil
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
