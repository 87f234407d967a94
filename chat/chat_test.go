package chat

import (
	"strings"
	"testing"
	"time"
)

func TestParsePosition(t *testing.T) {
	p, err := ParsePosition("k3x9a-42")
	if err != nil || p.Epoch != "k3x9a" || p.Offset != 42 {
		t.Fatalf("got %+v, %v", p, err)
	}
	if p.String() != "k3x9a-42" {
		t.Fatalf("round trip: %s", p.String())
	}
	for _, bad := range []string{"", "42", "-42", "abc-", "abc-x", "a-b-1", "abc--1", strings.Repeat("a", 130) + "-1"} {
		if _, err := ParsePosition(bad); err == nil {
			t.Errorf("%q parsed", bad)
		}
	}
}

func TestValidateSend(t *testing.T) {
	s := &Service{cfg: Config{}.withDefaults()}
	cases := []struct {
		req   SendRequest
		field string
	}{
		{SendRequest{Text: ""}, "text"},
		{SendRequest{Text: strings.Repeat("x", DefaultMaxTextBytes+1)}, "text"},
		{SendRequest{Text: "a\x00b"}, "text"},
		{SendRequest{Text: "\xff"}, "text"},
		{SendRequest{Text: "ok", Metadata: []byte(`[1]`)}, "metadata"},
		{SendRequest{Text: "ok", Metadata: []byte(`null`)}, "metadata"},
		{SendRequest{Text: "ok", Metadata: []byte(`"x"`)}, "metadata"},
		{SendRequest{Text: "ok", Metadata: []byte(` `)}, "metadata"},
		{SendRequest{Text: "ok", Metadata: []byte(`{"a":}`)}, "metadata"},
		{SendRequest{Text: "ok", Metadata: []byte(`{"a":1}{"b":2}`)}, "metadata"},
		{SendRequest{Text: "ok", Metadata: []byte(`{"a":1`)}, "metadata"},
		{SendRequest{Text: "ok", Metadata: []byte(`{"a":"` + strings.Repeat("x", DefaultMaxMetadata) + `"}`)}, "metadata"},
		{SendRequest{Text: "ok", Metadata: []byte(`{"a":"\u0000"}`)}, "metadata"},
		{SendRequest{Text: "ok", Metadata: []byte(`{"a":"x\\\u0000"}`)}, "metadata"},
		{SendRequest{Text: "ok", Metadata: []byte(`{"\u0000":1}`)}, "metadata"},
	}
	for _, c := range cases {
		err := s.validateSend(c.req)
		e := AsError(err)
		if err == nil || e.Code != CodeInvalid || e.Fields[0].Field != c.field {
			t.Errorf("%.40q: got %v, want invalid %s", c.req.Text, err, c.field)
		}
	}
	for _, md := range []string{`{}`, `{"k":1}`, " \n{\"k\":[1,{\"x\":null}]}\t", `{"k":1,"k":2}`,
		`{"k":"\\u0000"}`, `{"k":"\\\\u0000\u0001"}`} { // the text \u0000, not NUL
		if err := s.validateSend(SendRequest{Text: "ok", Metadata: []byte(md)}); err != nil {
			t.Errorf("metadata %q: %v", md, err)
		}
	}
	// 16384 bytes of multi-byte text is fine: the limit counts bytes.
	if err := s.validateSend(SendRequest{Text: strings.Repeat("é", DefaultMaxTextBytes/2), Metadata: []byte(`{"k":1}`)}); err != nil {
		t.Fatal(err)
	}
}

func TestActivityCursorAndPaging(t *testing.T) {
	t0 := time.UnixMilli(1_700_000_000_000).UTC()
	all := []Activity{{"c3", t0.Add(2 * time.Second)}, {"c2", t0}, {"c1", t0}, {"c0", t0.Add(-time.Second)}}
	p1 := pageActivities(all, nil, 2)
	if len(p1) != 2 || p1[1].ConversationID != "c2" {
		t.Fatalf("page 1: %+v", p1)
	}
	cur, err := decodeActivityCursor(encodeActivityCursor(p1[1]))
	if err != nil {
		t.Fatal(err)
	}
	p2 := pageActivities(all, cur, 2)
	if len(p2) != 2 || p2[0].ConversationID != "c1" || p2[1].ConversationID != "c0" {
		t.Fatalf("page 2 (ties broken by id): %+v", p2)
	}
	if _, err := decodeActivityCursor("!!"); !IsCode(err, CodeInvalid) {
		t.Fatalf("bad cursor: %v", err)
	}
}

func TestErrorCodes(t *testing.T) {
	if ErrorCode(nil) != CodeInternal || ErrorCode(Invalid("x", "y")) != CodeInvalid {
		t.Fatal("codes")
	}
	var v Validation
	if v.Err() != nil {
		t.Fatal("empty validation is an error")
	}
	v.Add("a", "bad")
	v.Add("b", "bad")
	e := AsError(v.Err())
	if len(e.Fields) != 2 || !strings.Contains(e.Message, "1 more") {
		t.Fatalf("%+v", e)
	}
}

// BenchmarkValidateSendMetadata: the checks of one send with the kind of
// metadata imbench sends (a timestamp and a tag).
func BenchmarkValidateSendMetadata(b *testing.B) {
	s := &Service{cfg: Config{}.withDefaults()}
	req := SendRequest{Text: "hello there, a typical chat line", Metadata: []byte(`{"sent_at_ns":1732790000000000000,"bench":"b1234567","n":42}`)}
	for b.Loop() {
		if err := s.validateSend(req); err != nil {
			b.Fatal(err)
		}
	}
}
