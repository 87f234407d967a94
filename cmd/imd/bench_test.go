package main

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"maps"
	"net/http"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// BenchmarkGroupFanout200 measures group fan-out on one node: 200 members,
// each with one open SSE stream; 10 of them send b.N messages concurrently,
// and the clock stops when every stream has received every message. Each
// message carries its send time in metadata ({"t": unix nanos}, taken just
// before the POST), so every delivery yields a send→receive latency.
//
// Reported: msgs/s (sends acknowledged per second, over the time until the
// last acknowledgement), deliveries/s (members × b.N over the time until the
// last stream has everything), p50_ms / p99_ms / max_ms over all deliveries.
// It fails if a stream misses, duplicates or resyncs. Setup (users, group,
// streams) is outside the timer. Run with a fixed count, e.g.
//
//	go test -run XXX -bench GroupFanout200 -benchtime 2000x ./cmd/imd/
//
// (the default -benchtime would rerun the whole setup for every probe of b.N).
func BenchmarkGroupFanout200(b *testing.B) {
	const (
		members = 200
		senders = 10
		// deliverWait bounds the timed part, so a lost message fails
		// the benchmark instead of hanging it.
		deliverWait = 60 * time.Second
	)
	n := b.N
	base := benchStartNode(b)
	hc := &http.Client{Timeout: 30 * time.Second, Transport: &http.Transport{MaxIdleConnsPerHost: 64}}

	// Users and tokens through the admin API, 20 at a time.
	names := make([]string, members)
	tokens := make([]string, members)
	benchParallel(b, members, 20, func(i int) error {
		names[i] = fmt.Sprintf("bench-u%03d", i)
		if _, err := benchPost(hc, base, testAdminToken, "/v1/admin/users", map[string]any{"username": names[i]}, 201, nil); err != nil {
			return err
		}
		var tok struct {
			AccessToken string `json:"access_token"`
		}
		if _, err := benchPost(hc, base, testAdminToken, "/v1/admin/users/"+names[i]+"/tokens", map[string]any{"name": "bench"}, 201, &tok); err != nil {
			return err
		}
		tokens[i] = tok.AccessToken
		return nil
	})
	var conv struct {
		ID string `json:"id"`
	}
	if _, err := benchPost(hc, base, tokens[0], "/v1/conversations",
		map[string]any{"type": "group", "title": "fan-out", "member_ids": names[1:]}, 201, &conv); err != nil {
		b.Fatal(err)
	}

	// One stream per member; all must be live (ready) before the clock starts.
	streams := make([]*benchStream, members)
	streamTransport := &http.Transport{MaxIdleConnsPerHost: members}
	b.Cleanup(streamTransport.CloseIdleConnections)
	benchParallel(b, members, 50, func(i int) error {
		s, err := benchOpenStream(streamTransport, base, tokens[i], n+1) // +1: the closing sentinel
		if err != nil {
			return fmt.Errorf("stream of %s: %w", names[i], err)
		}
		streams[i] = s
		b.Cleanup(s.close)
		select {
		case <-s.ready:
			return nil
		case <-s.exited:
			return fmt.Errorf("stream of %s ended before ready: %v", names[i], s.err)
		case <-time.After(30 * time.Second):
			return fmt.Errorf("stream of %s: no ready within 30s", names[i])
		}
	})

	// The timed part: b.N sends from 10 members, until every stream has them all.
	msgPath := "/v1/conversations/" + conv.ID + "/messages"
	acked := make([]atomic.Bool, n+2) // by seq
	var next atomic.Int64
	var sendErr error
	var sendErrOnce sync.Once
	var wg sync.WaitGroup
	b.ResetTimer()
	start := time.Now()
	for s := range senders {
		wg.Go(func() {
			for {
				i := next.Add(1)
				if i > int64(n) {
					return
				}
				body := fmt.Sprintf(`{"text":"m %d","metadata":{"t":%d}}`, i, time.Now().UnixNano())
				var m struct {
					Seq int64 `json:"seq"`
				}
				if _, err := benchPost(hc, base, tokens[s], msgPath, json.RawMessage(body), 201, &m); err != nil {
					sendErrOnce.Do(func() { sendErr = err })
					next.Store(int64(n)) // stop the other senders
					return
				}
				if m.Seq < 1 || m.Seq > int64(n) || acked[m.Seq].Swap(true) {
					sendErrOnce.Do(func() { sendErr = fmt.Errorf("send acknowledged with unexpected or repeated seq %d", m.Seq) })
				}
			}
		})
	}
	wg.Wait()
	sendDur := time.Since(start)
	if sendErr != nil {
		b.Fatalf("send: %v", sendErr)
	}
	benchAwait(b, streams, deliverWait, func(s *benchStream) <-chan struct{} { return s.done }, n)
	deliverDur := time.Since(start)
	b.StopTimer()

	// A sentinel after everything: streams deliver in log order, so a stream
	// that has it has also shown any duplicate or stray event queued before it.
	if _, err := benchPost(hc, base, tokens[0], msgPath, map[string]any{"text": "sentinel"}, 201, nil); err != nil {
		b.Fatal(err)
	}
	benchAwait(b, streams, 30*time.Second, func(s *benchStream) <-chan struct{} { return s.doneAll }, n+1)
	var lat []int64
	for i, s := range streams {
		s.close() // the reader has exited: its fields are ours now
		if s.dups > 0 || s.unexpected > 0 || s.resyncs > 0 || s.distinct != n+1 {
			b.Errorf("stream of %s: %d of %d messages, %d duplicates, %d unexpected seqs, %d resyncs",
				names[i], s.distinct, n+1, s.dups, s.unexpected, s.resyncs)
		}
		lat = append(lat, s.lat...)
	}
	if len(lat) != members*n {
		b.Fatalf("%d latencies, want %d", len(lat), members*n)
	}
	slices.Sort(lat)
	pct := func(p float64) float64 { return float64(lat[min(len(lat)-1, int(p*float64(len(lat))))]) / 1e6 }
	b.ReportMetric(float64(n)/sendDur.Seconds(), "msgs/s")
	b.ReportMetric(float64(members*n)/deliverDur.Seconds(), "deliveries/s")
	b.ReportMetric(pct(0.50), "p50_ms")
	b.ReportMetric(pct(0.99), "p99_ms")
	b.ReportMetric(float64(lat[len(lat)-1])/1e6, "max_ms")
}

