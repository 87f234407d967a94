package realtime

// White-box tests of the in-memory adapter (package realtime, not
// realtime_test, so that they can look at its internal structures); the
// contract itself is checked by the same conformance suite as the Redis
// adapter's.

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"imd/chat"
	"imd/internal/testenv"
	"imd/realtime/realtimetest"
)

// Small so that the trimming and slow-subscriber tests are quick (as in redis_test.go).
const (
	memTestLogCap      = 300
	memTestEventBuffer = 8
)

func newTestMemory(t testing.TB, cfg Config) *Memory {
	t.Helper()
	m := NewMemory(cfg)
	t.Cleanup(func() { require.NoError(t, m.Close()) })
	return m
}

func TestMemoryConformance(t *testing.T) {
	realtimetest.Run(t, realtimetest.Harness{
		New: func(t *testing.T) chat.Realtime {
			return newTestMemory(t, Config{LogCap: memTestLogCap, EventBuffer: memTestEventBuffer})
		},
		// The embedded mode is single-node by design: "another node" can
		// only be the same process, so the peer is the instance itself (one
		// backing store, one bus; subscriptions are per Subscribe call
		// anyway). cmd/imd refuses to run several nodes without Redis.
		NewPeer: func(t *testing.T, rt chat.Realtime) chat.Realtime { return rt },
		LoseLogs: func(t *testing.T, rt chat.Realtime) {
			m, ok := rt.(*Memory)
			require.True(t, ok, "not an instance of this harness: %T", rt)
			m.loseAll()
		},
		LogCap:      memTestLogCap,
		EventBuffer: memTestEventBuffer,
	})
}

func memDelivery(uid, key string) chat.Delivery {
	return chat.Delivery{UserID: uid, Entry: &chat.LogEntry{Key: key, Type: chat.EventReceiptRead, Data: []byte(`{}`)}}
}

func memMessage(uid, cid string, seq int64) chat.Delivery {
	return chat.Delivery{UserID: uid, Entry: &chat.LogEntry{
		Key: fmt.Sprintf("m-%s-%d", cid, seq), Type: chat.EventMessageCreated, ConversationID: cid, Seq: seq,
		Data: fmt.Appendf(nil, `{"conversation_id":%q,"seq":%d}`, cid, seq),
	}}
}

func requireResyncReason(t *testing.T, err error, reason string) {
	t.Helper()
	var re *chat.ResyncError
	require.True(t, errors.As(err, &re), "want a *chat.ResyncError(%s), got %v", reason, err)
	require.Equal(t, reason, re.Reason)
}

// logCount is how many logs m holds.
func (m *Memory) logCount() int {
	n := 0
	for i := range m.logs.shards {
		sh := &m.logs.shards[i]
		sh.mu.RLock()
		n += len(sh.m)
		sh.mu.RUnlock()
	}
	return n
}

func shardLen[V any](s *memShards[V]) int {
	n := 0
	for i := range s.shards {
		sh := &s.shards[i]
		sh.mu.RLock()
		n += len(sh.m)
		sh.mu.RUnlock()
	}
	return n
}

// testClock is time.Now moved forward by the test.
type testClock struct{ off atomic.Int64 }

func (c *testClock) now() time.Time          { return time.Now().Add(time.Duration(c.off.Load())) }
func (c *testClock) advance(d time.Duration) { c.off.Add(int64(d)) }

// newClockedMemory returns a Memory on a test clock whose janitor sweeps
// every janitorEvery (of real time).
func newClockedMemory(t *testing.T, cfg Config, janitorEvery time.Duration) (*Memory, *testClock) {
	t.Helper()
	c := new(testClock)
	m := newMemory(cfg.withDefaults(), janitorEvery, c.now)
	t.Cleanup(func() { require.NoError(t, m.Close()) })
	return m, c
}

