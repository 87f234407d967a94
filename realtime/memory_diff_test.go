package realtime

// A differential test: the same random operations against the Redis adapter
// and the in-memory one must give the same answers. The conformance suite
// pins the contract case by case; this covers the combinations it does not
// name (dedupe after trimming, baselines after forgets, pages at ties...),
// where the Lua scripts are the reference.

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"slices"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"
	"github.com/stretchr/testify/require"

	"imd/chat"
	"imd/internal/testenv"
	"imd/realtime/realtimetest"
)

// epochPairs matches the epochs of the two implementations' logs, per
// user: each new Redis epoch must appear exactly when a new memory epoch
// does. (Per user because Redis gives every log created by one Append call
// the same epoch, while memory draws one per log.)
type epochPairs struct {
	r2m, m2r map[[2]string]string
}

func (p *epochPairs) pair(t *testing.T, uid, re, me string) {
	t.Helper()
	if p.r2m == nil {
		p.r2m, p.m2r = map[[2]string]string{}, map[[2]string]string{}
	}
	if m, ok := p.r2m[[2]string{uid, re}]; ok {
		require.Equal(t, m, me, "%s: redis epoch %s", uid, re)
		return
	}
	_, ok := p.m2r[[2]string{uid, me}]
	require.False(t, ok, "%s: memory epoch %s paired already, redis has a new one %s", uid, me, re)
	p.r2m[[2]string{uid, re}], p.m2r[[2]string{uid, me}] = me, re
}

func resyncReason(err error) string {
	var re *chat.ResyncError
	if errors.As(err, &re) {
		return re.Reason
	}
	if err != nil {
		return "error: " + err.Error()
	}
	return ""
}

