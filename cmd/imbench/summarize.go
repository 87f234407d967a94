package main

// imbench summarize turns the JSON lines of many runs into the table of
// docs/performance.md. The performance issue asks for medians of three
// runs, each on a fresh server (scripts/bench does the runs); one run on a
// shared machine varies by up to ±30 %, so a single number is not a result.

import (
	"bufio"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"slices"
	"sort"
	"strconv"
	"strings"
)

// errFlagged is summarize's exit status when any run failed its checks: the
// table is still printed, but a script must not take it for a clean result.
var errFlagged = errors.New("some runs failed their checks (listed under the table)")

// ignoredParams differ between identical runs (the random user prefix, the
// server's URL and port, the overall safety bound), so they do not split a
// group; every other param does, because it changes what was measured.
var ignoredParams = map[string]bool{"url": true, "prefix": true, "timeout_s": true}

// paramOrder is the order params are shown in: size first, then load.
var paramOrder = []string{"pairs", "streams", "members", "senders", "rate", "messages", "duration_s", "waves", "down_ms", "settle_s"}

// benchRun is one JSON line as summarize needs it. Fields are pointers where
// "absent" must differ from zero, so a line of another tool version or a
// stub written by scripts/bench for a run that printed nothing is flagged
// rather than counted as a zero.
type benchRun struct {
	Label          string             `json:"label"`
	Scenario       string             `json:"scenario"`
	OK             *bool              `json:"ok"`
	Error          string             `json:"error"`
	Params         map[string]any     `json:"params"`
	SendsPerS      float64            `json:"sends_per_s"`
	DeliveriesPerS float64            `json:"deliveries_per_s"`
	LatencyMs      percentiles        `json:"latency_ms"`
	Missing        int64              `json:"missing"`
	Duplicates     int64              `json:"duplicates"`
	OutOfOrder     int64              `json:"out_of_order"`
	TimedOut       bool               `json:"timed_out"`
	SeqGaps        *int64             `json:"seq_gaps"`
	RSSPerStreamKB *float64           `json:"rss_per_stream_kb"`
	CatchupMs      *percentiles       `json:"catchup_ms"`
	CPUusPerMsg    map[string]float64 `json:"cpu_us_per_msg"`

	where string // file:line, to find the run again
}

// problems lists why a run cannot be trusted; empty means it passed.
func (r *benchRun) problems() []string {
	var p []string
	if r.OK == nil || !*r.OK {
		p = append(p, "ok=false")
	}
	if r.Missing > 0 {
		p = append(p, fmt.Sprintf("missing=%d", r.Missing))
	}
	if r.Duplicates > 0 {
		p = append(p, fmt.Sprintf("duplicates=%d", r.Duplicates))
	}
	if r.OutOfOrder > 0 {
		p = append(p, fmt.Sprintf("out_of_order=%d", r.OutOfOrder))
	}
	if r.SeqGaps != nil && *r.SeqGaps > 0 {
		p = append(p, fmt.Sprintf("seq_gaps=%d", *r.SeqGaps))
	}
	if r.TimedOut {
		p = append(p, "timed_out")
	}
	if r.Error != "" {
		p = append(p, "error: "+r.Error)
	}
	return p
}

