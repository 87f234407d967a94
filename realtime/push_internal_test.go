package realtime

import (
	"strconv"
	"testing"

	"github.com/stretchr/testify/require"

	"imd/chat"
)

// A wake-up's payload that does not parse is an empty wake-up (the stream
// reads its log), never a wrong event.
func TestParsePush(t *testing.T) {
	pb, err := parsePush("L ep 7 24:message.created {\"a\":1}\n23:receipt.read {\"b\":\"x:\"}")
	require.NoError(t, err)
	require.Equal(t, "ep", pb.epoch)
	require.EqualValues(t, 7, pb.first)
	require.Len(t, pb.events, 2)
	require.Equal(t, "ep-7", pb.events[0].ID)
	require.Equal(t, "{\"a\":1}\n", string(pb.events[0].Data))
	require.Equal(t, "ep-8", pb.events[1].ID)
	require.Equal(t, `{"b":"x:"}`, string(pb.events[1].Data))

	for _, bad := range []string{
		"L ", "L ep", "L ep ", "L ep 5", "L ep 5 ", "L ep x 3:a b", "L ep 0 3:a b",
		"L ep 5 x:a b", "L ep 5 99:a b",
		"L ep 5 2:ab", // not "<type> <data>"
	} {
		_, err := parsePush(bad)
		require.Error(t, err, "%q", bad)
	}
}

// A call's wake-ups carry its entries unless they cannot: every user takes
// all of them and they are more than pushSize. Then the wake-up form is
// left out of the call.
func TestCarries(t *testing.T) {
	entry := func(n int) *chat.LogEntry {
		return &chat.LogEntry{Type: chat.EventMessageCreated, ConversationID: "c", Seq: 1, Data: make([]byte, n)}
	}
	small, big1, big2 := entry(100), entry(pushSize/2), entry(pushSize/2)
	all := []*chat.LogEntry{small, big1, big2}
	takesAll := &userBatch{uid: "a", entries: all}
	takesSome := &userBatch{uid: "b", entries: []*chat.LogEntry{small}}

	require.True(t, carries([]*chat.LogEntry{small, big1}, []*userBatch{{uid: "a", entries: []*chat.LogEntry{small, big1}}}),
		"they fit")
	require.False(t, carries(all, []*userBatch{takesAll, takesAll}), "everyone takes them all, and they do not fit")
	require.True(t, carries(all, []*userBatch{takesAll, takesSome}), "b's one entry fits")
	// The exact wake-up size decides: "<length>:<type> <data>".
	exact := entry(pushSize - len(strconv.Itoa(pushSize)) - 1 - len(chat.EventMessageCreated) - 1)
	require.True(t, carries([]*chat.LogEntry{exact}, []*userBatch{{uid: "a", entries: []*chat.LogEntry{exact}}}))
	one := entry(len(exact.Data) + 1)
	require.False(t, carries([]*chat.LogEntry{one}, []*userBatch{{uid: "a", entries: []*chat.LogEntry{one}}}))
}
