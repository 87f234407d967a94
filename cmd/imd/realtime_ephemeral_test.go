package main

import (
	"bufio"
	"context"
	"encoding/json"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"imd/chat"
	"imd/internal/testenv"
)

// TestRealtimePresence proves presence across nodes: a direct-conversation
// peer's stream hears online when the user's first stream opens and offline
// when the last one closes, and GET /v1/presence agrees.
func TestRealtimePresence(t *testing.T) {
	t.Parallel()
	c := newCluster(t)
	n1, n2 := c.start(t, nodeOpts{}), c.start(t, nodeOpts{})
	alice := rtProvision(t, n1.URL, "alice")
	bob := rtProvision(t, n2.URL, "bob")
	bob2 := rtMintToken(t, n2.URL, "bob")
	cid := rtDirect(t, alice.client, "bob")

	lookup := func() map[string]any {
		t.Helper()
		r := alice.do("GET", "/v1/presence?user_ids=bob", nil)
		require.Equal(t, 200, r.Status, "%s", r.Body)
		var p struct {
			Presence []map[string]any `json:"presence"`
		}
		r.JSON(t, &p)
		require.Len(t, p.Presence, 1, "%s", r.Body)
		require.Equal(t, "bob", p.Presence[0]["user_id"])
		return p.Presence[0]
	}
	isPresence := func(e sseEvent) bool { return e.Type == "presence" }
	// The durable conversation.created may still come; presence events of
	// anyone but bob must not.
	onlyDurable := func(evs []sseEvent) {
		t.Helper()
		for _, ev := range evs {
			require.NotEmpty(t, ev.ID, "unexpected ephemeral event %s", rtDescribe([]sseEvent{ev}))
		}
	}

	sa := rtOpen(t, n1.URL, alice.Token, rtStreamOpts{})
	rtWaitReady(t, sa.sseStream, 10*time.Second)
	require.Equal(t, false, lookup()["online"])

	b1 := rtOpen(t, n2.URL, bob.Token, rtStreamOpts{})
	rtWaitReady(t, b1.sseStream, 10*time.Second)
	before, ev := rtWaitFor(t, sa.sseStream, 10*time.Second, "presence", isPresence)
	onlyDurable(before)
	require.Empty(t, ev.ID, "presence is ephemeral")
	require.Equal(t, map[string]any{"user_id": "bob", "online": true}, rtData(t, ev))
	testenv.Eventually(t, 5*time.Second, func() bool { return lookup()["online"] == true }, "bob online")

	// A second device: no transition, no event.
	b2 := rtOpen(t, n1.URL, bob2, rtStreamOpts{})
	rtWaitReady(t, b2.sseStream, 10*time.Second)
	// Closing one of two: still online, no event.
	open := rtStreamsOpen(t, n2) // n1 and n2 are one node in the embedded mode
	b1.Close()
	testenv.Eventually(t, 10*time.Second, func() bool { return rtStreamsOpen(t, n2) == open-1 }, "n2 noticed the closed stream")
	require.Equal(t, true, lookup()["online"])
	// A barrier on alice's Pub/Sub channel: anything published to her before
	// it (a wrong presence event) arrives before it.
	r := rtOn(bob, n2).do("POST", path("/v1/conversations/%s/typing", cid), nil)
	require.Equal(t, 204, r.Status, "%s", r.Body)
	before, ev = rtWaitFor(t, sa.sseStream, 10*time.Second, "typing", func(e sseEvent) bool { return e.Type == "typing" })
	onlyDurable(before)
	require.Equal(t, "bob", rtData(t, ev)["user_id"])

	// The last stream closes: offline, with a last-seen time.
	b2.Close()
	before, ev = rtWaitFor(t, sa.sseStream, 10*time.Second, "presence", isPresence)
	onlyDurable(before)
	d := rtData(t, ev)
	require.Equal(t, "bob", d["user_id"])
	require.Equal(t, false, d["online"])
	seen, err := time.Parse(time.RFC3339Nano, d["last_seen_at"].(string))
	require.NoError(t, err, "last_seen_at %v", d["last_seen_at"])
	require.WithinDuration(t, time.Now(), seen, time.Minute)
	testenv.Eventually(t, 5*time.Second, func() bool { return lookup()["online"] == false }, "bob offline")
	require.NotNil(t, lookup()["last_seen_at"])
}

