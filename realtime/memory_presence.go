package realtime

import (
	"context"
	"errors"
	"fmt"
	"time"

	"imd/chat"
)

// memPresence is one user's presence: the user:online and user:lastseen
// keys of presence.go.
type memPresence struct {
	conns map[string]time.Time // connection id → expiry
	// lastSeen is the unix ms of the last disconnect that left the user
	// offline, kept (like the Redis key) without expiry: one small entry per
	// user, and "last seen" must not turn into "never seen" with time.
	lastSeen int64
	seen     bool
}

// ttlDuration is the ttl at the Redis adapter's precision (whole ms, at least 1).
func ttlDuration(ttl time.Duration) time.Duration {
	return time.Duration(ttlMillis(ttl)) * time.Millisecond
}

// purge drops the connections expired at now (expiry <= now, like
// ZREMRANGEBYSCORE -inf now).
func (p *memPresence) purge(now time.Time) {
	for id, exp := range p.conns {
		if !exp.After(now) {
			delete(p.conns, id)
		}
	}
}

func (p *memPresence) online(now time.Time) bool {
	for _, exp := range p.conns {
		if exp.After(now) {
			return true
		}
	}
	return false
}

// presenceFor returns uid's presence, creating it; the shard must be locked.
func presenceFor(sh *memShard[*memPresence], uid string) *memPresence {
	p := sh.m[uid]
	if p == nil {
		p = &memPresence{conns: make(map[string]time.Time)}
		sh.m[uid] = p
	}
	return p
}

// Connect implements chat.Presence.
func (m *Memory) Connect(ctx context.Context, uid, connID string, ttl time.Duration) (bool, error) {
	if err := m.check(ctx); err != nil {
		return false, fmt.Errorf("realtime: presence connect: %w", err)
	}
	now := m.now()
	sh := m.presence.of(uid)
	sh.mu.Lock()
	defer sh.mu.Unlock()
	p := presenceFor(sh, uid)
	p.purge(now)
	first := len(p.conns) == 0
	p.conns[connID] = now.Add(ttlDuration(ttl))
	return first, nil
}

// Refresh implements chat.Presence. Like the Redis script it (re)adds the
// connection: after an outage longer than the ttl the entry has expired and
// the refresh must bring it back.
func (m *Memory) Refresh(ctx context.Context, uid, connID string, ttl time.Duration) error {
	if err := m.check(ctx); err != nil {
		return fmt.Errorf("realtime: presence refresh: %w", err)
	}
	now := m.now()
	sh := m.presence.of(uid)
	sh.mu.Lock()
	defer sh.mu.Unlock()
	presenceFor(sh, uid).conns[connID] = now.Add(ttlDuration(ttl))
	return nil
}

// Disconnect implements chat.Presence.
func (m *Memory) Disconnect(ctx context.Context, uid, connID string) (bool, error) {
	if err := m.check(ctx); err != nil {
		return false, fmt.Errorf("realtime: presence disconnect: %w", err)
	}
	now := m.now()
	sh := m.presence.of(uid)
	sh.mu.Lock()
	defer sh.mu.Unlock()
	p := presenceFor(sh, uid)
	delete(p.conns, connID)
	p.purge(now)
	if len(p.conns) > 0 {
		return false, nil
	}
	p.lastSeen, p.seen = now.UnixMilli(), true
	return true, nil
}

// Lookup implements chat.Presence, in the order of uids.
func (m *Memory) Lookup(ctx context.Context, uids []string) ([]chat.PresenceInfo, error) {
	if len(uids) == 0 {
		return nil, nil
	}
	if err := m.check(ctx); err != nil {
		return nil, fmt.Errorf("realtime: presence lookup: %w", err)
	}
	now := m.now()
	out := make([]chat.PresenceInfo, len(uids))
	for i, uid := range uids {
		out[i].UserID = uid
		sh := m.presence.of(uid)
		sh.mu.RLock()
		if p := sh.m[uid]; p != nil {
			if p.online(now) {
				out[i].Online = true
			} else if p.seen {
				at := time.UnixMilli(p.lastSeen).UTC()
				out[i].LastSeenAt = &at
			}
		}
		sh.mu.RUnlock()
	}
	return out, nil
}

func (m *Memory) sweepPresence(now time.Time) {
	for i := range m.presence.shards {
		sh := &m.presence.shards[i]
		sh.mu.Lock()
		for uid, p := range sh.m {
			p.purge(now)
			if len(p.conns) == 0 && !p.seen {
				delete(sh.m, uid)
			}
		}
		sh.mu.Unlock()
	}
}

// memBucket is a GCRA bucket: its theoretical arrival time, in ms since
// 2017-01-01 as in rateScript.
type memBucket struct{ tat float64 }

// rateEpochMicros is 2017-01-01 in unix µs, rateScript's time origin.
const rateEpochMicros = 1483228800 * 1_000_000

func rateNow(t time.Time) float64 { return float64(t.UnixMicro()-rateEpochMicros) / 1000 }

// Allow implements chat.RateLimiter with rateScript's arithmetic (GCRA:
// Burst at once, then Rate per Period; n = 0 checks for one token without
// taking it; n above Burst is never allowed; a denied request takes nothing).
func (m *Memory) Allow(ctx context.Context, key string, l chat.Limit, n int) (bool, time.Duration, error) {
	if n < 0 {
		return false, 0, errors.New("realtime: allow: negative n")
	}
	if l.Rate <= 0 || l.Period <= 0 {
		return true, 0, nil
	}
	if err := m.check(ctx); err != nil {
		return false, 0, fmt.Errorf("realtime: allow: %w", err)
	}
	interval := float64(l.Period) / float64(time.Millisecond) / float64(l.Rate)
	burst := float64(max(l.Burst, 1))
	sh := m.rates.of(key)
	sh.mu.Lock()
	defer sh.mu.Unlock()
	now := rateNow(m.now())
	tat := now
	if b := sh.m[key]; b != nil && b.tat > now {
		tat = b.tat
	}
	newTat := tat + interval*float64(max(n, 1))
	if allowAt := newTat - interval*burst; now < allowAt {
		return false, max(time.Duration((allowAt-now)*float64(time.Millisecond)), time.Millisecond), nil
	}
	if n > 0 {
		if b := sh.m[key]; b != nil {
			b.tat = newTat
		} else {
			sh.m[key] = &memBucket{tat: newTat}
		}
	}
	return true, 0, nil
}

// sweepRates drops the buckets that are full again (what the Redis key's
// expiry does): such a bucket behaves exactly like a missing one.
func (m *Memory) sweepRates(now time.Time) {
	t := rateNow(now)
	for i := range m.rates.shards {
		sh := &m.rates.shards[i]
		sh.mu.Lock()
		for key, b := range sh.m {
			if b.tat <= t {
				delete(sh.m, key)
			}
		}
		sh.mu.Unlock()
	}
}
