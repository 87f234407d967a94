package main

import (
	"fmt"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"imd/chat"
	"imd/internal/testenv"
)

// TestRealtimeResync proves G5's other half: a position the log cannot serve
// starts the stream with resync (never a silent skip), and REST then has
// every message.
func TestRealtimeResync(t *testing.T) {
	t.Parallel()

	t.Run("PositionTooOld", func(t *testing.T) {
		t.Parallel()
		n := newCluster(t).start(t, nodeOpts{env: map[string]string{"IMD_LOG_CAP": "20"}})
		alice, bob := rtProvision(t, n.URL, "alice"), rtProvision(t, n.URL, "bob")
		s1 := rtOpen(t, n.URL, alice.Token, rtStreamOpts{})
		_, p0 := rtWaitReady(t, s1.sseStream, 10*time.Second)
		cid := rtGroup(t, bob.client, "alice")
		for i := range 3 {
			rtSend(t, bob.client, cid, fmt.Sprintf("seen %d", i))
		}
		evs := rtReadMessages(t, s1.sseStream, 3, 15*time.Second)
		last := rtConsecutive(t, p0, evs)
		s1.Close()

		for i := range 50 {
			rtSend(t, bob.client, cid, fmt.Sprintf("missed %d", i))
		}
		// Wait until the 50th is appended (the log keeps only 20 of them).
		head := chat.Position{Epoch: last.Epoch, Offset: last.Offset + 50}
		rtAwaitLog(t, alice.client, chat.Position{Epoch: last.Epoch, Offset: head.Offset - 1}.String(), 1)

		s2 := rtOpen(t, n.URL, alice.Token, rtStreamOpts{lastEventID: last.String()})
		first := s2.next(10 * time.Second)
		require.Equal(t, "resync", first.Type, "first event: %s", rtDescribe([]sseEvent{first}))
		require.Empty(t, first.ID)
		require.Equal(t, map[string]any{"reason": chat.ResyncExpired}, rtData(t, first))
		before, ready := rtWaitReady(t, s2.sseStream, 10*time.Second)
		require.Empty(t, before, "after a resync the stream continues from now: %s", rtDescribe(before))
		require.Equal(t, head, ready, "ready carries the head of the log")

		// REST repairs completely.
		require.Equal(t, rtSeqRange(4, 53), rtSeqs(rtHistory(t, alice.client, cid, 3)))
		// And the stream is live.
		m := rtSend(t, bob.client, cid, "live")
		evs = rtReadMessages(t, s2.sseStream, 1, 15*time.Second)
		rtConsecutive(t, ready, evs)
		require.Equal(t, m.ID, rtMsgs(t, evs)[0].ID)
	})

	t.Run("BadPositions", func(t *testing.T) {
		t.Parallel()
		n := newCluster(t).start(t, nodeOpts{})
		alice := rtProvision(t, n.URL, "alice")
		s := rtOpen(t, n.URL, alice.Token, rtStreamOpts{})
		_, head := rtWaitReady(t, s.sseStream, 10*time.Second)
		s.Close()
		for _, tc := range []struct{ id, reason string }{
			{"garbage", chat.ResyncMalformed},
			{"abc-", chat.ResyncMalformed},
			{"-5", chat.ResyncMalformed},
			{"nosuchepoch-0", chat.ResyncEpoch},
			{chat.Position{Epoch: head.Epoch, Offset: head.Offset + 1000}.String(), chat.ResyncAhead},
		} {
			s := rtOpen(t, n.URL, alice.Token, rtStreamOpts{lastEventID: tc.id})
			first := s.next(10 * time.Second)
			require.Equal(t, "resync", first.Type, "%q: first event %s", tc.id, rtDescribe([]sseEvent{first}))
			require.Equal(t, map[string]any{"reason": tc.reason}, rtData(t, first), "%q", tc.id)
			before, ready := rtWaitReady(t, s.sseStream, 10*time.Second)
			require.Empty(t, before, "%q", tc.id)
			require.Equal(t, head, ready, "%q: live from the head", tc.id)
			s.Close()
		}
	})

	t.Run("ServicesLogLost", func(t *testing.T) {
		t.Parallel()
		c := newCluster(t)
		n := c.start(t, nodeOpts{})
		alice, bob := rtProvision(t, n.URL, "alice"), rtProvision(t, n.URL, "bob")
		s1 := rtOpen(t, n.URL, alice.Token, rtStreamOpts{})
		_, p0 := rtWaitReady(t, s1.sseStream, 10*time.Second)
		cid := rtGroup(t, bob.client, "alice")
		for i := range 5 {
			rtSend(t, bob.client, cid, fmt.Sprintf("seen %d", i))
		}
		last := rtConsecutive(t, p0, rtReadMessages(t, s1.sseStream, 5, 15*time.Second))
		s1.Close()
		for i := range 5 {
			rtSend(t, bob.client, cid, fmt.Sprintf("missed %d", i))
		}
		rtAwaitLog(t, alice.client, last.String(), 5)

		// FLUSHALL, for this cluster only.
		require.Positive(t, rtDeletePrefix(t, rtRedis(t), c.prefix))

		s2 := rtOpen(t, n.URL, alice.Token, rtStreamOpts{lastEventID: last.String()})
		first := s2.next(10 * time.Second)
		require.Equal(t, "resync", first.Type, "first event: %s", rtDescribe([]sseEvent{first}))
		require.Equal(t, map[string]any{"reason": chat.ResyncEpoch}, rtData(t, first))
		before, ready := rtWaitReady(t, s2.sseStream, 10*time.Second)
		require.Empty(t, before, "%s", rtDescribe(before))
		require.NotEqual(t, last.Epoch, ready.Epoch, "a lost log gets a new epoch")

		require.Equal(t, rtSeqRange(6, 10), rtSeqs(rtHistory(t, alice.client, cid, 5)), "REST has every message")
		// The ten messages are dispatched: once their outbox events are gone
		// (the acker deletes them in batches), none of them can arrive late.
		db := apiDB(t, c.dbURL)
		testenv.Eventually(t, 10*time.Second, func() bool {
			var n int
			require.NoError(t, db.Get(&n, "SELECT count(*) FROM outbox WHERE conversation_id = $1 AND type = 'message.created'", cid))
			return n == 0
		}, "the messages' events leave the outbox")
		// Live delivery works on the new log, and members are re-read from
		// PostgreSQL (the member cache was lost too).
		m := rtSend(t, bob.client, cid, "after the loss")
		before, ev := rtWaitFor(t, s2.sseStream, 15*time.Second, "the live message", func(e sseEvent) bool {
			return e.Type == "message.created" && rtMsgs(t, []sseEvent{e})[0].ID == m.ID
		})
		evs := append(before, ev)
		rtConsecutive(t, ready, evs)
		// The new log does not know the conversation, so the message is a
		// gap, filled from the conversation's oldest message still pending:
		// this one. The stream had been told to resync; it is not sent the
		// old messages again (a fill from 500 back had sent all ten).
		require.Equal(t, []int64{m.Seq}, rtSeqs(rtMsgs(t, evs)))
	})
}

