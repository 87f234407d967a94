package main

import (
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"imd/internal/testenv"
)

// TestRoutesGroupCreate: a group is created with the caller as owner, the
// view fields are right, duplicates and self are ignored, and bad input is a
// 400 naming the field that creates nothing.
func TestRoutesGroupCreate(t *testing.T) {
	t.Parallel()
	srv := startServer(t)
	alice := register(t, srv.URL, "alice")
	bob := register(t, srv.URL, "bob")
	register(t, srv.URL, "carol")
	dave := register(t, srv.URL, "dave")

	r := alice.do("POST", "/v1/conversations", map[string]any{"type": "group", "title": "  Project X  ", "member_ids": []string{"bob", "carol", "bob", "alice"}})
	require.Equal(t, 201, r.Status, "%s", r.Body)
	var c wireConv
	r.JSON(t, &c)
	require.True(t, strings.HasPrefix(c.ID, "c_"), c.ID)
	require.Equal(t, "group", c.Type)
	require.Equal(t, "Project X", c.Title, "the title is trimmed")
	require.Equal(t, 3, c.MemberCount, "duplicates and the caller are counted once")
	require.Zero(t, c.LastSeq)
	require.Zero(t, c.LastReadSeq)
	require.Zero(t, c.UnreadCount)
	require.Nil(t, c.LastMessage)
	require.Nil(t, c.PeerID, "groups have no peer")
	require.Equal(t, c.CreatedAt, c.LastActivityAt, "activity starts at creation")
	require.Equal(t, map[string]string{"alice": "owner", "bob": "member", "carol": "member"}, apiMembers(t, alice, c.ID))
	// The other members see it too, with their own view.
	seen := apiConv(t, bob, c.ID)
	require.Equal(t, "Project X", seen.Title)
	require.Equal(t, 3, seen.MemberCount)
	require.Equal(t, []string{c.ID}, apiConvIDs(apiConvList(t, bob, "").Conversations))

	// A group of one (only the owner) is allowed.
	solo := apiGroup(t, alice, "notes")
	require.Equal(t, 1, apiConv(t, alice, solo).MemberCount)
	// 128 characters of two bytes each: the limit is in characters.
	r = alice.do("POST", "/v1/conversations", map[string]any{"type": "group", "title": strings.Repeat("é", 128), "member_ids": []string{}})
	require.Equal(t, 201, r.Status, "%s", r.Body)

	// Bad input: 400 naming the field; dave, who makes every attempt, ends
	// up in no conversation at all.
	for _, tc := range []struct {
		body  any
		field string
	}{
		{map[string]any{"type": "group", "title": "x", "member_ids": []string{"bob", "nobody"}}, "member_ids"},
		{map[string]any{"type": "group", "member_ids": []string{"bob"}}, "title"},
		{map[string]any{"type": "group", "title": "", "member_ids": []string{"bob"}}, "title"},
		{map[string]any{"type": "group", "title": "   ", "member_ids": []string{"bob"}}, "title"},
		{map[string]any{"type": "group", "title": strings.Repeat("t", 129), "member_ids": []string{"bob"}}, "title"},
		{map[string]any{"type": "channel", "title": "x", "member_ids": []string{"bob"}}, "type"},
		{map[string]any{"type": "group", "title": "x"}, "member_ids"},
		{map[string]any{"type": "group", "title": "x", "member_ids": []string{"Not A User"}}, "member_ids.0"},
		{map[string]any{"type": "group", "title": "x", "member_ids": []string{}, "topic": "y"}, "topic"},
	} {
		r := dave.do("POST", "/v1/conversations", tc.body)
		p := r.Problem(t, 400, "invalid_request")
		fields := problemFields(p)
		require.True(t, hasPrefixIn(fields, tc.field), "want a field %q in %v: %s", tc.field, fields, r.Body)
	}
	require.Empty(t, apiConvList(t, dave, "").Conversations, "failed creations stored nothing")
}

