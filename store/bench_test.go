package store

import (
	"context"
	"fmt"
	"path/filepath"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"imd/chat"
	"imd/internal/testenv"
)

// Benchmarks of the send path, to quote messages per second per dialect:
//
//	go test -run '^$' -bench . -benchtime 3s ./store/
//
// All senders write into one conversation, the worst case for G3 (every
// send serialises on the conversation row lock, or on SQLite's one writer).
// Each send is its own transaction and, on SQLite, its own fsync
// (synchronous=FULL).

// benchParallelism × GOMAXPROCS senders run at once: enough to keep the
// database's queue full, as many clients of one busy group would.
const benchParallelism = 8

func benchStores(b *testing.B) map[string]func(b *testing.B) *Store {
	return map[string]func(b *testing.B) *Store{
		"postgres": func(b *testing.B) *Store {
			s, err := Open(context.Background(), testenv.DatabaseURL(b))
			if err != nil {
				b.Fatal(err)
			}
			b.Cleanup(func() { _ = s.Close() })
			return s
		},
		"sqlite": func(b *testing.B) *Store { return benchSQLite(b, sqliteReaders()) },
		// One pool of one connection for reads and writes alike.
		"sqlite-1conn": func(b *testing.B) *Store { return benchSQLite(b, 0) },
	}
}

func benchSQLite(b *testing.B, readers int) *Store {
	s, err := openSQLite(context.Background(), filepath.Join(b.TempDir(), "imd.db"), readers)
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { _ = s.Close() })
	return s
}

var benchMembers = []string{"u0", "u1", "u2", "u3", "u4"}

func benchSetup(b *testing.B, s *Store) {
	ctx := context.Background()
	if err := s.Migrate(ctx); err != nil {
		b.Fatal(err)
	}
	for _, id := range benchMembers {
		if err := s.CreateUser(ctx, chat.User{ID: id, DisplayName: id, CreatedAt: chat.Now()}); err != nil {
			b.Fatal(err)
		}
	}
	if _, _, err := s.CreateGroup(ctx, chat.NewGroup{ID: "g", Title: "bench", OwnerID: benchMembers[0],
		MemberIDs: benchMembers[1:], CreatedAt: chat.Now()}); err != nil {
		b.Fatal(err)
	}
}

// latencies collects per-operation durations from parallel goroutines.
type latencies struct {
	mu  sync.Mutex
	all []time.Duration
}

func (l *latencies) add(ds []time.Duration) {
	l.mu.Lock()
	l.all = append(l.all, ds...)
	l.mu.Unlock()
}

func (l *latencies) report(b *testing.B, unit string, elapsed time.Duration) {
	if len(l.all) == 0 {
		return
	}
	slices.Sort(l.all)
	q := func(p float64) float64 { return float64(l.all[int(p*float64(len(l.all)-1))].Microseconds()) / 1000 }
	b.ReportMetric(float64(len(l.all))/elapsed.Seconds(), unit+"/s")
	b.ReportMetric(q(0.50), unit+"-p50-ms")
	b.ReportMetric(q(0.99), unit+"-p99-ms")
}

var benchIDs atomic.Int64

func benchSend(ctx context.Context, s *Store) error {
	n := benchIDs.Add(1)
	_, _, _, err := s.Send(ctx, chat.NewMessage{ID: fmt.Sprintf("b%d", n), ConversationID: "g",
		SenderID: benchMembers[n%int64(len(benchMembers))], Text: "hello", ClientMsgID: fmt.Sprintf("k%d", n),
		CreatedAt: chat.Now()})
	return err
}

// BenchmarkSend: parallel senders, one conversation, one transaction each.
func BenchmarkSend(b *testing.B) {
	for _, name := range []string{"postgres", "sqlite", "sqlite-1conn"} {
		b.Run(name, func(b *testing.B) {
			s := benchStores(b)[name](b)
			benchSetup(b, s)
			ctx := context.Background()
			var lat latencies
			b.SetParallelism(benchParallelism)
			b.ResetTimer()
			start := time.Now()
			b.RunParallel(func(pb *testing.PB) {
				var mine []time.Duration
				for pb.Next() {
					t0 := time.Now()
					if err := benchSend(ctx, s); err != nil {
						b.Error(err)
						return
					}
					mine = append(mine, time.Since(t0))
				}
				lat.add(mine)
			})
			lat.report(b, "msgs", time.Since(start))
		})
	}
}

// BenchmarkSendRequest: what one send request costs the store in the
// server: the reads that authenticate and authorise it (a user and a
// membership look-up, standing for the token and member checks on a cache
// miss), then the send. Parallel requests, one conversation.
func BenchmarkSendRequest(b *testing.B) {
	for _, name := range []string{"postgres", "sqlite", "sqlite-1conn"} {
		b.Run(name, func(b *testing.B) {
			s := benchStores(b)[name](b)
			benchSetup(b, s)
			ctx := context.Background()
			var lat latencies
			b.SetParallelism(benchParallelism)
			b.ResetTimer()
			start := time.Now()
			b.RunParallel(func(pb *testing.PB) {
				var mine []time.Duration
				for pb.Next() {
					t0 := time.Now()
					_, err := s.User(ctx, "u1")
					if err == nil {
						_, err = s.Member(ctx, "g", "u1")
					}
					if err == nil {
						err = benchSend(ctx, s)
					}
					if err != nil {
						b.Error(err)
						return
					}
					mine = append(mine, time.Since(t0))
				}
				lat.add(mine)
			})
			lat.report(b, "msgs", time.Since(start))
		})
	}
}

// BenchmarkSendWithReads: the same senders, and as many readers fetching the
// latest history page and the conversation view (what clients do on every
// new message) — whether reads wait for writes is what tells SQLite's two
// pools from one connection.
func BenchmarkSendWithReads(b *testing.B) {
	for _, name := range []string{"postgres", "sqlite", "sqlite-1conn"} {
		b.Run(name, func(b *testing.B) {
			s := benchStores(b)[name](b)
			benchSetup(b, s)
			ctx := context.Background()
			for range 100 { // a history to read
				if err := benchSend(ctx, s); err != nil {
					b.Fatal(err)
				}
			}
			var sends, reads latencies
			var turn atomic.Int64
			b.SetParallelism(benchParallelism)
			b.ResetTimer()
			start := time.Now()
			b.RunParallel(func(pb *testing.PB) {
				reader := turn.Add(1)%2 == 0
				var mine []time.Duration
				for pb.Next() {
					t0 := time.Now()
					var err error
					if reader {
						if _, _, err = s.Messages(ctx, "g", chat.HistoryQuery{Limit: 50}); err == nil {
							_, err = s.Conversation(ctx, "g", "u1")
						}
					} else {
						err = benchSend(ctx, s)
					}
					if err != nil {
						b.Error(err)
						return
					}
					mine = append(mine, time.Since(t0))
				}
				if reader {
					reads.add(mine)
				} else {
					sends.add(mine)
				}
			})
			elapsed := time.Since(start)
			sends.report(b, "msgs", elapsed)
			reads.report(b, "reads", elapsed)
		})
	}
}