// TestRealtimeServicesCommitWithoutDispatch proves G6's crash case: a node that
// commits and then never dispatches (as if it died right after the commit)
// still gets its message to every stream, through the outbox sweeper.
func TestRealtimeServicesCommitWithoutDispatch(t *testing.T) {
	t.Parallel()
	c := newCluster(t)
	dead := c.start(t, nodeOpts{hooks: chat.Hooks{SkipFastDispatch: func(chat.OutboxEvent) bool { return true }}})
	ok := c.start(t, nodeOpts{})
	alice := rtProvision(t, ok.URL, "alice")
	bob := rtProvision(t, ok.URL, "bob")
	carol := rtProvision(t, ok.URL, "carol")
	cid := rtGroup(t, bob.client, "alice", "carol")

	streams := []*rtStream{
		rtOpen(t, dead.URL, alice.Token, rtStreamOpts{}),
		rtOpen(t, ok.URL, bob.Token, rtStreamOpts{}),
		rtOpen(t, dead.URL, carol.Token, rtStreamOpts{}),
	}
	readies := make([]chat.Position, len(streams))
	for i, s := range streams {
		// conversation.created may still be on its way: skip it.
		_, readies[i] = rtWaitReady(t, s.sseStream, 10*time.Second)
	}

	start := time.Now()
	m := rtSend(t, rtOn(alice, dead), cid, "committed, never fast-dispatched")
	for i, s := range streams {
		evs := rtReadMessages(t, s.sseStream, 1, 15*time.Second)
		if i == 0 {
			// The sweeper takes events older than 2 s: had the fast path
			// delivered it, the hook would not work and this test would prove nothing.
			require.GreaterOrEqual(t, time.Since(start), 1500*time.Millisecond, "delivered too early for the sweeper")
		}
		ms := rtMsgs(t, evs)
		require.Len(t, ms, 1)
		require.Equal(t, m.ID, ms[0].ID)
		readies[i] = rtConsecutive(t, readies[i], evs)
	}
	// The sweeper's delivery is no duplicate of anything: the next message
	// (through the healthy node) is the next event.
	m2 := rtSend(t, bob.client, cid, "fast")
	for i, s := range streams {
		evs := rtReadMessages(t, s.sseStream, 1, 15*time.Second)
		require.Equal(t, 1, len(evs), "%s", rtDescribe(evs))
		require.Equal(t, m2.ID, rtMsgs(t, evs)[0].ID)
		rtConsecutive(t, readies[i], evs)
	}
}

