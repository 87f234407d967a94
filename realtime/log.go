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
// nodes holding uid's streams: with the entries just appended ("L …", see
// appendScript), or empty (read the log); it also carries the user's
// ephemeral events (a JSON chat.StreamEvent).
func (r *Redis) userChannel(uid string) string { return r.cfg.Prefix + "user:" + tag(uid) }

// epochLua is shared by the append and head scripts. ensure_epoch makes sure
// the log has an epoch, creating one (and clearing any remains of a lost log)
// when missing; it returns whether it did, the epoch and the offset counter.
// A log whose counter vanished while entries remain (partial eviction)
// counts as lost too: reusing offsets within an epoch would give two events
// the same id. The common case, epoch and counter both there, costs one MGET.
const epochLua = `
local function ensure_epoch(candidate)
  local v = redis.call('MGET', KEYS[3], KEYS[2])
  if v[1] and v[2] then
    return false, v[1], tonumber(v[2])
  end
  if v[1] and redis.call('EXISTS', KEYS[1]) == 0 then
    return false, v[1], 0 -- an empty log whose epoch Head created
  end
  redis.call('DEL', KEYS[1], KEYS[2], KEYS[4], KEYS[5])
  redis.call('SET', KEYS[3], candidate)
  return true, candidate, 0
end
local function expire_all(ttl)
  for i = 1, 5 do
    redis.call('PEXPIRE', KEYS[i], ttl)
  end
end
`

// appendScript appends one user's entries in order. KEYS: logKeys. ARGV:
// epoch candidate, cap, ttl (ms), channel, then 8 per entry: key, type,
// conversation id, seq, baseline, forget (1/0), activity (unix ms, 0 for
// none), data; KEYS[6] is the user's conversation list (sessionKey). Returns a flat list of
// (entry number from 1, last seq) for the entries not appended because of a
// gap.
//
// Redis spends most of a script's time in redis.call itself (about a
// microsecond each, far more than the command), so the script reads the
// counter and the conversations' last seqs once, decides every entry on
// local copies, and writes once at the end: one RPUSH, one SET, one HSET
// (and HDEL) however many entries the batch holds. Only entries without a
// seq (membership and conversation events, rare) still cost a ZSCORE and a
// ZADD each. A dispatcher round of many messages to one user is then a
// handful of calls instead of four or five per message (docs/performance.md).
//
// The TTLs of the five keys are all set again only when this script created
// one of them, or when they have run down by more than 1% of the TTL (100
// minutes of 7 days): five EXPIREs per append would be a third of the
// script's cost, and a log's life is only approximate anyway.
var appendScript = redis.NewScript(epochLua + `
local refresh, epoch, off = ensure_epoch(ARGV[1])
local cap = tonumber(ARGV[2])
-- The conversations' last seqs, each read once (seq_of) into last: a
-- number, or false for a conversation this log has no seq of.
local last = {}
local function seq_of(cid)
  local l = last[cid]
  if l == nil then
    l = tonumber(redis.call('HGET', KEYS[4], cid)) or false
    last[cid] = l
  end
  return l
end
local changed = {} -- conversations whose last seq this script changed
local first = off + 1
local vals = {}
local gaps = {}
local n = 0
local touch = {} -- conversation → latest activity among the entries
for i = 5, #ARGV, 8 do
  n = n + 1
  local key, typ, cid, data = ARGV[i], ARGV[i+1], ARGV[i+2], ARGV[i+7]
  local seq, baseline, forget = tonumber(ARGV[i+3]), tonumber(ARGV[i+4]), ARGV[i+5] == '1'
  local activity = tonumber(ARGV[i+6])
  if activity > 0 and activity > (touch[cid] or 0) then
    touch[cid] = activity -- duplicates and gaps too: the message exists
  end
  local ok = true
  if seq > 0 then
    local l = seq_of(cid)
    if not l and baseline > 0 then
      l = baseline -- a gap fill says where this conversation starts here
    end
    if not l and seq > 1 then
      -- Where this log starts the conversation is unknown: accepting seq as
      -- the first could make an earlier seq, dispatched later, look like a
      -- duplicate and vanish. The dispatcher fills from the store instead.
      ok = false
      gaps[#gaps+1] = n
      gaps[#gaps+1] = -1
    elseif l then
      if seq <= l then
        ok = false
      elseif seq > l + 1 then
        ok = false
        gaps[#gaps+1] = n
        gaps[#gaps+1] = l
      end
    end
  elseif key ~= '' then
    -- A key whose entry this batch has already pushed out of the log counts
    -- as gone, as if the log had been trimmed entry by entry.
    local at = redis.call('ZSCORE', KEYS[5], key)
    if at and tonumber(at) > off - cap then
      ok = false
    end
  end
  if ok then
    off = off + 1
    vals[#vals+1] = off .. ' ' .. typ .. ' ' .. data
    if seq > 0 then
      last[cid] = seq
      changed[cid] = true
    elseif key ~= '' then
      if redis.call('ZADD', KEYS[5], off, key) == 1 and redis.call('ZCARD', KEYS[5]) == 1 then
        refresh = true
      end
    end
    if baseline > 0 and (seq_of(cid) or 0) < baseline then
      last[cid] = baseline
      changed[cid] = true
    end
    if forget then
      seq_of(cid) -- so that a later entry of cid sees it forgotten
      last[cid] = false
      changed[cid] = true
    end
  end
end
if #vals > 0 then
  local len = 0
  for j = 1, #vals, 1000 do -- unpack is bounded by Lua's C stack
    len = redis.call('RPUSH', KEYS[1], unpack(vals, j, math.min(j + 999, #vals)))
  end
  if first == 1 or len == #vals then
    refresh = true
  end
  if len > cap then
    redis.call('LTRIM', KEYS[1], -cap, -1)
    redis.call('ZREMRANGEBYSCORE', KEYS[5], '-inf', off - cap)
  end
  redis.call('SET', KEYS[2], off, 'KEEPTTL')
  for cid in pairs(changed) do
    if not last[cid] then
      redis.call('HDEL', KEYS[4], cid)
    elseif redis.call('HSET', KEYS[4], cid, last[cid]) > 0 then
      refresh = true -- a conversation new to this log: maybe a new hash
    end
  end
end
-- The conversation list moves only if cached (else it is filled whole from
-- the database on its next read); GT: never back.
if next(touch) and redis.call('EXISTS', KEYS[6]) == 1 then
  for cid, at in pairs(touch) do
    redis.call('ZADD', KEYS[6], 'GT', at, cid)
  end
end
local ttl = tonumber(ARGV[3])
if refresh or (#vals > 0 and redis.call('PTTL', KEYS[2]) < ttl - ttl / 100) then
  expire_all(ttl)
end
if #vals > 0 then
  -- The wake-up carries the new entries themselves (pushSize bounds it), so
  -- the streams of the user need not read them back: "L <epoch> " then each
  -- entry as "<length>:<entry>".
  local size = 0
  for j = 1, #vals do
    size = size + #vals[j]
  end
  if size > ` + pushSizeLua + ` then
    redis.call('PUBLISH', ARGV[4], '')
  else
    local parts = {'L ', epoch, ' '}
    for j = 1, #vals do
      parts[#parts+1] = #vals[j] .. ':' .. vals[j]
    end
    redis.call('PUBLISH', ARGV[4], table.concat(parts))
  end
end
return gaps
`)

