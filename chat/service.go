package chat

import (
	"context"
	"crypto/rand"
	"log/slog"
	"strings"
	"sync"
	"time"
)

// Config holds the limits and policies of the use cases. Zero values are
// replaced by the Default constants.
type Config struct {
	Registration    bool          // open self-registration
	MaxTextBytes    int           // message text, bytes of UTF-8
	MaxMetadata     int           // serialized metadata object, bytes
	MaxGroupMembers int           // including the owner
	MaxTitleChars   int           // group title, characters
	SendLimit       Limit         // per user, across nodes; Rate 0 turns it off
	LoginLimit      Limit         // failed logins per username and per address; Rate 0 off
	SessionTTL      time.Duration // lifetime of tokens from register/login
	TokenCacheTTL   time.Duration // how long a node trusts a cached token (auth.go); < 0: no cache
	TicketTTL       time.Duration // stream tickets
	TypingTTL       time.Duration // how long a typing indicator shows
	Heartbeat       time.Duration // stream keep-alive and presence refresh
	PresenceTTL     time.Duration // a stream not refreshed for this long counts offline
	SweepEvery      time.Duration // outbox sweeper period
	SweepAfter      time.Duration // age before the sweeper takes an event over from the fast path
	DispatchWorkers int
	// FanoutFast is the group size from which messages also take the
	// fan-out fast path (fanout.go); < 0 turns it off.
	FanoutFast int
}

// Defaults, each with its reason.
const (
	DefaultMaxTextBytes    = 16384 // API.md; long enough for a pasted log, short enough to render
	DefaultMaxMetadata     = 4096  // API.md; metadata is for client hints, not payloads
	DefaultMaxGroupMembers = 5000  // API.md; fan-out cost grows with it
	DefaultMaxTitleChars   = 128
	DefaultSendRate        = 20 // per second: faster than any human, slows runaway bots
	DefaultSendBurst       = 60
	DefaultLoginRate       = 10 // failed logins per minute: stops online guessing, tolerates typos
	DefaultSessionTTL      = 30 * 24 * time.Hour
	// DefaultTokenCacheTTL is the worst-case delay before a revoked token is
	// refused by a node that missed the revocation on the bus (auth.go).
	// Seconds are prompt for a revocation, and one store read per active
	// token per 5 s per node is a negligible load.
	DefaultTokenCacheTTL   = 5 * time.Second
	DefaultTicketTTL       = 60 * time.Second // long enough to open an EventSource, short enough to leak harmlessly
	DefaultTypingTTL       = 5 * time.Second  // clients re-send typing while the user types
	DefaultHeartbeat       = 15 * time.Second // under common proxy idle timeouts (30-60 s)
	DefaultPresenceTTL     = 45 * time.Second // three missed heartbeats: a crashed node's streams go offline
	DefaultSweepEvery      = time.Second
	DefaultSweepAfter      = 2 * time.Second // the fast path normally finishes well within this
	DefaultDispatchWorkers = 8
	// DefaultFanoutFast: below a few dozen members the logs are appended
	// within a millisecond or two, and the fast path would only add a
	// broadcast every node hears.
	DefaultFanoutFast = 32
)

func (c Config) withDefaults() Config {
	def := func(v *int, d int) {
		if *v == 0 {
			*v = d
		}
	}
	defd := func(v *time.Duration, d time.Duration) {
		if *v == 0 {
			*v = d
		}
	}
	def(&c.MaxTextBytes, DefaultMaxTextBytes)
	def(&c.MaxMetadata, DefaultMaxMetadata)
	def(&c.MaxGroupMembers, DefaultMaxGroupMembers)
	def(&c.MaxTitleChars, DefaultMaxTitleChars)
	def(&c.DispatchWorkers, DefaultDispatchWorkers)
	def(&c.FanoutFast, DefaultFanoutFast)
	defd(&c.SessionTTL, DefaultSessionTTL)
	defd(&c.TokenCacheTTL, DefaultTokenCacheTTL)
	defd(&c.TicketTTL, DefaultTicketTTL)
	defd(&c.TypingTTL, DefaultTypingTTL)
	defd(&c.Heartbeat, DefaultHeartbeat)
	defd(&c.PresenceTTL, DefaultPresenceTTL)
	defd(&c.SweepEvery, DefaultSweepEvery)
	defd(&c.SweepAfter, DefaultSweepAfter)
	return c
}

