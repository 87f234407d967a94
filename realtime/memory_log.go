package realtime

import (
	"bytes"
	"context"
	"fmt"
	"maps"
	"strings"
	"sync"
	"time"

	"imd/chat"
)

// memLog is one user's event log: the in-memory counterpart of the five
// offline:* keys of log.go, with the same rules (see appendScript and
// readScript, which this follows step by step).
type memLog struct {
	mu sync.Mutex
	// dead: removed from its shard (expired or lost) while someone waited
	// for mu; that caller looks the user up again.
	dead bool
	// epoch is "" only between the log's creation in the map and its first
	// initialisation under mu: such a log reads as absent.
	epoch string
	head  int64 // offset of the newest entry; 0 for an empty log
	// ring holds the retained entries, oldest at ring[start]: it grows up
	// to LogCap, after which every append overwrites the oldest entry.
	ring  []memEntry
	start int
	conv  map[string]int64 // conversation → last seq appended or baselined
	keys  map[string]int64 // dedupe key → offset, retained entries without seq only
	// expires: the log is lost at this time unless an append or Head
	// extends it (by LogTTL), as the Redis keys' TTL.
	expires time.Time
}

// memEntry is one retained entry; its offset follows from its place in the ring.
type memEntry struct {
	key  string // the key it is recorded under in keys, "" if none
	typ  chat.EventType
	data []byte // immutable once stored; shared by the logs of one Append call
}

func (l *memLog) live(now time.Time) bool { return l.epoch != "" && now.Before(l.expires) }

// reset makes l a new, empty log under a new epoch: what Redis does when
// ensure_epoch finds the log's keys gone.
func (l *memLog) reset() {
	old := l.epoch
	l.epoch = newEpoch()
	for l.epoch == old { // only has to differ from the epoch it replaces
		l.epoch = newEpoch()
	}
	l.head = 0
	l.ring = nil
	l.start = 0
	l.conv = nil
	l.keys = nil
}

func (l *memLog) len() int { return len(l.ring) }

// at returns the i-th retained entry, 0 being the oldest.
func (l *memLog) at(i int) *memEntry { return &l.ring[(l.start+i)%len(l.ring)] }

// push appends e at offset l.head (already incremented), evicting the oldest
// entry when the log holds logCap of them, and its dedupe key with it.
func (l *memLog) push(e memEntry, logCap int) {
	n := len(l.ring)
	if n < logCap {
		if n == cap(l.ring) { // grow by hand: append's growth could overshoot logCap
			grown := make([]memEntry, n, min(max(2*n, 16), logCap))
			copy(grown, l.ring)
			l.ring = grown
		}
		l.ring = append(l.ring, e) // start stays 0 until the ring is full
		return
	}
	old := &l.ring[l.start]
	if old.key != "" && l.keys[old.key] == l.head-int64(logCap) {
		delete(l.keys, old.key)
	}
	*old = e
	l.start = (l.start + 1) % n
}

// dataCopier copies entry data, once per distinct source slice within one
// Append call: a message fanned out to a group is the same Data for every
// member, and is then stored once for all of their logs.
type dataCopier struct{ src, dst []byte }

func (c *dataCopier) copy(b []byte) []byte {
	if len(b) == 0 {
		return nil
	}
	if len(c.src) == len(b) && &c.src[0] == &b[0] {
		return c.dst
	}
	c.src, c.dst = b, bytes.Clone(b)
	return c.dst
}

// lockLog returns uid's log locked, creating an uninitialised one when
// create is set; nil when there is none and create is not set.
func (m *Memory) lockLog(uid string, create bool) *memLog {
	sh := m.logs.of(uid)
	for {
		sh.mu.RLock()
		l := sh.m[uid]
		sh.mu.RUnlock()
		if l == nil {
			if !create {
				return nil
			}
			sh.mu.Lock()
			if l = sh.m[uid]; l == nil {
				l = &memLog{}
				sh.m[uid] = l
			}
			sh.mu.Unlock()
		}
		l.mu.Lock()
		if !l.dead {
			return l
		}
		l.mu.Unlock()
	}
}

