package realtime

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"

	"imd/chat"
)

// memSubSet is the local subscriptions of one key of m.subs, guarded by its
// shard's mutex. A user's key is the user id itself (no string built per
// recipient on the append path); a topic's Listen-ers' is nodeKey(topic).
type memSubSet map[*memSub]struct{}

// nodeMark starts the key of a topic's Listen-ers in m.subs, and no user id
// (Subscribe refuses such ids, Publish skips them), so that no Publish
// reaches a Listen-er and no Broadcast a stream.
const nodeMark = "\x00"

// nodeKey is the key of topic's Listen-ers in m.subs: one per topic, so that
// a busy topic never fills the buffer of another's Listen-ers (chat.Topic).
func nodeKey(topic chat.Topic) string { return nodeMark + string(topic) }

// isNodeKey reports whether key is empty or a topic's: not a user id.
func isNodeKey(key string) bool { return key == "" || key[0] == nodeMark[0] }

// memSub is the in-memory subscription: the same channels and rules as the
// Redis adapter's subscription (bus.go), minus the Pub/Sub connection.
type memSub struct {
	m      *Memory
	key    string // the user id, or nodeKey(topic) for a Listen-er
	wake   chan struct{}
	events chan chat.StreamEvent

	// guarded by the mutex of key's shard in m.subs
	closed       bool
	eventsClosed bool
	err          error
}

func (s *memSub) Wake() <-chan struct{} { return s.wake }

// Since implements chat.Subscription: in memory the log is as cheap to read
// as a push would be, so wake-ups carry nothing.
func (s *memSub) Since(pos chat.Position, _ func(string, int64) bool) ([]chat.StreamEvent, chat.Position, bool) {
	return nil, pos, false
}
func (s *memSub) Events() <-chan chat.StreamEvent { return s.events }

// Err says why Events was closed: ErrSlowSubscriber, ErrClosed, or nil (the
// subscription was closed by its owner, or Events is still open).
func (s *memSub) Err() error {
	sh := s.m.subs.of(s.key)
	sh.mu.RLock()
	defer sh.mu.RUnlock()
	return s.err
}

// Close ends the subscription and closes its Events channel. Idempotent.
func (s *memSub) Close() {
	sh := s.m.subs.of(s.key)
	sh.mu.Lock()
	defer sh.mu.Unlock()
	if s.closed {
		return
	}
	s.closed = true
	s.closeEvents(nil)
	if set := sh.m[s.key]; set != nil {
		delete(set, s)
		if len(set) == 0 {
			delete(sh.m, s.key)
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

// deliver hands an event to s's Events (offer's rule, as in the Redis
// adapter); the shard's mutex must be held.
func (s *memSub) deliver(ev chat.StreamEvent) {
	if !s.eventsClosed && !offer(s.events, ev) {
		s.closeEvents(ErrSlowSubscriber)
	}
}

// Subscribe implements chat.Bus. Registration is immediate, so anything
// appended or published after Subscribe returns reaches the subscription.
// A user id that is empty or starts with nodeMark is refused: its key would
// be a topic's.
func (m *Memory) Subscribe(ctx context.Context, uid string) (chat.Subscription, error) {
	if uid == "" {
		return nil, errors.New("realtime: subscribe: empty user id")
	}
	if isNodeKey(uid) {
		return nil, fmt.Errorf("realtime: subscribe: user id %q starts with a NUL byte", uid)
	}
	s, err := m.subscribe(ctx, uid)
	if err != nil {
		return nil, err
	}
	return s, nil
}

// Listen implements chat.Bus: a subscription to what Broadcast sends on
// topic. With one node and no connection to lose, it is never woken.
func (m *Memory) Listen(ctx context.Context, topic chat.Topic) (chat.NodeSubscription, error) {
	if topic == "" {
		return nil, fmt.Errorf("realtime: listen: %w", errEmptyTopic)
	}
	s, err := m.subscribe(ctx, nodeKey(topic))
	if err != nil {
		return nil, err
	}
	return s, nil
}

func (m *Memory) subscribe(ctx context.Context, key string) (*memSub, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	s := &memSub{
		m:      m,
		key:    key,
		wake:   make(chan struct{}, 1),
		events: make(chan chat.StreamEvent, m.cfg.EventBuffer),
	}
	sh := m.subs.of(key)
	sh.mu.Lock()
	defer sh.mu.Unlock()
	// Checked under the shard lock: Close sets closed before it sweeps the
	// shards, so a subscription is either refused or seen by the sweep.
	if m.closed.Load() {
		return nil, ErrClosed
	}
	set := sh.m[key]
	if set == nil {
		set = make(memSubSet)
		sh.m[key] = set
	}
	set[s] = struct{}{}
	return s, nil
}

// wake signals uid's subscriptions that the log grew; pending wake-ups
// coalesce. An id that is a topic's key wakes nothing: Listen-ers are never
// woken.
func (m *Memory) wake(uid string) {
	if isNodeKey(uid) {
		return
	}
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
// caller may reuse its buffer. An event that does not fit in a
// subscription's buffer is dropped if droppable, and otherwise closes its
// Events (ErrSlowSubscriber), after which it gets nothing more. An id that
// Subscribe refuses (empty, or starting with nodeMark) gets nothing.
func (m *Memory) Publish(ctx context.Context, uids []string, ev chat.StreamEvent) error {
	if len(uids) == 0 {
		return nil
	}
	ev, err := m.eventCopy(ctx, ev)
	if err != nil {
		return fmt.Errorf("realtime: publish: %w", err)
	}
	for _, uid := range uids {
		if !isNodeKey(uid) {
			m.deliver(uid, ev)
		}
	}
	return nil
}

// Broadcast implements chat.Bus: the event goes to topic's Listen-ers at
// once, as Publish's go to a user's subscriptions.
func (m *Memory) Broadcast(ctx context.Context, topic chat.Topic, ev chat.StreamEvent) error {
	if topic == "" {
		return fmt.Errorf("realtime: broadcast: %w", errEmptyTopic)
	}
	ev, err := m.eventCopy(ctx, ev)
	if err != nil {
		return fmt.Errorf("realtime: broadcast: %w", err)
	}
	m.deliver(nodeKey(topic), ev)
	return nil
}

// eventCopy is ev as it would come back from Redis: Data compacted into a
// buffer of its own, "null" when empty.
func (m *Memory) eventCopy(ctx context.Context, ev chat.StreamEvent) (chat.StreamEvent, error) {
	if err := m.check(ctx); err != nil {
		return ev, err
	}
	if len(ev.Data) == 0 {
		ev.Data = json.RawMessage("null")
		return ev, nil
	}
	var buf bytes.Buffer
	if err := json.Compact(&buf, ev.Data); err != nil {
		return ev, err
	}
	ev.Data = buf.Bytes()
	return ev, nil
}

// deliver hands ev to the subscriptions of key.
func (m *Memory) deliver(key string, ev chat.StreamEvent) {
	sh := m.subs.of(key)
	sh.mu.Lock()
	defer sh.mu.Unlock()
	for s := range sh.m[key] {
		s.deliver(ev)
	}
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