// TestRealtimeServicesReorderedFirstMessages: the first message of a new group is
// committed on a node that does not dispatch it (it crashed, or its Redis is
// away), the second through a healthy node, whose fast path delivers it
// before the sweeper delivers the first. Every stream must still get 1 then
// 2 (G4: no loss, seq order).
func TestRealtimeServicesReorderedFirstMessages(t *testing.T) {
	t.Parallel()
	c := newCluster(t)
	slow := c.start(t, nodeOpts{hooks: chat.Hooks{SkipFastDispatch: func(ev chat.OutboxEvent) bool {
		return ev.Type == chat.EventMessageCreated && ev.Seq == 1
	}}})
	fast := c.start(t, nodeOpts{})
	alice := rtProvision(t, fast.URL, "alice")
	bob := rtProvision(t, fast.URL, "bob")
	cid := rtGroup(t, bob.client, "alice")
	sa := rtOpen(t, fast.URL, alice.Token, rtStreamOpts{})
	sb := rtOpen(t, slow.URL, bob.Token, rtStreamOpts{})
	_, pa := rtWaitReady(t, sa.sseStream, 10*time.Second)
	_, pb := rtWaitReady(t, sb.sseStream, 10*time.Second)

	m1 := rtSend(t, rtOn(bob, slow), cid, "one")
	m2 := rtSend(t, rtOn(bob, fast), cid, "two")
	require.EqualValues(t, 1, m1.Seq)
	require.EqualValues(t, 2, m2.Seq)
	for i, s := range []*rtStream{sa, sb} {
		pos := []chat.Position{pa, pb}[i]
		evs := rtReadMessagesOr(t, s.sseStream, 2, 15*time.Second,
			"message 1 lost for good: seq 2 (fast path) reached the new group's logs first, and seq 1 "+
				"(sweeper, 2 s later) was dropped as a duplicate.\n"+rtSeqStateRegression)
		rtConsecutive(t, pos, evs)
		require.Equal(t, []string{m1.ID, m2.ID}, []string{rtMsgs(t, evs)[0].ID, rtMsgs(t, evs)[1].ID}, "seq order")
	}
}

