// Package storetest is the conformance suite of the chat.Store port: the
// behaviour every implementation must have: the store package over
// PostgreSQL (store_test.go) and over SQLite, the embedded mode
// (sqlite_test.go) (DESIGN.md §3, §6: one suite per port, as in
// centrifuge). It uses nothing but the chat.Store interface, so that a test
// failing here is a difference in behaviour, never in implementation.
//
// Each subtest opens its own, empty store and may run in parallel with the
// others. Concurrency tests (G2, G3, single-use tickets, direct
// get-or-create) really race: an implementation that serialises everything
// passes them trivially, which is fine; one that races wrongly does not.
package storetest

import (
	"cmp"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"reflect"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"imd/chat"
	"imd/internal/testenv"
)

// Run runs the suite; open returns a new, empty, migrated store for one
// subtest and arranges its closing with t.Cleanup.
func Run(t *testing.T, open func(t *testing.T) chat.Store) {
	tests := []struct {
		name string
		fn   func(f *fixture)
	}{
		{"Users", testUsers},
		{"Tokens", testTokens},
		{"Tickets", testTickets},
		{"DirectConversation", testDirectConversation},
		{"CreateGroup", testCreateGroup},
		{"CreateGroupUnknownMembers", testCreateGroupUnknownMembers},
		{"AddMembers", testAddMembers},
		{"SetRoleAndRemoveMember", testSetRoleAndRemoveMember},
		{"OwnerSuccession", testOwnerSuccession},
		{"MembersPages", testMembersPages},
		{"SharingWithAndDirectPeers", testSharingWithAndDirectPeers},
		{"SetTitle", testSetTitle},
		{"Send", testSend},
		{"SendIdempotent", testSendIdempotent},
		{"SendOrder", testSendOrder},
		{"SendNonMember", testSendNonMember},
		{"SendManyConversations", testSendManyConversations},
		{"UnreadAndMarkRead", testUnreadAndMarkRead},
		{"ConversationViews", testConversationViews},
		{"ActivityPage", testActivityPage},
		{"Outbox", testOutbox},
		{"PendingMessages", testPendingMessages},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
			t.Cleanup(cancel)
			tc.fn(&fixture{t: t, s: open(t), ctx: ctx, now: chat.Now()})
		})
	}
}

// fixture carries one subtest's store and helpers.
type fixture struct {
	t   *testing.T
	s   chat.Store
	ctx context.Context
	now time.Time // the subtest's base time (chat.Now at start)
	ids atomic.Int64
}

func (f *fixture) id(prefix string) string {
	return fmt.Sprintf("%s%d", prefix, f.ids.Add(1))
}

func (f *fixture) users(ids ...string) {
	f.t.Helper()
	for _, id := range ids {
		require.NoError(f.t, f.s.CreateUser(f.ctx, chat.User{ID: id, DisplayName: "User " + id, CreatedAt: f.now}))
	}
}

func (f *fixture) group(id, owner string, members ...string) chat.Conversation {
	f.t.Helper()
	c, _, err := f.s.CreateGroup(f.ctx, chat.NewGroup{ID: id, Title: "group " + id, OwnerID: owner,
		MemberIDs: members, CreatedAt: f.now})
	require.NoError(f.t, err)
	return c
}

func (f *fixture) newMessage(cid, sender, text string) chat.NewMessage {
	return chat.NewMessage{ID: f.id("m"), ConversationID: cid, SenderID: sender, Text: text, CreatedAt: chat.Now()}
}

func (f *fixture) send(cid, sender, text string) chat.Message {
	f.t.Helper()
	m, created, _, err := f.s.Send(f.ctx, f.newMessage(cid, sender, text))
	require.NoError(f.t, err)
	require.True(f.t, created)
	return m
}

func (f *fixture) view(cid, viewer string) chat.Conversation {
	f.t.Helper()
	c, err := f.s.Conversation(f.ctx, cid, viewer)
	require.NoError(f.t, err)
	return c
}

// claimAll claims every event currently claimable (olderThan far ahead).
func (f *fixture) claimAll(lease time.Duration) []chat.OutboxEvent {
	f.t.Helper()
	evs, err := f.s.ClaimEvents(f.ctx, time.Now().Add(time.Hour), lease, 1000)
	require.NoError(f.t, err)
	return evs
}

func requireCode(t *testing.T, err error, code chat.Code, msgAndArgs ...any) {
	t.Helper()
	require.Error(t, err, msgAndArgs...)
	var ce *chat.Error
	require.True(t, errors.As(err, &ce), "want a *chat.Error, got %T: %v", err, err)
	require.Equal(t, code, ce.Code, "error: %v %v", err, fmt.Sprint(msgAndArgs...))
}

func requireInvalid(t *testing.T, err error, field string) {
	t.Helper()
	requireCode(t, err, chat.CodeInvalid)
	var ce *chat.Error
	require.True(t, errors.As(err, &ce))
	require.NotEmpty(t, ce.Fields, "an invalid-request error names its field")
	require.Equal(t, field, ce.Fields[0].Field)
}

func memberEvent(t *testing.T, ev chat.OutboxEvent) chat.MemberEvent {
	t.Helper()
	var me chat.MemberEvent
	require.NoError(t, json.Unmarshal(ev.Data, &me), "payload of %s", ev.Type)
	return me
}

func eventsOfType(evs []chat.OutboxEvent, typ chat.EventType) []chat.OutboxEvent {
	var out []chat.OutboxEvent
	for _, ev := range evs {
		if ev.Type == typ {
			out = append(out, ev)
		}
	}
	return out
}

func seqs(ms []chat.Message) []int64 {
	out := make([]int64, len(ms))
	for i, m := range ms {
		out[i] = m.Seq
	}
	return out
}

func seqRange(from, to int64) []int64 {
	var out []int64
	for s := from; s <= to; s++ {
		out = append(out, s)
	}
	return out
}

// ---------------------------------------------------------------- accounts

func testUsers(f *fixture) {
	t := f.t
	alice := chat.User{ID: "alice", DisplayName: "Alice", CreatedAt: f.now, PasswordHash: "$argon2id$v=19$x"}
	require.NoError(t, f.s.CreateUser(f.ctx, alice))
	requireCode(t, f.s.CreateUser(f.ctx, chat.User{ID: "alice", DisplayName: "Other", CreatedAt: f.now}), chat.CodeConflict)
	bob := chat.User{ID: "bob", DisplayName: "Bob", CreatedAt: f.now.Add(time.Second)} // no password
	require.NoError(t, f.s.CreateUser(f.ctx, bob))

	got, err := f.s.User(f.ctx, "alice")
	require.NoError(t, err)
	require.Equal(t, alice, got, "read back equal, times included")
	got, err = f.s.User(f.ctx, "bob")
	require.NoError(t, err)
	require.Equal(t, bob, got)

	_, err = f.s.User(f.ctx, "ghost")
	requireCode(t, err, chat.CodeNotFound)

	us, err := f.s.Users(f.ctx, []string{"bob", "ghost", "alice"})
	require.NoError(t, err)
	require.ElementsMatch(t, []chat.User{alice, bob}, us)
	us, err = f.s.Users(f.ctx, []string{"ghost"})
	require.NoError(t, err)
	require.Empty(t, us)

	upd, err := f.s.UpdateUser(f.ctx, "alice", "Alice A.")
	require.NoError(t, err)
	want := alice
	want.DisplayName = "Alice A."
	require.Equal(t, want, upd)
	got, err = f.s.User(f.ctx, "alice")
	require.NoError(t, err)
	require.Equal(t, want, got)

	_, err = f.s.UpdateUser(f.ctx, "ghost", "x")
	requireCode(t, err, chat.CodeNotFound)
}