// paramKey is the canonical form of the params that matter, used both to
// group runs and to show the group.
func paramKey(params map[string]any) string {
	var keys []string
	for k := range params {
		if !ignoredParams[k] {
			keys = append(keys, k)
		}
	}
	rank := func(k string) int {
		if i := slices.Index(paramOrder, k); i >= 0 {
			return i
		}
		return len(paramOrder)
	}
	sort.Slice(keys, func(i, j int) bool {
		ri, rj := rank(keys[i]), rank(keys[j])
		if ri != rj {
			return ri < rj
		}
		return keys[i] < keys[j]
	})
	parts := make([]string, 0, len(keys))
	for _, k := range keys {
		v := params[k]
		switch k {
		case "rate":
			if f, ok := v.(float64); ok && f == 0 {
				parts = append(parts, "rate=max")
				continue
			}
		case "messages":
			if f, ok := v.(float64); ok && f == 0 {
				continue // no cap: the duration bounds the run
			}
		}
		name := k
		suffix := ""
		if n, ok := strings.CutSuffix(k, "_s"); ok {
			name, suffix = n, "s"
		} else if n, ok := strings.CutSuffix(k, "_ms"); ok {
			name, suffix = n, "ms"
		}
		s := fmt.Sprint(v)
		if f, ok := v.(float64); ok {
			s = strconv.FormatFloat(f, 'f', -1, 64)
		}
		parts = append(parts, name+"="+s+suffix)
	}
	return strings.Join(parts, " ")
}

// group is the runs of one (label, scenario, params).
type group struct {
	label, scenario, params string
	runs                    []*benchRun
	passed                  []*benchRun
}

// median of the values; the mean of the two middle ones for an even count.
func median(v []float64) float64 {
	if len(v) == 0 {
		return 0
	}
	s := slices.Clone(v)
	slices.Sort(s)
	n := len(s)
	if n%2 == 1 {
		return s[n/2]
	}
	return (s[n/2-1] + s[n/2]) / 2
}

// medianOf is the median of f over the group's passing runs; ok is false
// when no passing run has the metric. Failed runs never enter a median:
// a run that lost messages measured a different (broken) system, and its
// numbers would silently move the result. They are counted in the runs
// column and listed under the table instead.
func (g *group) medianOf(f func(*benchRun) (float64, bool)) (float64, bool) {
	var v []float64
	for _, r := range g.passed {
		if x, ok := f(r); ok {
			v = append(v, x)
		}
	}
	if len(v) == 0 {
		return 0, false
	}
	return median(v), true
}

// readRuns parses JSON lines; blank lines are skipped, anything else that
// does not parse is an error (a truncated results file should be noticed).
func readRuns(r io.Reader, name string, defaultLabel string) ([]*benchRun, error) {
	var runs []*benchRun
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 64*1024), 16*1024*1024)
	line := 0
	for sc.Scan() {
		line++
		text := strings.TrimSpace(sc.Text())
		if text == "" {
			continue
		}
		br := &benchRun{}
		if err := json.Unmarshal([]byte(text), br); err != nil {
			return nil, fmt.Errorf("%s:%d: %w", name, line, err)
		}
		if br.Scenario == "" {
			return nil, fmt.Errorf("%s:%d: not an imbench result (no scenario)", name, line)
		}
		if br.Label == "" {
			br.Label = defaultLabel
		}
		br.where = fmt.Sprintf("%s:%d", name, line)
		runs = append(runs, br)
	}
	if err := sc.Err(); err != nil {
		return nil, fmt.Errorf("%s: %w", name, err)
	}
	return runs, nil
}

// groupRuns groups in order of first appearance of (scenario, params), then
// of the label, so the modes of one scenario sit next to each other as in
// docs/performance.md, whatever order the runs came in.
func groupRuns(runs []*benchRun) []*group {
	var groups []*group
	byKey := map[[3]string]*group{}
	caseRank, labelRank := map[[2]string]int{}, map[string]int{}
	for _, r := range runs {
		pk := paramKey(r.Params)
		ck := [2]string{r.Scenario, pk}
		if _, ok := caseRank[ck]; !ok {
			caseRank[ck] = len(caseRank)
		}
		if _, ok := labelRank[r.Label]; !ok {
			labelRank[r.Label] = len(labelRank)
		}
		k := [3]string{r.Label, r.Scenario, pk}
		g := byKey[k]
		if g == nil {
			g = &group{label: r.Label, scenario: r.Scenario, params: pk}
			byKey[k] = g
			groups = append(groups, g)
		}
		g.runs = append(g.runs, r)
		if len(r.problems()) == 0 {
			g.passed = append(g.passed, r)
		}
	}
	sort.SliceStable(groups, func(i, j int) bool {
		ci := caseRank[[2]string{groups[i].scenario, groups[i].params}]
		cj := caseRank[[2]string{groups[j].scenario, groups[j].params}]
		if ci != cj {
			return ci < cj
		}
		return labelRank[groups[i].label] < labelRank[groups[j].label]
	})
	return groups
}

