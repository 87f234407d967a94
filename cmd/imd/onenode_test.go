package main

import (
	"fmt"
	"net/url"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"imd/chat"
	"imd/internal/testenv"
)

// One-node counterparts of the Services tests that need distinct nodes
// (TestRealtimeServicesCommitWithoutDispatch, TestRealtimeServicesShutdown),
// so that the guarantees they check on one node are checked in the embedded
// mode too; and what a restart keeps, which differs between the modes.

// TestRealtimeOneNodeSweeper proves G6's crash case on a single node: an
// event the fast path dropped (as if the process died right after the
// commit) reaches every stream through the outbox sweeper, once, in order,
// and the next message follows it without a gap.
func TestRealtimeOneNodeSweeper(t *testing.T) {
	t.Parallel()
	n := newCluster(t).start(t, nodeOpts{hooks: chat.Hooks{SkipFastDispatch: func(ev chat.OutboxEvent) bool {
		return ev.Type == chat.EventMessageCreated && ev.Seq == 1
	}}})
	alice, bob := rtProvision(t, n.URL, "alice"), rtProvision(t, n.URL, "bob")
	cid := rtGroup(t, bob.client, "alice")
	streams := []*rtStream{rtOpen(t, n.URL, alice.Token, rtStreamOpts{}), rtOpen(t, n.URL, bob.Token, rtStreamOpts{})}
	readies := make([]chat.Position, len(streams))
	for i, s := range streams {
		_, readies[i] = rtWaitReady(t, s.sseStream, 10*time.Second)
	}

	start := time.Now()
	m1 := rtSend(t, alice.client, cid, "committed, never fast-dispatched")
	for i, s := range streams {
		evs := rtReadMessages(t, s.sseStream, 1, 15*time.Second)
		if i == 0 {
			// The sweeper takes events older than 2 s: had the fast path
			// delivered it, this test would prove nothing.
			require.GreaterOrEqual(t, time.Since(start), 1500*time.Millisecond, "delivered too early for the sweeper")
		}
		ms := rtMsgs(t, evs)
		require.Len(t, ms, 1, "%s", rtDescribe(evs))
		require.Equal(t, m1.ID, ms[0].ID)
		readies[i] = rtConsecutive(t, readies[i], evs)
	}
	m2 := rtSend(t, bob.client, cid, "fast")
	for i, s := range streams {
		evs := rtReadMessages(t, s.sseStream, 1, 15*time.Second)
		require.Equal(t, 1, len(evs), "%s", rtDescribe(evs))
		require.Equal(t, m2.ID, rtMsgs(t, evs)[0].ID)
		rtConsecutive(t, readies[i], evs)
	}
}

// TestRealtimeOneNodeShutdown proves that a node with open streams stops
// promptly and its clients see a clean end of the stream.
func TestRealtimeOneNodeShutdown(t *testing.T) {
	t.Parallel()
	n := newCluster(t).start(t, nodeOpts{})
	var streams []*rtStream
	for i := range 5 {
		u := rtProvision(t, n.URL, fmt.Sprintf("user%d", i))
		s := rtOpen(t, n.URL, u.Token, rtStreamOpts{})
		rtWaitReady(t, s.sseStream, 10*time.Second)
		streams = append(streams, s)
	}
	require.Equal(t, 5, rtStreamsOpen(t, n))

	start := time.Now()
	n.stop(t)
	took := time.Since(start)
	require.Less(t, took, 5*time.Second, "shutdown with open streams took %s", took)
	for i, s := range streams {
		_, err := rtWaitEnd(t, s, 5*time.Second)
		require.NoError(t, err, "stream %d must end with a clean EOF (a terminated chunked body), not a broken connection", i)
	}
}

