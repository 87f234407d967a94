package store

import (
	"context"
	"database/sql"
	"fmt"
	"net"
	"net/url"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/lib/pq"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"imd/chat"
	"imd/internal/testenv"
)

// Tests of group commit that need to shape batches: the committer's
// settings are changed so that a batch starts exactly when n sends are
// queued (holdBatches), and the sends are queued in a known order.

func batchCtx(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	t.Cleanup(cancel)
	return ctx
}

func openPostgresT(t *testing.T, dsn string, opts ...Option) *Store {
	t.Helper()
	ctx := batchCtx(t)
	s, err := Open(ctx, dsn, opts...)
	require.NoError(t, err)
	s.DB().SetMaxOpenConns(4)
	t.Cleanup(func() { _ = s.Close() })
	require.NoError(t, s.Migrate(ctx))
	return s
}

// bothDialects runs fn on a new store of each dialect, in parallel; the
// PostgreSQL store has one lane, so that fn can shape batches of sends into
// several conversations.
func bothDialects(t *testing.T, fn func(t *testing.T, s *Store)) {
	t.Run("postgres", func(t *testing.T) {
		t.Parallel()
		s := openPostgresT(t, testenv.DatabaseURL(t), WithSendLanes(1))
		fn(t, s)
	})
	t.Run("sqlite", func(t *testing.T) {
		t.Parallel()
		s, _ := openSQLiteT(t, sqliteReaders())
		fn(t, s)
	})
}

// setBatching changes every lane's delay and batch size, and ends the wait
// of a batch being gathered.
func setBatching(s *Store, delay time.Duration, max int) {
	for _, c := range s.lanes {
		c.mu.Lock()
		c.delay, c.max = delay, max
		c.mu.Unlock()
		signal(c.full)
	}
}

// holdBatches makes each lane start a batch only once n sends are queued in
// it: the sends of one conversation, or of several when the store has one
// lane (WithSendLanes(1)).
func holdBatches(s *Store, n int) { setBatching(s, time.Hour, n) }

// inLane returns a conversation id of the form prefix<n> that s commits in
// lane.
func inLane(s *Store, prefix string, lane int) string {
	for n := 0; ; n++ {
		if cid := fmt.Sprintf("%s%d", prefix, n); laneOf(cid, len(s.lanes)) == lane {
			return cid
		}
	}
}

// queued is the number of sends queued in all lanes.
func queued(s *Store) int {
	n := 0
	for _, c := range s.lanes {
		c.mu.Lock()
		n += len(c.queue)
		c.mu.Unlock()
	}
	return n
}

// batches is the number of transactions the lanes have run.
func batches(s *Store) int64 {
	var n int64
	for _, c := range s.lanes {
		n += c.batches.Load()
	}
	return n
}

type sendOutcome struct {
	m       chat.Message
	created bool
	ch      chat.Changed
	err     error
}

// sendInOrder queues ms one after the other (each is queued before the next
// is sent) and returns their outcomes once all have returned.
func sendInOrder(t *testing.T, ctx context.Context, s *Store, ms []chat.NewMessage) []sendOutcome {
	t.Helper()
	out := make([]sendOutcome, len(ms))
	var wg sync.WaitGroup
	base := queued(s)
	for i, m := range ms {
		wg.Go(func() {
			var o sendOutcome
			o.m, o.created, o.ch, o.err = s.Send(ctx, m)
			out[i] = o
		})
		if i < len(ms)-1 { // the last one may start the batch at once
			testenv.Eventually(t, 10*time.Second, func() bool { return queued(s) == base+i+1 }, "send %d queued", i)
		}
	}
	wg.Wait()
	return out
}

func setupUsers(t *testing.T, ctx context.Context, s *Store, ids ...string) {
	t.Helper()
	for _, id := range ids {
		require.NoError(t, s.CreateUser(ctx, chat.User{ID: id, DisplayName: id, CreatedAt: chat.Now()}))
	}
}

func setupGroupOf(t *testing.T, ctx context.Context, s *Store, cid string, members ...string) {
	t.Helper()
	_, _, err := s.CreateGroup(ctx, chat.NewGroup{ID: cid, Title: cid, OwnerID: members[0], MemberIDs: members[1:], CreatedAt: chat.Now()})
	require.NoError(t, err)
}

func msgSeqs(t *testing.T, ctx context.Context, s *Store, cid string) []int64 {
	t.Helper()
	ms, _, err := s.Messages(ctx, cid, chat.HistoryQuery{After: true, Limit: 1000})
	require.NoError(t, err)
	out := []int64{}
	for _, m := range ms {
		out = append(out, m.Seq)
	}
	return out
}