// Append implements chat.EventLog with the semantics of the Redis adapter's
// Append (which see): per user, under that user's lock, in delivery order;
// duplicates by seq or Key and gapped messages are skipped entirely,
// Baseline and Forget included; the user's subscriptions are woken when
// anything was appended.
func (m *Memory) Append(ctx context.Context, ds []chat.Delivery) ([]chat.Gap, error) {
	if err := m.check(ctx); err != nil {
		return nil, fmt.Errorf("realtime: append: %w", err)
	}
	// Group by user, in order of first appearance (the Redis adapter's
	// order, hence the order of the gaps); a user rarely appears twice in
	// one call, so a batch's further entries are an exception list.
	type userBatch struct {
		uid   string
		first *chat.LogEntry
		more  []*chat.LogEntry
	}
	batches := make([]userBatch, 0, len(ds))
	byUser := make(map[string]int, len(ds))
	for _, d := range ds {
		e := d.Entry
		if e == nil {
			return nil, fmt.Errorf("realtime: append: delivery to %q without an entry", d.UserID)
		}
		// Memory could store any type, but what Redis refuses is refused here too.
		if e.Type == "" || strings.ContainsAny(string(e.Type), " \n") {
			return nil, fmt.Errorf("realtime: append: bad event type %q", e.Type)
		}
		if i, ok := byUser[d.UserID]; ok {
			batches[i].more = append(batches[i].more, e)
			continue
		}
		byUser[d.UserID] = len(batches)
		batches = append(batches, userBatch{uid: d.UserID, first: e})
	}

	var gaps []chat.Gap
	var dc dataCopier
	now := m.now()
	for _, b := range batches {
		l := m.lockLog(b.uid, true)
		created := !l.live(now)
		if created {
			l.reset()
		}
		appended := 0
		for i := -1; i < len(b.more); i++ {
			e := b.first
			if i >= 0 {
				e = b.more[i]
			}
			if g, ok := l.appendOne(e, m.cfg.LogCap, &dc); ok {
				appended++
			} else if g != dupSkip {
				gaps = append(gaps, chat.Gap{UserID: b.uid, ConversationID: e.ConversationID, LastSeq: g, Seq: e.Seq})
			}
		}
		if created || appended > 0 {
			l.expires = now.Add(m.cfg.LogTTL)
		}
		l.mu.Unlock()
		for i := -1; i < len(b.more); i++ {
			e := b.first
			if i >= 0 {
				e = b.more[i]
			}
			if !e.Activity.IsZero() && e.ConversationID != sessionSentinel {
				m.touchSession(b.uid, e.ConversationID, max(activityScore(e.Activity), 1), now)
			}
		}
		if appended > 0 {
			m.wake(b.uid)
		}
	}
	return gaps, nil
}

// dupSkip is appendOne's gapLast for a duplicate (no gap to report).
const dupSkip = -2

// appendOne applies one entry to l (locked). It reports whether the entry
// was appended, and if not, the conversation's last seq when the entry was
// skipped because of a gap (-1: the start is unknown; dupSkip: a duplicate).
func (l *memLog) appendOne(e *chat.LogEntry, logCap int, dc *dataCopier) (gapLast int64, ok bool) {
	seq, baseline := max(e.Seq, 0), max(e.Baseline, 0)
	cid := e.ConversationID
	if seq > 0 {
		last, has := l.conv[cid]
		if !has && baseline > 0 {
			last, has = baseline, true // a gap fill says where this conversation starts here
		}
		switch {
		case !has && seq > 1:
			return -1, false // start unknown: the dispatcher fills from the store
		case has && seq <= last:
			return dupSkip, false
		case has && seq > last+1:
			return last, false
		}
	} else if e.Key != "" {
		if _, dup := l.keys[e.Key]; dup {
			return dupSkip, false
		}
	}
	l.head++
	ent := memEntry{typ: e.Type, data: dc.copy(e.Data)}
	if seq == 0 && e.Key != "" {
		ent.key = e.Key
	}
	l.push(ent, logCap)
	if seq > 0 {
		if l.conv == nil {
			l.conv = make(map[string]int64)
		}
		l.conv[cid] = seq
	} else if e.Key != "" {
		if l.keys == nil {
			l.keys = make(map[string]int64)
		}
		l.keys[e.Key] = l.head
	}
	if baseline > 0 && l.conv[cid] < baseline {
		if l.conv == nil {
			l.conv = make(map[string]int64)
		}
		l.conv[cid] = baseline
	}
	if e.Forget {
		delete(l.conv, cid)
	}
	return 0, true
}