func testTokens(f *fixture) {
	t := f.t
	f.users("u", "v")
	ptr := func(tm time.Time) *time.Time { return &tm }
	mk := func(id string, kind chat.TokenKind, created time.Time, expires *time.Time) chat.Token {
		tok := chat.Token{ID: id, UserID: "u", Kind: kind, Name: "name " + id, CreatedAt: created, ExpiresAt: expires}
		require.NoError(t, f.s.CreateToken(f.ctx, tok, []byte("hash-"+id)))
		return tok
	}
	base := f.now.Add(-time.Hour)
	s1 := mk("s1", chat.TokenSession, base, ptr(f.now.Add(24*time.Hour)))
	a1 := mk("a1", chat.TokenAPI, base.Add(1*time.Second), nil)
	a2 := mk("a2", chat.TokenAPI, base.Add(2*time.Second), ptr(f.now.Add(time.Hour)))
	mk("a3", chat.TokenAPI, base.Add(3*time.Second), ptr(time.Now().Add(-time.Minute).UTC().Truncate(time.Millisecond))) // expired
	a4 := mk("a4", chat.TokenAPI, base.Add(4*time.Second), nil)

	requireCode(t, f.s.CreateToken(f.ctx, chat.Token{ID: "dup", UserID: "u", Kind: chat.TokenAPI, CreatedAt: f.now},
		[]byte("hash-a1")), chat.CodeConflict)
	requireCode(t, f.s.CreateToken(f.ctx, chat.Token{ID: "a1", UserID: "u", Kind: chat.TokenAPI, CreatedAt: f.now},
		[]byte("hash-other")), chat.CodeConflict)

	got, err := f.s.TokenByHash(f.ctx, []byte("hash-a2"))
	require.NoError(t, err)
	require.Equal(t, a2, got)
	got, err = f.s.TokenByID(f.ctx, "s1")
	require.NoError(t, err)
	require.Equal(t, s1, got)
	_, err = f.s.TokenByHash(f.ctx, []byte("nope"))
	requireCode(t, err, chat.CodeNotFound)
	_, err = f.s.TokenByID(f.ctx, "nope")
	requireCode(t, err, chat.CodeNotFound)

	revokedAt := f.now.Add(time.Minute)
	require.NoError(t, f.s.RevokeToken(f.ctx, "u", "a4", revokedAt))
	requireCode(t, f.s.RevokeToken(f.ctx, "u", "a4", revokedAt), chat.CodeNotFound) // already revoked
	requireCode(t, f.s.RevokeToken(f.ctx, "v", "a1", revokedAt), chat.CodeNotFound) // not v's
	requireCode(t, f.s.RevokeToken(f.ctx, "u", "nope", revokedAt), chat.CodeNotFound)
	got, err = f.s.TokenByHash(f.ctx, []byte("hash-a4"))
	require.NoError(t, err, "a revoked token is still found: the caller checks its state")
	want := a4
	want.RevokedAt = &revokedAt
	require.Equal(t, want, got)

	bulk, err := f.s.TokensByID(f.ctx, []string{"a2", "nope", "a4", "s1"})
	require.NoError(t, err)
	slices.SortFunc(bulk, func(a, b chat.Token) int { return cmp.Compare(a.ID, b.ID) })
	require.Equal(t, []chat.Token{a2, want, s1}, bulk, "those that exist, revoked too")
	bulk, err = f.s.TokensByID(f.ctx, nil)
	require.NoError(t, err)
	require.Empty(t, bulk)

	live, err := f.s.Tokens(f.ctx, "u", chat.TokenAPI)
	require.NoError(t, err)
	require.Equal(t, []chat.Token{a2, a1}, live, "live API tokens, newest first")
	live, err = f.s.Tokens(f.ctx, "u", chat.TokenSession)
	require.NoError(t, err)
	require.Equal(t, []chat.Token{s1}, live)
	live, err = f.s.Tokens(f.ctx, "v", chat.TokenAPI)
	require.NoError(t, err)
	require.Empty(t, live)

	used := f.now.Add(2 * time.Minute)
	require.NoError(t, f.s.TouchToken(f.ctx, "a1", used))
	got, err = f.s.TokenByID(f.ctx, "a1")
	require.NoError(t, err)
	require.Equal(t, &used, got.LastUsedAt)
}

func testTickets(f *fixture) {
	t := f.t
	f.users("u")
	p := chat.Principal{UserID: "u", TokenID: "tok1"}
	exp := f.now.Add(time.Minute)
	require.NoError(t, f.s.CreateTicket(f.ctx, []byte("t1"), p, exp))

	// Single use under concurrency: exactly one consumer wins.
	const consumers = 10
	var (
		wg   sync.WaitGroup
		wins atomic.Int32
		errs = make([]error, consumers)
		got  = make([]chat.Principal, consumers)
	)
	start := make(chan struct{})
	for i := range consumers {
		wg.Go(func() {
			<-start
			got[i], errs[i] = f.s.ConsumeTicket(f.ctx, []byte("t1"), f.now)
		})
	}
	close(start)
	wg.Wait()
	for i := range consumers {
		if errs[i] == nil {
			wins.Add(1)
			require.Equal(t, p, got[i])
		} else {
			requireCode(t, errs[i], chat.CodeNotFound)
		}
	}
	require.EqualValues(t, 1, wins.Load(), "a ticket is consumed exactly once")
	_, err := f.s.ConsumeTicket(f.ctx, []byte("t1"), f.now)
	requireCode(t, err, chat.CodeNotFound)

	// A principal without a token round-trips.
	require.NoError(t, f.s.CreateTicket(f.ctx, []byte("t2"), chat.Principal{UserID: "u"}, exp))
	pr, err := f.s.ConsumeTicket(f.ctx, []byte("t2"), f.now)
	require.NoError(t, err)
	require.Equal(t, chat.Principal{UserID: "u"}, pr)

	// Expired: not usable, at or after expiry.
	require.NoError(t, f.s.CreateTicket(f.ctx, []byte("t3"), p, exp))
	_, err = f.s.ConsumeTicket(f.ctx, []byte("t3"), exp)
	requireCode(t, err, chat.CodeNotFound)
	require.NoError(t, f.s.CreateTicket(f.ctx, []byte("t4"), p, exp))
	_, err = f.s.ConsumeTicket(f.ctx, []byte("t4"), exp.Add(time.Second))
	requireCode(t, err, chat.CodeNotFound)

	_, err = f.s.ConsumeTicket(f.ctx, []byte("never"), f.now)
	requireCode(t, err, chat.CodeNotFound)
}

// ----------------------------------------------------------- conversations

