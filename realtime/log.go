package realtime

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"strconv"
	"strings"
	"time"

	"github.com/redis/go-redis/v9"

	"imd/chat"
)

// A user's event log is five keys, all tagged with the user id (one cluster
// slot), always written by the scripts below and expired together:
//
//	<prefix>offline:{<uid>}        list: the entries, "<offset> <type> <data>",
//	                               oldest first, capped at LogCap (LTRIM)
//	<prefix>offline:seq:{<uid>}    string: the offset counter = offset of the
//	                               newest entry (INCR); the head of the log
//	<prefix>offline:epoch:{<uid>}  string: the log's epoch; a new one whenever
//	                               the log was lost, so old positions resync
//	<prefix>offline:conv:{<uid>}   hash: conversation id → last message seq
//	                               appended (or baselined): order and seq dedupe
//	<prefix>offline:keys:{<uid>}   sorted set: dedupe key → offset, for entries
//	                               without seq; pruned with the trimmed entries
//
// The list holds consecutive offsets, so the first retained offset is
// head - LLEN + 1; each entry also carries its own offset for readability.
func (r *Redis) logKeys(uid string) []string {
	t := tag(uid)
	p := r.cfg.Prefix
	return []string{
		p + "offline:" + t,
		p + "offline:seq:" + t,
		p + "offline:epoch:" + t,
		p + "offline:conv:" + t,
		p + "offline:keys:" + t,
	}
}

// userChannel is the Pub/Sub channel <prefix>user:{<uid>} that wakes the
// nodes holding uid's streams (empty payload) and carries its ephemeral
// events (a JSON chat.StreamEvent).
func (r *Redis) userChannel(uid string) string { return r.cfg.Prefix + "user:" + tag(uid) }

// epochLua is shared by the append and head scripts. ensure_epoch makes sure
// the log has an epoch, creating one (and clearing any remains of a lost log)
// when missing; it reports whether it did. A log whose counter vanished while
// entries remain (partial eviction) counts as lost too: reusing offsets
// within an epoch would give two events the same id. The common case, epoch
// and counter both there, costs one EXISTS.
const epochLua = `
local function ensure_epoch(candidate)
  if redis.call('EXISTS', KEYS[3], KEYS[2]) == 2 then
    return false
  end
  if redis.call('EXISTS', KEYS[3]) == 1 and redis.call('EXISTS', KEYS[1]) == 0 then
    return false -- an empty log whose epoch Head created
  end
  redis.call('DEL', KEYS[1], KEYS[2], KEYS[4], KEYS[5])
  redis.call('SET', KEYS[3], candidate)
  return true
end
local function expire_all(ttl)
  for i = 1, 5 do
    redis.call('PEXPIRE', KEYS[i], ttl)
  end
end
`

// appendScript appends one user's entries in order. KEYS: logKeys. ARGV:
// epoch candidate, cap, ttl (ms), channel, then 7 per entry: key, type,
// conversation id, seq, baseline, forget (1/0), data. Returns a flat list of
// (entry number from 1, last seq) for the entries not appended because of a
// gap.
//
// The TTLs of the five keys are all set again only when this script created
// one of them, or when they have run down by more than 1% of the TTL (100
// minutes of 7 days): five EXPIREs per append would be a third of the
// script's cost, and a log's life is only approximate anyway.
var appendScript = redis.NewScript(epochLua + `
local refresh = ensure_epoch(ARGV[1])
local cap = tonumber(ARGV[2])
local gaps = {}
local appended = 0
local n = 0
for i = 5, #ARGV, 7 do
  n = n + 1
  local key, typ, cid, seqs, data = ARGV[i], ARGV[i+1], ARGV[i+2], ARGV[i+3], ARGV[i+6]
  local seq, baseline, forget = tonumber(seqs), tonumber(ARGV[i+4]), ARGV[i+5] == '1'
  local ok = true
  if seq > 0 then
    local last = redis.call('HGET', KEYS[4], cid)
    if not last and baseline > 0 then
      last = baseline -- a gap fill says where this conversation starts here
    end
    if not last and seq > 1 then
      -- Where this log starts the conversation is unknown: accepting seq as
      -- the first could make an earlier seq, dispatched later, look like a
      -- duplicate and vanish. The dispatcher fills from the store instead.
      ok = false
      gaps[#gaps+1] = n
      gaps[#gaps+1] = -1
    elseif last then
      last = tonumber(last)
      if seq <= last then
        ok = false
      elseif seq > last + 1 then
        ok = false
        gaps[#gaps+1] = n
        gaps[#gaps+1] = last
      end
    end
  elseif key ~= '' and redis.call('ZSCORE', KEYS[5], key) then
    ok = false
  end
  if ok then
    local off = redis.call('INCR', KEYS[2])
    local len = redis.call('RPUSH', KEYS[1], off .. ' ' .. typ .. ' ' .. data)
    if off == 1 or len == 1 then
      refresh = true
    end
    if len > cap then
      redis.call('LTRIM', KEYS[1], -cap, -1)
      redis.call('ZREMRANGEBYSCORE', KEYS[5], '-inf', off - cap)
    end
    if seq > 0 then
      if redis.call('HSET', KEYS[4], cid, seqs) == 1 then
        refresh = true -- a conversation new to this log: maybe a new hash
      end
    elseif key ~= '' then
      if redis.call('ZADD', KEYS[5], off, key) == 1 and redis.call('ZCARD', KEYS[5]) == 1 then
        refresh = true
      end
    end
    if baseline > 0 and tonumber(redis.call('HGET', KEYS[4], cid) or '0') < baseline then
      if redis.call('HSET', KEYS[4], cid, ARGV[i+4]) == 1 then
        refresh = true
      end
    end
    if forget then
      redis.call('HDEL', KEYS[4], cid)
    end
    appended = appended + 1
  end
end
local ttl = tonumber(ARGV[3])
if refresh or (appended > 0 and redis.call('PTTL', KEYS[2]) < ttl - ttl / 100) then
  expire_all(ttl)
end
if appended > 0 then
  redis.call('PUBLISH', ARGV[4], '')
end
return gaps
`)

