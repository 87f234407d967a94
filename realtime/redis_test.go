package realtime_test

import (
	"context"
	"errors"
	"fmt"
	"net"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"
	"github.com/stretchr/testify/require"

	"imd/chat"
	"imd/internal/testenv"
	"imd/realtime"
	"imd/realtime/realtimetest"
)

// Small so that the trimming and slow-subscriber tests are quick.
const (
	testLogCap      = 300
	testEventBuffer = 8
)

// prefixes remembers the key prefix of each instance, for NewPeer and LoseLogs.
var prefixes sync.Map // chat.Realtime → string

func openRedis(t testing.TB, url, prefix string) *realtime.Redis {
	t.Helper()
	rt, err := realtime.Open(context.Background(), url, realtime.Config{
		Prefix: prefix, LogCap: testLogCap, EventBuffer: testEventBuffer,
	})
	require.NoError(t, err)
	t.Cleanup(func() { require.NoError(t, rt.Close()) })
	prefixes.Store(chat.Realtime(rt), prefix)
	return rt
}

func adminClient(t testing.TB) *redis.Client {
	t.Helper()
	opts, err := redis.ParseURL(testenv.RedisURL(t))
	require.NoError(t, err)
	c := redis.NewClient(opts)
	t.Cleanup(func() { _ = c.Close() })
	return c
}

// deleteKeys deletes every key starting with prefix.
func deleteKeys(t testing.TB, c *redis.Client, prefix string) {
	t.Helper()
	ctx := context.Background()
	iter := c.Scan(ctx, 0, prefix+"*", 500).Iterator()
	for iter.Next(ctx) {
		require.NoError(t, c.Unlink(ctx, iter.Val()).Err())
	}
	require.NoError(t, iter.Err())
}

func prefixOf(t *testing.T, rt chat.Realtime) string {
	p, ok := prefixes.Load(rt)
	require.True(t, ok, "not an instance of this harness")
	return p.(string)
}

func TestConformance(t *testing.T) {
	realtimetest.Run(t, realtimetest.Harness{
		New: func(t *testing.T) chat.Realtime {
			return openRedis(t, testenv.RedisURL(t), testenv.KeyPrefix(t))
		},
		NewPeer: func(t *testing.T, rt chat.Realtime) chat.Realtime {
			return openRedis(t, testenv.RedisURL(t), prefixOf(t, rt))
		},
		LoseLogs: func(t *testing.T, rt chat.Realtime) {
			deleteKeys(t, adminClient(t), prefixOf(t, rt))
		},
		LogCap:      testLogCap,
		EventBuffer: testEventBuffer,
	})
}

func recvWake(t *testing.T, s chat.Subscription, timeout time.Duration, what string) {
	t.Helper()
	select {
	case <-s.Wake():
	case <-time.After(timeout):
		t.Fatalf("no wake-up within %v: %s", timeout, what)
	}
}

// listeningAlice opens a Redis adapter of the test's own and subscribes
// alice, with no wake-up pending; head is her log's position.
func listeningAlice(t *testing.T) (*realtime.Redis, chat.Subscription, chat.Position) {
	t.Helper()
	rt := openRedis(t, testenv.RedisURL(t), testenv.KeyPrefix(t))
	s, err := rt.Subscribe(context.Background(), "alice")
	require.NoError(t, err)
	t.Cleanup(s.Close)
	head, err := rt.Head(context.Background(), "alice")
	require.NoError(t, err)
	drainWake(s)
	return rt, s, head
}

func drainWake(s chat.Subscription) {
	select {
	case <-s.Wake():
	default:
	}
}

func delivery(uid, key string) chat.Delivery {
	return chat.Delivery{UserID: uid, Entry: &chat.LogEntry{Key: key, Type: chat.EventReceiptRead, Data: []byte(`{}`)}}
}

