package chat

import (
	"context"
	"time"
)

// The ports. Each is as narrow as the use cases need, so that a second
// implementation (the planned embedded mode: SQLite store, in-memory
// realtime) only has to pass the same conformance suites.

// UserStore keeps accounts.
type UserStore interface {
	// CreateUser inserts u; CodeConflict if the id is taken.
	CreateUser(ctx context.Context, u User) error
	User(ctx context.Context, id string) (User, error)
	// Users returns those of ids that exist.
	Users(ctx context.Context, ids []string) ([]User, error)
	UpdateUser(ctx context.Context, id, displayName string) (User, error)
}

// TokenStore keeps bearer tokens and stream tickets by the hash of their secret.
type TokenStore interface {
	CreateToken(ctx context.Context, t Token, secretHash []byte) error
	// TokenByHash returns the token whatever its state; the caller checks
	// expiry and revocation.
	TokenByHash(ctx context.Context, secretHash []byte) (Token, error)
	// TokenByID is TokenByHash by id: open streams re-check their token.
	TokenByID(ctx context.Context, id string) (Token, error)
	// TokensByID returns those of ids that exist, whatever their state, in
	// any order: the token cache reads its live tokens again in bulk.
	TokensByID(ctx context.Context, ids []string) ([]Token, error)
	// Tokens lists a user's live tokens of a kind, newest first.
	Tokens(ctx context.Context, userID string, kind TokenKind) ([]Token, error)
	// RevokeToken revokes one of userID's tokens; CodeNotFound if it has none by that id.
	RevokeToken(ctx context.Context, userID, tokenID string, at time.Time) error
	TouchToken(ctx context.Context, tokenID string, at time.Time) error
	CreateTicket(ctx context.Context, secretHash []byte, p Principal, expiresAt time.Time) error
	// ConsumeTicket returns a ticket's principal and deletes it (single use);
	// CodeNotFound if absent or expired.
	ConsumeTicket(ctx context.Context, secretHash []byte, now time.Time) (Principal, error)
}

// NewGroup is a group to create, with its owner and the other members.
type NewGroup struct {
	ID        string
	Title     string
	OwnerID   string
	MemberIDs []string // without the owner; all must exist (else CodeInvalid on member_ids)
	CreatedAt time.Time
}

// Activity is a conversation's place in a user's list.
type Activity struct {
	ConversationID string
	At             time.Time
}

// Changed is what a mutation committed: the outbox events the dispatcher
// should deliver right away (a sweeper delivers them later otherwise).
type Changed struct {
	Events []OutboxEvent
}

// ConversationStore keeps conversations and their members. Every mutation
// writes its outbox events in the same transaction.
type ConversationStore interface {
	// CreateGroup stores the group, its members (owner first) and a
	// conversation.created event for all of them.
	CreateGroup(ctx context.Context, g NewGroup) (Conversation, Changed, error)
	// DirectConversation returns the pair's direct conversation as a sees it,
	// creating it (id newID) when none exists; created reports which.
	DirectConversation(ctx context.Context, a, b, newID string, at time.Time) (c Conversation, created bool, ch Changed, err error)
	// Conversation returns cid as viewer sees it; CodeNotFound unless viewer is a member.
	Conversation(ctx context.Context, cid, viewer string) (Conversation, error)
	// ConversationsFor returns those of ids that viewer is a member of, as viewer sees them.
	ConversationsFor(ctx context.Context, viewer string, ids []string) ([]Conversation, error)
	// ConversationViews returns cid as each of uids sees it, keyed by user id;
	// uids that are not members are left out.
	ConversationViews(ctx context.Context, cid string, uids []string) (map[string]Conversation, error)
	// ActivityPage lists uid's conversations by last activity, newest first
	// (ties by id descending), strictly after the cursor when given.
	ActivityPage(ctx context.Context, uid string, after *Activity, limit int) ([]Activity, error)
	SetTitle(ctx context.Context, cid, title, by string) (Changed, error)

	// Member returns uid's membership; CodeNotFound if uid is not a member.
	Member(ctx context.Context, cid, uid string) (Member, error)
	// Members pages members in join order; the cursor is opaque.
	Members(ctx context.Context, cid string, p Page) ([]Member, string, error)
	MemberIDs(ctx context.Context, cid string) ([]string, error)
	// AddMembers adds the users not yet members (as RoleMember) and returns
	// them; unknown users, or more than maxMembers in all, are CodeInvalid on
	// user_ids.
	AddMembers(ctx context.Context, cid, by string, uids []string, maxMembers int, at time.Time) ([]Member, Changed, error)
	SetRole(ctx context.Context, cid, uid string, role Role, by string) (Member, Changed, error)
	// RemoveMember removes uid. When the owner leaves, the longest-standing
	// admin (else member) becomes owner in the same transaction.
	RemoveMember(ctx context.Context, cid, uid, by string) (Changed, error)
	// SharingWith returns those of others that share a conversation with uid.
	SharingWith(ctx context.Context, uid string, others []string) ([]string, error)
	// DirectPeers lists the users uid has a direct conversation with.
	DirectPeers(ctx context.Context, uid string) ([]string, error)
}

