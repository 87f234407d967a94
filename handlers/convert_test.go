package handlers

import (
	"encoding/json"
	"strings"
	"testing"
	"time"

	"imd/chat"
	"imd/handlers/api"
)

var t0 = time.Date(2025, 1, 31, 12, 34, 56, 789_000_000, time.UTC)

// encode marshals v and decodes it into a generic map, as a client sees it.
func encode(t *testing.T, v any) (string, map[string]any) {
	t.Helper()
	b, err := json.Marshal(v)
	if err != nil {
		t.Fatalf("marshal: %v", err)
	}
	var m map[string]any
	if err := json.Unmarshal(b, &m); err != nil {
		t.Fatalf("unmarshal %s: %v", b, err)
	}
	return string(b), m
}

// conformsTo checks a mapped value against a schema of openapi.yaml, so the
// mappers and the contract cannot drift apart (required fields, nullability,
// no extra fields).
func conformsTo(t *testing.T, schema string, v any) {
	t.Helper()
	doc, err := Spec()
	if err != nil {
		t.Fatalf("spec: %v", err)
	}
	ref, ok := doc.Components.Schemas[schema]
	if !ok || ref.Value == nil {
		t.Fatalf("no schema %q in openapi.yaml", schema)
	}
	_, generic := encode(t, v)
	if err := ref.Value.VisitJSON(generic); err != nil {
		t.Errorf("%s does not conform: %v", schema, err)
	}
}

func TestMessageWithoutOptionalFields(t *testing.T) {
	m := chat.Message{ID: "m_1", ConversationID: "c_1", Seq: 3, SenderID: "alice", Text: "hello", CreatedAt: t0}
	raw, got := encode(t, apiMessage(m))
	for _, k := range []string{"metadata", "client_msg_id"} {
		if _, ok := got[k]; ok {
			t.Errorf("%s present in %s, want absent", k, raw)
		}
	}
	if got["created_at"] != "2025-01-31T12:34:56.789Z" {
		t.Errorf("created_at = %v", got["created_at"])
	}
	if got["seq"] != float64(3) || got["sender_id"] != "alice" || got["text"] != "hello" ||
		got["id"] != "m_1" || got["conversation_id"] != "c_1" {
		t.Errorf("fields not carried over: %s", raw)
	}
	conformsTo(t, "Message", apiMessage(m))
}

func TestMessageWithMetadataAndClientMsgID(t *testing.T) {
	// 2^53+1 cannot survive a float64: the mapper must keep the number exact.
	md := `{"n":9007199254740993,"nested":{"a":[1,"x",true,null]},"s":"é"}`
	m := chat.Message{ID: "m_2", ConversationID: "c_1", Seq: 4, SenderID: "bob", Text: "hi",
		Metadata: json.RawMessage(md), ClientMsgID: "k-1", CreatedAt: t0}
	out := apiMessage(m)
	if out.ClientMsgID == nil || *out.ClientMsgID != "k-1" {
		t.Errorf("client_msg_id = %v, want k-1", out.ClientMsgID)
	}
	raw, _ := encode(t, out)
	if !strings.Contains(raw, `"n":9007199254740993`) {
		t.Errorf("big integer not preserved: %s", raw)
	}
	var want, got any
	_ = json.Unmarshal([]byte(md), &want)
	b, _ := json.Marshal(out.Metadata)
	_ = json.Unmarshal(b, &got)
	wb, _ := json.Marshal(want)
	gb, _ := json.Marshal(got)
	if string(wb) != string(gb) {
		t.Errorf("metadata = %s, want %s", gb, wb)
	}
	conformsTo(t, "Message", out)
}

func TestMessageMetadataEdgeCases(t *testing.T) {
	for _, md := range []string{"", "  ", "null", "not json"} {
		if got := apiMetadata(json.RawMessage(md)); got != nil {
			t.Errorf("apiMetadata(%q) = %v, want nil", md, got)
		}
	}
}

func TestDirectConversation(t *testing.T) {
	last := chat.Message{ID: "m_9", ConversationID: "c_d", Seq: 9, SenderID: "bob", Text: "yo", CreatedAt: t0}
	c := chat.Conversation{ID: "c_d", Type: chat.Direct, Title: "stale", CreatedAt: t0, LastSeq: 9,
		LastReadSeq: 7, UnreadCount: 2, LastMessage: &last, LastActivityAt: t0, MemberCount: 2, PeerID: "bob"}
	out := apiConversation(c)
	raw, got := encode(t, out)
	if got["peer_id"] != "bob" {
		t.Errorf("peer_id = %v, want bob (%s)", got["peer_id"], raw)
	}
	if got["title"] != "" {
		t.Errorf("title = %v, want empty for a direct conversation", got["title"])
	}
	if got["type"] != "direct" || got["unread_count"] != float64(2) || got["last_read_seq"] != float64(7) ||
		got["last_seq"] != float64(9) || got["member_count"] != float64(2) {
		t.Errorf("fields not carried over: %s", raw)
	}
	lm, ok := got["last_message"].(map[string]any)
	if !ok || lm["seq"] != float64(9) || lm["text"] != "yo" {
		t.Errorf("last_message = %v", got["last_message"])
	}
	conformsTo(t, "Conversation", out)
}

