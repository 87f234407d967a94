package handlers

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"imd/chat"
)

// sseTestServer serves one stream per request the way Server.stream does:
// the sink's first frame takes the connection over and the handler returns;
// a goroutine writes a ping, then waits for the stream's context (the
// client's end, through watchPeer) and finishes the stream. ended receives
// each stream's context error once it has finished.
func sseTestServer(t *testing.T, timeout time.Duration) (addr string, ended <-chan error) {
	t.Helper()
	out := make(chan error, 4)
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Access-Control-Allow-Origin", "https://app.example") // as middleware would
		ctx, cancel := context.WithCancel(context.Background())
		sink := newSSESink(w, r, timeout, cancel)
		sink.retry = 2000 // wantFrames'
		ev := chat.StreamEvent{ID: "5-0", Type: "message.created", Data: json.RawMessage(`{"seq":5}`)}
		if err := sink.Send([]chat.StreamEvent{ev}); err != nil {
			t.Errorf("first send: %v", err)
		}
		select {
		case <-sink.detached:
		default:
			t.Error("the sink did not take the connection over")
			return
		}
		go func() {
			_ = sink.Ping() // may race with a client's reset; the frames are checked by the client
			<-ctx.Done()
			sink.finish()
			out <- ctx.Err()
		}()
	}))
	t.Cleanup(srv.Close)
	return srv.Listener.Addr().String(), out
}

func rawGet(t *testing.T, addr, proto string) (*net.TCPConn, *bufio.Reader) {
	t.Helper()
	c, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	if _, err := io.WriteString(c, "GET /v1/events "+proto+"\r\nHost: imd\r\nAccept: text/event-stream\r\n\r\n"); err != nil {
		t.Fatal(err)
	}
	return c.(*net.TCPConn), bufio.NewReader(c)
}

func waitEnded(t *testing.T, ended <-chan error, what string) {
	t.Helper()
	select {
	case err := <-ended:
		if !errors.Is(err, context.Canceled) {
			t.Fatalf("%s: stream context ended with %v", what, err)
		}
	case <-time.After(5 * time.Second):
		t.Fatalf("%s: the stream did not end within 5s", what)
	}
}

const wantFrames = "retry: 2000\n\nid: 5-0\nevent: message.created\ndata: {\"seq\":5}\n\n: ping\n\n"

// The taken-over stream is a well-formed chunked HTTP/1.1 response with the
// headers set before it (CORS), and when the client half-closes, the
// stream ends and the body ends cleanly with the last chunk.
func TestSSESinkHijackedHTTP11(t *testing.T) {
	addr, ended := sseTestServer(t, 5*time.Second)
	c, rd := rawGet(t, addr, "HTTP/1.1")
	res, err := http.ReadResponse(rd, nil)
	if err != nil {
		t.Fatal(err)
	}
	for k, want := range map[string]string{
		"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Accel-Buffering": "no",
		"Access-Control-Allow-Origin": "https://app.example",
	} {
		if got := res.Header.Get(k); got != want {
			t.Errorf("%s: %q, want %q", k, got, want)
		}
	}
	if len(res.TransferEncoding) != 1 || res.TransferEncoding[0] != "chunked" || !res.Close || res.Header.Get("Date") == "" {
		t.Errorf("transfer encoding %v, Connection: close %v, date %q", res.TransferEncoding, res.Close, res.Header.Get("Date"))
	}
	got := make([]byte, len(wantFrames))
	if _, err := io.ReadFull(res.Body, got); err != nil || string(got) != wantFrames {
		t.Fatalf("frames %q (%v), want %q", got, err, wantFrames)
	}
	if err := c.CloseWrite(); err != nil {
		t.Fatal(err)
	}
	waitEnded(t, ended, "half-close")
	if rest, err := io.ReadAll(res.Body); err != nil || len(rest) != 0 {
		t.Fatalf("after the frames: %q, %v (want a clean end of the chunked body)", rest, err)
	}
}