// Pub/Sub is at-most-once: whatever was published while the node's
// subscriber connection was down is lost, so after reconnecting every local
// stream must be woken to re-read its log (DESIGN.md §7).
func TestPubSubDropWakesEverySubscription(t *testing.T) {
	t.Parallel()
	prefix := testenv.KeyPrefix(t)
	opts, err := redis.ParseURL(testenv.RedisURL(t))
	require.NoError(t, err)
	name := "imdtest-" + strings.TrimSuffix(prefix, ":") // to find our connection, and only ours
	opts.ClientName = name
	rdb := redis.NewClient(opts)
	t.Cleanup(func() { _ = rdb.Close() })
	rt := realtime.New(rdb, realtime.Config{Prefix: prefix})
	t.Cleanup(func() { _ = rt.Close() })

	ctx := context.Background()
	var subs []chat.Subscription
	for _, uid := range []string{"alice", "alice", "bob", "carol"} {
		s, err := rt.Subscribe(ctx, uid)
		require.NoError(t, err)
		t.Cleanup(s.Close)
		drainWake(s)
		subs = append(subs, s)
	}

	admin := adminClient(t)
	pubsubConn := func() string {
		list, err := admin.Do(ctx, "CLIENT", "LIST", "TYPE", "pubsub").Text()
		require.NoError(t, err)
		var ids []string
		for _, line := range strings.Split(list, "\n") {
			fields := strings.Fields(line)
			if slices.Contains(fields, "name="+name) {
				for _, f := range fields {
					if id, ok := strings.CutPrefix(f, "id="); ok {
						ids = append(ids, id)
					}
				}
			}
		}
		require.LessOrEqual(t, len(ids), 1, "one Pub/Sub connection per node: %v", ids)
		if len(ids) == 0 {
			return ""
		}
		return ids[0]
	}
	id := pubsubConn()
	require.NotEmpty(t, id, "the node's Pub/Sub connection")
	require.NoError(t, admin.Do(ctx, "CLIENT", "KILL", "ID", id).Err())

	for i, s := range subs {
		recvWake(t, s, 10*time.Second, fmt.Sprintf("subscription %d after its Pub/Sub connection was killed", i))
	}
	testenv.Eventually(t, 5*time.Second, func() bool { id2 := pubsubConn(); return id2 != "" && id2 != id },
		"a new Pub/Sub connection")

	// And the channels are subscribed again.
	_, err = rt.Append(ctx, []chat.Delivery{delivery("bob", "o1")})
	require.NoError(t, err)
	recvWake(t, subs[2], 5*time.Second, "an append after the reconnect")
}

// The node subscribes to a user's channel for the first local stream and
// unsubscribes with the last one, so Redis does not route a departed user's
// traffic to it.
func TestChannelFollowsLocalSubscriptions(t *testing.T) {
	t.Parallel()
	prefix := testenv.KeyPrefix(t)
	rt := openRedis(t, testenv.RedisURL(t), prefix)
	admin := adminClient(t)
	ctx := context.Background()
	channel := prefix + "user:{alice}"
	numsub := func() int64 {
		m, err := admin.PubSubNumSub(ctx, channel).Result()
		require.NoError(t, err)
		return m[channel]
	}

	require.Zero(t, numsub())
	a, err := rt.Subscribe(ctx, "alice")
	require.NoError(t, err)
	require.EqualValues(t, 1, numsub(), "subscribed once Subscribe returns")
	b, err := rt.Subscribe(ctx, "alice")
	require.NoError(t, err)
	require.EqualValues(t, 1, numsub(), "one Redis subscription per node, not per stream")
	a.Close()
	require.EqualValues(t, 1, numsub())
	b.Close()
	testenv.Eventually(t, 5*time.Second, func() bool { return numsub() == 0 }, "unsubscribed after the last Close")
}

// Each topic has its own node channel, <prefix>node:<topic>, subscribed for
// the node's first Listen-er of the topic and unsubscribed with its last.
func TestNodeChannelPerTopic(t *testing.T) {
	t.Parallel()
	prefix := testenv.KeyPrefix(t)
	rt := openRedis(t, testenv.RedisURL(t), prefix)
	admin := adminClient(t)
	ctx := context.Background()
	tokens, fanout := prefix+"node:tokens", prefix+"node:fanout"
	numsub := func() map[string]int64 {
		m, err := admin.PubSubNumSub(ctx, tokens, fanout, prefix+"node").Result()
		require.NoError(t, err)
		return m
	}

	l, err := rt.Listen(ctx, chat.TopicTokens)
	require.NoError(t, err)
	require.Equal(t, map[string]int64{tokens: 1, fanout: 0, prefix + "node": 0}, numsub())
	l.Close()
	testenv.Eventually(t, 5*time.Second, func() bool { return numsub()[tokens] == 0 }, "unsubscribed after the last Close")
}