func hasPrefixIn(fields []string, prefix string) bool {
	for _, f := range fields {
		if strings.HasPrefix(f, prefix) {
			return true
		}
	}
	return false
}

// TestRoutesDirect: one direct conversation per pair, 201 then 200 with the
// same id from either side; its view has peer_id and no title; its
// membership and title cannot change (403); bad requests are 400.
func TestRoutesDirect(t *testing.T) {
	t.Parallel()
	srv := startServer(t)
	alice := register(t, srv.URL, "alice")
	bob := register(t, srv.URL, "bob")
	register(t, srv.URL, "carol")

	r := alice.do("POST", "/v1/conversations", map[string]any{"type": "direct", "member_ids": []string{"bob"}})
	require.Equal(t, 201, r.Status, "%s", r.Body)
	var c wireConv
	r.JSON(t, &c)
	require.Equal(t, "direct", c.Type)
	require.Equal(t, "", c.Title)
	require.Equal(t, 2, c.MemberCount)
	require.NotNil(t, c.PeerID)
	require.Equal(t, "bob", *c.PeerID)

	r = alice.do("POST", "/v1/conversations", map[string]any{"type": "direct", "member_ids": []string{"bob"}})
	require.Equal(t, 200, r.Status, "%s", r.Body)
	require.Equal(t, c.ID, r.M(t)["id"])
	r = bob.do("POST", "/v1/conversations", map[string]any{"type": "direct", "member_ids": []string{"alice"}})
	require.Equal(t, 200, r.Status, "%s", r.Body)
	var fromBob wireConv
	r.JSON(t, &fromBob)
	require.Equal(t, c.ID, fromBob.ID)
	require.Equal(t, "alice", *fromBob.PeerID)
	require.Equal(t, map[string]string{"alice": "member", "bob": "member"}, apiMembers(t, bob, c.ID))
	require.Len(t, apiConvList(t, alice, "").Conversations, 1)

	for _, tc := range []struct {
		body  any
		field string
	}{
		{map[string]any{"type": "direct", "member_ids": []string{"alice"}}, "member_ids"},
		{map[string]any{"type": "direct", "member_ids": []string{"bob", "carol"}}, "member_ids"},
		{map[string]any{"type": "direct", "member_ids": []string{}}, "member_ids"},
		{map[string]any{"type": "direct", "member_ids": []string{"nobody"}}, "member_ids"},
		{map[string]any{"type": "direct", "title": "x", "member_ids": []string{"carol"}}, "title"},
	} {
		r := alice.do("POST", "/v1/conversations", tc.body)
		p := r.Problem(t, 400, "invalid_request")
		require.True(t, hasPrefixIn(problemFields(p), tc.field), "want %q: %s", tc.field, r.Body)
	}
	require.Len(t, apiConvList(t, alice, "").Conversations, 1, "nothing created")

	// A direct conversation's title and membership are fixed.
	alice.do("PATCH", path("/v1/conversations/%s", c.ID), map[string]any{"title": "x"}).Problem(t, 403, "forbidden")
	alice.do("POST", path("/v1/conversations/%s/members", c.ID), map[string]any{"user_ids": []string{"carol"}}).Problem(t, 403, "forbidden")
	alice.do("PATCH", path("/v1/conversations/%s/members/bob", c.ID), map[string]any{"role": "admin"}).Problem(t, 403, "forbidden")
	alice.do("DELETE", path("/v1/conversations/%s/members/bob", c.ID), nil).Problem(t, 403, "forbidden")
	alice.do("DELETE", path("/v1/conversations/%s/members/alice", c.ID), nil).Problem(t, 403, "forbidden")
	require.Equal(t, map[string]string{"alice": "member", "bob": "member"}, apiMembers(t, alice, c.ID))
	require.Equal(t, "", apiConv(t, alice, c.ID).Title)
}

