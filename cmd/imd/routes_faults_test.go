package main

import (
	"net/http"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"imd/internal/testenv"
)

// faultTimeout bounds every request made while a dependency is down: an
// answer slower than this fails the request (and the test) instead of a
// timed assertion; "fast" means well within it.
const faultTimeout = 5 * time.Second

// fast returns u's client with a short timeout.
func fast(u user) user {
	c := u.as(u.Token)
	c.hc = &http.Client{Timeout: faultTimeout}
	return user{ID: u.ID, Token: u.Token, client: c}
}

type health struct {
	Status string            `json:"status"`
	Checks map[string]string `json:"checks"`
}

func readyz(t *testing.T, c *client) (int, health) {
	t.Helper()
	r := c.do("GET", "/readyz", nil)
	var h health
	r.JSON(t, &h)
	return r.Status, h
}

// TestRoutesServicesPostgresDown (G6): with PostgreSQL unreachable, sends and reads
// answer 503 unavailable fast (within the client timeout) and readiness
// names postgres; once it is back, sends work again and history holds
// exactly the acknowledged messages.
func TestRoutesServicesPostgresDown(t *testing.T) {
	t.Parallel()
	c := newCluster(t)
	proxy := testenv.NewProxy(t, apiHostPort(t, c.dbURL))
	c.dbURL = apiWithHost(t, c.dbURL, proxy.Addr())
	srv := c.start(t, nodeOpts{})
	alice := fast(register(t, srv.URL, "alice"))
	register(t, srv.URL, "bob")
	cid := apiGroup(t, alice, "pg", "bob")
	apiSend(t, alice, cid, "before")
	anon := newClient(t, srv.URL, "")
	anon.hc = &http.Client{Timeout: faultTimeout}

	proxy.Down()
	msgs := path("/v1/conversations/%s/messages", cid)
	for i, h := range [][]string{nil, {"Idempotency-Key", "down-1"}, nil} {
		r := alice.do("POST", msgs, map[string]any{"text": "during " + strconv.Itoa(i)}, h...)
		r.Problem(t, 503, "unavailable")
		require.NotEmpty(t, r.Header.Get("Retry-After"))
	}
	alice.do("POST", "/v1/users/bob/messages", map[string]any{"text": "during"}).Problem(t, 503, "unavailable")
	alice.do("GET", msgs, nil).Problem(t, 503, "unavailable")
	alice.do("GET", "/v1/conversations", nil).Problem(t, 503, "unavailable")
	anon.do("POST", "/v1/auth/login", map[string]any{"username": "alice", "password": "password-alice"}).Problem(t, 503, "unavailable")
	status, h := readyz(t, anon)
	require.Equal(t, 503, status)
	require.Equal(t, health{Status: "unavailable", Checks: map[string]string{"postgres": "unavailable", "redis": "ok"}}, h)
	require.Equal(t, 200, anon.do("GET", "/healthz", nil).Status, "the process is alive")

	proxy.Up()
	testenv.Eventually(t, 10*time.Second, func() bool {
		s, _ := readyz(t, anon)
		return s == 200
	}, "ready again after PostgreSQL returned")
	after := apiSend(t, alice, cid, "after")
	require.EqualValues(t, 2, after.Seq, "no seq was consumed while down")
	// The key used while down was never stored: it is free.
	r := alice.do("POST", msgs, map[string]any{"text": "keyed"}, "Idempotency-Key", "down-1")
	require.Equal(t, 201, r.Status, "%s", r.Body)
	pg := apiHistory(t, alice, cid, "")
	require.Equal(t, []int64{1, 2, 3}, apiSeqs(pg.Messages))
	require.Equal(t, []string{"before", "after", "keyed"}, []string{pg.Messages[0].Text, pg.Messages[1].Text, pg.Messages[2].Text})
	require.Len(t, apiConvList(t, alice, "").Conversations, 1, "the direct send while down opened nothing")
}

// TestRoutesServicesRedisDown (G6): with Redis unreachable, sends still succeed
// (201, fast), idempotency and reads work from PostgreSQL, and readiness
// answers 503 naming redis; once it is back, readiness is 200 and nothing
// acknowledged is missing.
func TestRoutesServicesRedisDown(t *testing.T) {
	t.Parallel()
	c := newCluster(t)
	proxy := testenv.NewProxy(t, apiHostPort(t, c.redisURL))
	c.redisURL = apiWithHost(t, c.redisURL, proxy.Addr())
	srv := c.start(t, nodeOpts{})
	alice := fast(register(t, srv.URL, "alice"))
	bob := fast(register(t, srv.URL, "bob"))
	cid := apiGroup(t, alice, "redis", "bob")
	apiSend(t, alice, cid, "before")
	anon := newClient(t, srv.URL, "")
	anon.hc = &http.Client{Timeout: faultTimeout}
	status, _ := readyz(t, anon)
	require.Equal(t, 200, status)

	proxy.Down()
	m2 := apiSend(t, alice, cid, "during 1", "Idempotency-Key", "r-1")
	require.EqualValues(t, 2, m2.Seq)
	r := alice.do("POST", path("/v1/conversations/%s/messages", cid), map[string]any{"text": "during 1"}, "Idempotency-Key", "r-1")
	require.Equal(t, 200, r.Status, "%s", r.Body)
	require.Equal(t, m2.ID, r.M(t)["id"])
	require.EqualValues(t, 3, apiSend(t, bob, cid, "during 2").Seq)
	r = alice.do("POST", "/v1/users/bob/messages", map[string]any{"text": "direct during"})
	require.Equal(t, 201, r.Status, "%s", r.Body)
	dm := r.M(t)["conversation_id"].(string)
	require.Equal(t, []int64{1, 2, 3}, apiSeqs(apiHistory(t, bob, cid, "").Messages))
	require.ElementsMatch(t, []string{cid, dm}, apiConvIDs(apiConvList(t, bob, "").Conversations))
	require.EqualValues(t, 1, apiConv(t, alice, cid).UnreadCount, "bob's message")
	require.EqualValues(t, 0, apiConv(t, bob, cid).UnreadCount, "bob's send read the rest")
	require.Equal(t, 200, anon.do("POST", "/v1/auth/login", map[string]any{"username": "bob", "password": "password-bob"}).Status)
	status, h := readyz(t, anon)
	require.Equal(t, 503, status)
	require.Equal(t, health{Status: "unavailable", Checks: map[string]string{"postgres": "ok", "redis": "unavailable"}}, h)

	proxy.Up()
	testenv.Eventually(t, 15*time.Second, func() bool {
		s, _ := readyz(t, anon)
		return s == 200
	}, "ready again after Redis returned")
	require.EqualValues(t, 4, apiSend(t, alice, cid, "after").Seq)
	require.Equal(t, []int64{1, 2, 3, 4}, apiSeqs(apiHistory(t, bob, cid, "").Messages))
	require.Equal(t, []string{cid, dm}, apiConvIDs(apiConvList(t, alice, "").Conversations))
	require.Equal(t, []string{cid, dm}, apiConvIDs(apiConvList(t, bob, "").Conversations))
}