// With Redis unreachable, calls fail fast instead of stalling the send path
// (G6), and Subscribe still hands out a subscription.
func TestRedisUnreachable(t *testing.T) {
	t.Parallel()
	rt, err := realtime.Open(context.Background(), "redis://127.0.0.1:1/0", realtime.Config{Prefix: "unreachable:"})
	require.NoError(t, err, "Open does not need Redis")
	t.Cleanup(func() { _ = rt.Close() })

	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	notDeadline := func(err error) {
		t.Helper()
		require.Error(t, err)
		require.False(t, errors.Is(err, context.DeadlineExceeded), "failed only at the deadline: %v", err)
		var re *chat.ResyncError
		require.False(t, errors.As(err, &re), "an outage is not a resync")
	}
	_, err = rt.Append(ctx, []chat.Delivery{delivery("alice", "o1")})
	notDeadline(err)
	_, _, err = rt.Read(ctx, "alice", chat.Position{Epoch: "e", Offset: 1}, 10)
	notDeadline(err)
	_, err = rt.Head(ctx, "alice")
	notDeadline(err)
	notDeadline(rt.Ping(ctx))
	notDeadline(rt.Publish(ctx, []string{"alice"}, chat.StreamEvent{Type: chat.EventTyping, Data: []byte(`{}`)}))

	s, err := rt.Subscribe(ctx, "alice")
	require.NoError(t, err)
	require.NotNil(t, s)
	require.NoError(t, ctx.Err(), "Subscribe returned before the deadline")
	s.Close()
}

// proxy is a TCP proxy to Redis that the test can take down and bring back,
// or freeze, to simulate outages without touching the shared Redis.
type proxy struct {
	t        *testing.T
	addr     string
	upstream string
	mu       sync.Mutex
	ln       net.Listener
	conns    map[net.Conn]*atomic.Bool // → frozen: bytes are swallowed
}

func newProxy(t *testing.T, upstream string) *proxy {
	p := &proxy{t: t, upstream: upstream, conns: map[net.Conn]*atomic.Bool{}}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	p.addr = ln.Addr().String()
	p.serve(ln)
	t.Cleanup(p.down)
	return p
}

// url is the Redis URL of opts with the proxy's address.
func (p *proxy) url(opts *redis.Options) string {
	u := fmt.Sprintf("redis://%s/%d", p.addr, opts.DB)
	if opts.Password != "" {
		u = fmt.Sprintf("redis://%s:%s@%s/%d", opts.Username, opts.Password, p.addr, opts.DB)
	}
	return u
}

func (p *proxy) serve(ln net.Listener) {
	p.mu.Lock()
	p.ln = ln
	p.mu.Unlock()
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			u, err := net.Dial("tcp", p.upstream)
			if err != nil {
				_ = c.Close()
				continue
			}
			frozen := new(atomic.Bool)
			p.mu.Lock()
			p.conns[c], p.conns[u] = frozen, frozen
			p.mu.Unlock()
			go pump(u, c, frozen)
			go pump(c, u, frozen)
		}
	}()
}

func pump(dst, src net.Conn, frozen *atomic.Bool) {
	buf := make([]byte, 32<<10)
	for {
		n, err := src.Read(buf)
		if n > 0 && !frozen.Load() {
			if _, werr := dst.Write(buf[:n]); werr != nil {
				break
			}
		}
		if err != nil {
			break
		}
	}
	_ = dst.Close()
}

// freeze makes every current connection a black hole that stays open, as a
// peer that vanished without closing (no RST, no FIN) looks.
func (p *proxy) freeze() {
	p.mu.Lock()
	defer p.mu.Unlock()
	for _, frozen := range p.conns {
		frozen.Store(true)
	}
}

// down stops accepting and cuts every connection.
func (p *proxy) down() {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.ln != nil {
		_ = p.ln.Close()
		p.ln = nil
	}
	for c := range p.conns {
		_ = c.Close()
	}
	clear(p.conns)
}

func (p *proxy) up() {
	ln, err := net.Listen("tcp", p.addr)
	require.NoError(p.t, err)
	p.serve(ln)
}