// An HTTP/1.0 client gets the body unchunked, ended by the close.
func TestSSESinkHijackedHTTP10(t *testing.T) {
	addr, ended := sseTestServer(t, 5*time.Second)
	c, rd := rawGet(t, addr, "HTTP/1.0")
	res, err := http.ReadResponse(rd, nil)
	if err != nil {
		t.Fatal(err)
	}
	if res.ProtoMinor != 0 || len(res.TransferEncoding) != 0 || res.ContentLength != -1 {
		t.Fatalf("HTTP/1.%d, transfer encoding %v, length %d", res.ProtoMinor, res.TransferEncoding, res.ContentLength)
	}
	got := make([]byte, len(wantFrames))
	if _, err := io.ReadFull(res.Body, got); err != nil || string(got) != wantFrames {
		t.Fatalf("frames %q (%v), want %q", got, err, wantFrames)
	}
	c.Close()
	waitEnded(t, ended, "close")
}

// A reset (not a FIN) ends the stream too.
func TestSSESinkClientReset(t *testing.T) {
	addr, ended := sseTestServer(t, 5*time.Second)
	c, rd := rawGet(t, addr, "HTTP/1.1")
	if _, err := http.ReadResponse(rd, nil); err != nil {
		t.Fatal(err)
	}
	if err := c.SetLinger(0); err != nil {
		t.Fatal(err)
	}
	c.Close()
	waitEnded(t, ended, "reset")
}

// A client that stops reading is cut off by the write deadline on the
// taken-over connection, not buffered for.
func TestSSESinkWriteTimeout(t *testing.T) {
	errc := make(chan error, 1)
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		_, cancel := context.WithCancel(context.Background())
		sink := newSSESink(w, r, 200*time.Millisecond, cancel)
		go func() {
			defer sink.finish()
			big := chat.StreamEvent{Type: "message.created", Data: json.RawMessage(`"` + strings.Repeat("x", 60000) + `"`)}
			for {
				if err := sink.Send([]chat.StreamEvent{big}); err != nil {
					errc <- err
					return
				}
			}
		}()
		<-sink.detached
	}))
	defer srv.Close()
	c, _ := rawGet(t, srv.Listener.Addr().String(), "HTTP/1.1")
	if err := c.SetReadBuffer(4096); err != nil {
		t.Fatal(err)
	}
	select {
	case err := <-errc:
		var ne net.Error
		if !errors.As(err, &ne) || !ne.Timeout() {
			t.Fatalf("write error %v, want a timeout", err)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("a write to a client that does not read did not time out")
	}
}

// TestReconnectDelaySpread: streams tell their clients different reconnect
// delays, spread evenly within ±50 % of retryMillis, so that the clients of
// a node that stops do not all come back in the same instant.
func TestReconnectDelaySpread(t *testing.T) {
	var quarters [4]int
	for range 2000 {
		d := newSSESink(httptest.NewRecorder(), httptest.NewRequest(http.MethodGet, "/v1/events", nil), time.Second, func() {}).retry
		if d < retryMillis/2 || d > retryMillis*3/2 {
			t.Fatalf("retry %d ms, want %d to %d", d, retryMillis/2, retryMillis*3/2)
		}
		quarters[min((d-retryMillis/2)*4/retryMillis, 3)]++
	}
	for q, n := range quarters {
		if n < 300 { // ~500 each; under 300 has a chance below 1e-40
			t.Errorf("%d of 2000 delays in quarter %d of the range", n, q)
		}
	}
}