func testDirectConversation(f *fixture) {
	t := f.t
	f.users("ann", "bob", "cat", "xen", "yul")

	// Ten concurrent creators, from both sides, released at once: one
	// conversation. Twice: the first round mostly races on opening connections.
	const creators = 10
	type result struct {
		c       chat.Conversation
		created bool
		ch      chat.Changed
		err     error
	}
	var (
		res     []result
		created []result
	)
	for _, pair := range [][2]string{{"xen", "yul"}, {"ann", "bob"}} {
		res = make([]result, creators)
		start := make(chan struct{})
		var wg sync.WaitGroup
		for i := range creators {
			a, b := pair[0], pair[1]
			if i%2 == 1 {
				a, b = b, a
			}
			wg.Go(func() {
				<-start
				var r result
				r.c, r.created, r.ch, r.err = f.s.DirectConversation(f.ctx, a, b, fmt.Sprintf("%s%d", pair[0], i), f.now)
				res[i] = r
			})
		}
		close(start)
		wg.Wait()
		created = nil
		for i, r := range res {
			require.NoError(t, r.err)
			require.Equal(t, res[0].c.ID, r.c.ID, "one conversation per pair")
			want := pair[1]
			if i%2 == 1 {
				want = pair[0]
			}
			require.Equal(t, want, r.c.PeerID, "seen from the asking side")
			if r.created {
				created = append(created, r)
			} else {
				require.Empty(t, r.ch.Events, "nothing to announce when it existed")
			}
		}
		require.Len(t, created, 1, "exactly one creator")
	}
	cid := res[0].c.ID
	require.Len(t, created[0].ch.Events, 1)
	ev := created[0].ch.Events[0]
	require.Equal(t, chat.EventConversationCreated, ev.Type)
	require.Equal(t, cid, ev.ConversationID)
	require.ElementsMatch(t, []string{"ann", "bob"}, ev.To)

	c := f.view(cid, "ann")
	require.Equal(t, chat.Direct, c.Type)
	require.Equal(t, "bob", c.PeerID)
	require.Equal(t, 2, c.MemberCount)
	require.Equal(t, int64(0), c.LastSeq)
	require.Nil(t, c.LastMessage)
	require.Equal(t, f.now, c.CreatedAt)
	require.Equal(t, f.now, c.LastActivityAt)
	require.Equal(t, "ann", f.view(cid, "bob").PeerID)
	for _, uid := range []string{"ann", "bob"} {
		m, err := f.s.Member(f.ctx, cid, uid)
		require.NoError(t, err)
		require.Equal(t, chat.RoleMember, m.Role)
	}

	// Asked again later: the same conversation, not created.
	again, wasCreated, ch, err := f.s.DirectConversation(f.ctx, "bob", "ann", "dz", f.now.Add(time.Minute))
	require.NoError(t, err)
	require.False(t, wasCreated)
	require.Empty(t, ch.Events)
	require.Equal(t, cid, again.ID)

	_, _, _, err = f.s.DirectConversation(f.ctx, "ann", "ghost", "dx", f.now)
	requireCode(t, err, chat.CodeNotFound)
	_, err = f.s.Conversation(f.ctx, "dx", "ann")
	requireCode(t, err, chat.CodeNotFound)

	// Another pair is another conversation.
	other, wasCreated, _, err := f.s.DirectConversation(f.ctx, "ann", "cat", "dc", f.now)
	require.NoError(t, err)
	require.True(t, wasCreated)
	require.NotEqual(t, cid, other.ID)
}

func testCreateGroup(f *fixture) {
	t := f.t
	f.users("own", "ann", "bob")
	c, ch, err := f.s.CreateGroup(f.ctx, chat.NewGroup{ID: "g1", Title: "Team", OwnerID: "own",
		MemberIDs: []string{"ann", "bob", "ann", "own"}, CreatedAt: f.now})
	require.NoError(t, err)
	require.Equal(t, chat.Conversation{ID: "g1", Type: chat.Group, Title: "Team", CreatedAt: f.now,
		LastActivityAt: f.now, MemberCount: 3}, c, "as the owner sees it")
	require.Equal(t, c, f.view("g1", "own"))

	require.Len(t, ch.Events, 1)
	ev := ch.Events[0]
	require.Equal(t, chat.EventConversationCreated, ev.Type)
	require.Equal(t, "g1", ev.ConversationID)
	require.Equal(t, []string{"own", "ann", "bob"}, ev.To, "all members, owner first, once each")
	require.Zero(t, ev.Seq)
	require.Empty(t, ev.Data, "conversation payloads are built per recipient")
	require.NotZero(t, ev.ID)

	roles := map[string]chat.Role{"own": chat.RoleOwner, "ann": chat.RoleMember, "bob": chat.RoleMember}
	for uid, role := range roles {
		m, err := f.s.Member(f.ctx, "g1", uid)
		require.NoError(t, err)
		require.Equal(t, chat.Member{ConversationID: "g1", UserID: uid, Role: role, JoinedAt: f.now}, m)
	}
	ids, err := f.s.MemberIDs(f.ctx, "g1")
	require.NoError(t, err)
	require.ElementsMatch(t, []string{"own", "ann", "bob"}, ids)

	_, _, err = f.s.CreateGroup(f.ctx, chat.NewGroup{ID: "g1", Title: "Again", OwnerID: "own", CreatedAt: f.now})
	requireCode(t, err, chat.CodeConflict)

	// A group of one is allowed (members can be added later).
	solo, _, err := f.s.CreateGroup(f.ctx, chat.NewGroup{ID: "g2", Title: "Solo", OwnerID: "ann", CreatedAt: f.now})
	require.NoError(t, err)
	require.Equal(t, 1, solo.MemberCount)
}

func testCreateGroupUnknownMembers(f *fixture) {
	t := f.t
	f.users("own", "ann")
	_, _, err := f.s.CreateGroup(f.ctx, chat.NewGroup{ID: "g1", Title: "T", OwnerID: "own",
		MemberIDs: []string{"ann", "ghost1", "ghost2"}, CreatedAt: f.now})
	requireInvalid(t, err, "member_ids")

	// Nothing was written.
	for _, uid := range []string{"own", "ann"} {
		page, err := f.s.ActivityPage(f.ctx, uid, nil, 10)
		require.NoError(t, err)
		require.Empty(t, page, "%s has no conversations", uid)
		_, err = f.s.Conversation(f.ctx, "g1", uid)
		requireCode(t, err, chat.CodeNotFound)
	}
	ids, err := f.s.MemberIDs(f.ctx, "g1")
	require.NoError(t, err)
	require.Empty(t, ids)
	require.Empty(t, f.claimAll(time.Minute), "no event for a group that does not exist")

	// The id is still free.
	c := f.group("g1", "own", "ann")
	require.Equal(t, 2, c.MemberCount)
}

func testAddMembers(f *fixture) {
	t := f.t
	f.users("own", "ann", "bob", "cat", "dan", "eve")
	f.group("g", "own", "ann")
	f.send("g", "own", "before they joined")
	at := f.now.Add(time.Minute)

	_, _, err := f.s.AddMembers(f.ctx, "g", "own", []string{"bob", "ghost"}, 10, at)
	requireInvalid(t, err, "user_ids")
	ids, err := f.s.MemberIDs(f.ctx, "g")
	require.NoError(t, err)
	require.ElementsMatch(t, []string{"own", "ann"}, ids, "nothing added on error")

	added, ch, err := f.s.AddMembers(f.ctx, "g", "own", []string{"cat", "ann", "bob"}, 10, at)
	require.NoError(t, err)
	require.Equal(t, []chat.Member{
		{ConversationID: "g", UserID: "cat", Role: chat.RoleMember, JoinedAt: at, LastReadSeq: 1},
		{ConversationID: "g", UserID: "bob", Role: chat.RoleMember, JoinedAt: at, LastReadSeq: 1},
	}, added, "only the new ones, in the order asked; their read position starts at the last seq")

	created := eventsOfType(ch.Events, chat.EventConversationCreated)
	require.Len(t, created, 1)
	require.ElementsMatch(t, []string{"cat", "bob"}, created[0].To, "conversation.created goes to the added users only")
	require.Equal(t, int64(1), created[0].Seq, "the seq they start after")
	addedEvs := eventsOfType(ch.Events, chat.EventMemberAdded)
	require.Len(t, addedEvs, 2)
	var who []string
	for _, ev := range addedEvs {
		require.Empty(t, ev.To, "member.added goes to all members")
		me := memberEvent(t, ev)
		require.Equal(t, "g", me.ConversationID)
		require.Equal(t, chat.RoleMember, me.Role)
		require.Equal(t, "own", me.By)
		who = append(who, me.UserID)
	}
	require.ElementsMatch(t, []string{"cat", "bob"}, who)
	require.Len(t, ch.Events, 3)

	c := f.view("g", "cat")
	require.Equal(t, 4, c.MemberCount)
	require.Equal(t, int64(0), c.UnreadCount, "joining does not make earlier messages unread")

	// Already members: nothing to do.
	added, ch, err = f.s.AddMembers(f.ctx, "g", "own", []string{"ann", "cat"}, 4, at)
	require.NoError(t, err)
	require.Empty(t, added)
	require.Empty(t, ch.Events)

	// Over the limit: nothing added.
	_, _, err = f.s.AddMembers(f.ctx, "g", "own", []string{"dan", "eve"}, 5, at)
	requireInvalid(t, err, "user_ids")
	require.Equal(t, 4, f.view("g", "own").MemberCount)
	_, err = f.s.Member(f.ctx, "g", "dan")
	requireCode(t, err, chat.CodeNotFound)

	// Exactly at the limit is fine.
	added, _, err = f.s.AddMembers(f.ctx, "g", "own", []string{"dan"}, 5, at)
	require.NoError(t, err)
	require.Len(t, added, 1)
	require.Equal(t, 5, f.view("g", "own").MemberCount)

	_, _, err = f.s.AddMembers(f.ctx, "nope", "own", []string{"eve"}, 10, at)
	requireCode(t, err, chat.CodeNotFound)
}

