package chat

import (
	"encoding/json"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"time"
)

// EventType names an event on the stream (API.md, "The event stream").
type EventType string

// Durable events are stored in the outbox with the change that caused them,
// appended to every recipient's log and replayed on resume. Ephemeral ones
// (typing, presence) go only to live streams and carry no id.
const (
	EventMessageCreated      EventType = "message.created"
	EventConversationCreated EventType = "conversation.created"
	EventConversationUpdated EventType = "conversation.updated"
	EventMemberAdded         EventType = "member.added"
	EventMemberRemoved       EventType = "member.removed"
	EventMemberUpdated       EventType = "member.updated"
	EventReceiptRead         EventType = "receipt.read"
	EventTyping              EventType = "typing"
	EventPresence            EventType = "presence"
	EventReady               EventType = "ready"
	EventResync              EventType = "resync"
)

// Droppable reports whether an event of type t may be dropped when the
// buffer of the subscription it is for is full, rather than ending that
// subscription (Subscription.Events). Typing and presence are advisory and
// superseded by the next one (and GET /v1/presence repairs presence), so a
// burst of them, after a node restart say, must not disconnect a healthy
// stream. Every other type is a control event that must never be lost
// silently: the token-end event is what ends a revoked token's streams.
// The fan-out fast path's broadcasts (eventFanout) only deliver sooner what
// the logs deliver anyway. This is the one place that decides; every Bus
// implementation asks it.
func (t EventType) Droppable() bool {
	return t == EventTyping || t == EventPresence || t == eventFanout
}

// OutboxEvent is a durable event as committed in the same transaction as the
// change that caused it. The dispatcher turns it into log entries for its
// recipients and deletes it; until then any node's sweeper may retry it, so
// dispatch must be idempotent (the logs dedupe by Key and by Seq).
type OutboxEvent struct {
	ID             int64
	ConversationID string
	Type           EventType
	// Seq is the message seq for message.created: the logs use it to keep each
	// conversation in order and to drop re-dispatches.
	Seq int64
	// Data is the event's payload, shared by all recipients. Conversation
	// events leave it empty: their payload is the conversation as each
	// recipient sees it (unread count, peer), built at dispatch.
	Data json.RawMessage
	// To lists the recipients when the event is not for all current members
	// (conversation.created to the users just added). Empty: all members.
	To []string
	// Extra recipients on top of the members (the member just removed).
	Extra     []string
	CreatedAt time.Time
}

// Key is the event's dedupe key in every log it is appended to.
func (e OutboxEvent) Key() string { return "o" + strconv.FormatInt(e.ID, 10) }

// MemberEvent is the payload of member.added, member.removed and member.updated.
type MemberEvent struct {
	ConversationID string `json:"conversation_id"`
	UserID         string `json:"user_id"`
	Role           Role   `json:"role,omitempty"`
	By             string `json:"by"`
}

// ReceiptEvent is the payload of receipt.read.
type ReceiptEvent struct {
	ConversationID string `json:"conversation_id"`
	UserID         string `json:"user_id"`
	Seq            int64  `json:"seq"`
}

// TypingEvent is the payload of typing.
type TypingEvent struct {
	ConversationID string `json:"conversation_id"`
	UserID         string `json:"user_id"`
	ExpiresInMS    int64  `json:"expires_in_ms"`
}

// ReadyEvent is the payload of ready.
type ReadyEvent struct {
	LastEventID string `json:"last_event_id"`
}

// ResyncEvent is the payload of resync.
type ResyncEvent struct {
	Reason string `json:"reason"`
}

// StreamEvent is one event as a stream writes it. ID is empty for ephemeral
// events, which are never replayed.
type StreamEvent struct {
	ID   string          `json:"id"`
	Type EventType       `json:"type"`
	Data json.RawMessage `json:"data"`
}

// LogEntry is what a user's event log stores for one durable event.
type LogEntry struct {
	// Key dedupes re-dispatches of events that have no Seq.
	Key            string
	Type           EventType
	ConversationID string
	// Seq > 0 (message.created) must be exactly the next seq of the
	// conversation in this log, else the append reports a Gap; a Seq at or
	// below the last one is a duplicate and is skipped. When the log has no
	// seq of the conversation yet, only Seq 1 (or Baseline+1) is accepted;
	// any other is a Gap with LastSeq -1 (start unknown).
	Seq int64
	// Baseline > 0 raises the conversation's last seq in this log to at least
	// Baseline without appending a message: a user added at last_seq N has
	// not missed messages 1..N. Forget drops the conversation's seq state (the
	// user left; a later re-join starts fresh).
	Baseline int64
	Forget   bool
	// Activity, when set, also moves ConversationID to this time in the
	// user's conversation list if it is cached (as SessionCache.TouchSessions,
	// never back), whether or not the entry itself is appended: a message's
	// delivery and its move in the list are one step per recipient.
	Activity time.Time
	Data     []byte
}

// Delivery is one entry for one user's log.
type Delivery struct {
	UserID string
	Entry  *LogEntry
}

// Gap reports that a user's log holds seqs of a conversation only up to
// LastSeq, below the message being appended: the dispatcher fills the gap from
// the store first, so a conversation is never appended out of order. LastSeq
// -1 means the log does not know where the conversation starts (a new member,
// a new group, a lost log).
type Gap struct {
	UserID         string
	ConversationID string
	LastSeq        int64
	Seq            int64
}

// Position is a place in one user's event log: the log's epoch (a new one
// whenever the log was lost) and an offset that grows by one per entry.
type Position struct {
	Epoch  string
	Offset int64
}

// String is the wire form of an event id: "<epoch>-<offset>".
func (p Position) String() string { return p.Epoch + "-" + strconv.FormatInt(p.Offset, 10) }

// IsZero reports an absent position.
func (p Position) IsZero() bool { return p.Epoch == "" }

// ErrBadPosition is returned for an event id that cannot be parsed.
var ErrBadPosition = errors.New("malformed event id")

// ParsePosition parses "<epoch>-<offset>"; epochs never contain '-'.
func ParsePosition(s string) (Position, error) {
	i := strings.LastIndexByte(s, '-')
	if i <= 0 || i == len(s)-1 || len(s) > 128 {
		return Position{}, ErrBadPosition
	}
	off, err := strconv.ParseInt(s[i+1:], 10, 64)
	if err != nil || off < 0 || strings.ContainsRune(s[:i], '-') {
		return Position{}, ErrBadPosition
	}
	return Position{Epoch: s[:i], Offset: off}, nil
}

// ResyncError says a log position cannot be served; the stream starts with a
// resync event carrying Reason.
type ResyncError struct{ Reason string }

func (e *ResyncError) Error() string { return fmt.Sprintf("resync: %s", e.Reason) }

// Resync reasons.
const (
	ResyncMalformed = "malformed_event_id"
	ResyncEpoch     = "log_lost"         // the log was recreated (new epoch)
	ResyncExpired   = "position_too_old" // older than what the log retains
	ResyncAhead     = "position_ahead"   // beyond the log's head: not from this log
)
