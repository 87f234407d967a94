package chat

import (
	"context"
	"crypto/rand"
	"crypto/sha256"
	"crypto/subtle"
	"encoding/base64"
	"encoding/json"
	"regexp"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"
	"unicode/utf8"
)

// tokenPrefix marks imd secrets so that secret scanners and people recognise
// a leaked one.
const tokenPrefix = "imd_"

var usernameRE = regexp.MustCompile(`^[a-z0-9][a-z0-9._-]{2,31}$`)

// Password bounds: at least 8 (NIST 800-63B minimum); at most 256 so a
// request cannot make argon2 hash megabytes.
const (
	minPassword    = 8
	maxPassword    = 256
	maxDisplayName = 64
	maxTokenName   = 64
)

// Issued is a freshly issued token with its secret, shown exactly once.
type Issued struct {
	Token  Token
	Secret string
}

// AuthResult is what register and login return.
type AuthResult struct {
	User User
	Issued
}

// newSecret returns a token secret and the hash stored in its place. A
// SHA-256 of 256 random bits needs no slow hash: it cannot be guessed.
func newSecret() (string, []byte) {
	b := make([]byte, 32)
	_, _ = rand.Read(b)
	secret := tokenPrefix + base64.RawURLEncoding.EncodeToString(b)
	return secret, hashSecret(secret)
}

func hashSecret(secret string) []byte {
	h := sha256.Sum256([]byte(secret))
	return h[:]
}

func validateNewUser(v *Validation, username, password, displayName string, passwordRequired bool) {
	if !usernameRE.MatchString(username) {
		v.Add("username", "must match ^[a-z0-9][a-z0-9._-]{2,31}$")
	}
	if password != "" || passwordRequired {
		if n := utf8.RuneCountInString(password); n < minPassword || len(password) > maxPassword {
			v.Add("password", "must be 8 to 256 characters")
		}
	}
	validateDisplayName(v, displayName)
}

func validateDisplayName(v *Validation, name string) {
	if !utf8.ValidString(name) || strings.ContainsRune(name, 0) || utf8.RuneCountInString(name) > maxDisplayName {
		v.Add("display_name", "must be at most 64 characters of valid UTF-8")
	}
}

// Register creates an account with a password and signs it in.
func (s *Service) Register(ctx context.Context, username, password, displayName string) (AuthResult, error) {
	if !s.cfg.Registration {
		return AuthResult{}, Errorf(CodeForbidden, "registration is closed on this server")
	}
	u, err := s.createUser(ctx, username, password, displayName, true)
	if err != nil {
		return AuthResult{}, err
	}
	iss, err := s.issue(ctx, u.ID, TokenSession, "session", s.cfg.SessionTTL)
	return AuthResult{User: u, Issued: iss}, err
}

// AdminCreateUser provisions an account for an app server; the password is optional.
func (s *Service) AdminCreateUser(ctx context.Context, username, password, displayName string) (User, error) {
	return s.createUser(ctx, username, password, displayName, false)
}

func (s *Service) createUser(ctx context.Context, username, password, displayName string, passwordRequired bool) (User, error) {
	var v Validation
	validateNewUser(&v, username, password, displayName, passwordRequired)
	if err := v.Err(); err != nil {
		return User{}, err
	}
	if displayName == "" {
		displayName = username
	}
	u := User{ID: username, DisplayName: displayName, CreatedAt: Now()}
	if password != "" {
		h, err := s.hasher.Hash(password)
		if err != nil {
			return User{}, Internal(err)
		}
		u.PasswordHash = h
	}
	if err := s.store.CreateUser(ctx, u); err != nil {
		if IsCode(err, CodeConflict) {
			return User{}, &Error{Code: CodeConflict, Message: "username is taken",
				Fields: []FieldError{{Field: "username", Message: "is taken"}}}
		}
		return User{}, err
	}
	return u, nil
}