func testSetRoleAndRemoveMember(f *fixture) {
	t := f.t
	f.users("own", "ann", "bob", "cat")
	f.group("g", "own", "ann", "bob", "cat")

	m, ch, err := f.s.SetRole(f.ctx, "g", "ann", chat.RoleAdmin, "own")
	require.NoError(t, err)
	require.Equal(t, chat.RoleAdmin, m.Role)
	require.Equal(t, "ann", m.UserID)
	require.Len(t, ch.Events, 1)
	require.Equal(t, chat.EventMemberUpdated, ch.Events[0].Type)
	require.Equal(t, chat.MemberEvent{ConversationID: "g", UserID: "ann", Role: chat.RoleAdmin, By: "own"},
		memberEvent(t, ch.Events[0]))
	got, err := f.s.Member(f.ctx, "g", "ann")
	require.NoError(t, err)
	require.Equal(t, chat.RoleAdmin, got.Role)

	_, _, err = f.s.SetRole(f.ctx, "g", "ghost", chat.RoleAdmin, "own")
	requireCode(t, err, chat.CodeNotFound)

	// A plain removal.
	ch, err = f.s.RemoveMember(f.ctx, "g", "bob", "ann")
	require.NoError(t, err)
	require.Len(t, ch.Events, 1)
	ev := ch.Events[0]
	require.Equal(t, chat.EventMemberRemoved, ev.Type)
	require.Equal(t, []string{"bob"}, ev.Extra, "the removed member hears of it too")
	me := memberEvent(t, ev)
	require.Equal(t, "bob", me.UserID)
	require.Equal(t, "ann", me.By)
	_, err = f.s.Member(f.ctx, "g", "bob")
	requireCode(t, err, chat.CodeNotFound)
	_, err = f.s.Conversation(f.ctx, "g", "bob")
	requireCode(t, err, chat.CodeNotFound)
	require.Equal(t, 3, f.view("g", "own").MemberCount)
	_, err = f.s.RemoveMember(f.ctx, "g", "bob", "ann")
	requireCode(t, err, chat.CodeNotFound, "not a member any more")

	// The owner leaves: the admin becomes owner, ahead of a member who
	// joined as early, in the same change.
	ch, err = f.s.RemoveMember(f.ctx, "g", "own", "own")
	require.NoError(t, err)
	require.Len(t, eventsOfType(ch.Events, chat.EventMemberRemoved), 1)
	updated := eventsOfType(ch.Events, chat.EventMemberUpdated)
	require.Len(t, updated, 1)
	require.Equal(t, chat.MemberEvent{ConversationID: "g", UserID: "ann", Role: chat.RoleOwner, By: "own"},
		memberEvent(t, updated[0]))
	got, err = f.s.Member(f.ctx, "g", "ann")
	require.NoError(t, err)
	require.Equal(t, chat.RoleOwner, got.Role)
	got, err = f.s.Member(f.ctx, "g", "cat")
	require.NoError(t, err)
	require.Equal(t, chat.RoleMember, got.Role)
	require.Equal(t, 2, f.view("g", "ann").MemberCount)
}

func testOwnerSuccession(f *fixture) {
	t := f.t
	f.users("own", "old", "new", "solo")
	f.group("g", "own", "old")
	_, _, err := f.s.AddMembers(f.ctx, "g", "own", []string{"new"}, 10, f.now.Add(time.Minute))
	require.NoError(t, err)

	// No admin: the longest-standing member becomes owner.
	ch, err := f.s.RemoveMember(f.ctx, "g", "own", "own")
	require.NoError(t, err)
	updated := eventsOfType(ch.Events, chat.EventMemberUpdated)
	require.Len(t, updated, 1)
	require.Equal(t, "old", memberEvent(t, updated[0]).UserID)
	m, err := f.s.Member(f.ctx, "g", "old")
	require.NoError(t, err)
	require.Equal(t, chat.RoleOwner, m.Role)

	// The last member leaves: nobody to promote.
	f.group("s", "solo")
	ch, err = f.s.RemoveMember(f.ctx, "s", "solo", "solo")
	require.NoError(t, err)
	require.Len(t, ch.Events, 1)
	require.Equal(t, chat.EventMemberRemoved, ch.Events[0].Type)
	ids, err := f.s.MemberIDs(f.ctx, "s")
	require.NoError(t, err)
	require.Empty(t, ids)
}

func testMembersPages(f *fixture) {
	t := f.t
	f.users("own", "m1", "m2", "m3", "m4", "m5", "m6")
	f.group("g", "own")
	// Distinct join times make the join order unambiguous.
	for i, uid := range []string{"m3", "m1", "m6", "m2", "m5", "m4"} {
		_, _, err := f.s.AddMembers(f.ctx, "g", "own", []string{uid}, 10, f.now.Add(time.Duration(i+1)*time.Second))
		require.NoError(t, err)
	}
	want := []string{"own", "m3", "m1", "m6", "m2", "m5", "m4"}

	ids, err := f.s.MemberIDs(f.ctx, "g")
	require.NoError(t, err)
	require.Equal(t, want, ids, "join order")

	var (
		got    []string
		cursor string
		pages  int
	)
	for {
		ms, next, err := f.s.Members(f.ctx, "g", chat.Page{Cursor: cursor, Limit: 3})
		require.NoError(t, err)
		require.LessOrEqual(t, len(ms), 3)
		for _, m := range ms {
			got = append(got, m.UserID)
		}
		pages++
		if next == "" {
			break
		}
		require.Len(t, ms, 3, "only the last page is short")
		cursor = next
		require.Less(t, pages, 10)
	}
	require.Equal(t, want, got)
	require.Equal(t, 3, pages)

	ms, next, err := f.s.Members(f.ctx, "g", chat.Page{Limit: 7})
	require.NoError(t, err)
	require.Len(t, ms, 7)
	require.Empty(t, next, "no cursor when everything fit")
	require.Equal(t, chat.RoleOwner, ms[0].Role)
	require.Equal(t, f.now.Add(time.Second), ms[1].JoinedAt)
}

func testSharingWithAndDirectPeers(f *fixture) {
	t := f.t
	f.users("ann", "bob", "cat", "dan", "eve")
	f.group("g", "ann", "bob")
	_, _, _, err := f.s.DirectConversation(f.ctx, "ann", "cat", "d1", f.now)
	require.NoError(t, err)
	_, _, _, err = f.s.DirectConversation(f.ctx, "dan", "ann", "d2", f.now)
	require.NoError(t, err)
	f.group("other", "bob", "eve")

	got, err := f.s.SharingWith(f.ctx, "ann", []string{"bob", "cat", "eve", "ghost", "ann"})
	require.NoError(t, err)
	require.ElementsMatch(t, []string{"bob", "cat", "ann"}, got)
	got, err = f.s.SharingWith(f.ctx, "eve", []string{"ann", "cat"})
	require.NoError(t, err)
	require.Empty(t, got)

	peers, err := f.s.DirectPeers(f.ctx, "ann")
	require.NoError(t, err)
	require.ElementsMatch(t, []string{"cat", "dan"}, peers)
	peers, err = f.s.DirectPeers(f.ctx, "bob")
	require.NoError(t, err)
	require.Empty(t, peers)
}

