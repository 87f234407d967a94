package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"io"
	"sync"
	"sync/atomic"
	"time"
)

// user is a provisioned account and its bearer token.
type user struct {
	name  string
	token string
}

// conv is a conversation the run sends into, with what the senders know
// about it: which seqs the server acknowledged. That set is what every
// member's stream is expected to deliver.
type conv struct {
	id      string
	path    string // POST path for messages
	members []*user

	mu       sync.Mutex
	accepted bitset
	// maxAcc is the highest acknowledged seq, read without the lock by
	// reconnecting streams (their catch-up target).
	maxAcc atomic.Int64
	// final is the drain target: MaxInt64 while sending, then the last
	// acknowledged seq. A stream is settled once it has delivered it.
	final atomic.Int64
}

func newConv(id string, members []*user) *conv {
	c := &conv{id: id, path: "/v1/conversations/" + id + "/messages", members: members}
	c.final.Store(1<<63 - 1)
	return c
}

func (c *conv) accept(seq int64) {
	c.mu.Lock()
	c.accepted.set(seq)
	c.mu.Unlock()
	for {
		cur := c.maxAcc.Load()
		if seq <= cur || c.maxAcc.CompareAndSwap(cur, seq) {
			return
		}
	}
}

// streamConv is one stream's view of one of its conversations.
type streamConv struct {
	c    *conv
	seen bitset
	last int64 // highest seq delivered: a lower one arriving later is out of order
	// max mirrors last for the drain, which reads it from another goroutine.
	max atomic.Int64
}

// stream is one SSE connection of one user, kept open like EventSource
// keeps it: when it ends it is reopened with Last-Event-ID. It counts
// every message.created it delivers; those counters belong to the
// stream's goroutine until exited is closed.
type stream struct {
	idx   int
	user  *user
	convs []*streamConv
	cl    *client
	down  time.Duration // pause after a deliberate drop
	// readBuf is the SSE reader's buffer size.
	readBuf int

	started   atomic.Bool   // its goroutine runs (exited will close)
	ready     chan struct{} // closed at the first ready event
	refused   chan struct{} // closed if the server refuses it (4xx) before it was ever ready
	refuseOne sync.Once
	notify    chan struct{} // poked after each message: the drain waits on it
	exited    chan struct{}
	readyOne  sync.Once

	mu       sync.Mutex
	cancel   context.CancelFunc // of the current connection; nil between connections
	dropping bool

	// Owned by the stream's goroutine until exited.
	lastID     []byte
	lat        histogram
	catchup    histogram
	deliveries int64
	dups       int64
	ooo        int64
	unknown    int64 // message.created of a conversation not expected on this stream
	resyncs    int64
	drops      int64 // deliberate (reconnect scenario)
	ends       int64 // the server ended the stream, or it failed to open
	lastRecv   int64 // unix nanos of the last delivery
	firstErr   error

	// Catch-up after a reconnection: from catchFrom until every
	// conversation has delivered catchTarget.
	catching    bool
	catchFrom   time.Time
	catchTarget []int64
}

func newStream(idx int, u *user, convs []*conv, cl *client, down time.Duration, readBuf int) *stream {
	s := &stream{idx: idx, user: u, cl: cl, down: down, readBuf: readBuf,
		ready: make(chan struct{}), refused: make(chan struct{}), notify: make(chan struct{}, 1), exited: make(chan struct{})}
	for _, c := range convs {
		s.convs = append(s.convs, &streamConv{c: c})
	}
	s.catchTarget = make([]int64, len(convs))
	return s
}

// run keeps the stream open until ctx ends.
func (s *stream) run(ctx context.Context) {
	defer close(s.exited)
	var rd *sseReader
	backoff := 50 * time.Millisecond
	reconnecting := false
	for ctx.Err() == nil {
		connCtx, cancel := context.WithCancel(ctx)
		s.mu.Lock()
		s.cancel, s.dropping = cancel, false
		s.mu.Unlock()
		if reconnecting {
			s.catching, s.catchFrom = true, time.Now()
			for i, sc := range s.convs {
				s.catchTarget[i] = sc.c.maxAcc.Load()
			}
		}
		err := s.connect(connCtx, &rd)
		cancel()
		s.mu.Lock()
		dropped := s.dropping
		s.cancel, s.dropping = nil, false
		s.mu.Unlock()
		if ctx.Err() != nil {
			return
		}
		reconnecting = true
		s.catching = false
		wait := s.down
		if dropped {
			s.drops++
		} else {
			// Not ours: the server ended it or refused it. Count it and
			// come back with a growing pause, as EventSource would.
			s.ends++
			if s.firstErr == nil {
				s.firstErr = err
			}
			var ae *apiError
			if errors.As(err, &ae) && ae.status >= 400 && ae.status < 500 && ae.status != 429 {
				select {
				case <-s.ready:
				default: // never worked: retrying will not help; setup fails now
					s.refuseOne.Do(func() { close(s.refused) })
				}
			}
			wait = backoff
			backoff = min(2*backoff, 2*time.Second)
		}
		if wait > 0 {
			t := time.NewTimer(wait)
			select {
			case <-ctx.Done():
				t.Stop()
				return
			case <-t.C:
			}
		}
	}
}

