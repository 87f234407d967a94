package main

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"strconv"
	"sync"
	"sync/atomic"
	"time"
)

// engine runs the phases every scenario shares: provisioning users, opening
// streams, sending, draining, and counting. A scenario only decides who is
// in which conversation, who streams and who sends where.
type engine struct {
	cfg  *config
	cl   *client
	errs *statusCounter

	streams []*stream
	convs   []*conv
	// pick chooses the user and conversation of sender k's n-th message.
	pick func(k int, n int64) (*user, *conv)

	attempted atomic.Int64 // tickets taken against the --messages cap
	sent      atomic.Int64 // requests made
	accepted  atomic.Int64 // acknowledged with 2xx
	sendLat   histogram    // send → acknowledgement, merged from the senders
	sendStart time.Time
	sendEnd   time.Time // last acknowledgement
	drops     int64     // deliberate drops that took effect
}

// users provisions n users named <prefix>-u0000… and mints their tokens,
// setup-concurrency at a time.
func (e *engine) users(ctx context.Context, n int) ([]*user, error) {
	us := make([]*user, n)
	err := parallel(ctx, n, e.cfg.setupConc, func(i int) error {
		u := &user{name: fmt.Sprintf("%s-u%04d", e.cfg.prefix, i)}
		if err := e.cl.createUser(ctx, u.name); err != nil {
			return err
		}
		tok, err := e.cl.mintToken(ctx, u.name)
		u.token = tok
		us[i] = u
		return err
	})
	return us, err
}

// parallel runs f(0..n-1) on at most width goroutines and returns the
// first error; the rest are cut short by ctx.
func parallel(ctx context.Context, n, width int, f func(i int) error) error {
	ctx, cancel := context.WithCancelCause(ctx)
	defer cancel(nil)
	next := atomic.Int64{}
	var wg sync.WaitGroup
	for range min(width, n) {
		wg.Go(func() {
			for ctx.Err() == nil {
				i := int(next.Add(1) - 1)
				if i >= n {
					return
				}
				if err := f(i); err != nil {
					cancel(err)
					return
				}
			}
		})
	}
	wg.Wait()
	if err := context.Cause(ctx); err != nil && !errors.Is(err, context.Canceled) {
		return err
	}
	return ctx.Err()
}

// openStreams starts every stream's goroutine and waits until each has
// sent ready, opening setup-concurrency at a time so a burst of ten
// thousand connects does not overflow the server's accept queue. The
// streams run until streamCtx ends.
func (e *engine) openStreams(ctx, streamCtx context.Context) error {
	if len(e.streams) == 0 {
		return nil
	}
	readyCtx, cancel := context.WithTimeout(ctx, e.cfg.readyTimeout)
	defer cancel()
	err := parallel(readyCtx, len(e.streams), e.cfg.setupConc, func(i int) error {
		s := e.streams[i]
		s.started.Store(true)
		go s.run(streamCtx)
		select {
		case <-s.ready:
			return nil
		case <-s.refused:
			return fmt.Errorf("stream of %s: %w", s.user.name, s.firstErr)
		case <-readyCtx.Done():
			return readyCtx.Err()
		}
	})
	if err != nil {
		n := 0
		for _, s := range e.streams {
			select {
			case <-s.ready:
				n++
			default:
			}
		}
		return fmt.Errorf("%d of %d streams ready within %s: %w", n, len(e.streams), e.cfg.readyTimeout, err)
	}
	return nil
}

// tokenBucket paces the senders at a fixed total rate: tokens accrue at
// rate per second up to burst, and a send that finds none waits for its
// turn. A small burst keeps a stall (a slow acknowledgement) from being
// followed by a flood.
type tokenBucket struct {
	mu     sync.Mutex
	rate   float64
	burst  float64
	tokens float64
	last   time.Time
}

func newTokenBucket(rate float64) *tokenBucket {
	burst := max(1, rate/100)
	return &tokenBucket{rate: rate, burst: burst, tokens: 1, last: time.Now()}
}

// reserve takes a token and says how long to wait before using it.
func (b *tokenBucket) reserve() time.Duration {
	b.mu.Lock()
	defer b.mu.Unlock()
	now := time.Now()
	b.tokens = min(b.burst, b.tokens+now.Sub(b.last).Seconds()*b.rate)
	b.last = now
	b.tokens--
	if b.tokens >= 0 {
		return 0
	}
	return time.Duration(-b.tokens / b.rate * float64(time.Second))
}

// waitUntil waits for d unless ctx ends or the wait would pass deadline.
func waitUntil(ctx context.Context, d time.Duration, deadline time.Time) bool {
	if d <= 0 {
		return ctx.Err() == nil
	}
	if time.Now().Add(d).After(deadline) {
		return false
	}
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return false
	case <-t.C:
		return true
	}
}