func testSetTitle(f *fixture) {
	t := f.t
	f.users("own", "ann")
	f.group("g", "own", "ann")
	ch, err := f.s.SetTitle(f.ctx, "g", "New title", "own")
	require.NoError(t, err)
	require.Len(t, ch.Events, 1)
	ev := ch.Events[0]
	require.Equal(t, chat.EventConversationUpdated, ev.Type)
	require.Equal(t, "g", ev.ConversationID)
	require.Empty(t, ev.To, "to all members")
	require.Empty(t, ev.Data)
	require.Equal(t, "New title", f.view("g", "ann").Title)

	_, err = f.s.SetTitle(f.ctx, "nope", "x", "own")
	requireCode(t, err, chat.CodeNotFound)
}

// ---------------------------------------------------------------- messages

func testSend(f *fixture) {
	t := f.t
	f.users("ann", "bob")
	f.group("g", "ann", "bob")
	nm := f.newMessage("g", "ann", "hello")
	nm.Metadata = []byte(`{"kind":"greeting"}`)
	m, created, ch, err := f.s.Send(f.ctx, nm)
	require.NoError(t, err)
	require.True(t, created)
	require.Equal(t, nm.ID, m.ID)
	require.Equal(t, "g", m.ConversationID)
	require.Equal(t, int64(1), m.Seq)
	require.Equal(t, "ann", m.SenderID)
	require.Equal(t, "hello", m.Text)
	require.JSONEq(t, `{"kind":"greeting"}`, string(m.Metadata))
	require.Empty(t, m.ClientMsgID)
	require.Equal(t, nm.CreatedAt, m.CreatedAt)

	require.Len(t, ch.Events, 1)
	ev := ch.Events[0]
	require.Equal(t, chat.EventMessageCreated, ev.Type)
	require.Equal(t, "g", ev.ConversationID)
	require.Equal(t, int64(1), ev.Seq)
	require.Empty(t, ev.To)
	want, err := json.Marshal(m)
	require.NoError(t, err)
	require.JSONEq(t, string(want), string(ev.Data), "the payload is the message")

	got, err := f.s.Message(f.ctx, "g", 1)
	require.NoError(t, err)
	require.Equal(t, m, got)
	_, err = f.s.Message(f.ctx, "g", 2)
	requireCode(t, err, chat.CodeNotFound)

	c := f.view("g", "bob")
	require.Equal(t, int64(1), c.LastSeq)
	require.Equal(t, nm.CreatedAt, c.LastActivityAt, "a message is activity")

	// Without an idempotency key, the same text twice is two messages.
	f.send("g", "ann", "same")
	f.send("g", "ann", "same")
	ms, _, err := f.s.Messages(f.ctx, "g", chat.HistoryQuery{})
	require.NoError(t, err)
	require.Equal(t, []int64{1, 2, 3}, seqs(ms))
}

func testSendIdempotent(f *fixture) {
	t := f.t
	f.users("ann", "bob")
	f.group("g", "ann", "bob")

	// Ten concurrent retries of one send (each with the id a node would
	// generate), released at once: one message, one seq, one created. A few
	// rounds, because the first ones mostly race on opening connections.
	const rounds, retries = 5, 10
	type result struct {
		m       chat.Message
		created bool
		ch      chat.Changed
		err     error
	}
	var origs []chat.Message
	for round := range rounds {
		key := fmt.Sprintf("r%d", round)
		res := make([]result, retries)
		start := make(chan struct{})
		var wg sync.WaitGroup
		for i := range retries {
			nm := f.newMessage("g", "ann", "once "+key)
			nm.ClientMsgID = key
			wg.Go(func() {
				<-start
				var r result
				r.m, r.created, r.ch, r.err = f.s.Send(f.ctx, nm)
				res[i] = r
			})
		}
		close(start)
		wg.Wait()
		createdCount := 0
		for _, r := range res {
			require.NoError(t, r.err)
			require.Equal(t, res[0].m, r.m, "every retry gets the original")
			if r.created {
				createdCount++
				require.Len(t, r.ch.Events, 1)
			} else {
				require.Empty(t, r.ch.Events, "a replay announces nothing")
			}
		}
		require.Equal(t, 1, createdCount, "round %d", round)
		require.Equal(t, int64(round+1), res[0].m.Seq)
		require.Equal(t, key, res[0].m.ClientMsgID)
		require.Equal(t, int64(round+1), f.view("g", "ann").LastSeq, "losing retries consume no seq (G3: no gaps)")
		origs = append(origs, res[0].m)
	}
	ms, _, err := f.s.Messages(f.ctx, "g", chat.HistoryQuery{})
	require.NoError(t, err)
	require.Equal(t, origs, ms)
	orig := origs[0]

	// A later retry, sequentially.
	nm := f.newMessage("g", "ann", "once r0")
	nm.ClientMsgID = "r0"
	m, created, ch, err := f.s.Send(f.ctx, nm)
	require.NoError(t, err)
	require.False(t, created)
	require.Empty(t, ch.Events)
	require.Equal(t, orig, m)

	// Another key: another message, the same text notwithstanding.
	nm = f.newMessage("g", "ann", "once r0")
	nm.ClientMsgID = "k2"
	m, created, _, err = f.s.Send(f.ctx, nm)
	require.NoError(t, err)
	require.True(t, created)
	require.Equal(t, int64(rounds+1), m.Seq)

	// The same key from another sender is that sender's key.
	nm = f.newMessage("g", "bob", "once r0")
	nm.ClientMsgID = "r0"
	m, created, _, err = f.s.Send(f.ctx, nm)
	require.NoError(t, err)
	require.True(t, created)
	require.Equal(t, int64(rounds+2), m.Seq)

	// Same key, different content: a conflict, nothing stored.
	nm = f.newMessage("g", "ann", "different")
	nm.ClientMsgID = "r0"
	_, _, _, err = f.s.Send(f.ctx, nm)
	requireCode(t, err, chat.CodeConflict)
	nm = f.newMessage("g", "ann", "once r0")
	nm.ClientMsgID = "r0"
	nm.Metadata = []byte(`{"a":1}`)
	_, _, _, err = f.s.Send(f.ctx, nm)
	requireCode(t, err, chat.CodeConflict)

	// Metadata is compared as JSON, not as bytes.
	nm = f.newMessage("g", "ann", "with metadata")
	nm.ClientMsgID = "k3"
	nm.Metadata = []byte(`{"a":1,"b":[1,2],"c":{"d":"e"}}`)
	withMeta, created, _, err := f.s.Send(f.ctx, nm)
	require.NoError(t, err)
	require.True(t, created)
	nm = f.newMessage("g", "ann", "with metadata")
	nm.ClientMsgID = "k3"
	nm.Metadata = []byte(`{ "c": {"d": "e"}, "b": [1, 2], "a": 1 }`)
	m, created, _, err = f.s.Send(f.ctx, nm)
	require.NoError(t, err)
	require.False(t, created, "the same object serialised differently is a replay")
	require.Equal(t, withMeta, m)
	nm = f.newMessage("g", "ann", "with metadata")
	nm.ClientMsgID = "k3"
	_, _, _, err = f.s.Send(f.ctx, nm)
	requireCode(t, err, chat.CodeConflict, "metadata dropped is different content")

	require.Equal(t, int64(rounds+3), f.view("g", "ann").LastSeq, "conflicts consumed no seq")
}