func TestGroupConversation(t *testing.T) {
	c := chat.Conversation{ID: "c_g", Type: chat.Group, Title: "Project X", CreatedAt: t0,
		LastActivityAt: t0, MemberCount: 3, PeerID: "ignored"}
	out := apiConversation(c)
	raw, got := encode(t, out)
	if _, ok := got["peer_id"]; ok {
		t.Errorf("peer_id present for a group: %s", raw)
	}
	if _, ok := got["last_message"]; ok {
		t.Errorf("last_message present without messages: %s", raw)
	}
	if got["title"] != "Project X" || got["type"] != "group" || got["last_seq"] != float64(0) {
		t.Errorf("fields not carried over: %s", raw)
	}
	conformsTo(t, "Conversation", out)
}

func TestEmptyListsAreArrays(t *testing.T) {
	cases := []struct {
		schema string
		v      any
		want   string
	}{
		{"MessageList", api.MessageList{Messages: apiMessages(nil)}, `"messages":[]`},
		{"ConversationList", api.ConversationList{Conversations: apiConversations(nil), NextCursor: apiCursor("")}, `"conversations":[]`},
		{"MemberList", api.MemberList{Members: apiMembers(nil), NextCursor: apiCursor("")}, `"members":[]`},
		{"AddedMembers", api.AddedMembers{Members: apiMembers(nil)}, `"members":[]`},
		{"ApiTokenList", api.APITokenList{Tokens: apiTokens(nil)}, `"tokens":[]`},
		{"PresenceList", api.PresenceList{Presence: apiPresences(nil)}, `"presence":[]`},
	}
	for _, tc := range cases {
		raw, _ := encode(t, tc.v)
		if !strings.Contains(raw, tc.want) {
			t.Errorf("%s = %s, want %s", tc.schema, raw, tc.want)
		}
		if strings.Contains(raw, "next_cursor") && !strings.Contains(raw, `"next_cursor":null`) {
			t.Errorf("%s: next_cursor should be null on the last page: %s", tc.schema, raw)
		}
		conformsTo(t, tc.schema, tc.v)
	}
}

func TestCursor(t *testing.T) {
	if c := apiCursor("abc"); c == nil || *c != "abc" {
		t.Errorf("apiCursor(abc) = %v", c)
	}
	if c := apiCursor(""); c != nil {
		t.Errorf("apiCursor(\"\") = %q, want nil", *c)
	}
}

func TestMembersAndPresence(t *testing.T) {
	ms := apiMembers([]chat.Member{{ConversationID: "c", UserID: "alice", Role: chat.RoleOwner, JoinedAt: t0, LastReadSeq: 5}})
	raw, _ := encode(t, ms[0])
	if raw != `{"joined_at":"2025-01-31T12:34:56.789Z","role":"owner","user_id":"alice"}` {
		t.Errorf("member = %s", raw)
	}
	conformsTo(t, "Member", ms[0])

	seen := t0
	ps := apiPresences([]chat.PresenceInfo{{UserID: "bob", Online: false, LastSeenAt: &seen}, {UserID: "carol", Online: true}})
	raw, _ = encode(t, api.PresenceList{Presence: ps})
	want := `{"presence":[{"last_seen_at":"2025-01-31T12:34:56.789Z","online":false,"user_id":"bob"},{"online":true,"user_id":"carol"}]}`
	if raw != want {
		t.Errorf("presence = %s, want %s", raw, want)
	}
	conformsTo(t, "PresenceList", api.PresenceList{Presence: ps})
}

