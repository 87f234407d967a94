package main

import (
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"imd/chat"
	"imd/internal/testenv"
)

// TestRealtimeClusterDelivery proves G4 across nodes: 10 senders on 3 nodes
// send 300 messages at once into a group of 20 whose streams are spread over
// the nodes; every stream gets every message exactly once, in seq order, with
// consecutive event ids.
func TestRealtimeClusterDelivery(t *testing.T) {
	t.Parallel()
	c := newCluster(t)
	nodes := []*node{c.start(t, nodeOpts{}), c.start(t, nodeOpts{}), c.start(t, nodeOpts{})}

	const members, senders, perSender = 20, 10, 30
	users := make([]user, members)
	ids := make([]string, 0, members-1)
	for i := range users {
		users[i] = rtProvision(t, nodes[i%3].URL, fmt.Sprintf("member%02d", i))
		if i > 0 {
			ids = append(ids, users[i].ID)
		}
	}
	cid := rtGroup(t, users[0].client, ids...)

	// Every stream open and live before the first send.
	streams := make([]*rtStream, members)
	readies := make([]chat.Position, members)
	befores := make([][]sseEvent, members)
	for i, u := range users {
		streams[i] = rtOpen(t, nodes[i%3].URL, u.Token, rtStreamOpts{})
	}
	for i, s := range streams {
		befores[i], readies[i] = rtWaitReady(t, s.sseStream, 10*time.Second)
	}

	var (
		wg   sync.WaitGroup
		mu   sync.Mutex
		sent = map[string]int64{} // message id → seq
		errs []error
	)
	for si := range senders {
		u := users[si]
		base := nodes[si%3].URL
		wg.Go(func() {
			for k := range perSender {
				m, err := rtPost(base, u.Token, cid, fmt.Sprintf("%s #%d", u.ID, k))
				mu.Lock()
				if err != nil {
					errs = append(errs, err)
				} else {
					sent[m.ID] = m.Seq
				}
				mu.Unlock()
				if err != nil {
					return
				}
			}
		})
	}
	wg.Wait()
	require.Empty(t, errs, "sends")
	require.Len(t, sent, senders*perSender)
	total := int64(senders * perSender)

	got := make([][]sseEvent, members)
	for i, s := range streams {
		got[i] = rtReadInOrder(t, s.sseStream, cid, 1, total, 60*time.Second, users[i].ID+": "+rtSeqStateRegression)
	}
	// A sentinel after everything: whatever a stream shows between message
	// 300 and it would be a duplicate (or a stray event).
	sentinel := rtSend(t, rtOn(users[0], nodes[1]), cid, "sentinel")
	require.EqualValues(t, total+1, sentinel.Seq)
	sent[sentinel.ID] = sentinel.Seq
	for i, s := range streams {
		got[i] = append(got[i], rtReadMessages(t, s.sseStream, 1, 30*time.Second)...)
	}

	for i := range streams {
		who := users[i].ID
		// Before ready only what was appended between the stream's head and
		// its first read (the group's creation, at most).
		for _, ev := range befores[i] {
			require.Equal(t, "conversation.created", ev.Type, "%s: before ready: %s", who, rtDescribe(befores[i]))
		}
		if len(befores[i]) > 0 {
			require.Equal(t, befores[i][len(befores[i])-1].ID, readies[i].String(), "%s: ready must carry the last replayed id", who)
		}
		evs := got[i]
		rtConsecutive(t, readies[i], evs)
		extra := 0
		for _, ev := range evs {
			if ev.Type != "message.created" {
				require.Equal(t, "conversation.created", ev.Type, "%s: unexpected event %s", who, rtDescribe([]sseEvent{ev}))
				extra++
			}
		}
		require.LessOrEqual(t, extra+len(befores[i]), 1, "%s: conversation.created more than once", who)
		ms := rtMsgs(t, evs)
		require.Equal(t, rtSeqRange(1, total+1), rtSeqs(ms), "%s: seqs must be 1..%d in order, each once", who, total+1)
		seen := map[string]bool{}
		for _, m := range ms {
			require.False(t, seen[m.ID], "%s: message %s twice", who, m.ID)
			seen[m.ID] = true
			seq, ok := sent[m.ID]
			require.True(t, ok, "%s: message %s was never sent", who, m.ID)
			require.Equal(t, seq, m.Seq, "%s: message %s seq", who, m.ID)
			require.Equal(t, cid, m.ConversationID)
		}
		require.Len(t, seen, len(sent), "%s: distinct messages", who)
		rtStillOpen(t, streams[i])
	}
}

