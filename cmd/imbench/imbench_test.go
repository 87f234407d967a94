package main

import (
	"bytes"
	"context"
	"encoding/json"
	"net/url"
	"os"
	"runtime"
	"strconv"
	"strings"
	"testing"

	"github.com/stretchr/testify/require"
)

// runTool runs the tool against the fake and returns its JSON summary, the
// error run returned, and the table it wrote.
func runTool(t *testing.T, srvURL string, args ...string) (summary, error, string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), testTimeout)
	defer cancel()
	var stdout, stderr bytes.Buffer
	args = append([]string{"--url", srvURL, "--admin-token", "admin-secret", "--timeout", testTimeout.String()}, args...)
	err := run(ctx, args, &stdout, &stderr)
	lines := strings.Split(strings.TrimSpace(stdout.String()), "\n")
	require.Len(t, lines, 1, "one JSON line on stdout; stderr:\n%s", stderr.String())
	var s summary
	require.NoError(t, json.Unmarshal([]byte(lines[0]), &s), lines[0])
	return s, err, stderr.String()
}

// TestFanoutCountsInjectedFaults: a server that drops, duplicates and
// reorders given deliveries is reported with exactly those counts, and the
// run fails.
func TestFanoutCountsInjectedFaults(t *testing.T) {
	f, srv := newFakeIMD(t)
	// Users are tf-u0000 … tf-u0004; u0000 owns the group. 20 messages.
	// None touches seq 20: the drain ends at each stream's last message.
	f.fault("tf-u0001", 3, drop)
	f.fault("tf-u0002", 10, drop)
	f.fault("tf-u0003", 5, dup)
	f.fault("tf-u0000", 6, dup)
	f.fault("tf-u0004", 12, dup)
	f.fault("tf-u0004", 7, reorder) // 7 arrives after 8
	f.fault("tf-u0001", 15, reorder)

	s, err, table := runTool(t, srv.URL, "--scenario", "fanout", "--prefix", "tf",
		"--members", "5", "--senders", "2", "--messages", "20", "--duration", "1m", "--rate", "0")
	require.ErrorIs(t, err, errChecks)
	require.False(t, s.OK)
	require.Equal(t, int64(20), s.SendsAccepted)
	require.Equal(t, int64(2), s.Missing)
	require.Equal(t, int64(3), s.Duplicates)
	require.Equal(t, int64(2), s.OutOfOrder)
	require.Equal(t, int64(5*20-2+3), s.Deliveries)
	require.Zero(t, s.Unacknowledged)
	require.Zero(t, s.Unknown)
	require.Empty(t, s.ErrorsByStatus)
	require.True(t, s.Drained)
	require.Equal(t, 5, s.Streams)
	require.Contains(t, table, "FAILED")
}

// TestFanoutCleanReportsZeros: a well-behaved server passes.
func TestFanoutCleanReportsZeros(t *testing.T) {
	_, srv := newFakeIMD(t)
	s, err, _ := runTool(t, srv.URL, "--scenario", "fanout", "--members", "5", "--senders", "2", "--messages", "20", "--duration", "1m")
	require.NoError(t, err)
	require.True(t, s.OK)
	require.Equal(t, int64(20), s.SendsAccepted)
	require.Equal(t, int64(100), s.Deliveries)
	require.Zero(t, s.Missing+s.Duplicates+s.OutOfOrder+s.Unacknowledged+s.Unknown)
	require.Greater(t, s.LatencyMs.Max, 0.0)
	require.Equal(t, map[string]any{"url": srv.URL, "prefix": s.Params["prefix"], "rate": 0.0, "duration_s": 60.0,
		"messages": 20.0, "timeout_s": testTimeout.Seconds(), "members": 5.0, "senders": 2.0}, s.Params)
}

// TestFanoutBigGroupInChunks: a group larger than one request's member
// list is built with POST …/members (the fake caps bodies at 64 KiB too).
func TestFanoutBigGroupInChunks(t *testing.T) {
	_, srv := newFakeIMD(t)
	s, err, _ := runTool(t, srv.URL, "--scenario", "fanout", "--members", "1100", "--senders", "1", "--messages", "1",
		"--setup-concurrency", "64")
	require.NoError(t, err)
	require.Equal(t, int64(1100), s.Deliveries)
}

func TestDMClean(t *testing.T) {
	_, srv := newFakeIMD(t)
	s, err, _ := runTool(t, srv.URL, "--scenario", "dm", "--pairs", "7", "--senders", "3", "--messages", "40")
	require.NoError(t, err)
	require.Equal(t, int64(40), s.SendsAccepted)
	require.Equal(t, int64(40), s.Deliveries) // only the receivers stream
	require.Equal(t, 7, s.Streams)
	require.Zero(t, s.Missing+s.Duplicates+s.OutOfOrder)
}

func TestDMDropIsMissing(t *testing.T) {
	f, srv := newFakeIMD(t)
	// Pair 0 is (u0000, u0001); one sender sends its messages 1, 2, 3 … in
	// turn to pairs 0, 1, 0, 1 …, so pair 0 gets seqs 1..5.
	f.fault("td-u0001", 2, drop)
	s, err, _ := runTool(t, srv.URL, "--scenario", "dm", "--prefix", "td", "--pairs", "2", "--senders", "1", "--messages", "10")
	require.ErrorIs(t, err, errChecks)
	require.Equal(t, int64(1), s.Missing)
	require.Equal(t, int64(9), s.Deliveries)
}

