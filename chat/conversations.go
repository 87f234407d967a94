package chat

import (
	"context"
	"encoding/base64"
	"fmt"
	"slices"
	"strconv"
	"strings"
	"time"
	"unicode/utf8"
)

// NewConversation is a create request: a group with a title, or a direct
// conversation with exactly one peer.
type NewConversation struct {
	Type      ConvType
	Title     string
	MemberIDs []string
}

// CreateConversation creates a group (caller is owner) or returns the
// caller's direct conversation with the peer, creating it if needed.
func (s *Service) CreateConversation(ctx context.Context, p Principal, req NewConversation) (c Conversation, created bool, err error) {
	switch req.Type {
	case Direct:
		if req.Title != "" {
			return c, false, Invalid("title", "direct conversations have no title")
		}
		if len(req.MemberIDs) != 1 {
			return c, false, Invalid("member_ids", "a direct conversation takes exactly one peer")
		}
		c, created, err := s.direct(ctx, p, req.MemberIDs[0], "member_ids[0]")
		if IsCode(err, CodeNotFound) {
			return c, false, Invalid("member_ids[0]", "no such user")
		}
		return c, created, err
	case Group:
		var v Validation
		s.validateTitle(&v, req.Title)
		ids := dedupe(req.MemberIDs, p.UserID)
		if len(ids)+1 > s.cfg.MaxGroupMembers {
			v.Add("member_ids", fmt.Sprintf("a group has at most %d members", s.cfg.MaxGroupMembers))
		}
		if err := v.Err(); err != nil {
			return c, false, err
		}
		c, ch, err := s.store.CreateGroup(ctx, NewGroup{ID: newID("c_"), Title: strings.TrimSpace(req.Title),
			OwnerID: p.UserID, MemberIDs: ids, CreatedAt: Now()})
		if err != nil {
			return c, false, err
		}
		s.disp.enqueue(ch.Events)
		return c, true, nil
	default:
		return c, false, Invalid("type", `must be "group" or "direct"`)
	}
}

func (s *Service) direct(ctx context.Context, p Principal, peer, field string) (Conversation, bool, error) {
	if peer == p.UserID {
		return Conversation{}, false, Invalid(field, "cannot start a direct conversation with yourself")
	}
	if !usernameRE.MatchString(peer) {
		return Conversation{}, false, notFound("user")
	}
	c, created, ch, err := s.store.DirectConversation(ctx, p.UserID, peer, newID("c_"), Now())
	if err != nil {
		return c, false, err
	}
	s.disp.enqueue(ch.Events)
	return c, created, nil
}

func (s *Service) validateTitle(v *Validation, title string) {
	t := strings.TrimSpace(title)
	if t == "" || !utf8.ValidString(t) || strings.ContainsRune(t, 0) || utf8.RuneCountInString(t) > s.cfg.MaxTitleChars {
		v.Add("title", fmt.Sprintf("must be 1 to %d characters of valid UTF-8", s.cfg.MaxTitleChars))
	}
}

// dedupe removes duplicates and self from ids, keeping their order.
func dedupe(ids []string, self string) []string {
	seen := map[string]bool{self: true}
	out := make([]string, 0, len(ids))
	for _, id := range ids {
		if !seen[id] {
			seen[id] = true
			out = append(out, id)
		}
	}
	return out
}

// GetConversation returns a conversation the caller is a member of.
func (s *Service) GetConversation(ctx context.Context, p Principal, cid string) (Conversation, error) {
	c, err := s.store.Conversation(ctx, cid, p.UserID)
	if IsCode(err, CodeNotFound) {
		return c, notFound("conversation")
	}
	return c, err
}

// ListConversations pages the caller's conversations, most recent activity
// first. The order comes from the session cache in Redis, rebuilt from
// PostgreSQL on a miss; with Redis down, PostgreSQL answers alone.
func (s *Service) ListConversations(ctx context.Context, p Principal, page Page) ([]Conversation, string, error) {
	after, err := decodeActivityCursor(page.Cursor)
	if err != nil {
		return nil, "", err
	}
	limit := clampLimit(page.Limit)
	items, err := s.activityPage(ctx, p.UserID, after, limit+1)
	if err != nil {
		return nil, "", err
	}
	next := ""
	if len(items) > limit {
		items = items[:limit]
		next = encodeActivityCursor(items[len(items)-1])
	}
	ids := make([]string, len(items))
	for i, it := range items {
		ids[i] = it.ConversationID
	}
	convs, err := s.store.ConversationsFor(ctx, p.UserID, ids)
	if err != nil {
		return nil, "", err
	}
	// The cached order lags a send by one dispatch (the dispatcher touches
	// the lists after the commit). Order the page by the activity PostgreSQL
	// just returned, so that a page never contradicts its own
	// last_activity_at fields and a send shows at the top at once.
	slices.SortStableFunc(convs, func(a, b Conversation) int {
		x := Activity{ConversationID: a.ID, At: a.LastActivityAt}
		y := Activity{ConversationID: b.ID, At: b.LastActivityAt}
		switch {
		case activityBefore(x, y):
			return -1
		case activityBefore(y, x):
			return 1
		}
		return 0
	})
	return convs, next, nil
}

