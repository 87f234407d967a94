package chat

import (
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

// listeningCache is a token cache that caches: as if the node listened to
// the revocations.
func listeningCache(ttl time.Duration) *tokenCache {
	c := newTokenCache(ttl)
	c.watch.Store(&tokenWatch{events: make(chan StreamEvent)})
	return c
}

// cacheEntry puts tok in c as read at read, and returns its entry.
func cacheEntry(t *testing.T, c *tokenCache, hash [32]byte, tok Token, read time.Time) *cachedToken {
	t.Helper()
	gen, _ := c.begin()
	e := &cachedToken{tok: tok, p: Principal{UserID: tok.UserID, TokenID: tok.ID}, read: read}
	c.put(hash, e, gen)
	require.Same(t, e, c.entries[hash])
	return e
}

// TestTokenCacheDue: only entries that answered a request since their read,
// and are old enough, are read again.
func TestTokenCacheDue(t *testing.T) {
	c := listeningCache(time.Minute)
	old := time.Now().Add(-40 * time.Second)
	cacheEntry(t, c, [32]byte{1}, Token{ID: "unused"}, old)
	cacheEntry(t, c, [32]byte{2}, Token{ID: "used"}, old).used.Store(true)
	cacheEntry(t, c, [32]byte{3}, Token{ID: "fresh"}, time.Now()).used.Store(true)
	require.Equal(t, []string{"used"}, c.due(30*time.Second))
}

// TestTokenCacheRenew: a bulk read renews live tokens (keeping what the
// entry knew of its last_used_at write), drops revoked, expired and
// vanished ones, and renews nothing when an invalidation came between the
// read's start and its answer.
func TestTokenCacheRenew(t *testing.T) {
	c := listeningCache(time.Minute)
	old := time.Now().Add(-40 * time.Second)
	past := Now().Add(-time.Second)
	ids := []string{"live", "revoked", "expired", "gone"}
	entries := map[string]*cachedToken{}
	for i, id := range ids {
		entries[id] = cacheEntry(t, c, [32]byte{byte(i + 1)}, Token{ID: id, UserID: "u"}, old)
		entries[id].used.Store(true)
	}
	touched := time.Now().UnixNano()
	entries["live"].touched.Store(touched)
	toks := []Token{{ID: "live", UserID: "u", Name: "renamed"}, {ID: "revoked", UserID: "u", RevokedAt: &past},
		{ID: "expired", UserID: "u", ExpiresAt: &past}}

	// An invalidation (of any token) while the read was in flight.
	gen, read := c.begin()
	c.invalidate("unrelated")
	c.renew(ids, toks, gen, read)
	for i, id := range ids {
		require.Same(t, entries[id], c.entries[[32]byte{byte(i + 1)}], "%s: untouched", id)
	}

	gen, read = c.begin()
	c.renew(ids, toks, gen, read)
	e := c.entries[[32]byte{1}]
	require.NotNil(t, e)
	require.Equal(t, "renamed", e.tok.Name)
	require.Equal(t, read, e.read)
	require.False(t, e.used.Load(), "used again only by a request")
	require.Equal(t, touched, e.touched.Load())
	for i, id := range ids[1:] {
		require.Nil(t, c.entries[[32]byte{byte(i + 2)}], "%s: dropped", id)
		require.NotContains(t, c.byID, id)
	}
}