// A log without appends or Head for LogTTL is dropped by the janitor, with
// nobody touching it; the user's next log has a new epoch, and a stream
// resuming from the old one gets a resync.
func TestMemoryJanitorExpiresLogs(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	m, clock := newClockedMemory(t, Config{LogTTL: time.Hour}, 5*time.Millisecond)
	_, err := m.Append(ctx, []chat.Delivery{memDelivery("alice", "o1"), memDelivery("bob", "o1")})
	require.NoError(t, err)
	old, err := m.Head(ctx, "alice")
	require.NoError(t, err)
	require.EqualValues(t, 1, old.Offset)
	require.Equal(t, 2, m.logCount())

	clock.advance(time.Hour)
	testenv.Eventually(t, 5*time.Second, func() bool { return m.logCount() == 0 }, "the janitor drops expired logs")

	_, _, err = m.Read(ctx, "alice", old, 10)
	requireResyncReason(t, err, chat.ResyncEpoch)
	p, err := m.Head(ctx, "alice")
	require.NoError(t, err)
	require.NotEqual(t, old.Epoch, p.Epoch, "a new log, a new epoch")
	require.Zero(t, p.Offset)
	_, err = m.Append(ctx, []chat.Delivery{memDelivery("alice", "o1")})
	require.NoError(t, err)
	evs, _, err := m.Read(ctx, "alice", p, 10)
	require.NoError(t, err)
	require.Len(t, evs, 1, "the dedupe keys went with the old log")
}

// Expiry does not depend on the janitor: an expired log reads as lost at
// once, and the next append starts a new epoch.
func TestMemoryLazyExpiry(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	m, clock := newClockedMemory(t, Config{LogTTL: time.Hour}, 24*time.Hour) // the janitor never runs
	_, err := m.Append(ctx, []chat.Delivery{memMessage("alice", "c1", 1)})
	require.NoError(t, err)
	old, err := m.Head(ctx, "alice")
	require.NoError(t, err)

	clock.advance(time.Hour - time.Second)
	_, _, err = m.Read(ctx, "alice", old, 10)
	require.NoError(t, err, "not expired yet")
	clock.advance(time.Second)
	_, _, err = m.Read(ctx, "alice", old, 10)
	requireResyncReason(t, err, chat.ResyncEpoch)

	gaps, err := m.Append(ctx, []chat.Delivery{memMessage("alice", "c1", 1)})
	require.NoError(t, err)
	require.Empty(t, gaps, "the conversation state went with the log")
	p, err := m.Head(ctx, "alice")
	require.NoError(t, err)
	require.NotEqual(t, old.Epoch, p.Epoch)
	require.EqualValues(t, 1, p.Offset)
}

// Appends and Head keep a log alive (a log someone streams from is in
// use); reads and duplicates do not.
func TestMemoryLogLife(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	const ttl = time.Hour
	m, clock := newClockedMemory(t, Config{LogTTL: ttl}, 24*time.Hour)
	first, err := m.Head(ctx, "alice")
	require.NoError(t, err)
	for range 5 {
		clock.advance(ttl / 2)
		p, err := m.Head(ctx, "alice")
		require.NoError(t, err)
		require.Equal(t, first, p, "the log lives while Head is called")
	}
	for range 5 { // the first appends, the others are duplicates
		clock.advance(ttl / 10)
		_, err := m.Append(ctx, []chat.Delivery{memDelivery("alice", "o1")})
		require.NoError(t, err)
	}
	clock.advance(ttl / 2)
	_, _, err = m.Read(ctx, "alice", first, 10)
	require.NoError(t, err, "the first append extended the log, and reading does not end it")
	clock.advance(ttl / 10)
	_, _, err = m.Read(ctx, "alice", first, 10)
	requireResyncReason(t, err, chat.ResyncEpoch)
}