// G6: real time pauses while Redis is down and recovers by itself: streams
// subscribed before or during the outage are woken once it ends (they re-read
// their logs), and subscriptions made during the outage work afterwards.
func TestRedisOutageRecovers(t *testing.T) {
	t.Parallel()
	prefix := testenv.KeyPrefix(t)
	opts, err := redis.ParseURL(testenv.RedisURL(t))
	require.NoError(t, err)
	p := newProxy(t, opts.Addr)
	rt := openRedis(t, p.url(opts), prefix)
	ctx := context.Background()

	before, err := rt.Subscribe(ctx, "alice")
	require.NoError(t, err)
	t.Cleanup(before.Close)
	drainWake(before)

	p.down()
	octx, cancel := context.WithTimeout(ctx, 2*time.Second)
	defer cancel()
	_, err = rt.Append(octx, []chat.Delivery{delivery("alice", "o1")})
	require.Error(t, err)
	during, err := rt.Subscribe(octx, "bob")
	require.NoError(t, err)
	t.Cleanup(during.Close)
	require.NoError(t, octx.Err(), "Subscribe returned before the deadline")
	drainWake(before)
	drainWake(during)

	p.up()
	recvWake(t, before, 10*time.Second, "a stream subscribed before the outage, after it")
	recvWake(t, during, 10*time.Second, "a stream subscribed during the outage, after it")

	testenv.Eventually(t, 10*time.Second, func() bool {
		_, err := rt.Append(ctx, []chat.Delivery{delivery("bob", "o2")})
		return err == nil
	}, "appends work again")
	recvWake(t, during, 5*time.Second, "an append after the outage")
}

// A Pub/Sub connection can die without an error (a peer or NAT that
// vanished: no FIN, no RST). The receiver notices with its health-check
// PING, replaces the connection and wakes every local subscription.
func TestPubSubSilentlyDeadConnection(t *testing.T) {
	t.Parallel()
	prefix := testenv.KeyPrefix(t)
	opts, err := redis.ParseURL(testenv.RedisURL(t))
	require.NoError(t, err)
	p := newProxy(t, opts.Addr)
	popts, err := redis.ParseURL(p.url(opts))
	require.NoError(t, err)
	rdb := redis.NewClient(popts)
	t.Cleanup(func() { _ = rdb.Close() })
	rt := realtime.NewWithHealthInterval(rdb, realtime.Config{Prefix: prefix}, 100*time.Millisecond)
	t.Cleanup(func() { _ = rt.Close() })
	other := openRedis(t, testenv.RedisURL(t), prefix) // another node, not behind the proxy
	ctx := context.Background()

	s, err := rt.Subscribe(ctx, "alice")
	require.NoError(t, err)
	t.Cleanup(s.Close)
	drainWake(s)

	p.freeze()
	recvWake(t, s, 5*time.Second, "after the silent Pub/Sub connection was replaced")
	drainWake(s)
	_, err = other.Append(ctx, []chat.Delivery{delivery("alice", "o1")})
	require.NoError(t, err)
	recvWake(t, s, 5*time.Second, "an append on another node, through the new connection")
}

// Every key the adapter writes starts with the prefix, those of a user or a
// conversation carry its hash tag (one cluster slot), and the logs expire.
func TestKeyLayout(t *testing.T) {
	t.Parallel()
	prefix := testenv.KeyPrefix(t)
	rt := openRedis(t, testenv.RedisURL(t), prefix)
	ctx := context.Background()
	// The log's keys come into being one by one: each must get the TTL.
	_, err := rt.Head(ctx, "alice")
	require.NoError(t, err)
	_, err = rt.Append(ctx, []chat.Delivery{delivery("alice", "o2")})
	require.NoError(t, err)
	_, err = rt.Append(ctx, []chat.Delivery{{UserID: "alice", Entry: &chat.LogEntry{
		Key: "o1", Type: chat.EventMessageCreated, ConversationID: "c1", Seq: 1, Data: []byte(`{}`)}}})
	require.NoError(t, err)
	_, err = rt.Connect(ctx, "alice", "conn1", time.Minute)
	require.NoError(t, err)
	_, err = rt.Disconnect(ctx, "alice", "conn1")
	require.NoError(t, err)
	require.NoError(t, rt.FillMembers(ctx, "c1", "0", []string{"alice"}))
	require.NoError(t, rt.InvalidateMembers(ctx, "c2"))
	require.NoError(t, rt.FillSessions(ctx, "alice", []chat.Activity{{ConversationID: "c1", At: time.Now()}}))
	_, _, err = rt.Allow(ctx, "send:alice", chat.Limit{Rate: 1, Period: time.Second, Burst: 1}, 1)
	require.NoError(t, err)

	admin := adminClient(t)
	keys, err := admin.Keys(ctx, prefix+"*").Result()
	require.NoError(t, err)
	want := []string{
		"offline:{alice}", "offline:seq:{alice}", "offline:epoch:{alice}", "offline:conv:{alice}", "offline:keys:{alice}",
		"user:lastseen:{alice}", "group:members:{c1}", "group:members:ver:{c2}", "session:{alice}", "rate:send:alice",
	}
	var got []string
	for _, k := range keys {
		got = append(got, strings.TrimPrefix(k, prefix))
	}
	require.ElementsMatch(t, want, got)
	for _, k := range want[:5] {
		ttl, err := admin.TTL(ctx, prefix+k).Result()
		require.NoError(t, err)
		require.Greater(t, ttl, 6*24*time.Hour, "%s expires with the log", k)
	}
}

