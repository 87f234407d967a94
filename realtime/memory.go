package realtime

import (
	"context"
	"hash/maphash"
	"sync"
	"sync/atomic"
	"time"

	"imd/chat"
)

// Memory implements chat.Realtime in this process's memory, for the embedded
// single-node mode (no Redis). It keeps the semantics of the Redis adapter
// as pinned by the conformance suite (realtimetest): the same log offsets,
// epochs, dedupe, gaps, trimming and resync reasons; the same bus,
// presence, cache and rate-limit behaviour.
//
// It is single-node by design: there is no routing between processes, so
// the wake-ups and ephemeral events of one Memory reach only the
// subscriptions made on it, and its logs die with the process (a restart
// is a lost log: every resuming stream gets a resync, never a silent gap, G5).
// Several imd nodes need Redis.
//
// Memory stays bounded: logs are trimmed to LogCap entries and keep dedupe
// keys only for retained entries; logs, presence entries, caches and rate
// buckets expire as their Redis counterparts do, lazily when touched and by
// a janitor goroutine that Close stops.
//
// Locking: every kind of state sits in a sharded map (memShards), so
// unrelated users never contend on one mutex; each user's log additionally
// has its own mutex, which makes Append atomic per user. No code path holds
// two of these locks at once except the janitor and loseAll, which take a
// shard and then (TryLock, or Lock without holding anything else that a log
// holder could want) the logs in it.
type Memory struct {
	cfg    Config
	now    func() time.Time // time.Now; tests move it forward
	closed atomic.Bool

	logs     memShards[*memLog]
	subs     memShards[memSubSet]
	presence memShards[*memPresence]
	members  memShards[*memMembers]
	sessions memShards[*memSessions]
	rates    memShards[*memBucket]

	stop      chan struct{}
	done      chan struct{}
	closeOnce sync.Once
}

var _ chat.Realtime = (*Memory)(nil)

// memShardCount is how many independently locked parts each map has: enough
// that two cores' worth of goroutines rarely meet on one, few enough that a
// janitor sweep is 64 short critical sections per map.
const memShardCount = 64

// memJanitorMax is the longest pause between janitor sweeps. Expiry is also
// applied lazily on every access, so the janitor only bounds how long dead
// state (logs, presence entries, cache entries, rate buckets of users who
// went away) occupies memory; a sweep walks everything, so it is not run
// more often than needed.
const memJanitorMax = time.Minute

// memJanitorMin bounds the sweep rate for tiny LogTTLs (tests).
const memJanitorMin = 5 * time.Millisecond

// NewMemory returns an in-memory adapter with cfg's LogCap, LogTTL and
// EventBuffer (cfg.Prefix is ignored: nothing is shared). It starts the
// janitor goroutine; Close stops it.
func NewMemory(cfg Config) *Memory {
	cfg = cfg.withDefaults()
	return newMemory(cfg, min(memJanitorMax, max(cfg.LogTTL/2, memJanitorMin)), time.Now)
}

func newMemory(cfg Config, janitorEvery time.Duration, now func() time.Time) *Memory {
	m := &Memory{
		cfg:  cfg.withDefaults(),
		now:  now,
		stop: make(chan struct{}),
		done: make(chan struct{}),
	}
	for _, s := range []interface{ init() }{&m.logs, &m.subs, &m.presence, &m.members, &m.sessions, &m.rates} {
		s.init()
	}
	go m.janitor(janitorEvery)
	return m
}

// Close ends every subscription (Events closed, Err ErrClosed), stops the
// janitor and makes every later call fail with ErrClosed, as the calls of a
// Redis adapter whose client was closed do. It is idempotent.
func (m *Memory) Close() error {
	m.closeOnce.Do(func() {
		m.closed.Store(true)
		m.closeSubscriptions()
		close(m.stop)
		<-m.done
	})
	return nil
}

// Ping implements chat.Realtime: memory is always there until Close.
func (m *Memory) Ping(ctx context.Context) error {
	return m.check(ctx)
}

// check is the common precondition of every call.
func (m *Memory) check(ctx context.Context) error {
	if m.closed.Load() {
		return ErrClosed
	}
	return ctx.Err()
}

// memShards is a map from string keys split into independently locked shards.
type memShards[V any] struct {
	seed   maphash.Seed
	shards [memShardCount]memShard[V]
}

type memShard[V any] struct {
	mu sync.RWMutex
	m  map[string]V
}

func (s *memShards[V]) init() {
	s.seed = maphash.MakeSeed()
	for i := range s.shards {
		s.shards[i].m = make(map[string]V)
	}
}

func (s *memShards[V]) of(key string) *memShard[V] {
	return &s.shards[maphash.String(s.seed, key)%memShardCount]
}

// janitor sweeps expired state every interval until Close.
func (m *Memory) janitor(every time.Duration) {
	defer close(m.done)
	t := time.NewTicker(every)
	defer t.Stop()
	for {
		select {
		case <-m.stop:
			return
		case <-t.C:
			m.sweep(m.now())
		}
	}
}

// sweep drops everything that has expired at now.
func (m *Memory) sweep(now time.Time) {
	m.sweepLogs(now)
	m.sweepPresence(now)
	m.sweepMembers(now)
	m.sweepSessions(now)
	m.sweepRates(now)
}

// loseAll drops every log, presence entry, cache entry and rate bucket, as
// a Redis restarted without persistence loses its keys. Subscriptions stay:
// they are connections, not stored state. The conformance harness's LoseLogs.
func (m *Memory) loseAll() {
	m.loseLogs()
	clearShards(&m.presence)
	clearShards(&m.members)
	clearShards(&m.sessions)
	clearShards(&m.rates)
}

func clearShards[V any](s *memShards[V]) {
	for i := range s.shards {
		sh := &s.shards[i]
		sh.mu.Lock()
		clear(sh.m)
		sh.mu.Unlock()
	}
}
