//go:build !linux

package handlers

import (
	"context"
	"net"
)

// pollPeer: no shared watcher on this platform; watchPeer falls back to a
// goroutine per stream.
func pollPeer(net.Conn, context.CancelFunc) (func(), bool) { return nil, false }