// TestRealtimeRestart: what a node restarted on the same storage keeps.
// Everything durable survives in both modes (accounts, tokens,
// conversations, messages, seq). The event logs survive with Redis, so a
// stream resumes across the restart without a gap; in the embedded mode
// they lived in the process's memory, so a resuming stream gets resync
// (epoch: a new log), never a silent gap (G5), and REST has everything.
func TestRealtimeRestart(t *testing.T) {
	t.Parallel()
	c := newCluster(t)
	n := c.start(t, nodeOpts{})
	alice, bob := rtProvision(t, n.URL, "alice"), rtProvision(t, n.URL, "bob")
	s1 := rtOpen(t, n.URL, alice.Token, rtStreamOpts{})
	_, p0 := rtWaitReady(t, s1.sseStream, 10*time.Second)
	cid := rtGroup(t, bob.client, "alice")
	for i := range 3 {
		rtSend(t, bob.client, cid, fmt.Sprintf("before %d", i))
	}
	last := rtConsecutive(t, p0, rtReadMessages(t, s1.sseStream, 3, 15*time.Second))
	n.stop(t)
	_, err := rtWaitEnd(t, s1, 5*time.Second)
	require.NoError(t, err)

	n2 := c.start(t, nodeOpts{})
	aliceOn2, bobOn2 := rtOn(alice, n2), rtOn(bob, n2)
	require.Equal(t, rtSeqRange(1, 3), rtSeqs(rtHistory(t, aliceOn2, cid, 0)), "messages survive the restart")
	m := rtSend(t, bobOn2, cid, "after the restart")
	require.EqualValues(t, 4, m.Seq, "seq continues")

	if c.embedded {
		// Message 4 is committed, but its dispatch to the new process's log
		// is asynchronous, and that log does not know where the
		// conversation stands for alice: the dispatch fills it from the
		// store (the messages before 4 too, as a new log must). A stream
		// that resynced before that dispatch would get all of them after
		// its ready, as entries new to this log; wait for it, so that the
		// resync's "from now" is after message 4.
		_, head := rtPoll(t, aliceOn2, "")
		from := rtPosition(t, head)
		from.Offset = 0
		testenv.Eventually(t, 20*time.Second, func() bool {
			evs, _ := rtPoll(t, aliceOn2, "last_event_id="+url.QueryEscape(from.String()))
			for _, msg := range rtMsgs(t, rtOfType(evs, "message.created")) {
				if msg.ID == m.ID {
					return true
				}
			}
			return false
		}, "message 4 in the new log")
		s2 := rtOpen(t, n2.URL, alice.Token, rtStreamOpts{lastEventID: last.String()})
		first := s2.next(10 * time.Second)
		require.Equal(t, "resync", first.Type, "first event: %s", rtDescribe([]sseEvent{first}))
		require.Equal(t, map[string]any{"reason": chat.ResyncEpoch}, rtData(t, first))
		before, ready := rtWaitReady(t, s2.sseStream, 10*time.Second)
		require.Empty(t, before, "after a resync the stream continues from now: %s", rtDescribe(before))
		require.NotEqual(t, last.Epoch, ready.Epoch, "the log of the new process is a new epoch")
		live := rtSend(t, bobOn2, cid, "live")
		// Message 4 comes first if its dispatch reached the new log only
		// after the stream's ready (a 201 means committed, not appended).
		before, ev := rtWaitFor(t, s2.sseStream, 15*time.Second, "the live message", func(e sseEvent) bool {
			return e.Type == "message.created" && rtMsgs(t, []sseEvent{e})[0].ID == live.ID
		})
		evs := append(before, ev)
		rtConsecutive(t, ready, evs)
		got := rtSeqs(rtMsgs(t, evs))
		require.Equal(t, rtSeqRange(got[0], live.Seq), got, "%s", rtDescribe(evs))
		require.GreaterOrEqual(t, got[0], m.Seq)
		return
	}
	// Services: the log is in Redis; the stream resumes where it was.
	rtAwaitLog(t, aliceOn2, last.String(), 1)
	s2 := rtOpen(t, n2.URL, alice.Token, rtStreamOpts{lastEventID: last.String()})
	before, ready := rtWaitReady(t, s2.sseStream, 15*time.Second)
	require.Equal(t, 1, len(before), "exactly the message sent after the restart: %s", rtDescribe(before))
	require.Equal(t, ready, rtConsecutive(t, last, before))
	require.Equal(t, m.ID, rtMsgs(t, before)[0].ID)
}
