package chat

import (
	"context"
	"fmt"
	"log/slog"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

// testQueue returns a worker queue holding its, queued as enqueue would.
func testQueue(its ...queued) *workQueue {
	q := &workQueue{ch: make(chan queued, queueDepth)}
	for _, it := range its {
		if it.urgent {
			q.urgent.Add(1)
		}
		q.ch <- it
	}
	return q
}

func coveredMsg(id int64) queued {
	return queued{ev: OutboxEvent{ID: id, ConversationID: "big", Type: EventMessageCreated, Seq: id}}
}

func urgentMsg(id int64) queued {
	return queued{ev: OutboxEvent{ID: id, ConversationID: "dm", Type: EventMessageCreated, Seq: id}, urgent: true}
}

func ids(evs []OutboxEvent) []int64 {
	out := []int64{}
	for _, ev := range evs {
		out = append(out, ev.ID)
	}
	return out
}

// TestDispatchRound: a round of fast-path messages waits for more of them
// until its gather ends; an urgent event (anything the live streams did not
// get from the fast path) ends the wait at once, also when it was queued
// behind the first message and taken without waiting. The gather here is
// an hour, so a round that waited for it would end only with the test's
// context (ok false).
func TestDispatchRound(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	d := &dispatcher{gather: time.Hour}

	q := testQueue(coveredMsg(1), urgentMsg(2), coveredMsg(3))
	batch, fast, ok := d.round(ctx, q, nil)
	require.True(t, ok, "the urgent event queued behind a fast-path message did not end the gather")
	require.False(t, fast)
	require.Equal(t, []int64{1, 2, 3}, ids(batch))
	require.Zero(t, q.urgent.Load(), "urgent events counted out as taken")

	q = testQueue(coveredMsg(1), coveredMsg(2))
	go func() { q.urgent.Add(1); q.ch <- urgentMsg(3) }()
	batch, fast, ok = d.round(ctx, q, nil)
	require.True(t, ok, "an urgent event arriving during the gather did not end it")
	require.False(t, fast)
	require.Equal(t, []int64{1, 2, 3}, ids(batch))

	q = testQueue(urgentMsg(1), coveredMsg(2))
	batch, fast, ok = d.round(ctx, q, nil)
	require.True(t, ok, "a round that starts urgent does not gather")
	require.False(t, fast)
	require.Equal(t, []int64{1, 2}, ids(batch))

	d.gather = time.Millisecond
	q = testQueue(coveredMsg(1), coveredMsg(2), coveredMsg(3))
	batch, fast, ok = d.round(ctx, q, nil)
	require.True(t, ok)
	require.True(t, fast, "a round of only fast-path messages")
	require.Equal(t, []int64{1, 2, 3}, ids(batch))

	var full []queued
	for i := range maxBatch + 1 {
		full = append(full, coveredMsg(int64(i+1)))
	}
	d.gather = time.Hour
	batch, fast, ok = d.round(ctx, testQueue(full...), nil)
	require.True(t, ok, "a full round does not wait")
	require.True(t, fast)
	require.Len(t, batch, maxBatch)
}

// appendRecorder is a Realtime whose Append records its calls; nothing
// else of it may be used.
type appendRecorder struct {
	Realtime
	calls [][]Delivery
}

func (r *appendRecorder) Append(_ context.Context, ds []Delivery) ([]Gap, error) {
	r.calls = append(r.calls, ds)
	return nil, nil
}

// TestAppendRoundPaced: a paced round is appended in steps of at most
// paceUsers users, each user's entries in one step and in order, with a
// pause between steps while paced says so and none once it does not; an
// unpaced round is one Append.
func TestAppendRoundPaced(t *testing.T) {
	ctx := context.Background()
	const users = 150 // three steps: 64, 64, 22
	entries := []*LogEntry{{Key: "e1"}, {Key: "e2"}}
	var ds []Delivery
	for _, e := range entries { // as deliver builds them: by event, then user
		for u := range users {
			ds = append(ds, Delivery{UserID: fmt.Sprint("u", u), Entry: e})
		}
	}
	rec := &appendRecorder{}
	var pauses []time.Duration
	d := &dispatcher{s: &Service{rt: rec}, pause: func(_ context.Context, d time.Duration) { pauses = append(pauses, d) }}

	require.NoError(t, d.appendRound(ctx, ds, nil))
	require.Equal(t, [][]Delivery{ds}, rec.calls)
	require.Empty(t, pauses)

	for _, waiting := range []bool{false, true} {
		rec.calls, pauses = nil, nil
		require.NoError(t, d.appendRound(ctx, ds, func() bool { return !waiting }))
		require.Len(t, rec.calls, 3)
		stepOf := map[string]int{}
		got := map[string][]*LogEntry{}
		for i, call := range rec.calls {
			inStep := map[string]bool{}
			for _, dl := range call {
				inStep[dl.UserID] = true
				if j, ok := stepOf[dl.UserID]; ok {
					require.Equal(t, j, i, "%s's entries split over two steps", dl.UserID)
				}
				stepOf[dl.UserID] = i
				got[dl.UserID] = append(got[dl.UserID], dl.Entry)
			}
			require.LessOrEqual(t, len(inStep), paceUsers)
		}
		require.Len(t, got, users)
		for u, es := range got {
			require.Equal(t, entries, es, "%s's entries, in order", u)
		}
		if waiting {
			require.Empty(t, pauses, "no pause while an urgent event waits")
		} else {
			gap := min(paceStep, paceWithin/2)
			require.Equal(t, []time.Duration{gap, gap}, pauses)
		}
	}
}

// historyStore is a Store whose Messages serves one conversation's
// messages 1..n, and whose PendingMessages says the outbox holds messages
// from pending on (0: none); nothing else of it may be used.
type historyStore struct {
	Store
	n, pending int64
}

func (h historyStore) PendingMessages(_ context.Context, cids []string) (map[string]int64, error) {
	out := map[string]int64{}
	if h.pending > 0 {
		for _, cid := range cids {
			out[cid] = h.pending
		}
	}
	return out, nil
}

func (h historyStore) Messages(_ context.Context, cid string, q HistoryQuery) ([]Message, bool, error) {
	var out []Message
	for seq := q.AfterSeq + 1; seq <= h.n && len(out) < q.Limit; seq++ {
		out = append(out, Message{ID: fmt.Sprint("m", seq), ConversationID: cid, Seq: seq})
	}
	return out, len(out) == q.Limit, nil
}

// TestFillGapsShared: a fill gives each user of a conversation the
// messages its log lacks, in order, and makes each message's entry once
// for all of them (as deliver does, so that the log adapter sends it once
// per call); a first entry with a Baseline is shared by the users whose
// fill starts there.
func TestFillGapsShared(t *testing.T) {
	rec := &appendRecorder{}
	// The outbox holds more than gapFillBatch of c1's messages: the fills
	// of c and d, whose logs do not know c1, start gapFillBatch back.
	s := &Service{rt: rec, store: historyStore{n: 600, pending: 50}}
	require.NoError(t, s.fillGaps(context.Background(), []Gap{
		{UserID: "a", ConversationID: "c1", LastSeq: 597, Seq: 599},
		{UserID: "a", ConversationID: "c1", LastSeq: 597, Seq: 600},
		{UserID: "b", ConversationID: "c1", LastSeq: 595, Seq: 600},
		{UserID: "c", ConversationID: "c1", LastSeq: -1, Seq: 600},
		{UserID: "d", ConversationID: "c1", LastSeq: -1, Seq: 600},
	}))
	require.Len(t, rec.calls, 1)
	got := map[string][]*LogEntry{}
	for _, dl := range rec.calls[0] {
		got[dl.UserID] = append(got[dl.UserID], dl.Entry)
	}
	seqs := func(es []*LogEntry) (out []int64) {
		for _, e := range es {
			out = append(out, e.Seq)
		}
		return out
	}
	span := func(lo, hi int64) (out []int64) {
		for seq := lo; seq <= hi; seq++ {
			out = append(out, seq)
		}
		return out
	}
	require.Equal(t, span(598, 600), seqs(got["a"]))
	require.Equal(t, span(596, 600), seqs(got["b"]))
	require.Equal(t, span(100, 600), seqs(got["c"]))
	require.Equal(t, span(100, 600), seqs(got["d"]))
	require.EqualValues(t, 99, got["c"][0].Baseline, "c's log learns where the fill starts")
	require.Same(t, got["c"][0], got["d"][0], "one start for both")
	for _, e := range append(got["a"], got["b"]...) {
		require.Zero(t, e.Baseline)
	}
	bySeq := map[int64]*LogEntry{}
	for _, uid := range []string{"a", "b", "c", "d"} {
		for i, e := range got[uid] {
			if (uid == "c" || uid == "d") && i == 0 {
				continue // the start, with the Baseline
			}
			if first, ok := bySeq[e.Seq]; ok {
				require.Same(t, first, e, "seq %d: one entry for every user", e.Seq)
			}
			bySeq[e.Seq] = e
		}
	}
}

// TestFillGapsFromPending: a log that does not know where a conversation
// stands is filled from the conversation's oldest message still in the
// outbox (only such a message can still arrive), not from further back; a
// known log's fill is not bounded by the outbox.
func TestFillGapsFromPending(t *testing.T) {
	ctx := context.Background()
	for _, tc := range []struct {
		name    string
		pending int64
		gaps    []Gap
		want    []int64
		base    int64 // the first entry's Baseline
	}{
		{"the gap's own message pending", 600, []Gap{{UserID: "u", ConversationID: "c1", LastSeq: -1, Seq: 600}}, []int64{600}, 599},
		{"earlier ones pending", 597, []Gap{{UserID: "u", ConversationID: "c1", LastSeq: -1, Seq: 600}}, []int64{597, 598, 599, 600}, 596},
		// A gap reported by a fill's own append: its messages need not be pending.
		{"none pending", 0, []Gap{{UserID: "u", ConversationID: "c1", LastSeq: -1, Seq: 600}}, []int64{600}, 599},
		{"known log", 600, []Gap{{UserID: "u", ConversationID: "c1", LastSeq: 590, Seq: 600}}, []int64{591, 592, 593, 594, 595, 596, 597, 598, 599, 600}, 0},
	} {
		t.Run(tc.name, func(t *testing.T) {
			rec := &appendRecorder{}
			s := &Service{rt: rec, store: historyStore{n: 600, pending: tc.pending}}
			require.NoError(t, s.fillGaps(ctx, tc.gaps))
			require.Len(t, rec.calls, 1)
			var got []int64
			for _, dl := range rec.calls[0] {
				got = append(got, dl.Entry.Seq)
			}
			require.Equal(t, tc.want, got)
			require.Equal(t, tc.base, rec.calls[0][0].Entry.Baseline)
		})
	}
}

// refusingLog is an appendRecorder that answers its first appends with the
// gaps given, as a log that moved under a fill would; nothing else of it
// may be used.
type refusingLog struct {
	appendRecorder
	answers [][]Gap
}

func (r *refusingLog) Append(ctx context.Context, ds []Delivery) ([]Gap, error) {
	_, _ = r.appendRecorder.Append(ctx, ds)
	if len(r.answers) == 0 {
		return nil, nil
	}
	gaps := r.answers[0]
	r.answers = r.answers[1:]
	return gaps, nil
}

// TestFillGapsRefused: a fill the log refuses as a gap (it moved between
// the gap's report and the fill) is filled again from where the log
// stands then; after fillRounds fills what is left is given up (logged),
// not retried for ever.
func TestFillGapsRefused(t *testing.T) {
	ctx := context.Background()
	seqsOf := func(ds []Delivery) (out []int64) {
		for _, dl := range ds {
			out = append(out, dl.Entry.Seq)
		}
		return out
	}
	rt := &refusingLog{answers: [][]Gap{{{UserID: "a", ConversationID: "c1", LastSeq: 2, Seq: 8}}}}
	s := &Service{rt: rt, store: historyStore{n: 10}, log: slog.New(slog.DiscardHandler)}
	require.NoError(t, s.fillGaps(ctx, []Gap{{UserID: "a", ConversationID: "c1", LastSeq: 5, Seq: 8}}))
	require.Len(t, rt.calls, 2)
	require.Equal(t, []int64{6, 7, 8}, seqsOf(rt.calls[0]))
	require.Equal(t, []int64{3, 4, 5, 6, 7, 8}, seqsOf(rt.calls[1]), "filled again from where the log stands")

	refused := []Gap{{UserID: "a", ConversationID: "c1", LastSeq: 1, Seq: 8}}
	rt = &refusingLog{answers: [][]Gap{refused, refused, refused, refused}}
	s.rt = rt
	require.NoError(t, s.fillGaps(ctx, []Gap{{UserID: "a", ConversationID: "c1", LastSeq: 5, Seq: 8}}))
	require.Len(t, rt.calls, fillRounds)
}