func TestHotChecksHistory(t *testing.T) {
	_, srv := newFakeIMD(t)
	s, err, _ := runTool(t, srv.URL, "--scenario", "hot", "--members", "5", "--senders", "5", "--messages", "450")
	require.NoError(t, err)
	require.NotNil(t, s.SeqGaps)
	require.Zero(t, *s.SeqGaps)
	require.Equal(t, int64(450), *s.HistoryCount)
	require.Equal(t, int64(5*450), s.Deliveries)
}

func TestHotHistoryGapFails(t *testing.T) {
	f, srv := newFakeIMD(t)
	f.hideFromHistory[7] = true
	f.hideFromHistory[250] = true // on the second page
	s, err, _ := runTool(t, srv.URL, "--scenario", "hot", "--members", "3", "--senders", "3", "--messages", "300")
	require.ErrorIs(t, err, errChecks)
	require.Equal(t, int64(2), *s.SeqGaps)
	require.Equal(t, int64(298), *s.HistoryCount)
	require.Zero(t, s.Missing)
}

// TestReconnectResumes: every stream drops once while messages flow and
// resumes with Last-Event-ID, losing nothing.
func TestReconnectResumes(t *testing.T) {
	_, srv := newFakeIMD(t)
	s, err, _ := runTool(t, srv.URL, "--scenario", "reconnect", "--streams", "6", "--members", "3", "--senders", "2",
		"--rate", "300", "--duration", "600ms", "--waves", "2", "--down", "20ms")
	require.NoError(t, err)
	require.NotNil(t, s.Reconnects)
	require.Equal(t, int64(6), *s.Reconnects)
	require.Greater(t, s.SendsAccepted, int64(0))
	require.Equal(t, 3*s.SendsAccepted, s.Deliveries) // each message reaches its group's 3 streams, once
	require.Zero(t, s.Missing+s.Duplicates+s.OutOfOrder)
	require.NotNil(t, s.CatchupMs)
	require.Greater(t, s.CatchupMs.Max, 0.0)
}

// TestReconnectCountsFaults: a duplicate in the log is counted once,
// although the stream resumes after it.
func TestReconnectCountsFaults(t *testing.T) {
	f, srv := newFakeIMD(t)
	f.fault("tr-u0001", 2, dup)
	s, err, _ := runTool(t, srv.URL, "--scenario", "reconnect", "--prefix", "tr", "--streams", "4", "--members", "4",
		"--senders", "1", "--rate", "200", "--duration", "400ms", "--waves", "1", "--down", "10ms")
	require.ErrorIs(t, err, errChecks)
	require.Equal(t, int64(1), s.Duplicates)
	require.Zero(t, s.Missing)
}

func TestIdleReadsRSS(t *testing.T) {
	if runtime.GOOS != "linux" {
		t.Skip("reads /proc")
	}
	_, srv := newFakeIMD(t)
	s, err, _ := runTool(t, srv.URL, "--scenario", "idle", "--streams", "20")
	require.NoError(t, err)
	require.Equal(t, int64(20), s.StreamsReady)
	require.NotNil(t, s.RSSPerStreamKB)
	require.Equal(t, os.Getpid(), *s.ServerPID) // found from the port: the fake runs in this process
	require.Greater(t, *s.RSSAfterKB, int64(0))
}

func TestFindListener(t *testing.T) {
	if runtime.GOOS != "linux" {
		t.Skip("reads /proc")
	}
	_, srv := newFakeIMD(t)
	u, err := url.Parse(srv.URL)
	require.NoError(t, err)
	port, err := strconv.Atoi(u.Port())
	require.NoError(t, err)
	pid, err := findListener(port)
	require.NoError(t, err)
	require.Equal(t, os.Getpid(), pid)
	kb, err := readRSSKB(pid)
	require.NoError(t, err)
	require.Greater(t, kb, int64(0))
}

func TestSetupFailureIsReported(t *testing.T) {
	_, srv := newFakeIMD(t)
	ctx := context.Background()
	var stdout, stderr bytes.Buffer
	err := run(ctx, []string{"--url", srv.URL, "--admin-token", "wrong", "--scenario", "fanout", "--members", "3"}, &stdout, &stderr)
	require.ErrorContains(t, err, "setup")
	var s summary
	require.NoError(t, json.Unmarshal(stdout.Bytes(), &s))
	require.False(t, s.OK)
	require.Contains(t, s.Error, "401")
	require.Positive(t, s.ErrorsByStatus["401"])
}

// TestRefusedStreamsFailSetup: a stream the server refuses (4xx) before it
// was ever ready fails the setup at once instead of after --ready-timeout.
func TestRefusedStreamsFailSetup(t *testing.T) {
	f, srv := newFakeIMD(t)
	f.refuseStreams = true
	s, err, _ := runTool(t, srv.URL, "--scenario", "fanout", "--members", "3", "--ready-timeout", "10m")
	require.ErrorContains(t, err, "403")
	require.False(t, s.OK)
	require.Contains(t, s.Error, "streams refused")
	require.Positive(t, s.ErrorsByStatus["403"])
}

func TestRefusesRemoteTargets(t *testing.T) {
	for _, u := range []string{"http://192.0.2.1:8080", "http://example.com", "http://10.0.0.1"} {
		err := run(context.Background(), []string{"--url", u, "--admin-token", "x"}, new(bytes.Buffer), new(bytes.Buffer))
		require.ErrorContains(t, err, "--allow-remote", u)
	}
	for _, u := range []string{"http://127.0.0.1:1", "http://localhost:1", "http://[::1]:1", "https://127.0.0.2"} {
		require.NoError(t, checkTarget(u, false), u)
	}
	require.NoError(t, checkTarget("http://192.0.2.1:8080", true))
}