// BenchmarkAppend is the fan-out benchmark against Redis (one script per
// user, pipelined).
func BenchmarkAppend(b *testing.B) {
	realtimetest.BenchAppend(b, func(b *testing.B) chat.Realtime {
		return openRedis(b, testenv.RedisURL(b), testenv.KeyPrefix(b))
	})
}

// Wake-ups carry the entries just appended, so a stream need not read them
// back; whenever the pushes cannot vouch for a gapless continuation (a
// position they do not continue, another epoch, an overflowing buffer, an
// oversized batch) Since says so and the log is read instead.
func TestWakeUpsCarryEntries(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	rt, s, head := listeningAlice(t)
	var err error

	// Two appends, each its own wake-up: both carried, in order, with the ids
	// the log gives them.
	msg := func(seq int64, text string) chat.Delivery {
		return chat.Delivery{UserID: "alice", Entry: &chat.LogEntry{Key: fmt.Sprint("m", seq), Type: chat.EventMessageCreated,
			ConversationID: "c1", Seq: seq, Data: []byte(`{"text":"` + text + `","note":"a: b\nc 12:3"}`)}}
	}
	_, err = rt.Append(ctx, []chat.Delivery{msg(1, "one"), msg(2, "two")})
	require.NoError(t, err)
	_, err = rt.Append(ctx, []chat.Delivery{delivery("alice", "o9"), msg(3, "three")})
	require.NoError(t, err)
	want, wantNext, err := rt.Read(ctx, "alice", head, 100)
	require.NoError(t, err)
	require.Len(t, want, 4)
	var got []chat.StreamEvent
	next := head
	testenv.Eventually(t, 5*time.Second, func() bool {
		select {
		case <-s.Wake():
		case <-time.After(100 * time.Millisecond):
		}
		evs, n, ok := s.Since(next, nil)
		require.True(t, ok, "pushes continue the position")
		got, next = append(got, evs...), n
		return len(got) == 4
	}, "four pushed entries")
	require.Equal(t, want, got)
	require.Equal(t, wantNext, next)

	// Nothing new: ok with nothing (the pushes were all taken).
	_, err = rt.Append(ctx, []chat.Delivery{msg(3, "three again")}) // a duplicate: not appended, no wake-up
	require.NoError(t, err)
	_, err = rt.Append(ctx, []chat.Delivery{msg(4, "four")})
	require.NoError(t, err)
	recvWake(t, s, 5*time.Second, "the fourth message")
	// Asked from an older position than the pushes continue: a hole.
	evs, n, ok := s.Since(head, nil)
	require.False(t, ok, "a position the pushes do not continue: %v", evs)
	require.Equal(t, head, n)
	// Taken anyway: they are gone now, the log has them.
	_, _, ok = s.Since(next, nil)
	require.False(t, ok, "nothing pushed since: read the log")

	// Another epoch's position.
	_, err = rt.Append(ctx, []chat.Delivery{msg(5, "five")})
	require.NoError(t, err)
	recvWake(t, s, 5*time.Second, "the fifth message")
	_, _, ok = s.Since(chat.Position{Epoch: "other", Offset: next.Offset + 1}, nil)
	require.False(t, ok, "another epoch")

	// A batch larger than a wake-up carries: an empty wake-up.
	var big []chat.Delivery
	for seq := int64(6); seq < 6+20; seq++ {
		big = append(big, msg(seq, strings.Repeat("x", 500)))
	}
	_, err = rt.Append(ctx, big)
	require.NoError(t, err)
	recvWake(t, s, 5*time.Second, "the big batch")
	_, _, ok = s.Since(next, nil)
	require.False(t, ok, "an oversized batch is not carried")
	next, err = rt.Head(ctx, "alice")
	require.NoError(t, err)

	// One call with bob's large round and alice's one small entry: alice's
	// wake-up still carries hers (the call's entries are not left out of it
	// because they would not all fit one wake-up: not every user takes all).
	var mixed []chat.Delivery
	for seq := int64(1); seq <= 20; seq++ {
		d := msg(seq, strings.Repeat("y", 500))
		d.UserID, d.Entry.ConversationID = "bob", "c9"
		mixed = append(mixed, d)
	}
	mixed = append(mixed, msg(26, "small"))
	_, err = rt.Append(ctx, mixed)
	require.NoError(t, err)
	recvWake(t, s, 5*time.Second, "alice's entry among bob's round")
	evs, n, ok = s.Since(next, nil)
	require.True(t, ok, "carried")
	require.Len(t, evs, 1)
	require.Contains(t, string(evs[0].Data), "small")
	require.Equal(t, next.Offset+1, n.Offset)
}