// One batch holding everything sendBatch decides: new messages in three
// conversations, a replay and a conflict of a stored key, a key used twice
// within the batch (and once with other text), the same key by another
// sender, non-members and a conversation that does not exist.
func TestSendBatchMixed(t *testing.T) {
	bothDialects(t, func(t *testing.T, s *Store) {
		ctx := batchCtx(t)
		setupUsers(t, ctx, s, "ann", "bob", "cat", "out")
		setupGroupOf(t, ctx, s, "g1", "ann", "bob")
		setupGroupOf(t, ctx, s, "g2", "ann", "cat")
		setupGroupOf(t, ctx, s, "g3", "bob", "cat")
		old, created, _, err := s.Send(ctx, chat.NewMessage{ID: "m-old", ConversationID: "g1", SenderID: "ann",
			Text: "old", Metadata: []byte(`{"a":1,"b":2}`), ClientMsgID: "old", CreatedAt: chat.Now()})
		require.NoError(t, err)
		require.True(t, created)
		require.Equal(t, int64(1), old.Seq)

		t0 := chat.Now()
		nm := func(i int, cid, sender, text, key string) chat.NewMessage {
			return chat.NewMessage{ID: fmt.Sprintf("m%d", i), ConversationID: cid, SenderID: sender, Text: text,
				ClientMsgID: key, CreatedAt: t0.Add(time.Duration(i) * time.Millisecond)}
		}
		ms := []chat.NewMessage{
			nm(0, "g1", "ann", "a1", ""),           // g1 seq 2
			nm(1, "g1", "ann", "old", "old"),       // replay of m-old
			nm(2, "g1", "ann", "changed", "old"),   // conflict with m-old
			nm(3, "g2", "cat", "n", "new"),         // g2 seq 1
			nm(4, "g3", "bob", "b1", ""),           // g3 seq 1
			nm(5, "g2", "ann", "n", "new"),         // another sender's key: g2 seq 2
			nm(6, "g2", "cat", "n", "new"),         // replay of 3, within the batch
			nm(7, "g2", "cat", "other", "new"),     // conflict with 3
			nm(8, "g3", "out", "intruder", ""),     // not a member
			nm(9, "nope", "bob", "x", ""),          // no such conversation
			nm(10, "g1", "bob", "b2", ""),          // g1 seq 3
			nm(11, "g3", "cat", "c", "c"),          // g3 seq 2
			nm(12, "g1", "out", "old", "old"),      // not a member, with a key in use
			nm(13, "g1", "ann", "a3", "new"),       // "new" in another conversation: g1 seq 4
			nm(14, "g2", "cat", "n", "new"),        // replay of 3 again
			nm(15, "g1", "cat", "not mine", "old"), // cat is not in g1
		}
		ms[1].Metadata = []byte(`{"b":2, "a":1.0}`) // the same JSON value
		holdBatches(s, len(ms))
		before := batches(s)
		out := sendInOrder(t, ctx, s, ms)
		require.Equal(t, before+1, batches(s), "one transaction")

		type want struct {
			seq     int64
			created bool
			code    chat.Code
		}
		wants := []want{
			{2, true, ""}, {1, false, ""}, {0, false, chat.CodeConflict}, {1, true, ""}, {1, true, ""},
			{2, true, ""}, {1, false, ""}, {0, false, chat.CodeConflict}, {0, false, chat.CodeNotFound},
			{0, false, chat.CodeNotFound}, {3, true, ""}, {2, true, ""}, {0, false, chat.CodeNotFound},
			{4, true, ""}, {1, false, ""}, {0, false, chat.CodeNotFound},
		}
		var lastID int64
		for i, w := range wants {
			o := out[i]
			if w.code != "" {
				require.Equal(t, w.code, chat.ErrorCode(o.err), "request %d: %v", i, o.err)
				require.Empty(t, o.ch.Events, "request %d", i)
				continue
			}
			require.NoError(t, o.err, "request %d", i)
			require.Equal(t, w.created, o.created, "request %d", i)
			require.Equal(t, w.seq, o.m.Seq, "request %d", i)
			require.Equal(t, ms[i].ConversationID, o.m.ConversationID, "request %d", i)
			if !w.created {
				require.Empty(t, o.ch.Events, "request %d: a replay announces nothing", i)
				continue
			}
			require.Equal(t, ms[i].ID, o.m.ID)
			require.Equal(t, ms[i].Text, o.m.Text)
			require.Equal(t, ms[i].CreatedAt, o.m.CreatedAt)
			require.Len(t, o.ch.Events, 1, "request %d", i)
			ev := o.ch.Events[0]
			require.Equal(t, chat.EventMessageCreated, ev.Type)
			require.Equal(t, o.m.Seq, ev.Seq)
			require.Equal(t, o.m.ConversationID, ev.ConversationID)
			require.Equal(t, o.m.CreatedAt, ev.CreatedAt, "the event has its message's time")
			require.Greater(t, ev.ID, lastID, "event ids follow the requests")
			lastID = ev.ID
		}
		require.Equal(t, old, out[1].m, "the replay returns the original")
		require.Equal(t, out[3].m, out[6].m, "the in-batch replay returns the batch's original")
		require.Equal(t, out[3].m, out[14].m)

		require.Equal(t, []int64{1, 2, 3, 4}, msgSeqs(t, ctx, s, "g1"))
		require.Equal(t, []int64{1, 2}, msgSeqs(t, ctx, s, "g2"))
		require.Equal(t, []int64{1, 2}, msgSeqs(t, ctx, s, "g3"))
		for cid, last := range map[string]int{"g1": 13, "g2": 5, "g3": 11} {
			c, err := s.Conversation(ctx, cid, ms[last].SenderID)
			require.NoError(t, err)
			require.Equal(t, out[last].m.Seq, c.LastSeq, cid)
			require.Equal(t, ms[last].CreatedAt, c.LastActivityAt, "%s: the activity of its last message", cid)
		}
		for _, r := range []struct {
			cid, uid string
			seq      int64
		}{{"g1", "ann", 4}, {"g1", "bob", 3}, {"g2", "ann", 2}, {"g2", "cat", 1}, {"g3", "bob", 1}, {"g3", "cat", 2}} {
			m, err := s.Member(ctx, r.cid, r.uid)
			require.NoError(t, err)
			require.Equal(t, r.seq, m.LastReadSeq, "%s/%s read position", r.cid, r.uid)
		}
		evs, err := s.ClaimEvents(ctx, time.Now().Add(time.Hour), time.Hour, 1000)
		require.NoError(t, err)
		var stored []chat.OutboxEvent
		for _, ev := range evs {
			if ev.Type == chat.EventMessageCreated {
				stored = append(stored, ev)
			}
		}
		require.Len(t, stored, 1+7, "m-old, then one event per new message of the batch")
		for _, i := range []int{0, 3, 4, 5, 10, 11, 13} {
			require.Contains(t, stored, out[i].ch.Events[0], "request %d's event is stored as returned", i)
		}
	})
}