// TestRealtimeServicesRedisDown proves G6's Redis case on one node of two: sends
// still succeed, readiness says Redis is away, and when it is back the open
// stream gets everything it missed, in order, once.
func TestRealtimeServicesRedisDown(t *testing.T) {
	t.Parallel()
	c := newCluster(t)
	proxy := testenv.NewProxy(t, rtRedisHostPort(t, c.redisURL))
	cut := c.start(t, nodeOpts{env: map[string]string{"REDIS_URL": rtViaProxy(t, c.redisURL, proxy.Addr())}})
	healthy := c.start(t, nodeOpts{})
	alice := rtProvision(t, cut.URL, "alice")
	bob := rtProvision(t, healthy.URL, "bob")
	cid := rtGroup(t, bob.client, "alice")
	sa := rtOpen(t, cut.URL, alice.Token, rtStreamOpts{})
	sb := rtOpen(t, healthy.URL, bob.Token, rtStreamOpts{})
	_, pa := rtWaitReady(t, sa.sseStream, 10*time.Second)
	_, pb := rtWaitReady(t, sb.sseStream, 10*time.Second)
	// One message before the outage, so that the logs know the conversation
	// (TestRealtimeServicesReorderedFirstMessages is about a conversation they don't).
	m0 := rtSend(t, bob.client, cid, "before the outage")
	pa = rtConsecutive(t, pa, rtReadMessages(t, sa.sseStream, 1, 15*time.Second))
	pb = rtConsecutive(t, pb, rtReadMessages(t, sb.sseStream, 1, 15*time.Second))
	require.Equal(t, 200, alice.do("GET", "/readyz", nil).Status)

	proxy.Down()
	testenv.Eventually(t, 10*time.Second, func() bool {
		r := alice.do("GET", "/readyz", nil)
		return r.Status == 503 && rtJSONPath(t, r.Body, "checks", "redis") == "unavailable" &&
			rtJSONPath(t, r.Body, "checks", "postgres") == "ok"
	}, "readyz reports Redis unavailable")
	var sent []chat.Message
	for i := range 20 {
		sent = append(sent, rtSend(t, alice.client, cid, fmt.Sprintf("while redis is down %d", i)))
	}
	r := alice.do("GET", "/readyz", nil)
	require.Equal(t, 503, r.Status, "%s", r.Body)
	// A receipt committed on the cut node too (bob's: alice's own sends
	// marked them read for her already).
	r = rtOn(bob, cut).do("PUT", path("/v1/conversations/%s/read", cid), map[string]any{"seq": sent[19].Seq})
	require.Equal(t, 200, r.Status, "%s", r.Body)

	// Meanwhile the healthy node's sweeper delivers what the cut node
	// committed (events older than 2 s): bob, on the healthy node, gets it
	// all while alice's node still has no Redis.
	evsB := rtReadMessagesOr(t, sb.sseStream, 20, 10*time.Second,
		"BUG? the healthy node's sweeper did not deliver within 10 s what the cut node committed: "+
			"the cut node's own sweeper claims (leases for 30 s) a batch it cannot deliver")
	if len(rtOfType(evsB, "receipt.read")) == 0 {
		_, rcpt := rtWaitFor(t, sb.sseStream, 10*time.Second, "receipt.read", func(e sseEvent) bool { return e.Type == "receipt.read" })
		evsB = append(evsB, rcpt)
	}
	rcpt := rtOfType(evsB, "receipt.read")[0]
	pb = rtConsecutive(t, pb, evsB)
	require.Equal(t, rtSeqRange(2, 21), rtSeqs(rtMsgs(t, evsB)))
	require.Equal(t, map[string]any{"conversation_id": cid, "user_id": "bob", "seq": float64(21)}, rtData(t, rcpt))
	stillOpen := func() bool {
		select {
		case <-sa.closed:
			return false
		default:
			return true
		}
	}()
	t.Logf("alice's stream during the outage: open=%v", stillOpen)
	proxy.Up()

	// Alice's stream on the cut node: still open, or reopened where it was.
	var evs []sseEvent
	deadline := time.Now().Add(30 * time.Second)
	cur, reopened := sa, 0
	for len(rtOfType(evs, "receipt.read")) < 1 {
		require.True(t, time.Now().Before(deadline), "alice got %d of 20 messages (and no receipt) within 30s: %s", len(rtMsgs(t, evs)), rtDescribe(evs))
		select {
		case ev, ok := <-cur.events:
			if !ok {
				last := pa.String()
				if d := rtDurable(evs); len(d) > 0 {
					last = d[len(d)-1].ID
				}
				reopened++
				require.LessOrEqual(t, reopened, 3, "stream keeps ending")
				cur = rtOpen(t, cut.URL, alice.Token, rtStreamOpts{lastEventID: last})
				continue
			}
			if ev.Type == "ready" {
				continue // of a reopened stream
			}
			require.NotEqual(t, "resync", ev.Type, "the log survived the outage: no resync expected")
			evs = append(evs, ev)
		case <-time.After(time.Until(deadline)):
		}
	}
	if reopened > 0 {
		t.Logf("alice's stream ended during the outage and was reopened %d time(s)", reopened)
	}
	rtConsecutive(t, pa, evs)
	require.Equal(t, 21, len(evs), "20 messages and the receipt: %s", rtDescribe(evs))
	require.Equal(t, rtSeqRange(2, 21), rtSeqs(rtMsgs(t, evs)))
	for i, m := range rtMsgs(t, evs) {
		require.Equal(t, sent[i].ID, m.ID)
	}
	require.Equal(t, rcpt.Data, evs[20].Data)
	require.Equal(t, rtSeqRange(2, 21), rtSeqs(rtHistory(t, alice.client, cid, m0.Seq)))
	testenv.Eventually(t, 10*time.Second, func() bool { return alice.do("GET", "/readyz", nil).Status == 200 }, "ready again")

	// Nothing more arrives: the next event is the next message.
	m := rtSend(t, alice.client, cid, "after")
	evs2 := rtReadMessages(t, cur.sseStream, 1, 15*time.Second)
	require.Equal(t, 1, len(evs2), "%s", rtDescribe(evs2))
	require.Equal(t, m.ID, rtMsgs(t, evs2)[0].ID)
}