// Appending ten times LogCap entries leaves at most LogCap of everything
// per user, and the janitor leaves nothing of users who went away.
func TestMemoryBounded(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	const logCap = 200
	m := newTestMemory(t, Config{LogCap: logCap})
	for round := range 10 {
		var ds []chat.Delivery
		for i := range logCap {
			n := round*logCap + i + 1
			if i%2 == 0 {
				ds = append(ds, memDelivery("alice", fmt.Sprintf("o%d", n)))
			} else {
				ds = append(ds, memMessage("alice", "c1", int64(n/2)))
			}
		}
		gaps, err := m.Append(ctx, ds)
		require.NoError(t, err)
		require.Empty(t, gaps)
	}
	l := m.lockLog("alice", false)
	require.NotNil(t, l)
	require.EqualValues(t, 10*logCap, l.head)
	require.Equal(t, logCap, len(l.ring))
	require.LessOrEqual(t, cap(l.ring), logCap, "the ring never grows past LogCap")
	require.LessOrEqual(t, len(l.keys), logCap)
	require.Len(t, l.keys, logCap/2, "dedupe keys of retained entries only")
	for k, off := range l.keys {
		require.Greater(t, off, l.head-logCap, "key %s of a trimmed entry", k)
	}
	require.Len(t, l.conv, 1)
	epoch := l.epoch
	l.mu.Unlock()

	// Retained keys dedupe; a trimmed one is appended again, as in Redis.
	head, err := m.Head(ctx, "alice")
	require.NoError(t, err)
	_, err = m.Append(ctx, []chat.Delivery{memDelivery("alice", fmt.Sprintf("o%d", 10*logCap-1))})
	require.NoError(t, err)
	p, err := m.Head(ctx, "alice")
	require.NoError(t, err)
	require.Equal(t, head, p, "a retained key dedupes")
	_, err = m.Append(ctx, []chat.Delivery{memDelivery("alice", "o1")})
	require.NoError(t, err)
	p, err = m.Head(ctx, "alice")
	require.NoError(t, err)
	require.Equal(t, head.Offset+1, p.Offset, "a trimmed key does not")
	_, _, err = m.Read(ctx, "alice", chat.Position{Epoch: epoch, Offset: p.Offset - logCap - 1}, 1)
	requireResyncReason(t, err, chat.ResyncExpired)
	evs, _, err := m.Read(ctx, "alice", chat.Position{Epoch: epoch, Offset: p.Offset - logCap}, 1000)
	require.NoError(t, err)
	require.Len(t, evs, logCap)

	// Everything else expires and is swept.
	_, err = m.Connect(ctx, "alice", "conn1", time.Second)
	require.NoError(t, err)
	_, err = m.Connect(ctx, "bob", "conn1", time.Second)
	require.NoError(t, err)
	_, err = m.Disconnect(ctx, "bob", "conn1")
	require.NoError(t, err)
	_, _, err = m.Allow(ctx, "send:alice", chat.Limit{Rate: 1, Period: time.Second, Burst: 5}, 3)
	require.NoError(t, err)
	require.NoError(t, m.FillMembers(ctx, "c1", "0", []string{"alice"}))
	require.NoError(t, m.InvalidateMembers(ctx, "c2"))
	require.NoError(t, m.FillSessions(ctx, "alice", []chat.Activity{{ConversationID: "c1", At: time.Now()}}))

	m.sweep(time.Now().Add(time.Minute))
	require.Equal(t, 1, m.logCount(), "alice's log lives for LogTTL")
	require.Equal(t, 1, shardLen(&m.presence), "bob's last-seen time stays, alice's expired stream does not")
	require.Zero(t, shardLen(&m.rates), "a bucket that is full again is dropped")
	require.Equal(t, 2, shardLen(&m.members), "the member set for membersTTL, the version for memberVersionTTL")
	require.Equal(t, 1, shardLen(&m.sessions))

	m.sweep(time.Now().Add(2 * time.Hour))
	require.Equal(t, 1, shardLen(&m.members), "the member set expired")
	_, ok, _, err := realtimetest.CachedOne(ctx, m, "c2")
	require.NoError(t, err)
	require.False(t, ok)

	m.sweep(time.Now().Add(DefaultLogTTL + time.Hour))
	require.Zero(t, m.logCount())
	require.Zero(t, shardLen(&m.members))
	require.Zero(t, shardLen(&m.sessions))
	info, err := m.Lookup(ctx, []string{"bob"})
	require.NoError(t, err)
	require.NotNil(t, info[0].LastSeenAt, "last seen never expires")
}

