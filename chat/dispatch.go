package chat

import (
	"context"
	"encoding/json"
	"hash/fnv"
	"slices"
	"sync"
	"sync/atomic"
	"time"
)

// dispatcher delivers committed outbox events to their recipients' logs.
//
// The fast path runs right after the commit on the node that committed:
// events are queued to a worker chosen by conversation id, so one node
// dispatches a conversation in commit order. Several nodes may still race on
// one conversation, and a dispatch may be retried: the logs' dedupe (by key
// and by seq) and gap reports keep every log exactly-once and in seq order.
// Whatever the fast path did not finish (a full queue, Redis down, a node
// killed after the commit) stays in the outbox, where the sweeper of any
// node claims it after SweepAfter.
type dispatcher struct {
	s      *Service
	queues []*workQueue
	// acks carries the ids of delivered events to the acker, which deletes
	// them from the outbox in batches (ack).
	acks chan int64
	wg   sync.WaitGroup
	// gather is how long a round of fast-path messages waits for more
	// (fanoutGather; tests change it), and pause waits between the steps of
	// a paced round (appendRound; tests replace it to see the pauses).
	gather time.Duration
	pause  func(ctx context.Context, d time.Duration)
}

// workQueue is one worker's queue. Each event is marked when queued:
// urgent unless it is a message the fan-out fast path took to the live
// streams (fanout.covers), which only streams that missed it and polls
// without a wait read from the logs. urgent counts the urgent events
// queued: a worker gathering or pacing a round of fast-path messages stops
// as soon as one waits.
type workQueue struct {
	ch     chan queued
	urgent atomic.Int32
}

type queued struct {
	ev     OutboxEvent
	urgent bool
}

// take unwraps an event taken from the queue.
func (q *workQueue) take(it queued) OutboxEvent {
	if it.urgent {
		q.urgent.Add(-1)
	}
	return it.ev
}

// queueDepth bounds memory per worker; beyond it events wait for the sweeper.
const queueDepth = 4096

// gapFillBatch bounds how many missing messages one fill reads at once.
const gapFillBatch = 500

func newDispatcher(s *Service) *dispatcher {
	d := &dispatcher{s: s, queues: make([]*workQueue, s.cfg.DispatchWorkers), acks: make(chan int64, ackQueue),
		gather: fanoutGather, pause: sleepCtx}
	for i := range d.queues {
		d.queues[i] = &workQueue{ch: make(chan queued, queueDepth)}
	}
	return d
}

func (d *dispatcher) start(ctx context.Context) {
	for _, q := range d.queues {
		d.wg.Go(func() { d.work(ctx, q) })
	}
	if !d.s.hooks.NoSweeper {
		d.wg.Go(func() { d.sweep(ctx) })
	}
	d.wg.Go(func() { d.ack(ctx) })
}

func (d *dispatcher) wait() { d.wg.Wait() }

// enqueue hands committed events to the fast path without blocking the
// request that committed them.
func (d *dispatcher) enqueue(evs []OutboxEvent) {
	for _, ev := range evs {
		if d.s.hooks.SkipFastDispatch != nil && d.s.hooks.SkipFastDispatch(ev) {
			continue
		}
		h := fnv.New32a()
		h.Write([]byte(ev.ConversationID))
		q := d.queues[h.Sum32()%uint32(len(d.queues))]
		it := queued{ev: ev, urgent: !d.s.fan.covers(ev)}
		if it.urgent {
			q.urgent.Add(1)
		}
		select {
		case q.ch <- it:
		default: // full: the sweeper delivers it
			if it.urgent {
				q.urgent.Add(-1)
			}
		}
	}
}

// maxBatch bounds one delivery round. A round costs one Append (one script
// per recipient, however many of the round's events it gets), one session
// touch per conversation and one outbox delete, so a busy conversation is
// delivered in batches instead of paying those round trips per message.
const maxBatch = 128

func (d *dispatcher) work(ctx context.Context, q *workQueue) {
	batch := make([]OutboxEvent, 0, maxBatch)
	for {
		var fast, ok bool
		if batch, fast, ok = d.round(ctx, q, batch[:0]); !ok {
			return
		}
		var paced func() bool
		if fast && len(batch) < maxBatch {
			// Only a round its gather ended (a full one means the group
			// sends faster than rounds take: pausing would put its logs
			// behind, and streams that miss a fast-path message wait for
			// them), and not while someone waits for an event behind it
			// or the next round is half full already.
			paced = func() bool { return q.urgent.Load() == 0 && len(q.ch) < maxBatch/2 }
		}
		d.deliverAndAck(ctx, batch, paced)
	}
}

