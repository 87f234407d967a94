// Package realtimetest is the conformance suite of chat.Realtime: every
// implementation (Redis today, in-memory for the embedded mode later) must
// pass Run. It uses nothing but the chat interfaces, so what it checks is the
// contract the use cases rely on, not an implementation's internals.
package realtimetest

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"imd/chat"
	"imd/internal/testenv"
)

// Harness tells the suite how to make instances of the implementation.
type Harness struct {
	// New returns a fresh instance with its own empty backing store, cleaned
	// up when t ends.
	New func(t *testing.T) chat.Realtime
	// NewPeer returns another instance sharing rt's backing store: "another
	// node" of the same deployment, with its own subscriptions.
	NewPeer func(t *testing.T, rt chat.Realtime) chat.Realtime
	// LoseLogs makes rt's backing store lose everything it holds, as a Redis
	// restarted without persistence would.
	LoseLogs func(t *testing.T, rt chat.Realtime)
	// LogCap is how many entries per user New's instances retain; at least
	// 200 (the concurrency test reads 200 entries back). Keep it small: the
	// trimming test appends LogCap+10.
	LogCap int
	// EventBuffer is the per-subscription event buffer of New's instances.
	EventBuffer int
}

// wait bounds every wait for something asynchronous: generous, because a
// loaded CI machine is slow, and only ever reached when a test fails.
const wait = 5 * time.Second

// Run runs the whole suite, each test in parallel with its own instance.
func Run(t *testing.T, h Harness) {
	require.NotNil(t, h.New, "Harness.New")
	require.NotNil(t, h.NewPeer, "Harness.NewPeer")
	require.NotNil(t, h.LoseLogs, "Harness.LoseLogs")
	require.GreaterOrEqual(t, h.LogCap, 200, "Harness.LogCap")
	require.Positive(t, h.EventBuffer, "Harness.EventBuffer")

	tests := []struct {
		name string
		fn   func(*testing.T, Harness)
	}{
		{"EventLog/AppendReadResume", testAppendReadResume},
		{"EventLog/DedupeByKey", testDedupeByKey},
		{"EventLog/DedupeBySeq", testDedupeBySeq},
		{"EventLog/ConversationOrder", testConversationOrder},
		{"EventLog/SeveralUsersOneCall", testSeveralUsers},
		{"EventLog/SharedRound", testSharedRound},
		{"EventLog/Baseline", testBaseline},
		{"EventLog/Forget", testForget},
		{"EventLog/HeadSeqs", testHeadSeqs},
		{"EventLog/Epoch", testEpoch},
		{"EventLog/Trim", testTrim},
		{"EventLog/Ahead", testAhead},
		{"EventLog/ConcurrentAppenders", testConcurrentAppenders},
		{"Bus/AppendWakes", testAppendWakes},
		{"Bus/OtherNode", testOtherNode},
		{"Bus/Close", testBusClose},
		{"Bus/SlowSubscriber", testSlowSubscriber},
		{"Bus/DroppableOverflow", testDroppableOverflow},
		{"Bus/Broadcast", testBroadcast},
		{"Bus/BroadcastTopics", testBroadcastTopics},
		{"Bus/ListenClose", testListenClose},
		{"Presence/ConnectDisconnect", testPresence},
		{"Presence/Expiry", testPresenceExpiry},
		{"MemberCache", testMemberCache},
		{"MemberCache/InvalidateBeforeFill", testMemberInvalidate},
		{"SessionCache", testSessionCache},
		{"SessionCache/Empty", testSessionEmpty},
		{"SessionCache/AppendMoves", testAppendMovesSessions},
		{"RateLimiter", testRateLimiter},
		{"Ping", testPing},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			tc.fn(t, h)
		})
	}
}

func ctxFor(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	t.Cleanup(cancel)
	return ctx
}

// keyed is a durable event without seq, deduped by key.
func keyed(uid, key string, n int) chat.Delivery {
	return chat.Delivery{UserID: uid, Entry: &chat.LogEntry{
		Key: key, Type: chat.EventReceiptRead, ConversationID: "c-receipts",
		Data: fmt.Appendf(nil, `{"n":%d,"text":"a b\nc"}`, n),
	}}
}

// msg is message seq of conversation cid.
func msg(uid, cid string, seq int64) chat.Delivery {
	return chat.Delivery{UserID: uid, Entry: &chat.LogEntry{
		Key: fmt.Sprintf("m-%s-%d", cid, seq), Type: chat.EventMessageCreated, ConversationID: cid, Seq: seq,
		Data: fmt.Appendf(nil, `{"conversation_id":%q,"seq":%d}`, cid, seq),
	}}
}

func appendOK(t *testing.T, rt chat.Realtime, ds ...chat.Delivery) {
	t.Helper()
	gaps, err := rt.Append(ctxFor(t), ds)
	require.NoError(t, err)
	require.Empty(t, gaps)
}

func readAll(t *testing.T, rt chat.Realtime, uid string, from chat.Position) []chat.StreamEvent {
	t.Helper()
	evs, _, err := rt.Read(ctxFor(t), uid, from, 100000)
	require.NoError(t, err)
	return evs
}

// seqsOf returns the seqs of message.created events of cid.
func seqsOf(t *testing.T, evs []chat.StreamEvent, cid string) []int64 {
	t.Helper()
	var out []int64
	for _, ev := range evs {
		if ev.Type != chat.EventMessageCreated {
			continue
		}
		var m struct {
			ConversationID string `json:"conversation_id"`
			Seq            int64  `json:"seq"`
		}
		require.NoError(t, json.Unmarshal(ev.Data, &m), "data %s", ev.Data)
		if m.ConversationID == cid {
			out = append(out, m.Seq)
		}
	}
	return out
}

func offsetOf(t *testing.T, ev chat.StreamEvent) chat.Position {
	t.Helper()
	p, err := chat.ParsePosition(ev.ID)
	require.NoError(t, err, "event id %q", ev.ID)
	return p
}

func requireResync(t *testing.T, err error, reason string) {
	t.Helper()
	var re *chat.ResyncError
	require.True(t, errors.As(err, &re), "want a *chat.ResyncError(%s), got %v", reason, err)
	require.Equal(t, reason, re.Reason)
}

func testAppendReadResume(t *testing.T, h Harness) {
	rt := h.New(t)
	ctx := ctxFor(t)
	start, err := rt.Head(ctx, "alice")
	require.NoError(t, err)
	require.Zero(t, start.Offset, "a new log is empty")
	require.NotEmpty(t, start.Epoch)
	require.NotContains(t, start.Epoch, "-", "epochs never contain the id separator")

	appendOK(t, rt, keyed("alice", "o1", 1), msg("alice", "c1", 1), keyed("alice", "o2", 2))
	appendOK(t, rt, msg("alice", "c1", 2), msg("alice", "c2", 1))

	first, pos, err := rt.Read(ctx, "alice", start, 2)
	require.NoError(t, err)
	require.Len(t, first, 2)
	require.Equal(t, offsetOf(t, first[1]), pos, "the position of the last event returned")
	rest, pos2, err := rt.Read(ctx, "alice", pos, 100)
	require.NoError(t, err)
	require.Len(t, rest, 3)

	all := append(first, rest...)
	for i, ev := range all {
		p := offsetOf(t, ev)
		require.Equal(t, start.Epoch, p.Epoch)
		require.Equal(t, start.Offset+int64(i)+1, p.Offset, "ids grow by one")
	}
	require.Equal(t, chat.EventReceiptRead, all[0].Type)
	require.JSONEq(t, `{"n":1,"text":"a b\nc"}`, string(all[0].Data), "data comes back byte for byte")
	require.Equal(t, []int64{1, 2}, seqsOf(t, all, "c1"))
	require.Equal(t, []int64{1}, seqsOf(t, all, "c2"))

	head, err := rt.Head(ctx, "alice")
	require.NoError(t, err)
	require.Equal(t, pos2, head)

	none, same, err := rt.Read(ctx, "alice", head, 100)
	require.NoError(t, err)
	require.Empty(t, none)
	require.Equal(t, head, same, "no events: the position stays")

	// Resuming from the middle replays exactly what follows.
	mid := offsetOf(t, all[2])
	again, _, err := rt.Read(ctx, "alice", mid, 100)
	require.NoError(t, err)
	require.Equal(t, all[3:], again)

	other, err := rt.Head(ctx, "bob")
	require.NoError(t, err)
	require.Zero(t, other.Offset, "logs are per user")
}