// A request the database rejects fails alone: the batch is retried one
// request at a time.
func TestSendBatchPoison(t *testing.T) {
	bothDialects(t, func(t *testing.T, s *Store) {
		ctx := batchCtx(t)
		setupUsers(t, ctx, s, "ann", "bob")
		setupGroupOf(t, ctx, s, "g", "ann", "bob")
		setupGroupOf(t, ctx, s, "h", "bob", "ann")
		_, _, _, err := s.Send(ctx, chat.NewMessage{ID: "taken", ConversationID: "h", SenderID: "bob", Text: "t", CreatedAt: chat.Now()})
		require.NoError(t, err)
		for _, bad := range []struct {
			name   string
			m      chat.NewMessage
			code   chat.Code
			pgOnly bool // SQLite stores it
		}{
			{"metadata the database rejects",
				chat.NewMessage{ID: "bad", ConversationID: "g", SenderID: "ann", Text: "bad", Metadata: []byte(`{a:1}`)},
				chat.CodeInvalid, false},
			{"a message id used before",
				chat.NewMessage{ID: "taken", ConversationID: "g", SenderID: "ann", Text: "bad"},
				chat.CodeConflict, false},
			// The domain rejects NUL in text; the store must not pass it on
			// (a literal would end at it, send_pg.go).
			{"text with NUL",
				chat.NewMessage{ID: "nul", ConversationID: "g", SenderID: "ann", Text: "a\x00b"},
				chat.CodeInvalid, true},
			{"metadata with an escaped NUL, which jsonb refuses",
				chat.NewMessage{ID: "unul", ConversationID: "g", SenderID: "ann", Text: "bad", Metadata: []byte(`{"a":"\u0000"}`)},
				chat.CodeInvalid, true},
		} {
			if bad.pgOnly && s.Dialect() == "sqlite" {
				continue
			}
			bad.m.CreatedAt = chat.Now()
			base := int64(len(msgSeqs(t, ctx, s, "g")))
			ms := []chat.NewMessage{
				{ID: bad.name + "0", ConversationID: "g", SenderID: "ann", Text: "0", CreatedAt: chat.Now()},
				{ID: bad.name + "1", ConversationID: "g", SenderID: "bob", Text: "1", ClientMsgID: bad.name, CreatedAt: chat.Now()},
				bad.m,
				{ID: bad.name + "3", ConversationID: "h", SenderID: "bob", Text: "3", CreatedAt: chat.Now()},
				{ID: bad.name + "4", ConversationID: "g", SenderID: "bob", Text: "4", CreatedAt: chat.Now()},
			}
			holdBatches(s, len(ms))
			before := batches(s)
			out := sendInOrder(t, ctx, s, ms)
			require.Equal(t, before+1+int64(len(ms)), batches(s), "%s: the batch, then each request alone", bad.name)
			require.Equal(t, bad.code, chat.ErrorCode(out[2].err), "%s: %v", bad.name, out[2].err)
			for i, seq := range map[int]int64{0: base + 1, 1: base + 2, 4: base + 3} {
				require.NoError(t, out[i].err, bad.name)
				require.True(t, out[i].created)
				require.Equal(t, seq, out[i].m.Seq, "%s: request %d, in order", bad.name, i)
				require.Len(t, out[i].ch.Events, 1)
			}
			require.NoError(t, out[3].err)
			require.Equal(t, seqRangeT(base+3), msgSeqs(t, ctx, s, "g"), "%s: no gap where the bad one was", bad.name)
		}
	})
}

// The database going away under a batch fails every request of it as
// unavailable, at once (no retry one by one), and stores nothing.
func TestSendBatchDatabaseDown(t *testing.T) {
	t.Parallel()
	ctx := batchCtx(t)
	dsn, proxy := viaNewProxy(t, testenv.DatabaseURL(t))
	s := openPostgresT(t, dsn)
	setupUsers(t, ctx, s, "ann", "bob")
	setupGroupOf(t, ctx, s, "g", "ann", "bob")
	_, _, _, err := s.Send(ctx, chat.NewMessage{ID: "m0", ConversationID: "g", SenderID: "ann", Text: "0", CreatedAt: chat.Now()})
	require.NoError(t, err)

	var ms []chat.NewMessage
	for i := range 6 {
		ms = append(ms, chat.NewMessage{ID: fmt.Sprintf("m%d", i+1), ConversationID: "g", SenderID: []string{"ann", "bob"}[i%2],
			Text: "x", ClientMsgID: fmt.Sprintf("k%d", i), CreatedAt: chat.Now()})
	}
	holdBatches(s, len(ms))
	proxy.Down()
	before := batches(s)
	start := time.Now()
	out := sendInOrder(t, ctx, s, ms)
	for i, o := range out {
		require.Equal(t, chat.CodeUnavailable, chat.ErrorCode(o.err), "request %d: %v", i, o.err)
	}
	require.Equal(t, before+1, batches(s), "unavailable: no retry one by one")
	require.Less(t, time.Since(start), 10*time.Second, "fails fast")

	proxy.Up()
	setBatching(s, SendBatchDelay, MaxSendBatch)
	testenv.Eventually(t, 10*time.Second, func() bool { return s.Ping(ctx) == nil }, "the pool reconnects")
	require.Equal(t, []int64{1}, msgSeqs(t, ctx, s, "g"), "nothing stored")
	c, err := s.Conversation(ctx, "g", "bob")
	require.NoError(t, err)
	require.Equal(t, int64(1), c.LastSeq, "no seq consumed")
	require.Equal(t, int64(0), c.LastReadSeq)
	evs, err := s.ClaimEvents(ctx, time.Now().Add(time.Hour), time.Hour, 100)
	require.NoError(t, err)
	require.Len(t, evs, 2, "conversation.created and m0's event only")
	// The clients' retries.
	for i, m := range ms {
		got, created, _, err := s.Send(ctx, m)
		require.NoError(t, err)
		require.True(t, created)
		require.Equal(t, int64(i+2), got.Seq)
	}
}

