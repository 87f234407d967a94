package realtime

import (
	"context"
	"fmt"
	"strconv"
	"time"

	"github.com/redis/go-redis/v9"

	"imd/chat"
)

// Presence keys, tagged with the user id:
//
//	<prefix>user:online:{<uid>}    sorted set: connection id → expiry (unix ms).
//	                               Online = any entry whose expiry is in the
//	                               future; entries of a crashed node's streams
//	                               simply stop counting. The key itself expires
//	                               one ttl after its latest entry, so users who
//	                               left leave nothing behind.
//	<prefix>user:lastseen:{<uid>}  string: unix ms of the last disconnect that
//	                               left the user offline. No TTL: one small key
//	                               per user, and "last seen" must not turn into
//	                               "never seen" with time.
//
// All times come from the Redis clock (TIME), so nodes with skewed clocks
// agree on what has expired.
func (r *Redis) presenceKeys(uid string) []string {
	t := tag(uid)
	return []string{r.cfg.Prefix + "user:online:" + t, r.cfg.Prefix + "user:lastseen:" + t}
}

const nowLua = `
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local function keep_until_last(ttl)
  local top = redis.call('ZRANGE', KEYS[1], -1, -1, 'WITHSCORES')
  if top[2] then
    redis.call('PEXPIREAT', KEYS[1], tonumber(top[2]) + ttl)
  end
end
`

// connectScript: ARGV connId, ttl ms. Returns 1 when no live entry existed.
var connectScript = redis.NewScript(nowLua + `
local ttl = tonumber(ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local first = redis.call('ZCARD', KEYS[1]) == 0
redis.call('ZADD', KEYS[1], now + ttl, ARGV[1])
keep_until_last(ttl)
if first then return 1 end
return 0
`)

// refreshScript: ARGV connId, ttl ms. A plain ZADD, not XX: after an outage
// longer than the TTL the entry has expired and the refresh must bring it
// back. Refresh and Disconnect come from the same stream goroutine, so a
// refresh cannot resurrect a disconnected stream.
var refreshScript = redis.NewScript(nowLua + `
local ttl = tonumber(ARGV[2])
redis.call('ZADD', KEYS[1], now + ttl, ARGV[1])
keep_until_last(ttl)
return 0
`)

// disconnectScript: ARGV connId. Returns 1 when no live entry remains, after
// recording the last-seen time.
var disconnectScript = redis.NewScript(nowLua + `
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZCARD', KEYS[1]) == 0 then
  redis.call('SET', KEYS[2], now)
  return 1
end
return 0
`)

// lookupScript returns {1, ""} when online, else {0, last seen ms or ""}.
var lookupScript = redis.NewScript(nowLua + `
if redis.call('ZCOUNT', KEYS[1], '(' .. now, '+inf') > 0 then
  return {1, ''}
end
return {0, redis.call('GET', KEYS[2]) or ''}
`)

func ttlMillis(ttl time.Duration) int64 { return max(ttl.Milliseconds(), 1) }

// Connect implements chat.Presence.
func (r *Redis) Connect(ctx context.Context, uid, connID string, ttl time.Duration) (bool, error) {
	n, err := r.runScript(ctx, connectScript, r.presenceKeys(uid)[:1], connID, ttlMillis(ttl)).Int64()
	if err != nil {
		return false, fmt.Errorf("realtime: presence connect: %w", err)
	}
	return n == 1, nil
}

// Refresh implements chat.Presence. It revives an entry that expired (an
// outage longer than the TTL): the stream is alive, so the user is online.
func (r *Redis) Refresh(ctx context.Context, uid, connID string, ttl time.Duration) error {
	if err := r.runScript(ctx, refreshScript, r.presenceKeys(uid)[:1], connID, ttlMillis(ttl)).Err(); err != nil {
		return fmt.Errorf("realtime: presence refresh: %w", err)
	}
	return nil
}

// Disconnect implements chat.Presence.
func (r *Redis) Disconnect(ctx context.Context, uid, connID string) (bool, error) {
	n, err := r.runScript(ctx, disconnectScript, r.presenceKeys(uid), connID).Int64()
	if err != nil {
		return false, fmt.Errorf("realtime: presence disconnect: %w", err)
	}
	return n == 1, nil
}

// Lookup implements chat.Presence, in the order of uids. A user whose
// streams expired without a Disconnect (a crashed node) is offline with the
// last-seen time of their previous disconnect, if any.
func (r *Redis) Lookup(ctx context.Context, uids []string) ([]chat.PresenceInfo, error) {
	if len(uids) == 0 {
		return nil, nil
	}
	calls := make([]scriptCall, len(uids))
	for i, uid := range uids {
		calls[i] = scriptCall{keys: r.presenceKeys(uid)}
	}
	cmds, err := r.runScripts(ctx, lookupScript, calls)
	if err != nil {
		return nil, fmt.Errorf("realtime: presence lookup: %w", err)
	}
	out := make([]chat.PresenceInfo, len(uids))
	for i, c := range cmds {
		res, err := c.Slice()
		if err != nil {
			return nil, fmt.Errorf("realtime: presence lookup: %w", err)
		}
		if len(res) != 2 {
			return nil, fmt.Errorf("realtime: presence lookup: unexpected reply %v", res)
		}
		out[i].UserID = uids[i]
		online, _ := res[0].(int64)
		out[i].Online = online == 1
		if s, _ := res[1].(string); s != "" {
			if ms, err := strconv.ParseInt(s, 10, 64); err == nil {
				at := time.UnixMilli(ms).UTC()
				out[i].LastSeenAt = &at
			}
		}
	}
	return out, nil
}
