package main

import (
	"encoding/json"
	"fmt"
	"io"
	"math"
	"text/tabwriter"
	"time"
)

// report gathers a run's results and writes them: one JSON line for
// scripts (make bench, docs/performance.md) and a table for people.
type report struct {
	cfg *config
	e   *engine

	nofile         uint64
	setup          time.Duration
	setupErr       error
	streamsStarted bool
	drained        bool
	timedOut       bool
	rssBefore      int64
	rssAfter       int64
	histTotal      int64
	seqGaps        int64
	histErr        error
	// CPU times from the first send until drained (cpu.go); cpuErr says why
	// there are none.
	cpuBefore, cpuAfter cpuSample
	cpuWindow           time.Duration
	cpuErr              error

	// Totals over the streams, filled by collect.
	deliveries, missing, dups, ooo, unacked, unknown int64
	resyncs, drops, ends, ready                      int64
	lat, catchup                                     histogram
	lastRecv                                         int64
	collected                                        bool
}

// collect sums the streams' counters; they have all exited.
func (r *report) collect() {
	for _, s := range r.e.streams {
		r.deliveries += s.deliveries
		r.dups += s.dups
		r.ooo += s.ooo
		r.unknown += s.unknown
		r.resyncs += s.resyncs
		r.drops += s.drops
		r.ends += s.ends
		m, u := s.missing()
		r.missing += m
		r.unacked += u
		r.lat.merge(&s.lat)
		r.catchup.merge(&s.catchup)
		r.lastRecv = max(r.lastRecv, s.lastRecv)
		select {
		case <-s.ready:
			r.ready++
		default:
		}
	}
	r.collected = true
}

// ok is the exit status: setup worked and every check passed.
func (r *report) ok() bool {
	return r.setupErr == nil && r.collected && r.missing == 0 && r.dups == 0 && r.ooo == 0 &&
		r.seqGaps == 0 && r.histErr == nil
}

// summary is the JSON line. Scenario extras are pointers, left out when
// they do not apply.
type summary struct {
	Scenario       string           `json:"scenario"`
	OK             bool             `json:"ok"`
	Error          string           `json:"error,omitempty"`
	Params         map[string]any   `json:"params"`
	SendsAttempted int64            `json:"sends_attempted"`
	SendsAccepted  int64            `json:"sends_accepted"`
	SendsPerS      float64          `json:"sends_per_s"`
	SendLatencyMs  percentiles      `json:"send_latency_ms"`
	Deliveries     int64            `json:"deliveries"`
	DeliveriesPerS float64          `json:"deliveries_per_s"`
	LatencyMs      percentiles      `json:"latency_ms"`
	ErrorsByStatus map[string]int64 `json:"errors_by_status"`
	Missing        int64            `json:"missing"`
	Duplicates     int64            `json:"duplicates"`
	OutOfOrder     int64            `json:"out_of_order"`
	// Unacknowledged: delivered, but the send got no 2xx (e.g. it timed
	// out on the client); Unknown: a message of a conversation the stream
	// was not expected to carry. Reported, not failures.
	Unacknowledged int64   `json:"unacknowledged"`
	Unknown        int64   `json:"unknown"`
	Resyncs        int64   `json:"resyncs"`
	StreamEnds     int64   `json:"stream_ends"`
	Streams        int     `json:"streams"`
	StreamsReady   int64   `json:"streams_ready"`
	Drained        bool    `json:"drained"`
	TimedOut       bool    `json:"timed_out"`
	SetupS         float64 `json:"setup_s"`
	SendS          float64 `json:"send_s"`
	RlimitNofile   uint64  `json:"rlimit_nofile"`

	ServerPID      *int         `json:"server_pid,omitempty"`
	RSSBeforeKB    *int64       `json:"rss_before_kb,omitempty"`
	RSSAfterKB     *int64       `json:"rss_after_kb,omitempty"`
	RSSPerStreamKB *float64     `json:"rss_per_stream_kb,omitempty"`
	Reconnects     *int64       `json:"reconnects,omitempty"`
	CatchupMs      *percentiles `json:"catchup_ms,omitempty"`
	HistoryCount   *int64       `json:"history_messages,omitempty"`
	SeqGaps        *int64       `json:"seq_gaps,omitempty"`
	// CPU time per accepted send, in µs, and share of one core, from the
	// first send until drained: "server", "imbench" and each --cpu-procs
	// name (cpu.go); absent when the server is not local.
	CPUusPerMsg map[string]float64 `json:"cpu_us_per_msg,omitempty"`
	CPUPct      map[string]float64 `json:"cpu_pct,omitempty"`
	// Label is --label, for imbench summarize to tell modes (services,
	// embedded) apart: which backends a server uses is not visible through
	// the API. Last and omitted when empty, so lines without it are as before.
	Label string `json:"label,omitempty"`
}

