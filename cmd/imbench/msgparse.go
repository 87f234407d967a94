package main

import (
	"bytes"
	"encoding/json"
	"math"
)

// msgInfo is what the tool needs from a message object: which conversation
// and seq (to count), and the metadata the senders embedded (to time).
// id and conv alias the parsed buffer: valid until it is reused.
type msgInfo struct {
	id, conv []byte
	seq      int64
	t, k, n  int64 // metadata.t (unix nanos at send), .k (sender), .n (counter)
	hasT     bool
}

// parseMessage extracts msgInfo from a message object. A fan-out of a
// thousand streams puts hundreds of thousands of events a second through
// the tool on the same two cores as the server, so the common case is a
// hand-written scan that allocates nothing; anything it does not expect
// (escapes in the fields it reads, non-integer numbers) falls back to
// encoding/json, so odd but valid input is still read correctly.
func parseMessage(b []byte, m *msgInfo) bool {
	*m = msgInfo{}
	if scanMessage(b, m) {
		return true
	}
	*m = msgInfo{}
	var v struct {
		ID             string `json:"id"`
		ConversationID string `json:"conversation_id"`
		Seq            int64  `json:"seq"`
		Metadata       *struct {
			T *json.Number `json:"t"`
			K *json.Number `json:"k"`
			N *json.Number `json:"n"`
		} `json:"metadata"`
	}
	if json.Unmarshal(b, &v) != nil {
		return false
	}
	m.id, m.conv, m.seq = []byte(v.ID), []byte(v.ConversationID), v.Seq
	if md := v.Metadata; md != nil {
		num := func(n *json.Number) (int64, bool) {
			if n == nil {
				return 0, false
			}
			if i, err := n.Int64(); err == nil {
				return i, true
			}
			f, err := n.Float64()
			return int64(f), err == nil
		}
		m.t, m.hasT = num(md.T)
		m.k, _ = num(md.K)
		m.n, _ = num(md.N)
	}
	return true
}

// scanner walks JSON bytes; ok turns false at the first surprise.
type scanner struct {
	b  []byte
	i  int
	ok bool
}

func (s *scanner) ws() {
	for s.i < len(s.b) {
		switch s.b[s.i] {
		case ' ', '\t', '\n', '\r':
			s.i++
		default:
			return
		}
	}
}

func (s *scanner) expect(c byte) {
	s.ws()
	if s.i < len(s.b) && s.b[s.i] == c {
		s.i++
		return
	}
	s.ok = false
}

func (s *scanner) peek() byte {
	s.ws()
	if s.i < len(s.b) {
		return s.b[s.i]
	}
	s.ok = false
	return 0
}

// str reads a string without escapes (the ids and keys this tool reads
// have none); an escape makes the scan fail so the fallback decides.
func (s *scanner) str() []byte {
	s.expect('"')
	if !s.ok {
		return nil
	}
	// IndexByte rather than a loop over the bytes: the strings are most of
	// a message, and this is most of the tool's own work per event.
	j := bytes.IndexByte(s.b[s.i:], '"')
	if j < 0 || bytes.IndexByte(s.b[s.i:s.i+j], '\\') >= 0 {
		s.ok = false
		return nil
	}
	v := s.b[s.i : s.i+j]
	s.i += j + 1
	return v
}

// skipStr passes over the rest of a string whose opening quote is behind s.i.
func (s *scanner) skipStr() {
	for {
		j := bytes.IndexByte(s.b[s.i:], '"')
		if j < 0 {
			s.ok = false
			return
		}
		if k := bytes.IndexByte(s.b[s.i:s.i+j], '\\'); k >= 0 {
			s.i += k + 2 // the escape and the byte it escapes, which may be a quote
			if s.i > len(s.b) {
				s.ok = false
				return
			}
			continue
		}
		s.i += j + 1
		return
	}
}

// int reads an integer; a fraction or exponent fails the scan.
func (s *scanner) int() int64 {
	s.ws()
	neg := s.i < len(s.b) && s.b[s.i] == '-'
	if neg {
		s.i++
	}
	start := s.i
	var v int64
	for s.i < len(s.b) && s.b[s.i] >= '0' && s.b[s.i] <= '9' {
		if v > (math.MaxInt64-9)/10 {
			s.ok = false // too large for an int64: let the fallback decide
			return 0
		}
		v = v*10 + int64(s.b[s.i]-'0')
		s.i++
	}
	if s.i == start {
		s.ok = false
	}
	if s.i < len(s.b) {
		switch s.b[s.i] {
		case '.', 'e', 'E':
			s.ok = false
		}
	}
	if neg {
		v = -v
	}
	return v
}

// skip passes over one value of any kind.
func (s *scanner) skip() {
	switch s.peek() {
	case '"':
		s.i++
		s.skipStr()
	case '{', '[':
		depth := 0
		for s.i < len(s.b) {
			switch s.b[s.i] {
			case '{', '[':
				depth++
			case '}', ']':
				depth--
				if depth == 0 {
					s.i++
					return
				}
			case '"':
				s.skip()
				if !s.ok {
					return
				}
				continue
			}
			s.i++
		}
		s.ok = false
	default: // number, true, false, null
		start := s.i
		for s.i < len(s.b) {
			switch s.b[s.i] {
			case ',', '}', ']', ' ', '\t', '\n', '\r':
				if s.i == start {
					s.ok = false
				}
				return
			}
			s.i++
		}
	}
}

// object calls f for every key of an object, positioned at its value;
// f must consume the value.
func (s *scanner) object(f func(key []byte)) {
	s.expect('{')
	if s.peek() == '}' {
		s.i++
		return
	}
	for s.ok {
		key := s.str()
		s.expect(':')
		if !s.ok {
			return
		}
		f(key)
		if !s.ok {
			return
		}
		switch s.peek() {
		case ',':
			s.i++
		case '}':
			s.i++
			return
		default:
			s.ok = false
		}
	}
}

var (
	keyID   = []byte("id")
	keyConv = []byte("conversation_id")
	keySeq  = []byte("seq")
	keyMeta = []byte("metadata")
	keyT    = []byte("t")
	keyK    = []byte("k")
	keyN    = []byte("n")
)

func scanMessage(b []byte, m *msgInfo) bool {
	s := scanner{b: b, ok: true}
	s.object(func(key []byte) {
		switch {
		case bytes.Equal(key, keyID):
			m.id = s.str()
		case bytes.Equal(key, keyConv):
			m.conv = s.str()
		case bytes.Equal(key, keySeq):
			m.seq = s.int()
		case bytes.Equal(key, keyMeta) && s.peek() == '{':
			s.object(func(mk []byte) {
				switch {
				case bytes.Equal(mk, keyT) && s.peek() != '"':
					m.t, m.hasT = s.int(), true
				case bytes.Equal(mk, keyK) && s.peek() != '"':
					m.k = s.int()
				case bytes.Equal(mk, keyN) && s.peek() != '"':
					m.n = s.int()
				default:
					s.skip()
				}
			})
		default:
			s.skip()
		}
	})
	if s.ok {
		s.ws()
		s.ok = s.i == len(b)
	}
	return s.ok
}