// TestRealtimeMultiDevice proves that every stream of a user gets everything
// (the same events with the same ids, since they read one log), and that a
// read receipt reaches the reader's other device and the other member.
func TestRealtimeMultiDevice(t *testing.T) {
	t.Parallel()
	c := newCluster(t)
	n1, n2 := c.start(t, nodeOpts{}), c.start(t, nodeOpts{})
	alice := rtProvision(t, n1.URL, "alice")
	bob := rtProvision(t, n2.URL, "bob")
	alice2 := rtMintToken(t, n1.URL, "alice")

	// Streams first, then the group: the creation is an event too.
	a1 := rtOpen(t, n1.URL, alice.Token, rtStreamOpts{})
	a2 := rtOpen(t, n2.URL, alice2, rtStreamOpts{})
	b := rtOpen(t, n1.URL, bob.Token, rtStreamOpts{})
	_, pa1 := rtWaitReady(t, a1.sseStream, 10*time.Second)
	_, pa2 := rtWaitReady(t, a2.sseStream, 10*time.Second)
	_, pb := rtWaitReady(t, b.sseStream, 10*time.Second)
	require.Equal(t, pa1, pa2, "two streams of one user are at the same position of one log")

	cid := rtGroup(t, bob.client, "alice")
	for i := range 10 {
		via := bob.client
		if i%2 == 1 {
			via = rtOn(bob, n1)
		}
		rtSend(t, via, cid, fmt.Sprintf("m%d", i))
	}
	r := rtOn(alice, n2).do("PUT", path("/v1/conversations/%s/read", cid), map[string]any{"seq": 10})
	require.Equal(t, 200, r.Status, "%s", r.Body)
	require.EqualValues(t, 10, r.M(t)["last_read_seq"])

	receipt := func(s *rtStream, after chat.Position) []sseEvent {
		t.Helper()
		before, ev := rtWaitFor(t, s.sseStream, 15*time.Second, "receipt.read", func(e sseEvent) bool { return e.Type == "receipt.read" })
		evs := append(before, ev)
		rtConsecutive(t, after, evs)
		require.Equal(t, 12, len(evs), "conversation.created, 10 messages, receipt.read: %s\n(a message missing? %s)", rtDescribe(evs), rtSeqStateRegression)
		require.Equal(t, "conversation.created", evs[0].Type)
		require.Equal(t, rtSeqRange(1, 10), rtSeqs(rtMsgs(t, evs)))
		require.Equal(t, map[string]any{"conversation_id": cid, "user_id": "alice", "seq": float64(10)}, rtData(t, ev))
		return evs
	}
	e1 := receipt(a1, pa1)
	e2 := receipt(a2, pa2)
	require.Equal(t, e1, e2, "alice's devices get the same events with the same ids")
	receipt(b, pb)

	// Read positions only move forward: re-reading an older seq is no event.
	r = alice.do("PUT", path("/v1/conversations/%s/read", cid), map[string]any{"seq": 5})
	require.Equal(t, 200, r.Status, "%s", r.Body)
	require.EqualValues(t, 10, r.M(t)["last_read_seq"])
	last := rtSend(t, bob.client, cid, "after")
	for _, s := range []*rtStream{a1, a2, b} {
		evs := rtReadMessages(t, s.sseStream, 1, 15*time.Second)
		require.Equal(t, 1, len(evs), "nothing but the new message (no receipt for a backward read): %s", rtDescribe(evs))
		require.Equal(t, last.ID, rtMsgs(t, evs)[0].ID)
	}
}