// TestRoutesConversationList: most recent activity first; sending into an
// older conversation moves it to the top with its last_message; the views
// carry peer_id for direct conversations and member_count.
func TestRoutesConversationList(t *testing.T) {
	t.Parallel()
	srv := startServer(t)
	alice := register(t, srv.URL, "alice")
	bob := register(t, srv.URL, "bob")
	register(t, srv.URL, "carol")

	// Distinct creation milliseconds, so the order is by time, not by the
	// id tie-break.
	var ids []string
	for _, mk := range []func() string{
		func() string { return apiGroup(t, alice, "first", "bob", "carol") },
		func() string { return apiDirect(t, alice, "bob") },
		func() string { return apiGroup(t, alice, "third") },
	} {
		ids = append(ids, mk())
		nextMilli(t)
	}
	require.Equal(t, []string{ids[2], ids[1], ids[0]}, apiConvIDs(apiConvList(t, alice, "").Conversations))

	m := apiSend(t, bob, ids[0], "bump")
	pg := apiConvList(t, alice, "")
	require.Nil(t, pg.NextCursor)
	require.Equal(t, []string{ids[0], ids[2], ids[1]}, apiConvIDs(pg.Conversations))
	top := pg.Conversations[0]
	require.NotNil(t, top.LastMessage)
	require.Equal(t, m.ID, top.LastMessage.ID)
	require.Equal(t, "bump", top.LastMessage.Text)
	require.Equal(t, "bob", top.LastMessage.SenderID)
	require.Equal(t, m.CreatedAt, top.LastActivityAt)
	require.EqualValues(t, 1, top.LastSeq)
	require.EqualValues(t, 1, top.UnreadCount)
	require.Equal(t, 3, top.MemberCount)
	require.Nil(t, top.PeerID)
	dm := pg.Conversations[2]
	require.Equal(t, "direct", dm.Type)
	require.Equal(t, "bob", *dm.PeerID)
	require.Equal(t, 2, dm.MemberCount)
	require.Nil(t, dm.LastMessage)

	// Bob sees only his two, his own send not unread.
	pg = apiConvList(t, bob, "")
	require.Equal(t, []string{ids[0], ids[1]}, apiConvIDs(pg.Conversations))
	require.Zero(t, pg.Conversations[0].UnreadCount)
	require.Equal(t, "alice", *pg.Conversations[1].PeerID)

	// Alice's reply into the direct conversation moves it up for both.
	nextMilli(t)
	apiSend(t, alice, ids[1], "hi")
	require.Equal(t, []string{ids[1], ids[0], ids[2]}, apiConvIDs(apiConvList(t, alice, "").Conversations))
	require.Equal(t, []string{ids[1], ids[0]}, apiConvIDs(apiConvList(t, bob, "").Conversations))
}

// nextMilli waits (polling the clock, not sleeping a guessed time) until
// the wall clock has moved to a later millisecond.
func nextMilli(t *testing.T) {
	now := time.Now().UnixMilli()
	testenv.Eventually(t, time.Second, func() bool { return time.Now().UnixMilli() > now+1 })
}

