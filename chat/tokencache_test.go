package chat_test

import (
	"context"
	"crypto/sha256"
	"io"
	"log/slog"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"imd/chat"
	"imd/internal/testenv"
	"imd/realtime"
)

// tokenStore is a chat.Store with only what authentication and the
// dispatcher's sweeper touch; anything else panics (nil embedded interface).
// It counts reads, so the tests can tell a cache hit from a store read.
type tokenStore struct {
	chat.Store
	mu        sync.Mutex
	byHash    map[[32]byte]*chat.Token
	reads     atomic.Int64 // TokenByHash
	bulkReads atomic.Int64 // TokensByID
	touches   atomic.Int64
}

func newTokenStore() *tokenStore { return &tokenStore{byHash: map[[32]byte]*chat.Token{}} }

func (s *tokenStore) add(secret string, t chat.Token) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.byHash[sha256.Sum256([]byte(secret))] = &t
}

func (s *tokenStore) TokenByHash(_ context.Context, h []byte) (chat.Token, error) {
	s.reads.Add(1)
	s.mu.Lock()
	defer s.mu.Unlock()
	t := s.byHash[[32]byte(h)]
	if t == nil {
		return chat.Token{}, chat.Errorf(chat.CodeNotFound, "no such token")
	}
	return *t, nil
}

func (s *tokenStore) TokensByID(_ context.Context, ids []string) ([]chat.Token, error) {
	s.bulkReads.Add(1)
	s.mu.Lock()
	defer s.mu.Unlock()
	var out []chat.Token
	for _, t := range s.byHash {
		if slices.Contains(ids, t.ID) {
			out = append(out, *t)
		}
	}
	return out, nil
}

func (s *tokenStore) RevokeToken(_ context.Context, uid, id string, at time.Time) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, t := range s.byHash {
		if t.ID == id && t.UserID == uid && t.RevokedAt == nil {
			t.RevokedAt = &at
			return nil
		}
	}
	return chat.Errorf(chat.CodeNotFound, "no such token")
}

func (s *tokenStore) TouchToken(_ context.Context, id string, at time.Time) error {
	s.touches.Add(1)
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, t := range s.byHash {
		if t.ID == id {
			t.LastUsedAt = &at
		}
	}
	return nil
}

func (s *tokenStore) ClaimEvents(context.Context, time.Time, time.Duration, int) ([]chat.OutboxEvent, error) {
	return nil, nil
}

// startNode runs a Service over st and rt, as one imd node would.
func startNode(t *testing.T, st chat.Store, rt chat.Realtime) *chat.Service {
	return startNodeWith(t, st, rt, chat.Config{})
}

func startNodeWith(t *testing.T, st chat.Store, rt chat.Realtime, cfg chat.Config) *chat.Service {
	t.Helper()
	svc := chat.NewService(st, rt, nil, cfg, slog.New(slog.NewTextHandler(io.Discard, nil)), chat.Hooks{})
	ctx, cancel := context.WithCancel(context.Background())
	svc.Start(ctx)
	t.Cleanup(func() { cancel(); svc.Wait() })
	return svc
}

func newMemory(t *testing.T) *realtime.Memory {
	rt := realtime.NewMemory(realtime.Config{})
	t.Cleanup(func() { _ = rt.Close() })
	return rt
}

// cached waits until svc answers secret from its cache: the revocation
// listener subscribes in the background after Start, and caches nothing
// before it has.
func cached(t *testing.T, svc *chat.Service, st *tokenStore, secret string) {
	t.Helper()
	ctx := context.Background()
	testenv.Eventually(t, 5*time.Second, func() bool {
		if _, err := svc.Authenticate(ctx, secret); err != nil {
			t.Fatalf("authenticate: %v", err)
		}
		n := st.reads.Load()
		_, err := svc.Authenticate(ctx, secret)
		return err == nil && st.reads.Load() == n
	}, "token served from the cache")
}

const (
	secretA = "imd_aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"
	secretB = "imd_bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb"
)

