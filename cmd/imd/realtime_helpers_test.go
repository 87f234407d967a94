package main

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"
	"github.com/stretchr/testify/require"

	"imd/chat"
	"imd/internal/testenv"
)

// Helpers of the real-time tests (realtime_*_test.go). They add to the
// harness in harness_test.go without changing it.

// rtHTTP is shared by the helpers that run outside the test goroutine
// (concurrent senders, long polls): they report errors instead of failing.
var rtHTTP = &http.Client{
	Transport: &http.Transport{MaxIdleConnsPerHost: 64, MaxConnsPerHost: 64},
	Timeout:   90 * time.Second,
}

// provision creates a user through the admin API and mints a token for it:
// no password hashing, so tests with many users stay fast.
func rtProvision(t *testing.T, base, name string) user {
	t.Helper()
	admin := newClient(t, base, testAdminToken)
	r := admin.do("POST", "/v1/admin/users", map[string]any{"username": name})
	require.Equal(t, 201, r.Status, "%s", r.Body)
	tok := rtMintToken(t, base, name)
	return user{ID: name, Token: tok, client: newClient(t, base, tok)}
}

// mintToken mints one more API token for a user (another device).
func rtMintToken(t *testing.T, base, name string) string {
	t.Helper()
	r := newClient(t, base, testAdminToken).do("POST", path("/v1/admin/users/%s/tokens", name), map[string]any{"name": "device"})
	require.Equal(t, 201, r.Status, "%s", r.Body)
	return r.M(t)["access_token"].(string)
}

// on returns a client of u for another node.
func rtOn(u user, n *node) *client { return newClient(u.t, n.URL, u.Token) }

// createGroup creates a group owned by owner with the other members.
func rtGroup(t *testing.T, owner *client, members ...string) string {
	t.Helper()
	r := owner.do("POST", "/v1/conversations", map[string]any{"type": "group", "title": "g", "member_ids": members})
	require.Equal(t, 201, r.Status, "%s", r.Body)
	return r.M(t)["id"].(string)
}

// createDirect returns the direct conversation of a and peer.
func rtDirect(t *testing.T, a *client, peer string) string {
	t.Helper()
	r := a.do("POST", "/v1/conversations", map[string]any{"type": "direct", "member_ids": []string{peer}})
	require.Contains(t, []int{200, 201}, r.Status, "%s", r.Body)
	return r.M(t)["id"].(string)
}

// sendMsg sends from the test goroutine and requires 201.
func rtSend(t *testing.T, c *client, cid, text string) chat.Message {
	t.Helper()
	r := c.do("POST", path("/v1/conversations/%s/messages", cid), map[string]any{"text": text})
	require.Equal(t, 201, r.Status, "%s", r.Body)
	var m chat.Message
	r.JSON(t, &m)
	return m
}

// rtPollAnswer is what a long poll started with rtLongPoll answered.
type rtPollAnswer struct {
	status int
	body   []byte
	err    error
	took   time.Duration
}

// rtLongPoll starts GET /v1/events?poll=1&timeout=30 from pos in the
// background; its answer comes on the channel (rtAwaitPoll). It uses
// rtRawDo, not client.do: it may not fail the test from its goroutine.
func rtLongPoll(base, token, pos string) <-chan rtPollAnswer {
	done := make(chan rtPollAnswer, 1)
	go func() {
		t0 := time.Now()
		status, body, err := rtRawDo("GET", base+"/v1/events?poll=1&timeout=30&last_event_id="+url.QueryEscape(pos), token, nil)
		done <- rtPollAnswer{status, body, err, time.Since(t0)}
	}()
	return done
}

// rtAwaitPoll waits up to 15 s for a long poll's answer, which must be a 200.
func rtAwaitPoll(t *testing.T, done <-chan rtPollAnswer, what string) rtPollAnswer {
	t.Helper()
	var a rtPollAnswer
	select {
	case a = <-done:
	case <-time.After(15 * time.Second):
		t.Fatalf("the long poll did not answer within 15s: %s", what)
	}
	require.NoError(t, a.err)
	require.Equal(t, 200, a.status, "%s", a.body)
	return a
}

