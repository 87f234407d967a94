package main

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"maps"
	"net/http"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/getkin/kin-openapi/openapi3"
	"github.com/getkin/kin-openapi/openapi3filter"
	"github.com/getkin/kin-openapi/routers"
	"github.com/getkin/kin-openapi/routers/gorillamux"
	"github.com/redis/go-redis/v9"
	"github.com/stretchr/testify/require"

	"imd/chat"
	"imd/handlers"
	"imd/internal/testenv"
)

// testAdminToken is the admin token every test server is started with.
const testAdminToken = "test-admin-token"

// Test modes. IMD_TEST_MODE picks what the end-to-end tests run against:
//
//   - services (the default): PostgreSQL and Redis, a fresh schema and key
//     prefix per cluster (internal/testenv);
//   - embedded: what imd runs with DATABASE_URL and REDIS_URL unset, SQLite
//     in a per-cluster data directory (t.TempDir) and in-memory real-time
//     state.
//
// Tests that need PostgreSQL or Redis themselves (several distinct nodes,
// a proxy between a node and a service, Redis keys) have "Services" in their
// name, or in a subtest's name; scripts/test runs this package a second time
// with IMD_TEST_MODE=embedded and -skip 'Services|/Services', so they are not
// part of that run (rather than skipped inside it: a skip proves nothing).
const (
	modeServices = "services"
	modeEmbedded = "embedded"
)

// testMode is IMD_TEST_MODE, checked.
func testMode(tb testing.TB) string {
	tb.Helper()
	switch m := os.Getenv("IMD_TEST_MODE"); m {
	case "", modeServices:
		return modeServices
	case modeEmbedded:
		return modeEmbedded
	default:
		tb.Fatalf("IMD_TEST_MODE=%q: want %s or %s", m, modeServices, modeEmbedded)
		return ""
	}
}

// embeddedMode reports whether the tests run in the embedded mode.
func embeddedMode(tb testing.TB) bool { return testMode(tb) == modeEmbedded }

// testModeEnv is the environment that points a node at the test's own
// storage in the current mode: a fresh schema and key prefix (services), or
// a fresh data directory with DATABASE_URL and REDIS_URL unset (embedded).
func testModeEnv(tb testing.TB) map[string]string {
	tb.Helper()
	if embeddedMode(tb) {
		return map[string]string{"DATABASE_URL": "", "REDIS_URL": "", "IMD_REDIS_PREFIX": "", "IMD_DATA_DIR": tb.TempDir()}
	}
	return map[string]string{"DATABASE_URL": testenv.DatabaseURL(tb), "REDIS_URL": testenv.RedisURL(tb),
		"IMD_REDIS_PREFIX": testenv.KeyPrefix(tb), "IMD_DATA_DIR": tb.TempDir()}
}

// cluster is a set of imd nodes sharing one PostgreSQL schema and one Redis
// key prefix: what several processes behind a load balancer look like.
//
// In the embedded mode a cluster is ONE node on one data directory (a second
// process would be refused): start returns that node again when asked for
// another one with the same options, so tests written across nodes check
// the same guarantees on the one node. Asking for a different node (other
// hooks or environment) while it runs fails the test: such a test needs
// several nodes and belongs to the services mode (name it …Services…).
type cluster struct {
	dbURL, redisURL, prefix string
	dataDir                 string
	embedded                bool

	only     *node    // embedded mode: the running node
	onlyOpts nodeOpts // and what it was started with

	rdb *redis.Client // services mode: for looking at the cluster's keys (rtSubscribed)
}

func newCluster(t testing.TB) *cluster {
	t.Helper()
	env := testModeEnv(t)
	c := &cluster{dbURL: env["DATABASE_URL"], redisURL: env["REDIS_URL"], prefix: env["IMD_REDIS_PREFIX"],
		dataDir: env["IMD_DATA_DIR"], embedded: embeddedMode(t)}
	if c.embedded {
		// What the nodes will use; tests open it directly (apiDB).
		c.dbURL = "sqlite:" + filepath.Join(c.dataDir, EmbeddedDBFile)
	}
	return c
}

// node is one running server.
type node struct {
	URL    string
	cancel context.CancelFunc
	done   chan error
	subs   *subCounter // the node's real-time subscriptions, per user
	// stopped is set by stop (test goroutine only).
	stopped bool
}