// headScript returns {epoch, head offset}, creating the epoch if missing,
// and extends the log's life: a log someone streams from is in use. KEYS:
// logKeys. ARGV: epoch candidate, ttl (ms).
var headScript = redis.NewScript(epochLua + `
ensure_epoch(ARGV[1])
expire_all(tonumber(ARGV[2]))
return {redis.call('GET', KEYS[3]), tonumber(redis.call('GET', KEYS[2]) or '0')}
`)

// readScript reads after a position. KEYS: log, seq, epoch. ARGV: epoch,
// offset, limit. Returns {'epoch'|'ahead'|'expired'} or {'ok', entries}.
var readScript = redis.NewScript(`
local ep = redis.call('GET', KEYS[3])
if not ep or ep ~= ARGV[1] then
  return {'epoch'}
end
local head = tonumber(redis.call('GET', KEYS[2]) or '0')
local pos = tonumber(ARGV[2])
if pos > head then
  return {'ahead'}
end
local first = head - redis.call('LLEN', KEYS[1]) + 1
if pos < first - 1 then
  return {'expired'}
end
local limit = tonumber(ARGV[3])
if limit <= 0 then
  return {'ok', {}}
end
local start = pos - first + 1
return {'ok', redis.call('LRANGE', KEYS[1], start, start + limit - 1)}
`)

// newEpoch returns a fresh epoch: base36 unix milliseconds and a random
// suffix, never a '-' (the separator of event ids). Epochs only have to
// differ from the epoch of the log they replace.
func newEpoch() string {
	return strconv.FormatInt(time.Now().UnixMilli(), 36) + strconv.FormatUint(rand.Uint64()>>24, 36)
}

func boolArg(b bool) string {
	if b {
		return "1"
	}
	return "0"
}