// rtRawDo is an HTTP call for goroutines other than the test's: it returns
// errors instead of failing the test.
func rtRawDo(method, u, token string, body any, headers ...string) (int, []byte, error) {
	var rd io.Reader
	if body != nil {
		b, err := json.Marshal(body)
		if err != nil {
			return 0, nil, err
		}
		rd = bytes.NewReader(b)
	}
	req, err := http.NewRequest(method, u, rd)
	if err != nil {
		return 0, nil, err
	}
	if body != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	if token != "" {
		req.Header.Set("Authorization", "Bearer "+token)
	}
	for i := 0; i+1 < len(headers); i += 2 {
		req.Header.Set(headers[i], headers[i+1])
	}
	res, err := rtHTTP.Do(req)
	if err != nil {
		return 0, nil, err
	}
	defer res.Body.Close()
	out, err := io.ReadAll(res.Body)
	return res.StatusCode, out, err
}

// postMessage sends a message from any goroutine; anything but 201 is an error.
func rtPost(base, token, cid, text string) (chat.Message, error) {
	status, body, err := rtRawDo("POST", base+path("/v1/conversations/%s/messages", cid), token, map[string]any{"text": text})
	if err != nil {
		return chat.Message{}, err
	}
	if status != 201 {
		return chat.Message{}, fmt.Errorf("send %q: %d %s", text, status, body)
	}
	var m chat.Message
	if err := json.Unmarshal(body, &m); err != nil {
		return chat.Message{}, fmt.Errorf("send %q: %w: %s", text, err, body)
	}
	return m, nil
}

// history returns every message of cid after afterSeq, paging through.
func rtHistory(t *testing.T, c *client, cid string, afterSeq int64) []chat.Message {
	t.Helper()
	var all []chat.Message
	for {
		r := c.do("GET", path("/v1/conversations/%s/messages?after_seq=%d&limit=200", cid, afterSeq), nil)
		require.Equal(t, 200, r.Status, "%s", r.Body)
		var page struct {
			Messages []chat.Message `json:"messages"`
			HasMore  bool           `json:"has_more"`
		}
		r.JSON(t, &page)
		all = append(all, page.Messages...)
		if !page.HasMore {
			return all
		}
		require.NotEmpty(t, page.Messages, "has_more with an empty page")
		afterSeq = page.Messages[len(page.Messages)-1].Seq
	}
}

// rtStream is the harness' sseStream read by rtRead, which also records how
// the body ended: Err is nil for a clean EOF (valid once Events is closed).
type rtStream struct {
	*sseStream
	err error
}

// rtStreamOpts select how openSSE opens GET /v1/events.
type rtStreamOpts struct {
	lastEventID string // Last-Event-ID header
	query       string // raw query string
}

// openSSE opens an event stream like openStream, plus the query-parameter
// resume form and a record of the reader's terminal error.
func rtOpen(t *testing.T, base, token string, o rtStreamOpts) *rtStream {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	u := base + "/v1/events"
	if o.query != "" {
		u += "?" + o.query
	}
	req, err := http.NewRequestWithContext(ctx, "GET", u, nil)
	require.NoError(t, err)
	req.Header.Set("Accept", "text/event-stream")
	if token != "" {
		req.Header.Set("Authorization", "Bearer "+token)
	}
	if o.lastEventID != "" {
		req.Header.Set("Last-Event-ID", o.lastEventID)
	}
	res, err := http.DefaultClient.Do(req)
	if err != nil {
		cancel()
		require.NoError(t, err)
	}
	if res.StatusCode != 200 {
		b, _ := io.ReadAll(res.Body)
		res.Body.Close()
		cancel()
		t.Fatalf("stream: %d %s", res.StatusCode, b)
	}
	require.Equal(t, "text/event-stream", res.Header.Get("Content-Type"))
	s := &rtStream{sseStream: &sseStream{t: t, res: res, events: make(chan sseEvent, 100000), cancel: cancel, closed: make(chan struct{})}}
	go s.read()
	t.Cleanup(s.Close)
	return s
}

// read is the harness' parser, recording the reader's error.
func (s *rtStream) read() {
	defer close(s.closed)
	s.err = s.parse()
	close(s.events) // after s.err: a receiver that sees the close sees the error
}

// waitEnd drains the stream until the server ends it, failing after timeout;
// it returns the events read meanwhile and the reader's error (nil: EOF).
func rtWaitEnd(t *testing.T, s *rtStream, timeout time.Duration) ([]sseEvent, error) {
	t.Helper()
	deadline := time.NewTimer(timeout)
	defer deadline.Stop()
	var evs []sseEvent
	for {
		select {
		case ev, ok := <-s.events:
			if !ok {
				return evs, s.err
			}
			evs = append(evs, ev)
		case <-deadline.C:
			t.Fatalf("stream did not end within %s (read %d events meanwhile)", timeout, len(evs))
		}
	}
}