// viaNewProxy puts a proxy in front of the server of dsn (a URL or a
// key=value string) and returns dsn pointed at it.
func viaNewProxy(t *testing.T, dsn string) (string, *testenv.Proxy) {
	t.Helper()
	if strings.HasPrefix(dsn, "postgres://") || strings.HasPrefix(dsn, "postgresql://") {
		u, err := url.Parse(dsn)
		require.NoError(t, err)
		port := u.Port()
		if port == "" {
			port = "5432"
		}
		proxy := testenv.NewProxy(t, net.JoinHostPort(u.Hostname(), port))
		u.Host = proxy.Addr()
		return u.String(), proxy
	}
	host, port := "localhost", "5432"
	for _, kv := range strings.Fields(dsn) {
		k, v, _ := strings.Cut(kv, "=")
		switch k {
		case "host":
			host = v
		case "port":
			port = v
		}
	}
	proxy := testenv.NewProxy(t, net.JoinHostPort(host, port))
	phost, pport, err := net.SplitHostPort(proxy.Addr())
	require.NoError(t, err)
	return dsn + " host=" + phost + " port=" + pport, proxy // later keys win
}

// TestSendAfterConnectionsCut: a batch that meets a connection the pool kept
// but which has died since (the database restarted, a proxy cut it) runs on
// another, and the send succeeds; as many dead connections as the pool
// holds are passed over.
func TestSendAfterConnectionsCut(t *testing.T) {
	t.Parallel()
	ctx := batchCtx(t)
	dsn, proxy := viaNewProxy(t, testenv.DatabaseURL(t))
	s := openPostgresT(t, dsn)
	setupUsers(t, ctx, s, "ann", "bob")
	setupGroupOf(t, ctx, s, "g", "ann", "bob")
	// Every connection the pool may open, idle, with the batch statements
	// prepared on one of them.
	var conns []*sql.Conn
	for range 4 {
		c, err := s.DB().Conn(ctx)
		require.NoError(t, err)
		require.NoError(t, c.PingContext(ctx))
		conns = append(conns, c)
	}
	for _, c := range conns {
		require.NoError(t, c.Close())
	}
	_, _, _, err := s.Send(ctx, chat.NewMessage{ID: "m1", ConversationID: "g", SenderID: "ann", Text: "1", CreatedAt: chat.Now()})
	require.NoError(t, err)
	require.Equal(t, 4, s.DB().Stats().Idle)

	proxy.Down()
	proxy.Up()
	for i := 2; i <= 3; i++ {
		m, created, _, err := s.Send(ctx, chat.NewMessage{ID: fmt.Sprintf("m%d", i), ConversationID: "g", SenderID: "bob",
			Text: "x", CreatedAt: chat.Now()})
		require.NoError(t, err, "send %d", i)
		require.True(t, created)
		require.Equal(t, int64(i), m.Seq)
	}
	require.Equal(t, []int64{1, 2, 3}, msgSeqs(t, ctx, s, "g"))
}

// TestSendWriteKeyTaken: a write that meets an idempotency key stored after
// all (the check, under the locks, did not see it) fails, and its COMMIT,
// in the same round trip, does not run: the batch fails as errKeyConflict
// and nothing of it is stored.
func TestSendWriteKeyTaken(t *testing.T) {
	t.Parallel()
	ctx := batchCtx(t)
	s := openPostgresT(t, testenv.DatabaseURL(t))
	setupUsers(t, ctx, s, "ann", "bob")
	setupGroupOf(t, ctx, s, "g", "ann", "bob")
	_, _, _, err := s.Send(ctx, chat.NewMessage{ID: "m1", ConversationID: "g", SenderID: "ann", Text: "1",
		ClientMsgID: "k", CreatedAt: chat.Now()})
	require.NoError(t, err)

	// A plan as if the check had not found the key: ann's "k" again, and
	// bob's message, as seqs 2 and 3.
	ms := []chat.NewMessage{
		{ID: "m2", ConversationID: "g", SenderID: "ann", Text: "2", ClientMsgID: "k", CreatedAt: chat.Now()},
		{ID: "m3", ConversationID: "g", SenderID: "bob", Text: "3", CreatedAt: chat.Now()},
	}
	p, err := planBatch(ms, []lockedConv{{ID: "g", LastSeq: 1}}, []checkRow{{Ord: 1, Member: true}, {Ord: 2, Member: true}})
	require.NoError(t, err)
	require.Len(t, p.evs, 2)
	conn, err := s.db.Connx(ctx)
	require.NoError(t, err)
	defer discard(conn) // it may have the statements already: start it anew
	_, err = conn.ExecContext(ctx, "DEALLOCATE ALL;\n"+sendPrepare+";\nBEGIN")
	require.NoError(t, err)
	_, err = s.writeAndCommit(ctx, conn, p)
	require.ErrorIs(t, err, errKeyConflict)

	require.Equal(t, []int64{1}, msgSeqs(t, ctx, s, "g"), "nothing of the batch stored")
	c, err := s.Conversation(ctx, "g", "bob")
	require.NoError(t, err)
	require.Equal(t, int64(1), c.LastSeq, "no seq consumed")
}

