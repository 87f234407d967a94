package chat

import (
	"encoding/json"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

// TestCursorWire: a cursor is its position alone, or the position and the
// conversations ahead; anything else does not parse.
func TestCursorWire(t *testing.T) {
	plain := Cursor{Pos: Position{Epoch: "k3x9a", Offset: 42}}
	require.Equal(t, "k3x9a-42", plain.String(), "a cursor with nothing ahead is a plain position")
	ahead := Cursor{Pos: plain.Pos, Ahead: []Ahead{{"c_abc", 7}, {"c_def", 1}}}
	require.Equal(t, "k3x9a-42~c_abc.7~c_def.1", ahead.String())
	for _, c := range []Cursor{plain, ahead} {
		got, err := ParseCursor(c.String())
		require.NoError(t, err)
		require.Equal(t, c, got)
	}
	full := Cursor{Pos: plain.Pos}
	for i := range maxAhead {
		full.Ahead = append(full.Ahead, Ahead{strings.Repeat(fmt.Sprint(i), 64), 1 << 62})
	}
	got, err := ParseCursor(full.String())
	require.NoError(t, err, "the largest cursor a stream writes parses")
	require.Equal(t, full, got)

	for _, bad := range []string{
		"", "~c.1", "k3x9a-42~", "k3x9a-42~c", "k3x9a-42~c.", "k3x9a-42~.1", "k3x9a-42~c.0",
		"k3x9a-42~c.-1", "k3x9a-42~c.x", "k3x9a-42~a.b.1", "k3x9a-42~c.1~c.2",
		"k3x9a-42~" + strings.Repeat("c", 65) + ".1",
		"k3x9a-42~a.1~b.1~c.1~d.1~e.1",
		"k3x9a~c.1", strings.Repeat("a", maxCursorLen) + "-1",
	} {
		_, err := ParseCursor(bad)
		require.ErrorIs(t, err, ErrBadPosition, "%q", bad)
	}
}

// TestMessageRef reads the conversation and seq of a message payload, from
// json.Marshal's layout without decoding and from any other by decoding;
// a message's text or metadata cannot pass for its conversation.
func TestMessageRef(t *testing.T) {
	m := Message{ID: "m_1", ConversationID: "c_real", Seq: 12, SenderID: "bob",
		Text:     `","conversation_id":"c_fake","seq":99,"`,
		Metadata: json.RawMessage(`{"conversation_id":"c_fake","seq":98}`), CreatedAt: time.Now()}
	data, err := json.Marshal(m)
	require.NoError(t, err)
	cid, seq, ok := messageRef(data)
	require.True(t, ok)
	require.Equal(t, "c_real", string(cid))
	require.EqualValues(t, 12, seq)

	// Another layout (keys reordered, spaced out) is decoded.
	other := `{"metadata": {"conversation_id": "c_fake", "seq": 1}, "seq": 13, "id": "m_2", "conversation_id": "c_real"}`
	cid, seq, ok = messageRef([]byte(other))
	require.True(t, ok)
	require.Equal(t, "c_real", string(cid))
	require.EqualValues(t, 13, seq)

	// An id with an escaped quote does not fool the fast reading.
	cid, seq, ok = messageRef([]byte(`{"id":"m\",\"conversation_id\":\"c_fake","conversation_id":"c_real","seq":14,"text":""}`))
	require.True(t, ok)
	require.Equal(t, "c_real", string(cid))
	require.EqualValues(t, 14, seq)

	for _, bad := range []string{``, `{}`, `[1]`, `{"seq":3}`, `not json`} {
		_, _, ok := messageRef([]byte(bad))
		require.False(t, ok, bad)
	}
}

// logMsg is a log entry for message seq of cid at offset off.
func logMsg(t *testing.T, off int64, cid string, seq int64) StreamEvent {
	data, err := json.Marshal(Message{ID: fmt.Sprintf("m_%s_%d", cid, seq), ConversationID: cid, Seq: seq})
	require.NoError(t, err)
	return StreamEvent{ID: Position{Epoch: "e", Offset: off}.String(), Type: EventMessageCreated, Data: data}
}

func fastMsg(t *testing.T, cid string, seq int64) *fastMessage {
	ev := logMsg(t, 0, cid, seq)
	return &fastMessage{ConversationID: cid, Seq: seq, Data: ev.Data}
}

func seqsOf(t *testing.T, evs []StreamEvent) []string {
	var out []string
	for _, ev := range evs {
		if ev.Type != EventMessageCreated {
			out = append(out, string(ev.Type))
			continue
		}
		cid, seq, ok := messageRef(ev.Data)
		require.True(t, ok)
		out = append(out, fmt.Sprintf("%s:%d", cid, seq))
	}
	return out
}

// A stream delivers a fast-path message that continues its conversation at
// once, under an id that says it is ahead of the log; holds back one that
// comes too soon until the log catches up; and leaves out of what the log
// brings the messages it delivered ahead.
func TestStreamStateAhead(t *testing.T) {
	st := newStreamState("alice", Cursor{Pos: Position{Epoch: "e", Offset: 2}})
	st.knowLog(Position{Epoch: "e", Offset: 3}, map[string]int64{"c1": 3})
	_, ok := st.early(fastMsg(t, "c1", 4))
	require.False(t, ok, "the log's seq 3 is known, but the stream has not read up to it")
	require.Len(t, st.pending, 1)
	evs := st.logged([]StreamEvent{logMsg(t, 3, "c1", 3)}, Position{Epoch: "e", Offset: 3})
	require.Equal(t, []string{"c1:3"}, seqsOf(t, evs))
	evs = st.flush()
	require.Equal(t, []string{"c1:4"}, seqsOf(t, evs), "read up to it: the held 4 goes ahead")
	require.Equal(t, "e-3~c1.4", evs[0].ID)

	_, ok = st.early(fastMsg(t, "c1", 6))
	require.False(t, ok, "seq 6 does not continue 4: it waits")
	require.Len(t, st.pending, 1)
	_, ok = st.early(fastMsg(t, "c2", 2))
	require.False(t, ok, "c2 is at 0 in the log: 2 waits for 1")

	// The log brings 4 (delivered: left out), then 5 (new: delivered, and the
	// log caught up, so the cursor has c1 no more), then the held 6 goes.
	evs = st.logged([]StreamEvent{logMsg(t, 4, "c1", 4), logMsg(t, 5, "c1", 5)}, Position{Epoch: "e", Offset: 5})
	require.Equal(t, []string{"c1:5"}, seqsOf(t, evs))
	require.Equal(t, "e-5", evs[0].ID, "caught up: a plain position")
	evs = st.flush()
	require.Equal(t, []string{"c1:6"}, seqsOf(t, evs))
	require.Equal(t, "e-5~c1.6", evs[0].ID)
	require.Len(t, st.pending, 1, "c2:2 still waits")

	// c2 from the log: 1 is delivered, then the held 2 goes ahead.
	evs = st.logged([]StreamEvent{logMsg(t, 6, "c2", 1)}, Position{Epoch: "e", Offset: 6})
	require.Equal(t, "e-6~c1.6", evs[0].ID, "logged events carry what is ahead")
	evs = st.flush()
	require.Equal(t, []string{"c2:2"}, seqsOf(t, evs))
	require.Equal(t, "e-6~c1.6~c2.2", evs[0].ID)
	require.Empty(t, st.pending)

	// A summary of log entries the stream has: passed over, and c1 is no
	// longer ahead; one it lacks is not.
	require.False(t, st.have("c2", 3))
	require.True(t, st.have("c1", 6))
	st.sinced(nil, Position{Epoch: "e", Offset: 10}, false)
	require.Equal(t, "e-6~c1.6~c2.2", st.cursor(), "not taken: Since did not vouch for the rest")
	require.True(t, st.have("c1", 6))
	st.sinced(nil, Position{Epoch: "e", Offset: 6}, true)
	require.Equal(t, "e-6~c2.2", st.cursor())

	// Leaving a conversation forgets it: held messages go, and the log's
	// member.removed carries no cursor for it any more.
	_, ok = st.early(fastMsg(t, "c2", 4))
	require.False(t, ok)
	left, _ := json.Marshal(MemberEvent{ConversationID: "c2", UserID: "alice", By: "bob"})
	evs = st.logged([]StreamEvent{{ID: "e-7", Type: EventMemberRemoved, Data: left}}, Position{Epoch: "e", Offset: 7})
	require.Equal(t, "e-7", evs[0].ID)
	require.Empty(t, st.pending)
	require.Empty(t, st.ahead)
}

// A stream that does not know where its log stands (HeadSeqs failed) waits
// for the log's first message of a conversation before it goes ahead.
func TestStreamStateLogUnknown(t *testing.T) {
	st := newStreamState("alice", Cursor{Pos: Position{Epoch: "e"}})
	_, ok := st.early(fastMsg(t, "c1", 1))
	require.False(t, ok, "without knowLog even seq 1 waits: the log may hold it already")
	evs := st.logged([]StreamEvent{logMsg(t, 1, "c1", 1)}, Position{Epoch: "e", Offset: 1})
	require.Len(t, evs, 1)
	require.Empty(t, st.flush(), "the held 1 came from the log")
	ev, ok := st.early(fastMsg(t, "c1", 2))
	require.True(t, ok)
	require.Equal(t, "e-1~c1.2", ev.ID)
}

// streamModel runs one stream (and its resumptions) against a log and the
// fast path in a random interleaving: both carry the messages of each
// conversation in seq order, the fast path loses some, and either may be
// first. The log also holds events of other kinds.
type streamModel struct {
	t     *testing.T
	rng   *rand.Rand
	log   []StreamEvent // the whole log as it will be, offset i+1 at i
	n     int           // how much of it exists yet
	fast  []*fastMessage
	got   []StreamEvent // what the client received, in order, across resumptions
	st    *streamState
	ready string // the id the client would resume from: its last event's, or ready's
}

func newStreamModel(t *testing.T, seed uint64, convs, msgs int) *streamModel {
	rng := rand.New(rand.NewPCG(seed, 1))
	m := &streamModel{t: t, rng: rng}
	// The log: the conversations' messages interleaved, each in seq order,
	// with someone else's membership events here and there.
	interleave(rng, convs, msgs, func(cid string, seq int64) {
		m.log = append(m.log, logMsg(t, int64(len(m.log)+1), cid, seq))
		if rng.IntN(8) == 0 {
			data, _ := json.Marshal(MemberEvent{ConversationID: cid, UserID: "zed", By: "bob"})
			m.log = append(m.log, StreamEvent{ID: Position{Epoch: "e", Offset: int64(len(m.log) + 1)}.String(),
				Type: EventMemberAdded, Data: data})
		}
	})
	// The fast path: the same messages, interleaved otherwise, one in five lost.
	interleave(rng, convs, msgs, func(cid string, seq int64) {
		if rng.IntN(5) > 0 {
			m.fast = append(m.fast, fastMsg(t, cid, seq))
		}
	})
	m.start(Cursor{Pos: Position{Epoch: "e"}})
	return m
}

// interleave calls fn with messages 1..msgs of conversations c0, c1, …,
// each conversation's in seq order, the conversations in a random mix.
func interleave(rng *rand.Rand, convs, msgs int, fn func(cid string, seq int64)) {
	next := make([]int64, convs)
	for left := convs * msgs; left > 0; {
		c := rng.IntN(convs)
		if next[c] == int64(msgs) {
			continue
		}
		next[c]++
		left--
		fn(fmt.Sprint("c", c), next[c])
	}
}

// start opens a stream at c, as Stream does: a drain (whose first read
// may fail, Redis, leaving the log to later reads).
func (m *streamModel) start(c Cursor) {
	m.st = newStreamState("alice", c)
	if m.rng.IntN(4) > 0 {
		m.read()
	}
	m.ready = m.st.cursor()
}

// knowLog is the stream's HeadSeqs on its first fast-path message, which
// fails sometimes: where the log stands now.
func (m *streamModel) knowLog() {
	if m.st.asked || m.rng.IntN(4) == 0 {
		return
	}
	seqs := map[string]int64{}
	for _, ev := range m.log[:m.n] {
		if ev.Type == EventMessageCreated {
			cid, seq, _ := messageRef(ev.Data)
			seqs[string(cid)] = seq
		}
	}
	m.st.knowLog(Position{Epoch: "e", Offset: int64(m.n)}, seqs)
}

func (m *streamModel) emit(evs []StreamEvent) {
	m.got = append(m.got, evs...)
	if len(evs) > 0 {
		m.ready = evs[len(evs)-1].ID
	}
}

// read drains the log as far as it exists: mostly as wake-ups
// (Subscription.Since) that carry several rounds, each its entries or, for
// messages of one conversation, a summary of them; when Since cannot vouch
// for a wake-up (a summary of messages the stream lacks, a lost push) the
// stream reads the log, in batches of random size.
func (m *streamModel) read() {
	for int(m.st.pos.Offset) < m.n {
		if m.rng.IntN(2) == 0 && m.since() {
			continue
		}
		pos := int(m.st.pos.Offset)
		k := min(m.n-pos, 1+m.rng.IntN(4))
		batch := append([]StreamEvent(nil), m.log[pos:pos+k]...)
		m.emit(append(m.st.logged(batch, Position{Epoch: "e", Offset: int64(pos + k)}), m.st.flush()...))
	}
}

// since plays one Subscription.Since over up to three rounds after the
// stream's position, as Stream takes its answer; false if it said no.
func (m *streamModel) since() bool {
	pos := int(m.st.pos.Offset)
	var evs []StreamEvent
	ok := true
	for range 1 + m.rng.IntN(3) {
		if pos == m.n {
			break
		}
		k := min(m.n-pos, 1+m.rng.IntN(4))
		round := m.log[pos : pos+k]
		pos += k
		if cid, last, sum := m.summary(round); sum && m.rng.IntN(2) == 0 {
			if !m.st.have(cid, last) {
				ok = false
				break
			}
			continue
		}
		evs = append(evs, round...)
	}
	if ok && m.rng.IntN(10) == 0 {
		ok = false // a push was lost
	}
	m.emit(m.st.sinced(evs, Position{Epoch: "e", Offset: int64(pos)}, ok))
	return ok
}

// summary is what a summary wake-up would say of batch: messages of one
// conversation up to last.
func (m *streamModel) summary(batch []StreamEvent) (cid string, last int64, ok bool) {
	for _, ev := range batch {
		if ev.Type != EventMessageCreated {
			return "", 0, false
		}
		c, seq, _ := messageRef(ev.Data)
		if cid != "" && string(c) != cid {
			return "", 0, false
		}
		cid, last = string(c), seq
	}
	return cid, last, true
}

func (m *streamModel) run(resumes int) {
	fi := 0
	for fi < len(m.fast) || m.n < len(m.log) || int(m.st.pos.Offset) < m.n {
		switch m.rng.IntN(4) {
		case 0:
			if m.n < len(m.log) {
				m.n++
			}
		case 1:
			m.read()
		default:
			if fi < len(m.fast) {
				m.knowLog()
				if ev, ok := m.st.early(m.fast[fi]); ok {
					m.emit([]StreamEvent{ev})
				}
				fi++
			}
		}
		if resumes > 0 && m.rng.IntN(20) == 0 {
			resumes--
			c, err := ParseCursor(m.ready)
			require.NoError(m.t, err)
			m.start(c) // what the old stream held back is lost with it
		}
	}
	m.read()
}

// check: every message once, each conversation in seq order, and every
// other event once.
func (m *streamModel) check(convs, msgs int) {
	last := map[string]int64{}
	others := 0
	for _, ev := range m.got {
		if ev.Type != EventMessageCreated {
			others++
			continue
		}
		cid, seq, ok := messageRef(ev.Data)
		require.True(m.t, ok)
		require.Equal(m.t, last[string(cid)]+1, seq, "%s after %d: %v", cid, last[string(cid)], seqsOf(m.t, m.got))
		last[string(cid)] = seq
	}
	for c := range convs {
		require.EqualValues(m.t, msgs, last[fmt.Sprint("c", c)], "all of c%d", c)
	}
	require.Equal(m.t, len(m.log)-convs*msgs, others)
}

// TestStreamStateExactlyOnce: whatever the interleaving of the log and the
// fast path, and wherever the client resumes from the last id it got, it
// gets every message once and in order (G4, G5).
func TestStreamStateExactlyOnce(t *testing.T) {
	for seed := range uint64(400) {
		convs := 1 + int(seed%3)
		m := newStreamModel(t, seed, convs, 40)
		m.run(int(seed % 4))
		m.check(convs, 40)
	}
}

// A batch of committed messages becomes broadcasts that carry each large
// group's messages in order with its recipients once, split by size, and
// each node hands them to its streams of those recipients, and only those.
func TestFanoutBroadcasts(t *testing.T) {
	ev := func(cid string, seq int64) OutboxEvent {
		return OutboxEvent{ConversationID: cid, Type: EventMessageCreated, Seq: seq, Data: logMsg(t, 0, cid, seq).Data}
	}
	members := map[string][]string{"big": {"alice", "bob", "carol"}, "small": {"alice", "dave"}}
	evs := []OutboxEvent{ev("big", 1), ev("small", 1), ev("big", 2), ev("big", 3)}
	bcs := fanoutGroups(evs, members, 3, 1<<20)
	require.Len(t, bcs, 1)
	require.Len(t, bcs[0], 1, "the small group is left to the logs")
	g := bcs[0][0]
	require.Equal(t, "big", g.ConversationID)
	require.Equal(t, "alice,bob,carol", g.To)
	var seqs []int64
	for _, m := range g.Messages {
		seqs = append(seqs, m.Seq)
	}
	require.Equal(t, []int64{1, 2, 3}, seqs)

	// Split by size: each broadcast under the bound (recipients counted),
	// the messages still in order across them.
	one := len(evs[0].Data) + len("alice,bob,carol")
	bcs = fanoutGroups(evs, members, 3, one+len(evs[0].Data))
	require.Len(t, bcs, 2)
	require.Len(t, bcs[0][0].Messages, 2)
	require.EqualValues(t, 3, bcs[1][0].Messages[0].Seq)
	require.Equal(t, "alice,bob,carol", bcs[1][0].To, "recipients again in every broadcast")

	// A node hands the messages to its streams of the recipients.
	s := &Service{log: slog.New(slog.DiscardHandler)}
	alice, alice2, dave := s.local.add("alice"), s.local.add("alice"), s.local.add("dave")
	for _, groups := range bcs {
		data, err := json.Marshal(groups)
		require.NoError(t, err)
		s.fanIn(StreamEvent{Type: eventFanout, Data: data})
	}
	for _, ib := range []*inbox{alice, alice2} {
		select {
		case <-ib.wake:
		default:
			t.Fatal("a recipient's stream was not woken")
		}
		got := ib.take()
		require.Len(t, got, 3, "each of alice's streams")
		for i, m := range got {
			require.Equal(t, "big", m.ConversationID)
			require.EqualValues(t, i+1, m.Seq)
			require.Equal(t, string(evs[0].Data), string(got[0].Data))
		}
	}
	require.Empty(t, dave.take(), "not a recipient")
	s.local.remove("alice", alice)
	s.local.remove("alice", alice2)
	s.local.remove("dave", dave)
	require.Empty(t, s.local.m, "no stream left registered")
}