// TestRoutesConversationPagination pages 7 conversations with limit=3: each
// is seen exactly once, in the order of the full list, and next_cursor is
// null at the end; bad cursors and limits are 400 naming the parameter.
func TestRoutesConversationPagination(t *testing.T) {
	t.Parallel()
	srv := startServer(t)
	alice := register(t, srv.URL, "alice")
	for i := range 7 {
		apiGroup(t, alice, path("g%d", i))
	}
	full := apiConvIDs(apiConvList(t, alice, "").Conversations)
	require.Len(t, full, 7)

	var seen []string
	var sizes []int
	cursor := ""
	for range 10 {
		q := "limit=3"
		if cursor != "" {
			q += "&cursor=" + cursor
		}
		pg := apiConvList(t, alice, q)
		seen = append(seen, apiConvIDs(pg.Conversations)...)
		sizes = append(sizes, len(pg.Conversations))
		if pg.NextCursor == nil {
			break
		}
		cursor = *pg.NextCursor
		require.NotEmpty(t, cursor)
	}
	require.Equal(t, []int{3, 3, 1}, sizes)
	require.Equal(t, full, seen, "every conversation exactly once, in order")

	// limit=7 fits exactly: no next page.
	pg := apiConvList(t, alice, "limit=7")
	require.Len(t, pg.Conversations, 7)
	require.Nil(t, pg.NextCursor)

	for q, field := range map[string]string{
		"cursor=!!!":                         "cursor",
		"cursor=Zm9v":                        "cursor", // base64 of "foo"
		"limit=0":                            "limit",
		"limit=201":                          "limit",
		"limit=abc":                          "limit",
		"limit=-1":                           "limit",
		"cursor=" + strings.Repeat("A", 300): "cursor",
	} {
		requireInvalid(t, alice.do("GET", "/v1/conversations?"+q, nil), field)
	}
	require.Len(t, apiConvList(t, alice, "limit=200").Conversations, 7)

	// Members pages the same way.
	register(t, srv.URL, "bob")
	register(t, srv.URL, "carol")
	register(t, srv.URL, "dave")
	cid := apiGroup(t, alice, "m", "bob", "carol", "dave")
	var got []string
	cursor = ""
	for range 5 {
		q := path("/v1/conversations/%s/members?limit=3", cid)
		if cursor != "" {
			q += "&cursor=" + cursor
		}
		r := alice.do("GET", q, nil)
		require.Equal(t, 200, r.Status, "%s", r.Body)
		var mp memberPage
		r.JSON(t, &mp)
		for _, m := range mp.Members {
			got = append(got, m.UserID)
		}
		if mp.NextCursor == nil {
			break
		}
		cursor = *mp.NextCursor
	}
	require.ElementsMatch(t, []string{"alice", "bob", "carol", "dave"}, got)
	require.Len(t, got, 4)
	requireInvalid(t, alice.do("GET", path("/v1/conversations/%s/members?cursor=!!", cid), nil), "cursor")
	requireInvalid(t, alice.do("GET", path("/v1/conversations/%s/members?limit=0", cid), nil), "limit")
}

// TestRoutesConversationGetPatch: GET and PATCH (title) by role.
func TestRoutesConversationGetPatch(t *testing.T) {
	t.Parallel()
	srv := startServer(t)
	alice := register(t, srv.URL, "alice")
	bob := register(t, srv.URL, "bob")
	carol := register(t, srv.URL, "carol")
	cid := apiGroup(t, alice, "before", "bob", "carol")

	got := apiConv(t, bob, cid)
	require.Equal(t, "before", got.Title)
	require.Equal(t, 3, got.MemberCount)

	r := alice.do("PATCH", path("/v1/conversations/%s", cid), map[string]any{"title": "after"})
	require.Equal(t, 200, r.Status, "%s", r.Body)
	require.Equal(t, "after", r.M(t)["title"])
	require.Equal(t, "after", apiConv(t, carol, cid).Title)

	// A member may not rename; an admin may.
	bob.do("PATCH", path("/v1/conversations/%s", cid), map[string]any{"title": "bob's"}).Problem(t, 403, "forbidden")
	require.Equal(t, "after", apiConv(t, alice, cid).Title)
	require.Equal(t, 200, alice.do("PATCH", path("/v1/conversations/%s/members/bob", cid), map[string]any{"role": "admin"}).Status)
	r = bob.do("PATCH", path("/v1/conversations/%s", cid), map[string]any{"title": "bob's"})
	require.Equal(t, 200, r.Status, "%s", r.Body)
	require.Equal(t, "bob's", apiConv(t, carol, cid).Title)

	for _, body := range []map[string]any{
		{"title": ""},
		{"title": "  "},
		{"title": strings.Repeat("t", 129)},
		{},
	} {
		requireInvalid(t, alice.do("PATCH", path("/v1/conversations/%s", cid), body), "title")
	}
	requireInvalid(t, alice.do("PATCH", path("/v1/conversations/%s", cid), map[string]any{"title": "x", "type": "direct"}), "type")
	require.Equal(t, "bob's", apiConv(t, alice, cid).Title)
}

