package handlers

import (
	"bytes"
	"context"
	"math/rand/v2"
	"net"
	"net/http"
	"strconv"
	"sync"
	"time"

	"imd/chat"
)

// An open event stream is mostly idle, and there are as many as there are
// online devices, so what one costs while it waits is what a node's memory
// is sized by (docs/performance.md, "idle"). net/http keeps, for every
// connection for as long as its handler runs, a 4 KiB read buffer, two
// write buffers (4 KiB and 2 KiB), a background read goroutine and the
// handler goroutine's stack, grown deep through the middleware and the
// authentication. So the stream takes its connection over once the
// response starts (Hijack): the handler returns and all of that is freed,
// the stream runs on a goroutine of its own (events.go), frames are built
// in a pooled buffer and written to the net.Conn directly, and one epoll
// instance for the whole process notices clients going away (watchPeer).
// What is left per idle stream is that goroutine's stack, the connection
// and the subscription.
//
// The response stays the one net/http would send (chunked for HTTP/1.1,
// ended by the zero-length chunk), except that it says Connection: close:
// the connection is never handed back to net/http, so it cannot serve
// another request after the stream.

const (
	// chunkLineMax is the room kept in front of a frame for its chunk-size
	// line: up to 16 hex digits and CRLF.
	chunkLineMax = 18
	// maxPooledFrame keeps the buffer of an unusually large batch (a replay
	// of hundreds of events) out of the pool, so that the pool holds only
	// the small buffers idle streams' heartbeats need.
	maxPooledFrame = 64 << 10
	// endWriteTimeout bounds the write of the final zero-length chunk: it is
	// a courtesy to a client that reads (a clean end rather than a cut one),
	// and must not hold up shutdown for one that does not.
	endWriteTimeout = time.Second
)

// framePool holds frame buffers between writes: an idle stream owns none.
var framePool = sync.Pool{New: func() any { b := make([]byte, 0, 512); return &b }}

// lastChunk ends a chunked body (no trailers).
var lastChunk = []byte("0\r\n\r\n")

// sseSink writes SSE frames. Only the stream's goroutine uses it. Headers go
// out with the first frame, so an error before it can still be a
// problem+json. With the first frame it takes the connection over (see
// above); where net/http cannot hand it over (HTTP/2, a ResponseWriter
// without Hijack) it writes through the ResponseWriter as before, and the
// handler stays in ServeHTTP until the stream ends.
type sseSink struct {
	timeout time.Duration
	w       http.ResponseWriter
	rc      *http.ResponseController
	http11  bool               // the request is HTTP/1.1: chunked body (HTTP/1.0: ended by the close)
	cancel  context.CancelFunc // ends the stream: called when the client goes away

	started bool
	// detached is closed once the connection is the sink's: the handler
	// returns, and w and the request must not be used any more.
	detached chan struct{}
	conn     net.Conn // the taken-over connection; nil on the ResponseWriter path
	unwatch  func()   // stops watchPeer's watch of conn
	head     []byte   // status line and headers, not yet sent: they go with the first frame
	failed   bool     // a write failed: the body cannot be ended cleanly
	// sentRetry: the reconnect delay went out (with the first frame).
	sentRetry bool
	retry     int // the reconnect delay, ms (reconnectDelay)

	// deadline is the write deadline set last (zero: none yet); see rearm.
	deadline time.Time

	frame   *[]byte // the pooled buffer between begin and end
	reserve int     // bytes kept free in front of the frame for head and chunk-size line
}

func newSSESink(w http.ResponseWriter, r *http.Request, timeout time.Duration, cancel context.CancelFunc) *sseSink {
	return &sseSink{w: w, rc: http.NewResponseController(w), http11: r.ProtoAtLeast(1, 1), timeout: timeout,
		cancel: cancel, detached: make(chan struct{}), retry: reconnectDelay()}
}

// reconnectDelay picks a stream's retry: delay, uniformly within ±50 % of
// retryMillis. When a node stops, all its clients see their streams drop in
// the same instant; with one fixed delay they would all come back in the
// same millisecond, to whichever nodes remain, each reconnection an
// authentication, a subscription and a log read. Spread, the same
// reconnections arrive over a second or two.
func reconnectDelay() int {
	return retryMillis/2 + rand.IntN(retryMillis+1)
}

// start sends nothing yet: it fixes the headers and takes the connection.
func (k *sseSink) start() {
	k.started = true
	h := k.w.Header()
	h.Set("Content-Type", "text/event-stream")
	h.Set("Cache-Control", "no-cache")
	h.Set("X-Accel-Buffering", "no") // nginx: do not buffer the stream
	conn, _, err := k.rc.Hijack()
	if err != nil {
		h.Set("Connection", "keep-alive")
		k.w.WriteHeader(http.StatusOK)
		return
	}
	// The hijacked reader may hold bytes the client sent after the request;
	// nothing reads them, the connection closes when the stream ends.
	k.conn = conn
	h.Set("Connection", "close")
	h.Set("Date", time.Now().UTC().Format(http.TimeFormat))
	var head bytes.Buffer
	if k.http11 {
		h.Set("Transfer-Encoding", "chunked")
		head.WriteString("HTTP/1.1 200 OK\r\n")
	} else {
		head.WriteString("HTTP/1.0 200 OK\r\n")
	}
	_ = h.Write(&head)
	head.WriteString("\r\n")
	k.head = head.Bytes()
	// The response and its connection state (buffers, request) are
	// net/http's garbage now; holding them would keep all of it.
	k.w, k.rc = nil, nil
	k.unwatch = watchPeer(conn, k.cancel)
	close(k.detached)
}

