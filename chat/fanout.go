package chat

import (
	"bytes"
	"context"
	"encoding/json"
	"strconv"
	"strings"
	"sync"
	"time"
)

// The fan-out fast path: messages of large groups reach live streams
// before their members' logs have them, and the logs take them in rounds.
//
// A message to a group is appended to every member's log (dispatch.go),
// and Redis spends 10-25 µs of script time per member and round on it
// (docs/performance.md): a group of 1000 waits 10-25 ms for its last
// member's log, one conversation's rounds go one after another, and at 50
// messages a second to such a group Redis is busy for most of every
// second, which every later step queues behind. The logs stay what streams
// replay and resume from (G4, G5); the fast path delivers sooner:
//
//  1. Right after the commit, the node that committed looks up the members
//     (the member cache, one round trip per batch) and broadcasts the
//     messages of groups with at least Config.FanoutFast members once, to
//     every node (TopicFanout), each group's with its recipients.
//  2. Each node hands every message to its own streams of those recipients
//     (localStreams), in memory, and to their long polls that wait (Poll).
//  3. A stream delivers a message from there only if it is the next seq of
//     its conversation after the last one it has (streamState.last: from
//     the log, or delivered ahead), and marks the conversation ahead of its
//     log up to that seq in its event ids (Cursor). When the log brings the
//     message later, the stream leaves it out; a stream resumed from such
//     an id does the same. A message that comes before its predecessors
//     waits (pending) until the log has brought them.
//  4. The dispatcher lets such messages gather for fanoutGather before it
//     appends them to the logs, so that a member's log costs Redis one step
//     per half second rather than per message, and their wake-ups, too big
//     to carry the entries, say only which messages they hold (a summary,
//     Subscription.Since): a stream that is ahead passes over them without
//     reading its log.
//
// Nothing on the fast path is needed for correctness: a broadcast lost, a
// full inbox, a message out of order or a stream that does not know where
// its log stands only means that message comes from the log, up to
// fanoutGather later than it would without the fast path. The recipients
// are those the log dispatch takes (the same member cache), so the fast
// path shows no message to anyone its log would not.

// eventFanout is the node-level event of the fast path, on TopicFanout:
// a JSON array of fastGroup. Never shown to clients; Droppable.
const eventFanout EventType = "_fanout"

// fastGroup is one conversation's messages in a broadcast, in seq order,
// with their recipients once.
type fastGroup struct {
	ConversationID string `json:"c"`
	// To is the members they are for, joined by commas (user ids are
	// usernames, which have none): one string to decode, not one per member.
	To       string         `json:"t"`
	Messages []*fastMessage `json:"m"`
}

// fastMessage is one message on the fast path.
type fastMessage struct {
	ConversationID string          `json:"-"` // its group's
	Seq            int64           `json:"s"`
	Data           json.RawMessage `json:"d"` // the message, as its log entry carries it
}

// maxBroadcast bounds a broadcast's size (bytes, about): a node decodes it
// whole, and Redis drops a subscriber whose output buffer passes 8 MB for
// a minute (client-output-buffer-limit pubsub). A group of 5000 members
// has ~50 KB of recipients.
const maxBroadcast = 1 << 20

// fanoutQueue bounds the committed messages awaiting the fast path; past
// it they wait for their logs. fanoutBatch bounds one broadcast.
const (
	fanoutQueue = 4096
	fanoutBatch = 256
)

// fanout is the sending side: it broadcasts committed messages of large
// groups in commit order (one goroutine; a node's order is what makes
// consecutive seqs arrive consecutively at the streams).
type fanout struct {
	s     *Service
	on    bool // Config.FanoutFast > 0
	in    chan OutboxEvent
	large sync.Map // conversation id → time.Time of its last broadcast
}

// fanoutGather is how long a dispatch worker gathers messages of a large
// group, whose live streams the fast path serves, before appending them to
// the logs: each member's log then costs Redis one script step per round
// rather than per message, and each stream one wake-up. Well under
// Config.SweepAfter, so that the sweeper does not take them over.
const fanoutGather = 500 * time.Millisecond

// largeFor is how long a group counts as served by the fast path after its
// last broadcast (covers).
const largeFor = 10 * time.Second

// covers reports whether ev is a message the fast path takes to live
// streams (its group was broadcast lately), so its log append may wait.
func (f *fanout) covers(ev OutboxEvent) bool {
	if !f.on || ev.Type != EventMessageCreated || len(ev.To) > 0 {
		return false
	}
	t, ok := f.large.Load(ev.ConversationID)
	if ok && time.Since(t.(time.Time)) >= largeFor {
		f.large.CompareAndDelete(ev.ConversationID, t) // quiet now: forget it
		return false
	}
	return ok
}