func testSendOrder(f *fixture) {
	t := f.t
	members := []string{"u0", "u1", "u2", "u3", "u4"}
	f.users(members...)
	f.group("g", "u0", members[1:]...)

	// G3: 20 senders × 50 messages into one conversation.
	const senders, each = 20, 50
	got := make([][]int64, senders)
	errs := make([]error, senders)
	var wg sync.WaitGroup
	for i := range senders {
		wg.Go(func() {
			for j := range each {
				m, _, _, err := f.s.Send(f.ctx, chat.NewMessage{ID: fmt.Sprintf("s%d-%d", i, j), ConversationID: "g",
					SenderID: members[i%len(members)], Text: fmt.Sprintf("%d/%d", i, j), CreatedAt: chat.Now()})
				if err != nil {
					errs[i] = err
					return
				}
				got[i] = append(got[i], m.Seq)
			}
		})
	}
	wg.Wait()
	var all []int64
	for i := range senders {
		require.NoError(t, errs[i])
		require.True(t, slices.IsSorted(got[i]), "one sender's messages are numbered in the order it sent them")
		all = append(all, got[i]...)
	}
	slices.Sort(all)
	const total = senders * each
	require.Equal(t, seqRange(1, total), all, "seqs are exactly 1..N: no gaps, no duplicates")
	require.Equal(t, int64(total), f.view("g", "u0").LastSeq)

	// The latest page, then backwards with before_seq.
	page, more, err := f.s.Messages(f.ctx, "g", chat.HistoryQuery{Limit: 300})
	require.NoError(t, err)
	require.Equal(t, seqRange(701, 1000), seqs(page))
	require.True(t, more, "older messages exist")
	back := seqs(page)
	for more {
		page, more, err = f.s.Messages(f.ctx, "g", chat.HistoryQuery{BeforeSeq: page[0].Seq, Limit: 300})
		require.NoError(t, err)
		require.NotEmpty(t, page)
		back = append(seqs(page), back...)
	}
	require.Equal(t, seqRange(1, total), back)
	require.Equal(t, seqRange(1, 100), seqs(page), "the oldest page is short")

	page, more, err = f.s.Messages(f.ctx, "g", chat.HistoryQuery{BeforeSeq: 501, Limit: 100})
	require.NoError(t, err)
	require.Equal(t, seqRange(401, 500), seqs(page), "the page nearest to before_seq")
	require.True(t, more)
	page, more, err = f.s.Messages(f.ctx, "g", chat.HistoryQuery{BeforeSeq: 101, Limit: 100})
	require.NoError(t, err)
	require.Equal(t, seqRange(1, 100), seqs(page))
	require.False(t, more, "exactly the oldest page")
	page, more, err = f.s.Messages(f.ctx, "g", chat.HistoryQuery{BeforeSeq: 1, Limit: 100})
	require.NoError(t, err)
	require.Empty(t, page)
	require.False(t, more)

	// Forwards with after_seq.
	var fwd []int64
	after := int64(0)
	for {
		page, more, err = f.s.Messages(f.ctx, "g", chat.HistoryQuery{After: true, AfterSeq: after, Limit: 300})
		require.NoError(t, err)
		fwd = append(fwd, seqs(page)...)
		if !more {
			break
		}
		after = page[len(page)-1].Seq
	}
	require.Equal(t, seqRange(1, total), fwd)
	page, more, err = f.s.Messages(f.ctx, "g", chat.HistoryQuery{After: true, AfterSeq: 900, Limit: 100})
	require.NoError(t, err)
	require.Equal(t, seqRange(901, 1000), seqs(page))
	require.False(t, more, "exactly the newest page")
	page, more, err = f.s.Messages(f.ctx, "g", chat.HistoryQuery{After: true, AfterSeq: total, Limit: 100})
	require.NoError(t, err)
	require.Empty(t, page)
	require.False(t, more)

	m, err := f.s.Message(f.ctx, "g", 500)
	require.NoError(t, err)
	require.Equal(t, int64(500), m.Seq)
	page, _, err = f.s.Messages(f.ctx, "g", chat.HistoryQuery{After: true, AfterSeq: 499, Limit: 1})
	require.NoError(t, err)
	require.Equal(t, []chat.Message{m}, page, "history and Message agree")
}

// G2 and G3 under concurrency spread over several conversations, as an
// implementation that groups concurrent sends (group commit) sees them: 50
// senders × 40 sends into 5 conversations, every fourth send retried at once
// with its key.
func testSendManyConversations(f *fixture) {
	t := f.t
	const convs, users, senders, each = 5, 10, 50, 40
	var uids []string
	for i := range users {
		uids = append(uids, fmt.Sprintf("u%d", i))
	}
	f.users(uids...)
	for c := range convs {
		f.group(fmt.Sprintf("g%d", c), uids[0], uids[1:]...)
	}
	type sent struct {
		m  chat.Message
		ev chat.OutboxEvent
	}
	got := make([][]sent, senders)
	errs := make([]error, senders)
	var wg sync.WaitGroup
	for i := range senders {
		wg.Go(func() {
			for j := range each {
				nm := chat.NewMessage{ID: fmt.Sprintf("s%d-%d", i, j), ConversationID: fmt.Sprintf("g%d", (i+j)%convs),
					SenderID: uids[i%users], Text: fmt.Sprintf("%d/%d", i, j), ClientMsgID: fmt.Sprintf("k%d-%d", i, j),
					CreatedAt: chat.Now()}
				m, created, ch, err := f.s.Send(f.ctx, nm)
				if err == nil && (!created || len(ch.Events) != 1) {
					err = fmt.Errorf("send %s: created=%v, %d events", nm.ID, created, len(ch.Events))
				}
				if err != nil {
					errs[i] = err
					return
				}
				got[i] = append(got[i], sent{m, ch.Events[0]})
				if j%4 == 0 {
					nm.ID += "-retry"
					again, created, ch, err := f.s.Send(f.ctx, nm)
					if err == nil && (created || len(ch.Events) != 0 || !reflect.DeepEqual(again, m)) {
						err = fmt.Errorf("retry of %s: created=%v, %d events, %+v != %+v", nm.ID, created, len(ch.Events), again, m)
					}
					if err != nil {
						errs[i] = err
						return
					}
				}
			}
		})
	}
	wg.Wait()
	bySeq := map[string][]int64{}
	lastRead := map[[2]string]int64{}
	for i := range senders {
		require.NoError(t, errs[i])
		mine := map[string][]int64{}
		for _, s := range got[i] {
			require.Equal(t, chat.EventMessageCreated, s.ev.Type)
			require.Equal(t, s.m.Seq, s.ev.Seq)
			require.Equal(t, s.m.ConversationID, s.ev.ConversationID)
			require.NotZero(t, s.ev.ID)
			bySeq[s.m.ConversationID] = append(bySeq[s.m.ConversationID], s.m.Seq)
			mine[s.m.ConversationID] = append(mine[s.m.ConversationID], s.m.Seq)
			k := [2]string{s.m.ConversationID, s.m.SenderID}
			lastRead[k] = max(lastRead[k], s.m.Seq)
		}
		for cid, ss := range mine {
			require.True(t, slices.IsSorted(ss), "a sender's messages are numbered in the order it sent them (%s)", cid)
		}
	}
	total := 0
	for c := range convs {
		cid := fmt.Sprintf("g%d", c)
		all := bySeq[cid]
		slices.Sort(all)
		n := int64(len(all))
		require.Equal(t, seqRange(1, n), all, "%s: seqs are exactly 1..N", cid)
		require.Equal(t, n, f.view(cid, uids[0]).LastSeq)
		ms, _, err := f.s.Messages(f.ctx, cid, chat.HistoryQuery{After: true, Limit: int(n) + 1})
		require.NoError(t, err)
		require.Equal(t, seqRange(1, n), seqs(ms), "%s: history holds each message once", cid)
		total += int(n)
		for _, uid := range uids {
			m, err := f.s.Member(f.ctx, cid, uid)
			require.NoError(t, err)
			require.Equal(t, lastRead[[2]string{cid, uid}], m.LastReadSeq, "%s/%s: sending reads up to one's last message", cid, uid)
		}
	}
	require.Equal(t, senders*each, total)
	var claimed []chat.OutboxEvent
	for {
		page := f.claimAll(time.Hour)
		if len(page) == 0 {
			break
		}
		claimed = append(claimed, page...)
	}
	evs := eventsOfType(claimed, chat.EventMessageCreated)
	require.Len(t, evs, senders*each, "one event per message, none per retry")
	last := map[string]int64{}
	for _, ev := range evs { // in id order
		require.Greater(t, ev.Seq, last[ev.ConversationID], "a conversation's events in seq order")
		last[ev.ConversationID] = ev.Seq
	}
}