func testDedupeByKey(t *testing.T, h Harness) {
	rt := h.New(t)
	ctx := ctxFor(t)
	appendOK(t, rt, keyed("alice", "o1", 1), keyed("alice", "o2", 2))
	head, err := rt.Head(ctx, "alice")
	require.NoError(t, err)
	require.EqualValues(t, 2, head.Offset)

	// A re-dispatch, alone or mixed with new events, and a duplicate within one call.
	appendOK(t, rt, keyed("alice", "o2", 2))
	appendOK(t, rt, keyed("alice", "o1", 1), keyed("alice", "o3", 3), keyed("alice", "o3", 3))

	evs := readAll(t, rt, "alice", chat.Position{Epoch: head.Epoch})
	require.Len(t, evs, 3)
	require.JSONEq(t, `{"n":3,"text":"a b\nc"}`, string(evs[2].Data))
	require.EqualValues(t, 3, offsetOf(t, evs[2]).Offset, "duplicates take no offset")
}

func testDedupeBySeq(t *testing.T, h Harness) {
	rt := h.New(t)
	appendOK(t, rt, msg("alice", "c1", 1), msg("alice", "c1", 2))
	// Same seqs again, even under other keys: no-ops.
	dup := msg("alice", "c1", 1)
	dup.Entry.Key = "another-key"
	appendOK(t, rt, dup, msg("alice", "c1", 2), msg("alice", "c1", 1))

	head, err := rt.Head(ctxFor(t), "alice")
	require.NoError(t, err)
	require.EqualValues(t, 2, head.Offset)
	evs := readAll(t, rt, "alice", chat.Position{Epoch: head.Epoch})
	require.Equal(t, []int64{1, 2}, seqsOf(t, evs, "c1"))
	require.EqualValues(t, 1, offsetOf(t, evs[0]).Offset, "the original offsets stay")
	require.EqualValues(t, 2, offsetOf(t, evs[1]).Offset)
}

func testConversationOrder(t *testing.T, h Harness) {
	rt := h.New(t)
	ctx := ctxFor(t)
	appendOK(t, rt, msg("alice", "c1", 1), msg("alice", "c1", 2), msg("alice", "c1", 3))

	gaps, err := rt.Append(ctx, []chat.Delivery{msg("alice", "c1", 5)})
	require.NoError(t, err)
	require.Equal(t, []chat.Gap{{UserID: "alice", ConversationID: "c1", LastSeq: 3, Seq: 5}}, gaps)
	head, err := rt.Head(ctx, "alice")
	require.NoError(t, err)
	require.EqualValues(t, 3, head.Offset, "a gap appends nothing")

	// Another conversation is not held up by c1's gap, in the same call.
	gaps, err = rt.Append(ctx, []chat.Delivery{msg("alice", "c1", 6), msg("alice", "c2", 1)})
	require.NoError(t, err)
	require.Equal(t, []chat.Gap{{UserID: "alice", ConversationID: "c1", LastSeq: 3, Seq: 6}}, gaps)

	appendOK(t, rt, msg("alice", "c1", 4))
	appendOK(t, rt, msg("alice", "c1", 5), msg("alice", "c1", 6)) // one call, in order
	evs := readAll(t, rt, "alice", chat.Position{Epoch: head.Epoch})
	require.Equal(t, []int64{1, 2, 3, 4, 5, 6}, seqsOf(t, evs, "c1"))
	require.Equal(t, []int64{1}, seqsOf(t, evs, "c2"))
}

func testSeveralUsers(t *testing.T, h Harness) {
	rt := h.New(t)
	ctx := ctxFor(t)
	appendOK(t, rt, msg("alice", "c1", 1), msg("bob", "c1", 1))
	// bob lacks seq 2: only his delivery of seq 3 is held back.
	appendOK(t, rt, msg("alice", "c1", 2))
	gaps, err := rt.Append(ctx, []chat.Delivery{msg("alice", "c1", 3), msg("bob", "c1", 3), msg("carol", "c1", 3)})
	require.NoError(t, err)
	// carol's log has no state for c1: seq 3 could be overtaking 1 and 2,
	// so it is held back with the start unknown (-1).
	require.Equal(t, []chat.Gap{
		{UserID: "bob", ConversationID: "c1", LastSeq: 1, Seq: 3},
		{UserID: "carol", ConversationID: "c1", LastSeq: -1, Seq: 3},
	}, gaps)

	for uid, want := range map[string][]int64{"alice": {1, 2, 3}, "bob": {1}, "carol": nil} {
		head, err := rt.Head(ctx, uid)
		require.NoError(t, err)
		require.Equal(t, want, seqsOf(t, readAll(t, rt, uid, chat.Position{Epoch: head.Epoch}), "c1"), uid)
	}
}

// testSharedRound: a dispatcher round of a group, every member given the
// same entries, several messages in one call, to logs that stand at
// different places; and a gap fill's round, which starts with a Baseline.
// Each log takes what continues it and reports the rest, as it would
// message by message.
func testSharedRound(t *testing.T, h Harness) {
	rt := h.New(t)
	ctx := ctxFor(t)
	appendOK(t, rt, msg("alice", "c1", 1), msg("alice", "c1", 2))                  // right before the round
	appendOK(t, rt, msg("bob", "c1", 1), msg("bob", "c1", 2), msg("bob", "c1", 3)) // has its first already
	appendOK(t, rt, msg("dave", "c1", 1))                                          // a message behind
	round := func(cid string, users []string, seqs ...int64) []chat.Delivery {
		var ds []chat.Delivery
		for _, seq := range seqs {
			e := msg("", cid, seq).Entry
			for _, uid := range users {
				ds = append(ds, chat.Delivery{UserID: uid, Entry: e})
			}
		}
		return ds
	}
	gaps, err := rt.Append(ctx, round("c1", []string{"alice", "bob", "carol", "dave"}, 3, 4, 5))
	require.NoError(t, err)
	require.Equal(t, []chat.Gap{
		{UserID: "carol", ConversationID: "c1", LastSeq: -1, Seq: 3},
		{UserID: "carol", ConversationID: "c1", LastSeq: -1, Seq: 4},
		{UserID: "carol", ConversationID: "c1", LastSeq: -1, Seq: 5},
		{UserID: "dave", ConversationID: "c1", LastSeq: 1, Seq: 3},
		{UserID: "dave", ConversationID: "c1", LastSeq: 1, Seq: 4},
		{UserID: "dave", ConversationID: "c1", LastSeq: 1, Seq: 5},
	}, gaps)
	// Not consecutive: what continues the log is taken, the rest reported.
	gaps, err = rt.Append(ctx, round("c1", []string{"alice", "bob"}, 6, 8))
	require.NoError(t, err)
	require.Equal(t, []chat.Gap{
		{UserID: "alice", ConversationID: "c1", LastSeq: 6, Seq: 8},
		{UserID: "bob", ConversationID: "c1", LastSeq: 6, Seq: 8},
	}, gaps)

	// A gap fill's round: its first entry says where it starts (Baseline),
	// which a log not knowing the conversation takes as its start.
	appendOK(t, rt, msg("frank", "c2", 1), msg("frank", "c2", 2), msg("frank", "c2", 3), msg("frank", "c2", 4))
	appendOK(t, rt, msg("gina", "c2", 1), msg("gina", "c2", 2))
	for seq := range int64(6) {
		appendOK(t, rt, msg("hal", "c2", seq+1))
	}
	fill := round("c2", []string{"erin", "frank", "gina", "hal"}, 5, 6, 7)
	fill[0].Entry.Baseline = 4 // shared by the four users' first entries
	gaps, err = rt.Append(ctx, fill)
	require.NoError(t, err)
	require.Equal(t, []chat.Gap{
		{UserID: "gina", ConversationID: "c2", LastSeq: 2, Seq: 5},
		{UserID: "gina", ConversationID: "c2", LastSeq: 2, Seq: 6},
		{UserID: "gina", ConversationID: "c2", LastSeq: 2, Seq: 7},
	}, gaps)
	// A conversation's first messages to a log that has never seen it.
	appendOK(t, rt, round("c2", []string{"ivy"}, 1, 2)...)

	want := map[string]map[string][]int64{
		"alice": {"c1": {1, 2, 3, 4, 5, 6}}, "bob": {"c1": {1, 2, 3, 4, 5, 6}}, "carol": {}, "dave": {"c1": {1}},
		"erin": {"c2": {5, 6, 7}}, "frank": {"c2": {1, 2, 3, 4, 5, 6, 7}}, "gina": {"c2": {1, 2}},
		"hal": {"c2": {1, 2, 3, 4, 5, 6, 7}}, "ivy": {"c2": {1, 2}},
	}
	for uid, convs := range want {
		head, err := rt.Head(ctx, uid)
		require.NoError(t, err)
		evs := readAll(t, rt, uid, chat.Position{Epoch: head.Epoch})
		lastSeqs, n := map[string]int64{}, 0
		for cid, seqs := range convs {
			require.Equal(t, seqs, seqsOf(t, evs, cid), "%s in %s", uid, cid)
			lastSeqs[cid], n = seqs[len(seqs)-1], n+len(seqs)
		}
		require.EqualValues(t, n, head.Offset, "%s: one entry per message taken", uid)
		if n > 0 {
			_, last, err := rt.HeadSeqs(ctx, uid)
			require.NoError(t, err)
			require.Equal(t, lastSeqs, last, uid)
		}
	}
}