// benchStartNode runs one node on a fresh schema and key prefix (or, in the
// embedded test mode, a fresh data directory) like the harness's
// startServer, for a testing.TB, and stops it at cleanup.
func benchStartNode(tb testing.TB) string {
	tb.Helper()
	env := map[string]string{
		"IMD_ADDR":          "127.0.0.1:0",
		"IMD_ADMIN_TOKEN":   testAdminToken,
		"IMD_COOKIE_SECURE": "false",
		"IMD_SEND_RATE":     "0",
		"IMD_LOG_LEVEL":     "error",
	}
	// PostgreSQL + Redis, or embedded with IMD_TEST_MODE=embedded (harness_test.go).
	maps.Copy(env, testModeEnv(tb))
	ctx, cancel := context.WithCancel(context.Background())
	urlc := make(chan string, 1)
	done := make(chan error, 1)
	var stderr bytes.Buffer
	var mu sync.Mutex
	go func() {
		done <- runWith(ctx, nil, func(k string) string { return env[k] }, io.Discard, &lockedWriter{w: &stderr, mu: &mu},
			options{ready: func(u string) { urlc <- u }})
	}()
	logs := func() string { mu.Lock(); defer mu.Unlock(); return stderr.String() }
	var url string
	select {
	case url = <-urlc:
	case err := <-done:
		tb.Fatalf("server did not start: %v\n%s", err, logs())
	case <-time.After(30 * time.Second):
		tb.Fatal("server did not start within 30s")
	}
	tb.Cleanup(func() {
		cancel()
		select {
		case err := <-done:
			if err != nil {
				tb.Errorf("server shutdown: %v\n%s", err, logs())
			}
		case <-time.After(20 * time.Second):
			tb.Error("server did not shut down within 20s")
		}
	})
	return url
}

// benchParallel runs f(0..n-1) on at most width goroutines and fails tb with
// the first error.
func benchParallel(tb testing.TB, n, width int, f func(i int) error) {
	tb.Helper()
	sem := make(chan struct{}, width)
	errs := make([]error, n)
	var wg sync.WaitGroup
	for i := range n {
		sem <- struct{}{}
		wg.Go(func() {
			defer func() { <-sem }()
			errs[i] = f(i)
		})
	}
	wg.Wait()
	if err := errors.Join(errs...); err != nil {
		tb.Fatal(err)
	}
}

// benchPost POSTs body as JSON and decodes the response into out (if not nil)
// when the status is want.
func benchPost(hc *http.Client, base, token, path string, body any, want int, out any) (int, error) {
	raw, err := json.Marshal(body)
	if err != nil {
		return 0, err
	}
	req, err := http.NewRequest("POST", base+path, bytes.NewReader(raw))
	if err != nil {
		return 0, err
	}
	req.Header.Set("Content-Type", "application/json")
	req.Header.Set("Authorization", "Bearer "+token)
	res, err := hc.Do(req)
	if err != nil {
		return 0, err
	}
	defer res.Body.Close()
	rb, err := io.ReadAll(res.Body)
	if err != nil {
		return res.StatusCode, err
	}
	if res.StatusCode != want {
		return res.StatusCode, fmt.Errorf("POST %s: %d, want %d: %s", path, res.StatusCode, want, rb)
	}
	if out != nil {
		if err := json.Unmarshal(rb, out); err != nil {
			return res.StatusCode, fmt.Errorf("POST %s: %w: %s", path, err, rb)
		}
	}
	return res.StatusCode, nil
}

