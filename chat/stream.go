package chat

import (
	"context"
	"encoding/json"
	"errors"
	"math/rand/v2"
	"time"
)

// Sink is where a stream writes; the HTTP adapter implements it with SSE
// framing, a write deadline and a flush per call.
type Sink interface {
	Send(evs []StreamEvent) error
	Ping() error
}

// ErrSlowConsumer ends a stream whose client does not keep up; it resumes
// from its log on reconnect, so the server never buffers without bound.
var ErrSlowConsumer = errors.New("stream consumer too slow")

// ErrStreamRevoked ends a stream whose token was revoked.
var ErrStreamRevoked = errors.New("stream token revoked")

// eventEndToken is a control event on the bus, never shown to clients:
// published to a user's channel, it ends the streams of the token in its
// data; broadcast to every node (Service.revoked), it drops that token from
// their caches. Not Droppable: a revocation must not be lost in a full
// buffer.
const eventEndToken EventType = "_end_token"

// readBatch is how many log entries one read returns.
const readBatch = 500

// backstopEvery is how many heartbeats pass between a stream's backstops:
// a read of its log and a re-check of its token in the store. The bus wakes
// streams and ends revoked ones at once; these catch a missed Pub/Sub
// message within a minute, and cost an idle stream one Redis script and one
// query a minute instead of a script every heartbeat.
const backstopEvery = 4

// beatPhase returns when a new stream beats first, within one period, and
// where in the backstop cycle it starts. Streams that open together (every
// client reconnects within seconds after a deploy or a network blip) would
// otherwise beat together for as long as they live: each heartbeat a
// presence refresh per stream in the same instant, and each backstop a log
// read and a token query per stream at once. With random phases the same
// work spreads evenly over the period (and the backstops over backstopEvery
// periods); a first ping sooner than a full period costs nothing.
func beatPhase(every time.Duration) (first time.Duration, beats int) {
	return every - rand.N(every), rand.IntN(backstopEvery)
}

// Stream serves one live event stream until ctx ends, the token is revoked,
// or the sink fails. It subscribes before reading the log, so nothing
// committed in between is missed; replays from lastEventID, sends ready,
// then delivers live. A position the log cannot serve yields resync first.
func (s *Service) Stream(ctx context.Context, p Principal, lastEventID string, sink Sink) error {
	sub, err := s.rt.Subscribe(ctx, p.UserID)
	if err != nil {
		return Unavailable("event stream", err)
	}
	defer sub.Close()
	ib := s.local.add(p.UserID)
	defer s.local.remove(p.UserID, ib)
	cur, resync, err := s.startCursor(ctx, p.UserID, lastEventID)
	if err != nil {
		return err
	}
	st := newStreamState(p.UserID, cur)
	connID := newID("s_")
	s.presenceConnect(ctx, p.UserID, connID)
	defer s.presenceDisconnect(context.WithoutCancel(ctx), p.UserID, connID)

	if resync != nil {
		if err := sink.Send([]StreamEvent{*resync}); err != nil {
			return err
		}
	}
	if err := s.drain(ctx, st, sink); err != nil {
		return err
	}
	if err := sink.Send([]StreamEvent{readyEvent(st.cursor())}); err != nil {
		return err
	}
	first, beats := beatPhase(s.cfg.Heartbeat)
	hb := time.NewTicker(first)
	defer hb.Stop()
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-sub.Wake():
			evs, next, ok := sub.Since(st.pos, st.have)
			if ok {
				// The wake-up carried the new entries: no read back.
				if evs = st.sinced(evs, next, true); len(evs) > 0 {
					if err := sink.Send(evs); err != nil {
						return err
					}
				}
				continue
			}
			st.sinced(nil, st.pos, false)
			if err := s.drain(ctx, st, sink); err != nil {
				return err
			}
		case <-ib.wake:
			if evs := s.earlyEvents(ctx, st, ib); len(evs) > 0 {
				if err := sink.Send(evs); err != nil {
					return err
				}
			}
		case ev, ok := <-sub.Events():
			if !ok {
				return ErrSlowConsumer
			}
			if ev.Type == eventEndToken {
				if string(ev.Data) == quote(p.TokenID) {
					return ErrStreamRevoked
				}
				continue
			}
			if err := sink.Send([]StreamEvent{ev}); err != nil {
				return err
			}
		case <-hb.C:
			if first != 0 {
				first = 0
				hb.Reset(s.cfg.Heartbeat) // from the phase on, every period
			}
			if err := sink.Ping(); err != nil {
				return err
			}
			if err := s.rt.Refresh(ctx, p.UserID, connID, s.cfg.PresenceTTL); err != nil {
				s.log.Debug("presence refresh", "err", err)
			}
			if beats++; beats%backstopEvery == 0 {
				// The backstop for a wake-up lost anyway: the bus wakes every
				// stream after a reconnect (whatever was published meanwhile
				// is gone), so only a rarer loss is left to this read.
				if err := s.drain(ctx, st, sink); err != nil {
					return err
				}
				if ok, err := s.tokenAlive(ctx, p); err == nil && !ok {
					return ErrStreamRevoked
				}
			}
		}
	}
}