// nodeOpts adjust one node.
type nodeOpts struct {
	env   map[string]string
	hooks chat.Hooks
}

// start runs one more node through run's seam on 127.0.0.1:0 and stops it
// when the test ends. In the embedded mode it may return the running node
// instead (see cluster).
func (c *cluster) start(t testing.TB, o nodeOpts) *node {
	t.Helper()
	if c.embedded && c.only != nil && !c.only.stopped {
		if maps.Equal(o.env, c.onlyOpts.env) && reflect.ValueOf(o.hooks).IsZero() && reflect.ValueOf(c.onlyOpts.hooks).IsZero() {
			return c.only
		}
		t.Fatalf("embedded mode (IMD_TEST_MODE=%s) runs one node per cluster, and this test wants a second, different one "+
			"(other hooks or environment): it needs several nodes, so it is a services-only test: put Services in its name",
			modeEmbedded)
	}
	env := map[string]string{
		"IMD_ADDR":          "127.0.0.1:0",
		"DATABASE_URL":      c.dbURL,
		"REDIS_URL":         c.redisURL,
		"IMD_REDIS_PREFIX":  c.prefix,
		"IMD_DATA_DIR":      c.dataDir,
		"IMD_ADMIN_TOKEN":   testAdminToken,
		"IMD_COOKIE_SECURE": "false",
		"IMD_SEND_RATE":     "0",
		"IMD_LOG_LEVEL":     "error",
	}
	if c.embedded {
		env["DATABASE_URL"], env["REDIS_URL"] = "", "" // unset: SQLite in IMD_DATA_DIR, real-time in memory
	}
	for k, v := range o.env {
		env[k] = v
	}
	n := runNode(t, env, options{hooks: o.hooks})
	if c.embedded {
		c.only, c.onlyOpts = n, o
	}
	return n
}

// runNode runs a server with env and opt (ready and realtime are set here)
// through run's seam, and stops it when the test ends.
func runNode(t testing.TB, env map[string]string, opt options) *node {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	urlc := make(chan string, 1)
	n := &node{cancel: cancel, done: make(chan error, 1), subs: newSubCounter()}
	opt.ready = func(u string) { urlc <- u }
	opt.realtime = n.subs.wrap
	var stderr bytes.Buffer
	var mu sync.Mutex
	go func() {
		n.done <- runWith(ctx, nil, func(k string) string { return env[k] }, io.Discard, &lockedWriter{w: &stderr, mu: &mu},
			opt)
	}()
	select {
	case n.URL = <-urlc:
	case err := <-n.done:
		mu.Lock()
		defer mu.Unlock()
		t.Fatalf("server did not start: %v\n%s", err, stderr.String())
	case <-time.After(30 * time.Second):
		t.Fatal("server did not start within 30s")
	}
	t.Cleanup(func() { n.stop(t) })
	return n
}

// stop shuts the node down gracefully (idempotent).
func (n *node) stop(t testing.TB) {
	n.stopped = true
	n.cancel()
	select {
	case err, ok := <-n.done:
		if ok {
			require.NoError(t, err, "server shutdown")
			close(n.done)
		}
	case <-time.After(20 * time.Second):
		t.Error("server did not shut down within 20s")
	}
}

type lockedWriter struct {
	w  io.Writer
	mu *sync.Mutex
}

func (l *lockedWriter) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.w.Write(p)
}

// startServer is the common case: one node on a fresh schema and prefix
// (services mode) or data directory (embedded mode).
func startServer(t *testing.T) *node {
	return newCluster(t).start(t, nodeOpts{})
}

// specRouter matches requests to openapi.yaml operations for response validation.
var specRouter = sync.OnceValues(func() (routers.Router, error) {
	doc, err := handlers.Spec()
	if err != nil {
		return nil, err
	}
	doc.Servers = nil
	return gorillamux.NewRouter(doc)
})

// client is an HTTP client whose every response is validated against
// openapi.yaml, so the contract cannot drift from the code.
type client struct {
	t     *testing.T
	base  string
	token string
	hc    *http.Client
}

