package realtime

import (
	"cmp"
	"context"
	"fmt"
	"slices"
	"strconv"
	"strings"
	"time"

	"imd/chat"
)

// memMembers is one conversation's member cache: the group:members and
// group:members:ver keys of cache.go, with the same TTLs.
type memMembers struct {
	list       []string // nil = not cached; no duplicates (a set in Redis)
	setExpires time.Time
	ver        int64 // 0 = absent (reads as "0")
	verExpires time.Time
}

func (e *memMembers) cached(now time.Time) bool { return e.list != nil && now.Before(e.setExpires) }

func (e *memMembers) version(now time.Time) int64 {
	if e.ver != 0 && now.Before(e.verExpires) {
		return e.ver
	}
	return 0
}

// CachedMembers implements chat.MemberCache; the version is returned on
// hits too.
func (m *Memory) CachedMembers(ctx context.Context, cids []string) ([]chat.MemberSet, error) {
	if err := m.check(ctx); err != nil {
		return nil, fmt.Errorf("realtime: cached members: %w", err)
	}
	sets := make([]chat.MemberSet, len(cids))
	for i, cid := range cids {
		members, ok, ver := m.cachedMembers(cid)
		sets[i] = chat.MemberSet{Members: members, OK: ok, Ver: ver}
	}
	return sets, nil
}

func (m *Memory) cachedMembers(cid string) ([]string, bool, string) {
	now := m.now()
	sh := m.members.of(cid)
	sh.mu.RLock()
	defer sh.mu.RUnlock()
	e := sh.m[cid]
	if e == nil {
		return nil, false, "0"
	}
	ver := strconv.FormatInt(e.version(now), 10)
	if !e.cached(now) {
		return nil, false, ver
	}
	return slices.Clone(e.list), true, ver
}

// FillMembers implements chat.MemberCache: only if the version is still
// ver. An empty member list is not stored (as in Redis, which has no empty
// set): the next lookup misses again.
func (m *Memory) FillMembers(ctx context.Context, cid, ver string, members []string) error {
	if err := m.check(ctx); err != nil {
		return fmt.Errorf("realtime: fill members: %w", err)
	}
	if len(members) == 0 {
		return nil
	}
	now := m.now()
	sh := m.members.of(cid)
	sh.mu.Lock()
	defer sh.mu.Unlock()
	e := sh.m[cid]
	if e == nil {
		e = &memMembers{}
	}
	if strconv.FormatInt(e.version(now), 10) != ver {
		return nil
	}
	seen := make(map[string]struct{}, len(members))
	list := make([]string, 0, len(members))
	for _, u := range members {
		if _, dup := seen[u]; !dup {
			seen[u] = struct{}{}
			list = append(list, u)
		}
	}
	e.list, e.setExpires = list, now.Add(membersTTL)
	sh.m[cid] = e
	return nil
}

// InvalidateMembers implements chat.MemberCache: bump the version (pending
// fills are dropped) and drop the set, atomically.
func (m *Memory) InvalidateMembers(ctx context.Context, cid string) error {
	if err := m.check(ctx); err != nil {
		return fmt.Errorf("realtime: invalidate members: %w", err)
	}
	now := m.now()
	sh := m.members.of(cid)
	sh.mu.Lock()
	defer sh.mu.Unlock()
	e := sh.m[cid]
	if e == nil {
		e = &memMembers{}
		sh.m[cid] = e
	}
	e.ver, e.verExpires = e.version(now)+1, now.Add(memberVersionTTL)
	e.list = nil
	return nil
}

func (m *Memory) sweepMembers(now time.Time) {
	for i := range m.members.shards {
		sh := &m.members.shards[i]
		sh.mu.Lock()
		for cid, e := range sh.m {
			if !e.cached(now) {
				e.list = nil
			}
			if e.version(now) == 0 {
				e.ver = 0
			}
			if e.list == nil && e.ver == 0 {
				delete(sh.m, cid)
			}
		}
		sh.mu.Unlock()
	}
}

// memSessions is one user's cached conversation list (session:{uid} in
// cache.go): present means cached, even when empty.
type memSessions struct {
	score   map[string]int64 // conversation id → activity (unix ms, >= 0)
	order   []memSession     // the same, newest first, ties by id descending
	expires time.Time
}

type memSession struct {
	id    string
	score int64
}

// sessionOrder sorts newest first, ties by id descending in byte order,
// as ZREVRANGEBYSCORE does.
func sessionOrder(a, b memSession) int {
	if c := cmp.Compare(b.score, a.score); c != 0 {
		return c
	}
	return strings.Compare(b.id, a.id)
}

func (s *memSessions) insert(it memSession) {
	i, _ := slices.BinarySearchFunc(s.order, it, sessionOrder)
	s.order = slices.Insert(s.order, i, it)
	s.score[it.id] = it.score
}