// stillOpen fails if the stream has ended (without waiting).
func rtStillOpen(t *testing.T, s *rtStream) {
	t.Helper()
	select {
	case <-s.closed:
		t.Fatalf("stream ended unexpectedly (err %v)", s.err)
	default:
	}
}

// waitFor reads events until pred holds for one, returning the ones before it.
func rtWaitFor(t *testing.T, s *sseStream, timeout time.Duration, what string, pred func(sseEvent) bool) ([]sseEvent, sseEvent) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	var before []sseEvent
	for {
		left := time.Until(deadline)
		if left <= 0 {
			t.Fatalf("no %s within %s (got %d other events: %s)", what, timeout, len(before), rtDescribe(before))
		}
		var ev sseEvent
		select {
		case e, ok := <-s.events:
			if !ok {
				t.Fatalf("stream closed while waiting for %s (got %d other events: %s)", what, len(before), rtDescribe(before))
			}
			ev = e
		case <-time.After(left):
			continue
		}
		if pred(ev) {
			return before, ev
		}
		before = append(before, ev)
	}
}

// waitReady reads up to the ready event and returns the events before it and
// the position ready carries.
func rtWaitReady(t *testing.T, s *sseStream, timeout time.Duration) ([]sseEvent, chat.Position) {
	t.Helper()
	before, ev := rtWaitFor(t, s, timeout, "ready", func(e sseEvent) bool { return e.Type == "ready" })
	require.Empty(t, ev.ID, "ready carries no id")
	var d chat.ReadyEvent
	require.NoError(t, json.Unmarshal(ev.Data, &d), "ready data %s", ev.Data)
	cur, err := chat.ParseCursor(d.LastEventID)
	require.NoError(t, err, "ready last_event_id %q", d.LastEventID)
	return before, cur.Pos
}

// readMessages reads events until n message.created events arrived and
// returns every event read (all types), failing after timeout.
func rtReadMessages(t *testing.T, s *sseStream, n int, timeout time.Duration) []sseEvent {
	t.Helper()
	deadline := time.Now().Add(timeout)
	var evs []sseEvent
	got := 0
	for got < n {
		left := time.Until(deadline)
		if left <= 0 {
			t.Fatalf("got %d of %d messages within %s; events: %s", got, n, timeout, rtDescribe(evs))
		}
		select {
		case ev, ok := <-s.events:
			if !ok {
				t.Fatalf("stream closed after %d of %d messages; events: %s", got, n, rtDescribe(evs))
			}
			evs = append(evs, ev)
			if ev.Type == "message.created" {
				got++
			}
		case <-time.After(left):
		}
	}
	return evs
}

// msgs decodes the message.created events of evs.
func rtMsgs(t *testing.T, evs []sseEvent) []chat.Message {
	t.Helper()
	var out []chat.Message
	for _, ev := range evs {
		if ev.Type != "message.created" {
			continue
		}
		var m chat.Message
		require.NoError(t, json.Unmarshal(ev.Data, &m), "message.created data %s", ev.Data)
		out = append(out, m)
	}
	return out
}

// seqs lists the seqs of ms.
func rtSeqs(ms []chat.Message) []int64 {
	out := make([]int64, len(ms))
	for i, m := range ms {
		out[i] = m.Seq
	}
	return out
}

// seqRange is from..to inclusive.
func rtSeqRange(from, to int64) []int64 {
	var out []int64
	for s := from; s <= to; s++ {
		out = append(out, s)
	}
	return out
}

// rtEphemeral are the event types that carry no id.
var rtEphemeral = map[string]bool{"typing": true, "presence": true, "ready": true, "resync": true}

// requireConsecutive checks that the durable events of evs carry the ids
// after..after+n of after's epoch, one by one with no gap or repeat, and that
// exactly the rtEphemeral ones carry no id. It returns the last position.
func rtConsecutive(t *testing.T, after chat.Position, evs []sseEvent) chat.Position {
	t.Helper()
	pos := after
	for i, ev := range evs {
		if rtEphemeral[ev.Type] {
			require.Empty(t, ev.ID, "event %d (%s) is rtEphemeral and must carry no id", i, ev.Type)
			continue
		}
		require.NotEmpty(t, ev.ID, "event %d (%s) is durable and must carry an id", i, ev.Type)
		p, err := chat.ParsePosition(ev.ID)
		require.NoError(t, err, "event %d id %q", i, ev.ID)
		require.Equal(t, pos.Epoch, p.Epoch, "event %d (%s) id %s: epoch changed", i, ev.Type, ev.ID)
		require.Equal(t, pos.Offset+1, p.Offset, "event %d (%s) id %s follows %s: ids must be consecutive (no gap, no repeat)", i, ev.Type, ev.ID, pos)
		pos = p
	}
	return pos
}

