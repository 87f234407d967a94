package main

import (
	"fmt"
	"net/url"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"imd/chat"
	"imd/internal/testenv"
)

// TestRealtimeFanoutFastPath: with the fan-out fast path on (groups of 2 and
// more here), a group's messages reach the streams of its members on both
// nodes ahead of their logs, once each and in seq order, whichever node
// sent them; a stream resumed on the other node from the last id it got
// (which says how far it was ahead of its log) gets exactly the rest; a
// poll from such an id leaves out what the stream had; and no stream of a
// removed member or of an outsider gets what the group sends (G7).
func TestRealtimeFanoutFastPath(t *testing.T) {
	t.Parallel()
	c := newCluster(t)
	opts := nodeOpts{env: map[string]string{"IMD_FANOUT_FAST": "2"}}
	n1, n2 := c.start(t, opts), c.start(t, opts)
	alice := rtProvision(t, n1.URL, "alice")
	bob := rtProvision(t, n2.URL, "bob")
	carol := rtProvision(t, n2.URL, "carol")
	dave := rtProvision(t, n1.URL, "dave")
	eve := rtProvision(t, n1.URL, "eve") // never a member
	cid := rtGroup(t, alice.client, "bob", "carol", "dave")
	outsider := rtOpen(t, n2.URL, eve.Token, rtStreamOpts{})
	rtWaitReady(t, outsider.sseStream, 10*time.Second)

	streams := map[string]*rtStream{
		"alice on n2": rtOpen(t, n2.URL, alice.Token, rtStreamOpts{}),
		"bob on n1":   rtOpen(t, n1.URL, bob.Token, rtStreamOpts{}),
		"carol on n2": rtOpen(t, n2.URL, carol.Token, rtStreamOpts{}),
		"dave on n2":  rtOpen(t, n2.URL, dave.Token, rtStreamOpts{}),
	}
	for _, s := range streams {
		rtWaitReady(t, s.sseStream, 10*time.Second)
	}
	send := func(from, to int) {
		for i := from; i <= to; i++ {
			sender := alice.client
			if i%2 == 0 {
				sender = bob.client // on n2
			}
			rtSend(t, sender, cid, fmt.Sprintf("m%d", i))
		}
	}
	send(1, 15)
	ahead := 0
	last := map[string]string{}
	for name, s := range streams {
		evs := rtReadInOrder(t, s.sseStream, cid, 1, 15, 15*time.Second, name)
		for _, ev := range rtDurable(evs) {
			cur, err := chat.ParseCursor(ev.ID)
			require.NoError(t, err, "%s: id %q", name, ev.ID)
			if len(cur.Ahead) > 0 {
				ahead++
			}
			last[name] = ev.ID
		}
	}
	require.Positive(t, ahead, "no message came ahead of the log: the fast path did not work")

	// dave leaves with the id of seq 15 and comes back on the other node
	// after 15 more messages; carol is removed from the group before them.
	streams["dave on n2"].Close()
	require.Equal(t, 204, alice.client.do("DELETE", path("/v1/conversations/%s/members/carol", cid), nil).Status)
	removed := streams["carol on n2"]
	delete(streams, "carol on n2")
	send(16, 30)
	resumed := rtOpen(t, n1.URL, dave.Token, rtStreamOpts{lastEventID: last["dave on n2"]})
	evs := rtReadInOrder(t, resumed.sseStream, cid, 16, 30, 15*time.Second,
		"resumed from "+last["dave on n2"]+": a repeat of an earlier seq is a duplicate")
	for name, s := range streams {
		if name != "dave on n2" {
			rtReadInOrder(t, s.sseStream, cid, 16, 30, 15*time.Second, name)
		}
	}
	// G7: neither the removed member nor someone who never was one gets a
	// message of the group sent after it: each reads until a direct message
	// from alice sent after all of them.
	for name, c := range map[string]*rtStream{"carol (removed)": removed, "eve (outsider)": outsider} {
		peer := map[string]string{"carol (removed)": "carol", "eve (outsider)": "eve"}[name]
		direct := rtDirect(t, alice.client, peer)
		rtSend(t, alice.client, direct, "after the group's")
		before, _ := rtWaitFor(t, c.sseStream, 15*time.Second, "the direct message", func(e sseEvent) bool {
			return e.Type == "message.created" && rtMsgs(t, []sseEvent{e})[0].ConversationID == direct
		})
		for _, m := range rtMsgs(t, before) {
			require.False(t, m.ConversationID == cid && m.Seq > 15, "%s got seq %d of the group", name, m.Seq)
		}
	}

	// Nothing more for dave: no seq delivered twice after the replay.
	dave30 := rtDurable(evs)[len(rtDurable(evs))-1].ID
	rtSend(t, alice.client, cid, "m31")
	rtReadInOrder(t, resumed.sseStream, cid, 31, 31, 15*time.Second, "the next message, once")

	// A poll from an id ahead of the log leaves out what the stream had:
	// from dave's seq-30 id it finds seq 31 and nothing before it.
	rtPollUntil(t, rtOn(dave, n2), dave30, cid, 30, 31)
}