// round takes the next delivery round from q into batch: what is queued,
// up to maxBatch. Messages the fan-out fast path took to the live streams
// may wait for more of their kind (d.gather), so that each member's log
// takes them in one step; an urgent event ends the wait, however it was
// taken. fast reports a round of only such messages; ok is false when ctx
// ended.
func (d *dispatcher) round(ctx context.Context, q *workQueue, batch []OutboxEvent) (_ []OutboxEvent, fast, ok bool) {
	var it queued
	select {
	case <-ctx.Done():
		return batch, false, false
	case it = <-q.ch:
	}
	batch = append(batch, q.take(it))
	fast = !it.urgent
	var gather <-chan time.Time
	if fast {
		t := time.NewTimer(d.gather)
		defer t.Stop()
		gather = t.C
	}
	for len(batch) < maxBatch {
		select {
		case it = <-q.ch:
		default:
			if gather == nil {
				return batch, fast, true
			}
			select {
			case it = <-q.ch:
			case <-gather:
				return batch, fast, true
			case <-ctx.Done():
				return batch, false, false
			}
		}
		batch = append(batch, q.take(it))
		if it.urgent {
			gather, fast = nil, false
		}
	}
	return batch, fast, true
}

// deliverAndAck delivers a batch and deletes it from the outbox; on failure
// the events stay there for a sweeper.
func (d *dispatcher) deliverAndAck(ctx context.Context, evs []OutboxEvent, paced func() bool) bool {
	if err := d.deliver(ctx, evs, paced); err != nil {
		d.s.log.Warn("dispatch failed; the sweeper retries", "events", len(evs), "first", evs[0].ID, "err", err)
		return false
	}
	for _, ev := range evs {
		select {
		case d.acks <- ev.ID:
		case <-ctx.Done():
			return true // undeleted: a sweeper re-delivers it, the logs dedupe
		}
	}
	return true
}

// ackQueue bounds the delivered events awaiting deletion; a full queue holds
// the workers back until the acker catches up.
const ackQueue = 1 << 16

// ackBatch bounds one outbox delete; ackGather is how long the acker
// collects before deleting. Each delete is a commit (a WAL flush), so
// deleting whatever had queued up at once meant a commit every millisecond
// or so under load; nothing waits for these deletes (a sweeper only looks at
// events older than SweepAfter), so they can wait to be fewer.
const (
	ackBatch  = 4096
	ackGather = 20 * time.Millisecond
)

// ack deletes delivered events from the outbox, as many as have queued up in
// one statement. The workers do not wait for it: a delete is a commit (a WAL
// flush) that had made up a good part of a small round's time, during which
// the next round of the conversation waited. An event whose delete is late
// or lost is at worst delivered again by a sweeper after SweepAfter, which
// the logs' dedupe absorbs.
func (d *dispatcher) ack(ctx context.Context) {
	ids := make([]int64, 0, ackBatch)
	// del deletes ids; also after ctx ended (shutdown), for a bounded time.
	del := func() {
		dctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 5*time.Second)
		defer cancel()
		if err := d.s.store.EventsDone(dctx, ids); err != nil {
			d.s.log.Warn("outbox ack", "events", len(ids), "err", err)
		}
	}
	gather := time.NewTimer(ackGather)
	gather.Stop()
	for {
		select {
		case id := <-d.acks:
			ids = append(ids[:0], id)
			gather.Reset(ackGather)
		collect:
			for len(ids) < ackBatch {
				select {
				case id := <-d.acks:
					ids = append(ids, id)
				case <-gather.C:
					break collect
				case <-ctx.Done():
					break collect
				}
			}
			gather.Stop()
			del()
		case <-ctx.Done():
			// Delete what the workers handed over before they stopped.
			ids = ids[:0]
			for len(ids) < ackBatch {
				select {
				case id := <-d.acks:
					ids = append(ids, id)
					continue
				default:
				}
				break
			}
			if len(ids) > 0 {
				del()
			}
			return
		}
	}
}

// sweepLease is how long a claimed event is hidden from other sweepers: long
// enough for one claimed batch (256 events, well under a second normally),
// short enough that a node dying mid-batch delays the rest only seconds.
const sweepLease = 10 * time.Second