// durable filters evs to the events with an id.
func rtDurable(evs []sseEvent) []sseEvent {
	var out []sseEvent
	for _, ev := range evs {
		if ev.ID != "" {
			out = append(out, ev)
		}
	}
	return out
}

func rtOfType(evs []sseEvent, typ string) []sseEvent {
	var out []sseEvent
	for _, ev := range evs {
		if ev.Type == typ {
			out = append(out, ev)
		}
	}
	return out
}

func rtDescribe(evs []sseEvent) string {
	var b strings.Builder
	for i, ev := range evs {
		if i == 12 {
			fmt.Fprintf(&b, " …(%d more)", len(evs)-i)
			break
		}
		d := string(ev.Data)
		if len(d) > 100 {
			d = d[:100] + "…"
		}
		fmt.Fprintf(&b, " [%s %s %s]", ev.ID, ev.Type, d)
	}
	return b.String()
}

// dataOf decodes an event's data as a JSON object.
func rtData(t *testing.T, ev sseEvent) map[string]any {
	t.Helper()
	var m map[string]any
	require.NoError(t, json.Unmarshal(ev.Data, &m), "%s data %s", ev.Type, ev.Data)
	return m
}

// redisFor returns a client for the tests' Redis (closed when the test ends).
func rtRedis(t testing.TB) *redis.Client {
	t.Helper()
	opts, err := redis.ParseURL(testenv.RedisURL(t))
	require.NoError(t, err)
	rdb := redis.NewClient(opts)
	t.Cleanup(func() { _ = rdb.Close() })
	return rdb
}

// rtDeletePrefix deletes every key that starts with prefix; with a
// cluster's prefix, FLUSHALL for this cluster only, so that parallel tests
// keep their keys.
func rtDeletePrefix(t testing.TB, rdb *redis.Client, prefix string) int {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	n := 0
	var cursor uint64
	for {
		keys, next, err := rdb.Scan(ctx, cursor, prefix+"*", 500).Result()
		require.NoError(t, err)
		if len(keys) > 0 {
			require.NoError(t, rdb.Del(ctx, keys...).Err())
			n += len(keys)
		}
		if next == 0 {
			return n
		}
		cursor = next
	}
}

// numSub is how many subscriptions the Pub/Sub channel of uid has.
func rtNumSub(t *testing.T, rdb *redis.Client, prefix, uid string) int64 {
	t.Helper()
	ch := prefix + "user:{" + uid + "}"
	res, err := rdb.PubSubNumSub(context.Background(), ch).Result()
	require.NoError(t, err)
	return res[ch]
}

var rtStreamsOpenRE = regexp.MustCompile(`(?m)^imd_streams_open (\S+)$`)

// streamsOpen reads the node's imd_streams_open gauge.
func rtStreamsOpen(t *testing.T, n *node) int {
	t.Helper()
	r := newClient(t, n.URL, "").do("GET", "/metrics", nil)
	require.Equal(t, 200, r.Status)
	m := rtStreamsOpenRE.FindSubmatch(r.Body)
	require.NotNil(t, m, "imd_streams_open missing from /metrics")
	v, err := strconv.ParseFloat(string(m[1]), 64)
	require.NoError(t, err)
	return int(v)
}

// viaProxy is redisURL with its host replaced by a proxy's address.
func rtViaProxy(t *testing.T, redisURL, proxyAddr string) string {
	t.Helper()
	u, err := url.Parse(redisURL)
	require.NoError(t, err)
	u.Host = proxyAddr
	return u.String()
}

// redisHostPort is the host:port of redisURL.
func rtRedisHostPort(t *testing.T, redisURL string) string {
	t.Helper()
	opts, err := redis.ParseURL(redisURL)
	require.NoError(t, err)
	return opts.Addr
}

// rtPoll is one poll-form request, from the test goroutine.
func rtPoll(t *testing.T, c *client, query string) (evs []sseEvent, last string) {
	t.Helper()
	r := c.do("GET", "/v1/events?poll=1&"+query, nil)
	require.Equal(t, 200, r.Status, "%s", r.Body)
	return rtDecodePoll(t, r.Body)
}