func testBaseline(t *testing.T, h Harness) {
	rt := h.New(t)
	ctx := ctxFor(t)
	// alice is added to c1 at last_seq 10: she has not missed 1..10.
	added := chat.Delivery{UserID: "alice", Entry: &chat.LogEntry{
		Key: "o7", Type: chat.EventConversationCreated, ConversationID: "c1", Baseline: 10, Data: []byte(`{"id":"c1"}`),
	}}
	appendOK(t, rt, added)
	appendOK(t, rt, msg("alice", "c1", 11))
	appendOK(t, rt, msg("alice", "c1", 9)) // at or below the baseline: a duplicate

	gaps, err := rt.Append(ctx, []chat.Delivery{msg("alice", "c1", 13)})
	require.NoError(t, err)
	require.Equal(t, []chat.Gap{{UserID: "alice", ConversationID: "c1", LastSeq: 11, Seq: 13}}, gaps)

	// A baseline never moves the conversation back.
	lower := chat.Delivery{UserID: "alice", Entry: &chat.LogEntry{
		Key: "o8", Type: chat.EventConversationUpdated, ConversationID: "c1", Baseline: 5, Data: []byte(`{"id":"c1"}`),
	}}
	appendOK(t, rt, lower)
	appendOK(t, rt, msg("alice", "c1", 12))

	head, err := rt.Head(ctx, "alice")
	require.NoError(t, err)
	evs := readAll(t, rt, "alice", chat.Position{Epoch: head.Epoch})
	require.Len(t, evs, 4, "the baseline entries themselves are appended")
	require.Equal(t, chat.EventConversationCreated, evs[0].Type)
	require.Equal(t, []int64{11, 12}, seqsOf(t, evs, "c1"))
}

func testForget(t *testing.T, h Harness) {
	rt := h.New(t)
	appendOK(t, rt, msg("alice", "c1", 1), msg("alice", "c1", 2))
	removed := chat.Delivery{UserID: "alice", Entry: &chat.LogEntry{
		Key: "o9", Type: chat.EventMemberRemoved, ConversationID: "c1", Forget: true, Data: []byte(`{"user_id":"alice"}`),
	}}
	appendOK(t, rt, removed)
	// Re-joined much later: the conversation starts fresh in her log, so
	// without a baseline seq 40 is held back (start unknown)...
	gaps, err := rt.Append(ctxFor(t), []chat.Delivery{msg("alice", "c1", 40)})
	require.NoError(t, err)
	require.Equal(t, []chat.Gap{{UserID: "alice", ConversationID: "c1", LastSeq: -1, Seq: 40}}, gaps)
	// ...and with one (the dispatcher's gap fill, or the re-join's
	// conversation.created) it starts there.
	rejoin := msg("alice", "c1", 40)
	rejoin.Entry.Baseline = 39
	appendOK(t, rt, rejoin)
	// A re-dispatch of the old removal is a duplicate and must not forget again.
	appendOK(t, rt, removed)
	appendOK(t, rt, msg("alice", "c1", 40))

	head, err := rt.Head(ctxFor(t), "alice")
	require.NoError(t, err)
	evs := readAll(t, rt, "alice", chat.Position{Epoch: head.Epoch})
	require.Len(t, evs, 4)
	require.Equal(t, []int64{1, 2, 40}, seqsOf(t, evs, "c1"))
}

// HeadSeqs is Head with each conversation's last seq in the log, appended
// or baselined, as of that head; a forgotten conversation has none, and a
// new log none at all.
func testHeadSeqs(t *testing.T, h Harness) {
	rt := h.New(t)
	ctx := ctxFor(t)
	head, seqs, err := rt.HeadSeqs(ctx, "alice")
	require.NoError(t, err)
	require.NotNil(t, seqs, "known, and empty")
	require.Empty(t, seqs, "a new log")
	again, err := rt.Head(ctx, "alice")
	require.NoError(t, err)
	require.Equal(t, head, again, "the same head as Head's")

	appendOK(t, rt, msg("alice", "c1", 1), msg("alice", "c1", 2), keyed("alice", "k1", 1))
	added := chat.Delivery{UserID: "alice", Entry: &chat.LogEntry{
		Key: "o7", Type: chat.EventConversationCreated, ConversationID: "c2", Baseline: 10, Data: []byte(`{"id":"c2"}`),
	}}
	appendOK(t, rt, added, msg("alice", "c3", 1), msg("bob", "c4", 1))
	head, seqs, err = rt.HeadSeqs(ctx, "alice")
	require.NoError(t, err)
	require.Equal(t, map[string]int64{"c1": 2, "c2": 10, "c3": 1}, seqs)
	require.EqualValues(t, 5, head.Offset, "five entries of hers")
	again, err = rt.Head(ctx, "alice")
	require.NoError(t, err)
	require.Equal(t, head, again)

	removed := chat.Delivery{UserID: "alice", Entry: &chat.LogEntry{
		Key: "o9", Type: chat.EventMemberRemoved, ConversationID: "c1", Forget: true, Data: []byte(`{"user_id":"alice"}`),
	}}
	appendOK(t, rt, removed)
	_, seqs, err = rt.HeadSeqs(ctx, "alice")
	require.NoError(t, err)
	require.Equal(t, map[string]int64{"c2": 10, "c3": 1}, seqs, "c1 forgotten")

	// A lost log: a new epoch, and nothing known.
	h.LoseLogs(t, rt)
	lost, seqs, err := rt.HeadSeqs(ctx, "alice")
	require.NoError(t, err)
	require.NotEqual(t, head.Epoch, lost.Epoch)
	require.Empty(t, seqs)
}

func testEpoch(t *testing.T, h Harness) {
	rt := h.New(t)
	ctx := ctxFor(t)

	_, _, err := rt.Read(ctx, "alice", chat.Position{Epoch: "nosuchepoch", Offset: 0}, 10)
	requireResync(t, err, chat.ResyncEpoch)

	p1, err := rt.Head(ctx, "alice")
	require.NoError(t, err)
	p2, err := rt.Head(ctx, "alice")
	require.NoError(t, err)
	require.Equal(t, p1, p2, "Head creates the epoch once")

	_, _, err = rt.Read(ctx, "alice", chat.Position{Epoch: p1.Epoch + "x"}, 10)
	requireResync(t, err, chat.ResyncEpoch)

	appendOK(t, rt, keyed("alice", "o1", 1), keyed("alice", "o2", 2))
	evs := readAll(t, rt, "alice", p1)
	require.Len(t, evs, 2, "appends keep the epoch Head created")
	last := offsetOf(t, evs[1])

	h.LoseLogs(t, rt)
	_, _, err = rt.Read(ctx, "alice", last, 10)
	requireResync(t, err, chat.ResyncEpoch)

	// The next append starts a new log under a new epoch.
	appendOK(t, rt, keyed("alice", "o3", 3))
	p3, err := rt.Head(ctx, "alice")
	require.NoError(t, err)
	require.NotEqual(t, p1.Epoch, p3.Epoch)
	require.EqualValues(t, 1, p3.Offset)

	// Logs created by one Append get epochs of their own: one account's
	// event id must never be served from another account's log.
	appendOK(t, rt, keyed("carol", "o1", 1), keyed("dave", "o1", 1))
	pc, err := rt.Head(ctx, "carol")
	require.NoError(t, err)
	pd, err := rt.Head(ctx, "dave")
	require.NoError(t, err)
	require.NotEqual(t, pc.Epoch, pd.Epoch)
	_, _, err = rt.Read(ctx, "dave", chat.Position{Epoch: pc.Epoch, Offset: 0}, 10)
	requireResync(t, err, chat.ResyncEpoch)
	_, _, err = rt.Read(ctx, "alice", last, 10)
	requireResync(t, err, chat.ResyncEpoch)

	// And Head alone also starts one after a loss.
	h.LoseLogs(t, rt)
	p4, err := rt.Head(ctx, "alice")
	require.NoError(t, err)
	require.NotEqual(t, p3.Epoch, p4.Epoch)
	require.Zero(t, p4.Offset)
}