func (d *dispatcher) sweep(ctx context.Context) {
	t := time.NewTicker(d.s.cfg.SweepEvery)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		// Claim only what this node can deliver: a claimed batch is hidden
		// from the other nodes' sweepers for sweepLease, so a node whose
		// Redis is away (a partition of this node only) would otherwise hold
		// back events that a healthy node could deliver at once.
		if err := d.s.rt.Ping(ctx); err != nil {
			continue
		}
		for ctx.Err() == nil {
			evs, err := d.s.store.ClaimEvents(ctx, time.Now().Add(-d.s.cfg.SweepAfter), sweepLease, 256)
			if err != nil {
				d.s.log.Warn("outbox sweep", "err", err)
				break
			}
			failed := false
			for chunk := range slices.Chunk(evs, maxBatch) {
				if !d.deliverAndAck(ctx, chunk, nil) {
					// Redis is likely down: the rest of the batch waits for
					// its lease to run out; claim no more this round.
					failed = true
					break
				}
			}
			if failed || len(evs) < 256 {
				break
			}
		}
	}
}

// deliver appends a batch of events, in order, to the logs of their
// recipients (moving each message's conversation up in their lists in the
// same step), fills the gaps the logs report, and updates the caches that
// depend on them. A round of fast-path messages may be appended at a pace
// (appendRound, paced not nil).
func (d *dispatcher) deliver(ctx context.Context, evs []OutboxEvent, paced func() bool) error {
	s := d.s
	var removed [][2]string // (user, conversation) to drop from session lists
	var ds []Delivery
	// The member sets the round needs, looked up at once; a conversation
	// whose membership changes within the round is looked up in order below.
	changing := map[string]bool{}
	for _, ev := range evs {
		switch ev.Type {
		case EventMemberAdded, EventMemberRemoved, EventMemberUpdated:
			changing[ev.ConversationID] = true
		}
	}
	var lookup []string
	seen := map[string]bool{}
	for _, ev := range evs {
		if len(ev.To) == 0 && !changing[ev.ConversationID] && !seen[ev.ConversationID] {
			seen[ev.ConversationID] = true
			lookup = append(lookup, ev.ConversationID)
		}
	}
	members := map[string][]string{} // per conversation, for this batch
	if len(lookup) > 0 {
		var err error
		if members, err = s.membersOf(ctx, lookup); err != nil {
			return err
		}
	}
	for _, ev := range evs {
		switch ev.Type {
		case EventMemberAdded, EventMemberRemoved, EventMemberUpdated:
			if err := s.rt.InvalidateMembers(ctx, ev.ConversationID); err != nil {
				return err
			}
			delete(members, ev.ConversationID)
		}
		to := ev.To
		if len(to) == 0 {
			ids, ok := members[ev.ConversationID]
			if !ok {
				var err error
				if ids, err = s.members(ctx, ev.ConversationID); err != nil {
					return err
				}
				members[ev.ConversationID] = ids
			}
			to = append(slices.Clip(ids), ev.Extra...)
		}
		if len(to) == 0 {
			continue
		}
		var activity time.Time
		var err error
		if ds, activity, err = s.deliveries(ctx, ds, ev, to); err != nil {
			return err
		}
		switch ev.Type {
		case EventConversationCreated:
			// The list orders by the conversation's own last activity (as
			// PostgreSQL does), not by when the user joined.
			if !activity.IsZero() {
				if err := s.rt.TouchSessions(ctx, to, ev.ConversationID, activity); err != nil {
					return err
				}
			}
		case EventMemberRemoved:
			for _, uid := range ev.Extra {
				removed = append(removed, [2]string{uid, ev.ConversationID})
			}
		}
	}
	if len(ds) > 0 {
		if err := d.appendRound(ctx, ds, paced); err != nil {
			return err
		}
	}
	for _, r := range removed {
		if err := s.rt.RemoveSession(ctx, r[0], r[1]); err != nil {
			return err
		}
	}
	return nil
}

// A round of fast-path messages to a large group is thousands of log
// entries (half a second of the group's messages times its members), and
// appended at once it kept Redis busy for tens of milliseconds (~45 ms for
// 25 messages to 1000 members), and imd with it, every half second. On a
// machine without spare cores, the live deliveries of messages sent during
// such a burst queued behind it. The logs are in no hurry for these
// messages (the fast path took them to the streams), so appendRound
// appends such a round in steps of paceUsers members, paceStep apart, over
// at most paceWithin, and stops pausing as soon as paced says so (an
// urgent event waits, or the worker is behind). fanout at 50 sends/s,
// interleaved, 3 runs each: p99 39.9 → 28.9 ms (docs/performance.md).
const (
	paceUsers  = 64
	paceStep   = 10 * time.Millisecond
	paceWithin = fanoutGather / 5
)