func rtDecodePoll(t *testing.T, body []byte) ([]sseEvent, string) {
	t.Helper()
	var p struct {
		Events []struct {
			ID   *string         `json:"id"`
			Type string          `json:"type"`
			Data json.RawMessage `json:"data"`
		} `json:"events"`
		LastEventID *string `json:"last_event_id"`
	}
	require.NoError(t, json.Unmarshal(body, &p), "%s", body)
	require.NotNil(t, p.Events, "events must be an array: %s", body)
	require.NotNil(t, p.LastEventID, "last_event_id missing: %s", body)
	evs := make([]sseEvent, len(p.Events))
	for i, e := range p.Events {
		evs[i] = sseEvent{Type: e.Type, Data: e.Data}
		if e.ID != nil {
			require.NotEmpty(t, *e.ID, "an id is absent or null, never empty")
			evs[i].ID = *e.ID
		}
	}
	return evs, *p.LastEventID
}

// rtAwaitLog waits until c's user log holds at least n events after
// position after: dispatch is asynchronous (a 201 means committed, not yet
// appended), and a test that wants to see a replay must wait for it.
func rtAwaitLog(t *testing.T, c *client, after string, n int) {
	t.Helper()
	testenv.Eventually(t, 20*time.Second, func() bool {
		evs, _ := rtPoll(t, c, "last_event_id="+url.QueryEscape(after))
		// A position beyond the head answers resync (position_ahead): not yet.
		return len(rtDurable(evs)) >= n
	}, "the log holds %d events after %s", n, after)
}

// rtSeqStateRegression explains the message loss TestRealtimeServicesReorderedFirstMessages
// guards against; the other delivery tests would hit it by chance.
const rtSeqStateRegression = "REGRESSION (see TestRealtimeServicesReorderedFirstMessages): a user's log that has no seq " +
	"state for a conversation (a new group; a member just added; a lost log) must hold back any seq but the first " +
	"(a Gap with LastSeq -1, filled from the store by the dispatcher); if it accepted whatever seq arrives first, " +
	"a seq N dispatched after N+1 (two nodes' fast paths, or fast path vs sweeper) would be dropped as a duplicate"

// rtReadMessagesOr is rtReadMessages with the explanation to fail with.
func rtReadMessagesOr(t *testing.T, s *sseStream, n int, timeout time.Duration, why string) []sseEvent {
	t.Helper()
	deadline := time.Now().Add(timeout)
	var evs []sseEvent
	for len(rtOfType(evs, "message.created")) < n {
		left := time.Until(deadline)
		if left <= 0 {
			t.Fatalf("got %d of %d messages within %s: %s\n%s", len(rtOfType(evs, "message.created")), n, timeout, rtDescribe(evs), why)
		}
		select {
		case ev, ok := <-s.events:
			if !ok {
				t.Fatalf("stream closed: %s", rtDescribe(evs))
			}
			evs = append(evs, ev)
		case <-time.After(left):
		}
	}
	return evs
}

// rtJSONPath digs a string out of a JSON object.
func rtJSONPath(t *testing.T, body []byte, keys ...string) string {
	t.Helper()
	var v any
	require.NoError(t, json.Unmarshal(body, &v), "%s", body)
	for _, k := range keys {
		m, ok := v.(map[string]any)
		if !ok {
			return ""
		}
		v = m[k]
	}
	s, _ := v.(string)
	return s
}

// rtReadInOrder reads events until message seq `to` of cid arrived, failing
// at once when a message.created is not the next seq after `from`-1 (a gap
// or a repeat), and returns every event read.
func rtReadInOrder(t *testing.T, s *sseStream, cid string, from, to int64, timeout time.Duration, why string) []sseEvent {
	t.Helper()
	deadline := time.Now().Add(timeout)
	var evs []sseEvent
	want := from
	for want <= to {
		left := time.Until(deadline)
		if left <= 0 {
			t.Fatalf("waiting for seq %d (of %d..%d) for %s: %s\n%s", want, from, to, timeout, rtDescribe(evs), why)
		}
		select {
		case ev, ok := <-s.events:
			if !ok {
				t.Fatalf("stream closed while waiting for seq %d: %s", want, rtDescribe(evs))
			}
			evs = append(evs, ev)
			if ev.Type != "message.created" {
				continue
			}
			m := rtMsgs(t, []sseEvent{ev})[0]
			if m.ConversationID != cid {
				continue
			}
			if m.Seq != want {
				t.Fatalf("got seq %d where seq %d was due (events so far: %d; last: %s)\n%s",
					m.Seq, want, len(evs), rtDescribe(evs[max(0, len(evs)-3):]), why)
			}
			want++
		case <-time.After(left):
		}
	}
	return evs
}