// Login checks a password and issues a session token. Failed attempts are
// limited per username and per client address across nodes.
func (s *Service) Login(ctx context.Context, username, password, clientAddr string) (AuthResult, error) {
	keys := []string{"login:user:" + username, "login:addr:" + clientAddr}
	if err := s.checkLoginLimit(ctx, keys, 0); err != nil {
		return AuthResult{}, err
	}
	u, err := s.store.User(ctx, username)
	if err != nil && !IsCode(err, CodeNotFound) {
		return AuthResult{}, err
	}
	// An unknown user is verified against a dummy hash, so that the
	// response time does not tell which usernames exist.
	hash := u.PasswordHash
	if hash == "" {
		hash = s.dummyHash()
	}
	ok, verr := s.hasher.Verify(hash, password)
	if verr != nil || !ok || u.PasswordHash == "" {
		if err := s.checkLoginLimit(ctx, keys, 1); err != nil {
			return AuthResult{}, err
		}
		return AuthResult{}, Errorf(CodeUnauthorized, "wrong username or password")
	}
	iss, err := s.issue(ctx, u.ID, TokenSession, "session", s.cfg.SessionTTL)
	return AuthResult{User: u, Issued: iss}, err
}

// checkLoginLimit checks (n = 0) or counts (n = 1) a failed attempt. Redis
// being down must not lock everyone out, so errors let the attempt through.
func (s *Service) checkLoginLimit(ctx context.Context, keys []string, n int) error {
	if s.cfg.LoginLimit.Rate <= 0 {
		return nil
	}
	for _, k := range keys {
		ok, retry, err := s.rt.Allow(ctx, k, s.cfg.LoginLimit, n)
		if err != nil {
			s.log.Warn("login rate limit unavailable", "err", err)
			return nil
		}
		if !ok && n == 0 {
			return &Error{Code: CodeRateLimited, Message: "too many failed logins, retry later", RetryAfter: retry}
		}
	}
	return nil
}

func (s *Service) issue(ctx context.Context, uid string, kind TokenKind, name string, ttl time.Duration) (Issued, error) {
	secret, hash := newSecret()
	now := Now()
	t := Token{ID: newID("tok_"), UserID: uid, Kind: kind, Name: name, CreatedAt: now}
	if ttl > 0 {
		exp := now.Add(ttl)
		t.ExpiresAt = &exp
	}
	if err := s.store.CreateToken(ctx, t, hash); err != nil {
		return Issued{}, err
	}
	return Issued{Token: t, Secret: secret}, nil
}

// touchEvery bounds last_used_at writes to one per token per minute (per
// node: each node's cache keeps its own time of the last write).
const touchEvery = time.Minute

// Authenticate resolves a bearer token (or session cookie) to a principal.
// A token this node has read from the store within Config.TokenCacheTTL is
// answered from the node's cache (see tokenCache for why revocation still
// holds); expiry is checked on every request, cached or not.
func (s *Service) Authenticate(ctx context.Context, secret string) (Principal, error) {
	if !strings.HasPrefix(secret, tokenPrefix) || len(secret) > 128 {
		return Principal{}, Errorf(CodeUnauthorized, "invalid token")
	}
	hash := sha256.Sum256([]byte(secret))
	e := s.tokens.get(hash)
	if e == nil {
		var err error
		if e, err = s.loadToken(ctx, hash); err != nil {
			return Principal{}, err
		}
	} else if !e.used.Load() {
		e.used.Store(true) // worth reading again before it expires (refreshTokens)
	}
	now := Now()
	if t := e.tok.ExpiresAt; t != nil && !now.Before(*t) {
		return Principal{}, Errorf(CodeUnauthorized, "token expired or revoked")
	}
	// Claim the write before making it, so that concurrent requests with
	// the same token do not all touch it.
	if last := e.touched.Load(); now.UnixNano()-last > int64(touchEvery) && e.touched.CompareAndSwap(last, now.UnixNano()) {
		if err := s.store.TouchToken(ctx, e.tok.ID, now); err != nil {
			s.log.Debug("touch token", "err", err)
		}
	}
	return e.p, nil
}

// loadToken reads a token from the store and caches it if it is live.
func (s *Service) loadToken(ctx context.Context, hash [32]byte) (*cachedToken, error) {
	gen, read := s.tokens.begin()
	t, err := s.store.TokenByHash(ctx, hash[:])
	if err != nil {
		if IsCode(err, CodeNotFound) {
			return nil, Errorf(CodeUnauthorized, "invalid token")
		}
		return nil, err
	}
	if t.RevokedAt != nil || (t.ExpiresAt != nil && !Now().Before(*t.ExpiresAt)) {
		return nil, Errorf(CodeUnauthorized, "token expired or revoked")
	}
	e := &cachedToken{tok: t, p: Principal{UserID: t.UserID, TokenID: t.ID}, read: read}
	if t.LastUsedAt != nil {
		e.touched.Store(t.LastUsedAt.UnixNano())
	}
	s.tokens.put(hash, e, gen)
	return e, nil
}