// TestRoutesProblemDocuments: errors outside the operations (unknown route,
// wrong method) are problem documents with a code too, never text/plain.
func TestRoutesProblemDocuments(t *testing.T) {
	t.Parallel()
	srv := startServer(t)
	alice := register(t, srv.URL, "alice")
	alice.do("GET", "/v1/nope", nil).Problem(t, 404, "not_found")
	newClient(t, srv.URL, "").do("GET", "/nope", nil).Problem(t, 404, "not_found")
	r := alice.do("DELETE", "/v1/me", nil)
	require.Equal(t, 405, r.Status, "%s", r.Body)
	require.Equal(t, "application/problem+json", r.Header.Get("Content-Type"))
	p := r.M(t)
	require.EqualValues(t, 405, p["status"])
	require.NotEmpty(t, p["code"])
	require.Equal(t, "GET, PATCH", r.Header.Get("Allow"), "a 405 lists the allowed methods (RFC 9110)")
}

// TestRoutesBodyLimit: every route with a JSON body answers 413
// payload_too_large (a problem document) for a 70 KiB body, before
// authentication, and stores nothing.
func TestRoutesBodyLimit(t *testing.T) {
	t.Parallel()
	srv := startServer(t)
	alice := register(t, srv.URL, "alice")
	register(t, srv.URL, "bob")
	cid := apiGroup(t, alice, "big", "bob")
	apiSend(t, alice, cid, "one")
	huge := `{"text":"` + strings.Repeat("a", 70<<10) + `"}`
	for _, rt := range []struct{ method, path, token string }{
		{"POST", "/v1/auth/register", ""},
		{"POST", "/v1/auth/login", ""},
		{"POST", "/v1/auth/tokens", alice.Token},
		{"POST", "/v1/admin/users", testAdminToken},
		{"POST", "/v1/admin/users/alice/tokens", testAdminToken},
		{"PATCH", "/v1/me", alice.Token},
		{"POST", "/v1/conversations", alice.Token},
		{"PATCH", path("/v1/conversations/%s", cid), alice.Token},
		{"POST", path("/v1/conversations/%s/members", cid), alice.Token},
		{"PATCH", path("/v1/conversations/%s/members/bob", cid), alice.Token},
		{"POST", path("/v1/conversations/%s/messages", cid), alice.Token},
		{"POST", "/v1/users/bob/messages", alice.Token},
		{"PUT", path("/v1/conversations/%s/read", cid), alice.Token},
		{"POST", path("/v1/conversations/%s/messages", cid), ""},
	} {
		newClient(t, srv.URL, rt.token).do(rt.method, rt.path, huge).Problem(t, 413, "payload_too_large")
	}
	require.EqualValues(t, 1, apiConv(t, alice, cid).LastSeq)
	require.Len(t, apiConvList(t, alice, "").Conversations, 1)
}

// TestRoutesPathParams: a malformed id in the path is a 400 naming the
// parameter (it cannot name anything that exists). Each case runs as its
// own subtest: openapi.yaml does not declare 400 on all of these routes,
// and the client's validation reports each gap there.
func TestRoutesPathParams(t *testing.T) {
	t.Parallel()
	srv := startServer(t)
	alice := register(t, srv.URL, "alice")
	register(t, srv.URL, "bob")
	cid := apiGroup(t, alice, "p", "bob")
	long := strings.Repeat("c", 65)
	for _, tc := range []struct {
		name, method, path, field string
		body                      any
	}{
		{"getUser", "GET", "/v1/users/Bad!Name", "userId", nil},
		{"listMessages", "GET", path("/v1/conversations/%s/messages", long), "conversationId", nil},
		{"getConversation", "GET", path("/v1/conversations/%s", long), "conversationId", nil},
		{"sendTyping", "POST", path("/v1/conversations/%s/typing", long), "conversationId", nil},
		{"removeMember", "DELETE", path("/v1/conversations/%s/members/Bad!Name", cid), "userId", nil},
		{"revokeToken", "DELETE", path("/v1/auth/tokens/%s", long), "tokenId", nil},
	} {
		t.Run(tc.name, func(t *testing.T) {
			requireInvalid(t, newClient(t, srv.URL, alice.Token).do(tc.method, tc.path, tc.body), tc.field)
		})
	}
}
