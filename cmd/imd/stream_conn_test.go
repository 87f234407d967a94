package main

import (
	"bufio"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"imd/internal/testenv"
)

// streamGoneWithin is how soon a stream must end after its client went
// away: well under the 15 s heartbeat, whose write would notice it too.
const streamGoneWithin = 3 * time.Second

// rawStream opens GET /v1/events on a connection of its own and reads up to
// the ready event, so the stream is fully set up (presence online).
func rawStream(t *testing.T, base, token string) (*net.TCPConn, *http.Response) {
	t.Helper()
	u, err := url.Parse(base)
	require.NoError(t, err)
	c, err := net.Dial("tcp", u.Host)
	require.NoError(t, err)
	t.Cleanup(func() { c.Close() })
	_, err = fmt.Fprintf(c, "GET /v1/events HTTP/1.1\r\nHost: %s\r\nAuthorization: Bearer %s\r\nAccept: text/event-stream\r\n\r\n", u.Host, token)
	require.NoError(t, err)
	require.NoError(t, c.SetReadDeadline(time.Now().Add(10*time.Second)))
	res, err := http.ReadResponse(bufio.NewReader(c), nil)
	require.NoError(t, err)
	require.Equal(t, 200, res.StatusCode)
	require.Equal(t, "text/event-stream", res.Header.Get("Content-Type"))
	// The connection is the stream's: it closes after it.
	require.True(t, res.Close, "Connection: close")
	require.Equal(t, []string{"chunked"}, res.TransferEncoding)
	rd := bufio.NewReader(res.Body)
	for {
		line, err := rd.ReadString('\n')
		require.NoError(t, err, "reading up to the ready event")
		if line == "event: ready\n" {
			break
		}
	}
	require.NoError(t, c.SetReadDeadline(time.Time{}))
	res.Body = io.NopCloser(rd)
	return c.(*net.TCPConn), res
}

// TestStreamEndsWhenClientGoes: a client that closes, half-closes or resets
// its connection ends its stream within about a second, not at the next
// heartbeat: the stream's resources are freed (imd_streams_open) and the
// user goes offline for its peers.
func TestStreamEndsWhenClientGoes(t *testing.T) {
	t.Parallel()
	srv := newCluster(t).start(t, nodeOpts{})
	alice := register(t, srv.URL, "alice")
	for _, tc := range []struct {
		name string
		end  func(*net.TCPConn) error
	}{
		{"close", func(c *net.TCPConn) error { return c.Close() }},
		{"half-close", func(c *net.TCPConn) error { return c.CloseWrite() }},
		{"reset", func(c *net.TCPConn) error {
			if err := c.SetLinger(0); err != nil {
				return err
			}
			return c.Close()
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			name := "bob" + strings.ReplaceAll(tc.name, "-", "")
			bob := register(t, srv.URL, name)
			r := alice.do("POST", "/v1/conversations", map[string]any{"type": "direct", "member_ids": []string{name}})
			require.Equal(t, 201, r.Status, "%s", r.Body)
			online := func() bool {
				r := alice.do("GET", "/v1/presence?user_ids="+name, nil)
				require.Equal(t, 200, r.Status, "%s", r.Body)
				var p struct {
					Presence []struct {
						Online bool `json:"online"`
					} `json:"presence"`
				}
				r.JSON(t, &p)
				return len(p.Presence) == 1 && p.Presence[0].Online
			}

			c, _ := rawStream(t, srv.URL, bob.Token)
			require.True(t, online(), "online while the stream is open")
			require.Equal(t, 1, rtStreamsOpen(t, srv))

			require.NoError(t, tc.end(c))
			start := time.Now()
			testenv.Eventually(t, streamGoneWithin, func() bool { return rtStreamsOpen(t, srv) == 0 }, "the stream ended")
			testenv.Eventually(t, streamGoneWithin, func() bool { return !online() }, "offline")
			t.Logf("%s: stream ended and offline after %v", tc.name, time.Since(start).Round(time.Millisecond))
		})
	}
}

// TestStreamShutdownEndsCleanly: a graceful shutdown ends an open stream
// with a complete response (the last chunk), not a cut connection, so
// clients tell it from a network failure.
func TestStreamShutdownEndsCleanly(t *testing.T) {
	t.Parallel()
	srv := newCluster(t).start(t, nodeOpts{})
	bob := register(t, srv.URL, "bob")
	c, res := rawStream(t, srv.URL, bob.Token)
	require.NoError(t, c.SetReadDeadline(time.Now().Add(20*time.Second)))
	done := make(chan error, 1)
	go func() {
		_, err := io.ReadAll(res.Body)
		done <- err
	}()
	srv.stop(t)
	select {
	case err := <-done:
		require.NoError(t, err, "the body ends cleanly")
	case <-time.After(20 * time.Second):
		t.Fatal("the stream did not end with the shutdown")
	}
}
