package chat

import (
	"context"
	"encoding/json"
	"errors"
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
	pos, resync, err := s.startPosition(ctx, p.UserID, lastEventID)
	if err != nil {
		return err
	}
	connID := newID("s_")
	s.presenceConnect(ctx, p.UserID, connID)
	defer s.presenceDisconnect(context.WithoutCancel(ctx), p.UserID, connID)

	if resync != nil {
		if err := sink.Send([]StreamEvent{*resync}); err != nil {
			return err
		}
	}
	if pos, err = s.drain(ctx, p.UserID, pos, sink); err != nil {
		return err
	}
	if err := sink.Send([]StreamEvent{readyEvent(pos)}); err != nil {
		return err
	}
	hb := time.NewTicker(s.cfg.Heartbeat)
	defer hb.Stop()
	beats := 0
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-sub.Wake():
			if evs, next, ok := sub.Since(pos); ok {
				// The wake-up carried the new entries: no read back.
				if len(evs) > 0 {
					if err := sink.Send(evs); err != nil {
						return err
					}
					pos = next
				}
				continue
			}
			if pos, err = s.drain(ctx, p.UserID, pos, sink); err != nil {
				return err
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
				if pos, err = s.drain(ctx, p.UserID, pos, sink); err != nil {
					return err
				}
				if ok, err := s.tokenAlive(ctx, p); err == nil && !ok {
					return ErrStreamRevoked
				}
			}
		}
	}
}

// startPosition resolves where a stream starts: the given position, or the
// log's head for none (live from now) and for one that cannot be parsed.
func (s *Service) startPosition(ctx context.Context, uid, lastEventID string) (Position, *StreamEvent, error) {
	if lastEventID != "" {
		pos, err := ParsePosition(lastEventID)
		if err == nil {
			return pos, nil, nil
		}
	}
	head, err := s.rt.Head(ctx, uid)
	if err != nil {
		return Position{}, nil, Unavailable("event stream", err)
	}
	if lastEventID != "" {
		ev := resyncEvent(ResyncMalformed)
		return head, &ev, nil
	}
	return head, nil, nil
}

// drain writes everything in the log after pos. Redis errors keep the
// stream open: the next wake-up or heartbeat reads again.
func (s *Service) drain(ctx context.Context, uid string, pos Position, sink Sink) (Position, error) {
	for {
		evs, next, err := s.rt.Read(ctx, uid, pos, readBatch)
		var rs *ResyncError
		if errors.As(err, &rs) {
			head, herr := s.rt.Head(ctx, uid)
			if herr != nil {
				return pos, nil
			}
			if err := sink.Send([]StreamEvent{resyncEvent(rs.Reason)}); err != nil {
				return pos, err
			}
			pos = head
			continue
		}
		if err != nil {
			s.log.Debug("event log read", "user", uid, "err", err)
			return pos, nil
		}
		if len(evs) == 0 {
			return pos, nil
		}
		if err := sink.Send(evs); err != nil {
			return pos, err
		}
		pos = next
		if len(evs) < readBatch {
			// Caught up. An append that lands after this read publishes
			// its wake-up after writing, so nothing waits unseen.
			return pos, nil
		}
	}
}

// Poll is the stream for scripts: the events after lastEventID, waiting up
// to timeout for the first one. It returns the position to poll from next.
func (s *Service) Poll(ctx context.Context, p Principal, lastEventID string, timeout time.Duration) ([]StreamEvent, string, error) {
	var sub Subscription
	if timeout > 0 {
		var err error
		if sub, err = s.rt.Subscribe(ctx, p.UserID); err != nil {
			return nil, "", Unavailable("event stream", err)
		}
		defer sub.Close()
	}
	pos, resync, err := s.startPosition(ctx, p.UserID, lastEventID)
	if err != nil {
		return nil, "", err
	}
	if resync != nil {
		return []StreamEvent{*resync}, pos.String(), nil
	}
	var deadline <-chan time.Time
	if timeout > 0 {
		t := time.NewTimer(timeout)
		defer t.Stop()
		deadline = t.C
	}
	for {
		evs, next, err := s.rt.Read(ctx, p.UserID, pos, readBatch)
		var rs *ResyncError
		if errors.As(err, &rs) {
			head, herr := s.rt.Head(ctx, p.UserID)
			if herr != nil {
				return nil, "", Unavailable("event stream", herr)
			}
			return []StreamEvent{resyncEvent(rs.Reason)}, head.String(), nil
		}
		if err != nil {
			return nil, "", Unavailable("event stream", err)
		}
		if len(evs) > 0 || sub == nil {
			return nonNil(evs), next.String(), nil
		}
		select {
		case <-ctx.Done():
			return []StreamEvent{}, pos.String(), nil
		case <-deadline:
			return []StreamEvent{}, pos.String(), nil
		case <-sub.Wake():
		case ev, ok := <-sub.Events():
			if ok && ev.Type != eventEndToken {
				return []StreamEvent{ev}, pos.String(), nil
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

func readyEvent(pos Position) StreamEvent {
	data, _ := json.Marshal(ReadyEvent{LastEventID: pos.String()})
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