func testTrim(t *testing.T, h Harness) {
	rt := h.New(t)
	ctx := ctxFor(t)
	n := h.LogCap + 10
	ds := make([]chat.Delivery, n)
	for i := range ds {
		ds[i] = keyed("alice", fmt.Sprintf("o%d", i+1), i+1)
	}
	appendOK(t, rt, ds...)
	head, err := rt.Head(ctx, "alice")
	require.NoError(t, err)
	require.EqualValues(t, n, head.Offset)

	_, _, err = rt.Read(ctx, "alice", chat.Position{Epoch: head.Epoch, Offset: 1}, 10)
	requireResync(t, err, chat.ResyncExpired)
	_, _, err = rt.Read(ctx, "alice", chat.Position{Epoch: head.Epoch, Offset: 9}, 10)
	requireResync(t, err, chat.ResyncExpired)

	// Offsets 11..n are retained: reading from 10 (just before the oldest) works.
	evs, _, err := rt.Read(ctx, "alice", chat.Position{Epoch: head.Epoch, Offset: 10}, 5)
	require.NoError(t, err)
	require.Len(t, evs, 5)
	require.EqualValues(t, 11, offsetOf(t, evs[0]).Offset)
	all := readAll(t, rt, "alice", chat.Position{Epoch: head.Epoch, Offset: 10})
	require.Len(t, all, h.LogCap)

	last, _, err := rt.Read(ctx, "alice", chat.Position{Epoch: head.Epoch, Offset: int64(n - 1)}, 5)
	require.NoError(t, err)
	require.Len(t, last, 1)
	require.Equal(t, head, offsetOf(t, last[0]))
}

func testAhead(t *testing.T, h Harness) {
	rt := h.New(t)
	ctx := ctxFor(t)
	appendOK(t, rt, keyed("alice", "o1", 1))
	head, err := rt.Head(ctx, "alice")
	require.NoError(t, err)
	_, _, err = rt.Read(ctx, "alice", chat.Position{Epoch: head.Epoch, Offset: head.Offset + 1}, 10)
	requireResync(t, err, chat.ResyncAhead)
}