// A wake-up too big to carry its entries sums them up when they are all
// messages of one conversation: Since passes over them when the stream has
// them (the fan-out fast path delivered them), and reads the log otherwise.
// A round with anything else is an empty wake-up, as before.
func TestSummaryWakeUps(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	rt, s, head := listeningAlice(t)
	var err error
	msg := func(cid string, seq int64) chat.Delivery {
		return chat.Delivery{UserID: "alice", Entry: &chat.LogEntry{Key: fmt.Sprint("m", cid, seq), Type: chat.EventMessageCreated,
			ConversationID: cid, Seq: seq, Data: []byte(`{"text":"` + strings.Repeat("x", 500) + `"}`)}}
	}
	big := func(cid string, from, to int64) []chat.Delivery {
		var ds []chat.Delivery
		for seq := from; seq <= to; seq++ {
			ds = append(ds, msg(cid, seq))
		}
		return ds
	}
	type asked struct {
		cid  string
		last int64
	}
	var questions []asked
	have := func(answer bool) func(string, int64) bool {
		return func(cid string, last int64) bool {
			questions = append(questions, asked{cid, last})
			return answer
		}
	}

	// 20 messages of c1 (10 KB): a summary; the stream has them.
	_, err = rt.Append(ctx, big("c1", 1, 20))
	require.NoError(t, err)
	recvWake(t, s, 5*time.Second, "the first round")
	evs, next, ok := s.Since(head, have(true))
	require.True(t, ok, "passed over")
	require.Empty(t, evs)
	require.Equal(t, head.Offset+20, next.Offset)
	require.Equal(t, []asked{{"c1", 20}}, questions)

	// The next 20: the stream lacks them, so the log must be read.
	_, err = rt.Append(ctx, big("c1", 21, 40))
	require.NoError(t, err)
	recvWake(t, s, 5*time.Second, "the second round")
	_, n, ok := s.Since(next, have(false))
	require.False(t, ok)
	require.Equal(t, next, n)
	require.Equal(t, asked{"c1", 40}, questions[1])
	next.Offset += 20

	// Two conversations in one round, or a message with another event: an
	// empty wake-up, whatever the stream has.
	_, err = rt.Append(ctx, append(big("c1", 41, 50), big("c2", 1, 10)...))
	require.NoError(t, err)
	recvWake(t, s, 5*time.Second, "a round of two conversations")
	_, _, ok = s.Since(next, have(true))
	require.False(t, ok)
	next.Offset += 20
	_, err = rt.Append(ctx, append(big("c1", 51, 70), delivery("alice", "o1")))
	require.NoError(t, err)
	recvWake(t, s, 5*time.Second, "a round with another event")
	_, _, ok = s.Since(next, have(true))
	require.False(t, ok)
	require.Len(t, questions, 2, "not asked about rounds that are not summed up")

	// A round too big to carry, of which the log already has all but two:
	// the call left the wake-up form out (every user took all of it), so
	// the two come with a summary, not carried, though they would fit; the
	// stream that lacks them reads them from the log.
	_, err = rt.Append(ctx, big("c1", 61, 72))
	require.NoError(t, err)
	recvWake(t, s, 5*time.Second, "a round of duplicates but two")
	_, n, ok = s.Since(chat.Position{Epoch: next.Epoch, Offset: next.Offset + 21}, have(false))
	require.False(t, ok, "not carried")
	require.Equal(t, asked{"c1", 72}, questions[len(questions)-1])
	evs, _, err = rt.Read(ctx, "alice", n, 10)
	require.NoError(t, err)
	require.Len(t, evs, 2, "seqs 71 and 72")
	next.Offset += 2

	// A summary that does not start right after the position is a hole.
	next.Offset += 21
	_, err = rt.Append(ctx, big("c1", 71, 90))
	require.NoError(t, err)
	recvWake(t, s, 5*time.Second, "a later round")
	_, _, ok = s.Since(chat.Position{Epoch: next.Epoch, Offset: next.Offset - 1}, have(true))
	require.False(t, ok)
}

