package main

import (
	"os"
	"path/filepath"
	"runtime"
	"strconv"
	"testing"

	"github.com/stretchr/testify/require"
)

func TestParseStat(t *testing.T) {
	comm, ticks, err := parseStat([]byte("4242 (postgres) S 1 4242 4242 0 -1 4194560 100 0 0 0 1234 567 0 0 20 0 1 0 100 0 0\n"))
	require.NoError(t, err)
	require.Equal(t, "postgres", comm)
	require.Equal(t, int64(1234+567), ticks)

	// A name may hold spaces and parentheses: the last ')' ends it.
	comm, ticks, err = parseStat([]byte("7 (a (b) c) R 1 7 7 0 -1 0 0 0 0 0 3 4 0 0 20 0 1 0 100 0 0"))
	require.NoError(t, err)
	require.Equal(t, "a (b) c", comm)
	require.Equal(t, int64(7), ticks)

	for _, bad := range []string{"", "7 x", "7 (x) S 1 2 3", "7 (x) S 1 7 7 0 -1 0 0 0 0 0 u 4 0"} {
		_, _, err := parseStat([]byte(bad))
		require.Error(t, err, "%q", bad)
	}
}

// writeStat makes a fake /proc/<dir>/stat with utime u and stime s.
func writeStat(t *testing.T, proc, dir, comm string, u, s int) {
	t.Helper()
	require.NoError(t, os.MkdirAll(filepath.Join(proc, dir), 0o755))
	line := dir + " (" + comm + ") S 1 1 1 0 -1 0 0 0 0 0 " + strconv.Itoa(u) + " " + strconv.Itoa(s) + " 0 0 20 0 1 0 100 0 0\n"
	require.NoError(t, os.WriteFile(filepath.Join(proc, dir, "stat"), []byte(line), 0o644))
}

// The server is counted by pid, the tool as "imbench", and every process
// of a watched name summed under that name; the server never counts twice,
// whatever its name.
func TestCPUWatchSample(t *testing.T) {
	proc := t.TempDir()
	writeStat(t, proc, "100", "postgres", 10, 5) // the server, named like a watched group
	writeStat(t, proc, "200", "postgres", 20, 1)
	writeStat(t, proc, "201", "postgres", 2, 2)
	writeStat(t, proc, "300", "redis-server", 7, 0)
	writeStat(t, proc, "400", "bash", 99, 99)
	writeStat(t, proc, "self", "imbench", 3, 3)
	w := cpuWatch{serverPID: 100, names: []string{"postgres", "redis-server", "absent"}, procDir: proc}
	s, err := w.sample()
	require.NoError(t, err)
	require.Equal(t, cpuSample{"server": 15, "imbench": 6, "postgres": 25, "redis-server": 7, "absent": 0}, s)

	_, err = cpuWatch{serverPID: 999, procDir: proc}.sample()
	require.Error(t, err, "a server that is not there")
}

func TestCPUUse(t *testing.T) {
	before := cpuSample{"server": 100, "postgres": 50, "gone": 1}
	after := cpuSample{"server": 300, "postgres": 60, "new": 5}
	per, pct := cpuUse(before, after, 1000, 4)
	// 200 ticks = 2 s over 1000 sends = 2000 µs; 2 s of 4 s = 50 % of a core.
	require.Equal(t, map[string]float64{"server": 2000, "postgres": 100}, per)
	require.Equal(t, map[string]float64{"server": 50, "postgres": 2.5}, pct)
	per, pct = cpuUse(before, after, 0, 4)
	require.Nil(t, per, "no sends, no per-message figure")
	require.Equal(t, 50.0, pct["server"])
}

// Against a local server the JSON line has the CPU figures of every group.
func TestDMReportsCPU(t *testing.T) {
	if runtime.GOOS != "linux" {
		t.Skip("reads /proc")
	}
	_, srv := newFakeIMD(t)
	s, err, _ := runTool(t, srv.URL, "--scenario", "dm", "--pairs", "3", "--senders", "2", "--messages", "20",
		"--cpu-procs", "postgres, redis-server")
	require.NoError(t, err)
	for _, k := range []string{"server", "imbench", "postgres", "redis-server"} {
		require.Contains(t, s.CPUusPerMsg, k)
		require.GreaterOrEqual(t, s.CPUusPerMsg[k], 0.0, k)
		require.Contains(t, s.CPUPct, k)
	}
}
