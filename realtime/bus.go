package realtime

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/redis/go-redis/v9"

	"imd/chat"
)

// Pub/Sub timing. The receiver is the only reader of the node's one PubSub
// connection (go-redis' PubSub.Channel() buffers and then drops messages,
// DESIGN.md §7, so it is not used).
const (
	// subscribeAckTimeout bounds how long Subscribe waits for Redis to
	// confirm a new channel. Normally that is one round trip; the bound only
	// matters when Redis is down or stalled, and then the wake-all after the
	// reconnect covers whatever was published before the subscription took.
	subscribeAckTimeout = time.Second
	// pubsubCommandTimeout bounds SUBSCRIBE/UNSUBSCRIBE/PING writes, which
	// may have to dial first.
	pubsubCommandTimeout = time.Second
	// pubsubHealthInterval: after that long without any message the receiver
	// pings, and if another interval passes without even the pong, the
	// connection is taken as dead (a half-open TCP connection never reports
	// an error) and replaced. Idle cost: one PING per node per interval.
	pubsubHealthInterval = 5 * time.Second
	// The receiver retries a lost connection after a backoff growing from
	// the minimum to the maximum, so a down Redis is not hammered.
	pubsubMinBackoff = 50 * time.Millisecond
	pubsubMaxBackoff = time.Second
)

// ErrSlowSubscriber is the Err of a subscription whose Events channel was
// closed because its buffer was full when a control event (one that is not
// chat.EventType.Droppable) arrived: the stream should end, and the client
// resumes from its log.
var ErrSlowSubscriber = errors.New("realtime: subscriber too slow, events dropped")

// ErrClosed is returned by Subscribe after Close, and is the Err of the
// subscriptions Close ended.
var ErrClosed = errors.New("realtime: closed")

// bus is the node's Pub/Sub side: one PubSub connection, one receiver
// goroutine, and a registry of local subscriptions per channel.
type bus struct {
	r      *Redis
	health time.Duration // pubsubHealthInterval, shorter in tests

	// psMu serializes what is written to the PubSub connection together
	// with the decision to write it, so that a channel's SUBSCRIBE and
	// UNSUBSCRIBE reach Redis in the order the registry decided them.
	// Lock order: psMu before mu.
	psMu sync.Mutex
	ps   *redis.PubSub // replaced only by the receiver, under psMu

	mu       sync.Mutex
	channels map[string]*channelState
	pongs    map[string]chan struct{} // ping token → closed when its pong arrives
	pingSeq  uint64
	closed   bool

	cancel context.CancelFunc
	done   chan struct{}
}

type channelState struct {
	subs       map[*subscription]struct{}
	subscribed bool          // SUBSCRIBE sent (or recorded for the reconnect) and no UNSUBSCRIBE since
	ready      chan struct{} // closed once Redis confirmed the SUBSCRIBE (or it is moot)
}

func newBus(r *Redis, health time.Duration) *bus {
	ctx, cancel := context.WithCancel(context.Background())
	b := &bus{
		r:        r,
		health:   health,
		ps:       r.rdb.Subscribe(ctx), // no channel yet: connects on first use
		channels: make(map[string]*channelState),
		pongs:    make(map[string]chan struct{}),
		cancel:   cancel,
		done:     make(chan struct{}),
	}
	go b.receive(ctx)
	return b
}

// subscription is one stream's view of its user's channel, or a
// Listen-er's view of its topic's node channel.
type subscription struct {
	b       *bus
	channel string
	wake    chan struct{}
	events  chan chat.StreamEvent

	// guarded by b.mu
	closed       bool
	eventsClosed bool
	err          error
	// pushed holds the log entries wake-ups carried since the stream last
	// took them (pushBuffer at most); pushLost says some may be missing (the
	// buffer overflowed, or the connection was lost), so the log must be read.
	pushed   []pushBatch
	pushLen  int
	pushLost bool
}

// pushBatch is the entries of one append, as its wake-up carried them:
// consecutive offsets of one epoch, shared by every subscription of the user.
// A summary carries no events but count messages of conv ending at lastSeq.
type pushBatch struct {
	epoch  string
	first  int64
	events []chat.StreamEvent

	count   int64
	conv    string
	lastSeq int64
}

// len is the number of entries the batch stands for.
func (pb *pushBatch) len() int64 {
	if pb.events == nil {
		return pb.count
	}
	return int64(len(pb.events))
}