func TestMemoryMatchesRedis(t *testing.T) {
	t.Parallel()
	const logCap = 12
	prefix := testenv.KeyPrefix(t)
	opts, err := redis.ParseURL(testenv.RedisURL(t))
	require.NoError(t, err)
	rdb := redis.NewClient(opts)
	t.Cleanup(func() { _ = rdb.Close() })
	r := New(rdb, Config{Prefix: prefix, LogCap: logCap})
	t.Cleanup(func() { _ = r.Close() })
	m := newTestMemory(t, Config{LogCap: logCap})
	ctx := context.Background()
	seed := uint64(time.Now().UnixNano())
	t.Logf("seed %d", seed)
	rng := rand.New(rand.NewPCG(seed, 42))

	users := []string{"u0", "u1", "u2"}
	convs := []string{"c0", "c1", "c2"}
	var epochs epochPairs
	type known struct { // a position of uid's log as each implementation knows it
		uid  string
		r, m chat.Position
	}
	var positions []known
	nextSeq := map[string]int64{} // per conversation, around which seqs are drawn

	loseAll := func() {
		iter := rdb.Scan(ctx, 0, prefix+"*", 500).Iterator()
		for iter.Next(ctx) {
			require.NoError(t, rdb.Unlink(ctx, iter.Val()).Err())
		}
		require.NoError(t, iter.Err())
		m.loseAll()
	}

	seen := map[string]int{} // what the steps ran into: the test must not become vacuous
	for step := range 2000 {
		what := fmt.Sprintf("step %d (seed %d)", step, seed)
		switch op := rng.IntN(100); {
		case op < 45: // append a batch
			var ds []chat.Delivery
			for range 1 + rng.IntN(6) {
				uid, cid := users[rng.IntN(len(users))], convs[rng.IntN(len(convs))]
				e := &chat.LogEntry{Type: chat.EventMemberUpdated, ConversationID: cid, Data: fmt.Appendf(nil, `{"step":%d}`, step)}
				switch k := rng.IntN(10); {
				case k < 5: // a message, to every user as dispatch does: mostly the next seq, else an old one or a gap
					seq := nextSeq[cid] + 1
					if r := rng.IntN(10); r >= 8 {
						seq = max(seq-int64(rng.IntN(3))-1, 1)
					} else if r == 7 {
						seq++
					}
					nextSeq[cid] = max(nextSeq[cid], seq)
					e.Type, e.Seq, e.Key = chat.EventMessageCreated, seq, fmt.Sprintf("m%d", rng.IntN(5))
					for _, u := range users {
						ds = append(ds, chat.Delivery{UserID: u, Entry: e})
					}
					continue
				case k < 8:
					e.Key = fmt.Sprintf("k%d", rng.IntN(20))
				case k < 9:
					e.Key, e.Baseline = fmt.Sprintf("b%d", rng.IntN(20)), nextSeq[cid]+int64(rng.IntN(3))-1
				default:
					e.Key, e.Forget = fmt.Sprintf("f%d", rng.IntN(20)), true
				}
				ds = append(ds, chat.Delivery{UserID: uid, Entry: e})
			}
			rg, rerr := r.Append(ctx, ds)
			mg, merr := m.Append(ctx, ds)
			require.NoError(t, rerr, what)
			require.NoError(t, merr, what)
			require.Equal(t, rg, mg, "gaps, %s", what)
			if len(rg) > 0 {
				seen["gap"]++
			}
		case op < 60: // head
			uid := users[rng.IntN(len(users))]
			rp, err := r.Head(ctx, uid)
			require.NoError(t, err, what)
			mp, err := m.Head(ctx, uid)
			require.NoError(t, err, what)
			epochs.pair(t, uid, rp.Epoch, mp.Epoch)
			require.Equal(t, rp.Offset, mp.Offset, "head, %s", what)
			positions = append(positions, known{uid, rp, mp})
		case op < 90: // read from a known position, moved a little, or a bogus one
			if len(positions) == 0 {
				continue
			}
			k := positions[len(positions)-1-rng.IntN(min(len(positions), 4))] // mostly recent ones
			if rng.IntN(10) == 0 {
				k = positions[rng.IntN(len(positions))]
			}
			uid := k.uid
			if rng.IntN(10) == 0 {
				k.r.Epoch, k.m.Epoch = "bogus", "bogus"
			}
			d := int64(rng.IntN(logCap+8)) - logCap - 2
			k.r.Offset, k.m.Offset = max(k.r.Offset+d, 0), max(k.m.Offset+d, 0)
			limit := rng.IntN(logCap+2) - 1
			revs, rpos, rerr := r.Read(ctx, uid, k.r, limit)
			mevs, mpos, merr := m.Read(ctx, uid, k.m, limit)
			require.Equal(t, resyncReason(rerr), resyncReason(merr), "read %s from %v, %s", uid, k.r, what)
			seen["read "+resyncReason(rerr)]++
			if len(revs) > 0 {
				seen["read events"]++
			}
			require.Equal(t, rpos.Offset, mpos.Offset, what)
			require.Len(t, mevs, len(revs), what)
			for i := range revs {
				rp, err := chat.ParsePosition(revs[i].ID)
				require.NoError(t, err)
				mp, err := chat.ParsePosition(mevs[i].ID)
				require.NoError(t, err)
				epochs.pair(t, uid, rp.Epoch, mp.Epoch)
				require.Equal(t, rp.Offset, mp.Offset, what)
				require.Equal(t, revs[i].Type, mevs[i].Type, what)
				require.Equal(t, string(revs[i].Data), string(mevs[i].Data), what)
			}
		case op < 91:
			loseAll()
			clear(nextSeq)
		case op < 95: // sessions
			uid := users[rng.IntN(len(users))]
			t0 := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
			at := func() time.Time { return t0.Add(time.Duration(rng.IntN(4)) * time.Second) }
			cid := convs[rng.IntN(len(convs))]
			switch rng.IntN(4) {
			case 0:
				var items []chat.Activity
				for range rng.IntN(4) {
					items = append(items, chat.Activity{ConversationID: convs[rng.IntN(len(convs))], At: at()})
				}
				require.NoError(t, r.FillSessions(ctx, uid, items))
				require.NoError(t, m.FillSessions(ctx, uid, items))
			case 1:
				a := at()
				require.NoError(t, r.TouchSessions(ctx, []string{uid, "nobody"}, cid, a))
				require.NoError(t, m.TouchSessions(ctx, []string{uid, "nobody"}, cid, a))
			case 2:
				require.NoError(t, r.RemoveSession(ctx, uid, cid))
				require.NoError(t, m.RemoveSession(ctx, uid, cid))
			}
			var after *chat.Activity
			if rng.IntN(2) == 0 {
				after = &chat.Activity{ConversationID: convs[rng.IntN(len(convs))], At: at()}
			}
			limit := rng.IntN(4)
			ri, rok, err := r.SessionPage(ctx, uid, after, limit)
			require.NoError(t, err)
			mi, mok, err := m.SessionPage(ctx, uid, after, limit)
			require.NoError(t, err)
			require.Equal(t, rok, mok, what)
			require.Equal(t, ri, mi, "page after %v limit %d, %s", after, limit, what)
			if len(ri) > 0 {
				seen["page items"]++
			}
		default: // member cache
			cid := convs[rng.IntN(len(convs))]
			if rng.IntN(3) == 0 {
				require.NoError(t, r.InvalidateMembers(ctx, cid))
				require.NoError(t, m.InvalidateMembers(ctx, cid))
			}
			_, rok, rver, err := realtimetest.CachedOne(ctx, r, cid)
			require.NoError(t, err)
			_, mok, mver, err := realtimetest.CachedOne(ctx, m, cid)
			require.NoError(t, err)
			require.Equal(t, rok, mok, what)
			require.Equal(t, rver, mver, what)
			if !rok {
				ver := rver
				if rng.IntN(3) == 0 {
					ver = "7"
				}
				members := users[:rng.IntN(len(users))]
				require.NoError(t, r.FillMembers(ctx, cid, ver, members))
				require.NoError(t, m.FillMembers(ctx, cid, ver, members))
			}
			rm, rok, rver, err := realtimetest.CachedOne(ctx, r, cid)
			require.NoError(t, err)
			mm, mok, mver, err := realtimetest.CachedOne(ctx, m, cid)
			require.NoError(t, err)
			slices.Sort(rm)
			slices.Sort(mm)
			require.Equal(t, []any{rm, rok, rver}, []any{mm, mok, mver}, what)
			if rok {
				seen["member hit"]++
			}
		}
	}
	t.Logf("seen %v", seen)
	for _, k := range []string{"gap", "read ", "read events", "read " + chat.ResyncEpoch, "read " + chat.ResyncExpired,
		"read " + chat.ResyncAhead, "page items", "member hit"} {
		require.Positive(t, seen[k], "no %q in 2000 steps", k)
	}
}