func newFanout(s *Service) *fanout {
	return &fanout{s: s, on: s.cfg.FanoutFast > 0, in: make(chan OutboxEvent, fanoutQueue)}
}

// enqueue takes the committed messages to all members of their
// conversation (direct messages name their pair in To: two logs are quick
// to append), without blocking the commit.
func (f *fanout) enqueue(evs []OutboxEvent) {
	if !f.on {
		return
	}
	for _, ev := range evs {
		if ev.Type != EventMessageCreated || len(ev.To) > 0 {
			continue
		}
		select {
		case f.in <- ev:
		default: // the logs deliver it
		}
	}
}

func (f *fanout) run(ctx context.Context) {
	batch := make([]OutboxEvent, 0, fanoutBatch)
	for {
		select {
		case <-ctx.Done():
			return
		case ev := <-f.in:
			batch = append(batch[:0], ev)
		}
	more:
		for len(batch) < fanoutBatch {
			select {
			case ev := <-f.in:
				batch = append(batch, ev)
			default:
				break more
			}
		}
		f.broadcast(ctx, batch)
	}
}

// broadcast sends the batch's messages of large groups to every node.
func (f *fanout) broadcast(ctx context.Context, evs []OutboxEvent) {
	var cids []string
	seen := map[string]bool{}
	for _, ev := range evs {
		if !seen[ev.ConversationID] {
			seen[ev.ConversationID] = true
			cids = append(cids, ev.ConversationID)
		}
	}
	members, err := f.s.membersOf(ctx, cids)
	if err != nil {
		f.s.log.Debug("fan-out fast path: members", "err", err)
		return
	}
	for _, groups := range fanoutGroups(evs, members, f.s.cfg.FanoutFast, maxBroadcast) {
		for _, g := range groups {
			f.large.Store(g.ConversationID, time.Now())
		}
		data, err := json.Marshal(groups)
		if err == nil {
			err = f.s.rt.Broadcast(ctx, TopicFanout, StreamEvent{Type: eventFanout, Data: data})
		}
		if err != nil {
			f.s.log.Debug("fan-out fast path: broadcast", "err", err)
		}
	}
}

// fanoutGroups makes the broadcasts of evs: the messages of conversations
// of at least min members, each conversation's in order and with its
// recipients once per broadcast, in broadcasts of about maxBytes at most.
func fanoutGroups(evs []OutboxEvent, members map[string][]string, min, maxBytes int) [][]*fastGroup {
	var out [][]*fastGroup
	var groups []*fastGroup
	byConv := map[string]*fastGroup{}
	size := 0
	for _, ev := range evs {
		to := members[ev.ConversationID]
		if len(to) < min {
			continue
		}
		if len(groups) > 0 && size+len(ev.Data) > maxBytes {
			out = append(out, groups)
			groups, size = nil, 0
			clear(byConv)
		}
		g := byConv[ev.ConversationID]
		if g == nil {
			g = &fastGroup{ConversationID: ev.ConversationID, To: strings.Join(to, ",")}
			byConv[ev.ConversationID] = g
			groups = append(groups, g)
			size += len(g.To)
		}
		g.Messages = append(g.Messages, &fastMessage{Seq: ev.Seq, Data: ev.Data})
		size += len(ev.Data)
	}
	if len(groups) > 0 {
		out = append(out, groups)
	}
	return out
}

// followFanout hands the fast path's broadcasts to this node's streams
// until ctx ends. A broadcast missed (Redis reconnect, a full buffer) is
// only delivered later, by the logs.
func (s *Service) followFanout(ctx context.Context) {
	s.listen(ctx, TopicFanout, 100*time.Millisecond, func(ctx context.Context, sub NodeSubscription) {
		for {
			select {
			case <-ctx.Done():
				return
			case <-sub.Wake(): // missed broadcasts: the logs have them
			case ev, ok := <-sub.Events():
				if !ok {
					return
				}
				s.fanIn(ev)
			}
		}
	})
}

// fanIn hands one broadcast's messages to the local streams of their recipients.
func (s *Service) fanIn(ev StreamEvent) {
	if ev.Type != eventFanout {
		return
	}
	var groups []fastGroup
	if err := json.Unmarshal(ev.Data, &groups); err != nil {
		s.log.Debug("fan-out fast path: bad broadcast", "err", err)
		return
	}
	for _, g := range groups {
		for _, m := range g.Messages {
			m.ConversationID = g.ConversationID
		}
		for to := g.To; to != ""; {
			var uid string
			uid, to, _ = strings.Cut(to, ",")
			s.local.offer(uid, g.Messages)
		}
	}
}