// pushBuffer bounds the pushed events a subscription holds (several
// dispatcher rounds), each round counting one more (a summary carries no
// events); past it the stream reads its log instead.
const pushBuffer = 512

// Since implements chat.Subscription: the pushed events after pos, when
// they continue pos without a hole.
func (s *subscription) Since(pos chat.Position, have func(cid string, lastSeq int64) bool) ([]chat.StreamEvent, chat.Position, bool) {
	s.b.mu.Lock()
	batches, lost := s.pushed, s.pushLost
	s.pushed, s.pushLen, s.pushLost = nil, 0, false
	s.b.mu.Unlock()
	if lost || len(batches) == 0 {
		return nil, pos, false
	}
	var evs []chat.StreamEvent
	next := pos
	for _, pb := range batches {
		if pb.epoch != pos.Epoch {
			return nil, pos, false
		}
		last := pb.first + pb.len() - 1
		if last <= next.Offset {
			continue // read from the log already
		}
		if pb.first > next.Offset+1 {
			return nil, pos, false // a hole: an entry the pushes do not have
		}
		if pb.events == nil {
			// A summary: passed over only whole, and only if the stream has
			// those messages.
			if pb.first != next.Offset+1 || have == nil || !have(pb.conv, pb.lastSeq) {
				return nil, pos, false
			}
		} else {
			evs = append(evs, pb.events[next.Offset+1-pb.first:]...)
		}
		next.Offset = last
	}
	return evs, next, true
}

func (s *subscription) Wake() <-chan struct{}           { return s.wake }
func (s *subscription) Events() <-chan chat.StreamEvent { return s.events }

// Err says why Events was closed: ErrSlowSubscriber, ErrClosed, or nil
// (the subscription was closed by its owner, or Events is still open).
func (s *subscription) Err() error {
	s.b.mu.Lock()
	defer s.b.mu.Unlock()
	return s.err
}

// Close ends the subscription and closes its Events channel; the last local
// subscription of a user unsubscribes the node from the user's channel.
func (s *subscription) Close() {
	b := s.b
	b.mu.Lock()
	if s.closed {
		b.mu.Unlock()
		return
	}
	s.closed = true
	s.closeEvents(nil)
	empty := false
	if st := b.channels[s.channel]; st != nil {
		delete(st.subs, s)
		empty = len(st.subs) == 0
	}
	b.mu.Unlock()
	if empty {
		b.unsubscribeIfUnused(s.channel)
	}
}

// closeEvents closes Events once; b.mu must be held.
func (s *subscription) closeEvents(err error) {
	if s.eventsClosed {
		return
	}
	s.eventsClosed = true
	s.err = err
	close(s.events)
}

// Subscribe implements chat.Bus. When this is the node's first subscription
// for uid it waits (up to subscribeAckTimeout) until Redis has confirmed the
// SUBSCRIBE, so that anything published after Subscribe returns reaches it.
// With Redis down it still returns a working subscription: the receiver
// subscribes it when Redis is back and then wakes it.
func (r *Redis) Subscribe(ctx context.Context, uid string) (chat.Subscription, error) {
	s, err := r.subscribe(ctx, r.userChannel(uid))
	if err != nil {
		return nil, err
	}
	return s, nil
}

// nodeChannel is the Pub/Sub channel <prefix>node:<topic> that carries the
// node-level events of one topic (Broadcast) to every node; one channel per
// topic, so that a busy topic never fills the buffer of another's Listen-ers
// (chat.Topic). It is not a user:{uid} channel, so no Publish reaches it and
// no stream hears it.
func (r *Redis) nodeChannel(topic chat.Topic) string {
	return r.cfg.Prefix + "node:" + string(topic)
}

// errEmptyTopic is returned by Broadcast and Listen for the empty topic.
var errEmptyTopic = errors.New("empty topic")

// Listen implements chat.Bus: a subscription to topic's node channel, on
// the node's one PubSub connection like every user channel, with the same
// acknowledgement wait, wake-up after a reconnect and overflow rules.
func (r *Redis) Listen(ctx context.Context, topic chat.Topic) (chat.NodeSubscription, error) {
	if topic == "" {
		return nil, fmt.Errorf("realtime: listen: %w", errEmptyTopic)
	}
	s, err := r.subscribe(ctx, r.nodeChannel(topic))
	if err != nil {
		return nil, err
	}
	return s, nil
}