func round(v float64, digits int) float64 {
	p := math.Pow(10, float64(digits))
	return math.Round(v*p) / p
}

func (r *report) summary() summary {
	c, e := r.cfg, r.e
	params := map[string]any{"url": c.url, "prefix": c.prefix, "rate": c.rate,
		"duration_s": c.duration.Seconds(), "messages": c.messages, "timeout_s": c.timeout.Seconds()}
	if c.settle > 0 {
		params["settle_s"] = c.settle.Seconds()
	}
	switch c.scenario {
	case "dm":
		params["pairs"], params["senders"] = c.pairs, min(c.senders, c.pairs)
	case "fanout", "hot":
		params["members"], params["senders"] = c.members, c.senders
	case "idle":
		params["streams"] = c.streams
		delete(params, "rate")
		delete(params, "messages")
		delete(params, "duration_s")
	case "reconnect":
		params["streams"], params["members"], params["senders"] = c.streams, c.members, c.senders
		params["waves"], params["down_ms"] = c.waves, c.down.Milliseconds()
	}
	s := summary{
		Scenario: c.scenario, OK: r.ok(), Params: params,
		SendsAttempted: e.sent.Load(), SendsAccepted: e.accepted.Load(),
		SendLatencyMs: e.sendLat.percentilesMs(),
		Deliveries:    r.deliveries, LatencyMs: r.lat.percentilesMs(),
		ErrorsByStatus: e.errs.snapshot(),
		Missing:        r.missing, Duplicates: r.dups, OutOfOrder: r.ooo,
		Unacknowledged: r.unacked, Unknown: r.unknown, Resyncs: r.resyncs, StreamEnds: r.ends,
		Streams: len(e.streams), StreamsReady: r.ready, Drained: r.drained, TimedOut: r.timedOut,
		SetupS: round(r.setup.Seconds(), 3), RlimitNofile: r.nofile, Label: c.label,
	}
	if r.setupErr != nil {
		s.Error = r.setupErr.Error()
	} else if r.histErr != nil {
		s.Error = "history: " + r.histErr.Error()
	}
	if d := e.sendEnd.Sub(e.sendStart); d > 0 {
		s.SendS = round(d.Seconds(), 3)
		s.SendsPerS = round(float64(s.SendsAccepted)/d.Seconds(), 1)
	}
	if r.lastRecv > 0 && !e.sendStart.IsZero() {
		if d := time.Duration(r.lastRecv - e.sendStart.UnixNano()); d > 0 {
			s.DeliveriesPerS = round(float64(r.deliveries)/d.Seconds(), 1)
		}
	}
	switch c.scenario {
	case "idle":
		if r.rssAfter > 0 {
			pid := c.serverPID
			s.ServerPID = &pid
			per := round(float64(r.rssAfter-r.rssBefore)/float64(c.streams), 2)
			s.RSSBeforeKB, s.RSSAfterKB, s.RSSPerStreamKB = &r.rssBefore, &r.rssAfter, &per
		}
	case "reconnect":
		s.Reconnects = &r.drops
		p := r.catchup.percentilesMs()
		s.CatchupMs = &p
	case "hot":
		s.HistoryCount, s.SeqGaps = &r.histTotal, &r.seqGaps
	}
	if r.cpuAfter != nil {
		s.CPUusPerMsg, s.CPUPct = cpuUse(r.cpuBefore, r.cpuAfter, s.SendsAccepted, r.cpuWindow.Seconds())
	}
	return s
}