// appendRound appends ds and fills the gaps the logs report: at once, or,
// with paced not nil, in steps of paceUsers users (each user's entries in
// one step, in order), pausing between steps while paced reports true.
// Steps appended before a failure stay appended: the sweeper retries the
// round whole, and the logs' dedupe absorbs what is there already.
func (d *dispatcher) appendRound(ctx context.Context, ds []Delivery, paced func() bool) error {
	steps := [][]Delivery{ds}
	if paced != nil {
		steps = byUsers(ds, paceUsers)
	}
	gap := paceStep
	if len(steps) > 1 {
		gap = min(paceStep, paceWithin/time.Duration(len(steps)-1))
	}
	for i, step := range steps {
		if i > 0 && paced() {
			d.pause(ctx, gap)
		}
		gaps, err := d.s.rt.Append(ctx, step)
		if err != nil {
			return err
		}
		if err := d.s.fillGaps(ctx, gaps); err != nil {
			return err
		}
	}
	return nil
}

// byUsers splits ds into steps of at most n users each, keeping every
// user's deliveries together and in order.
func byUsers(ds []Delivery, n int) [][]Delivery {
	stepOf := map[string]int{}
	var steps [][]Delivery
	for _, dl := range ds {
		i, ok := stepOf[dl.UserID]
		if !ok {
			i = len(stepOf) / n
			stepOf[dl.UserID] = i
			if i == len(steps) {
				steps = append(steps, nil)
			}
		}
		steps[i] = append(steps[i], dl)
	}
	return steps
}

// sleepCtx waits for d or until ctx ends.
func sleepCtx(ctx context.Context, d time.Duration) {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
	case <-ctx.Done():
	}
}

// deliveries appends the log entries of ev for its recipients to ds; for
// conversation events it also returns the conversation's last activity.
// (Appending in place: a round of a large group is tens of thousands of
// deliveries, which a slice per event and a copy had allocated twice.)
func (s *Service) deliveries(ctx context.Context, ds []Delivery, ev OutboxEvent, to []string) ([]Delivery, time.Time, error) {
	ds = slices.Grow(ds, len(to))
	var activity time.Time
	switch ev.Type {
	case EventConversationCreated, EventConversationUpdated:
		// The payload is the conversation as each recipient sees it.
		views, err := s.store.ConversationViews(ctx, ev.ConversationID, to)
		if err != nil {
			return nil, activity, err
		}
		for _, uid := range to {
			v, ok := views[uid]
			if !ok {
				continue // left again before the dispatch
			}
			activity = v.LastActivityAt
			data, _ := json.Marshal(v)
			e := &LogEntry{Key: ev.Key(), Type: ev.Type, ConversationID: ev.ConversationID, Data: data}
			if ev.Type == EventConversationCreated {
				e.Baseline = ev.Seq
			}
			ds = append(ds, Delivery{UserID: uid, Entry: e})
		}
		return ds, activity, nil
	}
	shared := &LogEntry{Key: ev.Key(), Type: ev.Type, ConversationID: ev.ConversationID, Data: ev.Data}
	if ev.Type == EventMessageCreated {
		// The conversation moves up in each recipient's list with the same
		// step that appends the message.
		shared.Seq, shared.Activity = ev.Seq, ev.CreatedAt
	}
	for _, uid := range to {
		e := shared
		if ev.Type == EventMemberRemoved && contains(ev.Extra, uid) {
			forget := *shared
			forget.Forget = true
			e = &forget
		}
		ds = append(ds, Delivery{UserID: uid, Entry: e})
	}
	return ds, activity, nil
}

// fillGaps appends, in order, the messages users' logs are missing up to and
// including the ones that reported the gaps, read from the store: they are
// committed, since seq order is commit order. Gaps of one user and
// conversation are merged, and each conversation is read once.
//
// When a log does not know where a conversation starts (LastSeq -1: a new
// group, a member whose conversation.created is still in flight, a lost
// log), the fill starts at the conversation's oldest message still
// awaiting dispatch (Outbox.PendingMessages; usually the one that reported
// the gap), and tells the log so with a Baseline. Only such a message can
// still reach the log after the fill; were the fill to start above it, the
// log would take it for a duplicate and drop it. Everything below it has
// been dispatched: a lost log's stream was told to resync, and a new
// member's history is the REST API's. The fill reaches back gapFillBatch
// messages at most: when more of the conversation's messages are pending
// (a long outage), the older ones are dropped from this log as they come,
// as duplicates.
//
// A fill can itself be refused as a gap: the log moved between the gap's
// report and the fill's append (another fill of the conversation gave it a
// start below this fill's, or the log was lost). What the fill's append
// reports is filled again, from where the log stands then, up to
// fillRounds times in all; only a gap left after that is logged, and the
// conversation's next message reports it again.
func (s *Service) fillGaps(ctx context.Context, gaps []Gap) error {
	for range fillRounds {
		if len(gaps) == 0 {
			return nil
		}
		var err error
		if gaps, err = s.fillOnce(ctx, gaps); err != nil {
			return err
		}
	}
	for _, g := range gaps {
		s.log.Warn("gap persists after fill", "user", g.UserID, "conversation", g.ConversationID, "last", g.LastSeq, "seq", g.Seq)
	}
	return nil
}

