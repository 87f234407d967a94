package store

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"slices"
	"strings"
	"time"

	"github.com/jmoiron/sqlx"

	"imd/chat"
)

// viewRow is a conversation as one member sees it.
type viewRow struct {
	ID             string         `db:"id"`
	Type           string         `db:"type"`
	Title          string         `db:"title"`
	CreatedAt      time.Time      `db:"created_at"`
	LastSeq        int64          `db:"last_seq"`
	LastActivityAt time.Time      `db:"last_activity_at"`
	MemberCount    int            `db:"member_count"`
	Viewer         string         `db:"viewer"`
	LastReadSeq    int64          `db:"last_read_seq"`
	UnreadCount    int64          `db:"unread_count"`
	PeerID         sql.NullString `db:"peer_id"`
	// The last message, all NULL when there is none yet.
	LMID          sql.NullString `db:"lm_id"`
	LMSenderID    sql.NullString `db:"lm_sender_id"`
	LMText        sql.NullString `db:"lm_text"`
	LMMetadata    []byte         `db:"lm_metadata"`
	LMClientMsgID sql.NullString `db:"lm_client_msg_id"`
	LMCreatedAt   sql.NullTime   `db:"lm_created_at"`
}

func (r viewRow) conversation() chat.Conversation {
	c := chat.Conversation{
		ID:             r.ID,
		Type:           chat.ConvType(r.Type),
		Title:          r.Title,
		CreatedAt:      r.CreatedAt.UTC(),
		LastSeq:        r.LastSeq,
		LastReadSeq:    r.LastReadSeq,
		UnreadCount:    r.UnreadCount,
		LastActivityAt: r.LastActivityAt.UTC(),
		MemberCount:    r.MemberCount,
		PeerID:         r.PeerID.String,
	}
	if r.LMID.Valid {
		c.LastMessage = &chat.Message{
			ID:             r.LMID.String,
			ConversationID: r.ID,
			Seq:            r.LastSeq,
			SenderID:       r.LMSenderID.String,
			Text:           r.LMText.String,
			Metadata:       nilIfEmpty(r.LMMetadata),
			ClientMsgID:    r.LMClientMsgID.String,
			CreatedAt:      r.LMCreatedAt.Time.UTC(),
		}
	}
	return c
}

// viewSQL is the one shape of "a conversation as a member sees it", shared by
// Conversation, ConversationsFor and ConversationViews (and the creating
// mutations), which only differ in the WHERE clause appended to it. Starting
// from members makes membership the condition of visibility (G7).
//
//   - unread_count: messages after the viewer's read position that others
//     sent (a primary-key range scan per conversation);
//   - peer_id: the other half of direct_key, so a direct conversation keeps
//     its peer even if one side has left. The viewer is one half and ids
//     have no space, so the key starts with "<viewer> " exactly when the
//     viewer is the first half (substr and length: both dialects have them);
//   - last message: the row at last_seq, absent while last_seq is 0.
const viewSQL = `
SELECT c.id, c.type, c.title, c.created_at, c.last_seq, c.last_activity_at, c.member_count,
       m.user_id AS viewer, m.last_read_seq,
       (SELECT count(*) FROM messages u
         WHERE u.conversation_id = c.id AND u.seq > m.last_read_seq AND u.sender_id <> m.user_id) AS unread_count,
       CASE WHEN c.type = 'direct' THEN
         CASE WHEN substr(c.direct_key, 1, length(m.user_id) + 1) = m.user_id || ' '
              THEN substr(c.direct_key, length(m.user_id) + 2)
              ELSE substr(c.direct_key, 1, length(c.direct_key) - length(m.user_id) - 1) END
       END AS peer_id,
       l.id AS lm_id, l.sender_id AS lm_sender_id, l.text AS lm_text, l.metadata AS lm_metadata,
       l.client_msg_id AS lm_client_msg_id, l.created_at AS lm_created_at
FROM members m
JOIN conversations c ON c.id = m.conversation_id
LEFT JOIN messages l ON l.conversation_id = c.id AND l.seq = c.last_seq
`

const viewOneSQL = viewSQL + `WHERE m.conversation_id = $1 AND m.user_id = $2`

func viewOne(ctx context.Context, q sqlx.QueryerContext, cid, viewer string) (chat.Conversation, error) {
	var r viewRow
	if err := sqlx.GetContext(ctx, q, &r, viewOneSQL, cid, viewer); err != nil {
		return chat.Conversation{}, err
	}
	return r.conversation(), nil
}

func views(ctx context.Context, q sqlx.QueryerContext, query string, args ...any) ([]viewRow, error) {
	var rows []viewRow
	if err := sqlx.SelectContext(ctx, q, &rows, query, args...); err != nil {
		return nil, err
	}
	return rows, nil
}

// Conversation returns cid as viewer sees it; CodeNotFound unless viewer is
// a member (whether or not cid exists).
func (s *Store) Conversation(ctx context.Context, cid, viewer string) (chat.Conversation, error) {
	c, err := viewOne(ctx, s.rdb, cid, viewer)
	return c, dbErr(err)
}