// tokenAlive reports whether the token behind an open stream still holds.
func (s *Service) tokenAlive(ctx context.Context, p Principal) (bool, error) {
	t, err := s.store.TokenByID(ctx, p.TokenID)
	if IsCode(err, CodeNotFound) {
		return false, nil
	}
	if err != nil {
		return true, err
	}
	return t.RevokedAt == nil && (t.ExpiresAt == nil || Now().Before(*t.ExpiresAt)), nil
}

// CheckAdmin compares an admin token in constant time. An empty configured
// token disables the admin API (404).
func CheckAdmin(configured, presented string) error {
	if configured == "" {
		// Not configured: the admin API does not exist here (no hint to probe).
		return Errorf(CodeNotFound, "no such route")
	}
	if subtle.ConstantTimeCompare([]byte(configured), []byte(presented)) != 1 {
		return Errorf(CodeUnauthorized, "invalid admin token")
	}
	return nil
}

// Logout revokes the token the request used and ends its open streams.
func (s *Service) Logout(ctx context.Context, p Principal) error {
	if err := s.store.RevokeToken(ctx, p.UserID, p.TokenID, Now()); err != nil && !IsCode(err, CodeNotFound) {
		return err
	}
	s.revoked(ctx, p.TokenID)
	s.endStreams(ctx, p.UserID, p.TokenID)
	return nil
}

// CreateAPIToken issues a named token; ttl 0 means it does not expire.
func (s *Service) CreateAPIToken(ctx context.Context, p Principal, name string, ttl time.Duration) (Issued, error) {
	name = strings.TrimSpace(name)
	if name == "" || utf8.RuneCountInString(name) > maxTokenName || !utf8.ValidString(name) {
		return Issued{}, Invalid("name", "must be 1 to 64 characters")
	}
	if ttl < 0 {
		return Issued{}, Invalid("expires_in_seconds", "must be positive")
	}
	return s.issue(ctx, p.UserID, TokenAPI, name, ttl)
}

// AdminCreateToken mints an API token for a user on behalf of an app server.
func (s *Service) AdminCreateToken(ctx context.Context, uid, name string, ttl time.Duration) (Issued, error) {
	if _, err := s.store.User(ctx, uid); err != nil {
		if IsCode(err, CodeNotFound) {
			return Issued{}, notFound("user")
		}
		return Issued{}, err
	}
	if name == "" {
		name = "admin"
	}
	return s.CreateAPIToken(ctx, Principal{UserID: uid}, name, ttl)
}

// ListTokens lists the caller's live tokens, API tokens and login sessions
// alike, newest first (never their secrets), so a user can see and revoke
// every way into the account.
func (s *Service) ListTokens(ctx context.Context, p Principal) ([]Token, error) {
	api, err := s.store.Tokens(ctx, p.UserID, TokenAPI)
	if err != nil {
		return nil, err
	}
	sessions, err := s.store.Tokens(ctx, p.UserID, TokenSession)
	if err != nil {
		return nil, err
	}
	all := append(api, sessions...)
	slices.SortStableFunc(all, func(a, b Token) int { return b.CreatedAt.Compare(a.CreatedAt) })
	return all, nil
}

// RevokeToken revokes one of the caller's tokens and ends its streams.
func (s *Service) RevokeToken(ctx context.Context, p Principal, tokenID string) error {
	if err := s.store.RevokeToken(ctx, p.UserID, tokenID, Now()); err != nil {
		if IsCode(err, CodeNotFound) {
			return notFound("token")
		}
		return err
	}
	s.revoked(ctx, tokenID)
	s.endStreams(ctx, p.UserID, tokenID)
	return nil
}

// Ticket is a single-use credential for opening one event stream, for
// cross-origin EventSource, which cannot send headers: a long-lived token in
// a URL would end up in proxy logs.
type Ticket struct {
	Secret    string
	ExpiresAt time.Time
}

// CreateTicket issues a stream ticket bound to the caller's token.
func (s *Service) CreateTicket(ctx context.Context, p Principal) (Ticket, error) {
	secret, hash := newSecret()
	exp := Now().Add(s.cfg.TicketTTL)
	if err := s.store.CreateTicket(ctx, hash, p, exp); err != nil {
		return Ticket{}, err
	}
	return Ticket{Secret: secret, ExpiresAt: exp}, nil
}

