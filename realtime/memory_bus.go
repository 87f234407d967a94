package realtime

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"

	"imd/chat"
)

// memSubSet is a user's local subscriptions, guarded by its shard's mutex.
type memSubSet map[*memSub]struct{}

// memSub is the in-memory subscription: the same channels and rules as the
// Redis adapter's subscription (bus.go), minus the Pub/Sub connection.
type memSub struct {
	m      *Memory
	uid    string
	wake   chan struct{}
	events chan chat.StreamEvent

	// guarded by the mutex of uid's shard in m.subs
	closed       bool
	eventsClosed bool
	err          error
}

func (s *memSub) Wake() <-chan struct{} { return s.wake }

// Since implements chat.Subscription: in memory the log is as cheap to read
// as a push would be, so wake-ups carry nothing.
func (s *memSub) Since(pos chat.Position) ([]chat.StreamEvent, chat.Position, bool) {
	return nil, pos, false
}
func (s *memSub) Events() <-chan chat.StreamEvent { return s.events }

// Err says why Events was closed: ErrSlowSubscriber, ErrClosed, or nil (the
// subscription was closed by its owner, or Events is still open).
func (s *memSub) Err() error {
	sh := s.m.subs.of(s.uid)
	sh.mu.RLock()
	defer sh.mu.RUnlock()
	return s.err
}

// Close ends the subscription and closes its Events channel. Idempotent.
func (s *memSub) Close() {
	sh := s.m.subs.of(s.uid)
	sh.mu.Lock()
	defer sh.mu.Unlock()
	if s.closed {
		return
	}
	s.closed = true
	s.closeEvents(nil)
	if set := sh.m[s.uid]; set != nil {
		delete(set, s)
		if len(set) == 0 {
			delete(sh.m, s.uid)
		}
	}
}

// closeEvents closes Events once; the shard's mutex must be held.
func (s *memSub) closeEvents(err error) {
	if s.eventsClosed {
		return
	}
	s.eventsClosed = true
	s.err = err
	close(s.events)
}

// Subscribe implements chat.Bus. Registration is immediate, so anything
// appended or published after Subscribe returns reaches the subscription.
func (m *Memory) Subscribe(ctx context.Context, uid string) (chat.Subscription, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	s := &memSub{
		m:      m,
		uid:    uid,
		wake:   make(chan struct{}, 1),
		events: make(chan chat.StreamEvent, m.cfg.EventBuffer),
	}
	sh := m.subs.of(uid)
	sh.mu.Lock()
	defer sh.mu.Unlock()
	// Checked under the shard lock: Close sets closed before it sweeps the
	// shards, so a subscription is either refused or seen by the sweep.
	if m.closed.Load() {
		return nil, ErrClosed
	}
	set := sh.m[uid]
	if set == nil {
		set = make(memSubSet)
		sh.m[uid] = set
	}
	set[s] = struct{}{}
	return s, nil
}

// wake signals uid's subscriptions that the log grew; pending wake-ups
// coalesce.
func (m *Memory) wake(uid string) {
	sh := m.subs.of(uid)
	sh.mu.RLock() // only the wake channels are touched, and they are never closed
	defer sh.mu.RUnlock()
	for s := range sh.m[uid] {
		select {
		case s.wake <- struct{}{}:
		default:
		}
	}
}

// Publish implements chat.Bus: the event goes to uid's local subscriptions
// at once. Like the Redis adapter it carries Data as JSON ("null" when
// empty; invalid JSON is an error) and hands out a compacted copy, so the
// caller may reuse its buffer. A subscription whose buffer is full has its
// Events closed (ErrSlowSubscriber) and gets nothing more.
func (m *Memory) Publish(ctx context.Context, uids []string, ev chat.StreamEvent) error {
	if len(uids) == 0 {
		return nil
	}
	if err := m.check(ctx); err != nil {
		return fmt.Errorf("realtime: publish: %w", err)
	}
	if len(ev.Data) == 0 {
		ev.Data = json.RawMessage("null")
	} else {
		var buf bytes.Buffer
		if err := json.Compact(&buf, ev.Data); err != nil {
			return fmt.Errorf("realtime: publish: %w", err)
		}
		ev.Data = buf.Bytes()
	}
	for _, uid := range uids {
		sh := m.subs.of(uid)
		sh.mu.Lock()
		for s := range sh.m[uid] {
			if s.eventsClosed {
				continue
			}
			select {
			case s.events <- ev:
			default:
				s.closeEvents(ErrSlowSubscriber)
			}
		}
		sh.mu.Unlock()
	}
	return nil
}

// closeSubscriptions ends every subscription's Events with ErrClosed.
func (m *Memory) closeSubscriptions() {
	for i := range m.subs.shards {
		sh := &m.subs.shards[i]
		sh.mu.Lock()
		for _, set := range sh.m {
			for s := range set {
				s.closeEvents(ErrClosed)
			}
		}
		sh.mu.Unlock()
	}
}