// ConversationsFor returns those of ids viewer is a member of, in the order
// of ids (the order of the caller's activity page).
func (s *Store) ConversationsFor(ctx context.Context, viewer string, ids []string) ([]chat.Conversation, error) {
	ids = dedupe(ids)
	if len(ids) == 0 {
		return []chat.Conversation{}, nil
	}
	rows, err := views(ctx, s.rdb, viewSQL+`WHERE m.user_id = $1 AND m.conversation_id `+s.d.inTexts(2),
		viewer, s.d.texts(ids))
	if err != nil {
		return nil, dbErr(err)
	}
	slices.SortFunc(rows, byIndex(ids, func(r viewRow) string { return r.ID }))
	out := make([]chat.Conversation, 0, len(rows))
	for _, r := range rows {
		out = append(out, r.conversation())
	}
	return out, nil
}

// ConversationViews returns cid as each of uids sees it, keyed by user id;
// uids that are not members are left out.
func (s *Store) ConversationViews(ctx context.Context, cid string, uids []string) (map[string]chat.Conversation, error) {
	uids = dedupe(uids)
	out := make(map[string]chat.Conversation, len(uids))
	if len(uids) == 0 {
		return out, nil
	}
	rows, err := views(ctx, s.rdb, viewSQL+`WHERE m.conversation_id = $1 AND m.user_id `+s.d.inTexts(2),
		cid, s.d.texts(uids))
	if err != nil {
		return nil, dbErr(err)
	}
	for _, r := range rows {
		out[r.Viewer] = r.conversation()
	}
	return out, nil
}

// checkUsers fails with CodeInvalid on field, listing the unknown ones, unless
// every id exists. One query, so a group of thousands costs one round trip.
func (s *Store) checkUsers(ctx context.Context, q sqlx.QueryerContext, ids []string, field string) error {
	var found []string
	if err := sqlx.SelectContext(ctx, q, &found,
		`SELECT id FROM users WHERE id `+s.d.inTexts(1), s.d.texts(ids)); err != nil {
		return err
	}
	if len(found) == len(ids) {
		return nil
	}
	known := make(map[string]bool, len(found))
	for _, id := range found {
		known[id] = true
	}
	var unknown []string
	for _, id := range ids {
		if !known[id] {
			unknown = append(unknown, id)
		}
	}
	return chat.Invalid(field, "unknown users: "+strings.Join(unknown, ", "))
}

// CreateGroup stores the group, its members (the owner as owner, the others
// as members; duplicates and the owner among MemberIDs are dropped) and a
// conversation.created event to all of them, owner first.
func (s *Store) CreateGroup(ctx context.Context, g chat.NewGroup) (chat.Conversation, chat.Changed, error) {
	ids := dedupe(append([]string{g.OwnerID}, g.MemberIDs...))
	var (
		conv chat.Conversation
		evs  []chat.OutboxEvent
	)
	err := s.inTx(ctx, func(tx *sqlx.Tx) error {
		if err := s.checkUsers(ctx, tx, ids, "member_ids"); err != nil {
			return err
		}
		if _, err := tx.ExecContext(ctx,
			`INSERT INTO conversations (id, type, title, created_at, last_seq, last_activity_at, member_count)
			 VALUES ($1, 'group', $2, $3, 0, $3, $4)`,
			g.ID, g.Title, g.CreatedAt, len(ids)); err != nil {
			return err
		}
		// The first id is the owner (ordinality 1).
		if _, err := tx.ExecContext(ctx,
			`INSERT INTO members (conversation_id, user_id, role, joined_at)
			 SELECT $1, u.id, CASE WHEN u.ord = 1 THEN 'owner' ELSE 'member' END, $3
			 FROM `+s.d.unnestTexts(2, "u"),
			g.ID, s.d.texts(ids), g.CreatedAt); err != nil {
			return err
		}
		var err error
		if evs, err = s.insertEvents(ctx, tx, g.CreatedAt, []chat.OutboxEvent{{
			ConversationID: g.ID,
			Type:           chat.EventConversationCreated,
			To:             ids,
		}}); err != nil {
			return err
		}
		conv, err = viewOne(ctx, tx, g.ID, g.OwnerID)
		return err
	})
	if err != nil {
		return chat.Conversation{}, chat.Changed{}, err
	}
	return conv, chat.Changed{Events: evs}, nil
}

// directKey identifies a pair whichever side asks.
func directKey(a, b string) string {
	if b < a {
		a, b = b, a
	}
	return a + " " + b
}

