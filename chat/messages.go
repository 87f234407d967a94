package chat

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"strings"
	"unicode/utf8"
)

// SendRequest is a message to send.
type SendRequest struct {
	Text     string
	Metadata json.RawMessage // a JSON object, or empty
	// ClientMsgID is the idempotency key (body client_msg_id or the
	// Idempotency-Key header; both given must agree).
	ClientMsgID string
}

func (s *Service) validateSend(req SendRequest) error {
	var v Validation
	switch {
	case len(req.Text) == 0:
		v.Add("text", "must not be empty")
	case len(req.Text) > s.cfg.MaxTextBytes:
		v.Add("text", fmt.Sprintf("must be at most %d bytes", s.cfg.MaxTextBytes))
	case !utf8.ValidString(req.Text):
		v.Add("text", "must be valid UTF-8")
	case strings.ContainsRune(req.Text, 0):
		v.Add("text", "must not contain NUL characters")
	}
	if len(req.Metadata) > 0 {
		if !isJSONObject(req.Metadata) {
			v.Add("metadata", "must be a JSON object")
		} else if hasEscapedNUL(req.Metadata) {
			v.Add("metadata", `must not contain \u0000`)
		} else if len(req.Metadata) > s.cfg.MaxMetadata {
			v.Add("metadata", fmt.Sprintf("must be at most %d bytes serialized", s.cfg.MaxMetadata))
		}
	}
	if len(req.ClientMsgID) > 64 {
		v.Add("client_msg_id", "must be at most 64 characters")
	}
	return v.Err()
}

// isJSONObject reports whether b is one JSON object: valid JSON whose first
// token is '{' can be nothing else. Checked without decoding it (a map per
// send had been a few percent of a send's CPU, for a check).
func isJSONObject(b []byte) bool {
	b = bytes.TrimLeft(b, " \t\r\n")
	return len(b) > 0 && b[0] == '{' && json.Valid(b)
}

// hasEscapedNUL reports whether the JSON b has a \u0000 escape, which
// PostgreSQL's jsonb cannot store (and SQLite's JSON functions would): an
// occurrence preceded by an even number of backslashes of its own, not
// "\\u0000", the escaped backslash followed by the text u0000.
func hasEscapedNUL(b []byte) bool {
	for i := 0; ; {
		j := bytes.Index(b[i:], []byte(`\u0000`))
		if j < 0 {
			return false
		}
		at := i + j
		n := 0
		for k := at - 1; k >= 0 && b[k] == '\\'; k-- {
			n++
		}
		if n%2 == 0 {
			return true
		}
		i = at + 1
	}
}

// Send stores a message (G1: the answer comes after the commit) and
// dispatches it. A replay of the same idempotency key by the same sender
// returns the original with created=false (G2).
func (s *Service) Send(ctx context.Context, p Principal, cid string, req SendRequest) (Message, bool, error) {
	if err := s.validateSend(req); err != nil {
		return Message{}, false, err
	}
	// Membership is checked by the storing transaction itself (a cached
	// early "no" cost a Redis round trip on every send to save work only on
	// the rare send by a non-member).
	if err := s.checkSendRate(ctx, p.UserID); err != nil {
		return Message{}, false, err
	}
	return s.store1(ctx, p, cid, req)
}

func (s *Service) store1(ctx context.Context, p Principal, cid string, req SendRequest) (Message, bool, error) {
	m, created, ch, err := s.store.Send(ctx, NewMessage{
		ID: newID("m_"), ConversationID: cid, SenderID: p.UserID, Text: req.Text,
		Metadata: req.Metadata, ClientMsgID: req.ClientMsgID, CreatedAt: Now(),
	})
	if IsCode(err, CodeNotFound) {
		return m, false, notFound("conversation")
	}
	if err != nil {
		return m, false, err
	}
	if !s.sendsDispatched {
		s.sent(ch.Events)
	}
	return m, created, nil
}

// SendDirect sends to the direct conversation with a user, creating it if needed.
func (s *Service) SendDirect(ctx context.Context, p Principal, peer string, req SendRequest) (Message, bool, error) {
	if err := s.validateSend(req); err != nil {
		return Message{}, false, err
	}
	if err := s.checkSendRate(ctx, p.UserID); err != nil {
		return Message{}, false, err
	}
	c, _, err := s.direct(ctx, p, peer, "userId")
	if err != nil {
		return Message{}, false, err
	}
	return s.store1(ctx, p, c.ID, req)
}