// Broadcast implements chat.Bus: the event goes, as JSON, to topic's node
// channel. Nothing is stored: a node that misses it, misses it.
func (r *Redis) Broadcast(ctx context.Context, topic chat.Topic, ev chat.StreamEvent) error {
	if topic == "" {
		return fmt.Errorf("realtime: broadcast: %w", errEmptyTopic)
	}
	payload, err := eventPayload(ev)
	if err == nil {
		err = r.rdb.Publish(ctx, r.nodeChannel(topic), payload).Err()
	}
	if err != nil {
		return fmt.Errorf("realtime: broadcast: %w", err)
	}
	return nil
}

// subscribe registers a local subscription to channel (Subscribe, Listen).
func (r *Redis) subscribe(ctx context.Context, channel string) (*subscription, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	b := r.bus
	s := &subscription{
		b:       b,
		channel: channel,
		wake:    make(chan struct{}, 1),
		events:  make(chan chat.StreamEvent, r.cfg.EventBuffer),
	}
	b.mu.Lock()
	if b.closed {
		b.mu.Unlock()
		return nil, ErrClosed
	}
	st := b.channels[s.channel]
	if st == nil {
		st = &channelState{subs: make(map[*subscription]struct{})}
		b.channels[s.channel] = st
	}
	st.subs[s] = struct{}{}
	b.mu.Unlock()

	if ready := b.subscribeIfNeeded(ctx, s.channel); ready != nil {
		t := time.NewTimer(subscribeAckTimeout)
		select {
		case <-ready:
		case <-t.C:
		case <-ctx.Done():
		}
		t.Stop()
	}
	return s, nil
}

// subscribeIfNeeded sends SUBSCRIBE for channel unless already sent, then a
// PING whose pong proves Redis processed it. It returns the channel's ready
// signal, nil when there is nothing to wait for.
func (b *bus) subscribeIfNeeded(ctx context.Context, channel string) <-chan struct{} {
	b.psMu.Lock()
	defer b.psMu.Unlock()
	b.mu.Lock()
	st := b.channels[channel]
	if st == nil || len(st.subs) == 0 || b.closed {
		b.mu.Unlock()
		return nil
	}
	if st.subscribed {
		b.mu.Unlock()
		return st.ready
	}
	st.subscribed = true
	ready := make(chan struct{})
	st.ready = ready
	b.pingSeq++
	token := "sub:" + strconv.FormatUint(b.pingSeq, 10)
	b.pongs[token] = ready
	b.mu.Unlock()

	cctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), pubsubCommandTimeout)
	defer cancel()
	// go-redis records the channel even when the write fails, and
	// re-subscribes it on the next connection.
	err := b.ps.Subscribe(cctx, channel)
	if err == nil {
		err = b.ps.Ping(cctx, token)
	}
	if err != nil { // Redis is unreachable: don't wait for a pong that won't come
		b.mu.Lock()
		b.releasePong(token)
		b.mu.Unlock()
	}
	return ready
}

// releasePong closes a pending ping's channel once; b.mu must be held.
func (b *bus) releasePong(token string) {
	if ch, ok := b.pongs[token]; ok {
		delete(b.pongs, token)
		close(ch)
	}
}

func (b *bus) unsubscribeIfUnused(channel string) {
	b.psMu.Lock()
	defer b.psMu.Unlock()
	b.mu.Lock()
	st := b.channels[channel]
	unsub := false
	if st != nil && len(st.subs) == 0 {
		unsub = st.subscribed && !b.closed
		delete(b.channels, channel)
	}
	b.mu.Unlock()
	if unsub {
		ctx, cancel := context.WithTimeout(context.Background(), pubsubCommandTimeout)
		defer cancel()
		_ = b.ps.Unsubscribe(ctx, channel) // forgotten by go-redis even if the write fails
	}
}

// Publish implements chat.Bus: the event goes, as JSON, to each user's
// channel in one pipeline. Nothing is stored: a node that misses it, misses it.
func (r *Redis) Publish(ctx context.Context, uids []string, ev chat.StreamEvent) error {
	if len(uids) == 0 {
		return nil
	}
	payload, err := eventPayload(ev)
	if err != nil {
		return fmt.Errorf("realtime: publish: %w", err)
	}
	pipe := r.rdb.Pipeline()
	for _, uid := range uids {
		pipe.Publish(ctx, r.userChannel(uid), payload)
	}
	if _, err := pipe.Exec(ctx); err != nil {
		return fmt.Errorf("realtime: publish: %w", err)
	}
	return nil
}

