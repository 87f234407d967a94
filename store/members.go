package store

import (
	"context"
	"database/sql"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/jmoiron/sqlx"

	"imd/chat"
)

type memberRow struct {
	ConversationID string    `db:"conversation_id"`
	UserID         string    `db:"user_id"`
	Role           string    `db:"role"`
	JoinedAt       time.Time `db:"joined_at"`
	LastReadSeq    int64     `db:"last_read_seq"`
}

func (r memberRow) member() chat.Member {
	return chat.Member{
		ConversationID: r.ConversationID,
		UserID:         r.UserID,
		Role:           chat.Role(r.Role),
		JoinedAt:       r.JoinedAt.UTC(),
		LastReadSeq:    r.LastReadSeq,
	}
}

const memberCols = `conversation_id, user_id, role, joined_at, last_read_seq`

// Member returns uid's membership; CodeNotFound if uid is not a member.
func (s *Store) Member(ctx context.Context, cid, uid string) (chat.Member, error) {
	var r memberRow
	if err := s.rdb.GetContext(ctx, &r,
		`SELECT `+memberCols+` FROM members WHERE conversation_id = $1 AND user_id = $2`, cid, uid); err != nil {
		return chat.Member{}, dbErr(err)
	}
	return r.member(), nil
}

// Member page sizes (API.md: default 50, max 200).
const (
	DefaultMemberLimit = 50
	MaxMemberLimit     = 200
)

// memberCursor is the position after the last member of a page: its join
// time in microseconds (the database's precision, so the keyset comparison
// is exact) and its user id, which breaks ties between members who joined
// together. Base64url keeps it opaque and URL-safe.
func memberCursor(m memberRow) string {
	raw := strconv.FormatInt(m.JoinedAt.UnixMicro(), 10) + ":" + m.UserID
	return base64.RawURLEncoding.EncodeToString([]byte(raw))
}

func parseMemberCursor(c string) (time.Time, string, error) {
	raw, err := base64.RawURLEncoding.DecodeString(c)
	if err != nil {
		return time.Time{}, "", chat.Invalid("cursor", "malformed cursor")
	}
	us, uid, ok := strings.Cut(string(raw), ":")
	micros, err := strconv.ParseInt(us, 10, 64)
	if !ok || err != nil || uid == "" {
		return time.Time{}, "", chat.Invalid("cursor", "malformed cursor")
	}
	return time.UnixMicro(micros).UTC(), uid, nil
}

// Members pages cid's members in join order (ties by user id). The returned
// cursor is empty on the last page.
func (s *Store) Members(ctx context.Context, cid string, p chat.Page) ([]chat.Member, string, error) {
	limit := p.Limit
	if limit <= 0 {
		limit = DefaultMemberLimit
	}
	limit = min(limit, MaxMemberLimit)
	var rows []memberRow
	if p.Cursor == "" {
		if err := s.rdb.SelectContext(ctx, &rows,
			`SELECT `+memberCols+` FROM members WHERE conversation_id = $1
			 ORDER BY joined_at, user_id LIMIT $2`, cid, limit+1); err != nil {
			return nil, "", dbErr(err)
		}
	} else {
		at, uid, err := parseMemberCursor(p.Cursor)
		if err != nil {
			return nil, "", err
		}
		if err := s.rdb.SelectContext(ctx, &rows,
			`SELECT `+memberCols+` FROM members
			 WHERE conversation_id = $1 AND (joined_at, user_id) > ($2, $3)
			 ORDER BY joined_at, user_id LIMIT $4`, cid, at, uid, limit+1); err != nil {
			return nil, "", dbErr(err)
		}
	}
	next := ""
	if len(rows) > limit {
		rows = rows[:limit]
		next = memberCursor(rows[len(rows)-1])
	}
	out := make([]chat.Member, 0, len(rows))
	for _, r := range rows {
		out = append(out, r.member())
	}
	return out, next, nil
}

// MemberIDs lists all members of cid in join order.
func (s *Store) MemberIDs(ctx context.Context, cid string) ([]string, error) {
	ids := []string{}
	if err := s.rdb.SelectContext(ctx, &ids,
		`SELECT user_id FROM members WHERE conversation_id = $1 ORDER BY joined_at, user_id`, cid); err != nil {
		return nil, dbErr(err)
	}
	return ids, nil
}

func memberEvent(cid, uid string, role chat.Role, by string) ([]byte, error) {
	return json.Marshal(chat.MemberEvent{ConversationID: cid, UserID: uid, Role: role, By: by})
}