// rtPollUntil polls c from id until seq want of cid comes, failing on any
// message of cid at or below had: a poll leaves out what the id says was
// delivered.
func rtPollUntil(t *testing.T, c *client, id, cid string, had, want int64) {
	t.Helper()
	testenv.Eventually(t, 15*time.Second, func() bool {
		evs, _ := rtPoll(t, c, "last_event_id="+url.QueryEscape(id))
		found := false
		for _, m := range rtMsgs(t, evs) {
			if m.ConversationID == cid {
				require.Greater(t, m.Seq, had, "a poll from %s repeated what the id says was delivered", id)
				found = found || m.Seq == want
			}
		}
		return found
	}, fmt.Sprintf("seq %d of %s in the log", want, cid))
}

// TestRealtimeFanoutLongPoll: a long poll answers with a large group's next
// message from the fast path, without waiting for the member's log, which
// takes such messages in rounds of up to half a second (here: never, the
// dispatcher drops them and no sweeper runs); a poll from the id it
// returned neither repeats that message nor misses the next one, which
// comes through the log.
func TestRealtimeFanoutLongPoll(t *testing.T) {
	t.Parallel()
	var hold atomic.Bool
	waiting := make(chan string, 64)
	n := newCluster(t).start(t, nodeOpts{env: map[string]string{"IMD_FANOUT_FAST": "2"}, hooks: chat.Hooks{
		NoSweeper: true,
		SkipFastDispatch: func(ev chat.OutboxEvent) bool {
			return hold.Load() && ev.Type == chat.EventMessageCreated
		},
		PollWaiting: func(uid string) {
			select {
			case waiting <- uid:
			default:
			}
		},
	}})
	alice := rtProvision(t, n.URL, "alice")
	bob := rtProvision(t, n.URL, "bob")
	cid := rtGroup(t, alice.client, "bob")
	_, start := rtPoll(t, bob.client, "")

	// m1 through the log: the poll below starts after it.
	rtSend(t, alice.client, cid, "m1")
	var last string
	testenv.Eventually(t, 15*time.Second, func() bool {
		evs, next := rtPoll(t, bob.client, "last_event_id="+url.QueryEscape(start))
		for _, m := range rtMsgs(t, evs) {
			if m.ConversationID == cid && m.Seq == 1 {
				last = next
				return true
			}
		}
		return false
	}, "m1 in bob's log")

	// m2 only through the fast path, sent once the poll waits.
	hold.Store(true)
	done := rtLongPoll(n.URL, bob.Token, last)
	select {
	case uid := <-waiting:
		require.Equal(t, "bob", uid)
	case <-time.After(15 * time.Second):
		t.Fatal("the long poll did not start waiting")
	}
	rtSend(t, alice.client, cid, "m2")
	a := rtAwaitPoll(t, done, "m2 (its log never gets it: only the fast path could)")
	evs, next := rtDecodePoll(t, a.body)
	msgs := rtMsgs(t, evs)
	require.Len(t, msgs, 1, "%+v", evs)
	require.Equal(t, int64(2), msgs[0].Seq)
	require.Equal(t, next, evs[0].ID, "the id to poll from next is the message's")
	cur, err := chat.ParseCursor(next)
	require.NoError(t, err)
	require.Equal(t, []chat.Ahead{{ConversationID: cid, Seq: 2}}, cur.Ahead, "the id says the poll was ahead of its log")

	// m3 through the log again: from m2's id, a poll finds m3 and never m2.
	hold.Store(false)
	rtSend(t, alice.client, cid, "m3")
	rtPollUntil(t, bob.client, next, cid, 2, 3)
}