// A log whose offset counter is gone while entries remain (a partial
// eviction) is a lost log: reusing offsets within the epoch would give two
// events one id, so the next append starts a new epoch, old positions
// resync and the remains are cleared. A log whose list alone is gone keeps
// its epoch and head: positions before the head are expired, and the next
// entries continue the offsets.
func TestLogPartlyLost(t *testing.T) {
	t.Parallel()
	prefix := testenv.KeyPrefix(t)
	rt := openRedis(t, testenv.RedisURL(t), prefix)
	admin := adminClient(t)
	ctx := context.Background()
	msg := func(seq int64) chat.Delivery {
		return chat.Delivery{UserID: "alice", Entry: &chat.LogEntry{Key: fmt.Sprint("m", seq), Type: chat.EventMessageCreated,
			ConversationID: "c1", Seq: seq, Data: []byte(`{}`)}}
	}
	head, err := rt.Head(ctx, "alice")
	require.NoError(t, err)
	_, err = rt.Append(ctx, []chat.Delivery{msg(1), msg(2)})
	require.NoError(t, err)

	// The list alone lost: same epoch, the head stays, old positions expired.
	require.NoError(t, admin.Del(ctx, prefix+"offline:{alice}").Err())
	_, _, err = rt.Read(ctx, "alice", head, 10)
	var rs *chat.ResyncError
	require.ErrorAs(t, err, &rs)
	require.Equal(t, chat.ResyncExpired, rs.Reason)
	_, err = rt.Append(ctx, []chat.Delivery{msg(3)})
	require.NoError(t, err)
	evs, next, err := rt.Read(ctx, "alice", chat.Position{Epoch: head.Epoch, Offset: 2}, 10)
	require.NoError(t, err)
	require.Len(t, evs, 1)
	require.Equal(t, chat.Position{Epoch: head.Epoch, Offset: 3}, next, "offsets continue")

	// The counter lost, the entry and the epoch still there: a new epoch,
	// the old entry cleared; seq 4 comes with a baseline (as a gap fill
	// does), since the conversation's last seq is gone too.
	require.NoError(t, admin.Del(ctx, prefix+"offline:seq:{alice}", prefix+"offline:conv:{alice}").Err())
	_, err = rt.Append(ctx, []chat.Delivery{{UserID: "alice", Entry: &chat.LogEntry{Key: "m4", Type: chat.EventMessageCreated,
		ConversationID: "c1", Seq: 4, Baseline: 3, Data: []byte(`{}`)}}})
	require.NoError(t, err)
	_, _, err = rt.Read(ctx, "alice", next, 10)
	require.ErrorAs(t, err, &rs)
	require.Equal(t, chat.ResyncEpoch, rs.Reason)
	h2, err := rt.Head(ctx, "alice")
	require.NoError(t, err)
	require.NotEqual(t, head.Epoch, h2.Epoch)
	evs, _, err = rt.Read(ctx, "alice", chat.Position{Epoch: h2.Epoch}, 10)
	require.NoError(t, err)
	require.Len(t, evs, 1, "only the new entry: what the lost log held is gone")
	require.Equal(t, int64(1), h2.Offset)
}