// column is one metric of the table; get reports false where the metric
// does not apply to the scenario, which shows as "–".
type column struct {
	title string
	get   func(*benchRun) (float64, bool)
	unit  string // how to format: "rate", "ms" or "kb"
}

// traffic: the scenarios whose result is throughput and send→receive
// latency. idle reports memory, reconnect catch-up (docs/performance.md).
func traffic(r *benchRun) bool {
	return r.Scenario == "fanout" || r.Scenario == "dm" || r.Scenario == "hot"
}

var columns = []column{
	{"sends/s", func(r *benchRun) (float64, bool) {
		return r.SendsPerS, traffic(r) || r.Scenario == "reconnect"
	}, "rate"},
	{"deliveries/s", func(r *benchRun) (float64, bool) { return r.DeliveriesPerS, traffic(r) }, "rate"},
	{"p50 ms", func(r *benchRun) (float64, bool) { return r.LatencyMs.P50, traffic(r) }, "ms"},
	{"p99 ms", func(r *benchRun) (float64, bool) { return r.LatencyMs.P99, traffic(r) }, "ms"},
	{"catch-up p99 ms", func(r *benchRun) (float64, bool) {
		if r.CatchupMs == nil {
			return 0, false
		}
		return r.CatchupMs.P99, true
	}, "ms"},
	{"RSS/stream KB", func(r *benchRun) (float64, bool) {
		if r.RSSPerStreamKB == nil {
			return 0, false
		}
		return *r.RSSPerStreamKB, true
	}, "kb"},
	// CPU per message varies far less between days than rates do (cpu.go):
	// the server's, and that of the other watched processes (--cpu-procs:
	// PostgreSQL and Redis) together.
	{"server CPU µs/msg", func(r *benchRun) (float64, bool) {
		v, ok := r.CPUusPerMsg["server"]
		return v, ok
	}, "rate"},
	{"PG+Redis CPU µs/msg", func(r *benchRun) (float64, bool) {
		if _, ok := r.CPUusPerMsg["server"]; !ok {
			return 0, false
		}
		sum := 0.0
		for k, v := range r.CPUusPerMsg {
			if k != "server" && k != "imbench" {
				sum += v
			}
		}
		return sum, true
	}, "rate"},
}

// formatNum prints like the docs: thousands separators for rates, and
// enough decimals that a sub-millisecond latency does not read as 0.
func formatNum(v float64, unit string) string {
	switch {
	case unit == "kb":
		return strconv.FormatFloat(v, 'f', 1, 64)
	case unit == "ms" && v < 10:
		return strconv.FormatFloat(v, 'f', 2, 64)
	case unit == "ms" && v < 100:
		return strconv.FormatFloat(v, 'f', 1, 64)
	}
	s := strconv.FormatFloat(v, 'f', 0, 64)
	neg := strings.HasPrefix(s, "-")
	s = strings.TrimPrefix(s, "-")
	for i := len(s) - 3; i > 0; i -= 3 {
		s = s[:i] + "," + s[i:]
	}
	if neg {
		s = "-" + s
	}
	return s
}

