package store

import (
	"context"
	"errors"
	"sync"
	"sync/atomic"
	"time"

	"imd/chat"
)

// Group commit of sends.
//
// One transaction per message costs a commit (a WAL flush, an fsync on
// SQLite) and a conversation row lock held across several round trips, so
// sends into one conversation queue behind each other's commits (DESIGN.md §8:
// ~4,300 msg/s across conversations, ~860 msg/s into one, on this machine's
// PostgreSQL). Instead each Store has committers ("lanes": DefaultSendLanes
// unless Open is given WithSendLanes, each serving a fixed share of the
// conversations): Send queues its message with its conversation's committer
// and waits; the committer takes the queued messages as one batch, stores
// them in one transaction (sendBatch) and answers every sender after the
// commit (G1).
//
// A request whose context ends while it is queued is dropped with its
// context's error and never stored; once its batch has started, it waits for
// the batch's outcome, so that a send that returns an error has stored
// nothing. The batch's transaction runs under a context that ends only when
// every request of the batch has given up (batchContext): one impatient
// caller cannot abort the others, and a batch that nobody waits for any more
// does not hold the database.
const (
	// SendBatchDelay is how long the committer waits, from the arrival of
	// the oldest queued send, for more sends to join its batch: none. A
	// batch is what queued while the previous one committed, so batches grow
	// with the load by themselves (with 64 concurrent senders they settle at
	// half of them: one half commits while the other queues), and a lone
	// send is not held back. Measured on this machine (2 cores, shared;
	// BenchmarkSend and BenchmarkSendManyConversations, medians of 3),
	// waiting 1 ms instead made batches of all 64 but bought nothing: +15%
	// into one PostgreSQL conversation, equal across conversations, −23% on
	// SQLite (the database idles while the whole cohort is answered), and a
	// lone sender's latency went from 1.8 to 2.7 ms (PostgreSQL) and from
	// 0.4 to 1.6 ms (SQLite); 2 ms was worse still, and even 200 µs cost a
	// lone sender a millisecond (timers fire late on this busy machine).
	// Tests set a delay to shape batches (holdBatches).
	SendBatchDelay time.Duration = 0
	// MaxSendBatch caps a batch: it bounds how long a transaction holds its
	// conversation locks and SQLite's statements' parameters (8 per message:
	// 2,048, far below its 32,766; PostgreSQL's take arrays). At ~30
	// messages a batch the fixed cost of a transaction (round trips, the
	// commit) is already spread thin (PostgreSQL: ~6 ms a batch of 32 under
	// load here), so a larger cap would buy little throughput for longer
	// lock holds; it only matters with hundreds of sends in flight.
	MaxSendBatch = 256
)

// Send lanes: how many committers a PostgreSQL store runs (WithSendLanes;
// SQLite always runs one, its single writer runs one transaction at a time
// anyway). A conversation always takes the same lane (laneOf), which commits
// its batches one after another; the lanes' transactions run at once, so one's
// round trips and commit flush overlap another's. But lanes split the queue,
// and smaller batches cost the database more per message.
const (
	// DefaultSendLanes is one lane. Measured on this machine (2 cores, shared;
	// 64 senders over 1000 conversations, BenchmarkSendManyConversations,
	// interleaved runs, medians of 3): 1 lane ~33 messages a batch, 5,611
	// msg/s at 60 µs of PostgreSQL CPU a message; 2 lanes ~17 a batch, 5,878
	// msg/s (+5%) at 90 µs (+50%); with earlier statements (five a batch,
	// VALUES lists) 4 lanes (~9 a batch) and 8 (~4) cost 2–4× the CPU a
	// message and were slower. With the database's CPU the limit, one lane;
	// more pay off only when the database has cores to spare (the benchmarks
	// take IMD_BENCH_LANES).
	DefaultSendLanes = 1
	// MaxSendLanes bounds WithSendLanes: a lane holds a pool connection while
	// its batch commits, and more lanes than half of DefaultMaxOpenConns
	// would leave reads and the other writes waiting for connections.
	MaxSendLanes = DefaultMaxOpenConns / 2
)

