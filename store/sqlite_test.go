package store_test

import (
	"context"
	"database/sql"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	_ "modernc.org/sqlite"

	"imd/chat"
	"imd/store"
	"imd/store/storetest"
)

// sqliteURL is a new database file of the test's own.
func sqliteURL(t testing.TB) string {
	return "sqlite:" + filepath.Join(t.TempDir(), "imd.db")
}

func openSQLite(t testing.TB, url string) *store.Store {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	s, err := store.Open(ctx, url)
	require.NoError(t, err)
	t.Cleanup(func() { _ = s.Close() })
	require.NoError(t, s.Migrate(ctx))
	return s
}

func TestSQLiteConformance(t *testing.T) {
	storetest.Run(t, func(t *testing.T) chat.Store { return openSQLite(t, sqliteURL(t)) })
}

// sendN sends n messages from uid to cid and returns their seqs.
func sendN(t *testing.T, ctx context.Context, s chat.Store, cid, uid string, n int) []int64 {
	t.Helper()
	var seqs []int64
	for i := range n {
		m, _, _, err := s.Send(ctx, chat.NewMessage{ID: fmt.Sprintf("%s-%s-%d", cid, uid, i), ConversationID: cid,
			SenderID: uid, Text: fmt.Sprint(i), CreatedAt: chat.Now()})
		require.NoError(t, err)
		seqs = append(seqs, m.Seq)
	}
	return seqs
}

func setupGroup(t *testing.T, ctx context.Context, s chat.Store, cid string, uids ...string) {
	t.Helper()
	for _, id := range uids {
		require.NoError(t, s.CreateUser(ctx, chat.User{ID: id, DisplayName: id, CreatedAt: chat.Now()}))
	}
	_, _, err := s.CreateGroup(ctx, chat.NewGroup{ID: cid, Title: cid, OwnerID: uids[0], MemberIDs: uids[1:], CreatedAt: chat.Now()})
	require.NoError(t, err)
}

// A restart keeps everything acknowledged: close the store, open the file
// again, and the data and the seq counter are where they were.
func TestSQLiteDurableAcrossReopen(t *testing.T) {
	t.Parallel()
	ctx := testCtx(t)
	url := sqliteURL(t)
	s, err := store.Open(ctx, url)
	require.NoError(t, err)
	require.NoError(t, s.Migrate(ctx))
	setupGroup(t, ctx, s, "g", "ann", "bob")
	sent := sendN(t, ctx, s, "g", "ann", 10)
	_, ch, err := s.MarkRead(ctx, "g", "bob", 4)
	require.NoError(t, err)
	require.NoError(t, s.Close())

	s2 := openSQLite(t, url) // migrates again: nothing pending
	ms, _, err := s2.Messages(ctx, "g", chat.HistoryQuery{})
	require.NoError(t, err)
	var got []int64
	for _, m := range ms {
		got = append(got, m.Seq)
	}
	require.Equal(t, sent, got)
	c, err := s2.Conversation(ctx, "g", "bob")
	require.NoError(t, err)
	require.Equal(t, int64(4), c.LastReadSeq)
	require.Equal(t, int64(10), c.LastSeq)
	require.Equal(t, []int64{11}, sendN(t, ctx, s2, "g", "bob", 1), "the seq continues")
	// The outbox survived too, with ids that keep growing.
	evs, err := s2.ClaimEvents(ctx, time.Now().Add(time.Hour), time.Hour, 1000)
	require.NoError(t, err)
	require.Len(t, evs, 1+10+1+1, "created, 10 sends, read, the new send")
	require.Equal(t, ch.Events[0].ID, evs[11].ID)
}

// Outbox ids never come back after their rows are deleted (AUTOINCREMENT):
// a late EventsDone of a dispatched event must not delete a newer one.
func TestSQLiteOutboxIDsNotReused(t *testing.T) {
	t.Parallel()
	ctx := testCtx(t)
	s := openSQLite(t, sqliteURL(t))
	setupGroup(t, ctx, s, "g", "ann")
	_, _, ch, err := s.Send(ctx, chat.NewMessage{ID: "m1", ConversationID: "g", SenderID: "ann", Text: "x", CreatedAt: chat.Now()})
	require.NoError(t, err)
	last := ch.Events[0].ID
	evs, err := s.ClaimEvents(ctx, time.Now().Add(time.Hour), time.Hour, 100)
	require.NoError(t, err)
	ids := make([]int64, 0, len(evs))
	for _, ev := range evs {
		ids = append(ids, ev.ID)
	}
	require.NoError(t, s.EventsDone(ctx, ids)) // the table is empty now
	_, _, ch, err = s.Send(ctx, chat.NewMessage{ID: "m2", ConversationID: "g", SenderID: "ann", Text: "y", CreatedAt: chat.Now()})
	require.NoError(t, err)
	require.Greater(t, ch.Events[0].ID, last)
}

