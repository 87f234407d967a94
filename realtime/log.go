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
//	<prefix>offline:{<uid>}        list: the entries, "<type> <data>", oldest
//	                               first, capped at LogCap (LTRIM)
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
// head - LLEN + 1 and an entry's offset follows from its place. (Entries
// written before this layout carried "<offset> " in front; readers skip it.)
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
// appendScript), a summary of them when they are too many but all messages
// of one conversation ("S …"), or empty (read the log); it also carries
// the user's ephemeral events (a JSON chat.StreamEvent).
func (r *Redis) userChannel(uid string) string { return r.cfg.Prefix + "user:" + tag(uid) }

// epochLua is shared by the append and head scripts; k is a log's keys
// (logKeys). ensure_epoch makes sure the log has an epoch, creating one (and
// clearing any remains of a lost log) when missing; it returns whether it
// did, the epoch and the offset counter. A log whose counter vanished while
// entries remain (partial eviction) counts as lost too: reusing offsets
// within an epoch would give two events the same id. The common case, epoch
// and counter both there, costs one MGET.
const epochLua = `
local function ensure_epoch(k, candidate)
  local v = redis.call('MGET', k[3], k[2])
  if v[1] and v[2] then
    return false, v[1], tonumber(v[2])
  end
  if v[1] and redis.call('EXISTS', k[1]) == 0 then
    return false, v[1], 0 -- an empty log whose epoch Head created
  end
  redis.call('DEL', k[1], k[2], k[4], k[5])
  redis.call('SET', k[3], candidate)
  return true, candidate, 0
end
local function expire_all(k, ttl)
  for i = 1, 5 do
    redis.call('PEXPIRE', k[i], ttl)
  end
end
`

// appendScript appends entries to the logs of several users in one call.
// KEYS: 6 per user, logKeys then sessionKey. ARGV: cap, ttl (ms), the
// number of distinct entries E, then 8 per entry (key, conversation id,
// seq, baseline, forget 1/0, activity unix ms or 0, the entry as the list
// stores it "<type> <data>", and as a wake-up carries it "<length>:<type>
// <data>", empty in every entry of a call whose wake-ups cannot carry
// them: fitWakeUp), then per user: epoch candidate, channel, the count of its
// entries and their numbers (1-based, in order), or "*" for all entries in
// order. Returns a flat list of (user number, the entry's place in that
// user's list, last seq) for the entries not appended because of a gap.
//
// Why this shape (docs/performance.md): a message to a group goes to every
// member's log. One script call per user cost Redis its fixed overhead per
// recipient (parsing and converting a dozen arguments, the 300-byte message
// among them, each time), which made up most of a delivery's cost; here the
// entries travel once per call and each user costs only the handful of
// redis.call below. Strings are built in Go, not in Lua: Redis' Lua takes
// microseconds to create a string (it hashes every one, and formats
// numbers with sprintf), which had been most of an append's cost; the
// script only passes the given ones on. Within a user, the counter and the conversations' last
// seqs are read once, every entry is decided on local copies and the writes
// happen once at the end (one RPUSH, SET, HSET however many entries). Only
// entries without a seq (membership and conversation events, rare) still
// cost a ZSCORE and a ZADD each. A group's round (every member given the
// same consecutive messages of one conversation) skips even the per-entry
// decisions for a member whose log stands right before it, and so does a
// gap fill's round, for a log that does not know the conversation yet:
// walking every entry for every member in Lua had been most of Redis' work
// per recipient in such rounds (docs/performance.md, items 23 and 24).
//
// The keys of each user share its hash tag, but one call spans users: the
// adapter runs on a single Redis (redis.Client). A Redis Cluster adapter
// would group a round's users by slot.
//
// The TTLs of the five log keys are all set again only when this script
// created one of them, or when they have run down by more than 1% of the
// TTL (100 minutes of 7 days), which is looked at every 64 entries: five
// EXPIREs per append would be a third of the work, and a log's life is only
// approximate anyway (a log with fewer appends lives from its creation or
// its last stream's Head, which extends it).
var appendScript = redis.NewScript(appendLua)