func (s *memSessions) remove(id string) {
	score, ok := s.score[id]
	if !ok {
		return
	}
	if i, found := slices.BinarySearchFunc(s.order, memSession{id, score}, sessionOrder); found {
		s.order = slices.Delete(s.order, i, i+1)
	}
	delete(s.score, id)
}

// liveSessions returns uid's list if cached; the shard must be locked.
func liveSessions(sh *memShard[*memSessions], uid string, now time.Time) *memSessions {
	if s := sh.m[uid]; s != nil && now.Before(s.expires) {
		return s
	}
	return nil
}

// SessionPage implements chat.SessionCache: newest first, ties by
// conversation id descending (byte order), strictly after the cursor.
func (m *Memory) SessionPage(ctx context.Context, uid string, after *chat.Activity, limit int) ([]chat.Activity, bool, error) {
	if err := m.check(ctx); err != nil {
		return nil, false, fmt.Errorf("realtime: session page: %w", err)
	}
	sh := m.sessions.of(uid)
	sh.mu.RLock()
	defer sh.mu.RUnlock()
	s := liveSessions(sh, uid, m.now())
	if s == nil {
		return nil, false, nil
	}
	items := []chat.Activity{}
	if limit <= 0 {
		return items, true, nil
	}
	i := 0
	if after != nil {
		var found bool
		i, found = slices.BinarySearchFunc(s.order, memSession{after.ConversationID, activityScore(after.At)}, sessionOrder)
		if found {
			i++
		}
	}
	for _, it := range s.order[i:min(i+limit, len(s.order))] {
		items = append(items, chat.Activity{ConversationID: it.id, At: time.UnixMilli(it.score).UTC()})
	}
	return items, true, nil
}

// FillSessions implements chat.SessionCache: replaces uid's whole list.
func (m *Memory) FillSessions(ctx context.Context, uid string, items []chat.Activity) error {
	if err := m.check(ctx); err != nil {
		return fmt.Errorf("realtime: fill sessions: %w", err)
	}
	s := &memSessions{score: make(map[string]int64, len(items))}
	for _, it := range items {
		if it.ConversationID != sessionSentinel { // as in Redis: "" is no conversation
			s.score[it.ConversationID] = activityScore(it.At) // the last one wins, as with ZADD
		}
	}
	s.order = make([]memSession, 0, len(s.score))
	for id, score := range s.score {
		s.order = append(s.order, memSession{id, score})
	}
	slices.SortFunc(s.order, sessionOrder)
	now := m.now()
	s.expires = now.Add(sessionsTTL)
	sh := m.sessions.of(uid)
	sh.mu.Lock()
	defer sh.mu.Unlock()
	sh.m[uid] = s
	return nil
}

// TouchSessions implements chat.SessionCache: moves cid forward (never back)
// in the lists that are cached, adding it where missing.
func (m *Memory) TouchSessions(ctx context.Context, uids []string, cid string, at time.Time) error {
	if len(uids) == 0 || cid == sessionSentinel {
		return nil
	}
	if err := m.check(ctx); err != nil {
		return fmt.Errorf("realtime: touch sessions: %w", err)
	}
	score := activityScore(at)
	now := m.now()
	for _, uid := range uids {
		m.touchSession(uid, cid, score, now)
	}
	return nil
}

// touchSession moves cid to score in uid's list if the list is cached and
// the score is newer.
func (m *Memory) touchSession(uid, cid string, score int64, now time.Time) {
	sh := m.sessions.of(uid)
	sh.mu.Lock()
	defer sh.mu.Unlock()
	if s := liveSessions(sh, uid, now); s != nil {
		if old, ok := s.score[cid]; !ok || score > old {
			s.remove(cid)
			s.insert(memSession{cid, score})
		}
	}
}

// RemoveSession implements chat.SessionCache.
func (m *Memory) RemoveSession(ctx context.Context, uid, cid string) error {
	if cid == sessionSentinel {
		return nil
	}
	if err := m.check(ctx); err != nil {
		return fmt.Errorf("realtime: remove session: %w", err)
	}
	sh := m.sessions.of(uid)
	sh.mu.Lock()
	defer sh.mu.Unlock()
	if s := liveSessions(sh, uid, m.now()); s != nil {
		s.remove(cid)
	}
	return nil
}

func (m *Memory) sweepSessions(now time.Time) {
	for i := range m.sessions.shards {
		sh := &m.sessions.shards[i]
		sh.mu.Lock()
		for uid, s := range sh.m {
			if !now.Before(s.expires) {
				delete(sh.m, uid)
			}
		}
		sh.mu.Unlock()
	}
}
