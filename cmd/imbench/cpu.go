package main

import (
	"bytes"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
)

// CPU time per message: on a machine shared by the server, its databases
// and this tool, throughput and latency move with whatever else runs
// (±30 % from one day to the next here, docs/performance.md), while the
// CPU each process spends per message hardly does. So when the server is
// local, a run also reports the CPU time (user + system) that the server,
// the named processes (--cpu-procs: PostgreSQL and Redis by default) and
// this tool spent from the first send until the deliveries drained,
// divided by the accepted sends.

// userHZ is the unit of the times in /proc/<pid>/stat: USER_HZ, which
// Linux fixes at 100 for what it reports to user space, whatever the
// kernel's own tick rate.
const userHZ = 100

// cpuSample is the CPU time of each watched group, in ticks of userHZ.
type cpuSample map[string]int64

// cpuWatch says which processes a run measures: the server by pid, the
// tool itself, and every process whose name (comm) is in names.
type cpuWatch struct {
	serverPID int
	names     []string
	procDir   string // /proc; a directory of fake ones in tests
}

// sample reads the watched processes' CPU times. A process that ended
// since the last sample takes its time with it, and one that started
// counts from zero: PostgreSQL's backends are the pool's connections,
// which live as long as the run.
func (w cpuWatch) sample() (cpuSample, error) {
	s := cpuSample{}
	server, err := procTicks(filepath.Join(w.procDir, strconv.Itoa(w.serverPID), "stat"))
	if err != nil {
		return nil, fmt.Errorf("server pid %d: %w", w.serverPID, err)
	}
	s["server"] = server
	if self, err := procTicks(filepath.Join(w.procDir, "self", "stat")); err == nil {
		s["imbench"] = self
	}
	if len(w.names) == 0 {
		return s, nil
	}
	want := map[string]bool{}
	for _, n := range w.names {
		want[n] = true
		s[n] = 0
	}
	stats, _ := filepath.Glob(filepath.Join(w.procDir, "[0-9]*", "stat"))
	for _, f := range stats {
		b, err := os.ReadFile(f)
		if err != nil {
			continue // it ended meanwhile
		}
		comm, ticks, err := parseStat(b)
		if err == nil && want[comm] && filepath.Base(filepath.Dir(f)) != strconv.Itoa(w.serverPID) {
			s[comm] += ticks
		}
	}
	return s, nil
}

func procTicks(path string) (int64, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return 0, err
	}
	_, ticks, err := parseStat(b)
	return ticks, err
}

// parseStat returns the name and utime+stime of a /proc/<pid>/stat line:
// "pid (comm) state ppid …", where comm may itself hold spaces and
// parentheses (so the last ')' ends it) and utime and stime are the 14th
// and 15th fields.
func parseStat(b []byte) (comm string, ticks int64, err error) {
	open, end := bytes.IndexByte(b, '('), bytes.LastIndexByte(b, ')')
	if open < 0 || end < open {
		return "", 0, fmt.Errorf("malformed stat %q", b)
	}
	f := strings.Fields(string(b[end+1:])) // from the 3rd field, state
	if len(f) < 13 {
		return "", 0, fmt.Errorf("malformed stat %q", b)
	}
	ut, err1 := strconv.ParseInt(f[11], 10, 64)
	st, err2 := strconv.ParseInt(f[12], 10, 64)
	if err1 != nil || err2 != nil {
		return "", 0, fmt.Errorf("malformed stat %q", b)
	}
	return string(b[open+1 : end]), ut + st, nil
}

// cpuUse is what the groups spent between two samples: microseconds per
// accepted send (nil without sends), and percent of one core over window.
func cpuUse(before, after cpuSample, sends int64, windowS float64) (perMsg, pct map[string]float64) {
	pct = map[string]float64{}
	if sends > 0 {
		perMsg = map[string]float64{}
	}
	for k, a := range after {
		b, ok := before[k]
		if !ok {
			continue
		}
		sec := float64(a-b) / userHZ
		if perMsg != nil {
			perMsg[k] = round(sec*1e6/float64(sends), 1)
		}
		if windowS > 0 {
			pct[k] = round(sec*100/windowS, 1)
		}
	}
	return perMsg, pct
}
