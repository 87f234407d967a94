package realtime

import (
	"context"
	"fmt"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/redis/go-redis/v9"

	"imd/chat"
)

// Member cache keys, tagged with the conversation id:
//
//	<prefix>group:members:{<cid>}      set of member user ids; absent = not
//	                                   cached (expires after membersTTL)
//	<prefix>group:members:ver:{<cid>}  string: version counter, INCR'd by every
//	                                   invalidation; absent reads as "0"
//
// A reader that misses gets the version, loads the members from PostgreSQL
// and fills only if the version is unchanged, so a slow reader cannot put
// back a member set older than a change that invalidated it meanwhile.
func (r *Redis) memberKeys(cid string) []string {
	t := tag(cid)
	return []string{r.cfg.Prefix + "group:members:" + t, r.cfg.Prefix + "group:members:ver:" + t}
}

// cachedMembersScript returns {1, ver, members} on a hit, {0, ver} on a miss.
var cachedMembersScript = redis.NewScript(`
local ver = redis.call('GET', KEYS[2]) or '0'
if redis.call('EXISTS', KEYS[1]) == 1 then
  return {1, ver, redis.call('SMEMBERS', KEYS[1])}
end
return {0, ver}
`)

// fillMembersScript: ARGV ver, ttl (s), members... Writes only if the version
// is still ver; SADD in chunks to stay below Lua's unpack limit.
var fillMembersScript = redis.NewScript(`
if (redis.call('GET', KEYS[2]) or '0') ~= ARGV[1] then
  return 0
end
redis.call('DEL', KEYS[1])
for i = 3, #ARGV, 1000 do
  redis.call('SADD', KEYS[1], unpack(ARGV, i, math.min(i + 999, #ARGV)))
end
redis.call('EXPIRE', KEYS[1], ARGV[2])
return 1
`)

func seconds(d time.Duration) int64 { return int64((d + time.Second - 1) / time.Second) }

// CachedMembers implements chat.MemberCache: one script per conversation,
// in one pipeline; the version is returned on hits too.
func (r *Redis) CachedMembers(ctx context.Context, cids []string) ([]chat.MemberSet, error) {
	calls := make([]scriptCall, len(cids))
	for i, cid := range cids {
		calls[i] = scriptCall{keys: r.memberKeys(cid)}
	}
	cmds, err := r.runScripts(ctx, cachedMembersScript, calls)
	if err != nil {
		return nil, fmt.Errorf("realtime: cached members: %w", err)
	}
	sets := make([]chat.MemberSet, len(cids))
	for i, c := range cmds {
		res, err := c.Slice()
		if err != nil {
			return nil, fmt.Errorf("realtime: cached members: %w", err)
		}
		if len(res) < 2 {
			return nil, fmt.Errorf("realtime: cached members: unexpected reply %v", res)
		}
		hit, _ := res[0].(int64)
		ver, _ := res[1].(string)
		sets[i].Ver = ver
		if hit != 1 || len(res) < 3 {
			continue
		}
		raw, _ := res[2].([]any)
		members := make([]string, 0, len(raw))
		for _, m := range raw {
			s, _ := m.(string)
			members = append(members, s)
		}
		sets[i].Members, sets[i].OK = members, true
	}
	return sets, nil
}

// FillMembers implements chat.MemberCache. An empty member list is not
// stored (there is no empty set in Redis): the next lookup misses again.
func (r *Redis) FillMembers(ctx context.Context, cid, ver string, members []string) error {
	if len(members) == 0 {
		return nil
	}
	args := make([]any, 0, 2+len(members))
	args = append(args, ver, seconds(membersTTL))
	for _, m := range members {
		args = append(args, m)
	}
	if err := r.runScript(ctx, fillMembersScript, r.memberKeys(cid), args...).Err(); err != nil {
		return fmt.Errorf("realtime: fill members: %w", err)
	}
	return nil
}

// InvalidateMembers implements chat.MemberCache: bump the version (so that
// pending fills are dropped) and delete the set, atomically.
func (r *Redis) InvalidateMembers(ctx context.Context, cid string) error {
	keys := r.memberKeys(cid)
	pipe := r.rdb.TxPipeline()
	pipe.Incr(ctx, keys[1])
	pipe.Expire(ctx, keys[1], memberVersionTTL)
	pipe.Del(ctx, keys[0])
	if _, err := pipe.Exec(ctx); err != nil {
		return fmt.Errorf("realtime: invalidate members: %w", err)
	}
	return nil
}

// sessionKey is <prefix>session:{<uid>}: a sorted set conversation id →
// last activity (unix ms), the user's conversation list newest first.
// Absent = not cached. It always holds the sentinel member "" with score -1,
// so that a user with no conversations is "cached, empty" rather than a
// miss; pages only read scores >= 0 and never see it. Filled whole from
// PostgreSQL, moved forward by TouchSessions, expires after sessionsTTL.
//
// The event log's appendScript moves entries in it too (LogEntry.Activity):
// its key carries the same user tag as the log's.
func (r *Redis) sessionKey(uid string) string { return r.cfg.Prefix + "session:" + tag(uid) }

