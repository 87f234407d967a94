package handlers

import (
	"context"
	"crypto/sha256"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"imd/chat"
	"imd/realtime"
)

// fakeStore is just enough of chat.Store for the send path: the other
// methods are the nil embedded interface and panic if called. It counts
// token lookups so tests can see the auth cache at work.
type fakeStore struct {
	chat.Store
	mu      sync.Mutex
	tokens  map[[32]byte]chat.Token
	lookups atomic.Int64
	touches atomic.Int64
	seq     atomic.Int64
}

func newFakeStore() *fakeStore { return &fakeStore{tokens: map[[32]byte]chat.Token{}} }

func (f *fakeStore) addToken(secret string, t chat.Token) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.tokens[sha256.Sum256([]byte(secret))] = t
}

func (f *fakeStore) TokenByHash(_ context.Context, h []byte) (chat.Token, error) {
	f.lookups.Add(1)
	f.mu.Lock()
	defer f.mu.Unlock()
	t, ok := f.tokens[[32]byte(h)]
	if !ok {
		return chat.Token{}, chat.Errorf(chat.CodeNotFound, "token not found")
	}
	return t, nil
}

func (f *fakeStore) TouchToken(context.Context, string, time.Time) error {
	f.touches.Add(1)
	return nil
}

func (f *fakeStore) Send(_ context.Context, m chat.NewMessage) (chat.Message, bool, chat.Changed, error) {
	return chat.Message{ID: m.ID, ConversationID: m.ConversationID, Seq: f.seq.Add(1), SenderID: m.SenderID,
		Text: m.Text, Metadata: m.Metadata, ClientMsgID: m.ClientMsgID, CreatedAt: m.CreatedAt}, true, chat.Changed{}, nil
}

// TokensByID is the token cache's bulk read; it counts as lookups too.
func (f *fakeStore) TokensByID(_ context.Context, ids []string) ([]chat.Token, error) {
	f.lookups.Add(1)
	f.mu.Lock()
	defer f.mu.Unlock()
	var out []chat.Token
	for _, t := range f.tokens {
		if slices.Contains(ids, t.ID) {
			out = append(out, t)
		}
	}
	return out, nil
}

func (f *fakeStore) ClaimEvents(context.Context, time.Time, time.Duration, int) ([]chat.OutboxEvent, error) {
	return nil, nil
}

const benchSecret = "imd_benchbenchbenchbenchbenchbenchbenchbenc"

// newBenchServer is the real HTTP adapter and use cases over a fake store
// and the in-memory realtime adapter, so a benchmark measures imd's own
// request path and nothing of PostgreSQL or Redis.
func newBenchServer(tb testing.TB) (http.Handler, *fakeStore) {
	tb.Helper()
	st := newFakeStore()
	st.addToken(benchSecret, chat.Token{ID: "tok_bench", UserID: "alice", Kind: chat.TokenAPI})
	rt := realtime.NewMemory(realtime.Config{})
	tb.Cleanup(func() { _ = rt.Close() })
	log := slog.New(slog.NewTextHandler(io.Discard, nil))
	svc := chat.NewService(st, rt, nil, chat.Config{}, log, chat.Hooks{})
	ctx, cancel := context.WithCancel(context.Background())
	svc.Start(ctx)
	tb.Cleanup(func() { cancel(); svc.Wait() })
	s, err := New(svc, Config{}, log, nil)
	if err != nil {
		tb.Fatal(err)
	}
	return s.Handler(), st
}

// BenchmarkSendRequest is the HTTP layer of POST
// /v1/conversations/{id}/messages in-process: routing, metrics,
// authentication, validation against openapi.yaml, the strict handler and
// the JSON answer. The store is a fake, so what it measures is the
// per-request overhead imd adds around the database.
//
//	go test -run '^$' -bench SendRequest -benchmem ./handlers/
func BenchmarkSendRequest(b *testing.B) {
	h, _ := newBenchServer(b)
	body := `{"text":"hello there, this is a benchmark message","metadata":{"t":1732761600000000000}}`
	b.ReportAllocs()
	cpu0 := processCPU()
	b.RunParallel(func(pb *testing.PB) {
		for pb.Next() {
			req := httptest.NewRequest(http.MethodPost, "/v1/conversations/c_0123456789abcdefghij/messages", strings.NewReader(body))
			req.Header.Set("Authorization", "Bearer "+benchSecret)
			req.Header.Set("Content-Type", "application/json")
			w := httptest.NewRecorder()
			h.ServeHTTP(w, req)
			if w.Code != http.StatusCreated {
				b.Fatalf("status %d: %s", w.Code, w.Body)
			}
		}
	})
	// CPU time rather than wall time: other work on a shared machine
	// stretches ns/op, not this.
	b.ReportMetric(float64(processCPU()-cpu0)/float64(b.N), "cpu-ns/op")
}