// AddMembers adds those of uids who are not members yet, as members, and
// returns them in the order of uids. maxMembers <= 0 means no limit.
//
// New members start with their read position at the conversation's last
// seq: like the conversation.created event's Seq (the baseline of their
// event logs), it says they have not missed the messages before they joined.
//
// Events: conversation.created to the added users (Seq = last_seq), then one
// member.added per added user to all members.
func (s *Store) AddMembers(ctx context.Context, cid, by string, uids []string, maxMembers int, at time.Time) ([]chat.Member, chat.Changed, error) {
	uids = dedupe(uids)
	var (
		added []chat.Member
		evs   []chat.OutboxEvent
	)
	err := s.inTx(ctx, func(tx *sqlx.Tx) error {
		// Locks the conversation first (the lock order of inTx), which also
		// serialises concurrent additions against maxMembers.
		var conv struct {
			LastSeq     int64 `db:"last_seq"`
			MemberCount int   `db:"member_count"`
		}
		if err := tx.GetContext(ctx, &conv,
			`SELECT last_seq, member_count FROM conversations WHERE id = $1`+s.d.forUpdate, cid); err != nil {
			return err
		}
		if len(uids) == 0 {
			return nil
		}
		if err := s.checkUsers(ctx, tx, uids, "user_ids"); err != nil {
			return err
		}
		// WHERE true: SQLite would otherwise parse ON CONFLICT as a join's ON.
		var rows []memberRow
		if err := tx.SelectContext(ctx, &rows,
			`INSERT INTO members (conversation_id, user_id, role, joined_at, last_read_seq)
			 SELECT $1, u.id, 'member', $3, $4
			 FROM `+s.d.unnestTexts(2, "u")+`
			 WHERE true
			 ORDER BY u.ord
			 ON CONFLICT (conversation_id, user_id) DO NOTHING
			 RETURNING `+memberCols,
			cid, s.d.texts(uids), at, conv.LastSeq); err != nil {
			return err
		}
		if len(rows) == 0 {
			return nil
		}
		if maxMembers > 0 && conv.MemberCount+len(rows) > maxMembers {
			return chat.Invalid("user_ids", fmt.Sprintf("a conversation has at most %d members", maxMembers))
		}
		if _, err := tx.ExecContext(ctx,
			`UPDATE conversations SET member_count = member_count + $2 WHERE id = $1`, cid, len(rows)); err != nil {
			return err
		}
		slices.SortFunc(rows, byIndex(uids, func(r memberRow) string { return r.UserID }))
		ids := make([]string, 0, len(rows))
		for _, r := range rows {
			added = append(added, r.member())
			ids = append(ids, r.UserID)
		}
		batch := []chat.OutboxEvent{{
			ConversationID: cid,
			Type:           chat.EventConversationCreated,
			Seq:            conv.LastSeq,
			To:             ids,
		}}
		for _, uid := range ids {
			data, err := memberEvent(cid, uid, chat.RoleMember, by)
			if err != nil {
				return err
			}
			batch = append(batch, chat.OutboxEvent{ConversationID: cid, Type: chat.EventMemberAdded, Data: data})
		}
		var err error
		evs, err = s.insertEvents(ctx, tx, at, batch)
		return err
	})
	if err != nil {
		return nil, chat.Changed{}, err
	}
	if added == nil {
		added = []chat.Member{}
	}
	return added, chat.Changed{Events: evs}, nil
}

// SetRole sets uid's role and writes member.updated; CodeNotFound if uid is
// not a member.
func (s *Store) SetRole(ctx context.Context, cid, uid string, role chat.Role, by string) (chat.Member, chat.Changed, error) {
	var (
		m   chat.Member
		evs []chat.OutboxEvent
	)
	err := s.inTx(ctx, func(tx *sqlx.Tx) error {
		var r memberRow
		if err := tx.GetContext(ctx, &r,
			`UPDATE members SET role = $3 WHERE conversation_id = $1 AND user_id = $2 RETURNING `+memberCols,
			cid, uid, string(role)); err != nil {
			return err
		}
		m = r.member()
		data, err := memberEvent(cid, uid, m.Role, by)
		if err != nil {
			return err
		}
		evs, err = s.insertEvents(ctx, tx, time.Time{}, []chat.OutboxEvent{{ConversationID: cid, Type: chat.EventMemberUpdated, Data: data}})
		return err
	})
	if err != nil {
		return chat.Member{}, chat.Changed{}, err
	}
	return m, chat.Changed{Events: evs}, nil
}