const sessionSentinel = ""

// activityScore is the score of an activity time; times before 1970 (which
// imd never produces) are clamped so that they stay above the sentinel.
func activityScore(at time.Time) int64 { return max(at.UnixMilli(), 0) }

// touchScript: ARGV unix ms, conversation id. GT: a late touch with an older
// time never moves a conversation back.
var touchScript = redis.NewScript(`
if redis.call('EXISTS', KEYS[1]) == 1 then
  redis.call('ZADD', KEYS[1], 'GT', ARGV[1], ARGV[2])
end
return 0
`)

// SessionPage implements chat.SessionCache: newest first, ties by
// conversation id descending (byte order), strictly after the cursor.
func (r *Redis) SessionPage(ctx context.Context, uid string, after *chat.Activity, limit int) ([]chat.Activity, bool, error) {
	key := r.sessionKey(uid)
	pipe := r.rdb.TxPipeline()
	exists := pipe.Exists(ctx, key)
	var ties *redis.StringSliceCmd
	var page *redis.ZSliceCmd
	if limit > 0 {
		maxScore := "+inf"
		if after != nil {
			s := strconv.FormatInt(activityScore(after.At), 10)
			ties = pipe.ZRangeByScore(ctx, key, &redis.ZRangeBy{Min: s, Max: s})
			maxScore = "(" + s
		}
		page = pipe.ZRevRangeByScoreWithScores(ctx, key, &redis.ZRangeBy{Min: "0", Max: maxScore, Count: int64(limit)})
	}
	if _, err := pipe.Exec(ctx); err != nil {
		return nil, false, fmt.Errorf("realtime: session page: %w", err)
	}
	if exists.Val() == 0 {
		return nil, false, nil
	}
	items := []chat.Activity{}
	if limit <= 0 {
		return items, true, nil
	}
	if ties != nil {
		// Same time as the cursor: only ids below the cursor's, descending.
		var same []string
		for _, id := range ties.Val() {
			if id != sessionSentinel && id < after.ConversationID {
				same = append(same, id)
			}
		}
		slices.SortFunc(same, func(a, b string) int { return strings.Compare(b, a) })
		at := time.UnixMilli(activityScore(after.At)).UTC()
		for _, id := range same {
			items = append(items, chat.Activity{ConversationID: id, At: at})
		}
	}
	for _, z := range page.Val() {
		id, _ := z.Member.(string)
		if id == sessionSentinel {
			continue
		}
		items = append(items, chat.Activity{ConversationID: id, At: time.UnixMilli(int64(z.Score)).UTC()})
	}
	if len(items) > limit {
		items = items[:limit]
	}
	return items, true, nil
}

// FillSessions implements chat.SessionCache: DEL + ZADD + EXPIRE in one
// MULTI, so readers see the old list or the new one, never a mix.
func (r *Redis) FillSessions(ctx context.Context, uid string, items []chat.Activity) error {
	key := r.sessionKey(uid)
	zs := make([]redis.Z, 0, 1+len(items))
	zs = append(zs, redis.Z{Score: -1, Member: sessionSentinel})
	for _, it := range items {
		if it.ConversationID == sessionSentinel {
			continue
		}
		zs = append(zs, redis.Z{Score: float64(activityScore(it.At)), Member: it.ConversationID})
	}
	pipe := r.rdb.TxPipeline()
	pipe.Del(ctx, key)
	pipe.ZAdd(ctx, key, zs...)
	pipe.Expire(ctx, key, sessionsTTL)
	if _, err := pipe.Exec(ctx); err != nil {
		return fmt.Errorf("realtime: fill sessions: %w", err)
	}
	return nil
}

// TouchSessions implements chat.SessionCache: one script per user, pipelined;
// lists that are not cached stay uncached (the next page fills them from
// PostgreSQL, which already has the new activity).
func (r *Redis) TouchSessions(ctx context.Context, uids []string, cid string, at time.Time) error {
	if len(uids) == 0 || cid == sessionSentinel {
		return nil
	}
	score := activityScore(at)
	calls := make([]scriptCall, len(uids))
	for i, uid := range uids {
		calls[i] = scriptCall{keys: []string{r.sessionKey(uid)}, args: []any{score, cid}}
	}
	if _, err := r.runScripts(ctx, touchScript, calls); err != nil {
		return fmt.Errorf("realtime: touch sessions: %w", err)
	}
	return nil
}

// RemoveSession implements chat.SessionCache.
func (r *Redis) RemoveSession(ctx context.Context, uid, cid string) error {
	if cid == sessionSentinel {
		return nil
	}
	if err := r.rdb.ZRem(ctx, r.sessionKey(uid), cid).Err(); err != nil {
		return fmt.Errorf("realtime: remove session: %w", err)
	}
	return nil
}