func testSendNonMember(f *fixture) {
	t := f.t
	f.users("ann", "bob", "out")
	f.group("g", "ann", "bob")
	before := f.claimAll(time.Hour)

	for _, key := range []string{"", "k"} {
		nm := f.newMessage("g", "out", "let me in")
		nm.ClientMsgID = key
		_, _, _, err := f.s.Send(f.ctx, nm)
		requireCode(t, err, chat.CodeNotFound)
	}
	_, _, _, err := f.s.Send(f.ctx, f.newMessage("nope", "ann", "where"))
	requireCode(t, err, chat.CodeNotFound)

	ms, more, err := f.s.Messages(f.ctx, "g", chat.HistoryQuery{})
	require.NoError(t, err)
	require.Empty(t, ms)
	require.False(t, more)
	c := f.view("g", "ann")
	require.Equal(t, int64(0), c.LastSeq, "no seq consumed")
	require.Equal(t, f.now, c.LastActivityAt)
	require.NotEmpty(t, before)
	require.Empty(t, f.claimAll(time.Hour), "no event written")

	// A former member is a non-member.
	f.send("g", "bob", "bye")
	_, err = f.s.RemoveMember(f.ctx, "g", "bob", "bob")
	require.NoError(t, err)
	_, _, _, err = f.s.Send(f.ctx, f.newMessage("g", "bob", "still here?"))
	requireCode(t, err, chat.CodeNotFound)
	require.Equal(t, int64(1), f.view("g", "ann").LastSeq)
}

func testUnreadAndMarkRead(f *fixture) {
	t := f.t
	f.users("ann", "bob", "cat", "out")
	f.group("g", "ann", "bob", "cat")
	unread := func(uid string) (int64, int64) {
		c := f.view("g", uid)
		return c.UnreadCount, c.LastReadSeq
	}

	f.send("g", "ann", "1")
	f.send("g", "ann", "2")
	f.send("g", "ann", "3")
	n, r := unread("ann")
	require.Equal(t, [2]int64{0, 3}, [2]int64{n, r}, "one's own messages are read")
	n, r = unread("bob")
	require.Equal(t, [2]int64{3, 0}, [2]int64{n, r})

	f.send("g", "bob", "4")
	n, r = unread("bob")
	require.Equal(t, [2]int64{0, 4}, [2]int64{n, r}, "sending reads up to one's message")
	n, _ = unread("ann")
	require.Equal(t, int64(1), n)
	n, _ = unread("cat")
	require.Equal(t, int64(4), n)

	st, ch, err := f.s.MarkRead(f.ctx, "g", "cat", 2)
	require.NoError(t, err)
	require.Equal(t, chat.ReadState{LastReadSeq: 2, UnreadCount: 2}, st)
	require.Len(t, ch.Events, 1)
	ev := ch.Events[0]
	require.Equal(t, chat.EventReceiptRead, ev.Type)
	require.Equal(t, "g", ev.ConversationID)
	require.Empty(t, ev.To)
	var re chat.ReceiptEvent
	require.NoError(t, json.Unmarshal(ev.Data, &re))
	require.Equal(t, chat.ReceiptEvent{ConversationID: "g", UserID: "cat", Seq: 2}, re)

	// Never backwards, and no event when nothing moved.
	for _, seq := range []int64{1, 2, 0} {
		st, ch, err = f.s.MarkRead(f.ctx, "g", "cat", seq)
		require.NoError(t, err)
		require.Equal(t, chat.ReadState{LastReadSeq: 2, UnreadCount: 2}, st)
		require.Empty(t, ch.Events)
	}

	_, _, err = f.s.MarkRead(f.ctx, "g", "cat", 5)
	requireInvalid(t, err, "seq")
	n, r = unread("cat")
	require.Equal(t, [2]int64{2, 2}, [2]int64{n, r}, "a rejected mark changes nothing")

	st, _, err = f.s.MarkRead(f.ctx, "g", "cat", 4)
	require.NoError(t, err)
	require.Equal(t, chat.ReadState{LastReadSeq: 4, UnreadCount: 0}, st)

	// Reading past others' messages, then one's own message.
	st, _, err = f.s.MarkRead(f.ctx, "g", "ann", 4)
	require.NoError(t, err)
	require.Equal(t, chat.ReadState{LastReadSeq: 4, UnreadCount: 0}, st)

	_, _, err = f.s.MarkRead(f.ctx, "g", "out", 1)
	requireCode(t, err, chat.CodeNotFound)
	_, _, err = f.s.MarkRead(f.ctx, "nope", "ann", 1)
	requireCode(t, err, chat.CodeNotFound)

	views, err := f.s.ConversationViews(f.ctx, "g", []string{"ann", "bob", "cat"})
	require.NoError(t, err)
	require.Len(t, views, 3)
	for uid, c := range views {
		require.Equal(t, int64(0), c.UnreadCount, uid)
	}
}

func testConversationViews(f *fixture) {
	t := f.t
	f.users("ann", "bob", "cat", "out")
	d, _, _, err := f.s.DirectConversation(f.ctx, "ann", "bob", "d", f.now)
	require.NoError(t, err)
	f.group("g", "ann", "bob", "cat")
	f.group("foreign", "out", "bob")

	require.Nil(t, d.LastMessage)
	hi := f.send("d", "bob", "hi")
	a := f.view("d", "ann")
	require.Equal(t, &hi, a.LastMessage)
	require.Equal(t, "bob", a.PeerID)
	require.Equal(t, int64(1), a.UnreadCount)
	b := f.view("d", "bob")
	require.Equal(t, "ann", b.PeerID)
	require.Equal(t, int64(0), b.UnreadCount)
	require.Equal(t, int64(1), b.LastReadSeq)

	nm := f.newMessage("g", "cat", "in the group")
	nm.Metadata = []byte(`{"x":true}`)
	nm.ClientMsgID = "c1"
	last, _, _, err := f.s.Send(f.ctx, nm)
	require.NoError(t, err)

	views, err := f.s.ConversationViews(f.ctx, "g", []string{"ann", "cat", "out", "ghost"})
	require.NoError(t, err)
	require.Len(t, views, 2, "non-members are left out")
	require.Equal(t, int64(1), views["ann"].UnreadCount)
	require.Equal(t, int64(0), views["cat"].UnreadCount)
	for uid, v := range views {
		require.Equal(t, "g", v.ID, uid)
		require.Equal(t, chat.Group, v.Type)
		require.Empty(t, v.PeerID, "groups have no peer")
		require.Equal(t, 3, v.MemberCount)
		require.Equal(t, &last, v.LastMessage)
	}
	require.Equal(t, views["ann"], f.view("g", "ann"), "one shape for every way of asking")

	views, err = f.s.ConversationViews(f.ctx, "d", []string{"ann", "bob"})
	require.NoError(t, err)
	require.Equal(t, "bob", views["ann"].PeerID)
	require.Equal(t, "ann", views["bob"].PeerID)

	cs, err := f.s.ConversationsFor(f.ctx, "ann", []string{"g", "foreign", "nope", "d"})
	require.NoError(t, err)
	require.Len(t, cs, 2, "only the viewer's conversations")
	require.Equal(t, "g", cs[0].ID, "in the order asked")
	require.Equal(t, "d", cs[1].ID)
	require.Equal(t, f.view("g", "ann"), cs[0])
	require.Equal(t, f.view("d", "ann"), cs[1])
	cs, err = f.s.ConversationsFor(f.ctx, "ann", []string{"d", "g"})
	require.NoError(t, err)
	require.Equal(t, []string{"d", "g"}, []string{cs[0].ID, cs[1].ID})
	cs, err = f.s.ConversationsFor(f.ctx, "ann", nil)
	require.NoError(t, err)
	require.Empty(t, cs)

	_, err = f.s.Conversation(f.ctx, "foreign", "ann")
	requireCode(t, err, chat.CodeNotFound)
	_, err = f.s.Conversation(f.ctx, "nope", "ann")
	requireCode(t, err, chat.CodeNotFound)
}