// TestTokenCacheServesFromMemory: once cached, requests cost no store
// read, and last_used_at is written once, not per request.
func TestTokenCacheServesFromMemory(t *testing.T) {
	st := newTokenStore()
	st.add(secretA, chat.Token{ID: "tok_a", UserID: "alice", Kind: chat.TokenAPI})
	svc := startNode(t, st, newMemory(t))
	cached(t, svc, st, secretA)
	reads := st.reads.Load()
	for range 100 {
		p, err := svc.Authenticate(context.Background(), secretA)
		if err != nil || p != (chat.Principal{UserID: "alice", TokenID: "tok_a"}) {
			t.Fatalf("authenticate = %+v, %v", p, err)
		}
	}
	if n := st.reads.Load() - reads; n != 0 {
		t.Errorf("%d store reads for 100 cached requests", n)
	}
	if n := st.touches.Load(); n != 1 {
		t.Errorf("last_used_at written %d times, want once (at most once a minute)", n)
	}
	if _, err := svc.Authenticate(context.Background(), secretB); !chat.IsCode(err, chat.CodeUnauthorized) {
		t.Errorf("unknown token: %v", err)
	}
}

// TestTokenCacheRevocation: a revoked token is refused at once by the node
// that revoked it and by another node sharing the bus, through revoke by id
// and through logout.
func TestTokenCacheRevocation(t *testing.T) {
	st := newTokenStore()
	st.add(secretA, chat.Token{ID: "tok_a", UserID: "alice", Kind: chat.TokenAPI})
	st.add(secretB, chat.Token{ID: "tok_b", UserID: "alice", Kind: chat.TokenSession})
	rt := newMemory(t)
	n1, n2 := startNode(t, st, rt), startNode(t, st, rt)
	for _, n := range []*chat.Service{n1, n2} {
		cached(t, n, st, secretA)
		cached(t, n, st, secretB)
	}
	ctx := context.Background()
	alice := chat.Principal{UserID: "alice", TokenID: "tok_b"}

	if err := n1.RevokeToken(ctx, alice, "tok_a"); err != nil {
		t.Fatal(err)
	}
	// The in-memory bus delivers before Publish returns, and a node applies
	// what its subscription holds before answering from the cache: no wait.
	for i, n := range []*chat.Service{n1, n2} {
		if _, err := n.Authenticate(ctx, secretA); !chat.IsCode(err, chat.CodeUnauthorized) {
			t.Errorf("node %d: revoked token: %v", i+1, err)
		}
		if _, err := n.Authenticate(ctx, secretB); err != nil {
			t.Errorf("node %d: the other token: %v", i+1, err)
		}
	}

	if err := n2.Logout(ctx, alice); err != nil {
		t.Fatal(err)
	}
	for i, n := range []*chat.Service{n1, n2} {
		if _, err := n.Authenticate(ctx, secretB); !chat.IsCode(err, chat.CodeUnauthorized) {
			t.Errorf("node %d: logged-out token: %v", i+1, err)
		}
	}
}

// TestTokenCacheRevocationWithoutBus: when the revocation never reaches a
// node (here the nodes share no bus at all), that node still refuses the
// token within TokenCacheTTL: the stated worst case.
func TestTokenCacheRevocationWithoutBus(t *testing.T) {
	const ttl = 500 * time.Millisecond
	st := newTokenStore()
	st.add(secretA, chat.Token{ID: "tok_a", UserID: "alice", Kind: chat.TokenAPI})
	cfg := chat.Config{TokenCacheTTL: ttl}
	n1, n2 := startNodeWith(t, st, newMemory(t), cfg), startNodeWith(t, st, newMemory(t), cfg)
	cached(t, n2, st, secretA)
	ctx := context.Background()
	revokedAt := time.Now()
	if err := n1.RevokeToken(ctx, chat.Principal{UserID: "alice"}, "tok_a"); err != nil {
		t.Fatal(err)
	}
	testenv.Eventually(t, ttl+2*time.Second, func() bool {
		_, err := n2.Authenticate(ctx, secretA)
		return chat.IsCode(err, chat.CodeUnauthorized)
	}, "revoked token refused by a node the bus did not reach")
	// The poll interval and a loaded machine add to the window, not the cache.
	if d := time.Since(revokedAt); d > ttl+time.Second {
		t.Errorf("refused %v after the revocation, want within %v", d, ttl)
	}
}