// TestRoutesMembers: list, add (already-members skipped), role changes
// (owner only), removal by role, leaving, and promotion when the owner leaves.
func TestRoutesMembers(t *testing.T) {
	t.Parallel()
	srv := startServer(t)
	alice := register(t, srv.URL, "alice")
	bob := register(t, srv.URL, "bob")
	carol := register(t, srv.URL, "carol")
	dave := register(t, srv.URL, "dave")
	register(t, srv.URL, "erin")
	cid := apiGroup(t, alice, "team", "bob")

	r := alice.do("GET", path("/v1/conversations/%s/members", cid), nil)
	require.Equal(t, 200, r.Status)
	var mp memberPage
	r.JSON(t, &mp)
	require.Len(t, mp.Members, 2)
	require.Nil(t, mp.NextCursor)
	for _, m := range mp.Members {
		_, err := time.Parse(time.RFC3339, m.JoinedAt)
		require.NoError(t, err)
	}

	// Add: bob is already in and skipped; only carol is returned.
	r = alice.do("POST", path("/v1/conversations/%s/members", cid), map[string]any{"user_ids": []string{"carol", "bob", "carol"}})
	require.Equal(t, 200, r.Status, "%s", r.Body)
	var added memberPage
	r.JSON(t, &added)
	require.Len(t, added.Members, 1)
	require.Equal(t, "carol", added.Members[0].UserID)
	require.Equal(t, "member", added.Members[0].Role)
	require.Equal(t, 3, apiConv(t, carol, cid).MemberCount)
	r = alice.do("POST", path("/v1/conversations/%s/members", cid), map[string]any{"user_ids": []string{"bob"}})
	require.Equal(t, 200, r.Status)
	r.JSON(t, &added)
	require.Empty(t, added.Members)
	require.Equal(t, 3, apiConv(t, alice, cid).MemberCount)

	// Bad additions name user_ids and add nobody.
	requireInvalid(t, alice.do("POST", path("/v1/conversations/%s/members", cid), map[string]any{"user_ids": []string{"dave", "nobody"}}), "user_ids")
	requireInvalid(t, alice.do("POST", path("/v1/conversations/%s/members", cid), map[string]any{"user_ids": []string{}}), "user_ids")
	requireInvalid(t, alice.do("POST", path("/v1/conversations/%s/members", cid), map[string]any{"user_ids": []string{"alice"}}), "user_ids")
	requireInvalid(t, alice.do("POST", path("/v1/conversations/%s/members", cid), map[string]any{}), "user_ids")
	require.Equal(t, map[string]string{"alice": "owner", "bob": "member", "carol": "member"}, apiMembers(t, alice, cid))

	// A plain member manages nothing.
	bob.do("POST", path("/v1/conversations/%s/members", cid), map[string]any{"user_ids": []string{"dave"}}).Problem(t, 403, "forbidden")
	bob.do("DELETE", path("/v1/conversations/%s/members/carol", cid), nil).Problem(t, 403, "forbidden")
	bob.do("PATCH", path("/v1/conversations/%s/members/carol", cid), map[string]any{"role": "admin"}).Problem(t, 403, "forbidden")
	bob.do("PATCH", path("/v1/conversations/%s/members/bob", cid), map[string]any{"role": "admin"}).Problem(t, 403, "forbidden")
	require.Equal(t, map[string]string{"alice": "owner", "bob": "member", "carol": "member"}, apiMembers(t, alice, cid))

	// The owner promotes bob.
	r = alice.do("PATCH", path("/v1/conversations/%s/members/bob", cid), map[string]any{"role": "admin"})
	require.Equal(t, 200, r.Status, "%s", r.Body)
	var m wireMember
	r.JSON(t, &m)
	require.Equal(t, "bob", m.UserID)
	require.Equal(t, "admin", m.Role)
	requireInvalid(t, alice.do("PATCH", path("/v1/conversations/%s/members/bob", cid), map[string]any{"role": "owner"}), "role")
	requireInvalid(t, alice.do("PATCH", path("/v1/conversations/%s/members/bob", cid), map[string]any{"role": "admin", "x": 1}), "x")
	alice.do("PATCH", path("/v1/conversations/%s/members/alice", cid), map[string]any{"role": "member"}).Problem(t, 400, "invalid_request")
	alice.do("PATCH", path("/v1/conversations/%s/members/dave", cid), map[string]any{"role": "admin"}).Problem(t, 404, "not_found")
	alice.do("PATCH", path("/v1/conversations/%s/members/nobody", cid), map[string]any{"role": "admin"}).Problem(t, 404, "not_found")

	// An admin adds and removes plain members...
	r = bob.do("POST", path("/v1/conversations/%s/members", cid), map[string]any{"user_ids": []string{"dave", "erin"}})
	require.Equal(t, 200, r.Status, "%s", r.Body)
	require.Equal(t, 204, bob.do("DELETE", path("/v1/conversations/%s/members/dave", cid), nil).Status)
	dave.do("GET", path("/v1/conversations/%s", cid), nil).Problem(t, 404, "not_found")
	bob.do("DELETE", path("/v1/conversations/%s/members/dave", cid), nil).Problem(t, 404, "not_found")
	// ...but neither the owner nor another admin, and changes no roles.
	bob.do("DELETE", path("/v1/conversations/%s/members/alice", cid), nil).Problem(t, 403, "forbidden")
	require.Equal(t, 200, alice.do("PATCH", path("/v1/conversations/%s/members/carol", cid), map[string]any{"role": "admin"}).Status)
	bob.do("DELETE", path("/v1/conversations/%s/members/carol", cid), nil).Problem(t, 403, "forbidden")
	bob.do("PATCH", path("/v1/conversations/%s/members/erin", cid), map[string]any{"role": "admin"}).Problem(t, 403, "forbidden")
	require.Equal(t, map[string]string{"alice": "owner", "bob": "admin", "carol": "admin", "erin": "member"}, apiMembers(t, alice, cid))

	// Demotion back to member.
	r = alice.do("PATCH", path("/v1/conversations/%s/members/carol", cid), map[string]any{"role": "member"})
	require.Equal(t, 200, r.Status)
	require.Equal(t, "member", r.M(t)["role"])

	// Anyone may leave: erin does, and no longer sees the group.
	require.Equal(t, 204, newClient(t, srv.URL, "").as(loginToken(t, srv.URL, "erin")).do("DELETE", path("/v1/conversations/%s/members/erin", cid), nil).Status)
	require.NotContains(t, apiMembers(t, alice, cid), "erin")

	// The owner leaves: the longest-standing admin (bob) becomes owner.
	require.Equal(t, 204, alice.do("DELETE", path("/v1/conversations/%s/members/alice", cid), nil).Status)
	alice.do("GET", path("/v1/conversations/%s", cid), nil).Problem(t, 404, "not_found")
	require.NotContains(t, apiConvIDs(apiConvList(t, alice, "").Conversations), cid)
	require.Equal(t, map[string]string{"bob": "owner", "carol": "member"}, apiMembers(t, carol, cid))
	require.Equal(t, 2, apiConv(t, carol, cid).MemberCount)

	// Without admins, the longest-standing member is promoted.
	g2 := apiGroup(t, alice, "g2", "carol")
	require.Equal(t, 200, alice.do("POST", path("/v1/conversations/%s/members", g2), map[string]any{"user_ids": []string{"dave"}}).Status)
	require.Equal(t, 204, alice.do("DELETE", path("/v1/conversations/%s/members/alice", g2), nil).Status)
	require.Equal(t, map[string]string{"carol": "owner", "dave": "member"}, apiMembers(t, dave, g2))
	// The new owner may manage.
	require.Equal(t, 200, carol.do("PATCH", path("/v1/conversations/%s", g2), map[string]any{"title": "carol's"}).Status)
}

