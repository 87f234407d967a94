package main

import (
	"bytes"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/stretchr/testify/require"
)

// line is a synthetic imbench JSON line; only what summarize reads.
func line(label, scenario string, ok bool, sendsPerS, delivPerS, p50, p99 float64, params string, extra string) string {
	l := fmt.Sprintf(`{"scenario":%q,"ok":%v,"params":{%s},"sends_attempted":1,"sends_per_s":%v,`+
		`"deliveries_per_s":%v,"latency_ms":{"p50":%v,"p90":0,"p99":%v,"max":0},"missing":0,"duplicates":0,"out_of_order":0%s`,
		scenario, ok, params, sendsPerS, delivPerS, p50, p99, extra)
	if label != "" {
		l += fmt.Sprintf(`,"label":%q`, label)
	}
	return l + "}"
}

// fanoutParams differ in url and prefix on every run, as real lines do.
func fanoutParams(run int, rate float64) string {
	return fmt.Sprintf(`"url":"http://127.0.0.1:%d","prefix":"b%04d","rate":%v,"duration_s":10,"messages":1500,"timeout_s":120,"members":1000,"senders":10`,
		40000+run, run, rate)
}

// table parses summarize's Markdown table: cells of each data row, keyed
// by the row's first three cells (mode, scenario, params) joined by " / ".
func table(t *testing.T, out string) (head []string, rows map[string][]string, order []string) {
	t.Helper()
	rows = map[string][]string{}
	var lines []string
	for l := range strings.SplitSeq(out, "\n") {
		if strings.HasPrefix(l, "| ") {
			lines = append(lines, l)
		}
	}
	require.GreaterOrEqual(t, len(lines), 2, out)
	split := func(l string) []string {
		c := strings.Split(strings.TrimSuffix(strings.TrimPrefix(l, "| "), " |"), " | ")
		return c
	}
	head = split(lines[0])
	for _, l := range lines[2:] {
		c := split(l)
		require.Len(t, c, len(head), l)
		k := strings.Join(c[:3], " / ")
		rows[k] = c
		order = append(order, k)
	}
	return head, rows, order
}

func col(t *testing.T, head, row []string, title string) string {
	t.Helper()
	for i, h := range head {
		if h == title {
			return row[i]
		}
	}
	t.Fatalf("no column %q in %q", title, head)
	return ""
}

func summarizeString(t *testing.T, input string, args ...string) (string, error) {
	t.Helper()
	var out, errOut bytes.Buffer
	err := summarize(args, strings.NewReader(input), &out, &errOut)
	return out.String(), err
}

const fanoutKey = "members=1000 senders=10 rate=max messages=1500 duration=10s"

// TestSummarizeMedianOdd: three runs whose url/prefix differ are one group,
// and each cell is the middle value, whatever the order of the runs.
func TestSummarizeMedianOdd(t *testing.T) {
	in := strings.Join([]string{
		line("services", "fanout", true, 300, 30000, 3, 30, fanoutParams(1, 0), ""),
		line("services", "fanout", true, 100, 10000, 1, 10, fanoutParams(2, 0), ""),
		line("services", "fanout", true, 200, 125000, 2, 248, fanoutParams(3, 0), ""),
	}, "\n")
	out, err := summarizeString(t, in)
	require.NoError(t, err, out)
	head, rows, _ := table(t, out)
	require.Len(t, rows, 1, out)
	r := rows["services / `fanout` / "+fanoutKey]
	require.NotNil(t, r, out)
	require.Equal(t, "3", col(t, head, r, "runs"))
	require.Equal(t, "200", col(t, head, r, "sends/s"))
	require.Equal(t, "30,000", col(t, head, r, "deliveries/s"))
	require.Equal(t, "2.00", col(t, head, r, "p50 ms"))
	require.Equal(t, "30.0", col(t, head, r, "p99 ms"))
	require.Equal(t, "–", col(t, head, r, "catch-up p99 ms"))
	require.Equal(t, "–", col(t, head, r, "RSS/stream KB"))
	require.NotContains(t, out, "flagged")
}

