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

// Whether a call's entries fit one wake-up is decided by the exact size a
// wake-up would carry: "<length>:<type> <data>" each.
func TestFitWakeUp(t *testing.T) {
	entry := func(n int) *chat.LogEntry {
		return &chat.LogEntry{Type: chat.EventMessageCreated, ConversationID: "c", Seq: 1, Data: make([]byte, n)}
	}
	require.True(t, fitWakeUp([]*chat.LogEntry{entry(100), entry(pushSize / 2)}))
	require.False(t, fitWakeUp([]*chat.LogEntry{entry(100), entry(pushSize / 2), entry(pushSize / 2)}))
	exact := entry(pushSize - len(strconv.Itoa(pushSize)) - 1 - len(chat.EventMessageCreated) - 1)
	require.True(t, fitWakeUp([]*chat.LogEntry{exact}), "exactly pushSize")
	require.False(t, fitWakeUp([]*chat.LogEntry{entry(len(exact.Data) + 1)}), "one byte more")
}