// loginToken logs name in (register's password) and returns the token.
func loginToken(t *testing.T, base, name string) string {
	t.Helper()
	r := newClient(t, base, "").do("POST", "/v1/auth/login", map[string]any{"username": name, "password": "password-" + name})
	require.Equal(t, 200, r.Status, "%s", r.Body)
	return r.M(t)["access_token"].(string)
}

// TestRoutesNonMemberIs404 (G7): for every conversation route, a
// conversation the caller is not a member of answers exactly like one that
// does not exist (same status, code and detail), and the attempt changes
// nothing. A member who left is a non-member.
func TestRoutesNonMemberIs404(t *testing.T) {
	t.Parallel()
	srv := startServer(t)
	alice := register(t, srv.URL, "alice")
	register(t, srv.URL, "bob")
	eve := register(t, srv.URL, "eve")
	cid := apiGroup(t, alice, "secret", "bob")
	apiSend(t, alice, cid, "one")
	dm := apiDirect(t, alice, "bob")

	routes := []struct {
		method, path string
		body         any
	}{
		{"GET", "/v1/conversations/%s", nil},
		{"PATCH", "/v1/conversations/%s", map[string]any{"title": "mine"}},
		{"GET", "/v1/conversations/%s/members", nil},
		{"POST", "/v1/conversations/%s/members", map[string]any{"user_ids": []string{"eve"}}},
		{"PATCH", "/v1/conversations/%s/members/bob", map[string]any{"role": "admin"}},
		{"DELETE", "/v1/conversations/%s/members/bob", nil},
		{"DELETE", "/v1/conversations/%s/members/eve", nil},
		{"POST", "/v1/conversations/%s/messages", map[string]any{"text": "intrusion"}},
		{"POST", "/v1/conversations/%s/messages", map[string]any{"text": "intrusion", "client_msg_id": "k1"}},
		{"GET", "/v1/conversations/%s/messages", nil},
		{"GET", "/v1/conversations/%s/messages?after_seq=0", nil},
		{"GET", "/v1/conversations/%s/messages/1", nil},
		{"PUT", "/v1/conversations/%s/read", map[string]any{"seq": 1}},
		{"POST", "/v1/conversations/%s/typing", nil},
	}
	check := func(who user) {
		t.Helper()
		for _, rt := range routes {
			for _, target := range []string{cid, dm} {
				real := who.do(rt.method, path(rt.path, target), rt.body)
				none := who.do(rt.method, path(rt.path, "c_doesnotexist0000000"), rt.body)
				pr := real.Problem(t, 404, "not_found")
				pn := none.Problem(t, 404, "not_found")
				require.Equal(t, pn, pr, "%s %s: a non-member must not learn that it exists", rt.method, rt.path)
			}
		}
	}
	check(eve)
	// Nothing changed.
	got := apiConv(t, alice, cid)
	require.Equal(t, "secret", got.Title)
	require.EqualValues(t, 1, got.LastSeq)
	require.Equal(t, map[string]string{"alice": "owner", "bob": "member"}, apiMembers(t, alice, cid))
	require.Empty(t, apiConvList(t, eve, "").Conversations)

	// A former member is a non-member too.
	require.Equal(t, 200, alice.do("POST", path("/v1/conversations/%s/members", cid), map[string]any{"user_ids": []string{"eve"}}).Status)
	require.Equal(t, 204, alice.do("DELETE", path("/v1/conversations/%s/members/eve", cid), nil).Status)
	for _, rt := range routes {
		real := eve.do(rt.method, path(rt.path, cid), rt.body)
		none := eve.do(rt.method, path(rt.path, "c_doesnotexist0000000"), rt.body)
		require.Equal(t, none.Problem(t, 404, "not_found"), real.Problem(t, 404, "not_found"), "%s %s", rt.method, rt.path)
	}
	require.EqualValues(t, 1, apiConv(t, alice, cid).LastSeq)
}