// TestRealtimeTyping proves typing goes to the other members' streams (no
// id: ephemeral), across nodes, and never to the typist's own.
func TestRealtimeTyping(t *testing.T) {
	t.Parallel()
	c := newCluster(t)
	n1, n2 := c.start(t, nodeOpts{}), c.start(t, nodeOpts{})
	alice := rtProvision(t, n1.URL, "alice")
	bob := rtProvision(t, n2.URL, "bob")
	carol := rtProvision(t, n1.URL, "carol")
	cid := rtGroup(t, alice.client, "bob", "carol")
	sa := rtOpen(t, n1.URL, alice.Token, rtStreamOpts{})
	sb := rtOpen(t, n2.URL, bob.Token, rtStreamOpts{})
	sc := rtOpen(t, n2.URL, carol.Token, rtStreamOpts{})
	for _, s := range []*rtStream{sa, sb, sc} {
		rtWaitReady(t, s.sseStream, 10*time.Second)
	}
	isTyping := func(e sseEvent) bool { return e.Type == "typing" }

	r := alice.do("POST", path("/v1/conversations/%s/typing", cid), nil)
	require.Equal(t, 204, r.Status, "%s", r.Body)
	want := map[string]any{"conversation_id": cid, "user_id": "alice", "expires_in_ms": float64(chat.DefaultTypingTTL.Milliseconds())}
	for _, s := range []*rtStream{sb, sc} {
		_, ev := rtWaitFor(t, s.sseStream, 10*time.Second, "typing", isTyping)
		require.Empty(t, ev.ID, "typing carries no id")
		require.Equal(t, want, rtData(t, ev))
	}
	// Barrier: bob types after alice's request returned; alice's stream must
	// see bob's typing as the first typing event (hers would come first).
	r = rtOn(bob, n2).do("POST", path("/v1/conversations/%s/typing", cid), nil)
	require.Equal(t, 204, r.Status, "%s", r.Body)
	_, ev := rtWaitFor(t, sa.sseStream, 10*time.Second, "typing", isTyping)
	require.Equal(t, "bob", rtData(t, ev)["user_id"], "the typist must not get her own typing event")

	// Not a member: 404, nothing published.
	dave := rtProvision(t, n1.URL, "dave")
	dave.do("POST", path("/v1/conversations/%s/typing", cid), nil).Problem(t, 404, "not_found")
}

// TestRealtimeRevokedTokenStreams proves that revoking a token (or logging
// out) ends its open streams within seconds, on any node, and only those.
func TestRealtimeRevokedTokenStreams(t *testing.T) {
	t.Parallel()
	c := newCluster(t)
	n1, n2 := c.start(t, nodeOpts{}), c.start(t, nodeOpts{})
	alice := rtProvision(t, n1.URL, "alice")
	bob := rtProvision(t, n1.URL, "bob")
	cid := rtGroup(t, bob.client, "alice")

	r := alice.do("POST", "/v1/auth/tokens", map[string]any{"name": "bot"})
	require.Equal(t, 201, r.Status, "%s", r.Body)
	tok := r.M(t)
	bot := rtOpen(t, n2.URL, tok["access_token"].(string), rtStreamOpts{})
	phone := rtOpen(t, n1.URL, alice.Token, rtStreamOpts{})
	rtWaitReady(t, bot.sseStream, 10*time.Second)
	rtWaitReady(t, phone.sseStream, 10*time.Second)

	// Revoked through n1; the stream is on n2.
	r = alice.do("DELETE", path("/v1/auth/tokens/%s", tok["id"]), nil)
	require.Equal(t, 204, r.Status, "%s", r.Body)
	rtWaitEnd(t, bot, 5*time.Second)
	newClient(t, n2.URL, tok["access_token"].(string)).do("GET", "/v1/me", nil).Problem(t, 401, "unauthorized")

	// The user's other stream lives on.
	m := rtSend(t, bob.client, cid, "still here")
	evs := rtReadMessages(t, phone.sseStream, 1, 15*time.Second)
	require.Equal(t, m.ID, rtMsgs(t, evs)[len(rtMsgs(t, evs))-1].ID)
	rtStillOpen(t, phone)

	// Logout ends the streams of the session used.
	carol := register(t, n2.URL, "carol")
	sc := rtOpen(t, n1.URL, carol.Token, rtStreamOpts{})
	rtWaitReady(t, sc.sseStream, 10*time.Second)
	r = carol.do("POST", "/v1/auth/logout", nil)
	require.Equal(t, 204, r.Status, "%s", r.Body)
	rtWaitEnd(t, sc, 5*time.Second)
	rtStillOpen(t, phone)
}