// startCursor resolves where a stream starts: the given event id, or the
// log's head for none (live from now) and for one that cannot be parsed.
func (s *Service) startCursor(ctx context.Context, uid, lastEventID string) (Cursor, *StreamEvent, error) {
	if lastEventID != "" {
		cur, err := ParseCursor(lastEventID)
		if err == nil {
			return cur, nil, nil
		}
	}
	head, err := s.rt.Head(ctx, uid)
	if err != nil {
		return Cursor{}, nil, Unavailable("event stream", err)
	}
	if lastEventID != "" {
		ev := resyncEvent(ResyncMalformed)
		return Cursor{Pos: head}, &ev, nil
	}
	return Cursor{Pos: head}, nil, nil
}

// earlyEvents takes the fast path's messages from ib and returns, as
// events, those that continue the stream's conversations (streamState.early).
func (s *Service) earlyEvents(ctx context.Context, st *streamState, ib *inbox) []StreamEvent {
	if !st.asked {
		// Where the log stands in each conversation, so that the fast path
		// can continue them (asked only by streams that get fast-path
		// messages).
		if head, seqs, err := s.rt.HeadSeqs(ctx, st.uid); err == nil {
			st.knowLog(head, seqs)
		}
	}
	msgs := ib.take()
	evs := make([]StreamEvent, 0, len(msgs)) // one allocation, not a growing one per wake-up
	for _, m := range msgs {
		if ev, ok := st.early(m); ok {
			evs = append(evs, ev)
		}
	}
	return evs
}

// drain writes everything in the log after the stream's position. Redis
// errors keep the stream open: the next wake-up or heartbeat reads again.
func (s *Service) drain(ctx context.Context, st *streamState, sink Sink) error {
	for {
		evs, next, err := s.rt.Read(ctx, st.uid, st.pos, readBatch)
		var rs *ResyncError
		if errors.As(err, &rs) {
			head, herr := s.rt.Head(ctx, st.uid)
			if herr != nil {
				return nil
			}
			if err := sink.Send([]StreamEvent{resyncEvent(rs.Reason)}); err != nil {
				return err
			}
			st.resynced(head)
			continue
		}
		if err != nil {
			s.log.Debug("event log read", "user", st.uid, "err", err)
			return nil
		}
		n := len(evs)
		if evs = append(st.logged(evs, next), st.flush()...); len(evs) > 0 {
			if err := sink.Send(evs); err != nil {
				return err
			}
		}
		if n < readBatch {
			// Caught up. An append that lands after this read publishes
			// its wake-up after writing, so nothing waits unseen.
			return nil
		}
	}
}

