package store

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jmoiron/sqlx"

	"imd/chat"
	"imd/internal/testenv"
)

// Benchmarks of the send path, to quote messages per second per dialect:
//
//	go test -run '^$' -bench 'BenchmarkSend(ManyConversations)?$' -benchtime 3s ./store/
//
// BenchmarkSend puts every sender into one conversation, the worst case for
// G3 (every message takes the conversation's next seq, under its row lock on
// PostgreSQL, under the single writer on SQLite); BenchmarkSendManyConversations
// spreads them over many, as direct messages are. Sends are group-committed
// (committer.go): concurrent sends share a transaction and, on SQLite, its
// fsync (synchronous=FULL), so the rates depend on how many senders wait at
// once, which these benchmarks fix (benchSenders) rather than derive from
// GOMAXPROCS.

// benchParallelism × GOMAXPROCS senders run at once: enough to keep the
// database's queue full, as many clients of one busy group would.
const benchParallelism = 8

// benchSenders is the number of concurrent senders of BenchmarkSend and
// BenchmarkSendManyConversations: as many as clients of a busy node might
// have requests in flight at once (the load targets use 50–64).
const benchSenders = 64

// benchConversations is how many conversations BenchmarkSendManyConversations
// spreads its senders over: many more than a batch holds, so that batches
// rarely hold two messages of one conversation.
const benchConversations = 1000

