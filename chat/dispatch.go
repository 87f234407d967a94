package chat

import (
	"context"
	"encoding/json"
	"hash/fnv"
	"sync"
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
	queues []chan OutboxEvent
	wg     sync.WaitGroup
}

// queueDepth bounds memory per worker; beyond it events wait for the sweeper.
const queueDepth = 4096

// gapFillBatch bounds how many missing messages one fill reads at once.
const gapFillBatch = 500

func newDispatcher(s *Service) *dispatcher {
	d := &dispatcher{s: s, queues: make([]chan OutboxEvent, s.cfg.DispatchWorkers)}
	for i := range d.queues {
		d.queues[i] = make(chan OutboxEvent, queueDepth)
	}
	return d
}

func (d *dispatcher) start(ctx context.Context) {
	for _, q := range d.queues {
		d.wg.Go(func() { d.work(ctx, q) })
	}
	d.wg.Go(func() { d.sweep(ctx) })
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
		select {
		case d.queues[h.Sum32()%uint32(len(d.queues))] <- ev:
		default: // full: the sweeper delivers it
		}
	}
}

func (d *dispatcher) work(ctx context.Context, q chan OutboxEvent) {
	for {
		select {
		case <-ctx.Done():
			return
		case ev := <-q:
			d.deliverAndAck(ctx, ev)
		}
	}
}

func (d *dispatcher) deliverAndAck(ctx context.Context, ev OutboxEvent) bool {
	if err := d.s.deliver(ctx, ev); err != nil {
		d.s.log.Warn("dispatch failed; the sweeper retries", "event", ev.ID, "type", ev.Type, "err", err)
		return false
	}
	if err := d.s.store.EventsDone(ctx, []int64{ev.ID}); err != nil {
		d.s.log.Warn("outbox ack", "event", ev.ID, "err", err)
	}
	return true
}

// sweepLease is how long a claimed event is hidden from other sweepers.
const sweepLease = 30 * time.Second

func (d *dispatcher) sweep(ctx context.Context) {
	t := time.NewTicker(d.s.cfg.SweepEvery)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		for ctx.Err() == nil {
			evs, err := d.s.store.ClaimEvents(ctx, time.Now().Add(-d.s.cfg.SweepAfter), sweepLease, 256)
			if err != nil {
				d.s.log.Warn("outbox sweep", "err", err)
				break
			}
			for _, ev := range evs {
				if !d.deliverAndAck(ctx, ev) {
					break // Redis is likely down; retry the rest next tick
				}
			}
			if len(evs) < 256 {
				break
			}
		}
	}
}

// deliver appends ev to the log of each recipient, filling any gaps the logs
// report, and updates the caches that depend on it.
func (s *Service) deliver(ctx context.Context, ev OutboxEvent) error {
	switch ev.Type {
	case EventMemberAdded, EventMemberRemoved, EventMemberUpdated:
		if err := s.rt.InvalidateMembers(ctx, ev.ConversationID); err != nil {
			return err
		}
	}
	to := ev.To
	if len(to) == 0 {
		ids, err := s.members(ctx, ev.ConversationID)
		if err != nil {
			return err
		}
		to = append(ids, ev.Extra...)
	}
	if len(to) == 0 {
		return nil
	}
	ds, activity, err := s.deliveries(ctx, ev, to)
	if err != nil {
		return err
	}
	gaps, err := s.rt.Append(ctx, ds)
	if err != nil {
		return err
	}
	for _, g := range gaps {
		if err := s.fillGap(ctx, g, ds); err != nil {
			return err
		}
	}
	switch ev.Type {
	case EventMessageCreated:
		err = s.rt.TouchSessions(ctx, to, ev.ConversationID, ev.CreatedAt)
	case EventConversationCreated:
		if activity.IsZero() {
			break
		}
		// The list orders by the conversation's own last activity (as
		// PostgreSQL does), not by when the user joined.
		err = s.rt.TouchSessions(ctx, to, ev.ConversationID, activity)
	case EventMemberRemoved:
		for _, uid := range ev.Extra {
			if err = s.rt.RemoveSession(ctx, uid, ev.ConversationID); err != nil {
				break
			}
		}
	}
	return err
}

// deliveries builds the log entries of ev for its recipients; for
// conversation events it also returns the conversation's last activity.
func (s *Service) deliveries(ctx context.Context, ev OutboxEvent, to []string) ([]Delivery, time.Time, error) {
	ds := make([]Delivery, 0, len(to))
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
		shared.Seq = ev.Seq
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

// fillGap appends the messages a user's log is missing before g.Seq, read
// from PostgreSQL (they are committed: seq order is commit order), then the
// message that reported the gap.
func (s *Service) fillGap(ctx context.Context, g Gap, ds []Delivery) error {
	var orig *LogEntry
	for _, d := range ds {
		if d.UserID == g.UserID && d.Entry.Seq == g.Seq && d.Entry.ConversationID == g.ConversationID {
			orig = d.Entry
			break
		}
	}
	last := g.LastSeq
	for attempt := 0; attempt < 1000 && last < g.Seq-1; attempt++ {
		msgs, _, err := s.store.Messages(ctx, g.ConversationID, HistoryQuery{After: true, AfterSeq: last,
			Limit: int(min(int64(gapFillBatch), g.Seq-1-last))})
		if err != nil {
			return err
		}
		if len(msgs) == 0 {
			break
		}
		fill := make([]Delivery, len(msgs))
		for i, m := range msgs {
			data, _ := json.Marshal(m)
			fill[i] = Delivery{UserID: g.UserID, Entry: &LogEntry{Key: "m" + m.ID, Type: EventMessageCreated,
				ConversationID: m.ConversationID, Seq: m.Seq, Data: data}}
		}
		if _, err := s.rt.Append(ctx, fill); err != nil {
			return err
		}
		last = msgs[len(msgs)-1].Seq
	}
	if orig == nil {
		return nil
	}
	gaps, err := s.rt.Append(ctx, []Delivery{{UserID: g.UserID, Entry: orig}})
	if err != nil {
		return err
	}
	if len(gaps) > 0 {
		s.log.Warn("gap persists after fill", "user", g.UserID, "conversation", g.ConversationID, "seq", g.Seq)
	}
	return nil
}

func contains(xs []string, x string) bool {
	for _, v := range xs {
		if v == x {
			return true
		}
	}
	return false
}