// localStreams is this node's live streams by user, for the fast path.
type localStreams struct {
	mu sync.RWMutex
	m  map[string][]*inbox
}

// inbox is one stream's queue of fast-path messages.
type inbox struct {
	mu   sync.Mutex
	msgs []*fastMessage
	wake chan struct{}
}

// inboxCap bounds what a stream holds from the fast path; past it
// messages wait for the log.
const inboxCap = 256

func (l *localStreams) add(uid string) *inbox {
	ib := &inbox{wake: make(chan struct{}, 1)}
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.m == nil {
		l.m = map[string][]*inbox{}
	}
	l.m[uid] = append(l.m[uid], ib)
	return ib
}

func (l *localStreams) remove(uid string, ib *inbox) {
	l.mu.Lock()
	defer l.mu.Unlock()
	ibs := l.m[uid]
	for i, x := range ibs {
		if x == ib {
			ibs[i] = ibs[len(ibs)-1]
			ibs = ibs[:len(ibs)-1]
			break
		}
	}
	if len(ibs) == 0 {
		delete(l.m, uid)
	} else {
		l.m[uid] = ibs
	}
}

func (l *localStreams) offer(uid string, msgs []*fastMessage) {
	l.mu.RLock()
	ibs := l.m[uid]
	for _, ib := range ibs {
		ib.push(msgs)
	}
	l.mu.RUnlock()
}

func (ib *inbox) push(msgs []*fastMessage) {
	ib.mu.Lock()
	ib.msgs = append(ib.msgs, msgs[:min(len(msgs), max(0, inboxCap-len(ib.msgs)))]...)
	ib.mu.Unlock()
	select {
	case ib.wake <- struct{}{}:
	default:
	}
}

// take returns what the inbox holds and empties it.
func (ib *inbox) take() []*fastMessage {
	ib.mu.Lock()
	defer ib.mu.Unlock()
	msgs := ib.msgs
	ib.msgs = nil
	return msgs
}

// streamState is what a stream knows of its place: its log position, the
// conversations it delivered ahead of the log, and the last message seq it
// has of each conversation, which decides whether a fast-path message
// continues it.
type streamState struct {
	uid   string
	pos   Position
	ahead []Ahead
	// suffix is what the ids of logged events carry after their position
	// (aheadSuffix(ahead)), built when needed after ahead changed (stale).
	suffix string
	stale  bool
	buf    []byte // cursor's
	// last is, per conversation, the last message seq the stream has: one
	// it delivered, or the log's as of a position the stream has passed
	// (knowLog). -1: not known until the log brings a message of it.
	last map[string]int64
	// logKnown: last holds every conversation the log has a seq of, so a
	// conversation missing from it is at 0 (the log takes its seq 1 or a
	// baseline next). Off without knowLog, or once last is full.
	logKnown bool
	// asked: knowLog was called (logKnown may have been turned off since,
	// by a full last, which asking again would not change).
	asked bool
	// knownAt is the head as of which knowLog was told the log's seqs:
	// until the stream has read that far, last may count messages it has
	// not delivered yet, so nothing goes ahead.
	knownAt Position
	// summed holds the summaries Subscription.Since asked about (have), to
	// take as passed only if Since then vouches for them all.
	summed []Ahead
	// pending holds fast-path messages that came before the stream had
	// their predecessors (the log lags behind the fast path by the
	// dispatcher's gathering): delivered ahead once the log has brought
	// those, dropped once it has brought the messages themselves.
	pending []*fastMessage
}

// maxTracked bounds the conversations a stream keeps a last seq of, and
// maxPending the fast-path messages it holds back.
const (
	maxTracked = 512
	maxPending = 512
)

func newStreamState(uid string, c Cursor) *streamState {
	st := &streamState{uid: uid, pos: c.Pos}
	for _, a := range c.Ahead {
		st.setAhead(a.ConversationID, a.Seq)
		st.setLast(a.ConversationID, a.Seq)
	}
	return st
}

// knowLog takes each conversation's last seq in the log as of head.
func (st *streamState) knowLog(head Position, seqs map[string]int64) {
	st.logKnown, st.knownAt, st.asked = true, head, true
	for cid, seq := range seqs {
		if v, ok := st.last[cid]; !ok || seq > v {
			st.setLast(cid, seq)
		}
	}
}

