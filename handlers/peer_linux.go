package handlers

import (
	"context"
	"log/slog"
	"net"
	"sync"
	"syscall"
)

// peerPoller watches the connections of all taken-over streams of the
// process for the client's end with one epoll instance and one goroutine,
// instead of a goroutine (and its stack) per stream blocked in a read that
// only ever returns at the end (docs/performance.md, "idle").
//
// Each connection is registered for EPOLLRDHUP (the peer's FIN; EPOLLHUP
// and EPOLLERR, a reset, are always reported) and not EPOLLIN, so bytes a
// client sends do not wake the watcher, and one-shot, so a level-triggered
// condition is reported once. An entry carries an id, not the descriptor:
// a descriptor number is reused as soon as a connection closes, an id is
// not while its entry is registered, so a report that races with a
// stream's end cancels nothing else.
type peerPoller struct {
	epfd int

	mu    sync.Mutex
	next  int32
	peers map[int32]context.CancelFunc
	dead  bool // epoll_wait failed: new streams use a goroutine each
}

var (
	peerPollerOnce sync.Once
	thePeerPoller  *peerPoller // nil: epoll unavailable
)

func sharedPeerPoller() *peerPoller {
	peerPollerOnce.Do(func() {
		fd, err := syscall.EpollCreate1(syscall.EPOLL_CLOEXEC)
		if err != nil {
			slog.Warn("epoll unavailable: one goroutine per event stream watches for disconnects", "err", err)
			return
		}
		thePeerPoller = &peerPoller{epfd: fd, peers: make(map[int32]context.CancelFunc)}
		go thePeerPoller.run()
	})
	return thePeerPoller
}

// pollPeer registers conn with the shared poller; false if it cannot (not
// a plain socket, or no epoll), and watchPeer falls back to a goroutine.
func pollPeer(conn net.Conn, cancel context.CancelFunc) (func(), bool) {
	sc, ok := conn.(syscall.Conn)
	if !ok {
		return nil, false
	}
	raw, err := sc.SyscallConn()
	if err != nil {
		return nil, false
	}
	p := sharedPeerPoller()
	if p == nil {
		return nil, false
	}
	p.mu.Lock()
	if p.dead {
		p.mu.Unlock()
		return nil, false
	}
	for {
		p.next++
		if _, used := p.peers[p.next]; !used {
			break
		}
	}
	id := p.next
	p.peers[id] = cancel
	p.mu.Unlock()

	var ctlErr error
	err = raw.Control(func(fd uintptr) {
		ev := syscall.EpollEvent{Events: syscall.EPOLLRDHUP | syscall.EPOLLONESHOT, Fd: id}
		ctlErr = syscall.EpollCtl(p.epfd, syscall.EPOLL_CTL_ADD, int(fd), &ev)
	})
	if err == nil {
		err = ctlErr
	}
	if err != nil {
		p.forget(id)
		return nil, false
	}
	return func() {
		// Before the close: a closed descriptor leaves the epoll set by
		// itself, but its number may already belong to another connection.
		_ = raw.Control(func(fd uintptr) {
			_ = syscall.EpollCtl(p.epfd, syscall.EPOLL_CTL_DEL, int(fd), nil)
		})
		p.forget(id)
	}, true
}

func (p *peerPoller) forget(id int32) {
	p.mu.Lock()
	delete(p.peers, id)
	p.mu.Unlock()
}

// run waits for ended connections for the life of the process; the wait
// blocks one thread, not a P.
func (p *peerPoller) run() {
	var evs [128]syscall.EpollEvent
	var ended []context.CancelFunc
	for {
		n, err := syscall.EpollWait(p.epfd, evs[:], -1)
		if err == syscall.EINTR {
			continue
		}
		p.mu.Lock()
		if err != nil {
			// Should not happen (EBADF, EINVAL). Give up on epoll: end every
			// watched stream (its client reconnects, watched by a goroutine)
			// rather than leave them unwatched.
			slog.Error("epoll_wait failed: event streams restart without it", "err", err)
			p.dead = true
			for _, c := range p.peers {
				ended = append(ended, c)
			}
			p.peers = nil
		} else {
			for _, ev := range evs[:n] {
				if c := p.peers[ev.Fd]; c != nil {
					ended = append(ended, c)
				}
			}
		}
		p.mu.Unlock()
		for i, c := range ended {
			c()
			ended[i] = nil
		}
		ended = ended[:0]
		if err != nil {
			return
		}
	}
}