// Many goroutines append (the same messages twice over, as racing
// dispatchers do), read, subscribe, publish and sweep at once; every
// reader sees every conversation's messages exactly once and in order.
// Meaningful under -race.
func TestMemoryConcurrency(t *testing.T) {
	t.Parallel()
	const (
		users = 8
		convs = 4
		msgs  = 150
	)
	m := newTestMemory(t, Config{LogCap: convs*msgs + 100, EventBuffer: 4})
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	uid := func(u int) string { return fmt.Sprintf("u%d", u) }

	var wg sync.WaitGroup
	errs := make(chan error, 100)
	fail := func(err error) {
		select {
		case errs <- err:
		default:
		}
	}

	// Readers: one stream per user, reading on every wake-up.
	got := make([][]int64, users) // per user, the last seq seen per conversation
	var readersReady sync.WaitGroup
	for u := range users {
		got[u] = make([]int64, convs)
		readersReady.Add(1)
		wg.Add(1)
		go func() {
			defer wg.Done()
			s, err := m.Subscribe(ctx, uid(u))
			if err != nil {
				readersReady.Done()
				fail(err)
				return
			}
			defer s.Close()
			pos, err := m.Head(ctx, uid(u))
			readersReady.Done()
			if err != nil {
				fail(err)
				return
			}
			total := 0
			events := s.Events()
			for total < convs*msgs {
				select {
				case <-ctx.Done():
					fail(fmt.Errorf("%s: read %d of %d", uid(u), total, convs*msgs))
					return
				case <-s.Wake():
				case _, ok := <-events: // ephemeral noise: ignore
					if !ok { // closed as slow: no more noise
						events = nil
					}
				}
				evs, next, err := m.Read(ctx, uid(u), pos, 37)
				if err != nil {
					fail(fmt.Errorf("%s: read: %w", uid(u), err))
					return
				}
				for _, ev := range evs {
					var d struct {
						ConversationID string `json:"conversation_id"`
						Seq            int64  `json:"seq"`
					}
					if err := json.Unmarshal(ev.Data, &d); err != nil {
						fail(err)
						return
					}
					var c int
					_, _ = fmt.Sscanf(d.ConversationID, "c%d", &c)
					if d.Seq != got[u][c]+1 {
						fail(fmt.Errorf("%s: %s seq %d after %d", uid(u), d.ConversationID, d.Seq, got[u][c]))
						return
					}
					got[u][c] = d.Seq
					total++
				}
				if len(evs) > 0 {
					pos = next
					select { // more may be there already: read again
					case s.(*memSub).wake <- struct{}{}:
					default:
					}
				}
			}
		}()
	}
	readersReady.Wait()

	// Two dispatchers per conversation fan every message out to all users.
	for c := range convs {
		for range 2 {
			wg.Add(1)
			go func() {
				defer wg.Done()
				cid := fmt.Sprintf("c%d", c)
				for seq := int64(1); seq <= msgs; seq++ {
					ds := make([]chat.Delivery, users)
					for u := range users {
						ds[u] = memMessage(uid(u), cid, seq)
					}
					gaps, err := m.Append(ctx, ds)
					if err == nil && len(gaps) > 0 {
						err = fmt.Errorf("%s seq %d: gaps %v", cid, seq, gaps)
					}
					if err != nil {
						fail(err)
						return
					}
				}
			}()
		}
	}

	// Noise on everything else, until the readers are done.
	var stop atomic.Bool
	var noise sync.WaitGroup
	for g := range 4 {
		noise.Add(1)
		go func() {
			defer noise.Done()
			for i := 0; !stop.Load(); i++ {
				u := uid((g + i) % users)
				s, err := m.Subscribe(ctx, u)
				if err != nil {
					fail(err)
					return
				}
				_ = m.Publish(ctx, []string{u, uid(i % users)}, chat.StreamEvent{Type: chat.EventTyping, Data: []byte(`{"n":1}`)})
				conn := fmt.Sprintf("g%d-%d", g, i)
				_, _ = m.Connect(ctx, u, conn, time.Minute)
				_, _ = m.Lookup(ctx, []string{u, "nobody"})
				_, _ = m.Disconnect(ctx, u, conn)
				_ = m.TouchSessions(ctx, []string{u}, "c1", time.Now())
				if i%10 == 0 {
					_ = m.FillSessions(ctx, u, []chat.Activity{{ConversationID: "c2", At: time.Now()}})
					_ = m.InvalidateMembers(ctx, "c1")
					m.sweep(time.Now())
				}
				_, _, _, _ = realtimetest.CachedOne(ctx, m, "c1")
				_, _, _ = m.Allow(ctx, u, chat.Limit{Rate: 100, Period: time.Second, Burst: 10}, 1)
				_, _, _ = m.SessionPage(ctx, u, nil, 10)
				s.Close()
			}
		}()
	}

	wg.Wait()
	stop.Store(true)
	noise.Wait()
	close(errs)
	for err := range errs {
		require.NoError(t, err)
	}
	for u := range users {
		for c := range convs {
			require.EqualValues(t, msgs, got[u][c], "%s c%d", uid(u), c)
		}
	}
}