// A batch waiting for a lock held elsewhere (another process on the SQLite
// file) until every request's context has ended fails them all as
// unavailable, and stores nothing.
func TestSendBatchAbandoned(t *testing.T) {
	t.Parallel()
	ctx := batchCtx(t)
	s, path := openSQLiteT(t, sqliteReaders())
	setupUsers(t, ctx, s, "ann")
	setupGroupOf(t, ctx, s, "g", "ann")
	release := holdWriteLock(t, path)

	short, cancel := context.WithTimeout(ctx, 300*time.Millisecond)
	defer cancel()
	holdBatches(s, 3)
	var ms []chat.NewMessage
	for i := range 3 {
		ms = append(ms, chat.NewMessage{ID: fmt.Sprintf("m%d", i), ConversationID: "g", SenderID: "ann", Text: "x", CreatedAt: chat.Now()})
	}
	start := time.Now()
	out := sendInOrder(t, short, s, ms)
	for i, o := range out {
		require.Equal(t, chat.CodeUnavailable, chat.ErrorCode(o.err), "request %d: %v", i, o.err)
	}
	require.Less(t, time.Since(start), 3*time.Second, "the requests' deadline, not the busy timeout")
	release()
	setBatching(s, SendBatchDelay, MaxSendBatch)
	require.Empty(t, msgSeqs(t, ctx, s, "g"))
	m, _, _, err := s.Send(ctx, ms[0])
	require.NoError(t, err)
	require.Equal(t, int64(1), m.Seq, "no seq consumed")
}

// holdWriteLock takes SQLite's write lock on the file from another
// connection, as another process would; release gives it back.
func holdWriteLock(t *testing.T, path string) (release func()) {
	t.Helper()
	ctx := context.Background()
	other, err := sql.Open("sqlite", path)
	require.NoError(t, err)
	t.Cleanup(func() { _ = other.Close() })
	conn, err := other.Conn(ctx)
	require.NoError(t, err)
	_, err = conn.ExecContext(ctx, "BEGIN IMMEDIATE")
	require.NoError(t, err)
	var once sync.Once
	release = func() {
		once.Do(func() {
			_, err := conn.ExecContext(ctx, "ROLLBACK")
			require.NoError(t, err)
			require.NoError(t, conn.Close())
		})
	}
	t.Cleanup(release)
	return release
}

// A request whose context ends after its batch has started waits for the
// batch and gets its outcome: a send that returns an error stores nothing,
// so one that is stored must not return an error (G1).
func TestSendContextEndsInBatch(t *testing.T) {
	t.Parallel()
	ctx := batchCtx(t)
	s, path := openSQLiteT(t, sqliteReaders())
	setupUsers(t, ctx, s, "ann", "bob")
	setupGroupOf(t, ctx, s, "g", "ann", "bob")
	release := holdWriteLock(t, path)

	short, cancel := context.WithCancel(ctx)
	holdBatches(s, 2)
	before := batches(s)
	type result struct {
		m   chat.Message
		err error
	}
	results := make(chan result, 2)
	for i, c := range []context.Context{short, ctx} {
		go func() {
			m, _, _, err := s.Send(c, chat.NewMessage{ID: fmt.Sprintf("m%d", i), ConversationID: "g", SenderID: "ann",
				Text: fmt.Sprint(i), CreatedAt: chat.Now()})
			results <- result{m, err}
		}()
		if i == 0 {
			testenv.Eventually(t, 10*time.Second, func() bool { return queued(s) == 1 }, "queued")
		}
	}
	testenv.Eventually(t, 10*time.Second, func() bool { return batches(s) == before+1 }, "the batch started")
	cancel() // the batch is waiting for the lock
	select {
	case r := <-results:
		t.Fatalf("a request of a batch in flight returned before the batch ended: %+v", r)
	case <-time.After(200 * time.Millisecond):
	}
	release()
	for range 2 {
		r := <-results
		require.NoError(t, r.err)
	}
	require.Equal(t, []int64{1, 2}, msgSeqs(t, ctx, s, "g"))
}

// A request whose context ends while it is queued returns at once with its
// context's error and is never stored.
func TestSendContextEndsQueued(t *testing.T) {
	bothDialects(t, func(t *testing.T, s *Store) {
		ctx := batchCtx(t)
		setupUsers(t, ctx, s, "ann")
		setupGroupOf(t, ctx, s, "g", "ann")
		holdBatches(s, 10)
		short, cancel := context.WithTimeout(ctx, 100*time.Millisecond)
		defer cancel()
		start := time.Now()
		_, _, _, err := s.Send(short, chat.NewMessage{ID: "m0", ConversationID: "g", SenderID: "ann", Text: "x", CreatedAt: chat.Now()})
		require.Equal(t, chat.CodeUnavailable, chat.ErrorCode(err), "%v", err)
		require.Less(t, time.Since(start), 5*time.Second)
		require.Equal(t, 1, queued(s), "left for the committer to drop")

		setBatching(s, SendBatchDelay, MaxSendBatch)
		m, created, _, err := s.Send(ctx, chat.NewMessage{ID: "m1", ConversationID: "g", SenderID: "ann", Text: "y", CreatedAt: chat.Now()})
		require.NoError(t, err)
		require.True(t, created)
		require.Equal(t, int64(1), m.Seq, "the abandoned send took no seq")
		require.Equal(t, []int64{1}, msgSeqs(t, ctx, s, "g"))
	})
}

// Close fails the sends still queued, and later ones, as unavailable.
func TestCloseFailsQueuedSends(t *testing.T) {
	bothDialects(t, func(t *testing.T, s *Store) {
		ctx := batchCtx(t)
		setupUsers(t, ctx, s, "ann")
		setupGroupOf(t, ctx, s, "g", "ann")
		holdBatches(s, 10)
		errs := make(chan error, 3)
		for i := range 3 {
			go func() {
				_, _, _, err := s.Send(ctx, chat.NewMessage{ID: fmt.Sprintf("m%d", i), ConversationID: "g", SenderID: "ann",
					Text: "x", CreatedAt: chat.Now()})
				errs <- err
			}()
		}
		testenv.Eventually(t, 10*time.Second, func() bool { return queued(s) == 3 }, "queued")
		require.NoError(t, s.Close())
		for range 3 {
			err := <-errs
			require.Equal(t, chat.CodeUnavailable, chat.ErrorCode(err), "%v", err)
		}
		_, _, _, err := s.Send(ctx, chat.NewMessage{ID: "late", ConversationID: "g", SenderID: "ann", Text: "x", CreatedAt: chat.Now()})
		require.Equal(t, chat.CodeUnavailable, chat.ErrorCode(err), "%v", err)
		require.True(t, strings.Contains(err.Error(), "closed"), "%v", err)
		require.NoError(t, s.Close(), "twice is harmless")
	})
}