// RedeemTicket consumes a ticket; the stream then lives as long as the token
// that created it.
func (s *Service) RedeemTicket(ctx context.Context, secret string) (Principal, error) {
	if !strings.HasPrefix(secret, tokenPrefix) || len(secret) > 128 {
		return Principal{}, Errorf(CodeUnauthorized, "invalid ticket")
	}
	p, err := s.store.ConsumeTicket(ctx, hashSecret(secret), Now())
	if err != nil {
		if IsCode(err, CodeNotFound) {
			return Principal{}, Errorf(CodeUnauthorized, "invalid or used ticket")
		}
		return Principal{}, err
	}
	if ok, err := s.tokenAlive(ctx, p); err != nil || !ok {
		return Principal{}, Errorf(CodeUnauthorized, "the ticket's token was revoked")
	}
	return p, nil
}

// Me returns the caller's account.
func (s *Service) Me(ctx context.Context, p Principal) (User, error) {
	return s.store.User(ctx, p.UserID)
}

// UpdateMe changes the caller's display name.
func (s *Service) UpdateMe(ctx context.Context, p Principal, displayName string) (User, error) {
	var v Validation
	validateDisplayName(&v, displayName)
	if strings.TrimSpace(displayName) == "" {
		v.Add("display_name", "must not be empty")
	}
	if err := v.Err(); err != nil {
		return User{}, err
	}
	return s.store.UpdateUser(ctx, p.UserID, displayName)
}

// GetUser returns a user's public profile.
func (s *Service) GetUser(ctx context.Context, uid string) (User, error) {
	u, err := s.store.User(ctx, uid)
	if IsCode(err, CodeNotFound) {
		return User{}, notFound("user")
	}
	return u, err
}

// The token cache.
//
// Without it every request costs a PostgreSQL query (TokenByHash) just to
// learn who is calling, which under load is a large share of both imd's and
// PostgreSQL's CPU. Each node keeps the live tokens it has read, by secret
// hash, and answers from memory for up to Config.TokenCacheTTL.
//
// Revocation stays effective:
//
//   - on the node that revokes, at once: RevokeToken and Logout drop the
//     entry after the store committed the revocation;
//   - on the other nodes, as soon as the bus carries the news: the revoking
//     node broadcasts the token id to every node (Bus.Broadcast on
//     TopicTokens, before it ends the token's streams), and every node's
//     cache applies what its Listen subscription to that topic received
//     before it answers any request from the cache. So a client that has
//     seen its stream end is refused by every node;
//   - worst case, when that message is lost (Redis unreachable while
//     revoking, or the Pub/Sub connection dropping while it is in flight):
//     Config.TokenCacheTTL, DefaultTokenCacheTTL = 5 s. Every cached entry
//     comes from a store read that began at most that long ago, so a
//     revocation committed before then is seen by the next request. A
//     Pub/Sub reconnect also empties the cache (the bus wakes every
//     subscription after one, as whatever was published meanwhile is lost),
//     as does a Listen subscription that fell behind, and until the node is
//     listening at all nothing is cached.
//
// A read that raced with an invalidation is not cached (generation check),
// so a slow read from before the commit cannot put a revoked token back.
// Expiry is checked on every request against the cached expires_at.
// Negative answers (unknown, revoked, expired) are not cached: they go to
// the store every time, as before.

// tokenCacheMax bounds the cache's memory (~300 bytes an entry): more live
// tokens than one node serves at once.
const tokenCacheMax = 100_000

// Live tokens are read again in bulk before they expire.
//
// An entry answers for TokenCacheTTL; then the next request with its token
// read it again (TokenByHash). So a node read every token in use once per
// TTL, each on a request's path: in `dm` ~110 reads a second (of ~770
// PostgreSQL transactions), ~4 % of imd's CPU, and on a node with 100,000
// clients it would be 20,000.
// Instead, every TTL/4 the node reads again the tokens that answered a
// request since their last read and are at least TTL/2 old, in one query
// per tokenRefreshBatch (TokensByID), and renews their entries
// (refreshTokens). A renewed entry comes from a read that began at most
// TTL ago, as any entry does, so revocation holds as above; a read that
// raced with an invalidation renews nothing (generation check), and a
// token the read finds revoked, expired or gone is dropped at once.
// Entries nobody used age out as before.
const tokenRefreshBatch = 1000

// tokenDrainEvery is how often an idle node applies revocations from the
// bus; requests apply them first anyway. It keeps the subscription's
// bounded buffer from overflowing on a node that serves no requests.
const tokenDrainEvery = 100 * time.Millisecond