// pushSize bounds the entries one wake-up carries (bytes): a few ordinary
// messages, the dispatcher rounds of a moderate load, where reading them
// back would double Redis' work per delivery. A bigger round is an empty
// wake-up and its streams read the log, which serves hundreds of entries
// per read: pushing those through the node's one Pub/Sub connection instead
// measured slower (and one round to 1000 users would approach Redis'
// 8 MB pubsub output-buffer limit, past which it drops the connection).
const pushSize = 4 << 10

var pushSizeLua = strconv.Itoa(pushSize)

// headScript returns {epoch, head offset}, creating the epoch if missing,
// and extends the log's life: a log someone streams from is in use. KEYS:
// logKeys. ARGV: epoch candidate, ttl (ms).
var headScript = redis.NewScript(epochLua + `
local _, epoch, off = ensure_epoch(ARGV[1])
expire_all(tonumber(ARGV[2]))
return {epoch, off}
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

// activityArg is an entry's activity as the script takes it: its session
// score, or 0 for none.
func activityArg(cid string, at time.Time) string {
	if at.IsZero() || cid == sessionSentinel {
		return "0"
	}
	return strconv.FormatInt(max(activityScore(at), 1), 10)
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
	// A message goes to every member with the same *LogEntry: its arguments
	// are formatted once, not once per recipient.
	entryArgs := make(map[*chat.LogEntry][]any)
	for i, b := range batches {
		args := make([]any, 0, 4+8*len(b.entries))
		// A fresh epoch per user (used only if the log is new): ids of
		// different users' logs must never collide, or a Last-Event-ID of
		// one account would be served from another's log.
		args = append(args, newEpoch(), capArg, ttl, r.userChannel(b.uid))
		for _, e := range b.entries {
			ea, ok := entryArgs[e]
			if !ok {
				ea = []any{e.Key, string(e.Type), e.ConversationID,
					strconv.FormatInt(max(e.Seq, 0), 10), strconv.FormatInt(max(e.Baseline, 0), 10),
					boolArg(e.Forget), activityArg(e.ConversationID, e.Activity), e.Data}
				entryArgs[e] = ea
			}
			args = append(args, ea...)
		}
		calls[i] = scriptCall{keys: append(r.logKeys(b.uid), r.sessionKey(b.uid)), args: args}
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
