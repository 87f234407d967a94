package chat

import (
	"context"
	"crypto/rand"
	"crypto/sha256"
	"crypto/subtle"
	"encoding/base64"
	"regexp"
	"slices"
	"strings"
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

// dummyHash makes a login for an unknown user cost as much as a real one, so
// response times do not reveal which usernames exist.
var dummyHash string

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
	hash := u.PasswordHash
	if hash == "" {
		if dummyHash == "" {
			dummyHash, _ = s.hasher.Hash("imd-dummy-password")
		}
		hash = dummyHash
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

// touchEvery bounds last_used_at writes to one per token per minute.
const touchEvery = time.Minute

// Authenticate resolves a bearer token (or session cookie) to a principal.
func (s *Service) Authenticate(ctx context.Context, secret string) (Principal, error) {
	if !strings.HasPrefix(secret, tokenPrefix) || len(secret) > 128 {
		return Principal{}, Errorf(CodeUnauthorized, "invalid token")
	}
	t, err := s.store.TokenByHash(ctx, hashSecret(secret))
	if err != nil {
		if IsCode(err, CodeNotFound) {
			return Principal{}, Errorf(CodeUnauthorized, "invalid token")
		}
		return Principal{}, err
	}
	now := Now()
	if t.RevokedAt != nil || (t.ExpiresAt != nil && !now.Before(*t.ExpiresAt)) {
		return Principal{}, Errorf(CodeUnauthorized, "token expired or revoked")
	}
	if t.LastUsedAt == nil || now.Sub(*t.LastUsedAt) > touchEvery {
		if err := s.store.TouchToken(ctx, t.ID, now); err != nil {
			s.log.Debug("touch token", "err", err)
		}
	}
	return Principal{UserID: t.UserID, TokenID: t.ID}, nil
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