// checkSendRate applies the per-user send limit across nodes. Redis being
// down must not fail sends (G6), so the limit then lets messages through.
func (s *Service) checkSendRate(ctx context.Context, uid string) error {
	if s.cfg.SendLimit.Rate <= 0 {
		return nil
	}
	ok, retry, err := s.rt.Allow(ctx, "send:"+uid, s.cfg.SendLimit, 1)
	if err != nil {
		s.log.Warn("send rate limit unavailable", "err", err)
		return nil
	}
	if !ok {
		return &Error{Code: CodeRateLimited, Message: "sending too fast, slow down", RetryAfter: retry}
	}
	return nil
}

// History returns a page of a conversation's messages, ascending by seq.
func (s *Service) History(ctx context.Context, p Principal, cid string, q HistoryQuery) ([]Message, bool, error) {
	if _, err := s.member(ctx, cid, p.UserID); err != nil {
		return nil, false, err
	}
	if q.BeforeSeq > 0 && q.After {
		return nil, false, Invalid("after_seq", "give before_seq or after_seq, not both")
	}
	q.Limit = clampLimit(q.Limit)
	return s.store.Messages(ctx, cid, q)
}

// GetMessage returns one message by seq.
func (s *Service) GetMessage(ctx context.Context, p Principal, cid string, seq int64) (Message, error) {
	if _, err := s.member(ctx, cid, p.UserID); err != nil {
		return Message{}, err
	}
	m, err := s.store.Message(ctx, cid, seq)
	if IsCode(err, CodeNotFound) {
		return m, notFound("message")
	}
	return m, err
}

// MarkRead moves the caller's read position forward; it never moves back.
func (s *Service) MarkRead(ctx context.Context, p Principal, cid string, seq int64) (ReadState, error) {
	if seq < 0 {
		return ReadState{}, Invalid("seq", "must not be negative")
	}
	rs, ch, err := s.store.MarkRead(ctx, cid, p.UserID, seq)
	if IsCode(err, CodeNotFound) {
		return rs, notFound("conversation")
	}
	if err != nil {
		return rs, err
	}
	s.disp.enqueue(ch.Events)
	return rs, nil
}

// Typing tells the other members that the caller is typing. It is ephemeral
// and coalesced: at most one event per user and conversation per
// TypingTTL/2; extra calls succeed without publishing.
func (s *Service) Typing(ctx context.Context, p Principal, cid string) error {
	if _, err := s.member(ctx, cid, p.UserID); err != nil {
		return err
	}
	l := Limit{Rate: 1, Period: s.cfg.TypingTTL / 2, Burst: 1}
	if ok, _, err := s.rt.Allow(ctx, "typing:"+p.UserID+":"+cid, l, 1); err != nil || !ok {
		return nil // Redis down or coalesced: typing is best effort
	}
	ids, err := s.members(ctx, cid)
	if err != nil {
		return err
	}
	others := make([]string, 0, len(ids))
	for _, id := range ids {
		if id != p.UserID {
			others = append(others, id)
		}
	}
	data, _ := json.Marshal(TypingEvent{ConversationID: cid, UserID: p.UserID, ExpiresInMS: s.cfg.TypingTTL.Milliseconds()})
	if err := s.rt.Publish(ctx, others, StreamEvent{Type: EventTyping, Data: data}); err != nil {
		s.log.Warn("publish typing", "err", err)
	}
	return nil
}

// Presence reports which of uids are online, limited to users who share a
// conversation with the caller; others are omitted, not refused.
func (s *Service) Presence(ctx context.Context, p Principal, uids []string) ([]PresenceInfo, error) {
	if len(uids) > MaxPageLimit {
		return nil, Invalid("user_ids", fmt.Sprintf("at most %d users", MaxPageLimit))
	}
	visible, err := s.store.SharingWith(ctx, p.UserID, dedupe(uids, ""))
	if err != nil {
		return nil, err
	}
	if len(visible) == 0 {
		return []PresenceInfo{}, nil
	}
	infos, err := s.rt.Lookup(ctx, visible)
	if err != nil {
		return nil, Unavailable("presence", err)
	}
	return infos, nil
}