// TestRealtimePoll proves the long-poll form: pending events with ids and the
// position to continue from, a wait that ends with the first event sent
// meanwhile, an empty answer at the timeout, and resync for a bad position.
func TestRealtimePoll(t *testing.T) {
	t.Parallel()
	c := newCluster(t)
	n := c.start(t, nodeOpts{})
	alice, bob := rtProvision(t, n.URL, "alice"), rtProvision(t, n.URL, "bob")
	cid := rtGroup(t, bob.client, "alice")
	// Until the group's creation is in alice's log. A poll without a
	// position starts from the head it finds, so one whose head was taken
	// just before the creation's append returns it: that is after "now".
	testenv.Eventually(t, 10*time.Second, func() bool {
		_, last := rtPoll(t, alice.client, "")
		p, err := chat.ParsePosition(last)
		require.NoError(t, err)
		return p.Offset == 1
	}, "conversation.created in alice's log")
	evs, start := rtPoll(t, alice.client, "")
	require.Empty(t, evs, "without a position the poll starts from now: the creation is not replayed")
	startPos, _ := chat.ParsePosition(start)
	require.EqualValues(t, 1, startPos.Offset, "%s", start)

	for i := range 3 {
		rtSend(t, bob.client, cid, "m"+string(rune('1'+i)))
	}
	var got []sseEvent
	pos := start
	for len(got) < 3 {
		evs, last := rtPoll(t, alice.client, "timeout=5&last_event_id="+url.QueryEscape(pos))
		require.NotEmpty(t, evs, "timeout=5 answers with the first events, not empty")
		require.Equal(t, evs[len(evs)-1].ID, last, "last_event_id is the last event's id")
		got = append(got, evs...)
		pos = last
	}
	require.Equal(t, 3, len(got), "%s", rtDescribe(got))
	rtConsecutive(t, startPos, got)
	require.Equal(t, []int64{1, 2, 3}, rtSeqs(rtMsgs(t, got)))

	// Nothing pending: it waits, and answers with the event sent meanwhile.
	done := rtLongPoll(n.URL, alice.Token, pos)
	// The poll is waiting once it has subscribed to alice's channel.
	testenv.Eventually(t, 10*time.Second, func() bool { return rtSubscribed(t, c, n, "alice") == 1 }, "the poll subscribed")
	select {
	case res := <-done:
		t.Fatalf("the poll answered before anything was sent: %d %s", res.status, res.body)
	default:
	}
	m := rtSend(t, bob.client, cid, "meanwhile")
	res := rtAwaitPoll(t, done, "the event sent meanwhile")
	require.Less(t, res.took, 25*time.Second, "answered by the event, not the timeout")
	evs, last := rtDecodePoll(t, res.body)
	require.Equal(t, 1, len(evs), "%s", res.body)
	rtConsecutive(t, rtPosition(t, pos), evs)
	require.Equal(t, m.ID, rtMsgs(t, evs)[0].ID)
	require.Equal(t, evs[0].ID, last)
	pos = last

	// Nothing pending and nothing sent: empty at the timeout, same position.
	t0 := time.Now()
	evs, last = rtPoll(t, alice.client, "timeout=1&last_event_id="+url.QueryEscape(pos))
	require.Empty(t, evs)
	require.Equal(t, pos, last)
	require.GreaterOrEqual(t, time.Since(t0), 900*time.Millisecond, "timeout=1 waits")
	// timeout=0 answers at once.
	evs, last = rtPoll(t, alice.client, "last_event_id="+url.QueryEscape(pos))
	require.Empty(t, evs)
	require.Equal(t, pos, last)

	// Accept: application/json without poll=1 is the same form.
	r := alice.do("GET", "/v1/events?last_event_id="+url.QueryEscape(start), nil, "Accept", "application/json")
	require.Equal(t, 200, r.Status, "%s", r.Body)
	require.Equal(t, "application/json", r.Header.Get("Content-Type"))
	evs, last = rtDecodePoll(t, r.Body)
	require.Equal(t, 4, len(evs))
	require.Equal(t, pos, last)

	// A malformed position: resync, and the position of now.
	evs, last = rtPoll(t, alice.client, "last_event_id=garbage")
	require.Equal(t, 1, len(evs), "%s", rtDescribe(evs))
	require.Equal(t, "resync", evs[0].Type)
	require.Empty(t, evs[0].ID)
	require.Equal(t, map[string]any{"reason": chat.ResyncMalformed}, rtData(t, evs[0]))
	require.Equal(t, pos, last, "continue from the head")
	// And bad timeouts are refused.
	alice.do("GET", "/v1/events?poll=1&timeout=61", nil).Problem(t, 400, "invalid_request")
	alice.do("GET", "/v1/events?poll=1&timeout=-1", nil).Problem(t, 400, "invalid_request")
}

