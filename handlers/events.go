package handlers

import (
	"bytes"
	"context"
	"errors"
	"net/http"
	"strconv"
	"strings"
	"time"

	"imd/chat"
)

// SSE wire constants.
const (
	// retryMillis is the reconnect delay EventSource uses after a drop.
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

func (s *Server) stream(w http.ResponseWriter, r *http.Request, p chat.Principal, lastID string) {
	s.streamWG.Add(1)
	defer s.streamWG.Done()
	ctx, cancel := s.streamContext(r.Context())
	defer cancel()
	s.metrics.streams.Inc()
	defer s.metrics.streams.Dec()

	sink := &sseSink{w: w, rc: http.NewResponseController(w), timeout: s.cfg.StreamWriteTimeout}
	err := s.svc.Stream(ctx, p, lastID, sink)
	if !sink.started {
		if err == nil {
			err = chat.Unavailable("event stream", errors.New("stream ended before it started"))
		}
		writeError(w, r, s.log, err) // nothing sent yet: a proper error response
		return
	}
	if err != nil && !errors.Is(err, context.Canceled) {
		s.log.Debug("stream ended", "user", p.UserID, "err", err)
	}
}

// sseSink writes SSE frames. Only the stream's goroutine uses it. Headers go
// out with the first write, so an error before it can still be a problem+json.
type sseSink struct {
	timeout time.Duration
	w       http.ResponseWriter
	rc      *http.ResponseController
	started bool
	buf     bytes.Buffer
}

func (k *sseSink) start() {
	h := k.w.Header()
	h.Set("Content-Type", "text/event-stream")
	h.Set("Cache-Control", "no-cache")
	h.Set("X-Accel-Buffering", "no") // nginx: do not buffer the stream
	h.Set("Connection", "keep-alive")
	k.w.WriteHeader(http.StatusOK)
	k.buf.WriteString("retry: " + strconv.Itoa(retryMillis) + "\n\n")
	k.started = true
}

// Send writes a batch of events as one write and one flush.
func (k *sseSink) Send(evs []chat.StreamEvent) error {
	if !k.started {
		k.start()
	}
	for _, ev := range evs {
		if ev.ID != "" {
			k.buf.WriteString("id: " + ev.ID + "\n")
		}
		k.buf.WriteString("event: " + string(ev.Type) + "\n")
		// JSON has no raw newlines, so the data fits one data: line.
		k.buf.WriteString("data: ")
		k.buf.Write(ev.Data)
		k.buf.WriteString("\n\n")
	}
	return k.flush()
}

// Ping writes a comment line that keeps proxies from closing an idle stream.
func (k *sseSink) Ping() error {
	if !k.started {
		k.start()
	}
	k.buf.WriteString(": ping\n\n")
	return k.flush()
}

func (k *sseSink) flush() error {
	// The server's WriteTimeout must not kill long streams; each write gets its own deadline.
	_ = k.rc.SetWriteDeadline(time.Now().Add(k.timeout))
	_, err := k.w.Write(k.buf.Bytes())
	k.buf.Reset()
	if err != nil {
		return err
	}
	return k.rc.Flush()
}