// drop closes the current connection (the reconnect scenario's waves); the
// stream reopens it after its pause. False if it was not connected.
func (s *stream) drop() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.cancel == nil || s.dropping {
		return false
	}
	s.dropping = true
	s.cancel()
	return true
}

// connect opens one connection and reads it until it fails or ends.
func (s *stream) connect(ctx context.Context, rd **sseReader) error {
	res, err := s.cl.openStream(ctx, s.user.token, s.lastID)
	if err != nil {
		return err
	}
	defer res.Body.Close()
	if *rd == nil {
		*rd = newSSEReader(res.Body, s.readBuf)
	} else {
		(*rd).reset(res.Body)
	}
	r := *rd
	r.id = append(r.id[:0], s.lastID...)
	for {
		typ, data, id, err := r.next()
		if err != nil {
			if err == io.EOF {
				err = io.ErrUnexpectedEOF // a stream never ends on its own
			}
			return err
		}
		s.event(typ, data, id)
	}
}

var (
	evMessage = []byte("message.created")
	evReady   = []byte("ready")
	evResync  = []byte("resync")
)

// event handles one dispatched event.
func (s *stream) event(typ, data, id []byte) {
	if len(id) > 0 {
		s.lastID = append(s.lastID[:0], id...)
	}
	switch {
	case bytes.Equal(typ, evMessage):
		s.message(data)
	case bytes.Equal(typ, evReady):
		var r struct {
			LastEventID string `json:"last_event_id"`
		}
		if json.Unmarshal(data, &r) == nil && r.LastEventID != "" {
			s.lastID = append(s.lastID[:0], r.LastEventID...)
		}
		s.readyOne.Do(func() { close(s.ready) })
		s.checkCatchup()
	case bytes.Equal(typ, evResync):
		s.resyncs++
	}
}

func (s *stream) message(data []byte) {
	now := time.Now().UnixNano()
	s.deliveries++
	s.lastRecv = now
	var m msgInfo
	if !parseMessage(data, &m) || m.seq < 1 {
		s.unknown++
		return
	}
	var sc *streamConv
	for _, x := range s.convs {
		if x.c.id == string(m.conv) {
			sc = x
			break
		}
	}
	if sc == nil {
		s.unknown++
		return
	}
	if sc.seen.set(m.seq) {
		s.dups++
	} else if m.seq < sc.last {
		s.ooo++
	} else {
		sc.last = m.seq
		sc.max.Store(m.seq)
	}
	if m.hasT {
		s.lat.record((now - m.t) / 1000)
	}
	s.checkCatchup()
	select {
	case s.notify <- struct{}{}:
	default:
	}
}

// checkCatchup records the catch-up time once the stream has delivered,
// in every conversation, what had been acknowledged when it reconnected.
func (s *stream) checkCatchup() {
	if !s.catching {
		return
	}
	for i, sc := range s.convs {
		if sc.last < s.catchTarget[i] {
			return
		}
	}
	s.catching = false
	s.catchup.record(time.Since(s.catchFrom).Microseconds())
}

// settled reports whether the stream has delivered every conversation's
// final seq: the server delivers a conversation in seq order on a stream,
// so after the last one nothing more of it is in flight.
func (s *stream) settled() bool {
	for _, sc := range s.convs {
		if sc.max.Load() < sc.c.final.Load() {
			return false
		}
	}
	return true
}

// missing counts, after the stream has exited, the acknowledged messages it
// never delivered and the delivered ones nobody acknowledged (a send that
// failed on the client's side but was stored: reported, not an error).
func (s *stream) missing() (missing, unacked int64) {
	for _, sc := range s.convs {
		sc.c.mu.Lock()
		sc.c.accepted.each(func(seq int64) {
			if !sc.seen.has(seq) {
				missing++
			}
		})
		sc.seen.each(func(seq int64) {
			if !sc.c.accepted.has(seq) {
				unacked++
			}
		})
		sc.c.mu.Unlock()
	}
	return missing, unacked
}
