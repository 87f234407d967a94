package main

import (
	"io"
	"strings"
	"testing"

	"github.com/stretchr/testify/require"
)

func TestParseMessage(t *testing.T) {
	for _, tc := range []struct {
		in   string
		want msgInfo
	}{
		{`{"id":"m_1","conversation_id":"c_1","seq":7,"sender_id":"a","text":"hi","metadata":{"t":1718000000123456789,"k":3,"n":42},"created_at":"x"}`,
			msgInfo{id: []byte("m_1"), conv: []byte("c_1"), seq: 7, t: 1718000000123456789, k: 3, n: 42, hasT: true}},
		// PostgreSQL jsonb style: spaces, keys reordered, extra keys, nesting.
		{` { "seq" : 9 , "metadata" : {"k": 1, "n": 2, "t": 5, "x": {"a":[1,{"b":"}"}]}} , "text":"a \"quoted\" } text","conversation_id" : "c_2", "id":"m_2"} `,
			msgInfo{id: []byte("m_2"), conv: []byte("c_2"), seq: 9, t: 5, k: 1, n: 2, hasT: true}},
		// Escapes in skipped strings, one right before the closing quote.
		{`{"text":"back\\","x":"q\"\\\"","id":"m_6","conversation_id":"c","seq":4}`,
			msgInfo{id: []byte("m_6"), conv: []byte("c"), seq: 4}},
		// No metadata: no send time.
		{`{"id":"m_3","conversation_id":"c","seq":1,"text":"x"}`, msgInfo{id: []byte("m_3"), conv: []byte("c"), seq: 1}},
		{`{"id":"m_4","conversation_id":"c","seq":2,"metadata":null}`, msgInfo{id: []byte("m_4"), conv: []byte("c"), seq: 2}},
		// Escapes and floats take the encoding/json path, same answer.
		{`{"id":"m\u005f5","conversation_id":"c","seq":3,"metadata":{"t":1.5e3}}`,
			msgInfo{id: []byte("m_5"), conv: []byte("c"), seq: 3, t: 1500, hasT: true}},
	} {
		var m msgInfo
		require.True(t, parseMessage([]byte(tc.in), &m), tc.in)
		require.Equal(t, tc.want, m, tc.in)
	}
	for _, bad := range []string{``, `{`, `{"id":}`, `[1]`, `{"seq":1}x`, `{"id":"a" "seq":1}`} {
		var m msgInfo
		require.False(t, parseMessage([]byte(bad), &m), bad)
	}
}

func TestParseMessageAllocatesNothing(t *testing.T) {
	in := []byte(`{"id":"m_1","conversation_id":"c_1","seq":7,"sender_id":"a","text":"imbench 1-2","metadata":{"t":1718000000123456789,"k":3,"n":42},"created_at":"2025-01-01T00:00:00.000Z"}`)
	var m msgInfo
	require.Zero(t, testing.AllocsPerRun(100, func() { parseMessage(in, &m) }))
}

type event struct{ typ, data, id string }

func readAll(t *testing.T, in string, size int) []event {
	t.Helper()
	r := newSSEReader(strings.NewReader(in), size)
	var out []event
	for {
		typ, data, id, err := r.next()
		if err == io.EOF {
			return out
		}
		require.NoError(t, err)
		out = append(out, event{string(typ), string(data), string(id)})
	}
}

func TestSSEReader(t *testing.T) {
	long := strings.Repeat("x", 300)
	in := "retry: 2000\n\n" +
		": ping\n\n" +
		"id: 1-1\nevent: message.created\ndata: {\"a\":1}\n\n" +
		"event: ready\r\ndata:{\"last_event_id\":\"1-1\"}\r\n\r\n" + // CRLF, no space after the colon
		"data: one\ndata: two\n\n" + // no event type; two data lines
		"id: 1-2\nevent: typing\n\n" + // no data: not dispatched, but the id sticks
		"event: message.created\ndata: " + long + "\n\n" + // longer than the buffer
		"id: 1-3\nevent: message.created\ndata: cut off" // the connection ends mid-block
	got := readAll(t, in, 64)
	require.Equal(t, []event{
		{"message.created", `{"a":1}`, "1-1"},
		{"ready", `{"last_event_id":"1-1"}`, "1-1"},
		{"message", "one\ntwo", "1-1"},
		{"message.created", long, "1-2"},
	}, got)
}

func TestSSEReaderAllocatesNothing(t *testing.T) {
	block := "id: 1718000000-42\nevent: message.created\ndata: {\"id\":\"m\",\"seq\":1}\n\n"
	in := strings.Repeat(block, 1000)
	sr := strings.NewReader(in)
	r := newSSEReader(sr, 4096)
	_, _, _, err := r.next() // warm the reusable buffers
	require.NoError(t, err)
	allocs := testing.AllocsPerRun(500, func() {
		if _, _, _, err := r.next(); err != nil {
			t.Fatal(err)
		}
	})
	require.Zero(t, allocs)
}

func TestAppendSendBody(t *testing.T) {
	b := appendSendBody(nil, 3, 42, 1718000000123456789)
	require.JSONEq(t, `{"text":"imbench 3-42","metadata":{"t":1718000000123456789,"k":3,"n":42}}`, string(b))
}

// The scan itself, not its encoding/json fallback, passes over escapes in
// the strings it skips, a quote among them.
func TestScanMessageSkipsEscapes(t *testing.T) {
	in := []byte(`{"text":"a \"quoted\" } text","x":"q\"\\\"","y":"back\\","id":"m_6","conversation_id":"c","seq":4}`)
	var m msgInfo
	require.True(t, scanMessage(in, &m))
	require.Equal(t, msgInfo{id: []byte("m_6"), conv: []byte("c"), seq: 4}, m)
}