// TestRealtimeOfflineCatchUp proves G5's replay: a stream reopened with its
// last event id (header, or query parameter) gets exactly what it missed, in
// order, then ready at the last replayed id, then live events.
func TestRealtimeOfflineCatchUp(t *testing.T) {
	t.Parallel()
	c := newCluster(t)
	n1, n2 := c.start(t, nodeOpts{}), c.start(t, nodeOpts{})
	alice := rtProvision(t, n1.URL, "alice")
	bob := rtProvision(t, n2.URL, "bob")

	s1 := rtOpen(t, n1.URL, alice.Token, rtStreamOpts{})
	_, p0 := rtWaitReady(t, s1.sseStream, 10*time.Second)
	cid := rtGroup(t, bob.client, "alice")
	for i := range 5 {
		rtSend(t, bob.client, cid, fmt.Sprintf("seen %d", i))
	}
	evs := rtReadMessages(t, s1.sseStream, 5, 15*time.Second)
	last := rtConsecutive(t, p0, evs)
	require.Equal(t, rtSeqRange(1, 5), rtSeqs(rtMsgs(t, evs)))
	lastID := evs[len(evs)-1].ID
	require.Equal(t, last.String(), lastID)
	s1.Close()

	var missed []chat.Message
	for i := range 50 {
		missed = append(missed, rtSend(t, bob.client, cid, fmt.Sprintf("missed %d", i)))
	}
	// A 201 means committed; the append to alice's log follows. Wait for it,
	// so that the replay below must hold all 50 before ready.
	rtAwaitLog(t, alice.client, lastID, 50)

	// Header form, on the other node.
	s2 := rtOpen(t, n2.URL, alice.Token, rtStreamOpts{lastEventID: lastID})
	before, ready := rtWaitReady(t, s2.sseStream, 15*time.Second)
	require.Equal(t, 50, len(before), "exactly the 50 missed events before ready: %s", rtDescribe(before))
	end := rtConsecutive(t, last, before)
	got := rtMsgs(t, before)
	require.Len(t, got, 50)
	for i, m := range got {
		require.Equal(t, missed[i].ID, m.ID, "replay %d", i)
		require.Equal(t, missed[i].Seq, m.Seq)
	}
	require.Equal(t, end, ready, "ready carries the last replayed id")

	live := rtSend(t, rtOn(bob, n1), cid, "live")
	evs = rtReadMessages(t, s2.sseStream, 1, 15*time.Second)
	require.Equal(t, 1, len(evs), "%s", rtDescribe(evs))
	rtConsecutive(t, end, evs)
	require.Equal(t, live.ID, rtMsgs(t, evs)[0].ID)

	// Query form, from the same old position: the 50 and the live one.
	s3 := rtOpen(t, n1.URL, alice.Token, rtStreamOpts{query: "last_event_id=" + lastID})
	before3, ready3 := rtWaitReady(t, s3.sseStream, 15*time.Second)
	require.Equal(t, 51, len(before3), "%s", rtDescribe(before3))
	require.Equal(t, append(before, evs...), before3, "the same events with the same ids")
	require.Equal(t, evs[0].ID, ready3.String())

	// The header wins over the query parameter (it is what EventSource sends).
	s4 := rtOpen(t, n2.URL, alice.Token, rtStreamOpts{lastEventID: evs[0].ID, query: "last_event_id=garbage"})
	before4, ready4 := rtWaitReady(t, s4.sseStream, 15*time.Second)
	require.Empty(t, before4, "no resync and nothing to replay: %s", rtDescribe(before4))
	require.Equal(t, evs[0].ID, ready4.String())
}