func (r *report) write(stdout, stderr io.Writer) {
	s := r.summary()
	b, _ := json.Marshal(s)
	fmt.Fprintf(stdout, "%s\n", b)

	w := tabwriter.NewWriter(stderr, 0, 0, 2, ' ', 0)
	row := func(k string, format string, args ...any) {
		fmt.Fprintf(w, "%s\t"+format+"\n", append([]any{k}, args...)...)
	}
	pct := func(p percentiles) string {
		return fmt.Sprintf("p50 %.2f  p90 %.2f  p99 %.2f  max %.2f", p.P50, p.P90, p.P99, p.Max)
	}
	status := "OK"
	if !s.OK {
		status = "FAILED"
	}
	row("scenario", "%s  (%s)", s.Scenario, status)
	if s.Error != "" {
		row("error", "%s", s.Error)
	}
	row("streams", "%d (%d ready), setup %.1f s, RLIMIT_NOFILE %d", s.Streams, s.StreamsReady, s.SetupS, s.RlimitNofile)
	if c := r.cfg.scenario; c != "idle" {
		row("sends accepted", "%d of %d in %.2f s = %.0f/s", s.SendsAccepted, s.SendsAttempted, s.SendS, s.SendsPerS)
		row("send→ack ms", "%s", pct(s.SendLatencyMs))
		row("deliveries", "%d = %.0f/s", s.Deliveries, s.DeliveriesPerS)
		row("send→receive ms", "%s", pct(s.LatencyMs))
		row("missing / dup / out-of-order", "%d / %d / %d  (drained: %v)", s.Missing, s.Duplicates, s.OutOfOrder, s.Drained)
		row("unacknowledged / unknown / resyncs", "%d / %d / %d", s.Unacknowledged, s.Unknown, s.Resyncs)
	}
	if s.StreamEnds > 0 {
		row("streams ended by the server", "%d", s.StreamEnds)
	}
	if len(s.ErrorsByStatus) > 0 {
		line := ""
		for _, k := range sortedKeys(s.ErrorsByStatus) {
			line += fmt.Sprintf("%s: %d  ", k, s.ErrorsByStatus[k])
		}
		row("errors by status", "%s", line)
	}
	if s.RSSPerStreamKB != nil {
		row("server RSS", "%d KB → %d KB = %.1f KB per stream (pid %d)", *s.RSSBeforeKB, *s.RSSAfterKB, *s.RSSPerStreamKB, *s.ServerPID)
	}
	if s.Reconnects != nil {
		row("reconnects", "%d, catch-up ms %s", *s.Reconnects, pct(*s.CatchupMs))
	}
	if s.SeqGaps != nil {
		row("history", "%d messages, %d seq gaps", *s.HistoryCount, *s.SeqGaps)
	}
	if s.CPUPct != nil {
		line := ""
		for _, k := range sortedKeys(s.CPUPct) {
			if s.CPUusPerMsg != nil {
				line += fmt.Sprintf("%s %.0f µs (%.0f%%)  ", k, s.CPUusPerMsg[k], s.CPUPct[k])
			} else {
				line += fmt.Sprintf("%s %.0f%%  ", k, s.CPUPct[k])
			}
		}
		row("CPU per message (of a core)", "%s", line)
	} else if r.cpuErr != nil && r.cfg.scenario != "idle" {
		row("CPU per message", "not measured: %v", r.cpuErr)
	}
	if s.TimedOut {
		row("timed out", "after %s: partial results", r.cfg.timeout)
	}
	w.Flush()
}
