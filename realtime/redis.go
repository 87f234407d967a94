// Package realtime implements chat.Realtime, the ports for everything that
// has to be fast and shared between nodes but is not the source of truth:
// Redis for deployments of one or more nodes, and Memory (memory*.go) with the
// same semantics, pinned by one conformance suite (realtimetest), for the
// embedded single-node mode that needs no Redis.
//
// It owns, in one Redis (keys hash-tagged per user or conversation, so that
// the same layout works on Redis Cluster):
//
//   - the per-user event logs (offline:{uid} and their companions), capped and
//     expiring, that streams replay and resume from. Appending is one Lua script
//     per user: it dedupes re-dispatches, keeps each conversation's messages in
//     seq order, numbers entries with an offset inside an epoch, trims, and
//     publishes a wake-up;
//   - the Pub/Sub routing (channel user:{uid}) that wakes whichever nodes hold a
//     user's streams and carries ephemeral events (typing, presence), and the
//     channels node:<topic>, one per chat.Topic, that carry node-level events
//     to every node (Broadcast, Listen: token revocations, the fan-out fast
//     path), apart so that a busy topic cannot crowd out a rare one;
//   - presence, the member-set cache, the conversation-list cache and the
//     shared rate limits.
//
// Why logs carry the data and Pub/Sub only wakes: Redis Pub/Sub is
// at-most-once. A message published while a node's subscriber connection is
// down, or while it is re-subscribing, is gone. So a durable event is written
// to the recipient's log first and the publish is only a hint to read it; a
// node that lost its Pub/Sub connection wakes every local stream after
// reconnecting, and each stream re-reads its log from its own cursor. Nothing
// durable is lost with a missed publish, only delayed. Ephemeral events are
// the exception: they travel in the publish itself and may be lost, which is
// what "ephemeral" means (API.md).
//
// If the log itself is lost (Redis restarted without persistence, keys
// evicted), the next append or Head starts a new epoch, and a stream resuming
// from the old epoch gets a resync instead of a silent gap (G5); PostgreSQL
// still has everything.
package realtime

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"sync"
	"time"

	"github.com/redis/go-redis/v9"

	"imd/chat"
)

// Defaults for Config. Each is a trade-off, so each says why.
const (
	// DefaultLogCap bounds a user's log: it is how far back a device can
	// resume without a resync. 2000 entries is several days of a busy user's
	// traffic, and at ~0.5 KiB per entry about 1 MiB per user at worst.
	DefaultLogCap = 2000
	// DefaultLogTTL drops the logs of users who get no events at all for a
	// week: a device offline longer than that resyncs through the REST API,
	// which costs far less than keeping every dormant user's log in memory.
	DefaultLogTTL = 7 * 24 * time.Hour
	// DefaultEventBuffer is how many ephemeral and control events may wait for
	// one stream, so one slow client never makes the node buffer without
	// bound. Typing and presence past it are dropped (chat.EventType.Droppable);
	// a control event past it closes the subscription, and the stream resumes
	// from its log.
	DefaultEventBuffer = 64
)

// Open's client options: a dead Redis must fail fast, because the send path
// calls us after PostgreSQL committed and must not stall on real-time (G6);
// the outbox sweeper retries whatever a fast failure left undone.
const (
	openDialTimeout  = 500 * time.Millisecond
	openIOTimeout    = time.Second
	openPoolTimeout  = time.Second
	openMaxRetries   = 1
	openDialAttempts = 1              // go-redis dials 5 times, 100 ms apart, by default: 0.5 s per command against a dead Redis
	membersTTL       = time.Hour      // a member set is written through on change; the TTL only bounds memory for idle groups
	memberVersionTTL = 24 * time.Hour // far longer than any miss→fill window, so a version cannot expire and repeat within one
	sessionsTTL      = 24 * time.Hour // the conversation list is refilled from PostgreSQL at least daily, bounding any drift
)

// Config configures the realtime adapters (Redis, and Memory for the embedded mode).
type Config struct {
	// Prefix starts every key and channel name, so that several deployments
	// (or tests) can share one Redis. It must not contain '{': the hash tags
	// that keep a user's keys in one cluster slot come after it.
	Prefix string
	// LogCap is the number of entries kept per user log (DefaultLogCap if 0).
	LogCap int
	// LogTTL expires a user's log after that long without appends
	// (DefaultLogTTL if 0).
	LogTTL time.Duration
	// EventBuffer is the ephemeral/control event buffer of each subscription
	// (DefaultEventBuffer if 0).
	EventBuffer int
}

func (c Config) withDefaults() Config {
	if c.LogCap <= 0 {
		c.LogCap = DefaultLogCap
	}
	if c.LogTTL <= 0 {
		c.LogTTL = DefaultLogTTL
	}
	if c.EventBuffer <= 0 {
		c.EventBuffer = DefaultEventBuffer
	}
	return c
}

// Redis implements chat.Realtime on one Redis instance (or a compatible
// proxy). Create it with New or Open and Close it when done.
type Redis struct {
	rdb       *redis.Client
	ownClient bool
	cfg       Config
	bus       *bus
}