func newClient(t *testing.T, base, token string) *client {
	return &client{t: t, base: base, token: token, hc: &http.Client{Timeout: 30 * time.Second}}
}

// as returns a client for the same server with another token.
func (c *client) as(token string) *client { return newClient(c.t, c.base, token) }

// resp is a decoded response.
type resp struct {
	Status int
	Header http.Header
	Body   []byte
}

// JSON decodes the body into v.
func (r resp) JSON(t *testing.T, v any) {
	t.Helper()
	require.NoError(t, json.Unmarshal(r.Body, v), "body: %s", r.Body)
}

// M decodes the body as a JSON object.
func (r resp) M(t *testing.T) map[string]any {
	t.Helper()
	var m map[string]any
	r.JSON(t, &m)
	return m
}

// Problem decodes a problem+json body and checks its status and code.
func (r resp) Problem(t *testing.T, status int, code string) map[string]any {
	t.Helper()
	require.Equal(t, status, r.Status, "body: %s", r.Body)
	require.Equal(t, "application/problem+json", r.Header.Get("Content-Type"))
	m := r.M(t)
	require.Equal(t, code, m["code"], "body: %s", r.Body)
	require.EqualValues(t, status, m["status"])
	return m
}

// do sends a request. body may be nil, a string (sent raw) or a value (JSON).
func (c *client) do(method, path string, body any, headers ...string) resp {
	c.t.Helper()
	var rd io.Reader
	var raw []byte
	switch b := body.(type) {
	case nil:
	case string:
		raw = []byte(b)
	case []byte:
		raw = b
	default:
		var err error
		raw, err = json.Marshal(b)
		require.NoError(c.t, err)
	}
	if raw != nil {
		rd = bytes.NewReader(raw)
	}
	req, err := http.NewRequest(method, c.base+path, rd)
	require.NoError(c.t, err)
	if raw != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	if c.token != "" {
		req.Header.Set("Authorization", "Bearer "+c.token)
	}
	for i := 0; i+1 < len(headers); i += 2 {
		req.Header.Set(headers[i], headers[i+1])
	}
	res, err := c.hc.Do(req)
	require.NoError(c.t, err)
	defer res.Body.Close()
	out, err := io.ReadAll(res.Body)
	require.NoError(c.t, err)
	validateResponse(c.t, req, raw, res, out)
	return resp{Status: res.StatusCode, Header: res.Header, Body: out}
}

// validateResponse checks a response against the operation's declared
// responses: status, content type, headers and body schema.
func validateResponse(t *testing.T, req *http.Request, reqBody []byte, res *http.Response, body []byte) {
	t.Helper()
	rt, err := specRouter()
	require.NoError(t, err)
	route, params, err := rt.FindRoute(req)
	if err != nil {
		return // not a spec route (404 tests)
	}
	if reqBody != nil {
		req.Body = io.NopCloser(bytes.NewReader(reqBody))
	}
	in := &openapi3filter.ResponseValidationInput{
		RequestValidationInput: &openapi3filter.RequestValidationInput{Request: req, PathParams: params, Route: route,
			Options: &openapi3filter.Options{AuthenticationFunc: openapi3filter.NoopAuthenticationFunc}},
		Status: res.StatusCode, Header: res.Header, Body: io.NopCloser(bytes.NewReader(body)),
		Options: &openapi3filter.Options{IncludeResponseStatus: true, MultiError: true},
	}
	if err := openapi3filter.ValidateResponse(context.Background(), in); err != nil {
		t.Errorf("%s %s -> %d does not match openapi.yaml: %v\nbody: %s", req.Method, req.URL.Path, res.StatusCode, err, body)
	}
}

var _ = openapi3.T{}

// user is a registered account with its token.
type user struct {
	ID    string
	Token string
	*client
}

// register creates a user through the API.
func register(t *testing.T, base, name string) user {
	t.Helper()
	c := newClient(t, base, "")
	r := c.do("POST", "/v1/auth/register", map[string]any{"username": name, "password": "password-" + name})
	require.Equal(t, 201, r.Status, "%s", r.Body)
	tok := r.M(t)["access_token"].(string)
	return user{ID: name, Token: tok, client: c.as(tok)}
}

// sseEvent is one parsed SSE event.
type sseEvent struct {
	ID, Type string
	Data     json.RawMessage
}