func TestValuesSQL(t *testing.T) {
	require.Equal(t, "($1, $2::bigint), ($3, $4::bigint)", postgresDialect.valueRows(2, "", "bigint"))
	require.Equal(t, "($1, $2), ($3, $4)", sqliteDialect.valueRows(2, "", "bigint"))
	require.Equal(t, "(SELECT column1 AS id, column2 AS seq FROM (VALUES ($1, $2::bigint)) AS v_rows) AS v",
		postgresDialect.values(1, "v", "id", "seq bigint"))
}

// Two nodes (two stores, so two committers, on one database) sending into
// the same conversations at once, with retries of one send racing on both:
// the conversation locks keep seqs gapless across their batches (G3) and the
// key look-up under the lock makes one creation per key (G2). On SQLite the
// second store is a second process's, contending for the file's write lock.
func TestSendTwoNodes(t *testing.T) {
	open2 := map[string]func(t *testing.T) (*Store, *Store){
		"postgres": func(t *testing.T) (*Store, *Store) {
			dsn := testenv.DatabaseURL(t)
			return openPostgresT(t, dsn), openPostgresT(t, dsn)
		},
		"sqlite": func(t *testing.T) (*Store, *Store) {
			a, path := openSQLiteT(t, sqliteReaders())
			ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
			defer cancel()
			b, err := openSQLite(ctx, path, sqliteReaders())
			require.NoError(t, err)
			t.Cleanup(func() { _ = b.Close() })
			return a, b
		},
	}
	for name, open := range open2 {
		t.Run(name, func(t *testing.T) {
			t.Parallel()
			ctx := batchCtx(t)
			a, b := open(t)
			nodes := []*Store{a, b}
			uids := []string{"u0", "u1", "u2", "u3"}
			setupUsers(t, ctx, a, uids...)
			const convs, workers, each = 3, 16, 25
			for c := range convs {
				setupGroupOf(t, ctx, a, fmt.Sprintf("g%d", c), uids...)
			}
			type sent struct {
				m       chat.Message
				created bool
			}
			got := make([][]sent, workers)
			errs := make([]error, workers)
			var wg sync.WaitGroup
			for w := range workers {
				wg.Go(func() {
					for j := range each {
						// Workers w and w^1 send the same keyed message, each
						// through another node.
						pair := w / 2
						m := chat.NewMessage{ID: fmt.Sprintf("m%d-%d", w, j), ConversationID: fmt.Sprintf("g%d", (pair+j)%convs),
							SenderID: uids[pair%len(uids)], Text: fmt.Sprintf("%d/%d", pair, j),
							ClientMsgID: fmt.Sprintf("k%d-%d", pair, j), CreatedAt: chat.Now()}
						msg, created, _, err := nodes[w%2].Send(ctx, m)
						if err != nil {
							errs[w] = err
							return
						}
						got[w] = append(got[w], sent{msg, created})
					}
				})
			}
			wg.Wait()
			perConv := map[string][]int64{}
			for w := 0; w < workers; w += 2 {
				require.NoError(t, errs[w])
				require.NoError(t, errs[w+1])
				for j := range each {
					x, y := got[w][j], got[w+1][j]
					require.Equal(t, x.m, y.m, "both retries get the one message")
					require.True(t, x.created != y.created, "exactly one of the two created it")
					perConv[x.m.ConversationID] = append(perConv[x.m.ConversationID], x.m.Seq)
				}
			}
			total := 0
			for cid, seqs := range perConv {
				require.Equal(t, seqRangeT(int64(len(seqs))), sortedCopy(seqs), cid)
				require.Equal(t, seqRangeT(int64(len(seqs))), msgSeqs(t, ctx, a, cid), "%s: stored once each", cid)
				total += len(seqs)
			}
			require.Equal(t, workers/2*each, total)
		})
	}
}

func seqRangeT(n int64) []int64 {
	out := []int64{}
	for i := int64(1); i <= n; i++ {
		out = append(out, i)
	}
	return out
}

func sortedCopy(s []int64) []int64 {
	out := slices.Clone(s)
	slices.Sort(out)
	return out
}

// Sends into many conversations at once over several lanes: each
// conversation stays gapless and in one lane's order (G3), and every send is
// stored once.
func TestSendLanesGapless(t *testing.T) {
	ctx := batchCtx(t)
	s := openPostgresT(t, testenv.DatabaseURL(t), WithSendLanes(4))
	setupUsers(t, ctx, s, "ann", "bob")
	const convs, workers, each = 8, 16, 40
	cids := make([]string, convs)
	lanes := map[int]bool{}
	for i := range cids {
		cids[i] = fmt.Sprintf("g%d", i)
		lanes[laneOf(cids[i], len(s.lanes))] = true
		setupGroupOf(t, ctx, s, cids[i], "ann", "bob")
	}
	require.Greater(t, len(lanes), 1, "the conversations use several lanes")
	var wg sync.WaitGroup
	for w := range workers {
		wg.Go(func() {
			for j := range each {
				m := chat.NewMessage{ID: fmt.Sprintf("m%d-%d", w, j), ConversationID: cids[(w+j)%convs],
					SenderID: []string{"ann", "bob"}[j%2], Text: "x", ClientMsgID: fmt.Sprintf("k%d-%d", w, j), CreatedAt: chat.Now()}
				got, created, _, err := s.Send(ctx, m)
				if !assert.NoError(t, err) {
					return
				}
				assert.True(t, created)
				assert.Equal(t, m.ConversationID, got.ConversationID)
			}
		})
	}
	wg.Wait()
	total := 0
	for _, cid := range cids {
		seqs := msgSeqs(t, ctx, s, cid)
		require.Equal(t, seqRangeT(int64(len(seqs))), seqs, "%s gapless", cid)
		total += len(seqs)
	}
	require.Equal(t, workers*each, total)
}