// NewMessage is a message to store.
type NewMessage struct {
	ID             string
	ConversationID string
	SenderID       string
	Text           string
	Metadata       []byte // a JSON object or nil
	ClientMsgID    string // idempotency key; empty for none
	CreatedAt      time.Time
}

// HistoryQuery selects a page of history. With neither bound: the latest page.
type HistoryQuery struct {
	BeforeSeq int64 // > 0: seq < BeforeSeq, the page nearest to it
	AfterSeq  int64 // >= 0 with After set: seq > AfterSeq
	After     bool
	Limit     int
}

// MessageStore keeps messages and read positions.
type MessageStore interface {
	// Send stores m in one transaction: next seq of the conversation (G3),
	// the message, the sender's read position, an outbox event. CodeNotFound
	// if the sender is not a member. With a ClientMsgID already used by the
	// same sender in the conversation it stores nothing and returns the
	// original with created=false (G2), CodeConflict if the text or metadata differ.
	Send(ctx context.Context, m NewMessage) (msg Message, created bool, ch Changed, err error)
	// Messages returns a page ascending by seq and whether more exist beyond
	// it in the direction of the query.
	Messages(ctx context.Context, cid string, q HistoryQuery) ([]Message, bool, error)
	Message(ctx context.Context, cid string, seq int64) (Message, error)
	// MarkRead moves uid's read position forward to seq (never back) and
	// writes a receipt.read event when it moved. CodeInvalid on seq if it is
	// beyond the conversation's last seq.
	MarkRead(ctx context.Context, cid, uid string, seq int64) (ReadState, Changed, error)
}

// CommitOrdered is implemented by a MessageStore that group-commits sends:
// it calls fn with the outbox events of each committed batch in commit order
// (a conversation's messages in seq order) before it answers the batch's
// senders. The service then dispatches sends from fn rather than from each
// sender's goroutine, whose wake-up order would scramble a batch's seqs and
// cost the dispatcher a gap fill from the store for each reordering.
type CommitOrdered interface {
	OnSendCommitted(fn func([]OutboxEvent))
}

// Outbox is the durable queue of events awaiting dispatch.
type Outbox interface {
	// ClaimEvents leases up to limit events created before olderThan that no
	// other node holds, for lease; in id order.
	ClaimEvents(ctx context.Context, olderThan time.Time, lease time.Duration, limit int) ([]OutboxEvent, error)
	// EventsDone deletes dispatched events.
	EventsDone(ctx context.Context, ids []int64) error
	// PendingMessages returns, for each of cids that has any, the lowest seq
	// of its messages whose events are still in the outbox. Every message of
	// the conversation below it has been dispatched (seq order is commit
	// order, and an event leaves the outbox only once its logs have it), so
	// a log that lost its place in the conversation need not be filled from
	// further back than that (Service.fillGaps).
	PendingMessages(ctx context.Context, cids []string) (map[string]int64, error)
}

// Store is the source of truth: PostgreSQL, or SQLite in the embedded mode.
type Store interface {
	UserStore
	TokenStore
	ConversationStore
	MessageStore
	Outbox
	Ping(ctx context.Context) error
}

// EventLog keeps each user's durable event log, from which streams replay
// and resume.
type EventLog interface {
	// Append appends each delivery to its user's log, atomically per user and
	// idempotently (see LogEntry), waking that user's streams. Gaps lists the
	// message deliveries that were not appended because earlier seqs are missing.
	Append(ctx context.Context, ds []Delivery) (gaps []Gap, err error)
	// Read returns up to limit events after pos and the position of the last
	// one returned (pos when none). A position the log cannot serve is a
	// *ResyncError.
	Read(ctx context.Context, uid string, pos Position, limit int) ([]StreamEvent, Position, error)
	// Head is the position of the log's newest entry, creating the log's
	// epoch if it has none.
	Head(ctx context.Context, uid string) (Position, error)
	// HeadSeqs is Head with, as of that head, each conversation's last
	// message seq in the log (appended or baselined; LogEntry.Seq): a
	// stream starting there has every message of a conversation up to it.
	HeadSeqs(ctx context.Context, uid string) (Position, map[string]int64, error)
}

// Subscription receives what concerns one user's streams on this node.
type Subscription interface {
	// Wake has a value when the user's log may have grown (or events may have
	// been missed, e.g. after a Pub/Sub reconnect): read the log again.
	Wake() <-chan struct{}
	// Since returns what the wake-ups since the last call carried, from
	// just after pos: ok is false when they do not continue pos without a
	// hole (or carried nothing, or some were lost), and the log must be read.
	// A wake-up may carry only a summary of its entries, all messages of
	// one conversation up to lastSeq: Since passes over them if have says
	// the stream has them all (the fan-out fast path, fanout.go), else it
	// says false. An implementation may always say false.
	Since(pos Position, have func(cid string, lastSeq int64) bool) (evs []StreamEvent, next Position, ok bool)
	// Events carries ephemeral events and control events, in order, and is
	// bounded. An event that does not fit is dropped if its type is
	// Droppable (typing, presence); any other is never dropped silently:
	// Events is closed instead, with Err set, and the stream ends and
	// resumes from its log.
	Events() <-chan StreamEvent
	Close()
}