// Poll is the stream for scripts: the events after lastEventID, waiting up
// to timeout for the first one. It returns the event id to poll from next.
// An event id from a stream that was ahead of its log (Cursor) is honoured.
// While it waits, a poll takes the fast path's messages of large groups
// as a stream does (fanout.go), so that it does not wait for the rounds in
// which their logs take them (up to fanoutGather); otherwise it reads the
// log.
func (s *Service) Poll(ctx context.Context, p Principal, lastEventID string, timeout time.Duration) ([]StreamEvent, string, error) {
	var (
		sub   Subscription
		ib    *inbox
		early <-chan struct{} // nil, never ready, for a poll that does not wait
	)
	if timeout > 0 {
		var err error
		if sub, err = s.rt.Subscribe(ctx, p.UserID); err != nil {
			return nil, "", Unavailable("event stream", err)
		}
		defer sub.Close()
		ib = s.local.add(p.UserID)
		defer s.local.remove(p.UserID, ib)
		early = ib.wake
	}
	cur, resync, err := s.startCursor(ctx, p.UserID, lastEventID)
	if err != nil {
		return nil, "", err
	}
	if resync != nil {
		return []StreamEvent{*resync}, cur.String(), nil
	}
	st := newStreamState(p.UserID, cur)
	var deadline <-chan time.Time
	if timeout > 0 {
		t := time.NewTimer(timeout)
		defer t.Stop()
		deadline = t.C
	}
	for {
		evs, next, err := s.rt.Read(ctx, p.UserID, st.pos, readBatch)
		var rs *ResyncError
		if errors.As(err, &rs) {
			head, herr := s.rt.Head(ctx, p.UserID)
			if herr != nil {
				return nil, "", Unavailable("event stream", herr)
			}
			st.resynced(head)
			return []StreamEvent{resyncEvent(rs.Reason)}, st.cursor(), nil
		}
		if err != nil {
			return nil, "", Unavailable("event stream", err)
		}
		n := len(evs)
		evs = append(st.logged(evs, next), st.flush()...)
		if len(evs) > 0 || sub == nil || n == readBatch {
			return nonNil(evs), st.cursor(), nil
		}
		if s.hooks.PollWaiting != nil {
			s.hooks.PollWaiting(p.UserID)
		}
		select {
		case <-ctx.Done():
			return []StreamEvent{}, st.cursor(), nil
		case <-deadline:
			return []StreamEvent{}, st.cursor(), nil
		case <-early:
			if evs := s.earlyEvents(ctx, st, ib); len(evs) > 0 {
				return evs, st.cursor(), nil
			}
		case <-sub.Wake():
		case ev, ok := <-sub.Events():
			if ok && ev.Type != eventEndToken {
				return []StreamEvent{ev}, st.cursor(), nil
			}
		}
	}
}

func nonNil(evs []StreamEvent) []StreamEvent {
	if evs == nil {
		return []StreamEvent{}
	}
	return evs
}

func readyEvent(cursor string) StreamEvent {
	data, _ := json.Marshal(ReadyEvent{LastEventID: cursor})
	return StreamEvent{Type: EventReady, Data: data}
}

func resyncEvent(reason string) StreamEvent {
	data, _ := json.Marshal(ResyncEvent{Reason: reason})
	return StreamEvent{Type: EventResync, Data: data}
}

func quote(s string) string { b, _ := json.Marshal(s); return string(b) }

// endStreams tells every node to end the streams of one token.
func (s *Service) endStreams(ctx context.Context, uid, tokenID string) {
	ev := StreamEvent{Type: eventEndToken, Data: json.RawMessage(quote(tokenID))}
	if err := s.rt.Publish(ctx, []string{uid}, ev); err != nil {
		s.log.Warn("publish stream end", "err", err)
	}
}

func (s *Service) presenceConnect(ctx context.Context, uid, connID string) {
	first, err := s.rt.Connect(ctx, uid, connID, s.cfg.PresenceTTL)
	if err != nil {
		s.log.Debug("presence connect", "err", err)
		return
	}
	if first {
		s.publishPresence(ctx, PresenceInfo{UserID: uid, Online: true})
	}
}

func (s *Service) presenceDisconnect(ctx context.Context, uid, connID string) {
	last, err := s.rt.Disconnect(ctx, uid, connID)
	if err != nil {
		s.log.Debug("presence disconnect", "err", err)
		return
	}
	if last {
		now := Now()
		s.publishPresence(ctx, PresenceInfo{UserID: uid, Online: false, LastSeenAt: &now})
	}
}

// publishPresence tells a user's direct-conversation peers about an
// online/offline transition (ephemeral: a missed one is repaired by GET /v1/presence).
func (s *Service) publishPresence(ctx context.Context, info PresenceInfo) {
	peers, err := s.store.DirectPeers(ctx, info.UserID)
	if err != nil || len(peers) == 0 {
		return
	}
	data, _ := json.Marshal(info)
	if err := s.rt.Publish(ctx, peers, StreamEvent{Type: EventPresence, Data: data}); err != nil {
		s.log.Debug("publish presence", "err", err)
	}
}