// fillRounds bounds the fills of one set of gaps (fillGaps): a refused fill
// needs a log that moves under it, twice in a row is already unlikely.
const fillRounds = 3

// fillOnce appends what gaps lack (fillGaps) and returns the gaps that
// append reported.
func (s *Service) fillOnce(ctx context.Context, gaps []Gap) ([]Gap, error) {
	type span struct {
		uid, cid string
		lo, hi   int64
		unknown  bool
	}
	spans := map[[2]string]*span{}
	var order []*span
	for _, g := range gaps {
		k := [2]string{g.UserID, g.ConversationID}
		sp, ok := spans[k]
		if !ok {
			sp = &span{uid: g.UserID, cid: g.ConversationID, lo: g.LastSeq, hi: g.Seq, unknown: g.LastSeq < 0}
			spans[k] = sp
			order = append(order, sp)
		}
		sp.hi = max(sp.hi, g.Seq)
		if g.LastSeq >= 0 && (sp.unknown || g.LastSeq < sp.lo) {
			sp.lo, sp.unknown = g.LastSeq, false
		}
	}
	var unknown []string
	for _, sp := range order {
		if sp.unknown && !slices.Contains(unknown, sp.cid) {
			unknown = append(unknown, sp.cid)
		}
	}
	var pending map[string]int64
	if len(unknown) > 0 {
		var err error
		if pending, err = s.store.PendingMessages(ctx, unknown); err != nil {
			return nil, err
		}
	}
	lo, hi := map[string]int64{}, map[string]int64{}
	for _, sp := range order {
		if sp.unknown {
			from := sp.hi
			if p, ok := pending[sp.cid]; ok {
				from = min(from, p)
			}
			sp.lo = max(0, from-1, sp.hi-1-gapFillBatch)
		}
		if l, ok := lo[sp.cid]; !ok || sp.lo < l {
			lo[sp.cid] = sp.lo
		}
		hi[sp.cid] = max(hi[sp.cid], sp.hi)
	}
	msgs := map[string][]Message{}
	for cid, from := range lo {
		for from < hi[cid] {
			page, _, err := s.store.Messages(ctx, cid, HistoryQuery{After: true, AfterSeq: from,
				Limit: int(min(int64(gapFillBatch), hi[cid]-from))})
			if err != nil {
				return nil, err
			}
			if len(page) == 0 {
				break
			}
			msgs[cid] = append(msgs[cid], page...)
			from = page[len(page)-1].Seq
		}
	}
	// Each message's entry is made once and shared by every user it fills,
	// as the dispatcher's deliveries are (a first entry with a Baseline is
	// shared by the users whose fill starts there): the log adapter then
	// sends it once per call, and users given the same run take it whole.
	entries := map[string][]*LogEntry{}
	type start struct {
		cid           string
		seq, baseline int64
	}
	starts := map[start]*LogEntry{} // a first entry with its Baseline
	for cid, ms := range msgs {
		es := make([]*LogEntry, len(ms))
		for i, m := range ms {
			data, _ := json.Marshal(m)
			es[i] = &LogEntry{Key: "m" + m.ID, Type: EventMessageCreated, ConversationID: m.ConversationID, Seq: m.Seq, Data: data}
		}
		entries[cid] = es
	}
	var fill []Delivery
	for _, sp := range order {
		first := true
		for _, e := range entries[sp.cid] {
			if e.Seq <= sp.lo || e.Seq > sp.hi {
				continue
			}
			if first && sp.unknown && sp.lo > 0 {
				k := start{sp.cid, e.Seq, sp.lo}
				if starts[k] == nil {
					own := *e
					own.Baseline = sp.lo
					starts[k] = &own
				}
				e = starts[k]
			}
			first = false
			fill = append(fill, Delivery{UserID: sp.uid, Entry: e})
		}
	}
	return s.rt.Append(ctx, fill)
}

func contains(xs []string, x string) bool {
	for _, v := range xs {
		if v == x {
			return true
		}
	}
	return false
}