func TestTokens(t *testing.T) {
	exp := t0.Add(time.Hour)
	never := chat.Token{ID: "tok_1", UserID: "alice", Kind: chat.TokenAPI, Name: "bot", CreatedAt: t0}
	_, got := encode(t, apiToken(never))
	if v, ok := got["expires_at"]; !ok || v != nil {
		t.Errorf("expires_at = %v (present %v), want null", v, ok)
	}
	if v, ok := got["last_used_at"]; !ok || v != nil {
		t.Errorf("last_used_at = %v (present %v), want null", v, ok)
	}
	conformsTo(t, "ApiToken", apiToken(never))

	iss := chat.Issued{Token: chat.Token{ID: "tok_2", Name: "ci", CreatedAt: t0, ExpiresAt: &exp}, Secret: "imd_secret"}
	created := apiTokenCreated(iss)
	if created.AccessToken != "imd_secret" || created.ID != "tok_2" || created.ExpiresAt == nil || !created.ExpiresAt.Equal(exp) {
		t.Errorf("token created = %+v", created)
	}
	conformsTo(t, "ApiTokenCreated", created)
}

func TestAuthResponse(t *testing.T) {
	exp := t0.Add(24 * time.Hour)
	res := chat.AuthResult{User: chat.User{ID: "alice", DisplayName: "Alice", CreatedAt: t0, PasswordHash: "h"},
		Issued: chat.Issued{Token: chat.Token{ID: "tok_s", ExpiresAt: &exp}, Secret: "imd_s"}}
	out := apiAuth(res)
	raw, got := encode(t, out)
	if got["token_type"] != "Bearer" || got["access_token"] != "imd_s" || got["expires_at"] != "2025-02-01T12:34:56.789Z" {
		t.Errorf("auth = %s", raw)
	}
	if strings.Contains(raw, "password") {
		t.Errorf("password hash leaked: %s", raw)
	}
	conformsTo(t, "AuthResponse", out)
	conformsTo(t, "User", apiUser(res.User))
}

func TestSendRequest(t *testing.T) {
	ptr := func(s string) *string { return &s }

	if _, err := sendRequest(nil, nil); !chat.IsCode(err, chat.CodeInvalid) {
		t.Errorf("nil body: err = %v, want invalid_request", err)
	}

	r, err := sendRequest(&api.SendMessageRequest{Text: "a"}, nil)
	if err != nil || r.Text != "a" || r.ClientMsgID != "" || r.Metadata != nil {
		t.Errorf("plain: %+v, %v", r, err)
	}

	r, err = sendRequest(&api.SendMessageRequest{Text: "a", ClientMsgID: ptr("k")}, nil)
	if err != nil || r.ClientMsgID != "k" {
		t.Errorf("body key: %+v, %v", r, err)
	}

	r, err = sendRequest(&api.SendMessageRequest{Text: "a"}, ptr("h"))
	if err != nil || r.ClientMsgID != "h" {
		t.Errorf("header key: %+v, %v", r, err)
	}

	r, err = sendRequest(&api.SendMessageRequest{Text: "a", ClientMsgID: ptr("same")}, ptr("same"))
	if err != nil || r.ClientMsgID != "same" {
		t.Errorf("agreeing keys: %+v, %v", r, err)
	}

	_, err = sendRequest(&api.SendMessageRequest{Text: "a", ClientMsgID: ptr("x")}, ptr("y"))
	if e := chat.AsError(err); e.Code != chat.CodeInvalid || len(e.Fields) != 1 || e.Fields[0].Field != "client_msg_id" {
		t.Errorf("differing keys: err = %v, want invalid client_msg_id", err)
	}

	r, err = sendRequest(&api.SendMessageRequest{Text: "a", Metadata: rawp(`{"k":"v"}`)}, nil)
	if err != nil || string(r.Metadata) != `{"k":"v"}` {
		t.Errorf("metadata: %s, %v", r.Metadata, err)
	}
	r, err = sendRequest(&api.SendMessageRequest{Text: "a", Metadata: rawp(`{}`)}, nil)
	if err != nil || string(r.Metadata) != `{}` {
		t.Errorf("empty metadata: %s, %v", r.Metadata, err)
	}
}

func TestSessionCookie(t *testing.T) {
	s := &Server{cfg: Config{CookieSecure: true}}
	c := s.sessionCookie("imd_x")
	c.Expires = t0
	c.MaxAge = 60
	got := c.String()
	for _, want := range []string{"imd_session=imd_x", "Path=/", "HttpOnly", "SameSite=Lax", "Secure", "Max-Age=60", "Expires="} {
		if !strings.Contains(got, want) {
			t.Errorf("cookie %q lacks %q", got, want)
		}
	}

	s.cfg.CookieSecure = false
	clear := s.sessionCookie("")
	clear.MaxAge = -1
	if got, want := clear.String(), "imd_session=; Path=/; Max-Age=0; HttpOnly; SameSite=Lax"; got != want {
		t.Errorf("clearing cookie = %q, want %q", got, want)
	}
}

func rawp(s string) *json.RawMessage { r := json.RawMessage(s); return &r }