// WithSendLanes sets a PostgreSQL store's lanes; SQLite keeps its one; a
// count out of range is an error from Open, before anything is opened.
func TestSendLanesOption(t *testing.T) {
	t.Parallel()
	ctx := batchCtx(t)
	dsn := testenv.DatabaseURL(t)
	require.Len(t, openPostgresT(t, dsn).lanes, DefaultSendLanes)
	require.Len(t, openPostgresT(t, dsn, WithSendLanes(3)).lanes, 3)
	require.Len(t, openPostgresT(t, dsn, WithSendLanes(MaxSendLanes)).lanes, MaxSendLanes)

	lite, err := Open(ctx, "sqlite:"+t.TempDir()+"/imd.db", WithSendLanes(4))
	require.NoError(t, err)
	t.Cleanup(func() { _ = lite.Close() })
	require.Len(t, lite.lanes, 1, "SQLite's single writer: one lane")

	for _, n := range []int{0, -1, MaxSendLanes + 1} {
		for _, url := range []string{dsn, "sqlite:" + t.TempDir() + "/bad.db"} {
			s, err := Open(ctx, url, WithSendLanes(n))
			require.Error(t, err, "%d lanes, %s", n, url)
			require.Nil(t, s)
			require.Contains(t, err.Error(), "send lanes")
		}
	}
}

// A lane whose batch is stuck (its conversation locked by another
// transaction) and then fails does not hold up or fail the other lanes, and
// stores nothing: its conversation stays gapless.
func TestSendLaneFailureIsolated(t *testing.T) {
	ctx := batchCtx(t)
	s := openPostgresT(t, testenv.DatabaseURL(t), WithSendLanes(2))
	setupUsers(t, ctx, s, "ann", "bob")
	stuck, free := inLane(s, "a", 0), inLane(s, "b", 1)
	setupGroupOf(t, ctx, s, stuck, "ann", "bob")
	setupGroupOf(t, ctx, s, free, "ann", "bob")
	send := func(ctx context.Context, cid, id string) (chat.Message, error) {
		m, _, _, err := s.Send(ctx, chat.NewMessage{ID: id, ConversationID: cid, SenderID: "ann", Text: id, CreatedAt: chat.Now()})
		return m, err
	}
	_, err := send(ctx, free, "f1")
	require.NoError(t, err)

	// Another transaction holds the stuck conversation's row lock.
	other, err := s.DB().BeginTxx(ctx, nil)
	require.NoError(t, err)
	defer func() { _ = other.Rollback() }()
	_, err = other.ExecContext(ctx, `SELECT 1 FROM conversations WHERE id = $1 FOR UPDATE`, stuck)
	require.NoError(t, err)

	before := batches(s)
	short, cancel := context.WithCancel(ctx)
	failed := make(chan error, 1)
	go func() {
		_, err := send(short, stuck, "s1")
		failed <- err
	}()
	testenv.Eventually(t, 10*time.Second, func() bool { return batches(s) == before+1 }, "the stuck batch started")

	// The other lane commits meanwhile.
	m, err := send(ctx, free, "f2")
	require.NoError(t, err)
	require.Equal(t, int64(2), m.Seq)

	// The stuck batch fails once its only sender gives up; nothing stored.
	cancel()
	err = <-failed
	require.Error(t, err)
	require.NoError(t, other.Rollback())
	require.Empty(t, msgSeqs(t, ctx, s, stuck))

	// Both lanes go on, gapless.
	m, err = send(ctx, stuck, "s2")
	require.NoError(t, err)
	require.Equal(t, int64(1), m.Seq)
	m, err = send(ctx, free, "f3")
	require.NoError(t, err)
	require.Equal(t, int64(3), m.Seq)
}

// OnSendCommitted gets every created message's event exactly once, each
// conversation's in seq order however the senders' goroutines are woken, and
// before the sender is answered; replays are not events.
func TestSendCommittedInSeqOrder(t *testing.T) {
	ctx := batchCtx(t)
	s := openPostgresT(t, testenv.DatabaseURL(t))
	setupUsers(t, ctx, s, "ann", "bob")
	cids := []string{"g0", "g1"}
	for _, cid := range cids {
		setupGroupOf(t, ctx, s, cid, "ann", "bob")
	}
	var mu sync.Mutex
	var got []chat.OutboxEvent
	s.OnSendCommitted(func(evs []chat.OutboxEvent) {
		mu.Lock()
		got = append(got, evs...)
		mu.Unlock()
	})
	const workers, each = 24, 20
	var wg sync.WaitGroup
	for w := range workers {
		wg.Go(func() {
			for j := range each {
				m := chat.NewMessage{ID: fmt.Sprintf("m%d-%d", w, j), ConversationID: cids[(w+j)%2],
					SenderID: "ann", Text: "x", ClientMsgID: fmt.Sprintf("k%d-%d", w, j), CreatedAt: chat.Now()}
				msg, created, _, err := s.Send(ctx, m)
				if !assert.NoError(t, err) || !assert.True(t, created) {
					return
				}
				mu.Lock()
				seen := slices.ContainsFunc(got, func(e chat.OutboxEvent) bool {
					return e.ConversationID == msg.ConversationID && e.Seq == msg.Seq
				})
				mu.Unlock()
				assert.True(t, seen, "notified before the sender is answered")
				// A replay stores nothing and notifies nothing.
				_, created, _, err = s.Send(ctx, m)
				assert.NoError(t, err)
				assert.False(t, created)
			}
		})
	}
	wg.Wait()
	next := map[string]int64{}
	for _, e := range got {
		require.Equal(t, chat.EventMessageCreated, e.Type)
		next[e.ConversationID]++
		require.Equal(t, next[e.ConversationID], e.Seq, "%s in seq order, each once", e.ConversationID)
	}
	require.Equal(t, int64(workers*each), next["g0"]+next["g1"])
}