// send runs the senders until the duration ends, the message cap is
// reached or ctx ends. Requests already started are not cut off at the
// end of the duration: a cut-off send may still have been stored, which
// would show up as an unacknowledged delivery.
func (e *engine) send(ctx context.Context, senders int, during func(ctx context.Context, start, end time.Time)) {
	var bucket *tokenBucket
	if e.cfg.rate > 0 {
		bucket = newTokenBucket(e.cfg.rate)
	}
	e.sendStart = time.Now()
	deadline := e.sendStart.Add(e.cfg.duration)
	hists := make([]histogram, senders)
	lastAck := make([]time.Time, senders)
	var wg sync.WaitGroup
	for k := range senders {
		wg.Go(func() { lastAck[k] = e.sender(ctx, k, bucket, deadline, &hists[k]) })
	}
	if during != nil {
		wctx, cancel := context.WithCancel(ctx)
		done := make(chan struct{})
		go func() { defer close(done); during(wctx, e.sendStart, deadline) }()
		wg.Wait()
		cancel()
		<-done
	} else {
		wg.Wait()
	}
	e.sendEnd = e.sendStart
	for k := range senders {
		e.sendLat.merge(&hists[k])
		if lastAck[k].After(e.sendEnd) {
			e.sendEnd = lastAck[k]
		}
	}
}

// sender is one closed-loop sender: one request at a time. Each message's
// metadata carries its send time, sender and counter, and its
// Idempotency-Key is unique in the run, so a replay could be told apart.
func (e *engine) sender(ctx context.Context, k int, bucket *tokenBucket, deadline time.Time, hist *histogram) time.Time {
	var (
		body    []byte
		m       msgInfo
		lastAck time.Time
	)
	buf := new(bytes.Buffer)
	keyPrefix := e.cfg.prefix + "-" + strconv.Itoa(k) + "-"
	for n := int64(1); ctx.Err() == nil && time.Now().Before(deadline); n++ {
		if e.cfg.messages > 0 && e.attempted.Add(1) > e.cfg.messages {
			break
		}
		if bucket != nil && !waitUntil(ctx, bucket.reserve(), deadline) {
			break
		}
		u, c := e.pick(k, n)
		e.sent.Add(1)
		t := time.Now()
		body = appendSendBody(body[:0], k, n, t.UnixNano())
		status, retry, err := e.cl.send(ctx, u.token, c.path, body, keyPrefix+strconv.FormatInt(n, 10), buf, &m)
		ack := time.Now()
		if err != nil {
			if status == 429 {
				// Honour Retry-After (a server with IMD_SEND_RATE on), but
				// never past the end of the run.
				if !waitUntil(ctx, max(retry, 100*time.Millisecond), deadline) {
					break
				}
			}
			continue
		}
		hist.record(ack.Sub(t).Microseconds())
		lastAck = ack
		if string(m.conv) != c.id {
			continue // not the conversation it was sent to: never counted as expected
		}
		c.accept(m.seq)
		e.accepted.Add(1)
	}
	return lastAck
}

// appendSendBody builds {"text":…,"metadata":{"t":…,"k":…,"n":…}} without
// encoding/json: the senders are on the measured path too.
func appendSendBody(b []byte, k int, n, t int64) []byte {
	b = append(b, `{"text":"imbench `...)
	b = strconv.AppendInt(b, int64(k), 10)
	b = append(b, '-')
	b = strconv.AppendInt(b, n, 10)
	b = append(b, `","metadata":{"t":`...)
	b = strconv.AppendInt(b, t, 10)
	b = append(b, `,"k":`...)
	b = strconv.AppendInt(b, int64(k), 10)
	b = append(b, `,"n":`...)
	b = strconv.AppendInt(b, n, 10)
	return append(b, "}}"...)
}

// drain sets each conversation's final seq and waits, up to the drain
// timeout, until every stream has delivered it. It reports whether all
// did; a stream that never does is one whose last message was lost.
func (e *engine) drain(ctx context.Context) bool {
	for _, c := range e.convs {
		c.final.Store(c.maxAcc.Load())
	}
	t := time.NewTimer(e.cfg.drainTimeout)
	defer t.Stop()
	for _, s := range e.streams {
		for !s.settled() {
			select {
			case <-s.notify:
			case <-s.exited:
				return false
			case <-t.C:
				return false
			case <-ctx.Done():
				return false
			}
		}
	}
	return true
}

// waves drops the streams in waves while messages flow: wave i of w, at
// (i+1)/(w+1) of the send duration, closes every stream whose index is i
// modulo w, so each stream drops once and resumes with Last-Event-ID.
func (e *engine) waves(ctx context.Context, start, end time.Time) {
	w := e.cfg.waves
	for i := range w {
		at := start.Add(end.Sub(start) * time.Duration(i+1) / time.Duration(w+1))
		t := time.NewTimer(time.Until(at))
		select {
		case <-ctx.Done():
			t.Stop()
			return
		case <-t.C:
		}
		for j := i; j < len(e.streams); j += w {
			if e.streams[j].drop() {
				e.drops++
			}
		}
	}
}