// TestRealtimeFanoutLongEventID: a stream ahead of its log in maxAhead (4)
// large groups writes event ids longer than a bare position; a client
// resumes from the last one, as a Last-Event-ID header and as a poll's
// last_event_id, and gets each group's next message once and nothing it
// had. The logs never get the first round (dropped, no sweeper), so the
// stream stays ahead in all four groups.
func TestRealtimeFanoutLongEventID(t *testing.T) {
	t.Parallel()
	var hold atomic.Bool
	hold.Store(true)
	n := newCluster(t).start(t, nodeOpts{env: map[string]string{"IMD_FANOUT_FAST": "2"}, hooks: chat.Hooks{
		NoSweeper: true,
		SkipFastDispatch: func(ev chat.OutboxEvent) bool {
			return hold.Load() && ev.Type == chat.EventMessageCreated
		},
	}})
	alice := rtProvision(t, n.URL, "alice")
	bob := rtProvision(t, n.URL, "bob")
	var cids []string
	for range 4 {
		cids = append(cids, rtGroup(t, alice.client, "bob"))
	}
	s := rtOpen(t, n.URL, bob.Token, rtStreamOpts{})
	rtWaitReady(t, s.sseStream, 10*time.Second)
	// Each message to the four groups: the stream takes seq from each.
	readRound := func(s *rtStream, seq int64, why string) string {
		t.Helper()
		got := map[string]bool{}
		evs, last := rtWaitFor(t, s.sseStream, 15*time.Second, why, func(e sseEvent) bool {
			if e.Type == "message.created" {
				m := rtMsgs(t, []sseEvent{e})[0]
				require.Equal(t, seq, m.Seq, "%s: %s seq %d", why, m.ConversationID, m.Seq)
				got[m.ConversationID] = true
			}
			return len(got) == len(cids)
		})
		for _, e := range evs {
			if e.Type == "message.created" {
				require.Equal(t, seq, rtMsgs(t, []sseEvent{e})[0].Seq, why)
			}
		}
		return last.ID
	}
	for _, cid := range cids {
		rtSend(t, alice.client, cid, "m1")
	}
	id := readRound(s, 1, "the first round, from the fast path")
	cur, err := chat.ParseCursor(id)
	require.NoError(t, err)
	require.Len(t, cur.Ahead, len(cids), "ahead in every group: %s", id)
	s.Close()

	// Offsets and seqs grow with a deployment's age: the same id with
	// 12-digit seqs is well past a bare position's length, and still
	// accepted in both places.
	long := chat.Cursor{Pos: cur.Pos}
	for _, a := range cur.Ahead {
		long.Ahead = append(long.Ahead, chat.Ahead{ConversationID: a.ConversationID, Seq: 999_999_999_999})
	}
	require.Greater(t, len(long.String()), 128)
	rtPoll(t, bob.client, "last_event_id="+url.QueryEscape(long.String()))
	old := rtOpen(t, n.URL, bob.Token, rtStreamOpts{lastEventID: long.String()})
	rtWaitReady(t, old.sseStream, 10*time.Second)
	old.Close()
	// Longer than any id the server writes (512): a resync, as openapi.yaml says.
	tooLong := cur.Pos.String() + strings.Repeat("~c.1", 130)
	rejected, _ := rtPoll(t, bob.client, "last_event_id="+url.QueryEscape(tooLong))
	require.NotEmpty(t, rejected)
	require.Equal(t, "resync", rejected[0].Type)

	pevs, _ := rtPoll(t, bob.client, "last_event_id="+url.QueryEscape(id))
	require.Empty(t, rtMsgs(t, pevs), "a poll from the id finds nothing it had")

	resumed := rtOpen(t, n.URL, bob.Token, rtStreamOpts{lastEventID: id})
	rtWaitReady(t, resumed.sseStream, 10*time.Second)
	hold.Store(false)
	for _, cid := range cids {
		rtSend(t, alice.client, cid, "m2")
	}
	readRound(resumed, 2, "the next round, resumed from "+id)
}