// Read implements chat.EventLog, with readScript's checks in its order:
// unknown or lost log or other epoch, then ahead of the head, then older
// than the oldest retained entry. Reading does not extend the log's life.
func (m *Memory) Read(ctx context.Context, uid string, pos chat.Position, limit int) ([]chat.StreamEvent, chat.Position, error) {
	if err := m.check(ctx); err != nil {
		return nil, pos, fmt.Errorf("realtime: read: %w", err)
	}
	l := m.lockLog(uid, false)
	if l == nil {
		return nil, pos, &chat.ResyncError{Reason: chat.ResyncEpoch}
	}
	defer l.mu.Unlock()
	if !l.live(m.now()) || pos.Epoch != l.epoch {
		return nil, pos, &chat.ResyncError{Reason: chat.ResyncEpoch}
	}
	if pos.Offset > l.head {
		return nil, pos, &chat.ResyncError{Reason: chat.ResyncAhead}
	}
	n := l.len()
	first := l.head - int64(n) + 1
	if pos.Offset < first-1 {
		return nil, pos, &chat.ResyncError{Reason: chat.ResyncExpired}
	}
	if limit <= 0 {
		return []chat.StreamEvent{}, pos, nil
	}
	from := int(pos.Offset - first + 1)
	count := min(limit, n-from)
	// One buffer for all the data: callers get bytes of their own, as from
	// Redis, without one allocation per event.
	size := 0
	for i := range count {
		size += len(l.at(from + i).data)
	}
	buf := make([]byte, 0, size)
	evs := make([]chat.StreamEvent, count)
	last := pos
	for i := range count {
		e := l.at(from + i)
		last = chat.Position{Epoch: l.epoch, Offset: first + int64(from+i)}
		start := len(buf)
		buf = append(buf, e.data...)
		evs[i] = chat.StreamEvent{ID: last.String(), Type: e.typ, Data: buf[start:len(buf):len(buf)]}
	}
	return evs, last, nil
}

// Head implements chat.EventLog: creates the log (empty, new epoch) when
// there is none, and extends its life, as headScript does.
func (m *Memory) Head(ctx context.Context, uid string) (chat.Position, error) {
	head, _, err := m.head(ctx, uid, false)
	return head, err
}

// HeadSeqs implements chat.EventLog, as Head does.
func (m *Memory) HeadSeqs(ctx context.Context, uid string) (chat.Position, map[string]int64, error) {
	return m.head(ctx, uid, true)
}

func (m *Memory) head(ctx context.Context, uid string, withSeqs bool) (chat.Position, map[string]int64, error) {
	if err := m.check(ctx); err != nil {
		return chat.Position{}, nil, fmt.Errorf("realtime: head: %w", err)
	}
	now := m.now()
	l := m.lockLog(uid, true)
	defer l.mu.Unlock()
	if !l.live(now) {
		l.reset()
	}
	l.expires = now.Add(m.cfg.LogTTL)
	var seqs map[string]int64
	if withSeqs {
		seqs = make(map[string]int64, len(l.conv))
		maps.Copy(seqs, l.conv)
	}
	return chat.Position{Epoch: l.epoch, Offset: l.head}, seqs, nil
}

// sweepLogs drops the logs that expired. A log someone holds is in use and
// is left for the next sweep (or for its user's next access, which sees the
// expiry itself).
func (m *Memory) sweepLogs(now time.Time) {
	for i := range m.logs.shards {
		sh := &m.logs.shards[i]
		sh.mu.Lock()
		for uid, l := range sh.m {
			if !l.mu.TryLock() {
				continue
			}
			if !l.live(now) {
				l.dead = true
				delete(sh.m, uid)
			}
			l.mu.Unlock()
		}
		sh.mu.Unlock()
	}
}

// loseLogs drops every log: their next Append or Head starts a new epoch.
func (m *Memory) loseLogs() {
	for i := range m.logs.shards {
		sh := &m.logs.shards[i]
		sh.mu.Lock()
		for _, l := range sh.m {
			l.mu.Lock() // whoever holds it holds no shard lock: no deadlock
			l.dead = true
			l.mu.Unlock()
		}
		clear(sh.m)
		sh.mu.Unlock()
	}
}