// TestSSESinkRearm: the write deadline is moved only once less than 3/4 of
// the timeout is left, so every write starts with at least that much time
// and a stream that writes all the time sets it a few times per timeout,
// not per write.
func TestSSESinkRearm(t *testing.T) {
	const timeout = 8 * time.Second
	k := &sseSink{timeout: timeout}
	t0 := time.Unix(1_000_000, 0)
	sets := 0
	for now := t0; now.Before(t0.Add(10 * timeout)); now = now.Add(10 * time.Millisecond) {
		if d, ok := k.rearm(now); ok {
			sets++
			if !d.Equal(now.Add(timeout)) {
				t.Fatalf("deadline %v at %v, want now + timeout", d, now)
			}
		}
		if left := k.deadline.Sub(now); left < timeout*3/4 || left > timeout {
			t.Fatalf("a write at %v has %v before its deadline", now.Sub(t0), left)
		}
	}
	// Every 2 s (a quarter of the timeout) over 80 s, plus the first.
	if sets < 40 || sets > 41 {
		t.Fatalf("deadline set %d times in 8000 writes over 80 s, want 40 or 41", sets)
	}
	// An idle gap longer than the timeout: the next write gets a new one.
	if d, ok := k.rearm(k.deadline.Add(time.Hour)); !ok || d.Before(k.deadline) {
		t.Fatal("a write after a long pause kept an expired deadline")
	}
}

// Where the connection cannot be taken over (here a recorder; in
// production HTTP/2), the stream is written through the ResponseWriter as
// before, and the handler keeps it.
func TestSSESinkWithoutHijack(t *testing.T) {
	w := httptest.NewRecorder()
	r := httptest.NewRequest(http.MethodGet, "/v1/events", nil)
	sink := newSSESink(w, r, time.Second, func() {})
	sink.retry = 2000 // wantFrames'
	ev := chat.StreamEvent{ID: "5-0", Type: "message.created", Data: json.RawMessage(`{"seq":5}`)}
	if err := sink.Send([]chat.StreamEvent{ev}); err != nil {
		t.Fatal(err)
	}
	if err := sink.Ping(); err != nil {
		t.Fatal(err)
	}
	sink.finish()
	select {
	case <-sink.detached:
		t.Fatal("detached without a hijack")
	default:
	}
	if w.Code != 200 || w.Header().Get("Content-Type") != "text/event-stream" || w.Body.String() != wantFrames || !w.Flushed {
		t.Fatalf("%d %v %q flushed=%v", w.Code, w.Header(), w.Body.String(), w.Flushed)
	}
}

// watchPeer's goroutine fallback (other platforms, connections that are not
// plain sockets) notices the close as well.
func TestReadPeer(t *testing.T) {
	a, b := net.Pipe()
	ctx, cancel := context.WithCancel(context.Background())
	go readPeer(a, cancel)
	if _, err := b.Write([]byte("ignored")); err != nil { // read and dropped
		t.Fatal(err)
	}
	b.Close()
	select {
	case <-ctx.Done():
	case <-time.After(5 * time.Second):
		t.Fatal("readPeer did not notice the close")
	}
	a.Close()
}

// After stop, a connection's end cancels nothing: its registration (and id)
// is gone, so a later connection on the same descriptor number is not
// confused with it.
func TestWatchPeerStop(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	accepted := make(chan net.Conn, 2)
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			accepted <- c
		}
	}()
	dial := func() (client net.Conn, server net.Conn) {
		c, err := net.Dial("tcp", ln.Addr().String())
		if err != nil {
			t.Fatal(err)
		}
		return c, <-accepted
	}
	// The first is watched and stopped before its end; the second, watched
	// after, ends: only its cancel runs.
	c1, s1 := dial()
	first, cancel1 := context.WithCancel(context.Background())
	stop1 := watchPeer(s1, cancel1)
	stop1()
	s1.Close()
	c2, s2 := dial()
	second, cancel2 := context.WithCancel(context.Background())
	stop2 := watchPeer(s2, cancel2)
	c1.Close()
	c2.Close()
	select {
	case <-second.Done():
	case <-time.After(5 * time.Second):
		t.Fatal("the watched connection's end went unnoticed")
	}
	stop2()
	s2.Close()
	if first.Err() != nil {
		t.Fatal("a stopped watch canceled its stream")
	}
}