// eventPayload is ev as a message on a channel: JSON, Data "null" when empty.
func eventPayload(ev chat.StreamEvent) ([]byte, error) {
	if len(ev.Data) == 0 {
		ev.Data = json.RawMessage("null")
	}
	return json.Marshal(ev)
}

// receive is the node's one reader of the PubSub connection. After any
// receive error it treats the connection as lost: when it next receives
// anything (the re-subscription replies, or a pong), every local
// subscription is woken, because whatever was published in between is gone
// and the streams must re-read their logs.
func (b *bus) receive(ctx context.Context) {
	defer close(b.done)
	lost := false
	pingPending := false
	backoff := pubsubMinBackoff
	for {
		msg, err := b.ps.ReceiveTimeout(ctx, b.health)
		if ctx.Err() != nil {
			return
		}
		if err != nil {
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() {
				if pingPending {
					b.replaceConnection(ctx)
					lost, pingPending = true, false
				} else {
					pingPending = b.ping(ctx) == nil
				}
				continue
			}
			lost, pingPending = true, false
			b.releasePongs()
			t := time.NewTimer(backoff)
			select {
			case <-t.C:
			case <-ctx.Done():
				t.Stop()
				return
			}
			backoff = min(2*backoff, pubsubMaxBackoff)
			continue
		}
		backoff = pubsubMinBackoff
		pingPending = false
		if lost {
			lost = false
			b.wakeAll()
		}
		switch m := msg.(type) {
		case *redis.Message:
			b.dispatch(m)
		case *redis.Pong:
			b.mu.Lock()
			b.releasePong(m.Payload)
			b.mu.Unlock()
		}
	}
}

// ping sends a health-check PING on the PubSub connection.
func (b *bus) ping(ctx context.Context) error {
	b.psMu.Lock()
	defer b.psMu.Unlock()
	cctx, cancel := context.WithTimeout(ctx, pubsubCommandTimeout)
	defer cancel()
	return b.ps.Ping(cctx, "health")
}

// replaceConnection drops a PubSub connection that stopped answering and
// opens a new one with the same channels.
func (b *bus) replaceConnection(ctx context.Context) {
	b.psMu.Lock()
	if ctx.Err() != nil { // closing: close() will close b.ps
		b.psMu.Unlock()
		return
	}
	old := b.ps
	b.mu.Lock()
	var chans []string
	for ch, st := range b.channels {
		if st.subscribed {
			chans = append(chans, ch)
		}
	}
	b.mu.Unlock()
	cctx, cancel := context.WithTimeout(ctx, pubsubCommandTimeout)
	b.ps = b.r.rdb.Subscribe(cctx, chans...) // records chans even if Redis is unreachable
	cancel()
	b.psMu.Unlock()
	_ = old.Close()
	b.releasePongs()
}

// releasePongs lets every Subscribe waiting for an acknowledgement go: the
// connection it was sent on is gone, and the wake-all after the reconnect
// covers its channel.
func (b *bus) releasePongs() {
	b.mu.Lock()
	defer b.mu.Unlock()
	for token := range b.pongs {
		b.releasePong(token)
	}
}