// TestSummarizeMedianEven: an even count takes the mean of the two middle
// values.
func TestSummarizeMedianEven(t *testing.T) {
	var ls []string
	for i, v := range []float64{400, 100, 300, 200} {
		ls = append(ls, line("embedded", "fanout", true, v, v*1000, v/100, v, fanoutParams(i, 0), ""))
	}
	out, err := summarizeString(t, strings.Join(ls, "\n"))
	require.NoError(t, err, out)
	head, rows, _ := table(t, out)
	r := rows["embedded / `fanout` / "+fanoutKey]
	require.NotNil(t, r, out)
	require.Equal(t, "4", col(t, head, r, "runs"))
	require.Equal(t, "250", col(t, head, r, "sends/s"))
	require.Equal(t, "250,000", col(t, head, r, "deliveries/s"))
	require.Equal(t, "2.50", col(t, head, r, "p50 ms"))
	require.Equal(t, "250", col(t, head, r, "p99 ms"))

	require.Equal(t, 2.5, median([]float64{4, 1, 3, 2}))
	require.Equal(t, 3.0, median([]float64{5, 1, 3}))
	require.Equal(t, 7.0, median([]float64{7}))
}

// TestSummarizeFailedRunIsFlagged: a run with lost messages is not part of
// the median, the runs column says so, it is listed with its reasons, and
// summarize fails.
func TestSummarizeFailedRunIsFlagged(t *testing.T) {
	bad := line("services", "fanout", false, 999999, 999999, 0.1, 0.1, fanoutParams(3, 0), "")
	bad = strings.Replace(bad, `"missing":0,"duplicates":0,"out_of_order":0`, `"missing":3,"duplicates":1,"out_of_order":2`, 1)
	in := strings.Join([]string{
		line("services", "fanout", true, 100, 10000, 1, 10, fanoutParams(1, 0), ""),
		line("services", "fanout", true, 200, 20000, 2, 20, fanoutParams(2, 0), ""),
		bad,
	}, "\n") + "\n"
	out, err := summarizeString(t, in)
	require.ErrorIs(t, err, errFlagged)
	head, rows, _ := table(t, out)
	r := rows["services / `fanout` / "+fanoutKey]
	require.NotNil(t, r, out)
	require.Equal(t, "**2 ok of 3**", col(t, head, r, "runs"))
	require.Equal(t, "150", col(t, head, r, "sends/s"), "median of the two passing runs only")
	require.Contains(t, out, "1 flagged run(s)")
	require.Contains(t, out, "stdin:3, prefix b0003: ok=false, missing=3, duplicates=1, out_of_order=2")
}

// TestSummarizeCountsWhatOKHides: a line that says ok but carries a loss
// (or lacks "ok", as the stub scripts/bench writes for a run that printed
// nothing) is flagged too; a group with no passing run shows dashes.
func TestSummarizeCountsWhatOKHides(t *testing.T) {
	lossy := strings.Replace(line("", "dm", true, 1, 1, 1, 1, `"pairs":10`, ""), `"out_of_order":0`, `"out_of_order":1`, 1)
	stub := `{"scenario":"hot","label":"embedded","error":"imbench printed no result (exit 1) | see log"}`
	out, err := summarizeString(t, lossy+"\n"+stub+"\n")
	require.ErrorIs(t, err, errFlagged)
	head, rows, _ := table(t, out)
	r := rows["– / `dm` / pairs=10"]
	require.NotNil(t, r, out)
	require.Equal(t, "**0 ok of 1**", col(t, head, r, "runs"))
	require.Equal(t, "–", col(t, head, r, "sends/s"))
	r = rows["embedded / `hot` / –"]
	require.NotNil(t, r, out)
	require.Equal(t, "**0 ok of 1**", col(t, head, r, "runs"))
	require.Contains(t, out, "out_of_order=1")
	require.Contains(t, out, `error: imbench printed no result (exit 1) \| see log`, "a | in a message must not split the cell")
}