// Hasher hashes passwords; the implementation (argon2id) lives outside the
// domain because it is not standard library.
type Hasher interface {
	Hash(password string) (string, error)
	Verify(encoded, password string) (bool, error)
}

// Hooks let tests inject faults the real world produces rarely.
type Hooks struct {
	// SkipFastDispatch, when it returns true, drops an event from the fast
	// path as if the node died right after the commit; the sweeper must
	// deliver it. It stops only the dispatch to the logs: the fan-out
	// fast path (fanout.go) still broadcasts a large group's message,
	// which is how a test sees that path alone.
	SkipFastDispatch func(OutboxEvent) bool
	// NoSweeper stops this node's outbox sweeper, so that only the fast
	// path delivers: a test of the fast path cannot pass through the
	// sweeper's retries.
	NoSweeper bool
	// PollWaiting is called with the user's id when a long poll has read
	// its log and starts to wait, so that a test can send only then.
	PollWaiting func(userID string)
}

// Service is the use cases. It is safe for concurrent use.
type Service struct {
	store  Store
	rt     Realtime
	hasher Hasher
	cfg    Config
	log    *slog.Logger
	hooks  Hooks
	disp   *dispatcher
	fan    *fanout      // the fan-out fast path's sending side
	local  localStreams // this node's streams, for the fast path
	tokens *tokenCache  // authenticated tokens (auth.go)
	// dummyHash is a hash of this service's hasher that no password
	// matches, made once on first use (Login).
	dummyHash func() string
	// sendsDispatched: the store hands committed sends to the dispatcher
	// itself, in commit order (CommitOrdered).
	sendsDispatched bool
	bg              sync.WaitGroup // background work besides the dispatcher
}

// NewService wires the use cases; call Start to run the dispatcher.
func NewService(store Store, rt Realtime, hasher Hasher, cfg Config, log *slog.Logger, hooks Hooks) *Service {
	if log == nil {
		log = slog.Default()
	}
	s := &Service{store: store, rt: rt, hasher: hasher, cfg: cfg.withDefaults(), log: log, hooks: hooks}
	s.disp = newDispatcher(s)
	s.fan = newFanout(s)
	s.tokens = newTokenCache(s.cfg.TokenCacheTTL)
	s.dummyHash = sync.OnceValue(func() string {
		h, _ := hasher.Hash("imd-dummy-password")
		return h
	})
	if co, ok := store.(CommitOrdered); ok {
		co.OnSendCommitted(s.sent)
		s.sendsDispatched = true
	}
	return s
}

// sent hands committed sends to the fast path and to the dispatcher.
func (s *Service) sent(evs []OutboxEvent) {
	s.fan.enqueue(evs)
	s.disp.enqueue(evs)
}

// Config returns the effective configuration.
func (s *Service) Config() Config { return s.cfg }

// Start runs the dispatch workers, the outbox sweeper, the token cache's
// revocation listener and the fan-out fast path until ctx ends; Wait
// returns when they have stopped. Without Start, Authenticate reads the
// store on every request.
func (s *Service) Start(ctx context.Context) {
	s.disp.start(ctx)
	s.bg.Go(func() { s.watchRevocations(ctx) })
	if s.fan.on {
		s.bg.Go(func() { s.fan.run(ctx) })
	}
	// Every node hands the fast path's messages to its streams, whether or
	// not it sends any itself.
	s.bg.Go(func() { s.followFanout(ctx) })
}

// Wait blocks until the background work started by Start has ended.
func (s *Service) Wait() {
	s.disp.wait()
	s.bg.Wait()
}

// Ready reports whether the dependencies answer; each error is nil when fine.
func (s *Service) Ready(ctx context.Context) (storeErr, realtimeErr error) {
	return s.store.Ping(ctx), s.rt.Ping(ctx)
}

// newID returns an opaque, unguessable, non-sequential id with a type prefix
// that makes ids self-describing in logs.
func newID(prefix string) string {
	return prefix + strings.ToLower(rand.Text()[:20])
}

// notFound is the uniform answer for conversations the caller cannot see:
// existence is not leaked (G7).
func notFound(what string) *Error { return Errorf(CodeNotFound, "%s not found", what) }