var _ chat.Realtime = (*Redis)(nil)

// New returns an adapter using rdb, which stays the caller's to close. It
// starts the node's one Pub/Sub receiver goroutine; Close stops it.
func New(rdb *redis.Client, cfg Config) *Redis {
	return newRedis(rdb, cfg, pubsubHealthInterval)
}

func newRedis(rdb *redis.Client, cfg Config, health time.Duration) *Redis {
	r := &Redis{rdb: rdb, cfg: cfg.withDefaults()}
	r.bus = newBus(r, health)
	return r
}

// Open connects to redisURL (redis://[user:password@]host:port/db) with short
// timeouts (a 500 ms dial, 1 s reads and writes, one dial attempt, one retry),
// so a dead Redis fails calls within about a second instead of stalling them. It does not contact Redis: imd must start, and send, while
// Redis is down (G6); Ping tells readiness. ctx is unused today and kept so
// that a future connection check has a deadline.
func Open(_ context.Context, redisURL string, cfg Config) (*Redis, error) {
	opts, err := redis.ParseURL(redisURL)
	if err != nil {
		return nil, fmt.Errorf("realtime: parse redis URL: %w", err)
	}
	opts.DialTimeout = openDialTimeout
	opts.ReadTimeout = openIOTimeout
	opts.WriteTimeout = openIOTimeout
	opts.PoolTimeout = openPoolTimeout
	opts.MaxRetries = openMaxRetries
	opts.DialerRetries = openDialAttempts
	r := New(redis.NewClient(opts), cfg)
	r.ownClient = true
	return r, nil
}

// Close stops the Pub/Sub receiver and closes every subscription's Events
// channel; it closes the client too when Open created it.
func (r *Redis) Close() error {
	r.bus.close()
	if r.ownClient {
		return r.rdb.Close()
	}
	return nil
}

// Ping reports whether Redis answers, for readiness.
func (r *Redis) Ping(ctx context.Context) error {
	if err := r.rdb.Ping(ctx).Err(); err != nil {
		return fmt.Errorf("realtime: ping: %w", err)
	}
	return nil
}

// tag wraps an id in a hash tag: every key of one user (or conversation)
// lands in the same cluster slot, so one Lua script may touch all of them.
func tag(id string) string { return "{" + id + "}" }

// scriptCall is one invocation of a script within a pipeline.
type scriptCall struct {
	keys []string
	args []any
}

// runScripts runs s once per call in one pipeline (EVALSHA) and returns the
// commands in call order. Scripts the server does not know (a restarted
// Redis flushes its script cache) are loaded and just those calls re-run:
// a NOSCRIPT reply means the call did not execute. Each command carries its
// own error; the returned error is the first one other than redis.Nil.
// maxPipeline bounds the script calls sent in one pipeline, so that its
// replies come within the read timeout (1 s) even on a loaded Redis: most
// calls take microseconds, and an append call is bounded to about one to
// two milliseconds (appendUsers, appendWork), so 128 of them stay near a
// quarter of a second at worst.
const maxPipeline = 128

// pipelinesInFlight is how many of one call's pipelines run at once, each on
// its own pooled connection: Redis executes them one after the other anyway,
// but while it runs one the next is already encoded and sent and the last
// one's replies decoded, so a round to 1000 users is not four round trips
// end to end.
const pipelinesInFlight = 4

func (r *Redis) runScripts(ctx context.Context, s *redis.Script, calls []scriptCall) ([]*redis.Cmd, error) {
	cmds := make([]*redis.Cmd, len(calls))
	run := func(idx []int) {
		// The read timeout covers a whole pipeline, so a large fan-out is
		// sent as several pipelines of bounded size.
		var wg sync.WaitGroup
		slots := make(chan struct{}, pipelinesInFlight)
		for chunk := range slices.Chunk(idx, maxPipeline) {
			slots <- struct{}{}
			wg.Go(func() {
				defer func() { <-slots }()
				pipe := r.rdb.Pipeline()
				for _, i := range chunk {
					cmds[i] = s.EvalSha(ctx, pipe, calls[i].keys, calls[i].args...)
				}
				_, _ = pipe.Exec(ctx) // errors stay on the commands
			})
		}
		wg.Wait()
	}
	all := make([]int, len(calls))
	for i := range all {
		all[i] = i
	}
	run(all)
	var missing []int
	for i, c := range cmds {
		if redis.HasErrorPrefix(c.Err(), "NOSCRIPT") {
			missing = append(missing, i)
		}
	}
	if len(missing) > 0 {
		if err := s.Load(ctx, r.rdb).Err(); err != nil {
			return cmds, err
		}
		run(missing)
	}
	for _, c := range cmds {
		if err := c.Err(); err != nil && !errors.Is(err, redis.Nil) {
			return cmds, err
		}
	}
	return cmds, nil
}

// runScript runs one script call, loading the script when needed.
func (r *Redis) runScript(ctx context.Context, s *redis.Script, keys []string, args ...any) *redis.Cmd {
	return s.Run(ctx, r.rdb, keys, args...)
}