// TestSummarizeMixedLabels: modes are separate rows, those of one scenario
// next to each other; different params are different rows; idle and
// reconnect show their own metrics.
func TestSummarizeMixedLabels(t *testing.T) {
	idle := func(label string, run int, kb float64) string {
		return fmt.Sprintf(`{"scenario":"idle","ok":true,"params":{"url":"u%d","prefix":"p%d","timeout_s":120,"streams":10000},"sends_per_s":0,"deliveries_per_s":0,"latency_ms":{},"rss_per_stream_kb":%v,"label":%q}`,
			run, run, kb, label)
	}
	reconnect := func(label string, run int, sends, catchup float64) string {
		return line(label, "reconnect", true, sends, 1, 1, 1,
			fmt.Sprintf(`"url":"u%d","prefix":"p%d","rate":500,"duration_s":10,"streams":2000,"members":100,"senders":50,"waves":4,"down_ms":200`, run, run),
			fmt.Sprintf(`,"reconnects":8000,"catchup_ms":{"p50":1,"p90":2,"p99":%v,"max":4}`, catchup))
	}
	in := strings.Join([]string{
		line("services", "fanout", true, 100, 125000, 118, 248, fanoutParams(1, 0), ""),
		line("services", "fanout", true, 50, 50000, 118, 248, fanoutParams(2, 50), ""),
		idle("services", 3, 44.25),
		reconnect("services", 4, 410, 836),
		line("embedded", "fanout", true, 500, 536000, 1, 2, fanoutParams(5, 0), ""),
		idle("embedded", 6, 30),
		reconnect("embedded", 7, 500, 100),
	}, "\n")
	out, err := summarizeString(t, in)
	require.NoError(t, err, out)
	head, rows, order := table(t, out)
	require.Equal(t, []string{"mode", "scenario", "params", "runs"}, head[:4])
	rateKey := "members=1000 senders=10 rate=50 messages=1500 duration=10s"
	recKey := "streams=2000 members=100 senders=50 rate=500 duration=10s waves=4 down=200ms"
	require.Equal(t, []string{
		"services / `fanout` / " + fanoutKey,
		"embedded / `fanout` / " + fanoutKey,
		"services / `fanout` / " + rateKey,
		"services / `idle` / streams=10000",
		"embedded / `idle` / streams=10000",
		"services / `reconnect` / " + recKey,
		"embedded / `reconnect` / " + recKey,
	}, order, out)
	require.Equal(t, "536,000", col(t, head, rows["embedded / `fanout` / "+fanoutKey], "deliveries/s"))
	require.Equal(t, "125,000", col(t, head, rows["services / `fanout` / "+fanoutKey], "deliveries/s"))
	r := rows["services / `idle` / streams=10000"]
	require.Equal(t, "44.2", col(t, head, r, "RSS/stream KB"))
	require.Equal(t, "–", col(t, head, r, "sends/s"))
	require.Equal(t, "–", col(t, head, r, "p99 ms"))
	r = rows["services / `reconnect` / "+recKey]
	require.Equal(t, "836", col(t, head, r, "catch-up p99 ms"))
	require.Equal(t, "410", col(t, head, r, "sends/s"))
	require.Equal(t, "–", col(t, head, r, "deliveries/s"))
}