// TestRealtimeServicesShutdown proves that a node with open streams stops promptly
// (streams end before http.Server.Shutdown) and its clients see a clean end
// of the stream.
func TestRealtimeServicesShutdown(t *testing.T) {
	t.Parallel()
	c := newCluster(t)
	n := c.start(t, nodeOpts{})
	other := c.start(t, nodeOpts{})
	var streams []*rtStream
	for i := range 5 {
		u := rtProvision(t, n.URL, fmt.Sprintf("user%d", i))
		s := rtOpen(t, n.URL, u.Token, rtStreamOpts{})
		rtWaitReady(t, s.sseStream, 10*time.Second)
		streams = append(streams, s)
	}
	w := rtProvision(t, other.URL, "witness")
	sw := rtOpen(t, other.URL, w.Token, rtStreamOpts{})
	rtWaitReady(t, sw.sseStream, 10*time.Second)
	require.Equal(t, 5, rtStreamsOpen(t, n))

	start := time.Now()
	n.stop(t)
	took := time.Since(start)
	require.Less(t, took, 5*time.Second, "shutdown with open streams took %s", took)

	errs := make([]error, len(streams))
	for i, s := range streams {
		_, errs[i] = rtWaitEnd(t, s, 5*time.Second)
	}
	for i, err := range errs {
		require.NoError(t, err, "stream %d must end with a clean EOF (a terminated chunked body), not a broken connection", i)
	}
	rtStillOpen(t, sw) // the other node is not affected
}