func rtPosition(t *testing.T, id string) chat.Position {
	t.Helper()
	p, err := chat.ParsePosition(id)
	require.NoError(t, err, "%q", id)
	return p
}

// TestRealtimeSSEWireFormat checks the bytes on the wire: headers, retry
// first, ids on durable events only, ready with the position, no compression.
func TestRealtimeSSEWireFormat(t *testing.T) {
	t.Parallel()
	n := newCluster(t).start(t, nodeOpts{})
	alice, bob := rtProvision(t, n.URL, "alice"), rtProvision(t, n.URL, "bob")
	// The group's creation must be in alice's log before the raw stream
	// opens, so that the frames below are exactly the expected ones.
	sa := rtOpen(t, n.URL, alice.Token, rtStreamOpts{})
	rtWaitReady(t, sa.sseStream, 10*time.Second)
	cid := rtGroup(t, bob.client, "alice")
	rtWaitFor(t, sa.sseStream, 10*time.Second, "conversation.created", func(e sseEvent) bool { return e.Type == "conversation.created" })
	sa.Close()

	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, "GET", n.URL+"/v1/events", nil)
	require.NoError(t, err)
	req.Header.Set("Accept", "text/event-stream")
	req.Header.Set("Authorization", "Bearer "+alice.Token)
	req.Header.Set("Accept-Encoding", "gzip") // set by hand: Go's transport would decompress silently
	res, err := http.DefaultClient.Do(req)
	require.NoError(t, err)
	defer res.Body.Close()
	require.Equal(t, 200, res.StatusCode)
	require.Equal(t, "text/event-stream", res.Header.Get("Content-Type"))
	require.Equal(t, "no-cache", res.Header.Get("Cache-Control"))
	require.Equal(t, "no", res.Header.Get("X-Accel-Buffering"))
	require.Empty(t, res.Header.Get("Content-Encoding"), "no compression on the stream")
	require.Empty(t, res.Header.Get("Content-Length"))

	frames := make(chan []string, 100)
	go func() {
		defer close(frames)
		rd := bufio.NewReader(res.Body)
		var cur []string
		for {
			line, err := rd.ReadString('\n')
			if err != nil {
				return
			}
			line = strings.TrimSuffix(line, "\n")
			if line == "" {
				frames <- cur
				cur = nil
				continue
			}
			cur = append(cur, line)
		}
	}()
	next := func() []string {
		t.Helper()
		for {
			select {
			case f, ok := <-frames:
				require.True(t, ok, "stream ended")
				if len(f) == 1 && f[0] == ": ping" {
					continue
				}
				return f
			case <-time.After(15 * time.Second):
				t.Fatal("no frame within 15s")
			}
		}
	}

	retry := next()
	require.Len(t, retry, 1, "the retry line comes first, alone: %q", retry)
	ms, err := strconv.Atoi(strings.TrimPrefix(retry[0], "retry: "))
	require.NoError(t, err, "%q", retry)
	require.True(t, ms >= 1000 && ms <= 3000, "reconnect delay %d ms, want 2 s ± 50 %%", ms)
	ready := next()
	require.Len(t, ready, 2, "%q", ready)
	require.Equal(t, "event: ready", ready[0], "ready carries no id")
	require.True(t, strings.HasPrefix(ready[1], "data: "), "%q", ready)
	var rd chat.ReadyEvent
	require.NoError(t, json.Unmarshal([]byte(strings.TrimPrefix(ready[1], "data: ")), &rd))
	head := rtPosition(t, rd.LastEventID)
	require.EqualValues(t, 1, head.Offset, "the group's creation")

	m := rtSend(t, bob.client, cid, "line one\nline two: \"quoted\"")
	f := next()
	require.Len(t, f, 3, "%q", f)
	require.Equal(t, "id: "+chat.Position{Epoch: head.Epoch, Offset: 2}.String(), f[0])
	require.Equal(t, "event: message.created", f[1])
	var got chat.Message
	require.NoError(t, json.Unmarshal([]byte(strings.TrimPrefix(f[2], "data: ")), &got), "one data line of JSON: %q", f[2])
	require.Equal(t, m, got, "the message as sent, newline included")

	r := bob.do("POST", path("/v1/conversations/%s/typing", cid), nil)
	require.Equal(t, 204, r.Status)
	f = next()
	require.Len(t, f, 2, "%q", f)
	require.Equal(t, "event: typing", f[0], "ephemeral: no id")
	require.True(t, strings.HasPrefix(f[1], "data: {"), "%q", f)
}
