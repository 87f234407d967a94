package main

import (
	"context"
	"fmt"
	"net/http"
	"strconv"
	"strings"
	"testing"
	"time"

	"imd/internal/testenv"
)

// BenchmarkServicesLostLogRefill measures what a group costs when Redis has
// lost every user's log (a Redis restart without persistence): 1000
// members, 600 messages of history; then, per iteration, every offline:*
// key of the node is deleted and one more message is sent. A log that does
// not know where the conversation stands is filled from the store, from the
// conversation's oldest message still in the outbox (chat.fillGaps; up to
// 500 messages back before docs/performance.md item 29, so every member's
// new log held 501 entries where one does). The clock runs from the send
// until every member's log has the message.
//
// Reported: ms/refill, Redis CPU per refill (redis-cpu-ms, from INFO cpu:
// Redis' own CPU, whoever else uses it), and the entries one member's log
// holds after it. Services mode only (it deletes Redis keys). Run with a
// fixed count:
//
//	go test -run XXX -bench ServicesLostLogRefill -benchtime 3x ./cmd/imd/
func BenchmarkServicesLostLogRefill(b *testing.B) {
	if embeddedMode(b) {
		b.Skip("services mode only: it deletes the node's Redis keys")
	}
	const (
		members = 1000
		history = 600
		wait    = 60 * time.Second
	)
	c := newCluster(b)
	base := c.start(b, nodeOpts{}).URL
	hc := &http.Client{Timeout: 30 * time.Second, Transport: &http.Transport{MaxIdleConnsPerHost: 32}}
	rdb := rtRedis(b)
	ctx := context.Background()

	ids := make([]string, members)
	var owner string
	benchParallel(b, members, 20, func(i int) error {
		var u struct {
			ID string `json:"id"`
		}
		if _, err := benchPost(hc, base, testAdminToken, "/v1/admin/users", map[string]any{"username": fmt.Sprintf("refill-u%04d", i)}, 201, &u); err != nil {
			return err
		}
		ids[i] = u.ID
		if i == 0 {
			var tok struct {
				AccessToken string `json:"access_token"`
			}
			if _, err := benchPost(hc, base, testAdminToken, "/v1/admin/users/"+u.ID+"/tokens", map[string]any{"name": "bench"}, 201, &tok); err != nil {
				return err
			}
			owner = tok.AccessToken
		}
		return nil
	})
	var conv struct {
		ID string `json:"id"`
	}
	if _, err := benchPost(hc, base, owner, "/v1/conversations",
		map[string]any{"type": "group", "title": "refill", "member_ids": ids[1:]}, 201, &conv); err != nil {
		b.Fatal(err)
	}
	send := func(text string) (int64, error) {
		var m struct {
			Seq int64 `json:"seq"`
		}
		_, err := benchPost(hc, base, owner, "/v1/conversations/"+conv.ID+"/messages", map[string]any{"text": text}, 201, &m)
		return m.Seq, err
	}
	benchParallel(b, history, 10, func(i int) error {
		_, err := send(fmt.Sprintf("history %d, a typical short chat line", i))
		return err
	})

	// allHave waits until every member's log holds seq: its state of the
	// conversation (offline:conv:{uid}, realtime/log.go) has reached it.
	// Members are looked at in order and each only until it has it, so the
	// polling adds little to the Redis CPU measured.
	allHave := func(seq int64) {
		have := 0
		testenv.Eventually(b, wait, func() bool {
			for ; have < len(ids); have++ {
				s, err := rdb.HGet(ctx, c.prefix+"offline:conv:{"+ids[have]+"}", conv.ID).Result()
				if n, _ := strconv.ParseInt(s, 10, 64); err != nil || n < seq {
					return false
				}
			}
			return true
		}, "every member's log holds seq %d", seq)
	}
	allHave(history)
	redisCPU := func() time.Duration {
		info, err := rdb.Info(ctx, "cpu").Result()
		if err != nil {
			b.Fatal(err)
		}
		var total float64
		for _, line := range strings.Split(info, "\r\n") {
			if k, v, ok := strings.Cut(line, ":"); ok && (k == "used_cpu_sys" || k == "used_cpu_user") {
				f, _ := strconv.ParseFloat(v, 64)
				total += f
			}
		}
		return time.Duration(total * float64(time.Second))
	}

	var cpu time.Duration
	b.ResetTimer()
	for i := range b.N {
		b.StopTimer()
		if rtDeletePrefix(b, rdb, c.prefix+"offline:") == 0 {
			b.Fatal("no log keys to delete")
		}
		before := redisCPU()
		b.StartTimer()
		seq, err := send(fmt.Sprintf("after the loss %d", i))
		if err != nil {
			b.Fatal(err)
		}
		allHave(seq)
		b.StopTimer()
		cpu += redisCPU() - before
		b.StartTimer()
	}
	b.StopTimer()
	entries, err := rdb.LLen(ctx, c.prefix+"offline:{"+ids[members-1]+"}").Result()
	if err != nil {
		b.Fatal(err)
	}
	b.ReportMetric(float64(b.Elapsed().Milliseconds())/float64(b.N), "ms/refill")
	b.ReportMetric(float64(cpu.Milliseconds())/float64(b.N), "redis-cpu-ms/refill")
	b.ReportMetric(float64(entries), "entries/member")
}
