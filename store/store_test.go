package store_test

import (
	"context"
	"net"
	"net/url"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"imd/chat"
	"imd/internal/testenv"
	"imd/store"
	"imd/store/storetest"
)

// testMaxConns keeps parallel tests (and other packages' tests sharing the
// server) well within PostgreSQL's max_connections, while still letting the
// concurrency tests race on several connections.
const testMaxConns = 10

func testCtx(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	t.Cleanup(cancel)
	return ctx
}

// openStore opens a store on url, closed when the test ends (before the
// schema is dropped, since DatabaseURL registered its cleanup first).
func openStore(t *testing.T, url string) *store.Store {
	t.Helper()
	s, err := store.Open(testCtx(t), url)
	require.NoError(t, err)
	s.DB().SetMaxOpenConns(testMaxConns)
	t.Cleanup(func() { _ = s.Close() })
	return s
}

func newStore(t *testing.T) *store.Store {
	t.Helper()
	s := openStore(t, testenv.DatabaseURL(t))
	require.NoError(t, s.Migrate(testCtx(t)))
	return s
}

func TestConformance(t *testing.T) {
	storetest.Run(t, func(t *testing.T) chat.Store { return newStore(t) })
}

// Nodes starting together all migrate: they must take turns, not fail.
func TestMigrateConcurrently(t *testing.T) {
	t.Parallel()
	url := testenv.DatabaseURL(t)
	a, b := openStore(t, url), openStore(t, url)
	ctx := testCtx(t)
	var wg sync.WaitGroup
	var errA, errB error
	wg.Go(func() { errA = a.Migrate(ctx) })
	wg.Go(func() { errB = b.Migrate(ctx) })
	wg.Wait()
	require.NoError(t, errA)
	require.NoError(t, errB)
	require.NoError(t, a.Migrate(ctx), "and again, with nothing pending")
	require.NoError(t, a.CreateUser(ctx, chat.User{ID: "u", DisplayName: "U", CreatedAt: chat.Now()}))
}

// PostgreSQL unreachable: fail fast with CodeUnavailable (the HTTP layer's 503).
func TestOpenUnreachable(t *testing.T) {
	t.Parallel()
	ctx := testCtx(t)
	start := time.Now()
	_, err := store.Open(ctx, "postgres://postgres@127.0.0.1:1/postgres?sslmode=disable&connect_timeout=5")
	require.Error(t, err)
	require.Equal(t, chat.CodeUnavailable, chat.ErrorCode(err), "%v", err)
	require.Less(t, time.Since(start), 5*time.Second, "refused connections fail fast")
}

// G6 at the store: PostgreSQL going away makes sends fail fast as
// unavailable with nothing half-stored, and the pool recovers by itself when
// it is back. A proxy takes the database away from this test only.
func TestDatabaseDownAndBack(t *testing.T) {
	t.Parallel()
	ctx := testCtx(t)
	dsn := testenv.DatabaseURL(t)
	proxy := testenv.NewProxy(t, hostPort(t, dsn))
	s := openStore(t, viaProxy(t, dsn, proxy.Addr()))
	require.NoError(t, s.Migrate(ctx))
	for _, id := range []string{"ann", "bob"} {
		require.NoError(t, s.CreateUser(ctx, chat.User{ID: id, DisplayName: id, CreatedAt: chat.Now()}))
	}
	_, _, err := s.CreateGroup(ctx, chat.NewGroup{ID: "g", Title: "G", OwnerID: "ann", MemberIDs: []string{"bob"}, CreatedAt: chat.Now()})
	require.NoError(t, err)
	send := func(key string) (chat.Message, error) {
		m, _, _, err := s.Send(ctx, chat.NewMessage{ID: "m-" + key, ConversationID: "g", SenderID: "ann",
			Text: "hi " + key, ClientMsgID: key, CreatedAt: chat.Now()})
		return m, err
	}
	m, err := send("1")
	require.NoError(t, err)
	require.Equal(t, int64(1), m.Seq)

	proxy.Down()
	start := time.Now()
	_, err = send("2")
	require.Equal(t, chat.CodeUnavailable, chat.ErrorCode(err), "%v", err)
	require.Less(t, time.Since(start), 5*time.Second, "fails fast")
	require.Equal(t, chat.CodeUnavailable, chat.ErrorCode(s.Ping(ctx)))

	proxy.Up()
	testenv.Eventually(t, 10*time.Second, func() bool { return s.Ping(ctx) == nil }, "the pool reconnects")
	m, err = send("2") // the client's retry
	require.NoError(t, err)
	require.Equal(t, int64(2), m.Seq, "the failed send consumed no seq")
	ms, _, err := s.Messages(ctx, "g", chat.HistoryQuery{})
	require.NoError(t, err)
	require.Len(t, ms, 2)
}

