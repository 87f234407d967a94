package chat_test

import (
	"context"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"imd/chat"
	"imd/internal/testenv"
)

// pingSink counts a stream's pings and drops its events.
type pingSink struct{ pings atomic.Int64 }

func (k *pingSink) Send([]chat.StreamEvent) error { return nil }
func (k *pingSink) Ping() error                   { k.pings.Add(1); return nil }

// TestStreamHeartbeatBackstop: a stream pings every heartbeat, and its
// backstop ends it once its token is revoked in the store even when the
// bus never says so (the revocation's Pub/Sub message lost), within
// backstopEvery heartbeats of a random phase.
func TestStreamHeartbeatBackstop(t *testing.T) {
	st := newTokenStore()
	st.add(secretA, chat.Token{ID: "t_a", UserID: "alice"})
	const beat = 20 * time.Millisecond
	svc := startNodeWith(t, st, newMemory(t), chat.Config{Heartbeat: beat})
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()

	streams := make([]*pingSink, 8)
	done := make(chan error, len(streams))
	for i := range streams {
		streams[i] = &pingSink{}
		go func() { done <- svc.Stream(ctx, chat.Principal{UserID: "alice", TokenID: "t_a"}, "", streams[i]) }()
	}
	testenv.Eventually(t, 10*time.Second, func() bool {
		for _, k := range streams {
			if k.pings.Load() < 3 {
				return false
			}
		}
		return true
	}, "every stream pings")
	select {
	case err := <-done:
		t.Fatalf("a stream ended while its token was valid: %v", err)
	default:
	}

	// Revoked in the store only: no end-of-token event on the bus.
	st.mu.Lock()
	for _, tok := range st.byHash {
		now := time.Now()
		tok.RevokedAt = &now
	}
	st.mu.Unlock()
	deadline := time.After(10 * time.Second)
	for range streams {
		select {
		case err := <-done:
			require.ErrorIs(t, err, chat.ErrStreamRevoked)
		case <-deadline:
			t.Fatal("a stream outlived its revoked token past its backstop")
		}
	}
}