// NodeSubscription receives the node-level events of every node (Broadcast).
type NodeSubscription interface {
	// Wake has a value when events may have been missed (e.g. after a
	// Pub/Sub reconnect): whatever depends on seeing all of them must start over.
	Wake() <-chan struct{}
	// Events carries the broadcast events, bounded as Subscription.Events
	// is and closed the same way when a non-droppable one does not fit.
	Events() <-chan StreamEvent
	Close()
}

// Topic names a kind of node-level event (Bus.Broadcast, Bus.Listen). A
// Listen-er hears only its topic, so a busy topic (the fan-out fast path,
// many large events a second) never fills the bounded buffer of a listener
// that must see every event of a rare one (token revocations, whose
// listener drains only every few milliseconds). A topic is never empty.
type Topic string

const (
	TopicTokens Topic = "tokens" // token revocations (auth.go)
	TopicFanout Topic = "fanout" // messages of large groups delivered ahead of the logs (fanout.go)
)

// Bus routes wake-ups and ephemeral events to whichever nodes hold a user's
// streams, and node-level events to every node.
type Bus interface {
	Subscribe(ctx context.Context, uid string) (Subscription, error)
	// Publish sends an ephemeral event to the live streams of uids, best effort.
	Publish(ctx context.Context, uids []string, ev StreamEvent) error
	// Broadcast sends a node-level event of topic to that topic's Listen-ers
	// of every node, this one included, never to streams; best effort. An
	// empty topic is an error.
	Broadcast(ctx context.Context, topic Topic, ev StreamEvent) error
	// Listen receives the node-level events of topic, from every node, until
	// Close; as with Subscribe, what is broadcast after it returns reaches
	// it. Topics are kept apart so that one cannot crowd another out of the
	// bounded buffer (see Topic). An empty topic is an error.
	Listen(ctx context.Context, topic Topic) (NodeSubscription, error)
}

// Presence tracks live streams per user across nodes; entries expire so a
// crashed node's streams stop counting.
type Presence interface {
	// Connect registers a stream; first reports the user had none before.
	Connect(ctx context.Context, uid, connID string, ttl time.Duration) (first bool, err error)
	Refresh(ctx context.Context, uid, connID string, ttl time.Duration) error
	// Disconnect removes a stream; last reports the user has none left (and
	// records the last-seen time).
	Disconnect(ctx context.Context, uid, connID string) (last bool, err error)
	Lookup(ctx context.Context, uids []string) ([]PresenceInfo, error)
}

// MemberCache caches member sets for fan-out. A miss returns a version;
// Fill writes only if no Invalidate happened since, so a slow reader cannot
// put back a member set older than a change.
type MemberCache interface {
	// CachedMembers looks up several conversations at once, answering in the
	// order given: a dispatcher round with many conversations (direct
	// messages) costs one round trip, not one per conversation.
	CachedMembers(ctx context.Context, cids []string) ([]MemberSet, error)
	FillMembers(ctx context.Context, cid, ver string, members []string) error
	InvalidateMembers(ctx context.Context, cid string) error
}

// MemberSet is one conversation's answer of CachedMembers: the members
// when OK (a hit), and the version to fill a miss with.
type MemberSet struct {
	Members []string
	OK      bool
	Ver     string
}

// SessionCache keeps each user's conversation list ordered by last activity.
type SessionCache interface {
	// SessionPage returns up to limit entries newest first, strictly after the
	// cursor; ok is false when uid's list is not cached.
	SessionPage(ctx context.Context, uid string, after *Activity, limit int) (items []Activity, ok bool, err error)
	// FillSessions replaces uid's list (all of it).
	FillSessions(ctx context.Context, uid string, items []Activity) error
	// TouchSessions moves cid to at in the lists of those uids whose list is cached.
	TouchSessions(ctx context.Context, uids []string, cid string, at time.Time) error
	// RemoveSession drops cid from uid's list.
	RemoveSession(ctx context.Context, uid, cid string) error
}

// Limit allows Rate events per Period, up to Burst at once (GCRA).
type Limit struct {
	Rate   int
	Period time.Duration
	Burst  int
}

// RateLimiter shares rate limits across nodes.
type RateLimiter interface {
	// Allow takes n tokens from key's bucket; n = 0 only checks. When not
	// allowed, retryAfter says when n tokens will be there.
	Allow(ctx context.Context, key string, l Limit, n int) (allowed bool, retryAfter time.Duration, err error)
}

// Realtime bundles the Redis-side ports, implemented together by one adapter.
type Realtime interface {
	EventLog
	Bus
	Presence
	MemberCache
	SessionCache
	RateLimiter
	Ping(ctx context.Context) error
}
