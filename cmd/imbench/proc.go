package main

import (
	"bufio"
	"bytes"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
)

// The idle scenario reads the server's memory from /proc, which only works
// when the server runs on this machine (Linux); nothing here talks to it.

// readRSSKB returns VmRSS of a process in KiB.
func readRSSKB(pid int) (int64, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0, err
	}
	for line := range bytes.Lines(b) {
		if rest, ok := bytes.CutPrefix(line, []byte("VmRSS:")); ok {
			f := strings.Fields(string(rest)) // "12345 kB"
			if len(f) >= 1 {
				return strconv.ParseInt(f[0], 10, 64)
			}
		}
	}
	return 0, fmt.Errorf("pid %d: no VmRSS in /proc/%d/status", pid, pid)
}

// findListener finds the process listening on a TCP port: the socket's
// inode from /proc/net/tcp{,6} (state 0A is LISTEN), then the process
// that holds a descriptor to it. It needs permission to read other
// processes' fd directories (same user or root).
func findListener(port int) (int, error) {
	inodes := map[string]bool{}
	for _, f := range []string{"/proc/net/tcp", "/proc/net/tcp6"} {
		file, err := os.Open(f)
		if err != nil {
			continue
		}
		sc := bufio.NewScanner(file)
		for sc.Scan() {
			fields := strings.Fields(sc.Text())
			if len(fields) < 10 || fields[3] != "0A" {
				continue
			}
			i := strings.LastIndexByte(fields[1], ':')
			p, err := strconv.ParseUint(fields[1][i+1:], 16, 16)
			if err != nil || int(p) != port {
				continue
			}
			inodes["socket:["+fields[9]+"]"] = true
		}
		file.Close()
	}
	if len(inodes) == 0 {
		return 0, fmt.Errorf("no listening socket on port %d in /proc/net/tcp", port)
	}
	fds, _ := filepath.Glob("/proc/[0-9]*/fd/*")
	for _, fd := range fds {
		if l, err := os.Readlink(fd); err == nil && inodes[l] {
			pid, err := strconv.Atoi(strings.Split(fd, "/")[2])
			if err == nil {
				return pid, nil
			}
		}
	}
	return 0, fmt.Errorf("no process found holding the socket listening on port %d (try --server-pid)", port)
}