func testConcurrentAppenders(t *testing.T, h Harness) {
	rt := h.New(t)
	peer := h.NewPeer(t, rt)
	ctx := ctxFor(t)
	const n = 200
	var wg sync.WaitGroup
	errs := make(chan error, 2*n)
	for _, node := range []chat.Realtime{rt, peer} {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for seq := int64(1); seq <= n; seq++ {
				gaps, err := node.Append(ctx, []chat.Delivery{msg("alice", "c1", seq)})
				if err == nil && len(gaps) > 0 {
					err = fmt.Errorf("seq %d: unexpected gaps %v", seq, gaps)
				}
				if err != nil {
					errs <- err
					return
				}
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		require.NoError(t, err)
	}
	head, err := rt.Head(ctx, "alice")
	require.NoError(t, err)
	evs := readAll(t, rt, "alice", chat.Position{Epoch: head.Epoch})
	want := make([]int64, n)
	for i := range want {
		want[i] = int64(i + 1)
	}
	require.Equal(t, want, seqsOf(t, evs, "c1"), "each seq exactly once, in order")
}

func recvWake(t *testing.T, s chat.Subscription, what string) {
	t.Helper()
	select {
	case <-s.Wake():
	case <-time.After(wait):
		t.Fatalf("no wake-up within %v: %s", wait, what)
	}
}

// eventSource is a chat.Subscription or a chat.NodeSubscription.
type eventSource interface {
	Events() <-chan chat.StreamEvent
}

func recvEvent(t *testing.T, s eventSource, what string) chat.StreamEvent {
	t.Helper()
	select {
	case ev, ok := <-s.Events():
		require.True(t, ok, "Events closed: %s", what)
		return ev
	case <-time.After(wait):
		t.Fatalf("no event within %v: %s", wait, what)
		return chat.StreamEvent{}
	}
}

func drainWake(s chat.Subscription) {
	select {
	case <-s.Wake():
	default:
	}
}

func subscribe(t *testing.T, rt chat.Realtime, uid string) chat.Subscription {
	t.Helper()
	s, err := rt.Subscribe(ctxFor(t), uid)
	require.NoError(t, err)
	t.Cleanup(s.Close)
	return s
}

// busTopic is the topic the Bus tests broadcast on, unless they say otherwise.
const busTopic = chat.TopicTokens

// settler makes sure that what was published before has reached every
// subscription: an adapter hands events over one after another (the Redis
// one from its one receiver goroutine), so once one more, published to a
// user of the settler's own, has arrived, every earlier one has been
// offered to all of its subscriptions. A test that watched one
// subscription receive an event cannot assume the others were offered it
// yet, and reading them meanwhile makes room it did not mean to make.
type settler struct {
	rt  chat.Realtime
	sub chat.Subscription
	n   int
}

func newSettler(t *testing.T, rt chat.Realtime) *settler {
	return &settler{rt: rt, sub: subscribe(t, rt, "zz-settler")}
}

func (s *settler) settle(t *testing.T) {
	t.Helper()
	s.n++
	ev := chat.StreamEvent{Type: chat.EventTyping, Data: json.RawMessage(fmt.Sprintf(`{"settle":%d}`, s.n))}
	require.NoError(t, s.rt.Publish(ctxFor(t), []string{"zz-settler"}, ev))
	for {
		got := recvEvent(t, s.sub, "the settler's event")
		if string(got.Data) == string(ev.Data) {
			return
		}
	}
}

func listen(t *testing.T, rt chat.Realtime, topic chat.Topic) chat.NodeSubscription {
	t.Helper()
	s, err := rt.Listen(ctxFor(t), topic)
	require.NoError(t, err)
	t.Cleanup(s.Close)
	return s
}

func typing(uid string) chat.StreamEvent {
	return chat.StreamEvent{Type: chat.EventTyping, Data: json.RawMessage(
		fmt.Sprintf(`{"conversation_id":"c1","user_id":%q,"expires_in_ms":5000}`, uid))}
}

// typingN is typing event n, told apart by its data.
func typingN(n int) chat.StreamEvent {
	return chat.StreamEvent{Type: chat.EventTyping, Data: json.RawMessage(
		fmt.Sprintf(`{"conversation_id":"c1","user_id":"bob","expires_in_ms":%d}`, n))}
}

// controlType stands for the control events (a revoked token's end, say):
// any type but typing and presence, which must never be dropped silently.
const controlType chat.EventType = "_test_control"

func control(n int) chat.StreamEvent {
	return chat.StreamEvent{Type: controlType, Data: json.RawMessage(fmt.Sprintf(`{"n":%d}`, n))}
}

// noEvent fails if s holds an event or its Events is closed.
func noEvent(t *testing.T, s eventSource, what string) {
	t.Helper()
	select {
	case ev, ok := <-s.Events():
		if !ok {
			t.Fatalf("Events closed: %s", what)
		}
		t.Fatalf("unexpected event %s %s: %s", ev.Type, ev.Data, what)
	default:
	}
}

// errOf is the Err of an implementation's subscription that has one.
func errOf(s any) (error, bool) {
	e, ok := s.(interface{ Err() error })
	if !ok {
		return nil, false
	}
	return e.Err(), true
}

func testAppendWakes(t *testing.T, h Harness) {
	rt := h.New(t)
	peer := h.NewPeer(t, rt)
	here := subscribe(t, rt, "alice")
	there := subscribe(t, peer, "alice")
	drainWake(here)
	drainWake(there)
	appendOK(t, rt, keyed("alice", "o1", 1))
	recvWake(t, here, "append on this node")
	recvWake(t, there, "append on another node")

	// Wake-ups coalesce: many appends, at least one wake-up, and the log has all.
	for i := 2; i <= 20; i++ {
		appendOK(t, peer, keyed("alice", fmt.Sprintf("o%d", i), i))
	}
	recvWake(t, here, "appends on the other node")
	head, err := rt.Head(ctxFor(t), "alice")
	require.NoError(t, err)
	require.EqualValues(t, 20, head.Offset)
}

func testOtherNode(t *testing.T, h Harness) {
	rt := h.New(t)
	peer := h.NewPeer(t, rt)
	there := subscribe(t, peer, "bob")
	here := subscribe(t, rt, "bob")
	require.NoError(t, rt.Publish(ctxFor(t), []string{"bob", "nobody"}, typing("alice")))
	for _, s := range []chat.Subscription{there, here} {
		ev := recvEvent(t, s, "ephemeral event")
		require.Empty(t, ev.ID, "ephemeral events carry no id")
		require.Equal(t, chat.EventTyping, ev.Type)
		require.JSONEq(t, string(typing("alice").Data), string(ev.Data))
	}
	// Ephemeral events are not in the log.
	head, err := rt.Head(ctxFor(t), "bob")
	require.NoError(t, err)
	require.Zero(t, head.Offset)
}

func testBusClose(t *testing.T, h Harness) {
	rt := h.New(t)
	closed := subscribe(t, rt, "alice")
	open := subscribe(t, rt, "alice")
	closed.Close()
	closed.Close() // idempotent
	drainWake(closed)
	drainWake(open)

	require.NoError(t, rt.Publish(ctxFor(t), []string{"alice"}, typing("bob")))
	recvEvent(t, open, "the other subscription still receives")
	appendOK(t, rt, keyed("alice", "o1", 1))
	recvWake(t, open, "the other subscription is still woken")

	select {
	case ev, ok := <-closed.Events():
		require.False(t, ok, "a closed subscription got %v", ev)
	default:
	}
	select {
	case <-closed.Wake():
		t.Fatal("a closed subscription was woken")
	default:
	}

	// Subscribing again after the last one closed works.
	open.Close()
	again := subscribe(t, rt, "alice")
	drainWake(again)
	appendOK(t, rt, keyed("alice", "o2", 2))
	recvWake(t, again, "a new subscription after all closed")
}

func testSlowSubscriber(t *testing.T, h Harness) {
	rt := h.New(t)
	slow := subscribe(t, rt, "alice")
	fast := subscribe(t, rt, "alice")
	// Each event reaches every subscription before the next one does, but in
	// no set order among subscriptions: once fast has seen EventBuffer+2
	// events, event EventBuffer+1 has reached slow too, and slow overflowed.
	require.False(t, controlType.Droppable())
	for i := 0; i <= h.EventBuffer+1; i++ {
		ev := control(i)
		require.NoError(t, rt.Publish(ctxFor(t), []string{"alice"}, ev))
		got := recvEvent(t, fast, "a subscriber that keeps up")
		require.JSONEq(t, string(ev.Data), string(got.Data), "in order")
	}
	n := 0
	deadline := time.After(wait)
	for {
		select {
		case _, ok := <-slow.Events():
			if !ok {
				require.LessOrEqual(t, n, h.EventBuffer)
				if err, ok := errOf(slow); ok {
					require.Error(t, err, "why Events closed")
				}
				// A slow subscriber does not hold up the others.
				require.NoError(t, rt.Publish(ctxFor(t), []string{"alice"}, typing("bob")))
				recvEvent(t, fast, "after the slow one was dropped")
				return
			}
			n++
		case <-deadline:
			t.Fatalf("the Events of a subscriber %d events behind were not closed", h.EventBuffer+1)
		}
	}
}

// Typing and presence that do not fit in a subscription's buffer are
// dropped, and the subscription stays open: a burst of them must not end a
// healthy stream. A control event that does not fit still ends it, even
// when the buffer is full of droppable ones.
func testDroppableOverflow(t *testing.T, h Harness) {
	require.True(t, chat.EventTyping.Droppable())
	require.True(t, chat.EventPresence.Droppable())
	rt := h.New(t)
	ctx := ctxFor(t)
	slow := subscribe(t, rt, "alice")
	fast := subscribe(t, rt, "alice")
	settler := newSettler(t, rt)
	const extra = 3
	for i := range h.EventBuffer + extra {
		ev := typingN(i)
		if i%2 == 1 {
			ev = chat.StreamEvent{Type: chat.EventPresence, Data: json.RawMessage(fmt.Sprintf(`{"n":%d}`, i))}
		}
		require.NoError(t, rt.Publish(ctx, []string{"alice"}, ev))
		got := recvEvent(t, fast, "a subscriber that keeps up")
		require.JSONEq(t, string(ev.Data), string(got.Data))
	}
	// slow holds the first EventBuffer, in order; the rest were dropped.
	settler.settle(t)
	for i := range h.EventBuffer {
		got := recvEvent(t, slow, fmt.Sprintf("buffered event %d of a full subscription", i))
		want := typingN(i).Data
		if i%2 == 1 {
			want = json.RawMessage(fmt.Sprintf(`{"n":%d}`, i))
		}
		require.JSONEq(t, string(want), string(got.Data), "event %d", i)
	}
	noEvent(t, slow, "the events beyond the buffer were dropped")
	if err, ok := errOf(slow); ok {
		require.NoError(t, err, "dropping ephemeral events does not end the subscription")
	}
	// Still open: later events arrive.
	require.NoError(t, rt.Publish(ctx, []string{"alice"}, typingN(1000)))
	got := recvEvent(t, slow, "an event after the dropped ones")
	require.JSONEq(t, string(typingN(1000).Data), string(got.Data))
	recvEvent(t, fast, "the same event")

	// Full of droppable events, then a control event: the subscription ends.
	for i := range h.EventBuffer {
		require.NoError(t, rt.Publish(ctx, []string{"alice"}, typingN(2000+i)))
		recvEvent(t, fast, "refill")
	}
	require.NoError(t, rt.Publish(ctx, []string{"alice"}, control(1)))
	require.Equal(t, controlType, recvEvent(t, fast, "the control event").Type)
	settler.settle(t)
	for i := range h.EventBuffer {
		recvEvent(t, slow, fmt.Sprintf("buffered event %d", i))
	}
	select {
	case ev, ok := <-slow.Events():
		require.False(t, ok, "a control event that did not fit was dropped; got %s %s", ev.Type, ev.Data)
	case <-time.After(wait):
		t.Fatal("the Events of a subscriber that could not take a control event were not closed")
	}
	if err, ok := errOf(slow); ok {
		require.Error(t, err, "why Events closed")
	}
}

// Broadcast reaches the Listen-ers of every node, this one included, and
// no stream; Publish reaches streams and no Listen-er.
func testBroadcast(t *testing.T, h Harness) {
	rt := h.New(t)
	peer := h.NewPeer(t, rt)
	ctx := ctxFor(t)
	here := listen(t, rt, busTopic)
	there := listen(t, peer, busTopic)
	streamHere := subscribe(t, rt, "alice")
	streamThere := subscribe(t, peer, "alice")
	listeners := []chat.NodeSubscription{here, there}
	streams := []chat.Subscription{streamHere, streamThere}

	require.NoError(t, rt.Broadcast(ctx, busTopic, control(1)))
	for _, l := range listeners {
		ev := recvEvent(t, l, "a broadcast")
		require.Equal(t, controlType, ev.Type)
		require.Empty(t, ev.ID)
		require.JSONEq(t, `{"n":1}`, string(ev.Data))
	}
	// Publish to the user (and to names a careless implementation might
	// share with the node channel): streams get it, Listen-ers do not.
	require.NoError(t, peer.Publish(ctx, []string{"alice", "node", "_tokens"}, typing("bob")))
	for _, s := range streams {
		// The broadcast went first: had it reached a stream, it would be here.
		ev := recvEvent(t, s, "a publish after the broadcast")
		require.Equal(t, chat.EventTyping, ev.Type, "a broadcast reached a stream: %s", ev.Data)
	}
	require.NoError(t, peer.Broadcast(ctx, busTopic, control(2)))
	for _, l := range listeners {
		ev := recvEvent(t, l, "a broadcast after the publish")
		require.JSONEq(t, `{"n":2}`, string(ev.Data), "the publish reached a Listen-er: %s %s", ev.Type, ev.Data)
	}
	// Broadcasts carry data as JSON, "null" when empty, like Publish.
	require.NoError(t, rt.Broadcast(ctx, busTopic, chat.StreamEvent{Type: controlType}))
	for _, l := range listeners {
		require.JSONEq(t, "null", string(recvEvent(t, l, "an empty broadcast").Data))
	}
	for _, s := range streams {
		noEvent(t, s, "broadcasts do not reach streams")
	}
	// Broadcasts are not in any log.
	head, err := rt.Head(ctx, "alice")
	require.NoError(t, err)
	require.Zero(t, head.Offset)
}

// Broadcasts are kept apart by topic: a Listen-er hears its own topic's, from
// every node, and never another's (so a busy topic cannot fill the buffer of
// a rare one's Listen-er), nor what is published to a user id that looks like
// a topic. The empty topic is refused.
func testBroadcastTopics(t *testing.T, h Harness) {
	rt := h.New(t)
	peer := h.NewPeer(t, rt)
	ctx := ctxFor(t)
	topics := []chat.Topic{chat.TopicTokens, chat.TopicFanout}
	listeners := map[chat.Topic][]chat.NodeSubscription{}
	for _, topic := range topics {
		listeners[topic] = []chat.NodeSubscription{listen(t, rt, topic), listen(t, peer, topic)}
	}
	// expect checks that the next event of each of topic's Listen-ers is
	// control(n): whatever leaked in before it would come first.
	expect := func(topic chat.Topic, n int, what string) {
		t.Helper()
		for i, l := range listeners[topic] {
			ev := recvEvent(t, l, fmt.Sprintf("%s (%s Listen-er %d)", what, topic, i))
			require.JSONEq(t, fmt.Sprintf(`{"n":%d}`, n), string(ev.Data),
				"%s: %s Listen-er %d got %s %s", what, topic, i, ev.Type, ev.Data)
		}
	}
	n := 0
	for _, from := range []chat.Realtime{rt, peer} {
		for i, own := range topics {
			other := topics[1-i]
			// The other topic's event goes first: had it reached own's
			// Listen-ers, it would be the first thing they receive.
			require.NoError(t, from.Broadcast(ctx, other, control(n)))
			require.NoError(t, from.Broadcast(ctx, own, control(n+1)))
			expect(own, n+1, "its own topic's broadcast, after another topic's")
			// Had own's event reached them, the next round would find it.
			expect(other, n, "the other topic's broadcast")
			n += 2
		}
	}
	// User ids that a careless implementation might map onto a topic's
	// channel or key: streams' events, never a Listen-er's.
	var names []string
	for _, topic := range topics {
		names = append(names, string(topic), "node:"+string(topic), "\x00"+string(topic))
	}
	require.NoError(t, peer.Publish(ctx, append(names, "node", "\x00", ""), control(999)))
	for _, topic := range topics {
		require.NoError(t, rt.Broadcast(ctx, topic, control(n)))
		expect(topic, n, "a broadcast after a publish to topic-like user ids")
		n++
	}

	// The empty topic is no topic.
	for _, node := range []chat.Realtime{rt, peer} {
		require.Error(t, node.Broadcast(ctx, "", control(n)), "broadcast on the empty topic")
		s, err := node.Listen(ctx, "")
		require.Error(t, err, "listen on the empty topic")
		require.Nil(t, s)
	}
	for _, topic := range topics {
		require.NoError(t, rt.Broadcast(ctx, topic, control(n)))
		expect(topic, n, "a broadcast after the refused ones")
		n++
	}
}

// A closed Listen-er gets nothing more; the others do, and a node can listen
// again after its last one closed. Its buffer overflows as a stream's does.
func testListenClose(t *testing.T, h Harness) {
	rt := h.New(t)
	ctx := ctxFor(t)
	closed := listen(t, rt, busTopic)
	open := listen(t, rt, busTopic)
	closed.Close()
	closed.Close() // idempotent
	require.NoError(t, rt.Broadcast(ctx, busTopic, control(1)))
	recvEvent(t, open, "the other Listen-er still receives")
	select {
	case ev, ok := <-closed.Events():
		require.False(t, ok, "a closed Listen-er got %v", ev)
	default:
	}

	open.Close()
	again := listen(t, rt, busTopic)
	require.NoError(t, rt.Broadcast(ctx, busTopic, control(2)))
	require.JSONEq(t, `{"n":2}`, string(recvEvent(t, again, "a new Listen-er after all closed").Data))

	// A Listen-er that cannot take a control event is closed, never skips
	// it.
	fast := listen(t, rt, busTopic)
	for i := 0; i <= h.EventBuffer; i++ {
		require.NoError(t, rt.Broadcast(ctx, busTopic, control(10+i)))
		recvEvent(t, fast, "a Listen-er that keeps up")
	}
	newSettler(t, rt).settle(t)
	deadline := time.After(wait)
	for n := 0; ; n++ {
		select {
		case _, ok := <-again.Events():
			if !ok {
				require.LessOrEqual(t, n, h.EventBuffer)
				return
			}
		case <-deadline:
			t.Fatalf("the Events of a Listen-er %d events behind were not closed", h.EventBuffer+1)
		}
	}
}

func testPresence(t *testing.T, h Harness) {
	rt := h.New(t)
	ctx := ctxFor(t)
	before := time.Now()

	first, err := rt.Connect(ctx, "alice", "conn1", time.Minute)
	require.NoError(t, err)
	require.True(t, first)
	first, err = rt.Connect(ctx, "alice", "conn2", time.Minute)
	require.NoError(t, err)
	require.False(t, first)
	require.NoError(t, rt.Refresh(ctx, "alice", "conn1", time.Minute))

	info, err := rt.Lookup(ctx, []string{"alice", "nobody"})
	require.NoError(t, err)
	require.Equal(t, []chat.PresenceInfo{{UserID: "alice", Online: true}, {UserID: "nobody"}}, info)

	last, err := rt.Disconnect(ctx, "alice", "conn1")
	require.NoError(t, err)
	require.False(t, last)
	last, err = rt.Disconnect(ctx, "alice", "conn2")
	require.NoError(t, err)
	require.True(t, last)
	after := time.Now()

	info, err = rt.Lookup(ctx, []string{"alice"})
	require.NoError(t, err)
	require.Len(t, info, 1)
	require.False(t, info[0].Online)
	require.NotNil(t, info[0].LastSeenAt)
	seen := *info[0].LastSeenAt
	require.False(t, seen.Before(before.Add(-2*time.Second)) || seen.After(after.Add(2*time.Second)),
		"last seen %v, want between %v and %v", seen, before, after)

	first, err = rt.Connect(ctx, "alice", "conn3", time.Minute)
	require.NoError(t, err)
	require.True(t, first, "back online")
	info, err = rt.Lookup(ctx, []string{"alice"})
	require.NoError(t, err)
	require.True(t, info[0].Online)
	require.Nil(t, info[0].LastSeenAt, "online users have no last-seen time")
}

func testPresenceExpiry(t *testing.T, h Harness) {
	rt := h.New(t)
	ctx := ctxFor(t)
	const short = 300 * time.Millisecond
	// alice's stream is refreshed to a long ttl, carol's never is.
	_, err := rt.Connect(ctx, "alice", "a1", short)
	require.NoError(t, err)
	require.NoError(t, rt.Refresh(ctx, "alice", "a1", time.Hour))
	first, err := rt.Connect(ctx, "carol", "c1", short)
	require.NoError(t, err)
	require.True(t, first)

	testenv.Eventually(t, wait, func() bool {
		info, err := rt.Lookup(ctx, []string{"carol"})
		require.NoError(t, err)
		return !info[0].Online
	}, "a stream that is never refreshed expires")

	info, err := rt.Lookup(ctx, []string{"alice", "carol"})
	require.NoError(t, err)
	require.True(t, info[0].Online, "a refreshed stream outlives its first ttl")
	require.False(t, info[1].Online)

	first, err = rt.Connect(ctx, "carol", "c2", time.Minute)
	require.NoError(t, err)
	require.True(t, first, "an expired stream does not count")
}

func testMemberCache(t *testing.T, h Harness) {
	rt := h.New(t)
	ctx := ctxFor(t)
	_, ok, ver, err := CachedOne(ctx, rt, "g1")
	require.NoError(t, err)
	require.False(t, ok)
	_, ok, ver2, err := CachedOne(ctx, rt, "g1")
	require.NoError(t, err)
	require.False(t, ok)
	require.Equal(t, ver, ver2, "the version holds until a change")

	require.NoError(t, rt.FillMembers(ctx, "g1", ver, []string{"alice", "bob", "carol"}))
	members, ok, _, err := CachedOne(ctx, rt, "g1")
	require.NoError(t, err)
	require.True(t, ok)
	slices.Sort(members)
	require.Equal(t, []string{"alice", "bob", "carol"}, members)

	// Several at once, in the order asked, each as it would answer alone.
	_, _, verG2, err := CachedOne(ctx, rt, "g2")
	require.NoError(t, err)
	sets, err := rt.CachedMembers(ctx, []string{"g2", "g1", "g2"})
	require.NoError(t, err)
	require.Len(t, sets, 3)
	require.False(t, sets[0].OK)
	require.Equal(t, verG2, sets[0].Ver, "a miss carries the version to fill with")
	require.True(t, sets[1].OK)
	slices.Sort(sets[1].Members)
	require.Equal(t, []string{"alice", "bob", "carol"}, sets[1].Members)
	require.Equal(t, sets[0], sets[2])
	sets, err = rt.CachedMembers(ctx, nil)
	require.NoError(t, err)
	require.Empty(t, sets)

	// Invalidation drops the set; other conversations are unaffected.
	_, ok, _, err = CachedOne(ctx, rt, "g2")
	require.NoError(t, err)
	require.False(t, ok)
	require.NoError(t, rt.InvalidateMembers(ctx, "g1"))
	_, ok, ver3, err := CachedOne(ctx, rt, "g1")
	require.NoError(t, err)
	require.False(t, ok)
	require.NotEqual(t, ver, ver3)

	// An empty member list is not a cached answer.
	require.NoError(t, rt.FillMembers(ctx, "g1", ver3, nil))
	_, ok, _, err = CachedOne(ctx, rt, "g1")
	require.NoError(t, err)
	require.False(t, ok)
}

func testMemberInvalidate(t *testing.T, h Harness) {
	rt := h.New(t)
	ctx := ctxFor(t)
	_, ok, stale, err := CachedOne(ctx, rt, "g1")
	require.NoError(t, err)
	require.False(t, ok)
	// Between the miss and the fill, membership changes.
	require.NoError(t, rt.InvalidateMembers(ctx, "g1"))
	require.NoError(t, rt.FillMembers(ctx, "g1", stale, []string{"alice", "removed-user"}))
	_, ok, fresh, err := CachedOne(ctx, rt, "g1")
	require.NoError(t, err)
	require.False(t, ok, "a fill with a version older than an invalidation is dropped")

	require.NoError(t, rt.FillMembers(ctx, "g1", fresh, []string{"alice"}))
	members, ok, _, err := CachedOne(ctx, rt, "g1")
	require.NoError(t, err)
	require.True(t, ok)
	require.Equal(t, []string{"alice"}, members)
}

func ids(items []chat.Activity) []string {
	out := make([]string, len(items))
	for i, it := range items {
		out[i] = it.ConversationID
	}
	return out
}

func testSessionCache(t *testing.T, h Harness) {
	rt := h.New(t)
	ctx := ctxFor(t)
	_, ok, err := rt.SessionPage(ctx, "alice", nil, 10)
	require.NoError(t, err)
	require.False(t, ok)

	t0 := time.Date(2026, 1, 2, 3, 4, 5, 6_000_000, time.UTC)
	items := []chat.Activity{
		{ConversationID: "c1", At: t0},
		{ConversationID: "c2", At: t0.Add(time.Second)},
		{ConversationID: "c3", At: t0.Add(time.Second)}, // tie with c2: id descending
		{ConversationID: "c4", At: t0.Add(time.Second)},
		{ConversationID: "c5", At: t0.Add(3 * time.Second)},
	}
	require.NoError(t, rt.FillSessions(ctx, "alice", items))

	p1, ok, err := rt.SessionPage(ctx, "alice", nil, 2)
	require.NoError(t, err)
	require.True(t, ok)
	require.Equal(t, []string{"c5", "c4"}, ids(p1))
	require.True(t, p1[0].At.Equal(t0.Add(3*time.Second)), "times round-trip at ms precision: %v", p1[0].At)
	p2, _, err := rt.SessionPage(ctx, "alice", &p1[1], 2)
	require.NoError(t, err)
	require.Equal(t, []string{"c3", "c2"}, ids(p2), "strictly after the cursor, ties included")
	p3, _, err := rt.SessionPage(ctx, "alice", &p2[1], 2)
	require.NoError(t, err)
	require.Equal(t, []string{"c1"}, ids(p3))
	p4, ok, err := rt.SessionPage(ctx, "alice", &p3[0], 2)
	require.NoError(t, err)
	require.True(t, ok)
	require.Empty(t, p4)

	// Touch moves a conversation to the top of the lists that are cached,
	// never back in time, and adds conversations new to the list.
	require.NoError(t, rt.TouchSessions(ctx, []string{"alice", "bob"}, "c1", t0.Add(time.Hour)))
	require.NoError(t, rt.TouchSessions(ctx, []string{"alice"}, "c1", t0.Add(-time.Hour)))
	require.NoError(t, rt.TouchSessions(ctx, []string{"alice"}, "c9", t0.Add(2*time.Second)))
	all, _, err := rt.SessionPage(ctx, "alice", nil, 100)
	require.NoError(t, err)
	require.Equal(t, []string{"c1", "c5", "c9", "c4", "c3", "c2"}, ids(all))
	require.True(t, all[0].At.Equal(t0.Add(time.Hour)))
	_, ok, err = rt.SessionPage(ctx, "bob", nil, 10)
	require.NoError(t, err)
	require.False(t, ok, "touch does not create a list that was not cached")

	require.NoError(t, rt.RemoveSession(ctx, "alice", "c5"))
	all, _, err = rt.SessionPage(ctx, "alice", nil, 100)
	require.NoError(t, err)
	require.Equal(t, []string{"c1", "c9", "c4", "c3", "c2"}, ids(all))

	// Fill replaces the whole list.
	require.NoError(t, rt.FillSessions(ctx, "alice", items[:1]))
	all, _, err = rt.SessionPage(ctx, "alice", nil, 100)
	require.NoError(t, err)
	require.Equal(t, []string{"c1"}, ids(all))
}

// A message's log entry with an Activity moves its conversation in the
// recipient's cached list in the same step (never back, duplicates too), and
// leaves an uncached list uncached.
func testAppendMovesSessions(t *testing.T, h Harness) {
	rt := h.New(t)
	ctx := ctxFor(t)
	t0 := time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC)
	require.NoError(t, rt.FillSessions(ctx, "alice", []chat.Activity{
		{ConversationID: "c1", At: t0}, {ConversationID: "c2", At: t0.Add(time.Second)}}))
	list := func(uid string) []string {
		items, ok, err := rt.SessionPage(ctx, uid, nil, 10)
		require.NoError(t, err)
		if !ok {
			return nil
		}
		return ids(items)
	}
	msg := func(cid string, seq int64, at time.Time) *chat.LogEntry {
		return &chat.LogEntry{Key: fmt.Sprint("m", cid, seq), Type: chat.EventMessageCreated, ConversationID: cid,
			Seq: seq, Activity: at, Data: []byte(`{}`)}
	}
	e := msg("c1", 1, t0.Add(2*time.Second))
	_, err := rt.Append(ctx, []chat.Delivery{{UserID: "alice", Entry: e}, {UserID: "bob", Entry: e}})
	require.NoError(t, err)
	require.Equal(t, []string{"c1", "c2"}, list("alice"))
	require.Nil(t, list("bob"), "an uncached list stays uncached")

	_, err = rt.Append(ctx, []chat.Delivery{{UserID: "alice", Entry: msg("c2", 1, t0)}})
	require.NoError(t, err)
	require.Equal(t, []string{"c1", "c2"}, list("alice"), "an older activity does not move back")

	// A duplicate of c2's message, re-dispatched with a later time, still
	// moves it; a new conversation enters the list.
	_, err = rt.Append(ctx, []chat.Delivery{
		{UserID: "alice", Entry: msg("c2", 1, t0.Add(3*time.Second))},
		{UserID: "alice", Entry: msg("c3", 1, t0.Add(4*time.Second))},
	})
	require.NoError(t, err)
	require.Equal(t, []string{"c3", "c2", "c1"}, list("alice"))
	items, _, err := rt.SessionPage(ctx, "alice", nil, 1)
	require.NoError(t, err)
	require.True(t, items[0].At.Equal(t0.Add(4*time.Second)), "the activity time: %v", items[0].At)
	evs, _, err := rt.Read(ctx, "alice", chat.Position{}, 10)
	var rs *chat.ResyncError
	if errors.As(err, &rs) { // an implementation may want a real position: read from the head's epoch
		head, herr := rt.Head(ctx, "alice")
		require.NoError(t, herr)
		evs, _, err = rt.Read(ctx, "alice", chat.Position{Epoch: head.Epoch}, 10)
	}
	require.NoError(t, err)
	require.Len(t, evs, 3, "the duplicate was not appended")
}

