package chat

import (
	"strconv"
	"strings"
)

// Cursor is where a stream stands, and the event id it writes (opaque to
// clients, API.md): a position in its user's log and, for each conversation
// whose newest messages the stream delivered ahead of the log (the fan-out
// fast path, fanout.go), the seq up to which it did. Resuming from a cursor
// replays the log after the position but leaves out the messages of each
// conversation ahead at or below its seq: the stream delivered those
// already, and the log holds them further on. So a client that resumes
// from any event id it was given gets every message once (G4, G5), however
// far the log lagged behind the fast path when it left.
//
// Wire form: "<epoch>-<offset>", then "~<conversation id>.<seq>" per
// conversation ahead (at most maxAhead).
type Cursor struct {
	Pos   Position
	Ahead []Ahead
}

// Ahead is one conversation a stream delivered ahead of its log, up to Seq.
type Ahead struct {
	ConversationID string
	Seq            int64
}

// maxAhead bounds the conversations one cursor holds ahead of the log, and
// so the length of an event id (a Last-Event-ID header). A stream whose
// cursor is full delivers the messages of any other conversation from its
// log only.
const maxAhead = 4

// maxCursorLen bounds an event id a client hands back: a position (128)
// and maxAhead conversations of up to 64 characters with their seqs fit.
const maxCursorLen = 512

// String is the cursor's wire form.
func (c Cursor) String() string {
	return c.Pos.String() + aheadSuffix(c.Ahead)
}

// aheadSuffix is the part of a cursor's wire form after the position.
func aheadSuffix(ahead []Ahead) string {
	if len(ahead) == 0 {
		return ""
	}
	var b strings.Builder
	for _, a := range ahead {
		b.WriteByte('~')
		b.WriteString(a.ConversationID)
		b.WriteByte('.')
		b.WriteString(strconv.FormatInt(a.Seq, 10))
	}
	return b.String()
}

// ParseCursor parses an event id: a Position alone, or one with
// conversations ahead. A conversation listed twice, a seq that is not
// positive, or more than maxAhead of them is ErrBadPosition.
func ParseCursor(s string) (Cursor, error) {
	if len(s) > maxCursorLen {
		return Cursor{}, ErrBadPosition
	}
	parts := strings.Split(s, "~")
	pos, err := ParsePosition(parts[0])
	if err != nil {
		return Cursor{}, err
	}
	c := Cursor{Pos: pos}
	if len(parts)-1 > maxAhead {
		return Cursor{}, ErrBadPosition
	}
	for _, p := range parts[1:] {
		i := strings.LastIndexByte(p, '.')
		if i <= 0 || i > 64 || strings.IndexByte(p[:i], '.') >= 0 {
			return Cursor{}, ErrBadPosition
		}
		seq, err := strconv.ParseInt(p[i+1:], 10, 64)
		if err != nil || seq <= 0 {
			return Cursor{}, ErrBadPosition
		}
		cid := p[:i]
		for _, a := range c.Ahead {
			if a.ConversationID == cid {
				return Cursor{}, ErrBadPosition
			}
		}
		c.Ahead = append(c.Ahead, Ahead{ConversationID: cid, Seq: seq})
	}
	return c, nil
}