func benchStores(b *testing.B) map[string]func(b *testing.B) *Store {
	return map[string]func(b *testing.B) *Store{
		"postgres": func(b *testing.B) *Store {
			var opts []Option
			if v := os.Getenv("IMD_BENCH_LANES"); v != "" {
				n, err := strconv.Atoi(v)
				if err != nil {
					b.Fatal(err)
				}
				opts = append(opts, WithSendLanes(n))
			}
			s, err := Open(context.Background(), testenv.DatabaseURL(b)+"&application_name="+benchAppName(), opts...)
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

// runSenders runs b.N sends spread over senders goroutines and reports
// msgs/s and the p50 and p99 of the time each send took.
func runSenders(b *testing.B, s *Store, senders int, send func(n int64) error) {
	before := batches(s)
	var cpu0 map[int]time.Duration
	if !s.d.sqlite() {
		cpu0 = backendCPUs(b, s)
	}
	var (
		lat  latencies
		next atomic.Int64
		wg   sync.WaitGroup
	)
	b.ResetTimer()
	start := time.Now()
	for range senders {
		wg.Go(func() {
			var mine []time.Duration
			defer func() { lat.add(mine) }()
			for {
				n := next.Add(1)
				if n > int64(b.N) {
					return
				}
				t0 := time.Now()
				if err := send(n); err != nil {
					b.Error(err)
					return
				}
				mine = append(mine, time.Since(t0))
			}
		})
	}
	wg.Wait()
	elapsed := time.Since(start)
	b.StopTimer()
	lat.report(b, "msgs", elapsed)
	if cpu0 != nil {
		if used := backendCPU(b, s, cpu0); used > 0 {
			b.ReportMetric(float64(used.Microseconds())/float64(b.N), "pg-cpu-us/msg")
		}
	}
	if n := batches(s) - before; n > 0 {
		b.ReportMetric(float64(b.N)/float64(n), "msgs/batch")
	}
}

// BenchmarkSend: concurrent senders, all into one conversation. senders=1
// is the latency of a lone send, which group commit must not make much worse.
func BenchmarkSend(b *testing.B) {
	for _, name := range []string{"postgres", "sqlite", "sqlite-1conn"} {
		for _, senders := range []int{1, benchSenders} {
			b.Run(fmt.Sprintf("%s/senders=%d", name, senders), func(b *testing.B) {
				s := benchStores(b)[name](b)
				benchSetup(b, s)
				ctx := context.Background()
				runSenders(b, s, senders, func(int64) error { return benchSend(ctx, s) })
			})
		}
	}
}

// BenchmarkSendManyConversations: benchSenders concurrent senders, each send
// into the next of benchConversations two-member conversations (as direct
// messages are), from either member.
func BenchmarkSendManyConversations(b *testing.B) {
	for _, name := range []string{"postgres", "sqlite"} {
		b.Run(fmt.Sprintf("%s/conversations=%d/senders=%d", name, benchConversations, benchSenders), func(b *testing.B) {
			s := benchStores(b)[name](b)
			benchSetupMany(b, s, benchConversations)
			ctx := context.Background()
			runSenders(b, s, benchSenders, func(n int64) error {
				id := benchIDs.Add(1)
				c := n % benchConversations
				sender := (c + n/benchConversations%2) % benchConversations // c's first or second member
				_, _, _, err := s.Send(ctx, chat.NewMessage{ID: fmt.Sprintf("b%d", id),
					ConversationID: fmt.Sprintf("c%d", c), SenderID: fmt.Sprintf("u%d", sender), Text: "hello",
					ClientMsgID: fmt.Sprintf("k%d", id), CreatedAt: chat.Now()})
				return err
			})
		})
	}
}

// benchSetupMany makes users u0…u(n-1) and conversations c0…c(n-1), where
// ci's members are ui and u(i+1 mod n), in one transaction (n CreateGroup
// calls would take n fsyncs on SQLite).
func benchSetupMany(b *testing.B, s *Store, n int) {
	ctx := context.Background()
	if err := s.Migrate(ctx); err != nil {
		b.Fatal(err)
	}
	now := chat.Now()
	err := s.inTx(ctx, func(tx *sqlx.Tx) error {
		for i := range n {
			if _, err := tx.ExecContext(ctx, `INSERT INTO users (id, display_name, created_at) VALUES ($1, $1, $2)`,
				fmt.Sprintf("u%d", i), now); err != nil {
				return err
			}
		}
		for i := range n {
			cid := fmt.Sprintf("c%d", i)
			if _, err := tx.ExecContext(ctx,
				`INSERT INTO conversations (id, type, title, created_at, last_seq, last_activity_at, member_count)
				 VALUES ($1, 'group', $1, $2, 0, $2, 2)`, cid, now); err != nil {
				return err
			}
			if _, err := tx.ExecContext(ctx,
				`INSERT INTO members (conversation_id, user_id, role, joined_at)
				 VALUES ($1, $2, 'owner', $4), ($1, $3, 'member', $4)`,
				cid, fmt.Sprintf("u%d", i), fmt.Sprintf("u%d", (i+1)%n), now); err != nil {
				return err
			}
		}
		return nil
	})
	if err != nil {
		b.Fatal(err)
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

// benchAppName is the application_name of a benchmark's PostgreSQL
// connections, which finds their backends (backendCPUs) among those of
// whatever else uses the server.
func benchAppName() string {
	return fmt.Sprintf("imdbench%d_%d", os.Getpid(), benchStoreNo.Add(1))
}

var benchStoreNo atomic.Int64

// backendCPUs is the CPU time used so far by each PostgreSQL backend of s's
// connections, by pid, read from /proc (the server runs on this machine in
// these benchmarks; nil if it does not).
func backendCPUs(b *testing.B, s *Store) map[int]time.Duration {
	var pids []int
	if err := s.db.Select(&pids,
		`SELECT pid FROM pg_stat_activity WHERE application_name = current_setting('application_name')`); err != nil {
		b.Fatal(err)
	}
	out := make(map[int]time.Duration, len(pids))
	for _, pid := range pids {
		raw, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
		if err != nil {
			return nil
		}
		// The fields after the command, which is in parentheses: utime and
		// stime are the 12th and 13th, in clock ticks (100 a second).
		_, rest, _ := strings.Cut(string(raw), ") ")
		f := strings.Fields(rest)
		if len(f) < 13 {
			return nil
		}
		ut, _ := strconv.ParseInt(f[11], 10, 64)
		st, _ := strconv.ParseInt(f[12], 10, 64)
		out[pid] = time.Duration(ut+st) * 10 * time.Millisecond
	}
	return out
}

// backendCPU is the CPU time s's backends used since cpu0 (backendCPUs).
func backendCPU(b *testing.B, s *Store, cpu0 map[int]time.Duration) time.Duration {
	cpu1 := backendCPUs(b, s)
	if cpu1 == nil {
		return 0
	}
	var used time.Duration
	for pid, t := range cpu1 {
		used += t - cpu0[pid]
	}
	return used
}