func testSessionEmpty(t *testing.T, h Harness) {
	rt := h.New(t)
	ctx := ctxFor(t)
	require.NoError(t, rt.FillSessions(ctx, "alice", nil))
	items, ok, err := rt.SessionPage(ctx, "alice", nil, 10)
	require.NoError(t, err)
	require.True(t, ok, "an empty list is cached too")
	require.Empty(t, items)

	require.NoError(t, rt.TouchSessions(ctx, []string{"alice"}, "c1", time.Now()))
	items, ok, err = rt.SessionPage(ctx, "alice", nil, 10)
	require.NoError(t, err)
	require.True(t, ok)
	require.Equal(t, []string{"c1"}, ids(items))
	require.NoError(t, rt.RemoveSession(ctx, "alice", "c1"))
	items, ok, err = rt.SessionPage(ctx, "alice", nil, 10)
	require.NoError(t, err)
	require.True(t, ok, "removing the last conversation leaves an empty cached list")
	require.Empty(t, items)
}

func testRateLimiter(t *testing.T, h Harness) {
	rt := h.New(t)
	ctx := ctxFor(t)
	l := chat.Limit{Rate: 1, Period: time.Hour, Burst: 3}
	for i := 0; i < 5; i++ {
		ok, _, err := rt.Allow(ctx, "send:alice", l, 0)
		require.NoError(t, err)
		require.True(t, ok, "check %d: n=0 takes nothing", i)
	}
	for i := 0; i < 3; i++ {
		ok, _, err := rt.Allow(ctx, "send:alice", l, 1)
		require.NoError(t, err)
		require.True(t, ok, "burst %d", i)
	}
	ok, retry, err := rt.Allow(ctx, "send:alice", l, 1)
	require.NoError(t, err)
	require.False(t, ok, "burst exhausted")
	require.Positive(t, retry)
	require.LessOrEqual(t, retry, time.Hour)

	ok, retry, err = rt.Allow(ctx, "send:alice", l, 0)
	require.NoError(t, err)
	require.False(t, ok, "a check sees the exhausted bucket")
	require.Positive(t, retry)

	ok, _, err = rt.Allow(ctx, "send:bob", l, 2)
	require.NoError(t, err)
	require.True(t, ok, "keys are independent")
	ok, retry, err = rt.Allow(ctx, "send:bob", l, 2)
	require.NoError(t, err)
	require.False(t, ok, "2 more do not fit in a burst of 3 with 1 left")
	require.Greater(t, retry, 30*time.Minute, "n tokens take longer than one")
	ok, _, err = rt.Allow(ctx, "send:bob", l, 1)
	require.NoError(t, err)
	require.True(t, ok, "a denied request takes nothing")
}