// Two stores on one file (as two processes would be, which the wiring's
// file lock prevents, or `imd migrate` beside a server): their write
// transactions contend for SQLite's lock. Beginning IMMEDIATE makes the
// loser wait (busy_timeout) instead of failing with SQLITE_BUSY, as a
// deferred transaction that has to upgrade its read lock would.
func TestSQLiteTwoStoresOnOneFile(t *testing.T) {
	t.Parallel()
	ctx := testCtx(t)
	url := sqliteURL(t)
	a := openSQLite(t, url)
	b := openSQLite(t, url)
	setupGroup(t, ctx, a, "g", "ann", "bob")
	const workers, each = 4, 25
	var (
		mu  sync.Mutex
		all []int64
		wg  sync.WaitGroup
	)
	errs := make(chan error, 2*workers)
	for i := range 2 * workers {
		s, uid := a, "ann"
		if i%2 == 1 {
			s, uid = b, "bob"
		}
		wg.Go(func() {
			for j := range each {
				m, _, _, err := s.Send(ctx, chat.NewMessage{ID: fmt.Sprintf("w%d-%d", i, j), ConversationID: "g",
					SenderID: uid, Text: "x", ClientMsgID: fmt.Sprintf("k%d-%d", i, j), CreatedAt: chat.Now()})
				if err != nil {
					errs <- err
					return
				}
				mu.Lock()
				all = append(all, m.Seq)
				mu.Unlock()
			}
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		require.NoError(t, err)
	}
	slices.Sort(all)
	want := make([]int64, 2*workers*each)
	for i := range want {
		want[i] = int64(i + 1)
	}
	require.Equal(t, want, all, "no gaps, no duplicates across both stores")
}

// A lock held elsewhere beyond the request's deadline: the send fails as
// unavailable (503, retry), stores nothing, and works once the lock is gone.
func TestSQLiteLockedIsUnavailable(t *testing.T) {
	t.Parallel()
	ctx := testCtx(t)
	dir := t.TempDir()
	path := filepath.Join(dir, "imd.db")
	s := openSQLite(t, "sqlite:"+path)
	setupGroup(t, ctx, s, "g", "ann")

	other, err := sql.Open("sqlite", path)
	require.NoError(t, err)
	t.Cleanup(func() { _ = other.Close() })
	conn, err := other.Conn(ctx)
	require.NoError(t, err)
	_, err = conn.ExecContext(ctx, "BEGIN IMMEDIATE")
	require.NoError(t, err)

	short, cancel := context.WithTimeout(ctx, 200*time.Millisecond)
	defer cancel()
	start := time.Now()
	_, _, _, err = s.Send(short, chat.NewMessage{ID: "m1", ConversationID: "g", SenderID: "ann", Text: "x", CreatedAt: chat.Now()})
	require.Equal(t, chat.CodeUnavailable, chat.ErrorCode(err), "%v", err)
	require.Less(t, time.Since(start), 3*time.Second, "the request's deadline, not the busy timeout")

	_, err = conn.ExecContext(ctx, "ROLLBACK")
	require.NoError(t, err)
	require.NoError(t, conn.Close())
	m, _, _, err := s.Send(ctx, chat.NewMessage{ID: "m1", ConversationID: "g", SenderID: "ann", Text: "x", CreatedAt: chat.Now()})
	require.NoError(t, err)
	require.Equal(t, int64(1), m.Seq, "the failed send consumed no seq")
}

func TestSQLiteOpenURLs(t *testing.T) {
	t.Parallel()
	ctx := testCtx(t)
	dir := t.TempDir()
	for _, tc := range []struct{ url, file string }{
		{"sqlite:" + dir + "/a/b/one.db", dir + "/a/b/one.db"}, // the directory is created
		{"sqlite://" + dir + "/two.db", dir + "/two.db"},
		{"file:" + dir + "/three.db", dir + "/three.db"},
		{"file://" + dir + "/four.db", dir + "/four.db"},
	} {
		s, err := store.Open(ctx, tc.url)
		require.NoError(t, err, tc.url)
		require.Equal(t, "sqlite", s.Dialect())
		require.NoError(t, s.Migrate(ctx))
		require.NoError(t, s.Close())
		_, err = os.Stat(tc.file)
		require.NoError(t, err, tc.url)
	}
	for _, bad := range []string{"sqlite::memory:", "sqlite:", "sqlite:" + dir + "/x.db?_pragma=foo", "mysql://x", "imd.db"} {
		_, err := store.Open(ctx, bad)
		require.Error(t, err, bad)
	}
}

func TestSQLitePath(t *testing.T) {
	for url, want := range map[string]string{
		"sqlite:data/imd.db":     "data/imd.db",
		"sqlite:///var/imd.db":   "/var/imd.db",
		"sqlite://data/imd.db":   "data/imd.db",
		"file:/var/imd.db":       "/var/imd.db",
		"file:///var/imd.db":     "/var/imd.db",
		"sqlite:/var/imd dir/db": "/var/imd dir/db",
	} {
		got, ok := store.SQLitePath(url)
		require.True(t, ok, url)
		require.Equal(t, want, got, url)
	}
	for _, url := range []string{"postgres://x/y", "postgresql://x", "host=x dbname=y"} {
		_, ok := store.SQLitePath(url)
		require.False(t, ok, url)
	}
}

func TestSQLiteErrorMessages(t *testing.T) {
	t.Parallel()
	ctx := testCtx(t)
	s := openSQLite(t, sqliteURL(t))
	u := chat.User{ID: "taken", DisplayName: "T", CreatedAt: chat.Now()}
	require.NoError(t, s.CreateUser(ctx, u))
	err := s.CreateUser(ctx, u)
	require.Equal(t, chat.CodeConflict, chat.ErrorCode(err))
	require.Equal(t, "username is taken", chat.AsError(err).Message)

	err = s.CreateToken(ctx, chat.Token{ID: "t", UserID: "taken", Kind: chat.TokenAPI, CreatedAt: chat.Now()}, []byte("h"))
	require.NoError(t, err)
	err = s.CreateToken(ctx, chat.Token{ID: "t2", UserID: "taken", Kind: chat.TokenAPI, CreatedAt: chat.Now()}, []byte("h"))
	require.Equal(t, chat.CodeConflict, chat.ErrorCode(err))
	require.Equal(t, "token already exists", chat.AsError(err).Message)

	// A foreign key: invalid (SQLite does not say which key, so no field name).
	err = s.CreateToken(ctx, chat.Token{ID: "t3", UserID: "ghost", Kind: chat.TokenAPI, CreatedAt: chat.Now()}, []byte("h3"))
	require.Equal(t, chat.CodeInvalid, chat.ErrorCode(err), "%v", err)

	// A check constraint.
	err = s.CreateToken(ctx, chat.Token{ID: "t4", UserID: "taken", Kind: "weird", CreatedAt: chat.Now()}, []byte("h4"))
	require.Equal(t, chat.CodeInvalid, chat.ErrorCode(err), "%v", err)

	// Metadata that is not JSON (strict RFC 8259, as jsonb: no JSON5).
	_, _, err = s.CreateGroup(ctx, chat.NewGroup{ID: "g", Title: "G", OwnerID: "taken", CreatedAt: chat.Now()})
	require.NoError(t, err)
	for _, meta := range []string{`{"a":`, `{a:1}`} {
		_, _, _, err = s.Send(ctx, chat.NewMessage{ID: "m", ConversationID: "g", SenderID: "taken", Text: "x",
			Metadata: []byte(meta), CreatedAt: chat.Now()})
		require.Equal(t, chat.CodeInvalid, chat.ErrorCode(err), "%s: %v", meta, err)
	}
	require.Equal(t, int64(0), mustView(t, ctx, s, "g", "taken").LastSeq, "nothing stored, no seq consumed")
}

func mustView(t *testing.T, ctx context.Context, s chat.Store, cid, uid string) chat.Conversation {
	t.Helper()
	c, err := s.Conversation(ctx, cid, uid)
	require.NoError(t, err)
	return c
}

// Times read back are UTC and equal to what was stored, microseconds
// included (the precision of PostgreSQL's timestamptz).
func TestSQLiteTimes(t *testing.T) {
	t.Parallel()
	ctx := testCtx(t)
	s := openSQLite(t, sqliteURL(t))
	at := time.Date(1999, 12, 31, 23, 59, 59, 123456000, time.FixedZone("X", -5*3600))
	require.NoError(t, s.CreateUser(ctx, chat.User{ID: "u", DisplayName: "U", CreatedAt: at}))
	u, err := s.User(ctx, "u")
	require.NoError(t, err)
	require.True(t, at.Equal(u.CreatedAt), "%v != %v", at, u.CreatedAt)
	require.Equal(t, time.UTC, u.CreatedAt.Location())
	require.Equal(t, at.UTC(), u.CreatedAt)
}

func TestSQLiteClosedIsUnavailable(t *testing.T) {
	t.Parallel()
	ctx := testCtx(t)
	s, err := store.Open(ctx, sqliteURL(t))
	require.NoError(t, err)
	require.NoError(t, s.Migrate(ctx))
	require.NoError(t, s.Close())
	_, err = s.User(ctx, "u")
	require.Equal(t, chat.CodeUnavailable, chat.ErrorCode(err), "%v", err)
	_, _, _, err = s.Send(ctx, chat.NewMessage{ID: "m", ConversationID: "c", SenderID: "u", Text: "x", CreatedAt: chat.Now()})
	require.Equal(t, chat.CodeUnavailable, chat.ErrorCode(err), "%v", err)
	require.Equal(t, chat.CodeUnavailable, chat.ErrorCode(s.Ping(ctx)))
}
