package chat

import (
	"encoding/json"
	"time"
)

// User is an account. Its ID is the username chosen at registration: immutable,
// human-readable, and what other users address messages to.
type User struct {
	ID          string    `json:"id"`
	DisplayName string    `json:"display_name"`
	CreatedAt   time.Time `json:"created_at"`
	// PasswordHash is an encoded argon2id hash; empty for users provisioned
	// without a password (they authenticate with tokens minted by an app server).
	PasswordHash string `json:"-"`
}

// TokenKind tells how a token was issued; it decides its lifetime and whether
// it is listed under the user's API tokens.
type TokenKind string

const (
	TokenSession TokenKind = "session" // from register or login; also the cookie
	TokenAPI     TokenKind = "api"     // named, for scripts, bots and app servers
)

// Token is a bearer credential. Only a hash of its secret is stored, so a
// database leak does not leak usable tokens.
type Token struct {
	ID         string
	UserID     string
	Kind       TokenKind
	Name       string
	CreatedAt  time.Time
	ExpiresAt  *time.Time // nil: does not expire
	LastUsedAt *time.Time
	RevokedAt  *time.Time
}

// Principal is who a request acts as.
type Principal struct {
	UserID string
	// TokenID is the token the caller authenticated with; a stream opened
	// with a ticket carries the token the ticket was issued to. Streams
	// re-check it (the backstop), so it is never empty for them.
	TokenID string
}

// ConvType is the kind of a conversation.
type ConvType string

const (
	Direct ConvType = "direct"
	Group  ConvType = "group"
)

// Role orders what a member may do in a group: owner > admin > member.
type Role string

const (
	RoleOwner  Role = "owner"
	RoleAdmin  Role = "admin"
	RoleMember Role = "member"
)

// CanManage reports whether the role may change membership and the title.
func (r Role) CanManage() bool { return r == RoleOwner || r == RoleAdmin }

// Conversation is a direct or group conversation as seen by one member: the
// per-viewer fields (LastReadSeq, UnreadCount, PeerID) depend on who asks.
type Conversation struct {
	ID             string    `json:"id"`
	Type           ConvType  `json:"type"`
	Title          string    `json:"title"`
	CreatedAt      time.Time `json:"created_at"`
	LastSeq        int64     `json:"last_seq"`
	LastReadSeq    int64     `json:"last_read_seq"`
	UnreadCount    int64     `json:"unread_count"`
	LastMessage    *Message  `json:"last_message,omitempty"`
	LastActivityAt time.Time `json:"last_activity_at"`
	MemberCount    int       `json:"member_count"`
	PeerID         string    `json:"peer_id,omitempty"`
}

// Member is one user's membership in a conversation.
type Member struct {
	ConversationID string    `json:"-"`
	UserID         string    `json:"user_id"`
	Role           Role      `json:"role"`
	JoinedAt       time.Time `json:"joined_at"`
	LastReadSeq    int64     `json:"-"`
}

// Message is one durable message. Seq numbers a conversation's messages
// 1, 2, 3... without gaps (G3).
type Message struct {
	ID             string          `json:"id"`
	ConversationID string          `json:"conversation_id"`
	Seq            int64           `json:"seq"`
	SenderID       string          `json:"sender_id"`
	Text           string          `json:"text"`
	Metadata       json.RawMessage `json:"metadata,omitempty"`
	ClientMsgID    string          `json:"client_msg_id,omitempty"`
	CreatedAt      time.Time       `json:"created_at"`
}

// ReadState is a member's read position after a MarkRead.
type ReadState struct {
	LastReadSeq int64 `json:"last_read_seq"`
	UnreadCount int64 `json:"unread_count"`
}

// PresenceInfo is whether a user has a live stream on any node.
type PresenceInfo struct {
	UserID     string     `json:"user_id"`
	Online     bool       `json:"online"`
	LastSeenAt *time.Time `json:"last_seen_at,omitempty"`
}

// Page is a cursor page request; Cursor is opaque to clients.
type Page struct {
	Cursor string
	Limit  int
}

// Now is the clock use cases and adapters stamp rows with: UTC, truncated to
// the millisecond the wire format carries, so a value read back from the
// database equals the one returned at creation.
func Now() time.Time { return time.Now().UTC().Truncate(time.Millisecond) }