// watchPeer arranges for cancel to be called once the client has closed or
// reset its side of conn. Without it a client that went away would only be
// noticed by the next heartbeat's write, and its presence would stay online
// until then. Where it can (Linux, a plain TCP connection) one epoll
// instance watches every stream of the process (peer_linux.go), so an idle
// stream costs no goroutine for this; elsewhere a goroutine per stream
// blocks reading the connection. The returned stop must be called before
// conn is closed.
func watchPeer(conn net.Conn, cancel context.CancelFunc) (stop func()) {
	if stop, ok := pollPeer(conn, cancel); ok {
		return stop
	}
	go readPeer(conn, cancel)
	return func() {}
}

// readPeer returns, ending the stream, when a read of conn fails: the
// client went away, or the stream closed the connection. It drops whatever
// the client sends: nothing is served after the stream.
func readPeer(conn net.Conn, cancel context.CancelFunc) {
	var b [64]byte
	for {
		if _, err := conn.Read(b[:]); err != nil {
			cancel()
			return
		}
	}
}

// Send writes a batch of events as one write.
func (k *sseSink) Send(evs []chat.StreamEvent) error {
	b := k.begin()
	for _, ev := range evs {
		if ev.ID != "" {
			b = append(b, "id: "...)
			b = append(b, ev.ID...)
			b = append(b, '\n')
		}
		b = append(b, "event: "...)
		b = append(b, ev.Type...)
		// JSON has no raw newlines, so the data fits one data: line.
		b = append(b, "\ndata: "...)
		b = append(b, ev.Data...)
		b = append(b, "\n\n"...)
	}
	return k.end(b)
}

// Ping writes a comment line that keeps proxies from closing an idle stream.
func (k *sseSink) Ping() error {
	return k.end(append(k.begin(), ": ping\n\n"...))
}

// begin returns an empty frame buffer with room in front for what end
// prepends; the first frame starts with the reconnect delay.
func (k *sseSink) begin() []byte {
	if !k.started {
		k.start()
	}
	k.frame = framePool.Get().(*[]byte)
	k.reserve = 0
	if k.conn != nil {
		k.reserve = len(k.head) + chunkLineMax
	}
	b := append((*k.frame)[:0], make([]byte, k.reserve)...)
	if !k.sentRetry {
		k.sentRetry = true
		b = append(b, "retry: "...)
		b = strconv.AppendInt(b, int64(k.retry), 10)
		b = append(b, "\n\n"...)
	}
	return b
}

// end writes the frame with one write under the stream's write deadline
// (the server has no WriteTimeout: it would cut long streams) and returns
// the buffer to the pool.
func (k *sseSink) end(b []byte) error {
	defer k.release(b)
	payload := b[k.reserve:]
	if len(payload) == 0 {
		return nil // an empty chunk would end the body
	}
	if k.conn == nil {
		if d, ok := k.rearm(time.Now()); ok {
			_ = k.rc.SetWriteDeadline(d)
		}
		if _, err := k.w.Write(payload); err != nil {
			return err
		}
		return k.rc.Flush()
	}
	start := k.reserve
	if k.http11 {
		var line [chunkLineMax]byte
		l := append(strconv.AppendInt(line[:0], int64(len(payload)), 16), '\r', '\n')
		start -= len(l)
		copy(b[start:], l)
		b = append(b, '\r', '\n')
	}
	if k.head != nil {
		start -= len(k.head)
		copy(b[start:], k.head)
		k.head = nil
	}
	if d, ok := k.rearm(time.Now()); ok {
		_ = k.conn.SetWriteDeadline(d)
	}
	if _, err := k.conn.Write(b[start:]); err != nil {
		k.failed = true
		return err
	}
	return nil
}

// rearm returns the write deadline to set before a write at now, and false
// when the one already set is still good enough: one with at least 3/4 of
// the timeout left. Setting a deadline updates a runtime timer under the
// connection's lock, ~4 % of imd's CPU when every message is written to a
// thousand streams (docs/performance.md) if done before every write; this
// way a stream that writes all the time sets it four times per timeout. A
// write that stalls still fails, after 3/4 to all of the timeout.
func (k *sseSink) rearm(now time.Time) (time.Time, bool) {
	if k.deadline.Sub(now) >= k.timeout-k.timeout/4 {
		return time.Time{}, false
	}
	k.deadline = now.Add(k.timeout)
	return k.deadline, true
}

func (k *sseSink) release(b []byte) {
	if cap(b) <= maxPooledFrame {
		*k.frame = b[:0]
		framePool.Put(k.frame)
	}
	k.frame = nil
}

// finish ends a taken-over stream: the zero-length chunk (unless a write
// failed, or nothing was sent), then the close.
func (k *sseSink) finish() {
	if k.conn == nil {
		return
	}
	if k.http11 && !k.failed && k.head == nil {
		_ = k.conn.SetWriteDeadline(time.Now().Add(min(k.timeout, endWriteTimeout)))
		_, _ = k.conn.Write(lastChunk)
	}
	k.unwatch()
	_ = k.conn.Close()
}