var appendLua = epochLua + `
local cap, ttl = tonumber(ARGV[1]), tonumber(ARGV[2])
local ne = tonumber(ARGV[3])
-- carry: the entries came with their wake-up form (empty when the call
-- cannot carry them: see Append).
local carry = ne == 0 or ARGV[3 + 8] ~= ''
local ekey, ecid, eseq, eseqs, ebase, ebases, eforget, eact, eacts, estr, epush = {}, {}, {}, {}, {}, {}, {}, {}, {}, {}, {}
for i = 1, ne do
  local a = 3 + (i - 1) * 8
  ekey[i], ecid[i] = ARGV[a+1], ARGV[a+2]
  eseqs[i], ebases[i] = ARGV[a+3], ARGV[a+4]
  eseq[i], ebase[i], eforget[i] = tonumber(eseqs[i]), tonumber(ebases[i]), ARGV[a+5] == '1'
  eacts[i], estr[i], epush[i] = ARGV[a+6], ARGV[a+7], ARGV[a+8]
  eact[i] = tonumber(eacts[i])
end
local gaps = {}
-- all: every entry, in order (a user given '*' for its entries). run: the
-- entries are consecutive messages of one conversation with nothing else
-- to apply (no forget, no baseline but one right below the first, as a
-- gap fill starts), the usual round of a group; a user who gets all of
-- them and whose log stands right before the first (or, with that
-- baseline or from seq 1, does not know the conversation yet) takes them
-- whole (append_user), without the per-entry loop, which had been most of
-- Redis' work per recipient in a group's rounds.
local all, run = {}, ne > 0 and eseq[1] > 0
local rstart = run and (ebase[1] > 0 and ebase[1] or 0)
if run and rstart > 0 and rstart ~= eseq[1] - 1 then
  run = false
end
local rvals, rpushes, rsize, ract, racts = {}, {}, 0, 0, '0'
for i = 1, ne do
  all[i] = i
  if eseq[i] ~= eseq[1] + i - 1 or ecid[i] ~= ecid[1] or (i > 1 and ebase[i] > 0) or eforget[i] then
    run = false
  end
  rvals[i], rpushes[i], rsize = estr[i], epush[i], rsize + #epush[i]
  if eact[i] > ract then
    ract, racts = eact[i], eacts[i]
  end
end

local function append_user(u, k, candidate, channel, idx)
  local refresh, epoch, off = ensure_epoch(k, candidate)
  -- The conversations' last seqs, each read once (seq_of) into last: a
  -- number, or false for a conversation this log has no seq of; lasts
  -- holds the same as given (a string), to write back without formatting.
  local last, lasts = {}, {}
  local function seq_of(cid)
    local l = last[cid]
    if l == nil then
      l = tonumber(redis.call('HGET', k[4], cid)) or false
      last[cid] = l
    end
    return l
  end
  local changed = {} -- conversations whose last seq this call changed
  local first = off + 1
  local vals, pushes = {}, {}
  local size = 0 -- of pushes
  -- scid: the one conversation of all entries appended here, if they are
  -- all its messages (else false), for a summary wake-up (below).
  local scid, sseq = nil, 0
  local touch, toucha = {}, {} -- conversation → latest activity among the entries (number, as given)
  local rl = run and idx == all and seq_of(ecid[1])
  if run and idx == all and (rl == eseq[1] - 1 or (rl == false and rstart == eseq[1] - 1)) then
    -- What the loop below would do with these entries, at once.
    local cid = ecid[1]
    off = off + ne
    vals, pushes, size = rvals, rpushes, rsize
    scid, sseq = cid, eseqs[ne]
    last[cid], lasts[cid] = eseq[ne], eseqs[ne]
    changed[cid] = true
    if ract > 0 then
      touch[cid], toucha[cid] = ract, racts
    end
    idx = {}
  end
  for n, i in ipairs(idx) do
    local key, cid, seq, baseline = ekey[i], ecid[i], eseq[i], ebase[i]
    local activity = eact[i]
    if activity > 0 and activity > (touch[cid] or 0) then
      touch[cid], toucha[cid] = activity, eacts[i] -- duplicates and gaps too: the message exists
    end
    local ok = true
    if seq > 0 then
      local l = seq_of(cid)
      if not l and baseline > 0 then
        l = baseline -- a gap fill says where this conversation starts here
      end
      if not l and seq > 1 then
        -- Where this log starts the conversation is unknown: accepting seq
        -- as the first could make an earlier seq, dispatched later, look
        -- like a duplicate and vanish. The dispatcher fills from the store.
        ok = false
        gaps[#gaps+1] = u
        gaps[#gaps+1] = n
        gaps[#gaps+1] = -1
      elseif l then
        if seq <= l then
          ok = false
        elseif seq > l + 1 then
          ok = false
          gaps[#gaps+1] = u
          gaps[#gaps+1] = n
          gaps[#gaps+1] = l
        end
      end
    elseif key ~= '' then
      -- A key whose entry this call has already pushed out of the log
      -- counts as gone, as if the log had been trimmed entry by entry.
      local at = redis.call('ZSCORE', k[5], key)
      if at and tonumber(at) > off - cap then
        ok = false
      end
    end
    if ok then
      off = off + 1
      vals[#vals+1] = estr[i]
      pushes[#pushes+1] = epush[i]
      size = size + #epush[i]
      if seq > 0 and (scid == nil or scid == cid) then
        scid, sseq = cid, eseqs[i]
      else
        scid = false
      end
      if seq > 0 then
        last[cid], lasts[cid] = seq, eseqs[i]
        changed[cid] = true
      elseif key ~= '' then
        if redis.call('ZADD', k[5], off, key) == 1 and redis.call('ZCARD', k[5]) == 1 then
          refresh = true
        end
      end
      if baseline > 0 and (seq_of(cid) or 0) < baseline then
        last[cid], lasts[cid] = baseline, ebases[i]
        changed[cid] = true
      end
      if eforget[i] then
        seq_of(cid) -- so that a later entry of cid sees it forgotten
        last[cid] = false
        changed[cid] = true
      end
    end
  end
  if #vals > 0 then
    local len = 0
    for j = 1, #vals, 1000 do -- unpack is bounded by Lua's C stack
      len = redis.call('RPUSH', k[1], unpack(vals, j, math.min(j + 999, #vals)))
    end
    if first == 1 or len == #vals then
      refresh = true
    end
    if len > cap then
      redis.call('LTRIM', k[1], -cap, -1)
      redis.call('ZREMRANGEBYSCORE', k[5], '-inf', off - cap)
    end
    redis.call('SET', k[2], off, 'KEEPTTL')
    for cid in pairs(changed) do
      if not last[cid] then
        redis.call('HDEL', k[4], cid)
      elseif redis.call('HSET', k[4], cid, lasts[cid]) > 0 then
        refresh = true -- a conversation new to this log: maybe a new hash
      end
    end
  end
  -- The conversation list moves only if cached (else it is filled whole
  -- from the database on its next read); GT: never back. EXISTS first: most
  -- recipients of a large group have no cached list, and a ZADD would
  -- create one only to have it deleted again, which had cost more than the
  -- rest of their append together (docs/performance.md).
  if next(touch) and redis.call('EXISTS', k[6]) == 1 then
    for cid in pairs(touch) do
      redis.call('ZADD', k[6], 'GT', toucha[cid], cid)
    end
  end
  -- The TTL is looked at when the offsets cross a multiple of 64, not on
  -- every append (a redis.call each).
  if refresh or (#vals > 0 and math.floor((first - 1) / 64) ~= math.floor(off / 64)
      and redis.call('PTTL', k[2]) < ttl - ttl / 100) then
    expire_all(k, ttl)
  end
  if #vals > 0 then
    -- The wake-up carries the new entries themselves (pushSize bounds it),
    -- so the streams of the user need not read them back: "L <epoch>
    -- <offset of the first> " then each entry as "<length>:<entry>".
    if not carry or size > ` + pushSizeLua + ` then
      if scid then
        -- Too big to carry, but all messages of one conversation, in seq
        -- order: a stream that has them already (the fan-out fast path)
        -- need not read them. "S <epoch> <offset of the first> <count>
        -- <last seq> <conversation id>".
        redis.call('PUBLISH', channel, 'S ' .. epoch .. ' ' .. first .. ' ' .. #vals .. ' ' .. sseq .. ' ' .. scid)
      else
        redis.call('PUBLISH', channel, '')
      end
    else
      redis.call('PUBLISH', channel, 'L ' .. epoch .. ' ' .. first .. ' ' .. table.concat(pushes))
    end
  end
end

local a = 4 + ne * 8
local u = 0
while a <= #ARGV do
  u = u + 1
  local b = (u - 1) * 6
  local k = {KEYS[b+1], KEYS[b+2], KEYS[b+3], KEYS[b+4], KEYS[b+5], KEYS[b+6]}
  local candidate, channel = ARGV[a], ARGV[a+1]
  if ARGV[a+2] == '*' then
    append_user(u, k, candidate, channel, all)
    a = a + 3
  else
    local count = tonumber(ARGV[a+2])
    local idx = {}
    for j = 1, count do
      idx[j] = tonumber(ARGV[a+2+j])
    end
    append_user(u, k, candidate, channel, idx)
    a = a + 3 + count
  end
end
return gaps
`

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
// and extends the log's life: a log someone streams from is in use; with
// ARGV[3] '1' also the conversations' seqs as of that head (HGETALL of the
// conv hash: HeadSeqs). KEYS: logKeys. ARGV: epoch candidate, ttl (ms),
// seqs '1'/'0'.
var headScript = redis.NewScript(epochLua + `
local _, epoch, off = ensure_epoch(KEYS, ARGV[1])
expire_all(KEYS, tonumber(ARGV[2]))
if ARGV[3] == '1' then
  return {epoch, off, redis.call('HGETALL', KEYS[4])}
end
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

// userBatch is one user's entries in an Append, in order.
type userBatch struct {
	uid     string
	entries []*chat.LogEntry
}

// Append implements chat.EventLog: the users' scripts calls (appendScript)
// take up to appendUsers users and appendWork of their entries each, and
// go out in pipelines.
// An entry that is a duplicate (by seq, or by Key) or would leave a gap is
// skipped entirely, Baseline and Forget included: they apply only with the
// entry they come with, so a re-dispatched old event cannot undo a newer
// state. An entry without Seq and without Key is never deduped.
func (r *Redis) Append(ctx context.Context, ds []chat.Delivery) ([]chat.Gap, error) {
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
	type call struct {
		users   []*userBatch
		entries []*chat.LogEntry
		number  map[*chat.LogEntry]int // entry → its number in entries, from 1
		work    int
	}
	var calls []*call
	var cur *call
	for _, b := range batches {
		if cur == nil || len(cur.users) == appendUsers || cur.work+len(b.entries) > appendWork {
			cur = &call{number: make(map[*chat.LogEntry]int)}
			calls = append(calls, cur)
		}
		cur.users = append(cur.users, b)
		cur.work += len(b.entries)
		for _, e := range b.entries {
			if cur.number[e] == 0 {
				cur.entries = append(cur.entries, e)
				cur.number[e] = len(cur.entries)
			}
		}
	}
	// An entry goes in every call of its round (a message to 1000 members
	// in 16 calls or more): its arguments are made once per entry, not
	// once per call.
	type entryText struct{ seq, base, act, stored, pushed string }
	texts := make(map[*chat.LogEntry]entryText)
	scripts := make([]scriptCall, len(calls))
	for ci, c := range calls {
		keys := make([]string, 0, 6*len(c.users))
		args := make([]any, 0, 3+8*len(c.entries)+len(c.users)*4+c.work)
		args = append(args, capArg, ttl, strconv.Itoa(len(c.entries)))
		// Each user takes all of the call's entries ("*", below), or some.
		takesAll := make([]bool, len(c.users))
		everyone := true
		for i, b := range c.users {
			takesAll[i] = allEntries(b.entries, c.entries)
			everyone = everyone && takesAll[i]
		}
		carry := !everyone || fitWakeUp(c.entries)
		for _, e := range c.entries {
			t, ok := texts[e]
			if !ok {
				t.seq, t.base = strconv.FormatInt(max(e.Seq, 0), 10), strconv.FormatInt(max(e.Baseline, 0), 10)
				t.act = activityArg(e.ConversationID, e.Activity)
				t.stored = string(e.Type) + " " + string(e.Data) // as the list stores it
				texts[e] = t
			}
			pushed := ""
			if carry {
				if t.pushed == "" {
					t.pushed = strconv.Itoa(len(t.stored)) + ":" + t.stored // as a wake-up carries it
					texts[e] = t
				}
				pushed = t.pushed
			}
			args = append(args, e.Key, e.ConversationID, t.seq, t.base, boolArg(e.Forget), t.act, t.stored, pushed)
		}
		for i, b := range c.users {
			keys = append(append(keys, r.logKeys(b.uid)...), r.sessionKey(b.uid))
			// A fresh epoch per user (used only if the log is new): ids of
			// different users' logs must never collide, or a Last-Event-ID of
			// one account would be served from another's log.
			args = append(args, newEpoch(), r.userChannel(b.uid))
			if takesAll[i] {
				args = append(args, "*")
				continue
			}
			args = append(args, strconv.Itoa(len(b.entries)))
			for _, e := range b.entries {
				args = append(args, strconv.Itoa(c.number[e]))
			}
		}
		scripts[ci] = scriptCall{keys: keys, args: args}
	}
	cmds, err := r.runScripts(ctx, appendScript, scripts)
	if err != nil {
		return nil, fmt.Errorf("realtime: append: %w", err)
	}

	var gaps []chat.Gap
	for ci, c := range cmds {
		vals, err := c.Int64Slice()
		if err != nil {
			return nil, fmt.Errorf("realtime: append: reply: %w", err)
		}
		for j := 0; j+2 < len(vals); j += 3 {
			b := calls[ci].users[vals[j]-1]
			e := b.entries[vals[j+1]-1]
			gaps = append(gaps, chat.Gap{UserID: b.uid, ConversationID: e.ConversationID, LastSeq: vals[j+2], Seq: e.Seq})
		}
	}
	return gaps, nil
}

// fitWakeUp reports whether entries fit one wake-up (pushSize, in the form
// a wake-up carries them). A call's entries travel twice, as the list
// stores them and as a wake-up carries them; when every user of the call
// takes them all and they do not fit, no user's wake-up can carry them (it
// sums them up, or is empty), so Append leaves the second copy out: half
// of what a large group's round sends Redis, which Redis turns into Lua
// strings for every call. A user that finds some of them duplicates, and
// is left with few enough to carry, wakes its streams with a summary or an
// empty wake-up then, and they read the log.
func fitWakeUp(entries []*chat.LogEntry) bool {
	size := 0
	for _, e := range entries {
		n := len(e.Type) + 1 + len(e.Data)
		size += len(strconv.Itoa(n)) + 1 + n
	}
	return size <= pushSize
}

// allEntries reports whether a user's entries are all of a call's, in its
// order: the usual case in a group's round, sent as "*" instead of a number
// per entry (which Redis had to turn into a Lua string and back into a
// number for every recipient).
func allEntries(user, call []*chat.LogEntry) bool {
	if len(user) != len(call) {
		return false
	}
	for i, e := range user {
		if call[i] != e {
			return false
		}
	}
	return true
}

// appendUsers and appendWork bound one appendScript call: at most 64 users
// and 2048 of their entries, so that a round to a large group neither
// blocks Redis for long in one script nor pays the per-call overhead per
// recipient. That overhead is mostly the call's entries, which Redis turns
// into Lua strings once per call, so a round of many messages wants many
// users per call: 256 messages to 50 users (BenchmarkAppend/batch256,
// Redis' script time per round on a slow hour) take 13 calls of 1.26 ms
// with a bound of 1024 entries, 7 of 1.89 ms with 2048, 4 of 2.49 ms with
// 4096; Redis' CPU per message in the hot scenario −18 % with 2048.
const (
	appendUsers = 64
	appendWork  = 2048
)

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
	for i, item := range raw {
		s, _ := item.(string)
		typ, data, err := parseEntry(s)
		if err != nil {
			return nil, pos, fmt.Errorf("realtime: read %s: %w", uid, err)
		}
		last = chat.Position{Epoch: pos.Epoch, Offset: pos.Offset + 1 + int64(i)}
		evs = append(evs, chat.StreamEvent{ID: last.String(), Type: chat.EventType(typ), Data: []byte(data)})
	}
	return evs, last, nil
}

var errBadEntry = errors.New("malformed log entry")

// parseEntry splits a stored entry "<type> <data>"; types contain no space
// and never start with a digit, data may contain anything. An entry of the
// earlier layout, "<offset> <type> <data>", loses its offset (the reader
// knows it from the entry's place).
func parseEntry(s string) (typ, data string, err error) {
	if s != "" && s[0] >= '0' && s[0] <= '9' {
		_, s, _ = strings.Cut(s, " ")
	}
	typ, data, ok := strings.Cut(s, " ")
	if !ok || typ == "" {
		return "", "", errBadEntry
	}
	return typ, data, nil
}

// Head implements chat.EventLog.
func (r *Redis) Head(ctx context.Context, uid string) (chat.Position, error) {
	head, _, err := r.head(ctx, uid, false)
	return head, err
}

// HeadSeqs implements chat.EventLog.
func (r *Redis) HeadSeqs(ctx context.Context, uid string) (chat.Position, map[string]int64, error) {
	return r.head(ctx, uid, true)
}

func (r *Redis) head(ctx context.Context, uid string, withSeqs bool) (chat.Position, map[string]int64, error) {
	res, err := r.runScript(ctx, headScript, r.logKeys(uid), newEpoch(), ttlMillis(r.cfg.LogTTL), boolArg(withSeqs)).Slice()
	if err != nil {
		return chat.Position{}, nil, fmt.Errorf("realtime: head: %w", err)
	}
	ep, _ := res[0].(string)
	off, _ := res[1].(int64)
	want := 2
	if withSeqs {
		want = 3
	}
	if ep == "" || len(res) != want {
		return chat.Position{}, nil, fmt.Errorf("realtime: head: unexpected reply %v", res)
	}
	head := chat.Position{Epoch: ep, Offset: off}
	if !withSeqs {
		return head, nil, nil
	}
	kv, _ := res[2].([]any)
	if len(kv)%2 != 0 {
		return chat.Position{}, nil, fmt.Errorf("realtime: head: unexpected reply %v", res)
	}
	seqs := make(map[string]int64, len(kv)/2)
	for i := 0; i < len(kv); i += 2 {
		cid, _ := kv[i].(string)
		v, _ := kv[i+1].(string)
		n, err := strconv.ParseInt(v, 10, 64)
		if err != nil {
			return chat.Position{}, nil, fmt.Errorf("realtime: head: seq %q of %q", v, cid)
		}
		seqs[cid] = n
	}
	return head, seqs, nil
}