func testActivityPage(f *fixture) {
	t := f.t
	f.users("u", "v")
	t0 := f.now
	mk := func(id string, at time.Time, members ...string) {
		_, _, err := f.s.CreateGroup(f.ctx, chat.NewGroup{ID: id, Title: id, OwnerID: members[0],
			MemberIDs: members[1:], CreatedAt: at})
		require.NoError(t, err)
	}
	mk("c1", t0, "u")
	mk("c2", t0.Add(1*time.Second), "u", "v")
	mk("c3", t0.Add(2*time.Second), "v", "u")
	mk("c4", t0.Add(2*time.Second), "u") // ties with c3: id descending
	mk("c5", t0.Add(3*time.Second), "u")
	mk("x", t0.Add(5*time.Second), "v") // not u's
	// A message is activity: c1 moves to the top.
	nm := f.newMessage("c1", "u", "bump")
	nm.CreatedAt = t0.Add(10 * time.Second)
	_, _, _, err := f.s.Send(f.ctx, nm)
	require.NoError(t, err)

	want := []chat.Activity{
		{ConversationID: "c1", At: t0.Add(10 * time.Second)},
		{ConversationID: "c5", At: t0.Add(3 * time.Second)},
		{ConversationID: "c4", At: t0.Add(2 * time.Second)},
		{ConversationID: "c3", At: t0.Add(2 * time.Second)},
		{ConversationID: "c2", At: t0.Add(1 * time.Second)},
	}
	all, err := f.s.ActivityPage(f.ctx, "u", nil, 100)
	require.NoError(t, err)
	require.Equal(t, want, all)

	var (
		paged []chat.Activity
		after *chat.Activity
	)
	for range 10 {
		page, err := f.s.ActivityPage(f.ctx, "u", after, 2)
		require.NoError(t, err)
		if len(page) == 0 {
			break
		}
		require.LessOrEqual(t, len(page), 2)
		paged = append(paged, page...)
		last := page[len(page)-1]
		after = &last
	}
	require.Equal(t, want, paged, "the cursor continues strictly after the last item, ties included")

	page, err := f.s.ActivityPage(f.ctx, "u", &chat.Activity{ConversationID: "c4", At: t0.Add(2 * time.Second)}, 10)
	require.NoError(t, err)
	require.Equal(t, want[3:], page)
}

// ------------------------------------------------------------------ outbox

func testOutbox(f *fixture) {
	t := f.t
	f.users("ann", "bob", "cat")
	var committed []chat.OutboxEvent
	add := func(ch chat.Changed, err error) {
		t.Helper()
		require.NoError(t, err)
		for _, ev := range ch.Events {
			require.NotZero(t, ev.ID)
			require.False(t, ev.CreatedAt.IsZero())
		}
		committed = append(committed, ch.Events...)
	}
	_, ch, err := f.s.CreateGroup(f.ctx, chat.NewGroup{ID: "g", Title: "T", OwnerID: "ann",
		MemberIDs: []string{"bob"}, CreatedAt: f.now})
	add(ch, err)
	_, _, ch, err = f.s.Send(f.ctx, f.newMessage("g", "bob", "hello"))
	add(ch, err)
	_, ch, err = f.s.MarkRead(f.ctx, "g", "ann", 1)
	add(ch, err)
	_, ch, err = f.s.AddMembers(f.ctx, "g", "ann", []string{"cat"}, 10, f.now)
	add(ch, err)
	ch, err = f.s.SetTitle(f.ctx, "g", "T2", "ann")
	add(ch, err)
	_, ch, err = f.s.SetRole(f.ctx, "g", "cat", chat.RoleAdmin, "ann")
	add(ch, err)
	ch, err = f.s.RemoveMember(f.ctx, "g", "ann", "ann")
	add(ch, err)
	require.Len(t, committed, 9)
	require.True(t, slices.IsSortedFunc(committed, func(a, b chat.OutboxEvent) int { return int(a.ID - b.ID) }),
		"ids grow in commit order")

	// Not yet old enough: nothing.
	none, err := f.s.ClaimEvents(f.ctx, f.now.Add(-time.Hour), time.Hour, 100)
	require.NoError(t, err)
	require.Empty(t, none)

	// Limit, in id order.
	first, err := f.s.ClaimEvents(f.ctx, time.Now().Add(time.Hour), time.Hour, 2)
	require.NoError(t, err)
	require.Equal(t, committed[:2], first, "claimed events are what was committed")
	// The rest; the first two are leased.
	rest := f.claimAll(time.Hour)
	require.Equal(t, committed[2:], rest)
	require.Empty(t, f.claimAll(time.Hour), "leased events are not claimed again")

	// A later event is claimable while the others stay leased.
	_, _, ch, err = f.s.Send(f.ctx, f.newMessage("g", "bob", "later"))
	require.NoError(t, err)
	require.Equal(t, ch.Events, f.claimAll(time.Millisecond))

	// Done events are gone.
	ids := make([]int64, 0, len(committed))
	for _, ev := range committed {
		ids = append(ids, ev.ID)
	}
	require.NoError(t, f.s.EventsDone(f.ctx, ids))
	require.NoError(t, f.s.EventsDone(f.ctx, ids), "done twice is harmless")

	// Leases run out: the short-leased event comes back with a new one, and
	// the done ones never do.
	_, _, ch2, err := f.s.Send(f.ctx, f.newMessage("g", "bob", "last"))
	require.NoError(t, err)
	var again []chat.OutboxEvent
	testenv.Eventually(t, 10*time.Second, func() bool {
		again = f.claimAll(time.Millisecond)
		return len(again) == 2
	}, "expired leases free the events")
	require.Equal(t, append(slices.Clone(ch.Events), ch2.Events...), again)

	// Done while leased: gone for good. Both leases were set by the same
	// claim, so once the second event is claimable again the first one's
	// lease has run out too.
	require.NoError(t, f.s.EventsDone(f.ctx, []int64{ch.Events[0].ID}))
	testenv.Eventually(t, 10*time.Second, func() bool {
		again = f.claimAll(time.Hour)
		return len(again) > 0
	}, "the lease of the event not done runs out")
	require.Equal(t, ch2.Events, again)
}

// testPendingMessages: the lowest seq of each conversation's messages still
// in the outbox; other events do not count, and dispatched ones are gone.
func testPendingMessages(f *fixture) {
	t := f.t
	f.users("ann", "bob")
	f.group("g", "ann", "bob")
	f.group("h", "ann", "bob")
	pending := func(cids ...string) map[string]int64 {
		t.Helper()
		p, err := f.s.PendingMessages(f.ctx, cids)
		require.NoError(t, err)
		return p
	}
	require.Empty(t, pending(), "no conversations")
	require.Empty(t, pending("g", "h"), "only the groups' creation events are pending")

	var ids []int64 // g's message events, by seq
	for i := range 3 {
		_, _, ch, err := f.s.Send(f.ctx, f.newMessage("g", "bob", fmt.Sprint("m", i)))
		require.NoError(t, err)
		require.Len(t, ch.Events, 1)
		ids = append(ids, ch.Events[0].ID)
	}
	require.Equal(t, map[string]int64{"g": 1}, pending("g", "h", "nope"))

	// Dispatched out of order: the lowest left counts.
	require.NoError(t, f.s.EventsDone(f.ctx, ids[1:2]))
	require.Equal(t, map[string]int64{"g": 1}, pending("g"))
	require.NoError(t, f.s.EventsDone(f.ctx, ids[:1]))
	require.Equal(t, map[string]int64{"g": 3}, pending("g"))

	f.send("h", "ann", "in h")
	require.Equal(t, map[string]int64{"g": 3, "h": 1}, pending("g", "h"))
	require.NoError(t, f.s.EventsDone(f.ctx, ids[2:]))
	require.Equal(t, map[string]int64{"h": 1}, pending("g", "h"))
}