// A direct conversation's message events reach the dispatcher with the pair
// as To (its members never change, so dispatch need not look them up); a
// group's go to all members (To empty). The outbox rows keep recipients
// empty either way, so the sweeper's re-dispatch looks the members up.
func TestSendDirectEventsCarryThePair(t *testing.T) {
	bothDialects(t, func(t *testing.T, s *Store) {
		ctx := batchCtx(t)
		setupUsers(t, ctx, s, "ann", "bob", "cat")
		setupGroupOf(t, ctx, s, "g1", "ann", "bob", "cat")
		d, _, _, err := s.DirectConversation(ctx, "bob", "ann", "d1", chat.Now())
		require.NoError(t, err)
		var mu sync.Mutex
		to := map[string][]string{}
		s.OnSendCommitted(func(evs []chat.OutboxEvent) {
			mu.Lock()
			defer mu.Unlock()
			for _, e := range evs {
				to[e.ConversationID] = e.To
			}
		})
		for i, cid := range []string{d.ID, "g1"} {
			_, created, _, err := s.Send(ctx, chat.NewMessage{ID: fmt.Sprint("m", i), ConversationID: cid,
				SenderID: "ann", Text: "hi", CreatedAt: chat.Now()})
			require.NoError(t, err)
			require.True(t, created)
		}
		mu.Lock()
		require.Equal(t, map[string][]string{d.ID: {"ann", "bob"}, "g1": nil}, to)
		mu.Unlock()

		evs, err := s.ClaimEvents(ctx, time.Now().Add(time.Hour), time.Hour, 100)
		require.NoError(t, err)
		n := 0
		for _, e := range evs {
			if e.Type == chat.EventMessageCreated {
				n++
				require.Empty(t, e.To, "%s: the stored row leaves the recipients to the members", e.ConversationID)
			}
		}
		require.Equal(t, 2, n)
	})
}

// TestSendBatchPlansUseIndexes: under batchPlans, every statement of a batch
// finds its rows through indexes, in nested loops, on tables that were
// never analyzed (a fresh database: PostgreSQL's estimates of their size
// come from their few pages). Without batchPlans the planner chose
// sequential scans and hash joins here, which cost a batch time in
// proportion to the tables (see batchPlans).
func TestSendBatchPlansUseIndexes(t *testing.T) {
	ctx := batchCtx(t)
	s := openPostgresT(t, testenv.DatabaseURL(t))
	setupUsers(t, ctx, s, "ann", "bob", "cat")
	setupGroupOf(t, ctx, s, "g1", "ann", "bob", "cat")
	_, _, _, err := s.DirectConversation(ctx, "bob", "ann", "d1", chat.Now())
	require.NoError(t, err)

	now := chat.Now()
	msgs := []chat.Message{
		{ID: "m1", ConversationID: "g1", Seq: 1, SenderID: "ann", Text: "a", ClientMsgID: "k1", CreatedAt: now},
		{ID: "m2", ConversationID: "d1", Seq: 1, SenderID: "bob", Text: "b", Metadata: []byte(`{"x":1}`), CreatedAt: now},
	}
	w := sendWrites{convs: []string{"d1", "g1"}, convSeqs: []int64{1, 1}, convAts: []time.Time{now, now},
		readCids: []string{"g1", "d1"}, readUids: []string{"ann", "bob"}, readSeqs: []int64{1, 1}, msgs: msgs}
	evs := make([]chat.OutboxEvent, len(msgs))
	for i, m := range msgs {
		evs[i] = chat.OutboxEvent{ConversationID: m.ConversationID, Type: chat.EventMessageCreated, Seq: m.Seq,
			Data: []byte(`{}`), CreatedAt: now}
	}
	writeArgs, err := s.writeSendsArgs(&w, evs)
	require.NoError(t, err)
	nulls := pq.Array([]sql.NullString{{String: "k1", Valid: true}, {}})
	statements := []struct {
		name string
		args []any
	}{
		{stmtLock, []any{pq.Array([]string{"d1", "g1"})}},
		{stmtCheck, []any{pq.Array([]string{"g1", "d1"}), pq.Array([]string{"ann", "bob"}), nulls,
			pq.Array([]sql.NullString{{}, {String: `{"x":1}`, Valid: true}})}},
		{stmtWrite, writeArgs},
	}

	// As a batch runs them (send_pg.go): prepared on the connection by name,
	// executed under batchPlans.
	conn, err := s.db.Connx(ctx)
	require.NoError(t, err)
	defer discard(conn) // it may have the statements already: start it anew
	_, err = conn.ExecContext(ctx, "DEALLOCATE ALL;\n"+sendPrepare+";\nBEGIN; "+batchPlans)
	require.NoError(t, err)
	for _, st := range statements {
		exec, err := executeSQL(st.name, st.args...)
		require.NoError(t, err)
		var lines []string
		require.NoError(t, conn.SelectContext(ctx, &lines, "EXPLAIN "+exec), st.name)
		plan := strings.Join(lines, "\n")
		for _, bad := range []string{"Seq Scan", "Hash Join", "Merge Join"} {
			assert.NotContains(t, plan, bad, "%s:\n%s", st.name, plan)
		}
		assert.Contains(t, plan, "Index", "%s:\n%s", st.name, plan)
	}
}