// sessionRebuildMax bounds the rebuild of one user's cached list.
const sessionRebuildMax = 100000

func (s *Service) activityPage(ctx context.Context, uid string, after *Activity, n int) ([]Activity, error) {
	items, ok, err := s.rt.SessionPage(ctx, uid, after, n)
	if err == nil && ok {
		return items, nil
	}
	if err != nil {
		s.log.Warn("session cache unavailable, listing from the database", "err", err)
		return s.store.ActivityPage(ctx, uid, after, n)
	}
	all, err := s.store.ActivityPage(ctx, uid, nil, sessionRebuildMax)
	if err != nil {
		return nil, err
	}
	if err := s.rt.FillSessions(ctx, uid, all); err != nil {
		s.log.Warn("session cache fill", "err", err)
	}
	return pageActivities(all, after, n), nil
}

// pageActivities cuts a page out of a full, ordered list.
func pageActivities(all []Activity, after *Activity, n int) []Activity {
	i := 0
	if after != nil {
		for i < len(all) && !activityBefore(*after, all[i]) {
			i++
		}
	}
	end := min(i+n, len(all))
	return all[i:end]
}

// activityBefore reports whether a sorts before b (newest first, then id descending).
func activityBefore(a, b Activity) bool {
	if !a.At.Equal(b.At) {
		return a.At.After(b.At)
	}
	return a.ConversationID > b.ConversationID
}

func encodeActivityCursor(a Activity) string {
	return base64.RawURLEncoding.EncodeToString([]byte(strconv.FormatInt(a.At.UnixMilli(), 10) + ":" + a.ConversationID))
}

func decodeActivityCursor(c string) (*Activity, error) {
	if c == "" {
		return nil, nil
	}
	b, err := base64.RawURLEncoding.DecodeString(c)
	ms, id, ok := strings.Cut(string(b), ":")
	n, perr := strconv.ParseInt(ms, 10, 64)
	if err != nil || !ok || perr != nil || id == "" {
		return nil, Invalid("cursor", "malformed cursor")
	}
	return &Activity{ConversationID: id, At: time.UnixMilli(n).UTC()}, nil
}

// Page sizes of API.md.
const (
	DefaultPageLimit = 50
	MaxPageLimit     = 200
)

func clampLimit(n int) int {
	if n <= 0 {
		return DefaultPageLimit
	}
	return min(n, MaxPageLimit)
}

// member returns the caller's membership, or a not-found that does not reveal
// whether the conversation exists.
func (s *Service) member(ctx context.Context, cid, uid string) (Member, error) {
	m, err := s.store.Member(ctx, cid, uid)
	if IsCode(err, CodeNotFound) {
		return m, notFound("conversation")
	}
	return m, err
}

// manager returns the caller's membership if it may manage the group.
func (s *Service) manager(ctx context.Context, cid, uid string) (Conversation, Member, error) {
	m, err := s.member(ctx, cid, uid)
	if err != nil {
		return Conversation{}, m, err
	}
	c, err := s.store.Conversation(ctx, cid, uid)
	if err != nil {
		return c, m, err
	}
	if c.Type == Direct {
		return c, m, Errorf(CodeForbidden, "direct conversations cannot be changed")
	}
	if !m.Role.CanManage() {
		return c, m, Errorf(CodeForbidden, "only the owner or an admin may do this")
	}
	return c, m, nil
}

// UpdateConversation changes a group's title (owner or admin).
func (s *Service) UpdateConversation(ctx context.Context, p Principal, cid, title string) (Conversation, error) {
	if _, _, err := s.manager(ctx, cid, p.UserID); err != nil {
		return Conversation{}, err
	}
	var v Validation
	s.validateTitle(&v, title)
	if err := v.Err(); err != nil {
		return Conversation{}, err
	}
	ch, err := s.store.SetTitle(ctx, cid, strings.TrimSpace(title), p.UserID)
	if err != nil {
		return Conversation{}, err
	}
	s.disp.enqueue(ch.Events)
	return s.store.Conversation(ctx, cid, p.UserID)
}

// ListMembers pages a conversation's members.
func (s *Service) ListMembers(ctx context.Context, p Principal, cid string, page Page) ([]Member, string, error) {
	if _, err := s.member(ctx, cid, p.UserID); err != nil {
		return nil, "", err
	}
	page.Limit = clampLimit(page.Limit)
	return s.store.Members(ctx, cid, page)
}