// sseStream is an open event stream read by a goroutine into a channel.
type sseStream struct {
	t      *testing.T
	res    *http.Response
	events chan sseEvent
	cancel context.CancelFunc
	closed chan struct{}
	// Retry is the retry: value the server sent.
	Retry string
}

// openStream opens GET /v1/events with the token and an optional Last-Event-ID.
func openStream(t *testing.T, base, token, lastEventID string) *sseStream {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	req, err := http.NewRequestWithContext(ctx, "GET", base+"/v1/events", nil)
	require.NoError(t, err)
	req.Header.Set("Accept", "text/event-stream")
	if token != "" {
		req.Header.Set("Authorization", "Bearer "+token)
	}
	if lastEventID != "" {
		req.Header.Set("Last-Event-ID", lastEventID)
	}
	res, err := http.DefaultClient.Do(req)
	require.NoError(t, err)
	if res.StatusCode != 200 {
		b, _ := io.ReadAll(res.Body)
		res.Body.Close()
		cancel()
		t.Fatalf("stream: %d %s", res.StatusCode, b)
	}
	require.Equal(t, "text/event-stream", res.Header.Get("Content-Type"))
	s := &sseStream{t: t, res: res, events: make(chan sseEvent, 100000), cancel: cancel, closed: make(chan struct{})}
	go s.read()
	t.Cleanup(s.Close)
	return s
}

func (s *sseStream) read() {
	defer close(s.closed)
	defer close(s.events)
	_ = s.parse()
}

// parse reads SSE frames into s.events until the body ends, returning the
// reader's error (nil at EOF).
func (s *sseStream) parse() error {
	sc := bufio.NewScanner(s.res.Body)
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	var ev sseEvent
	for sc.Scan() {
		line := sc.Text()
		switch {
		case line == "":
			if ev.Type != "" {
				s.events <- ev
			}
			ev = sseEvent{}
		case strings.HasPrefix(line, ":"):
		case strings.HasPrefix(line, "retry: "):
			s.Retry = strings.TrimPrefix(line, "retry: ")
		case strings.HasPrefix(line, "id: "):
			ev.ID = strings.TrimPrefix(line, "id: ")
		case strings.HasPrefix(line, "event: "):
			ev.Type = strings.TrimPrefix(line, "event: ")
		case strings.HasPrefix(line, "data: "):
			ev.Data = json.RawMessage(strings.TrimPrefix(line, "data: "))
		}
	}
	return sc.Err()
}

// Close ends the stream and waits for the reader.
func (s *sseStream) Close() {
	s.cancel()
	<-s.closed
	s.res.Body.Close()
}

// next returns the next event, failing the test after timeout.
func (s *sseStream) next(timeout time.Duration) sseEvent {
	s.t.Helper()
	select {
	case ev, ok := <-s.events:
		if !ok {
			s.t.Fatal("stream closed")
		}
		return ev
	case <-time.After(timeout):
		s.t.Fatalf("no event within %s", timeout)
	}
	return sseEvent{}
}

// until reads events until one of type typ arrives, returning the ones before it.
func (s *sseStream) until(typ string, timeout time.Duration) (before []sseEvent, ev sseEvent) {
	s.t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		left := time.Until(deadline)
		if left <= 0 {
			s.t.Fatalf("no %s event within %s (got %d others)", typ, timeout, len(before))
		}
		e := s.next(left)
		if e.Type == typ {
			return before, e
		}
		before = append(before, e)
	}
}

// messages collects n message.created events (skipping others).
func (s *sseStream) messages(n int, timeout time.Duration) []chat.Message {
	s.t.Helper()
	deadline := time.Now().Add(timeout)
	var out []chat.Message
	for len(out) < n {
		left := time.Until(deadline)
		if left <= 0 {
			s.t.Fatalf("got %d of %d messages within %s", len(out), n, timeout)
		}
		e := s.next(left)
		if e.Type != "message.created" {
			continue
		}
		var m chat.Message
		require.NoError(s.t, json.Unmarshal(e.Data, &m))
		out = append(out, m)
	}
	return out
}

// path formats a URL path.
func path(format string, args ...any) string { return fmt.Sprintf(format, args...) }