// dispatch hands one message to the local subscriptions of its channel.
func (b *bus) dispatch(m *redis.Message) {
	var ev chat.StreamEvent
	var push *pushBatch
	wake := m.Payload == ""
	if strings.HasPrefix(m.Payload, "L ") {
		wake = true
		if pb, err := parsePush(m.Payload); err == nil {
			push = &pb
		}
	} else if strings.HasPrefix(m.Payload, "S ") {
		wake = true
		if pb, err := parseSummary(m.Payload); err == nil {
			push = &pb
		}
	} else if !wake && json.Unmarshal([]byte(m.Payload), &ev) != nil {
		wake = true // not ours to interpret; a wake-up is always safe
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	st := b.channels[m.Channel]
	if st == nil {
		return
	}
	for s := range st.subs {
		if wake {
			switch {
			case push == nil:
				s.pushLost = true // an empty wake-up: only the log has it all
			case s.pushLen+len(push.events)+1 > pushBuffer:
				s.pushed, s.pushLen, s.pushLost = nil, 0, true
			case !s.pushLost:
				s.pushed = append(s.pushed, *push)
				s.pushLen += len(push.events) + 1
			}
			select {
			case s.wake <- struct{}{}:
			default: // a wake-up is pending already: they coalesce
			}
			continue
		}
		s.deliver(ev)
	}
}

// deliver hands an event to s's Events; b.mu must be held.
func (s *subscription) deliver(ev chat.StreamEvent) {
	if !s.eventsClosed && !offer(s.events, ev) {
		s.closeEvents(ErrSlowSubscriber)
	}
}

// offer is the overflow rule of both buses' Events channels: ev goes in if
// there is room; if not, a droppable event (typing, presence) is dropped,
// and offer reports false for any other, whose subscription must then end
// with ErrSlowSubscriber: a control event is never lost silently.
func offer(events chan<- chat.StreamEvent, ev chat.StreamEvent) bool {
	select {
	case events <- ev:
		return true
	default:
		return ev.Type.Droppable()
	}
}

func (b *bus) wakeAll() {
	b.mu.Lock()
	defer b.mu.Unlock()
	for _, st := range b.channels {
		for s := range st.subs {
			s.pushed, s.pushLen, s.pushLost = nil, 0, true
			select {
			case s.wake <- struct{}{}:
			default:
			}
		}
	}
}

// close stops the receiver and ends every subscription.
func (b *bus) close() {
	b.mu.Lock()
	if b.closed {
		b.mu.Unlock()
		return
	}
	b.closed = true
	for _, st := range b.channels {
		for s := range st.subs {
			s.closeEvents(ErrClosed)
		}
	}
	for token := range b.pongs {
		b.releasePong(token)
	}
	b.mu.Unlock()
	b.cancel()
	b.psMu.Lock()
	_ = b.ps.Close()
	b.psMu.Unlock()
	<-b.done
}

var errBadPush = errors.New("realtime: malformed pushed entries")

// parseSummary parses a wake-up that sums up its entries as messages of one
// conversation: "S <epoch> <offset of the first> <count> <last seq>
// <conversation id>" (appendScript).
func parseSummary(payload string) (pushBatch, error) {
	f := strings.SplitN(payload, " ", 6)
	if len(f) != 6 || f[1] == "" || f[5] == "" {
		return pushBatch{}, errBadPush
	}
	first, err1 := strconv.ParseInt(f[2], 10, 64)
	count, err2 := strconv.ParseInt(f[3], 10, 64)
	last, err3 := strconv.ParseInt(f[4], 10, 64)
	if err1 != nil || err2 != nil || err3 != nil || first < 1 || count < 1 || last < count {
		return pushBatch{}, errBadPush
	}
	return pushBatch{epoch: f[1], first: first, count: count, conv: f[5], lastSeq: last}, nil
}

// parsePush parses a wake-up that carries entries: "L <epoch> <offset of
// the first> " then each entry as "<length>:<type> <data>" (appendScript).
func parsePush(payload string) (pushBatch, error) {
	rest := payload[len("L "):]
	epoch, rest, ok := strings.Cut(rest, " ")
	if !ok || epoch == "" {
		return pushBatch{}, errBadPush
	}
	fs, rest, ok := strings.Cut(rest, " ")
	first, err := strconv.ParseInt(fs, 10, 64)
	if !ok || err != nil || first < 1 {
		return pushBatch{}, errBadPush
	}
	pb := pushBatch{epoch: epoch, first: first}
	for rest != "" {
		ls, after, ok := strings.Cut(rest, ":")
		n, err := strconv.Atoi(ls)
		if !ok || err != nil || n < 0 || n > len(after) {
			return pushBatch{}, errBadPush
		}
		typ, data, err := parseEntry(after[:n])
		if err != nil {
			return pushBatch{}, errBadPush
		}
		id := chat.Position{Epoch: epoch, Offset: first + int64(len(pb.events))}.String()
		pb.events = append(pb.events, chat.StreamEvent{ID: id, Type: chat.EventType(typ), Data: []byte(data)})
		rest = after[n:]
	}
	if len(pb.events) == 0 {
		return pushBatch{}, errBadPush
	}
	return pb, nil
}