// Append implements chat.EventLog: one script per user, all in one pipeline.
// An entry that is a duplicate (by seq, or by Key) or would leave a gap is
// skipped entirely, Baseline and Forget included: they apply only with the
// entry they come with, so a re-dispatched old event cannot undo a newer
// state. An entry without Seq and without Key is never deduped.
func (r *Redis) Append(ctx context.Context, ds []chat.Delivery) ([]chat.Gap, error) {
	type userBatch struct {
		uid     string
		entries []*chat.LogEntry
	}
	var batches []*userBatch
	byUser := make(map[string]*userBatch)
	for _, d := range ds {
		e := d.Entry
		if e == nil {
			return nil, fmt.Errorf("realtime: append: delivery to %q without an entry", d.UserID)
		}
		if e.Type == "" || strings.ContainsAny(string(e.Type), " \n") {
			return nil, fmt.Errorf("realtime: append: bad event type %q", e.Type)
		}
		b := byUser[d.UserID]
		if b == nil {
			b = &userBatch{uid: d.UserID}
			byUser[d.UserID] = b
			batches = append(batches, b)
		}
		b.entries = append(b.entries, e)
	}
	if len(batches) == 0 {
		return nil, nil
	}

	ttl := strconv.FormatInt(ttlMillis(r.cfg.LogTTL), 10)
	capArg := strconv.Itoa(r.cfg.LogCap)
	calls := make([]scriptCall, len(batches))
	for i, b := range batches {
		args := make([]any, 0, 4+7*len(b.entries))
		// A fresh epoch per user (used only if the log is new): ids of
		// different users' logs must never collide, or a Last-Event-ID of
		// one account would be served from another's log.
		args = append(args, newEpoch(), capArg, ttl, r.userChannel(b.uid))
		for _, e := range b.entries {
			args = append(args, e.Key, string(e.Type), e.ConversationID,
				strconv.FormatInt(max(e.Seq, 0), 10), strconv.FormatInt(max(e.Baseline, 0), 10),
				boolArg(e.Forget), e.Data)
		}
		calls[i] = scriptCall{keys: r.logKeys(b.uid), args: args}
	}
	cmds, err := r.runScripts(ctx, appendScript, calls)
	if err != nil {
		return nil, fmt.Errorf("realtime: append: %w", err)
	}

	var gaps []chat.Gap
	for i, c := range cmds {
		vals, err := c.Int64Slice()
		if err != nil {
			return nil, fmt.Errorf("realtime: append: reply: %w", err)
		}
		b := batches[i]
		for j := 0; j+1 < len(vals); j += 2 {
			e := b.entries[vals[j]-1]
			gaps = append(gaps, chat.Gap{UserID: b.uid, ConversationID: e.ConversationID, LastSeq: vals[j+1], Seq: e.Seq})
		}
	}
	return gaps, nil
}

// Read implements chat.EventLog.
func (r *Redis) Read(ctx context.Context, uid string, pos chat.Position, limit int) ([]chat.StreamEvent, chat.Position, error) {
	keys := r.logKeys(uid)
	res, err := r.runScript(ctx, readScript, keys[:3], pos.Epoch, pos.Offset, limit).Slice()
	if err != nil {
		return nil, pos, fmt.Errorf("realtime: read: %w", err)
	}
	status, _ := res[0].(string)
	switch status {
	case "epoch":
		return nil, pos, &chat.ResyncError{Reason: chat.ResyncEpoch}
	case "ahead":
		return nil, pos, &chat.ResyncError{Reason: chat.ResyncAhead}
	case "expired":
		return nil, pos, &chat.ResyncError{Reason: chat.ResyncExpired}
	case "ok":
	default:
		return nil, pos, fmt.Errorf("realtime: read: unexpected reply %v", res)
	}
	raw, _ := res[1].([]any)
	evs := make([]chat.StreamEvent, 0, len(raw))
	last := pos
	for _, item := range raw {
		s, _ := item.(string)
		off, typ, data, err := parseEntry(s)
		if err != nil {
			return nil, pos, fmt.Errorf("realtime: read %s: %w", uid, err)
		}
		last = chat.Position{Epoch: pos.Epoch, Offset: off}
		evs = append(evs, chat.StreamEvent{ID: last.String(), Type: chat.EventType(typ), Data: []byte(data)})
	}
	return evs, last, nil
}

var errBadEntry = errors.New("malformed log entry")

// parseEntry splits "<offset> <type> <data>"; types contain no space, data
// may contain anything.
func parseEntry(s string) (off int64, typ, data string, err error) {
	o, rest, ok1 := strings.Cut(s, " ")
	typ, data, ok2 := strings.Cut(rest, " ")
	if !ok1 || !ok2 {
		return 0, "", "", errBadEntry
	}
	off, err = strconv.ParseInt(o, 10, 64)
	if err != nil {
		return 0, "", "", errBadEntry
	}
	return off, typ, data, nil
}

// Head implements chat.EventLog.
func (r *Redis) Head(ctx context.Context, uid string) (chat.Position, error) {
	res, err := r.runScript(ctx, headScript, r.logKeys(uid), newEpoch(), ttlMillis(r.cfg.LogTTL)).Slice()
	if err != nil {
		return chat.Position{}, fmt.Errorf("realtime: head: %w", err)
	}
	ep, _ := res[0].(string)
	off, _ := res[1].(int64)
	if ep == "" {
		return chat.Position{}, fmt.Errorf("realtime: head: unexpected reply %v", res)
	}
	return chat.Position{Epoch: ep, Offset: off}, nil
}