// laneOf maps a conversation to one of n lanes (FNV-1a of its id), so that
// its sends are always committed by the same lane, one batch after another:
// their order, and the row lock each batch takes, stay as with one committer.
func laneOf(cid string, n int) int {
	h := uint32(2166136261)
	for i := 0; i < len(cid); i++ {
		h ^= uint32(cid[i])
		h *= 16777619
	}
	return int(h % uint32(n))
}

// errClosed answers sends queued when the store closes and sends after it.
var errClosed = chat.Unavailable("database", errors.New("store: closed"))

// Request states: queued until the committer takes it into a batch, or the
// sender abandons it (its context ended first). Exactly one side wins.
const (
	reqQueued int32 = iota
	reqTaken
	reqAbandoned
)

type sendRequest struct {
	ctx    context.Context
	m      chat.NewMessage
	queued time.Time
	state  atomic.Int32
	done   chan sendResult // buffered: the committer never blocks on a sender
}

type sendResult struct {
	msg     chat.Message
	created bool
	events  []chat.OutboxEvent
	err     error
}

// committer gathers sends into batches and commits them, one batch at a time
// (the committers of several nodes run at once; the conversation locks order
// their batches, see sendBatch).
type committer struct {
	s *Store

	mu     sync.Mutex
	queue  []*sendRequest
	closed bool
	delay  time.Duration // SendBatchDelay; tests change it under mu
	max    int           // MaxSendBatch; likewise

	wake    chan struct{} // the queue may be non-empty
	full    chan struct{} // the queue reached max
	quit    chan struct{} // closed by close
	exited  chan struct{} // closed when run returns
	batches atomic.Int64  // transactions run, for tests
}

func newCommitter(s *Store) *committer {
	c := &committer{
		s:      s,
		delay:  SendBatchDelay,
		max:    MaxSendBatch,
		wake:   make(chan struct{}, 1),
		full:   make(chan struct{}, 1),
		quit:   make(chan struct{}),
		exited: make(chan struct{}),
	}
	go c.run()
	return c
}

func signal(ch chan struct{}) {
	select {
	case ch <- struct{}{}:
	default:
	}
}

// send queues m and waits for its outcome.
func (c *committer) send(ctx context.Context, m chat.NewMessage) sendResult {
	if err := ctx.Err(); err != nil {
		return sendResult{err: dbErr(err)}
	}
	r := &sendRequest{ctx: ctx, m: m, queued: time.Now(), done: make(chan sendResult, 1)}
	c.mu.Lock()
	if c.closed {
		c.mu.Unlock()
		return sendResult{err: errClosed}
	}
	c.queue = append(c.queue, r)
	if len(c.queue) == c.max {
		signal(c.full)
	}
	c.mu.Unlock()
	signal(c.wake)
	select {
	case res := <-r.done:
		return res
	case <-ctx.Done():
		if r.state.CompareAndSwap(reqQueued, reqAbandoned) {
			return sendResult{err: dbErr(ctx.Err())}
		}
		// In a batch already: its outcome is the answer, whatever it is.
		return <-r.done
	}
}

func (c *committer) run() {
	defer close(c.exited)
	timer := time.NewTimer(time.Hour)
	timer.Stop()
	for {
		batch, ok := c.next(timer)
		if !ok {
			return
		}
		c.commit(batch)
	}
}

// next waits for a batch: the queued requests, up to max of them, once the
// oldest has waited delay or max are queued. Requests whose context ended
// are answered and left out. ok is false when the committer must stop.
func (c *committer) next(timer *time.Timer) (batch []*sendRequest, ok bool) {
	for {
		select {
		case <-c.quit:
			return nil, false
		default:
		}
		select {
		case <-c.wake:
		case <-c.quit:
			return nil, false
		}
		if !c.gather(timer) {
			return nil, false
		}
		c.mu.Lock()
		take := min(len(c.queue), c.max)
		taken := c.queue[:take:take]
		c.queue = append([]*sendRequest(nil), c.queue[take:]...)
		if len(c.queue) > 0 {
			signal(c.wake)
		}
		c.mu.Unlock()
		batch = batch[:0]
		for _, r := range taken {
			if err := r.ctx.Err(); err != nil {
				if r.state.CompareAndSwap(reqQueued, reqAbandoned) {
					r.done <- sendResult{err: dbErr(err)}
				}
				continue
			}
			if r.state.CompareAndSwap(reqQueued, reqTaken) {
				batch = append(batch, r)
			}
		}
		if len(batch) > 0 {
			return batch, true
		}
	}
}