type cachedToken struct {
	tok     Token
	p       Principal
	read    time.Time    // when the store read began (monotonic)
	touched atomic.Int64 // unix nanos of the last last_used_at write seen or made
	used    atomic.Bool  // a request was answered from this entry
}

type tokenCache struct {
	ttl time.Duration // <= 0: nothing is cached

	// watch is the live subscription to the token revocations (Bus.Listen,
	// TopicTokens), nil while there is none: then nothing is cached, and
	// every request reads the store.
	watch atomic.Pointer[tokenWatch]

	mu      sync.RWMutex
	entries map[[32]byte]*cachedToken
	byID    map[string][32]byte // token id → secret hash, for revocation by id
	gen     uint64              // bumped by every invalidation, under mu
}

type tokenWatch struct {
	sub    NodeSubscription
	events <-chan StreamEvent
}

func newTokenCache(ttl time.Duration) *tokenCache {
	return &tokenCache{ttl: ttl, entries: map[[32]byte]*cachedToken{}, byID: map[string][32]byte{}}
}

// get returns a fresh entry for hash, nil if none (or not caching).
func (c *tokenCache) get(hash [32]byte) *cachedToken {
	w := c.watch.Load()
	if w == nil {
		return nil
	}
	if len(w.events) > 0 {
		c.drain(w)
	}
	c.mu.RLock()
	e := c.entries[hash]
	c.mu.RUnlock()
	if e == nil || time.Since(e.read) >= c.ttl {
		return nil
	}
	return e
}

// begin is called before a store read: the generation to pass to put, and
// the time the entry's age counts from.
func (c *tokenCache) begin() (uint64, time.Time) {
	c.mu.RLock()
	defer c.mu.RUnlock()
	return c.gen, time.Now()
}

// put caches e unless an invalidation happened since begin returned gen
// (the read may predate a revocation) or the node is not listening.
func (c *tokenCache) put(hash [32]byte, e *cachedToken, gen uint64) {
	if c.watch.Load() == nil {
		return
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.gen != gen {
		return
	}
	if len(c.entries) >= tokenCacheMax {
		c.evict()
	}
	if old, ok := c.entries[hash]; ok && old.tok.ID != e.tok.ID {
		delete(c.byID, old.tok.ID)
	}
	c.entries[hash] = e
	c.byID[e.tok.ID] = hash
}

// evict makes room: stale entries first, then a random tenth (map order).
func (c *tokenCache) evict() {
	for h, e := range c.entries {
		if time.Since(e.read) >= c.ttl {
			c.remove(h, e)
		}
	}
	for h, e := range c.entries {
		if len(c.entries) < tokenCacheMax*9/10 {
			break
		}
		c.remove(h, e)
	}
}

func (c *tokenCache) remove(h [32]byte, e *cachedToken) {
	delete(c.entries, h)
	if c.byID[e.tok.ID] == h {
		delete(c.byID, e.tok.ID)
	}
}

// due returns the ids of the entries that answered a request since their
// read and are at least age old.
func (c *tokenCache) due(age time.Duration) []string {
	c.mu.RLock()
	defer c.mu.RUnlock()
	var ids []string
	for _, e := range c.entries {
		if e.used.Load() && time.Since(e.read) >= age {
			ids = append(ids, e.tok.ID)
		}
	}
	return ids
}

// renew replaces the entries of ids with toks, the store's answer to a read
// that began at read, when gen (from begin) is still current: live tokens
// get a fresh entry, the others (revoked, expired, gone) none.
func (c *tokenCache) renew(ids []string, toks []Token, gen uint64, read time.Time) {
	if c.watch.Load() == nil {
		return
	}
	byID := make(map[string]Token, len(toks))
	for _, t := range toks {
		byID[t.ID] = t
	}
	now := Now()
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.gen != gen {
		return // the read may predate an invalidation: the entries age out
	}
	for _, id := range ids {
		h, ok := c.byID[id]
		if !ok {
			continue
		}
		old := c.entries[h]
		t, ok := byID[id]
		if !ok || t.RevokedAt != nil || (t.ExpiresAt != nil && !now.Before(*t.ExpiresAt)) {
			c.remove(h, old)
			continue
		}
		e := &cachedToken{tok: t, p: Principal{UserID: t.UserID, TokenID: t.ID}, read: read}
		touched := old.touched.Load()
		if t.LastUsedAt != nil {
			touched = max(touched, t.LastUsedAt.UnixNano())
		}
		e.touched.Store(touched)
		c.entries[h] = e
	}
}

// invalidate drops a token by id; callers hold no lock.
func (c *tokenCache) invalidate(tokenID string) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.invalidateLocked(tokenID)
}

