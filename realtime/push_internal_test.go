package realtime

import (
	"testing"

	"github.com/stretchr/testify/require"
)

// A wake-up's payload that does not parse is an empty wake-up (the stream
// reads its log), never a wrong event.
func TestParsePush(t *testing.T) {
	pb, err := parsePush("L ep 26:7 message.created {\"a\":1}\n25:8 receipt.read {\"b\":\"x:\"}")
	require.NoError(t, err)
	require.Equal(t, "ep", pb.epoch)
	require.EqualValues(t, 7, pb.first)
	require.Len(t, pb.events, 2)
	require.Equal(t, "ep-7", pb.events[0].ID)
	require.Equal(t, "{\"a\":1}\n", string(pb.events[0].Data))
	require.Equal(t, "ep-8", pb.events[1].ID)
	require.Equal(t, `{"b":"x:"}`, string(pb.events[1].Data))

	for _, bad := range []string{
		"L ", "L ep", "L ep ", "L ep 5", "L ep x:1 a b", "L ep 99:7 a b",
		"L ep 5:7 a b5:9 a b", // offsets not consecutive
		"L ep 3:7ab",          // not "<offset> <type> <data>"
	} {
		_, err := parsePush(bad)
		require.Error(t, err, "%q", bad)
	}
}