func testPing(t *testing.T, h Harness) {
	require.NoError(t, h.New(t).Ping(ctxFor(t)))
}

// BenchAppend measures fan-out into the logs of any implementation: each
// Append delivers one message to 200 users, from one caller and from several
// concurrent ones (the dispatchers of several sends). open returns a fresh
// instance per sub-benchmark. As the dispatcher does, all recipients of a
// message share its entry (an adapter may send it once per call).
func BenchAppend(b *testing.B, open func(b *testing.B) chat.Realtime) {
	const users = 200
	data := []byte(`{"id":"01J8Z6Q4W2","conversation_id":"CONV","seq":0,"sender_id":"alice",` +
		`"text":"hello there, this is a typical short chat message","created_at":"2026-01-02T03:04:05.678Z"}`)
	var convs atomic.Int64
	// fanOut appends the next message of its own conversation to all users.
	fanOut := func(b *testing.B, rt chat.Realtime) func() {
		cid := fmt.Sprintf("c%d", convs.Add(1))
		ds := make([]chat.Delivery, users)
		seq := int64(0)
		return func() {
			seq++
			e := &chat.LogEntry{Key: fmt.Sprintf("o%s-%d", cid, seq), Type: chat.EventMessageCreated,
				ConversationID: cid, Seq: seq, Data: data}
			for u := range ds {
				ds[u] = chat.Delivery{UserID: fmt.Sprintf("u%d", u), Entry: e}
			}
			gaps, err := rt.Append(context.Background(), ds)
			if err != nil || len(gaps) > 0 {
				b.Errorf("append: %v, gaps %v", err, gaps)
			}
		}
	}
	b.Run("serial", func(b *testing.B) {
		next := fanOut(b, open(b))
		for b.Loop() {
			next()
		}
		b.ReportMetric(float64(b.N*users)/b.Elapsed().Seconds(), "recipients/s")
	})
	// round appends rounds of msgs messages of one conversation to members
	// users at once, as the dispatcher does under load.
	round := func(b *testing.B, msgs, members int) {
		rt := open(b)
		cid := fmt.Sprintf("c%d", convs.Add(1))
		seq := int64(0)
		ds := make([]chat.Delivery, 0, msgs*members)
		for b.Loop() {
			ds = ds[:0]
			for range msgs {
				seq++
				e := &chat.LogEntry{Key: fmt.Sprintf("o%s-%d", cid, seq), Type: chat.EventMessageCreated,
					ConversationID: cid, Seq: seq, Data: data}
				for u := range members {
					ds = append(ds, chat.Delivery{UserID: fmt.Sprintf("u%d", u), Entry: e})
				}
			}
			gaps, err := rt.Append(context.Background(), ds)
			if err != nil || len(gaps) > 0 {
				b.Errorf("append: %v, gaps %v", err, gaps)
			}
		}
		b.ReportMetric(float64(b.N*msgs*members)/b.Elapsed().Seconds(), "recipients/s")
	}
	// A large group's round: 32 messages to every member (one script call
	// holds many members, each taking all 32).
	b.Run("batch32", func(b *testing.B) { round(b, 32, users) })
	// A busy group's round: 256 messages to 50 members (the hot
	// scenario's), where a call carries many entries for a few members.
	b.Run("batch256", func(b *testing.B) { round(b, 256, 50) })
	b.Run("parallel", func(b *testing.B) {
		rt := open(b)
		b.SetParallelism(4) // 4 callers per CPU
		b.ResetTimer()
		b.RunParallel(func(pb *testing.PB) {
			next := fanOut(b, rt)
			for pb.Next() {
				next()
			}
		})
		b.ReportMetric(float64(b.N*users)/b.Elapsed().Seconds(), "recipients/s")
	})
}

// CachedOne is MemberCache.CachedMembers for one conversation.
func CachedOne(ctx context.Context, c chat.MemberCache, cid string) ([]string, bool, string, error) {
	sets, err := c.CachedMembers(ctx, []string{cid})
	if err != nil {
		return nil, false, "", err
	}
	return sets[0].Members, sets[0].OK, sets[0].Ver, nil
}