// AddMembers adds users to a group (owner or admin); it returns the members
// actually added (those already in are skipped).
func (s *Service) AddMembers(ctx context.Context, p Principal, cid string, uids []string) ([]Member, error) {
	if _, _, err := s.manager(ctx, cid, p.UserID); err != nil {
		return nil, err
	}
	ids := dedupe(uids, p.UserID)
	if len(ids) == 0 {
		return nil, Invalid("user_ids", "must name at least one user other than yourself")
	}
	added, ch, err := s.store.AddMembers(ctx, cid, p.UserID, ids, s.cfg.MaxGroupMembers, Now())
	if err != nil {
		return nil, err
	}
	s.membershipChanged(ctx, cid, ch)
	return added, nil
}

// UpdateMember changes a member's role (owner only).
func (s *Service) UpdateMember(ctx context.Context, p Principal, cid, uid string, role Role) (Member, error) {
	_, me, err := s.manager(ctx, cid, p.UserID)
	if err != nil {
		return Member{}, err
	}
	if me.Role != RoleOwner {
		return Member{}, Errorf(CodeForbidden, "only the owner may change roles")
	}
	if role != RoleAdmin && role != RoleMember {
		return Member{}, Invalid("role", `must be "admin" or "member"`)
	}
	if uid == p.UserID {
		return Member{}, Invalid("role", "the owner's role cannot be changed")
	}
	m, ch, err := s.store.SetRole(ctx, cid, uid, role, p.UserID)
	if IsCode(err, CodeNotFound) {
		return m, notFound("member")
	}
	if err != nil {
		return m, err
	}
	s.membershipChanged(ctx, cid, ch)
	return m, nil
}

// RemoveMember removes a member (owner: anyone; admin: plain members) or
// lets the caller leave.
func (s *Service) RemoveMember(ctx context.Context, p Principal, cid, uid string) error {
	me, err := s.member(ctx, cid, p.UserID)
	if err != nil {
		return err
	}
	c, err := s.store.Conversation(ctx, cid, p.UserID)
	if err != nil {
		return err
	}
	if c.Type == Direct {
		return Errorf(CodeForbidden, "direct conversations cannot be left")
	}
	if uid != p.UserID {
		target, err := s.store.Member(ctx, cid, uid)
		if IsCode(err, CodeNotFound) {
			return notFound("member")
		}
		if err != nil {
			return err
		}
		allowed := me.Role == RoleOwner || (me.Role == RoleAdmin && target.Role == RoleMember)
		if !allowed {
			return Errorf(CodeForbidden, "not allowed to remove this member")
		}
	}
	ch, err := s.store.RemoveMember(ctx, cid, uid, p.UserID)
	if IsCode(err, CodeNotFound) {
		return notFound("member")
	}
	if err != nil {
		return err
	}
	s.membershipChanged(ctx, cid, ch)
	if err := s.rt.RemoveSession(ctx, uid, cid); err != nil {
		s.log.Warn("session cache remove", "err", err)
	}
	return nil
}

// membershipChanged invalidates the member cache right away (the dispatcher
// does it again from the outbox, which covers a crash here) and dispatches.
func (s *Service) membershipChanged(ctx context.Context, cid string, ch Changed) {
	if err := s.rt.InvalidateMembers(ctx, cid); err != nil {
		s.log.Warn("member cache invalidate", "cid", cid, "err", err)
	}
	s.disp.enqueue(ch.Events)
}

// membersOf is members for several conversations, with one cache lookup
// for all of them (a dispatcher round of direct messages touches as many
// conversations as messages).
func (s *Service) membersOf(ctx context.Context, cids []string) (map[string][]string, error) {
	out := make(map[string][]string, len(cids))
	sets, err := s.rt.CachedMembers(ctx, cids)
	for i, cid := range cids {
		if err == nil && sets[i].OK {
			out[cid] = sets[i].Members
			continue
		}
		ids, serr := s.store.MemberIDs(ctx, cid)
		if serr != nil {
			return nil, serr
		}
		if err == nil {
			if ferr := s.rt.FillMembers(ctx, cid, sets[i].Ver, ids); ferr != nil {
				s.log.Warn("member cache fill", "err", ferr)
			}
		}
		out[cid] = ids
	}
	return out, nil
}

// members returns the member ids for fan-out: the Redis cache, filled from
// PostgreSQL on a miss; PostgreSQL alone when Redis fails.
func (s *Service) members(ctx context.Context, cid string) ([]string, error) {
	m, err := s.membersOf(ctx, []string{cid})
	return m[cid], err
}