// TestTokenCacheRenewsLiveTokens: a token in use is read again in bulk
// before its entry expires, so its requests keep being answered from the
// cache: one read by hash in all, where without the renewal each TTL would
// cost one more.
func TestTokenCacheRenewsLiveTokens(t *testing.T) {
	t.Parallel()
	const ttl = time.Second
	st := newTokenStore()
	st.add(secretA, chat.Token{ID: "tok_a", UserID: "alice", Kind: chat.TokenAPI})
	svc := startNodeWith(t, st, newMemory(t), chat.Config{TokenCacheTTL: ttl})
	cached(t, svc, st, secretA)
	ctx := context.Background()
	start, reads := time.Now(), st.reads.Load()
	testenv.Eventually(t, 10*ttl, func() bool {
		if _, err := svc.Authenticate(ctx, secretA); err != nil {
			t.Fatalf("authenticate: %v", err)
		}
		return time.Since(start) > 4*ttl
	}, "four TTLs of requests")
	if n := st.reads.Load() - reads; n > 1 {
		t.Errorf("%d reads by hash over four TTLs of requests, want at most 1 (renewed in bulk)", n)
	}
	if n := st.bulkReads.Load(); n < 3 {
		t.Errorf("%d bulk reads over four TTLs, want at least 3", n)
	}
}

// TestTokenCacheOff: a negative TokenCacheTTL reads the store every time.
func TestTokenCacheOff(t *testing.T) {
	st := newTokenStore()
	st.add(secretA, chat.Token{ID: "tok_a", UserID: "alice", Kind: chat.TokenAPI})
	svc := startNodeWith(t, st, newMemory(t), chat.Config{TokenCacheTTL: -1})
	for range 10 {
		if _, err := svc.Authenticate(context.Background(), secretA); err != nil {
			t.Fatal(err)
		}
	}
	if n := st.reads.Load(); n != 10 {
		t.Errorf("%d store reads for 10 requests, want 10", n)
	}
}

// TestTokenCacheExpiry: a cached token is refused from the instant it
// expires, without waiting for the cache to read it again.
func TestTokenCacheExpiry(t *testing.T) {
	st := newTokenStore()
	exp := chat.Now().Add(time.Second)
	st.add(secretA, chat.Token{ID: "tok_a", UserID: "alice", Kind: chat.TokenAPI, ExpiresAt: &exp})
	svc := startNode(t, st, newMemory(t))
	cached(t, svc, st, secretA)
	reads := st.reads.Load()
	ctx := context.Background()
	testenv.Eventually(t, 3*time.Second, func() bool {
		before := chat.Now()
		_, err := svc.Authenticate(ctx, secretA)
		after := chat.Now()
		switch {
		case err == nil && !before.Before(exp):
			t.Fatalf("accepted at %v, expired at %v", before, exp)
		case err != nil && after.Before(exp):
			t.Fatalf("refused at %v, expires at %v: %v", after, exp, err)
		}
		return chat.IsCode(err, chat.CodeUnauthorized)
	}, "expired token refused")
	if st.reads.Load() != reads {
		t.Errorf("the expiry was found by a store read, not on the cache hit")
	}
}

func (s *tokenStore) TokenByID(_ context.Context, id string) (chat.Token, error) {
	s.reads.Add(1)
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, t := range s.byHash {
		if t.ID == id {
			return *t, nil
		}
	}
	return chat.Token{}, chat.Errorf(chat.CodeNotFound, "no such token")
}

// DirectPeers: the users here have no direct conversations (presence
// changes of a stream go to nobody).
func (s *tokenStore) DirectPeers(context.Context, string) ([]string, error) { return nil, nil }
