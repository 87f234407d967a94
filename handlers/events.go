package handlers

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"runtime/debug"
	"strconv"
	"strings"
	"time"

	"imd/chat"
)

// SSE wire constants.
const (
	// retryMillis is the mean reconnect delay EventSource uses after a
	// drop; each stream gets its own within ±50 % of it (reconnectDelay).
	retryMillis = 2000
	// DefaultStreamWriteTimeout bounds one write to a stream: a client that does not read
	// for this long is disconnected instead of buffered for (DESIGN.md §6).
	DefaultStreamWriteTimeout = 10 * time.Second
	maxPollWait               = 60
)

// events serves GET /v1/events: SSE for EventSource and curl -N, or the JSON
// poll form for scripts. It is mounted by hand (not generated): the loop needs
// the real ResponseWriter for flushes and per-write deadlines.
func (s *Server) events(w http.ResponseWriter, r *http.Request) {
	// Checked before authentication: a long-lived token in a URL is refused
	// as such (400 naming it), not reported as missing credentials.
	q := r.URL.Query()
	if q.Has("access_token") {
		writeError(w, r, s.log, chat.Invalid("access_token", "tokens are not accepted in URLs; use a ticket"))
		return
	}
	p, err := s.streamPrincipal(r)
	if err != nil {
		writeError(w, r, s.log, err)
		return
	}
	lastID := r.Header.Get("Last-Event-ID")
	if lastID == "" {
		lastID = q.Get("last_event_id")
	}
	poll, err := boolParam(q.Get("poll"))
	if err != nil {
		writeError(w, r, s.log, chat.Invalid("poll", "must be a boolean"))
		return
	}
	accept := r.Header.Get("Accept")
	if poll || (strings.Contains(accept, "application/json") && !strings.Contains(accept, "text/event-stream")) {
		s.poll(w, r, p, lastID)
		return
	}
	s.stream(w, r, p, lastID)
}

// streamPrincipal accepts a Bearer header, the session cookie (same-origin
// EventSource) or a single-use ticket (cross-origin EventSource).
func (s *Server) streamPrincipal(r *http.Request) (chat.Principal, error) {
	if t := r.URL.Query().Get("ticket"); t != "" && bearer(r) == "" {
		return s.svc.RedeemTicket(r.Context(), t)
	}
	p, _, err := s.principal(r)
	return p, err
}

func boolParam(v string) (bool, error) {
	if v == "" {
		return false, nil
	}
	return strconv.ParseBool(v)
}

func (s *Server) poll(w http.ResponseWriter, r *http.Request, p chat.Principal, lastID string) {
	timeout := 0
	if v := r.URL.Query().Get("timeout"); v != "" {
		n, err := strconv.Atoi(v)
		if err != nil || n < 0 || n > maxPollWait {
			writeError(w, r, s.log, chat.Invalid("timeout", "must be an integer from 0 to 60"))
			return
		}
		timeout = n
	}
	ctx, cancel := s.streamContext(r.Context())
	defer cancel()
	evs, last, err := s.svc.Poll(ctx, p, lastID, time.Duration(timeout)*time.Second)
	if err != nil {
		writeError(w, r, s.log, err)
		return
	}
	type pollEvent struct {
		ID   *string        `json:"id"`
		Type chat.EventType `json:"type"`
		Data any            `json:"data"`
	}
	out := make([]pollEvent, len(evs))
	for i, ev := range evs {
		out[i] = pollEvent{Type: ev.Type, Data: ev.Data}
		if ev.ID != "" {
			id := ev.ID
			out[i].ID = &id
		}
	}
	w.Header().Set("Cache-Control", "no-store")
	writeJSON(w, http.StatusOK, map[string]any{"events": out, "last_event_id": last})
}

// streamContext ends with the request or when the server closes its streams.
func (s *Server) streamContext(parent context.Context) (context.Context, context.CancelFunc) {
	ctx, cancel := context.WithCancel(parent)
	stop := context.AfterFunc(s.streams, cancel)
	return ctx, func() { stop(); cancel() }
}

// stream serves the SSE form. The stream runs on a goroutine of its own,
// started fresh: once the sink has taken the connection over (sse.go) the
// handler returns, and the request's goroutine, deep from the middleware
// and authentication, is gone while the stream idles. Until then the
// handler waits, so that an error before the first frame can still be a
// proper problem+json, and the request's end (the client gone) ends the
// stream; after it, the sink's watchPeer does.
func (s *Server) stream(w http.ResponseWriter, r *http.Request, p chat.Principal, lastID string) {
	// Not derived from the request's context: net/http cancels that when
	// the handler returns, which is when the stream has only begun.
	ctx, cancel := context.WithCancel(s.streams)
	stopReq := context.AfterFunc(r.Context(), cancel)
	sink := newSSESink(w, r, s.cfg.StreamWriteTimeout, cancel)
	done := make(chan error, 1)
	s.streamWG.Add(1)
	s.metrics.streams.Inc()
	go s.runStream(ctx, cancel, p, lastID, sink, done)
	select {
	case <-sink.detached:
		stopReq()
	case err := <-done:
		stopReq()
		if !sink.started {
			if err == nil {
				err = chat.Unavailable("event stream", errors.New("stream ended before it started"))
			}
			writeError(w, r, s.log, err) // nothing sent yet: a proper error response
		}
	}
}

// runStream is the stream's goroutine. It reports how the stream ended on
// done (read by the handler only while it still owns the response).
func (s *Server) runStream(ctx context.Context, cancel context.CancelFunc, p chat.Principal, lastID string, sink *sseSink, done chan<- error) {
	var err error
	defer func() {
		if v := recover(); v != nil {
			// No recoverer middleware above this goroutine: a panic must
			// end this stream, not the process. Before the first frame the
			// handler answers (and logs) it as a 500.
			err = chat.Internal(fmt.Errorf("panic: %v\n%s", v, debug.Stack()))
			if sink.started {
				s.log.Error("stream panic", "user", p.UserID, "err", err)
			}
		}
		sink.finish()
		cancel()
		s.metrics.streams.Dec()
		s.streamWG.Done()
		done <- err
	}()
	err = s.svc.Stream(ctx, p, lastID, sink)
	if sink.started && err != nil && !errors.Is(err, context.Canceled) {
		s.log.Debug("stream ended", "user", p.UserID, "err", err)
	}
}
