package main

import (
	"testing"

	"github.com/stretchr/testify/require"
)

// TestWalkthrough drives the README's curl walkthrough over HTTP against the
// real server started through run; every response is validated against
// openapi.yaml by the client.
func TestWalkthrough(t *testing.T) {
	srv := startServer(t)
	anon := newClient(t, srv.URL, "")

	// Register two users.
	r := anon.do("POST", "/v1/auth/register", map[string]any{"username": "alice", "password": "correct horse", "display_name": "Alice"})
	require.Equal(t, 201, r.Status, "%s", r.Body)
	a := r.M(t)
	require.Equal(t, "Bearer", a["token_type"])
	alice := anon.as(a["access_token"].(string))
	r = anon.do("POST", "/v1/auth/register", map[string]any{"username": "bob", "password": "battery staple"})
	require.Equal(t, 201, r.Status)
	bob := anon.as(r.M(t)["access_token"].(string))

	// Log in (the session cookie is set too).
	r = anon.do("POST", "/v1/auth/login", map[string]any{"username": "bob", "password": "battery staple"})
	require.Equal(t, 200, r.Status)
	require.Contains(t, r.Header.Get("Set-Cookie"), "imd_session=")
	require.Contains(t, r.Header.Get("Set-Cookie"), "HttpOnly")

	// Create a direct conversation; again returns the same one with 200.
	r = alice.do("POST", "/v1/conversations", map[string]any{"type": "direct", "member_ids": []string{"bob"}})
	require.Equal(t, 201, r.Status, "%s", r.Body)
	conv := r.M(t)
	cid := conv["id"].(string)
	require.Equal(t, "bob", conv["peer_id"])
	r = bob.do("POST", "/v1/conversations", map[string]any{"type": "direct", "member_ids": []string{"alice"}})
	require.Equal(t, 200, r.Status)
	require.Equal(t, cid, r.M(t)["id"])

	// Send, with an idempotency key; the replay returns the original.
	r = alice.do("POST", path("/v1/conversations/%s/messages", cid), map[string]any{"text": "hello bob"}, "Idempotency-Key", "k-1")
	require.Equal(t, 201, r.Status, "%s", r.Body)
	msg := r.M(t)
	require.EqualValues(t, 1, msg["seq"])
	r = alice.do("POST", path("/v1/conversations/%s/messages", cid), map[string]any{"text": "hello bob"}, "Idempotency-Key", "k-1")
	require.Equal(t, 200, r.Status)
	require.Equal(t, msg["id"], r.M(t)["id"])
	// Bob's conversation list shows alice's message as unread.
	var list struct {
		Conversations []struct {
			ID          string `json:"id"`
			UnreadCount int64  `json:"unread_count"`
			LastSeq     int64  `json:"last_seq"`
		} `json:"conversations"`
	}
	r = bob.do("GET", "/v1/conversations", nil)
	require.Equal(t, 200, r.Status)
	r.JSON(t, &list)
	require.Len(t, list.Conversations, 1)
	require.Equal(t, cid, list.Conversations[0].ID)
	require.EqualValues(t, 1, list.Conversations[0].UnreadCount)

	// The seed's shape: send to a user. Replying moves bob's read position.
	r = bob.do("POST", "/v1/users/alice/messages", map[string]any{"text": "hi alice"})
	require.Equal(t, 201, r.Status)
	require.Equal(t, cid, r.M(t)["conversation_id"])
	r = alice.do("POST", path("/v1/conversations/%s/messages", cid), map[string]any{"text": "how are you?"})
	require.Equal(t, 201, r.Status)

	// Read history.
	r = bob.do("GET", path("/v1/conversations/%s/messages", cid), nil)
	require.Equal(t, 200, r.Status)
	var page struct {
		Messages []struct {
			Seq      int64  `json:"seq"`
			Text     string `json:"text"`
			SenderID string `json:"sender_id"`
		} `json:"messages"`
		HasMore bool `json:"has_more"`
	}
	r.JSON(t, &page)
	require.Len(t, page.Messages, 3)
	require.Equal(t, "hello bob", page.Messages[0].Text)
	require.Equal(t, "hi alice", page.Messages[1].Text)
	require.Equal(t, "how are you?", page.Messages[2].Text)
	require.False(t, page.HasMore)

	// One unread again: alice's second message, not bob's own.
	r = bob.do("GET", "/v1/conversations", nil)
	r.JSON(t, &list)
	require.EqualValues(t, 3, list.Conversations[0].LastSeq)
	require.EqualValues(t, 1, list.Conversations[0].UnreadCount)

	// Mark read.
	r = bob.do("PUT", path("/v1/conversations/%s/read", cid), map[string]any{"seq": 3})
	require.Equal(t, 200, r.Status)
	require.EqualValues(t, 0, r.M(t)["unread_count"])
	require.EqualValues(t, 3, r.M(t)["last_read_seq"])

	// And the infrastructure routes.
	require.Equal(t, 200, anon.do("GET", "/healthz", nil).Status)
	require.Equal(t, 200, anon.do("GET", "/readyz", nil).Status)
	require.Equal(t, 200, anon.do("GET", "/openapi.yaml", nil).Status)
	r = anon.do("GET", "/metrics", nil)
	require.Equal(t, 200, r.Status)
	require.Contains(t, string(r.Body), "imd_http_requests_total")
}