// benchAwait waits until ch(s) is closed for every stream, failing tb after
// timeout with how far the streams got.
func benchAwait(tb testing.TB, streams []*benchStream, timeout time.Duration, ch func(*benchStream) <-chan struct{}, want int) {
	tb.Helper()
	deadline := time.After(timeout)
	for i, s := range streams {
		select {
		case <-ch(s):
		case <-s.exited:
			tb.Fatalf("stream %d ended: %v", i, s.err)
		case <-deadline:
			complete, least, total := 0, want, 0
			for _, s := range streams {
				got := int(s.progress.Load())
				if got >= want {
					complete++
				}
				least = min(least, got)
				total += got
			}
			tb.Fatalf("after %s: %d of %d streams have all %d messages; the furthest behind has %d; %d deliveries in all (%.0f/s)",
				timeout, complete, len(streams), want, least, total, float64(total)/timeout.Seconds())
		}
	}
}

// benchStream is one SSE stream read by a lean parser: no per-event
// allocation beyond decoding the two fields it needs, counts by seq.
type benchStream struct {
	res     *http.Response
	cancel  context.CancelFunc
	ready   chan struct{} // closed at the first ready
	done    chan struct{} // closed when seqs 1..want-1 (the timed messages) have arrived
	doneAll chan struct{} // closed when seqs 1..want have arrived
	exited  chan struct{} // closed when the reader returns
	once    sync.Once

	progress atomic.Int64 // distinct, readable while the reader runs

	// Owned by the reader until exited is closed.
	want                                 int
	seen                                 []bool // by seq
	lat                                  []int64
	distinct, dups, unexpected, resyncs  int
	err                                  error
	readyClosed, doneClosed, allReceived bool
}

func benchOpenStream(tr http.RoundTripper, base, token string, want int) (*benchStream, error) {
	ctx, cancel := context.WithCancel(context.Background())
	req, err := http.NewRequestWithContext(ctx, "GET", base+"/v1/events", nil)
	if err != nil {
		cancel()
		return nil, err
	}
	req.Header.Set("Accept", "text/event-stream")
	req.Header.Set("Authorization", "Bearer "+token)
	res, err := tr.RoundTrip(req)
	if err != nil {
		cancel()
		return nil, err
	}
	if res.StatusCode != 200 || res.Header.Get("Content-Type") != "text/event-stream" {
		b, _ := io.ReadAll(res.Body)
		res.Body.Close()
		cancel()
		return nil, fmt.Errorf("%d %s: %s", res.StatusCode, res.Header.Get("Content-Type"), b)
	}
	s := &benchStream{res: res, cancel: cancel, want: want, seen: make([]bool, want+1), lat: make([]int64, 0, want-1),
		ready: make(chan struct{}), done: make(chan struct{}), doneAll: make(chan struct{}), exited: make(chan struct{})}
	go s.read()
	return s, nil
}

func (s *benchStream) read() {
	defer close(s.exited)
	r := bufio.NewReaderSize(s.res.Body, 64<<10)
	var typ string
	for {
		line, err := r.ReadSlice('\n')
		if err != nil {
			s.err = err
			return
		}
		line = bytes.TrimSuffix(line, []byte("\n"))
		switch {
		case len(line) == 0:
			typ = ""
		case bytes.HasPrefix(line, []byte("event: ")):
			typ = string(line[len("event: "):])
		case bytes.HasPrefix(line, []byte("data: ")):
			s.event(typ, line[len("data: "):], time.Now().UnixNano())
		}
	}
}

func (s *benchStream) event(typ string, data []byte, now int64) {
	switch typ {
	case "ready":
		if !s.readyClosed {
			s.readyClosed = true
			close(s.ready)
		}
	case "resync":
		s.resyncs++
	case "message.created":
		var m struct {
			Seq      int64 `json:"seq"`
			Metadata struct {
				T int64 `json:"t"`
			} `json:"metadata"`
		}
		if err := json.Unmarshal(data, &m); err != nil || m.Seq < 1 || m.Seq > int64(s.want) {
			s.unexpected++
			return
		}
		if s.seen[m.Seq] {
			s.dups++
			return
		}
		s.seen[m.Seq] = true
		s.distinct++
		s.progress.Store(int64(s.distinct))
		if m.Metadata.T != 0 {
			s.lat = append(s.lat, now-m.Metadata.T)
		}
		if !s.doneClosed && s.distinct == s.want-1 && !s.seen[s.want] {
			s.doneClosed = true
			close(s.done)
		}
		if s.distinct == s.want && !s.allReceived {
			s.allReceived = true
			if !s.doneClosed {
				s.doneClosed = true
				close(s.done)
			}
			close(s.doneAll)
		}
	}
}

// close ends the stream and waits for its reader (idempotent).
func (s *benchStream) close() {
	s.once.Do(func() {
		s.cancel()
		<-s.exited
		s.res.Body.Close()
	})
}