func (c *tokenCache) invalidateLocked(tokenID string) {
	c.gen++
	if h, ok := c.byID[tokenID]; ok {
		delete(c.byID, tokenID)
		delete(c.entries, h)
	}
}

// flush drops everything: revocations may have been missed.
func (c *tokenCache) flush() {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.gen++
	clear(c.entries)
	clear(c.byID)
}

// drain applies every revocation waiting in w. Events are taken off the
// channel only under mu, so a request that finds the channel empty cannot
// overtake a revocation that another goroutine has taken but not applied.
// It reports false when the subscription's events were closed (it fell
// behind and lost some): the cache is then emptied and stops caching.
func (c *tokenCache) drain(w *tokenWatch) bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	for {
		select {
		case ev, ok := <-w.events:
			if !ok {
				c.watch.CompareAndSwap(w, nil)
				c.gen++
				clear(c.entries)
				clear(c.byID)
				return false
			}
			var id string
			if ev.Type == eventEndToken && json.Unmarshal(ev.Data, &id) == nil {
				c.invalidateLocked(id)
			}
		default:
			return true
		}
	}
}

// revoked makes a committed revocation effective in every node's cache:
// here at once, elsewhere when the bus delivers it (TokenCacheTTL at worst).
func (s *Service) revoked(ctx context.Context, tokenID string) {
	s.tokens.invalidate(tokenID)
	ev := StreamEvent{Type: eventEndToken, Data: json.RawMessage(quote(tokenID))}
	if err := s.rt.Broadcast(ctx, TopicTokens, ev); err != nil {
		s.log.Warn("broadcast token revocation", "err", err)
	}
}

// watchRevocations keeps the node listening to the token revocations
// (TopicTokens) until ctx ends; the cache is in use only while it is.
func (s *Service) watchRevocations(ctx context.Context) {
	if s.tokens.ttl <= 0 {
		return
	}
	done := make(chan struct{})
	defer func() { <-done }()
	go func() {
		defer close(done)
		s.refreshTokens(ctx)
	}()
	s.listen(ctx, TopicTokens, tokenDrainEvery, s.followRevocations)
}

// refreshTokens reads the cache's due entries again, every TTL/4, until ctx
// ends (see tokenRefreshBatch).
func (s *Service) refreshTokens(ctx context.Context) {
	c := s.tokens
	t := time.NewTicker(max(c.ttl/4, time.Millisecond))
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		for ids := range slices.Chunk(c.due(c.ttl/2), tokenRefreshBatch) {
			gen, read := c.begin()
			toks, err := s.store.TokensByID(ctx, ids)
			if err != nil {
				s.log.Debug("refresh tokens", "err", err)
				break // the entries age out; requests read them one by one
			}
			c.renew(ids, toks, gen, read)
		}
	}
}

// listen keeps a Listen subscription to topic until ctx ends: serve has
// each one until it returns (it lost events, or ctx ended); a Listen that
// fails is retried after first, then twice as long each time up to 5 s.
func (s *Service) listen(ctx context.Context, topic Topic, first time.Duration, serve func(context.Context, NodeSubscription)) {
	backoff := first
	for ctx.Err() == nil {
		sub, err := s.rt.Listen(ctx, topic)
		if err != nil {
			s.log.Warn("listen for node events", "topic", topic, "err", err)
			t := time.NewTimer(backoff)
			select {
			case <-ctx.Done():
			case <-t.C:
			}
			t.Stop()
			backoff = min(2*backoff, 5*time.Second)
			continue
		}
		backoff = first
		serve(ctx, sub)
		sub.Close()
	}
}

// followRevocations serves one subscription until ctx ends or it loses
// events.
func (s *Service) followRevocations(ctx context.Context, sub NodeSubscription) {
	c := s.tokens
	w := &tokenWatch{sub: sub, events: sub.Events()}
	c.flush() // nothing is cached before this, but be plain about it
	c.watch.Store(w)
	defer func() {
		c.watch.CompareAndSwap(w, nil)
		c.flush()
	}()
	tick := time.NewTicker(tokenDrainEvery)
	defer tick.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-sub.Wake():
			// After a Pub/Sub reconnect: whatever was published meanwhile is lost.
			c.flush()
		case <-tick.C:
			if !c.drain(w) {
				return
			}
		}
	}
}