// RemoveMember removes uid and writes member.removed to the members and to
// uid (Extra: it is no longer a member but must learn it). When the last
// owner leaves and others remain, the longest-standing admin, else member,
// becomes owner in the same transaction (member.updated), so a group is never
// left without someone who can manage it.
func (s *Store) RemoveMember(ctx context.Context, cid, uid, by string) (chat.Changed, error) {
	var evs []chat.OutboxEvent
	err := s.inTx(ctx, func(tx *sqlx.Tx) error {
		// Conversation first (lock order), which also serialises concurrent
		// departures, so two owners leaving at once still leave one owner.
		var one int
		if err := tx.GetContext(ctx, &one, `SELECT 1 FROM conversations WHERE id = $1`+s.d.forUpdate, cid); err != nil {
			return err
		}
		var role string
		if err := tx.GetContext(ctx, &role,
			`DELETE FROM members WHERE conversation_id = $1 AND user_id = $2 RETURNING role`, cid, uid); err != nil {
			return err
		}
		if _, err := tx.ExecContext(ctx,
			`UPDATE conversations SET member_count = member_count - 1 WHERE id = $1`, cid); err != nil {
			return err
		}
		data, err := memberEvent(cid, uid, "", by)
		if err != nil {
			return err
		}
		batch := []chat.OutboxEvent{{ConversationID: cid, Type: chat.EventMemberRemoved, Data: data, Extra: []string{uid}}}
		if chat.Role(role) == chat.RoleOwner {
			// Another owner, if any, comes first and means nobody is promoted.
			var next memberRow
			err := tx.GetContext(ctx, &next,
				`SELECT `+memberCols+` FROM members WHERE conversation_id = $1
				 ORDER BY role = 'owner' DESC, role = 'admin' DESC, joined_at, user_id
				 LIMIT 1`, cid)
			switch {
			case errors.Is(err, sql.ErrNoRows): // nobody left
			case err != nil:
				return err
			case chat.Role(next.Role) != chat.RoleOwner:
				if _, err := tx.ExecContext(ctx,
					`UPDATE members SET role = 'owner' WHERE conversation_id = $1 AND user_id = $2`,
					cid, next.UserID); err != nil {
					return err
				}
				data, err := memberEvent(cid, next.UserID, chat.RoleOwner, by)
				if err != nil {
					return err
				}
				batch = append(batch, chat.OutboxEvent{ConversationID: cid, Type: chat.EventMemberUpdated, Data: data})
			}
		}
		evs, err = s.insertEvents(ctx, tx, time.Time{}, batch)
		return err
	})
	if err != nil {
		return chat.Changed{}, err
	}
	return chat.Changed{Events: evs}, nil
}

// SharingWith returns those of others that share at least one conversation
// with uid, in the order of others; uid itself is always included when asked
// for (one shares everything with oneself). It starts from the others'
// memberships (index on user_id) and probes uid's by primary key.
func (s *Store) SharingWith(ctx context.Context, uid string, others []string) ([]string, error) {
	others = dedupe(others)
	if len(others) == 0 {
		return []string{}, nil
	}
	var found []string
	if err := s.rdb.SelectContext(ctx, &found,
		`SELECT DISTINCT o.user_id FROM members o
		 WHERE o.user_id `+s.d.inTexts(2)+`
		   AND EXISTS (SELECT 1 FROM members me WHERE me.conversation_id = o.conversation_id AND me.user_id = $1)`,
		uid, s.d.texts(others)); err != nil {
		return nil, dbErr(err)
	}
	if slices.Contains(others, uid) && !slices.Contains(found, uid) {
		found = append(found, uid)
	}
	slices.SortFunc(found, byIndex(others, func(id string) string { return id }))
	return found, nil
}

// DirectPeers lists the users uid has a direct conversation with (both still
// members), sorted by id.
func (s *Store) DirectPeers(ctx context.Context, uid string) ([]string, error) {
	peers := []string{}
	if err := s.rdb.SelectContext(ctx, &peers,
		`SELECT p.user_id
		 FROM members m
		 JOIN conversations c ON c.id = m.conversation_id AND c.type = 'direct'
		 JOIN members p ON p.conversation_id = m.conversation_id AND p.user_id <> m.user_id
		 WHERE m.user_id = $1
		 ORDER BY p.user_id`, uid); err != nil {
		return nil, dbErr(err)
	}
	return peers, nil
}