// TestSummarizeFilesAndDefaultLabel: several files (and stdin as "-") are
// read together; --label tags lines that carry none; a line that is not
// JSON is an error naming its place.
func TestSummarizeFilesAndDefaultLabel(t *testing.T) {
	dir := t.TempDir()
	a, b := filepath.Join(dir, "a.jsonl"), filepath.Join(dir, "b.jsonl")
	require.NoError(t, os.WriteFile(a, []byte(line("", "hot", true, 2000, 100000, 5, 29, `"members":50`, "")+"\n\n"), 0o600))
	require.NoError(t, os.WriteFile(b, []byte(line("services", "hot", true, 4000, 200000, 5, 29, `"members":50`, "")+"\n"), 0o600))
	out, err := summarizeString(t, line("", "hot", true, 3000, 1, 1, 1, `"members":50`, ""), "--label", "services", a, b, "-")
	require.NoError(t, err, out)
	head, rows, _ := table(t, out)
	require.Len(t, rows, 1, out)
	r := rows["services / `hot` / members=50"]
	require.Equal(t, "3", col(t, head, r, "runs"))
	require.Equal(t, "3,000", col(t, head, r, "sends/s"))

	require.NoError(t, os.WriteFile(b, []byte(line("", "hot", true, 1, 1, 1, 1, "", "")+"\n{\"scenario\":\"hot\",\n"), 0o600))
	_, err = summarizeString(t, "", b)
	require.ErrorContains(t, err, "b.jsonl:2")
	_, err = summarizeString(t, "")
	require.ErrorContains(t, err, "no runs")
	_, err = summarizeString(t, `{"ok":true}`)
	require.ErrorContains(t, err, "stdin:1: not an imbench result")
}

// TestLabelInJSONLine: --label travels in the JSON line, and without it the
// line has no "label" key, as before the flag existed.
func TestLabelInJSONLine(t *testing.T) {
	for _, label := range []string{"embedded", ""} {
		cfg, err := parseFlags([]string{"--admin-token", "x", "--scenario", "idle", "--label", label}, &bytes.Buffer{})
		require.NoError(t, err)
		rep := &report{cfg: cfg, e: &engine{cfg: cfg, errs: &statusCounter{}}, collected: true}
		var stdout, stderr bytes.Buffer
		rep.write(&stdout, &stderr)
		var m map[string]any
		require.NoError(t, json.Unmarshal(stdout.Bytes(), &m))
		if label == "" {
			require.NotContains(t, m, "label")
			continue
		}
		require.Equal(t, label, m["label"])
		runs, err := readRuns(&stdout, "x", "")
		require.NoError(t, err)
		require.Equal(t, label, runs[0].Label)
	}
}

// The CPU columns: the server's median, and the median of the other
// watched processes' sum (the tool's own left out); a line without CPU
// figures (a remote server, an older tool) shows none.
func TestSummarizeCPU(t *testing.T) {
	cpu := func(server, pg, redis, tool float64) string {
		return fmt.Sprintf(`,"cpu_us_per_msg":{"server":%v,"postgres":%v,"redis-server":%v,"imbench":%v}`, server, pg, redis, tool)
	}
	in := strings.Join([]string{
		line("services", "fanout", true, 1, 1, 1, 1, fanoutParams(1, 0), cpu(210, 100, 50, 999)),
		line("services", "fanout", true, 1, 1, 1, 1, fanoutParams(2, 0), cpu(190, 120, 60, 999)),
		line("services", "fanout", true, 1, 1, 1, 1, fanoutParams(3, 0), cpu(200, 90, 40, 999)),
		line("remote", "fanout", true, 1, 1, 1, 1, fanoutParams(4, 0), ""),
	}, "\n")
	out, err := summarizeString(t, in)
	require.NoError(t, err, out)
	head, rows, _ := table(t, out)
	r := rows["services / `fanout` / "+fanoutKey]
	require.NotNil(t, r, out)
	require.Equal(t, "200", col(t, head, r, "server CPU µs/msg"))
	require.Equal(t, "150", col(t, head, r, "PG+Redis CPU µs/msg")) // sums 150, 180, 130
	r = rows["remote / `fanout` / "+fanoutKey]
	require.NotNil(t, r, out)
	require.Equal(t, "–", col(t, head, r, "server CPU µs/msg"))
	require.Equal(t, "–", col(t, head, r, "PG+Redis CPU µs/msg"))
}
