package main

import (
	"bufio"
	"fmt"
	"net"
	"net/url"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"imd/internal/testenv"
)

// TestRealtimeSlowConsumerDisconnected: a client that opens a stream and
// never reads must be disconnected once a write to it blocks past the write
// timeout, so the server never buffers for it without bound (it resumes from
// its log when it comes back).
func TestRealtimeSlowConsumerDisconnected(t *testing.T) {
	t.Parallel()
	srv := newCluster(t).start(t, nodeOpts{env: map[string]string{"IMD_STREAM_WRITE_TIMEOUT": "500ms"}})
	alice := register(t, srv.URL, "alice")
	bob := register(t, srv.URL, "bob")
	r := alice.do("POST", "/v1/conversations", map[string]any{"type": "direct", "member_ids": []string{"bob"}})
	require.Equal(t, 201, r.Status)
	cid := r.M(t)["id"].(string)

	u, err := url.Parse(srv.URL)
	require.NoError(t, err)
	conn, err := net.Dial("tcp", u.Host)
	require.NoError(t, err)
	defer conn.Close()
	require.NoError(t, conn.(*net.TCPConn).SetReadBuffer(4096))
	_, err = fmt.Fprintf(conn, "GET /v1/events HTTP/1.1\r\nHost: %s\r\nAuthorization: Bearer %s\r\nAccept: text/event-stream\r\n\r\n", u.Host, bob.Token)
	require.NoError(t, err)
	// Read only the status line: the stream is open. From here on bob reads nothing.
	status, err := bufio.NewReader(conn).ReadString('\n')
	require.NoError(t, err)
	require.Contains(t, status, "200")

	online := func() bool {
		r := alice.do("GET", "/v1/presence?user_ids=bob", nil)
		require.Equal(t, 200, r.Status)
		var p struct {
			Presence []struct {
				Online bool `json:"online"`
			} `json:"presence"`
		}
		r.JSON(t, &p)
		return len(p.Presence) == 1 && p.Presence[0].Online
	}
	testenv.Eventually(t, 10*time.Second, online, "bob's stream is registered")

	// 16 KiB messages fill the socket buffers quickly; then writes block.
	text := strings.Repeat("x", 16000)
	sent := 0
	testenv.Eventually(t, 60*time.Second, func() bool {
		for range 20 {
			r := alice.do("POST", path("/v1/conversations/%s/messages", cid), map[string]any{"text": text})
			require.Equal(t, 201, r.Status, "%s", r.Body)
			sent++
		}
		return !online()
	}, "the stuck stream is disconnected")
	t.Logf("disconnected after %d messages of 16 KB", sent)
	// The handler is gone, not parked on the blocked write. (Draining our end
	// proves nothing here: with a receive buffer below the loopback MSS the
	// kernel's zero-window probing, not the server, paces what arrives.)
	r = newClient(t, srv.URL, "").do("GET", "/metrics", nil)
	require.Equal(t, 200, r.Status)
	require.Contains(t, string(r.Body), "\nimd_streams_open 0\n")
}
