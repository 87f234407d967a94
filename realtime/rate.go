package realtime

import (
	"context"
	"errors"
	"fmt"
	"strconv"
	"time"

	"github.com/redis/go-redis/v9"

	"imd/chat"
)

// rateScript is GCRA (the algorithm of go-redis/redis_rate) on the key
// <prefix>rate:<key>, a string holding the bucket's theoretical arrival time
// in ms since 2017-01-01 (small enough for exact doubles), expiring when the
// bucket is full again. ARGV: burst, emission interval (ms), n. n = 0 asks
// whether one token is there without taking it.
//
// Not redis_rate itself, for two reasons: its AllowN(n=0) always reports
// "allowed" (a cost of 0 always fits, even in an exhausted bucket), so it
// cannot "only check"; and it prepends its own "rate:" to the key, which
// would put our keys outside Prefix.
var rateScript = redis.NewScript(`
local burst = tonumber(ARGV[1])
local interval = tonumber(ARGV[2])
local n = tonumber(ARGV[3])
local t = redis.call('TIME')
local now = (tonumber(t[1]) - 1483228800) * 1000 + tonumber(t[2]) / 1000
local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
if tat < now then
  tat = now
end
local cost = n
if cost == 0 then
  cost = 1
end
local new_tat = tat + interval * cost
local allow_at = new_tat - interval * burst
if now < allow_at then
  return {0, tostring(allow_at - now)}
end
if n > 0 then
  redis.call('SET', KEYS[1], new_tat, 'PX', math.ceil(new_tat - now))
end
return {1, '0'}
`)

// Allow implements chat.RateLimiter (GCRA: Burst at once, then Rate per
// Period). A Limit with Rate or Period <= 0 allows everything; Burst < 1
// counts as 1. n above Burst is never allowed.
func (r *Redis) Allow(ctx context.Context, key string, l chat.Limit, n int) (bool, time.Duration, error) {
	if n < 0 {
		return false, 0, errors.New("realtime: allow: negative n")
	}
	if l.Rate <= 0 || l.Period <= 0 {
		return true, 0, nil
	}
	interval := float64(l.Period) / float64(time.Millisecond) / float64(l.Rate)
	res, err := r.runScript(ctx, rateScript, []string{r.cfg.Prefix + "rate:" + key},
		max(l.Burst, 1), strconv.FormatFloat(interval, 'g', -1, 64), n).Slice()
	if err != nil {
		return false, 0, fmt.Errorf("realtime: allow: %w", err)
	}
	allowed, _ := res[0].(int64)
	if allowed == 1 {
		return true, 0, nil
	}
	s, _ := res[1].(string)
	ms, err := strconv.ParseFloat(s, 64)
	if err != nil {
		return false, 0, fmt.Errorf("realtime: allow: reply %q: %w", s, err)
	}
	return false, max(time.Duration(ms*float64(time.Millisecond)), time.Millisecond), nil
}
