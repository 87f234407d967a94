package main

import (
	"context"
	"net/url"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/jmoiron/sqlx"
	"github.com/stretchr/testify/require"

	"imd/store"
)

// Helpers shared by the routes_*_test.go files: small wrappers over the
// harness's client that keep each test about the behaviour it proves.

// wireMsg is a message as the API returns it.
type wireMsg struct {
	ID             string         `json:"id"`
	ConversationID string         `json:"conversation_id"`
	Seq            int64          `json:"seq"`
	SenderID       string         `json:"sender_id"`
	Text           string         `json:"text"`
	Metadata       map[string]any `json:"metadata"`
	ClientMsgID    *string        `json:"client_msg_id"`
	CreatedAt      string         `json:"created_at"`
}

// wireConv is a conversation as the API returns it.
type wireConv struct {
	ID             string   `json:"id"`
	Type           string   `json:"type"`
	Title          string   `json:"title"`
	CreatedAt      string   `json:"created_at"`
	LastSeq        int64    `json:"last_seq"`
	LastReadSeq    int64    `json:"last_read_seq"`
	UnreadCount    int64    `json:"unread_count"`
	LastMessage    *wireMsg `json:"last_message"`
	LastActivityAt string   `json:"last_activity_at"`
	MemberCount    int      `json:"member_count"`
	PeerID         *string  `json:"peer_id"`
}

type wireMember struct {
	UserID   string `json:"user_id"`
	Role     string `json:"role"`
	JoinedAt string `json:"joined_at"`
}

type msgPage struct {
	Messages []wireMsg `json:"messages"`
	HasMore  bool      `json:"has_more"`
}

type convPage struct {
	Conversations []wireConv `json:"conversations"`
	NextCursor    *string    `json:"next_cursor"`
}

type memberPage struct {
	Members    []wireMember `json:"members"`
	NextCursor *string      `json:"next_cursor"`
}

// requireInvalid checks a 400 invalid_request problem that names field in
// errors[].field.
func requireInvalid(t *testing.T, r resp, field string) {
	t.Helper()
	p := r.Problem(t, 400, "invalid_request")
	require.Contains(t, problemFields(p), field, "errors[].field of %s", r.Body)
}

// problemFields lists errors[].field of a problem document.
func problemFields(p map[string]any) []string {
	var out []string
	errs, _ := p["errors"].([]any)
	for _, e := range errs {
		if m, ok := e.(map[string]any); ok {
			f, _ := m["field"].(string)
			out = append(out, f)
		}
	}
	return out
}

// group creates a group owned by u with the given members and returns its id.
func apiGroup(t *testing.T, u user, title string, members ...string) string {
	t.Helper()
	if members == nil {
		members = []string{}
	}
	r := u.do("POST", "/v1/conversations", map[string]any{"type": "group", "title": title, "member_ids": members})
	require.Equal(t, 201, r.Status, "%s", r.Body)
	return r.M(t)["id"].(string)
}

// direct opens u's direct conversation with peer and returns its id.
func apiDirect(t *testing.T, u user, peer string) string {
	t.Helper()
	r := u.do("POST", "/v1/conversations", map[string]any{"type": "direct", "member_ids": []string{peer}})
	require.Contains(t, []int{200, 201}, r.Status, "%s", r.Body)
	return r.M(t)["id"].(string)
}

// send posts text into cid as u and requires 201.
func apiSend(t *testing.T, u user, cid, text string, headers ...string) wireMsg {
	t.Helper()
	r := u.do("POST", path("/v1/conversations/%s/messages", cid), map[string]any{"text": text}, headers...)
	require.Equal(t, 201, r.Status, "%s", r.Body)
	var m wireMsg
	r.JSON(t, &m)
	return m
}

// conv fetches cid as u.
func apiConv(t *testing.T, u user, cid string) wireConv {
	t.Helper()
	r := u.do("GET", path("/v1/conversations/%s", cid), nil)
	require.Equal(t, 200, r.Status, "%s", r.Body)
	var c wireConv
	r.JSON(t, &c)
	return c
}

// history fetches one page of cid's messages as u with the raw query q.
func apiHistory(t *testing.T, u user, cid, q string) msgPage {
	t.Helper()
	p := path("/v1/conversations/%s/messages", cid)
	if q != "" {
		p += "?" + q
	}
	r := u.do("GET", p, nil)
	require.Equal(t, 200, r.Status, "%s", r.Body)
	var pg msgPage
	r.JSON(t, &pg)
	return pg
}