func TestClosedPoolIsUnavailable(t *testing.T) {
	t.Parallel()
	s := newStore(t)
	ctx := testCtx(t)
	require.NoError(t, s.CreateUser(ctx, chat.User{ID: "u", DisplayName: "U", CreatedAt: chat.Now()}))
	require.NoError(t, s.Ping(ctx))
	require.NoError(t, s.Close())

	_, _, _, err := s.Send(ctx, chat.NewMessage{ID: "m", ConversationID: "c", SenderID: "u", Text: "x", CreatedAt: chat.Now()})
	require.Equal(t, chat.CodeUnavailable, chat.ErrorCode(err), "%v", err)
	_, err = s.User(ctx, "u")
	require.Equal(t, chat.CodeUnavailable, chat.ErrorCode(err), "%v", err)
	require.Equal(t, chat.CodeUnavailable, chat.ErrorCode(s.Ping(ctx)))
}

func TestErrorMessages(t *testing.T) {
	t.Parallel()
	s := newStore(t)
	ctx := testCtx(t)
	u := chat.User{ID: "taken", DisplayName: "T", CreatedAt: chat.Now()}
	require.NoError(t, s.CreateUser(ctx, u))
	err := s.CreateUser(ctx, u)
	require.Equal(t, chat.CodeConflict, chat.ErrorCode(err))
	require.Equal(t, "username is taken", chat.AsError(err).Message)

	// A foreign key names the field, never the constraint.
	err = s.CreateToken(ctx, chat.Token{ID: "t", UserID: "ghost", Kind: chat.TokenAPI, CreatedAt: chat.Now()}, []byte("h"))
	require.Equal(t, chat.CodeInvalid, chat.ErrorCode(err))
	require.Equal(t, "user_id", chat.AsError(err).Fields[0].Field)

	// A check constraint: bad input the domain let through is still a 400.
	err = s.CreateToken(ctx, chat.Token{ID: "t", UserID: "taken", Kind: "weird", CreatedAt: chat.Now()}, []byte("h"))
	require.Equal(t, chat.CodeInvalid, chat.ErrorCode(err))

	// CreateGroup names the unknown users.
	_, _, err = s.CreateGroup(ctx, chat.NewGroup{ID: "g", Title: "G", OwnerID: "taken",
		MemberIDs: []string{"nobody", "noone"}, CreatedAt: chat.Now()})
	require.Equal(t, chat.CodeInvalid, chat.ErrorCode(err))
	require.Contains(t, chat.AsError(err).Message, "nobody, noone")
}

// Values read back are UTC with millisecond precision, equal to what the
// caller stored (chat.Now), whatever the session's time zone.
func TestTimesReadBackInUTC(t *testing.T) {
	t.Parallel()
	s := openStore(t, withParam(t, testenv.DatabaseURL(t), "timezone", "America/New_York"))
	ctx := testCtx(t)
	require.NoError(t, s.Migrate(ctx))
	now := chat.Now()
	require.NoError(t, s.CreateUser(ctx, chat.User{ID: "u", DisplayName: "U", CreatedAt: now}))
	u, err := s.User(ctx, "u")
	require.NoError(t, err)
	require.Equal(t, now, u.CreatedAt)
	require.Equal(t, time.UTC, u.CreatedAt.Location())
}

// withParam adds a run-time parameter to a connection URL or key=value string.
func withParam(t *testing.T, dsn, key, value string) string {
	t.Helper()
	if !strings.HasPrefix(dsn, "postgres://") && !strings.HasPrefix(dsn, "postgresql://") {
		return dsn + " " + key + "=" + value
	}
	u, err := url.Parse(dsn)
	require.NoError(t, err)
	q := u.Query()
	q.Set(key, value)
	u.RawQuery = q.Encode()
	return u.String()
}

// hostPort returns the "host:port" a connection URL or key=value string points at.
func hostPort(t *testing.T, dsn string) string {
	t.Helper()
	if strings.HasPrefix(dsn, "postgres://") || strings.HasPrefix(dsn, "postgresql://") {
		u, err := url.Parse(dsn)
		require.NoError(t, err)
		host, port := u.Hostname(), u.Port()
		if port == "" {
			port = "5432"
		}
		return net.JoinHostPort(host, port)
	}
	host, port := "localhost", "5432"
	for _, kv := range strings.Fields(dsn) {
		k, v, _ := strings.Cut(kv, "=")
		switch k {
		case "host":
			host = v
		case "port":
			port = v
		}
	}
	return net.JoinHostPort(host, port)
}

// viaProxy points dsn at addr instead.
func viaProxy(t *testing.T, dsn, addr string) string {
	t.Helper()
	host, port, err := net.SplitHostPort(addr)
	require.NoError(t, err)
	if strings.HasPrefix(dsn, "postgres://") || strings.HasPrefix(dsn, "postgresql://") {
		u, err := url.Parse(dsn)
		require.NoError(t, err)
		u.Host = addr
		return u.String()
	}
	return dsn + " host=" + host + " port=" + port // later keys win
}