// TestRealtimeOutboxDrains: what the dispatcher delivered is deleted from
// the outbox (in batches, after the delivery), so sweepers do not deliver it
// again and again; each message is delivered exactly once all the same.
func TestRealtimeOutboxDrains(t *testing.T) {
	t.Parallel()
	c := newCluster(t)
	n1 := c.start(t, nodeOpts{})
	alice := rtProvision(t, n1.URL, "alice")
	bob := rtProvision(t, n1.URL, "bob")
	s := rtOpen(t, n1.URL, alice.Token, rtStreamOpts{})
	rtWaitReady(t, s.sseStream, 10*time.Second)
	cid := rtGroup(t, bob.client, "alice")
	for i := range 30 {
		rtSend(t, bob.client, cid, fmt.Sprintf("m%d", i))
	}
	evs := rtReadMessages(t, s.sseStream, 30, 15*time.Second)
	require.Equal(t, rtSeqRange(1, 30), rtSeqs(rtMsgs(t, evs)))
	db := apiDB(t, c.dbURL)
	testenv.Eventually(t, 10*time.Second, func() bool {
		var n int
		require.NoError(t, db.Get(&n, "SELECT count(*) FROM outbox"))
		return n == 0
	}, "the outbox empties once its events are delivered")
}

// TestRealtimeFastPathAlone: with no sweeper, every message still arrives,
// in order: concurrent sends into one group are handed to the dispatcher by
// the store's committer in commit order (chat.CommitOrdered), not left to
// the outbox sweeper's retries.
func TestRealtimeFastPathAlone(t *testing.T) {
	t.Parallel()
	c := newCluster(t)
	n1 := c.start(t, nodeOpts{hooks: chat.Hooks{NoSweeper: true}})
	alice := rtProvision(t, n1.URL, "alice")
	bob := rtProvision(t, n1.URL, "bob")
	carol := rtProvision(t, n1.URL, "carol")
	s := rtOpen(t, n1.URL, alice.Token, rtStreamOpts{})
	rtWaitReady(t, s.sseStream, 10*time.Second)
	cid := rtGroup(t, bob.client, "alice", "carol")
	var wg sync.WaitGroup
	for _, u := range []user{bob, carol} {
		for range 3 {
			wg.Go(func() {
				for i := range 10 {
					rtSend(t, u.client, cid, fmt.Sprintf("m%d", i))
				}
			})
		}
	}
	wg.Wait()
	evs := rtReadMessages(t, s.sseStream, 60, 15*time.Second)
	require.Equal(t, rtSeqRange(1, 60), rtSeqs(rtMsgs(t, evs)), "every message once, in seq order, by the fast path alone")
}

// TestRealtimeDirectMessages: a direct conversation's messages reach both
// members' streams (the sender's other devices too) on every node, once
// each and in seq order, with no member set looked up for them: the send
// batch hands the pair to the dispatcher (store.directTo). Replies from
// both sides interleave in one conversation.
func TestRealtimeDirectMessages(t *testing.T) {
	t.Parallel()
	c := newCluster(t)
	n1, n2 := c.start(t, nodeOpts{}), c.start(t, nodeOpts{})
	alice := rtProvision(t, n1.URL, "alice")
	bob := rtProvision(t, n2.URL, "bob")
	alice2 := rtMintToken(t, n2.URL, "alice")
	cid := rtDirect(t, alice.client, "bob")

	streams := map[string]*rtStream{
		"alice on n1": rtOpen(t, n1.URL, alice.Token, rtStreamOpts{}),
		"alice on n2": rtOpen(t, n2.URL, alice2, rtStreamOpts{}),
		"bob on n1":   rtOpen(t, n1.URL, bob.Token, rtStreamOpts{}),
	}
	for _, s := range streams {
		rtWaitReady(t, s.sseStream, 10*time.Second)
	}
	for i := range 12 {
		from := alice.client
		if i%3 == 2 {
			from = rtOn(bob, n1)
		}
		rtSend(t, from, cid, fmt.Sprintf("d%d", i))
	}
	for name, s := range streams {
		rtReadInOrder(t, s.sseStream, cid, 1, 12, 15*time.Second, name)
	}
}