// gather waits until the oldest queued request has waited delay, or max are
// queued; false if the committer must stop. A "full" signal only makes it
// look again, so a stale one (or one from a change of settings) is harmless.
func (c *committer) gather(timer *time.Timer) bool {
	for {
		c.mu.Lock()
		n, delay, limit := len(c.queue), c.delay, c.max
		var oldest time.Time
		if n > 0 {
			oldest = c.queue[0].queued
		}
		c.mu.Unlock()
		wait := time.Until(oldest.Add(delay))
		if n == 0 || n >= limit || wait <= 0 {
			return true
		}
		timer.Reset(wait)
		select {
		case <-timer.C:
		case <-c.full:
		case <-c.quit:
			timer.Stop()
			return false
		}
		timer.Stop()
	}
}

// commit stores a batch and answers its requests. A failure that is not the
// database's unavailability (a request the database rejects, say metadata
// PostgreSQL's jsonb refuses) retries the requests one by one, so that only
// the bad one fails; an unavailable database fails them all at once.
func (c *committer) commit(batch []*sendRequest) {
	res, err := c.try(batch)
	if err != nil && len(batch) > 1 && chat.ErrorCode(err) != chat.CodeUnavailable {
		for _, r := range batch {
			one, err := c.try([]*sendRequest{r})
			if err != nil {
				one = []sendResult{{err: err}}
			}
			c.s.notifyCommitted(one)
			r.done <- one[0]
		}
		return
	}
	if err == nil {
		c.s.notifyCommitted(res)
	}
	for i, r := range batch {
		if err != nil {
			r.done <- sendResult{err: err}
		} else {
			r.done <- res[i]
		}
	}
}

// try runs one transaction for batch: each request's outcome, or the error
// of the transaction as a whole. When it failed because every request's
// context had ended (nobody waits for it any more), each request gets its
// own context's error, mapped as if it had ended before the batch.
func (c *committer) try(batch []*sendRequest) ([]sendResult, error) {
	c.batches.Add(1)
	ctx, stop := batchContext(batch)
	defer stop()
	ms := make([]chat.NewMessage, len(batch))
	for i, r := range batch {
		ms[i] = r.m
	}
	res, err := c.s.sendBatch(ctx, ms)
	if err != nil && ctx.Err() != nil {
		res = make([]sendResult, len(batch))
		for i, r := range batch {
			res[i].err = dbErr(r.ctx.Err())
		}
		return res, nil
	}
	return res, err
}

// batchContext is a context for a batch's transaction that ends when every
// request's context has ended, or when stop is called.
func batchContext(batch []*sendRequest) (context.Context, func()) {
	ctx, cancel := context.WithCancel(context.Background())
	var left atomic.Int64
	left.Store(int64(len(batch)))
	stops := make([]func() bool, len(batch))
	for i, r := range batch {
		stops[i] = context.AfterFunc(r.ctx, func() {
			if left.Add(-1) == 0 {
				cancel()
			}
		})
	}
	return ctx, func() {
		for _, stop := range stops {
			stop()
		}
		cancel()
	}
}

// close stops the committer: a batch in flight finishes, queued requests
// fail with errClosed, and later sends too.
func (c *committer) close() {
	c.mu.Lock()
	if c.closed {
		c.mu.Unlock()
		<-c.exited
		return
	}
	c.closed = true
	c.mu.Unlock()
	close(c.quit)
	<-c.exited
	c.mu.Lock()
	pending := c.queue
	c.queue = nil
	c.mu.Unlock()
	for _, r := range pending {
		if r.state.CompareAndSwap(reqQueued, reqTaken) {
			r.done <- sendResult{err: errClosed}
		}
	}
}