// resynced moves the stream to head after its position could not be
// served. What knowLog said of another epoch's log no longer holds.
func (st *streamState) resynced(head Position) {
	st.pos = head
	if st.knownAt.Epoch != "" && st.knownAt.Epoch != head.Epoch {
		st.logKnown, st.knownAt, st.asked = false, Position{}, false
	}
}

// cursor is the event id of the stream's place now: Cursor{pos,
// ahead}.String(), built with one allocation (one per event delivered
// ahead).
func (st *streamState) cursor() string {
	b := append(st.buf[:0], st.pos.Epoch...)
	b = append(b, '-')
	b = strconv.AppendInt(b, st.pos.Offset, 10)
	for _, a := range st.ahead {
		b = append(append(append(b, '~'), a.ConversationID...), '.')
		b = strconv.AppendInt(b, a.Seq, 10)
	}
	st.buf = b
	return string(b)
}

// setLast records cid's last seq; a new conversation beyond maxTracked is
// not recorded, and the stream no longer knows all the log's.
func (st *streamState) setLast(cid string, seq int64) {
	if _, ok := st.last[cid]; !ok && len(st.last) >= maxTracked {
		st.logKnown = false
		return
	}
	if st.last == nil {
		st.last = map[string]int64{}
	}
	st.last[cid] = seq
}

// aheadIndex is the place of cid in st.ahead, -1 if it is not ahead.
func aheadIndex[T string | []byte](st *streamState, cid T) int {
	for i, a := range st.ahead {
		if a.ConversationID == string(cid) {
			return i
		}
	}
	return -1
}

func (st *streamState) setAhead(cid string, seq int64) {
	if i := aheadIndex(st, cid); i >= 0 {
		st.ahead[i].Seq = seq
	} else {
		st.ahead = append(st.ahead, Ahead{ConversationID: cid, Seq: seq})
	}
	st.stale = true
}

func (st *streamState) dropAhead(i int) {
	st.ahead = append(st.ahead[:i], st.ahead[i+1:]...)
	st.stale = true
}

// logged takes events read from the log up to next: it leaves out the
// messages the stream delivered ahead of the log, notes the last seqs, and
// gives the others their cursor as id. evs is filtered in place.
func (st *streamState) logged(evs []StreamEvent, next Position) []StreamEvent {
	out := evs[:0]
	for _, ev := range evs {
		// Only a stream the fast path has reached (or a cursor ahead)
		// looks at what the log brings; the others pay nothing for it.
		if st.last != nil || st.logKnown || len(st.ahead) > 0 {
			switch ev.Type {
			case EventMessageCreated:
				cid, seq, ok := messageRef(ev.Data)
				if !ok {
					break
				}
				if st.passed(cid, seq) {
					continue // delivered ahead
				}
			case EventMemberRemoved:
				var me MemberEvent
				if json.Unmarshal(ev.Data, &me) == nil && me.UserID == st.uid {
					st.left(me.ConversationID)
				}
			}
		}
		if len(st.ahead) > 0 {
			if st.stale {
				st.suffix, st.stale = aheadSuffix(st.ahead), false
			}
			ev.ID += st.suffix
		}
		out = append(out, ev)
	}
	st.pos = next
	return out
}

// passed notes that the log brought message seq of cid, and reports
// whether the stream delivered it ahead already.
func passed[T string | []byte](st *streamState, cid T, seq int64) bool {
	if i := aheadIndex(st, cid); i >= 0 {
		a := st.ahead[i].Seq
		if seq >= a {
			st.dropAhead(i) // the log caught up
		}
		if seq <= a {
			return true
		}
	}
	if v, ok := st.last[string(cid)]; ok {
		if seq > v {
			st.last[string(cid)] = seq
		}
	} else if st.logKnown {
		st.setLast(string(cid), seq)
	}
	return false
}

func (st *streamState) passed(cid []byte, seq int64) bool { return passed(st, cid, seq) }

// have reports whether the stream has every message of cid up to lastSeq
// that the log holds after its position (all of them delivered ahead): a
// summary wake-up (Subscription.Since) then needs no read of the log. What
// it said yes to is taken as passed by sinced, once Since has vouched for
// all it carried.
func (st *streamState) have(cid string, lastSeq int64) bool {
	i := aheadIndex(st, cid)
	if i < 0 || lastSeq > st.ahead[i].Seq {
		return false
	}
	st.summed = append(st.summed, Ahead{ConversationID: cid, Seq: lastSeq})
	return true
}