// Close ends every subscription with ErrClosed and every later call fails;
// a slow subscriber's Err says why its Events closed (a control event did
// not fit: typing that does not fit is dropped instead).
func TestMemoryClose(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	m := NewMemory(Config{EventBuffer: 1})
	slow, err := m.Subscribe(ctx, "alice")
	require.NoError(t, err)
	open, err := m.Subscribe(ctx, "bob")
	require.NoError(t, err)
	node, err := m.Listen(ctx, chat.TopicTokens)
	require.NoError(t, err)
	for range 2 {
		require.NoError(t, m.Publish(ctx, []string{"alice"}, chat.StreamEvent{Type: chat.EventTyping}))
	}
	require.NoError(t, slow.(*memSub).Err(), "typing beyond the buffer is dropped")
	require.NoError(t, m.Publish(ctx, []string{"alice"}, chat.StreamEvent{Type: "_control"}))
	ev, ok := <-slow.Events()
	require.True(t, ok)
	require.Equal(t, chat.EventTyping, ev.Type)
	require.JSONEq(t, "null", string(ev.Data), "empty data travels as null")
	_, ok = <-slow.Events()
	require.False(t, ok)
	require.ErrorIs(t, slow.(*memSub).Err(), ErrSlowSubscriber)
	require.Error(t, m.Publish(ctx, []string{"alice"}, chat.StreamEvent{Type: chat.EventTyping, Data: []byte(`{`)}),
		"data must be JSON, as with Redis")

	require.NoError(t, m.Close())
	require.NoError(t, m.Close(), "idempotent")
	_, ok = <-open.Events()
	require.False(t, ok)
	require.ErrorIs(t, open.(*memSub).Err(), ErrClosed)
	_, ok = <-node.Events()
	require.False(t, ok)
	require.ErrorIs(t, node.(*memSub).Err(), ErrClosed)
	node.Close()
	open.Close()
	slow.Close()
	_, err = m.Subscribe(ctx, "alice")
	require.ErrorIs(t, err, ErrClosed)
	_, err = m.Listen(ctx, chat.TopicTokens)
	require.ErrorIs(t, err, ErrClosed)
	require.ErrorIs(t, m.Broadcast(ctx, chat.TopicTokens, chat.StreamEvent{Type: "_control"}), ErrClosed)
	require.ErrorIs(t, m.Ping(ctx), ErrClosed)
	_, err = m.Append(ctx, []chat.Delivery{memDelivery("alice", "o1")})
	require.ErrorIs(t, err, ErrClosed)
}

// A topic's Listen-ers are kept in m.subs under a key no user id has:
// Subscribe refuses the empty id and ids starting with a NUL byte, and
// appending to such an id wakes no Listen-er.
func TestMemoryTopicKeys(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	m := newTestMemory(t, Config{})
	node, err := m.Listen(ctx, chat.TopicTokens)
	require.NoError(t, err)
	defer node.Close()
	for _, uid := range []string{"", "\x00", "\x00tokens", "\x00x"} {
		_, err := m.Subscribe(ctx, uid)
		require.Error(t, err, "Subscribe(%q)", uid)
	}
	_, err = m.Append(ctx, []chat.Delivery{memDelivery("\x00tokens", "o1")})
	require.NoError(t, err)
	select {
	case <-node.Wake():
		t.Fatal("an append woke a Listen-er")
	default:
	}
}

// BenchmarkMemoryAppend is the fan-out benchmark against the in-memory adapter.
func BenchmarkMemoryAppend(b *testing.B) {
	realtimetest.BenchAppend(b, func(b *testing.B) chat.Realtime { return newTestMemory(b, Config{}) })
}