// listConvs fetches the first page of u's conversations.
func apiConvList(t *testing.T, u user, q string) convPage {
	t.Helper()
	p := "/v1/conversations"
	if q != "" {
		p += "?" + q
	}
	r := u.do("GET", p, nil)
	require.Equal(t, 200, r.Status, "%s", r.Body)
	var pg convPage
	r.JSON(t, &pg)
	// Every page is ordered by its own last_activity_at, newest first, ties
	// by id descending (openapi.yaml).
	for i := 1; i < len(pg.Conversations); i++ {
		a, b := pg.Conversations[i-1], pg.Conversations[i]
		ta, err := time.Parse(time.RFC3339Nano, a.LastActivityAt)
		require.NoError(t, err)
		tb, err := time.Parse(time.RFC3339Nano, b.LastActivityAt)
		require.NoError(t, err)
		require.True(t, ta.After(tb) || (ta.Equal(tb) && a.ID > b.ID),
			"conversation %d (%s at %s) is listed after %s at %s", i, b.ID, b.LastActivityAt, a.ID, a.LastActivityAt)
	}
	return pg
}

// members lists cid's members as u, by user id.
func apiMembers(t *testing.T, u user, cid string) map[string]string {
	t.Helper()
	r := u.do("GET", path("/v1/conversations/%s/members", cid), nil)
	require.Equal(t, 200, r.Status, "%s", r.Body)
	var pg memberPage
	r.JSON(t, &pg)
	out := map[string]string{}
	for _, m := range pg.Members {
		out[m.UserID] = m.Role
	}
	return out
}

func apiSeqs(ms []wireMsg) []int64 {
	out := make([]int64, len(ms))
	for i, m := range ms {
		out[i] = m.Seq
	}
	return out
}

func apiConvIDs(cs []wireConv) []string {
	out := make([]string, len(cs))
	for i, c := range cs {
		out[i] = c.ID
	}
	return out
}

// seqRange is lo..hi inclusive.
func apiSeqRange(lo, hi int64) []int64 {
	var out []int64
	for s := lo; s <= hi; s++ {
		out = append(out, s)
	}
	return out
}

// openDB opens the test's schema directly, for what the API cannot do on
// purpose (expiring a token now) and for checking what is stored. It is
// closed before the schema is dropped (cleanups run last-in first-out).
// Opened through the store, so a sqlite: URL (the embedded test mode) gets
// the store's connection settings (times as the store writes them); write
// statements that both databases accept ($N placeholders, Go values rather
// than now()).
func apiDB(t *testing.T, dsn string) *sqlx.DB {
	t.Helper()
	st, err := store.Open(context.Background(), dsn)
	require.NoError(t, err)
	t.Cleanup(func() { st.Close() })
	return st.DB()
}

// hostPort returns the host:port of a postgres:// or redis:// URL.
func apiHostPort(t *testing.T, raw string) string {
	t.Helper()
	u, err := url.Parse(raw)
	require.NoError(t, err)
	require.NotEmpty(t, u.Host, "URL %q has no host", raw)
	if u.Port() == "" {
		switch u.Scheme {
		case "redis", "rediss":
			return u.Hostname() + ":6379"
		default:
			return u.Hostname() + ":5432"
		}
	}
	return u.Host
}

// withHost returns raw with its host:port replaced (query, e.g. the
// search_path of testenv.DatabaseURL, kept).
func apiWithHost(t *testing.T, raw, hostport string) string {
	t.Helper()
	u, err := url.Parse(raw)
	require.NoError(t, err)
	u.Host = hostport
	return u.String()
}

// cookieAttrs splits a Set-Cookie header into its attributes, lower-cased
// names, for checking HttpOnly and SameSite.
func cookieAttrs(setCookie string) []string {
	var out []string
	for _, p := range strings.Split(setCookie, ";") {
		out = append(out, strings.ToLower(strings.TrimSpace(p)))
	}
	return out
}

// hasAttr reports whether attrs contains a (lower case).
func hasAttr(attrs []string, a string) bool { return slices.Contains(attrs, a) }