// writeTable prints the Markdown table and, under it, every flagged run.
// It returns how many runs were flagged.
func writeTable(w io.Writer, groups []*group) int {
	labelled := slices.ContainsFunc(groups, func(g *group) bool { return g.label != "" })
	var head []string
	if labelled {
		head = append(head, "mode")
	}
	head = append(head, "scenario", "params", "runs")
	for _, c := range columns {
		head = append(head, c.title)
	}
	row := func(cells []string) {
		fmt.Fprintf(w, "| %s |\n", strings.Join(cells, " | "))
	}
	row(head)
	sep := make([]string, len(head))
	for i := range sep {
		sep[i] = "---"
		if i >= len(head)-len(columns) {
			sep[i] = "---:"
		}
	}
	row(sep)

	flagged := 0
	for _, g := range groups {
		var cells []string
		if labelled {
			cells = append(cells, mdCell(orDash(g.label)))
		}
		runs := strconv.Itoa(len(g.runs))
		if bad := len(g.runs) - len(g.passed); bad > 0 {
			flagged += bad
			runs = fmt.Sprintf("**%d ok of %d**", len(g.passed), len(g.runs))
		}
		cells = append(cells, "`"+g.scenario+"`", mdCell(orDash(g.params)), runs)
		for _, c := range columns {
			if v, ok := g.medianOf(c.get); ok {
				cells = append(cells, formatNum(v, c.unit))
			} else {
				cells = append(cells, "–")
			}
		}
		row(cells)
	}
	fmt.Fprintf(w, "\nMedians over the runs that passed their checks; p50/p99: send→receive latency.\n")
	if flagged == 0 {
		return 0
	}
	fmt.Fprintf(w, "\n**%d flagged run(s), left out of the medians:**\n\n", flagged)
	for _, g := range groups {
		for _, r := range g.runs {
			if p := r.problems(); len(p) > 0 {
				prefix, _ := r.Params["prefix"].(string)
				id := r.where
				if prefix != "" {
					id += ", prefix " + prefix
				}
				lead := g.scenario
				if g.label != "" {
					lead = g.label + " " + lead
				}
				if g.params != "" {
					lead += " (" + g.params + ")"
				}
				fmt.Fprintf(w, "- %s, %s: %s\n", mdCell(lead), mdCell(id), mdCell(strings.Join(p, ", ")))
			}
		}
	}
	return flagged
}

func orDash(s string) string {
	if s == "" {
		return "–"
	}
	return s
}

// mdCell keeps text from breaking the table: a "|" would end the cell and a
// newline the row (error messages may contain either).
func mdCell(s string) string {
	s = strings.ReplaceAll(s, "|", `\|`)
	return strings.Join(strings.Fields(s), " ")
}

// summarize is `imbench summarize [--label L] [file ...]`: files, or stdin
// when there are none or one is "-".
func summarize(args []string, stdin io.Reader, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("imbench summarize", flag.ContinueOnError)
	fs.SetOutput(stderr)
	label := fs.String("label", "", "label (mode) of lines that carry none")
	fs.Usage = func() {
		fmt.Fprintln(stderr, "usage: imbench summarize [--label L] [results.jsonl ...]  (stdin when no file or \"-\")")
		fmt.Fprintln(stderr, "Prints the median of each headline metric per (label, scenario, params) as a Markdown table;")
		fmt.Fprintln(stderr, "exits 1 when a run failed its checks (ok=false, missing, duplicates, out of order).")
		fs.PrintDefaults()
	}
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return nil
		}
		return err
	}
	files := fs.Args()
	if len(files) == 0 {
		files = []string{"-"}
	}
	var runs []*benchRun
	for _, name := range files {
		var rs []*benchRun
		var err error
		if name == "-" {
			rs, err = readRuns(stdin, "stdin", *label)
		} else {
			var f *os.File
			if f, err = os.Open(name); err != nil {
				return err
			}
			rs, err = readRuns(f, name, *label)
			f.Close()
		}
		if err != nil {
			return err
		}
		runs = append(runs, rs...)
	}
	if len(runs) == 0 {
		return errors.New("summarize: no runs in the input")
	}
	if writeTable(stdout, groupRuns(runs)) > 0 {
		return errFlagged
	}
	return nil
}