// sinced takes what Subscription.Since returned: the events it carried
// up to next, and whether it vouched for every entry up to there, the
// summarised ones (have) included. It returns what to send.
func (st *streamState) sinced(evs []StreamEvent, next Position, ok bool) []StreamEvent {
	summed := st.summed
	st.summed = st.summed[:0]
	if !ok {
		return nil
	}
	// The summaries after the events: a summary's messages may precede
	// some of the events in the log, and taking them as passed first would
	// end the conversation's lead (dropAhead) before the events it covers.
	// Taken late, they change nothing the events have not: the log holds a
	// conversation's messages in seq order.
	out := st.logged(evs, next)
	for _, a := range summed {
		passed(st, a.ConversationID, a.Seq)
	}
	return append(out, st.flush()...)
}

// left forgets a conversation the user left: a re-join starts afresh.
func (st *streamState) left(cid string) {
	delete(st.last, cid)
	if i := aheadIndex(st, cid); i >= 0 {
		st.dropAhead(i)
	}
	keep := st.pending[:0]
	for _, m := range st.pending {
		if m.ConversationID != cid {
			keep = append(keep, m)
		}
	}
	clear(st.pending[len(keep):])
	st.pending = keep
}

// early returns m as the stream's next event if it continues its
// conversation where the stream is, and records it as delivered ahead. A
// message that comes too soon waits in pending (flush).
func (st *streamState) early(m *fastMessage) (StreamEvent, bool) {
	cid := m.ConversationID
	v, ok := st.last[cid]
	if !ok {
		v = -1 // the log will tell
		if st.logKnown {
			v = 0
		}
		st.setLast(cid, v)
		if _, ok := st.last[cid]; !ok {
			return StreamEvent{}, false // not followed: the log delivers it
		}
	}
	behind := st.knownAt.Epoch != "" && (st.pos.Epoch != st.knownAt.Epoch || st.pos.Offset < st.knownAt.Offset)
	switch {
	case v >= 0 && m.Seq <= v:
		return StreamEvent{}, false // the log brought it
	case aheadIndex(st, cid) < 0 && len(st.ahead) >= maxAhead:
		return StreamEvent{}, false // the cursor is full: the log delivers it
	case v < 0 || m.Seq != v+1 || behind:
		if len(st.pending) < maxPending {
			st.pending = append(st.pending, m)
		}
		return StreamEvent{}, false
	}
	st.last[cid] = m.Seq
	st.setAhead(cid, m.Seq)
	return StreamEvent{ID: st.cursor(), Type: EventMessageCreated, Data: m.Data}, true
}

// flush delivers the pending messages the log has caught up with, and
// drops those it brought itself. Pending messages of one conversation are
// in seq order (the fast path's order), so one pass suffices.
func (st *streamState) flush() []StreamEvent {
	if len(st.pending) == 0 {
		return nil
	}
	var evs []StreamEvent
	keep := st.pending[:0]
	for _, m := range st.pending {
		v, ok := st.last[m.ConversationID]
		switch {
		case !ok || (v >= 0 && m.Seq <= v):
			// not followed any more, or the log brought it
		case v >= 0 && m.Seq == v+1:
			if ev, ok := st.early(m); ok {
				evs = append(evs, ev)
			}
		default:
			keep = append(keep, m)
		}
	}
	clear(st.pending[len(keep):])
	st.pending = keep
	return evs
}

// messageRef reads the conversation and seq of a message.created payload.
// A payload as json.Marshal writes a Message starts with its id, its
// conversation id and its seq; that is read without decoding (a stream
// looks at every message its log brings while it is ahead). Anything
// else is decoded.
func messageRef(data []byte) (cid []byte, seq int64, ok bool) {
	const head, conv, seqKey = `{"id":"`, `","conversation_id":"`, `","seq":`
	rest, found := bytes.CutPrefix(data, []byte(head))
	if found {
		if i := bytes.IndexByte(rest, '"'); i >= 0 && bytes.IndexByte(rest[:i], '\\') < 0 {
			rest, found = bytes.CutPrefix(rest[i:], []byte(conv))
			if found {
				if j := bytes.IndexByte(rest, '"'); j >= 0 && bytes.IndexByte(rest[:j], '\\') < 0 {
					cid = rest[:j]
					if digits, ok := bytes.CutPrefix(rest[j:], []byte(seqKey)); ok {
						k := bytes.IndexByte(digits, ',')
						if k > 0 {
							if n, err := strconv.ParseInt(string(digits[:k]), 10, 64); err == nil {
								return cid, n, true
							}
						}
					}
				}
			}
		}
	}
	var m struct {
		ConversationID string `json:"conversation_id"`
		Seq            int64  `json:"seq"`
	}
	if json.Unmarshal(data, &m) != nil || m.ConversationID == "" {
		return nil, 0, false
	}
	return []byte(m.ConversationID), m.Seq, true
}