// DirectConversation returns the pair's direct conversation as a sees it,
// creating it when none exists. The UNIQUE direct_key decides races: a
// concurrent creator's INSERT waits for the first to commit, does nothing,
// and then finds the winner's row.
func (s *Store) DirectConversation(ctx context.Context, a, b, newID string, at time.Time) (chat.Conversation, bool, chat.Changed, error) {
	if a == b {
		return chat.Conversation{}, false, chat.Changed{}, chat.Invalid("member_ids", "cannot open a direct conversation with oneself")
	}
	if strings.Contains(a, " ") || strings.Contains(b, " ") {
		// The space separates the pair in direct_key; user ids never have one.
		return chat.Conversation{}, false, chat.Changed{}, chat.Invalid("member_ids", "invalid user id")
	}
	key := directKey(a, b)
	var (
		conv    chat.Conversation
		created bool
		evs     []chat.OutboxEvent
	)
	err := s.inTx(ctx, func(tx *sqlx.Tx) error {
		var exists bool
		if err := tx.GetContext(ctx, &exists, `SELECT EXISTS (SELECT 1 FROM users WHERE id = $1)`, b); err != nil {
			return err
		}
		if !exists {
			return chat.Errorf(chat.CodeNotFound, "user not found")
		}
		var id string
		err := tx.GetContext(ctx, &id,
			`INSERT INTO conversations (id, type, title, direct_key, created_at, last_seq, last_activity_at, member_count)
			 VALUES ($1, 'direct', '', $2, $3, 0, $3, 2)
			 ON CONFLICT (direct_key) DO NOTHING
			 RETURNING id`,
			newID, key, at)
		switch {
		case err == nil:
			created = true
			if _, err := tx.ExecContext(ctx,
				`INSERT INTO members (conversation_id, user_id, role, joined_at)
				 VALUES ($1, $2, 'member', $4), ($1, $3, 'member', $4)`,
				id, a, b, at); err != nil {
				return err
			}
			if evs, err = s.insertEvents(ctx, tx, at, []chat.OutboxEvent{{
				ConversationID: id,
				Type:           chat.EventConversationCreated,
				To:             []string{a, b},
			}}); err != nil {
				return err
			}
		case errors.Is(err, sql.ErrNoRows):
			if err := tx.GetContext(ctx, &id, `SELECT id FROM conversations WHERE direct_key = $1`, key); err != nil {
				return fmt.Errorf("direct conversation %q: %w", key, err)
			}
		default:
			return err
		}
		conv, err = viewOne(ctx, tx, id, a)
		return err
	})
	if err != nil {
		return chat.Conversation{}, false, chat.Changed{}, err
	}
	return conv, created, chat.Changed{Events: evs}, nil
}

// DefaultActivityLimit is the page size when ActivityPage is given none.
const DefaultActivityLimit = 50

// ActivityPage lists uid's conversations by last activity, newest first, ties
// by id descending, strictly after the cursor (a keyset page: stable while
// conversations move, and no OFFSET scan).
func (s *Store) ActivityPage(ctx context.Context, uid string, after *chat.Activity, limit int) ([]chat.Activity, error) {
	if limit <= 0 {
		limit = DefaultActivityLimit
	}
	var (
		rows []struct {
			ID string    `db:"id"`
			At time.Time `db:"last_activity_at"`
		}
		err error
	)
	if after == nil {
		err = s.rdb.SelectContext(ctx, &rows,
			`SELECT c.id, c.last_activity_at
			 FROM members m JOIN conversations c ON c.id = m.conversation_id
			 WHERE m.user_id = $1
			 ORDER BY c.last_activity_at DESC, c.id DESC
			 LIMIT $2`, uid, limit)
	} else {
		err = s.rdb.SelectContext(ctx, &rows,
			`SELECT c.id, c.last_activity_at
			 FROM members m JOIN conversations c ON c.id = m.conversation_id
			 WHERE m.user_id = $1 AND (c.last_activity_at, c.id) < ($2, $3)
			 ORDER BY c.last_activity_at DESC, c.id DESC
			 LIMIT $4`, uid, after.At, after.ConversationID, limit)
	}
	if err != nil {
		return nil, dbErr(err)
	}
	out := make([]chat.Activity, 0, len(rows))
	for _, r := range rows {
		out = append(out, chat.Activity{ConversationID: r.ID, At: r.At.UTC()})
	}
	return out, nil
}

// SetTitle sets the title and writes conversation.updated for all members
// (its payload is built per recipient at dispatch).
func (s *Store) SetTitle(ctx context.Context, cid, title, by string) (chat.Changed, error) {
	var evs []chat.OutboxEvent
	err := s.inTx(ctx, func(tx *sqlx.Tx) error {
		res, err := tx.ExecContext(ctx, `UPDATE conversations SET title = $2 WHERE id = $1`, cid, title)
		if err := affected(res, err); err != nil {
			return err
		}
		evs, err = s.insertEvents(ctx, tx, time.Time{}, []chat.OutboxEvent{{
			ConversationID: cid,
			Type:           chat.EventConversationUpdated,
		}})
		return err
	})
	if err != nil {
		return chat.Changed{}, err
	}
	return chat.Changed{Events: evs}, nil
}
