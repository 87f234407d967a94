package handlers

import (
	"bytes"
	"encoding/json"

	"imd/chat"
	"imd/handlers/api"
)

// The mappers below turn domain values into the generated wire types. Lists
// are always allocated, so an empty list encodes as [] and never as null:
// clients index into them without a null check.

func apiUser(u chat.User) api.User {
	return api.User{ID: u.ID, DisplayName: u.DisplayName, CreatedAt: u.CreatedAt}
}

func apiAuth(r chat.AuthResult) api.AuthResponse {
	return api.AuthResponse{
		User:        apiUser(r.User),
		AccessToken: r.Secret,
		TokenType:   api.AuthResponseTokenTypeBearer,
		ExpiresAt:   r.Token.ExpiresAt,
	}
}

func apiToken(t chat.Token) api.APIToken {
	return api.APIToken{ID: t.ID, Name: t.Name, CreatedAt: t.CreatedAt,
		ExpiresAt: t.ExpiresAt, LastUsedAt: t.LastUsedAt}
}

func apiTokens(ts []chat.Token) []api.APIToken {
	out := make([]api.APIToken, len(ts))
	for i, t := range ts {
		out[i] = apiToken(t)
	}
	return out
}

func apiTokenCreated(iss chat.Issued) api.APITokenCreated {
	t := iss.Token
	return api.APITokenCreated{ID: t.ID, Name: t.Name, AccessToken: iss.Secret,
		CreatedAt: t.CreatedAt, ExpiresAt: t.ExpiresAt, LastUsedAt: t.LastUsedAt}
}

func apiConversation(c chat.Conversation) api.Conversation {
	out := api.Conversation{
		ID:             c.ID,
		Type:           api.ConversationType(c.Type),
		Title:          c.Title,
		CreatedAt:      c.CreatedAt,
		LastSeq:        c.LastSeq,
		LastReadSeq:    c.LastReadSeq,
		UnreadCount:    c.UnreadCount,
		LastActivityAt: c.LastActivityAt,
		MemberCount:    c.MemberCount,
	}
	if c.Type == chat.Direct {
		out.Title = "" // a direct conversation has no title, whatever is stored
		if c.PeerID != "" {
			peer := c.PeerID
			out.PeerID = &peer
		}
	}
	if c.LastMessage != nil {
		m := apiMessage(*c.LastMessage)
		out.LastMessage = &m
	}
	return out
}

func apiConversations(cs []chat.Conversation) []api.Conversation {
	out := make([]api.Conversation, len(cs))
	for i, c := range cs {
		out[i] = apiConversation(c)
	}
	return out
}

func apiMessage(m chat.Message) api.Message {
	out := api.Message{
		ID:             m.ID,
		ConversationID: m.ConversationID,
		Seq:            m.Seq,
		SenderID:       m.SenderID,
		Text:           m.Text,
		CreatedAt:      m.CreatedAt,
		Metadata:       apiMetadata(m.Metadata),
	}
	if m.ClientMsgID != "" {
		id := m.ClientMsgID
		out.ClientMsgID = &id
	}
	return out
}

// apiMetadata passes stored metadata through as raw JSON, so numbers keep
// their exact value; absent metadata stays absent.
func apiMetadata(raw json.RawMessage) *json.RawMessage {
	t := bytes.TrimSpace(raw)
	if len(t) == 0 || t[0] != '{' || !json.Valid(t) {
		return nil // none, or not an object: a corrupt row is served without it
	}
	return &raw
}

func apiMessages(ms []chat.Message) []api.Message {
	out := make([]api.Message, len(ms))
	for i, m := range ms {
		out[i] = apiMessage(m)
	}
	return out
}

func apiMember(m chat.Member) api.Member {
	return api.Member{UserID: m.UserID, Role: api.MemberRole(m.Role), JoinedAt: m.JoinedAt}
}

func apiMembers(ms []chat.Member) []api.Member {
	out := make([]api.Member, len(ms))
	for i, m := range ms {
		out[i] = apiMember(m)
	}
	return out
}

func apiPresence(p chat.PresenceInfo) api.Presence {
	return api.Presence{UserID: p.UserID, Online: p.Online, LastSeenAt: p.LastSeenAt}
}

func apiPresences(ps []chat.PresenceInfo) []api.Presence {
	out := make([]api.Presence, len(ps))
	for i, p := range ps {
		out[i] = apiPresence(p)
	}
	return out
}

func apiReadState(rs chat.ReadState) api.ReadState {
	return api.ReadState{LastReadSeq: rs.LastReadSeq, UnreadCount: rs.UnreadCount}
}

// apiCursor maps the domain's "" (last page) to null.
func apiCursor(c string) *string {
	if c == "" {
		return nil
	}
	return &c
}
