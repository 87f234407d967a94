// Command imbench is imd's load tool (issue 6). It drives a running imd
// only through its public API — users and tokens from the admin API,
// conversations, sends, SSE streams — so anyone can re-measure a server the
// way its clients see it, and it checks what it measures: every stream
// must deliver every acknowledged message exactly once and in order.
//
//	imbench --url http://127.0.0.1:8080 --admin-token $IMD_ADMIN_TOKEN --scenario fanout
//
// Scenarios: dm, fanout, hot, idle, reconnect (see scenarios.go). It
// prints one JSON summary line on stdout and a table on stderr, and exits
// non-zero when a message was missing, duplicated or out of order, the
// hot scenario's history has a seq gap, or setup failed.
//
//	imbench summarize results.jsonl
//
// reads such lines back and prints the medians per scenario as a Markdown
// table (summarize.go; scripts/bench makes the runs).
package main

import (
	"context"
	"crypto/rand"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"net/url"
	"os"
	"os/signal"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"time"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	var err error
	if len(os.Args) > 1 && os.Args[1] == "summarize" {
		err = summarize(os.Args[2:], os.Stdin, os.Stdout, os.Stderr)
	} else {
		err = run(ctx, os.Args[1:], os.Stdout, os.Stderr)
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "imbench:", err)
		os.Exit(1)
	}
}

// errChecks is returned when the run completed but its checks failed.
var errChecks = errors.New("checks failed: missing, duplicate or out-of-order deliveries, or seq gaps")

// config is the parsed command line; zero-valued sizes take the
// scenario's default (defaults below).
type config struct {
	url          string
	adminToken   string
	allowRemote  bool
	scenario     string
	pairs        int
	members      int
	senders      int
	streams      int
	rate         float64
	duration     time.Duration
	messages     int64
	timeout      time.Duration
	drainTimeout time.Duration
	readyTimeout time.Duration
	serverPID    int
	waves        int
	down         time.Duration
	settle       time.Duration
	setupConc    int
	prefix       string
	readBuf      int
	label        string
	cpuProcs     []string
}

// scenarioDefaults: the sizes of issue 6. Senders are closed loops (one
// request at a time), so a fixed rate needs senders ≥ rate × ack latency:
// reconnect's 500/s gets 50, enough for acks of up to 100 ms.
var scenarioDefaults = map[string]struct {
	pairs, members, senders, streams int
	rate                             float64
}{
	"dm":        {pairs: 1000, senders: 100},
	"fanout":    {members: 1000, senders: 10},
	"hot":       {members: 50, senders: 50},
	"idle":      {streams: 10000},
	"reconnect": {streams: 2000, members: 100, senders: 50, rate: 500},
}

var prefixRE = regexp.MustCompile(`^[a-z0-9][a-z0-9]{0,15}$`)

func parseFlags(args []string, stderr io.Writer) (*config, error) {
	c := &config{}
	fs := flag.NewFlagSet("imbench", flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.StringVar(&c.url, "url", "http://127.0.0.1:8080", "base URL of the running imd")
	fs.StringVar(&c.adminToken, "admin-token", os.Getenv("IMD_ADMIN_TOKEN"), "the server's admin token (default $IMD_ADMIN_TOKEN)")
	fs.BoolVar(&c.allowRemote, "allow-remote", false, "allow a non-loopback --url (load only what you are allowed to load)")
	fs.StringVar(&c.scenario, "scenario", "fanout", "dm, fanout, hot, idle or reconnect")
	fs.IntVar(&c.pairs, "pairs", 0, "dm: user pairs (default 1000)")
	fs.IntVar(&c.members, "members", 0, "fanout/hot: group size (default 1000/50); reconnect: members per group (default 100)")
	fs.IntVar(&c.senders, "senders", 0, "concurrent senders (default dm 100, fanout 10, hot 50, reconnect 50)")
	fs.IntVar(&c.streams, "streams", 0, "idle/reconnect: streams (default 10000/2000)")
	fs.Float64Var(&c.rate, "rate", -1, "total sends per second; 0 = as fast as possible (default: reconnect 500, others 0)")
	fs.DurationVar(&c.duration, "duration", 10*time.Second, "how long to send")
	fs.Int64Var(&c.messages, "messages", 0, "stop sending after this many messages (0 = no cap)")
	fs.DurationVar(&c.timeout, "timeout", 2*time.Minute, "overall bound: stop and report what there is")
	fs.DurationVar(&c.drainTimeout, "drain-timeout", 30*time.Second, "after sending, how long to wait for deliveries")
	fs.DurationVar(&c.readyTimeout, "ready-timeout", 90*time.Second, "how long to wait for all streams to be ready")
	fs.IntVar(&c.serverPID, "server-pid", 0, "idle: the server's pid (default: found from the port via /proc)")
	fs.IntVar(&c.waves, "waves", 4, "reconnect: drop waves during the send duration")
	fs.DurationVar(&c.down, "down", 200*time.Millisecond, "reconnect: pause between a drop and the reconnection")
	fs.DurationVar(&c.settle, "settle", 0, "pause between setup and sending (see below)")
	fs.IntVar(&c.setupConc, "setup-concurrency", 32, "parallel setup requests and stream opens")
	fs.StringVar(&c.prefix, "prefix", "", "user-name prefix (default b<random>; must be new on the server)")
	fs.IntVar(&c.readBuf, "read-buffer", 4096, "SSE read buffer per stream, bytes")
	cpuProcs := fs.String("cpu-procs", "postgres,redis-server", "besides the server and this tool, the process names whose CPU per message to report (empty: none); needs a local server")
	fs.StringVar(&c.label, "label", "", "copied into the JSON line as \"label\" (e.g. services, embedded) for imbench summarize")
	if err := fs.Parse(args); err != nil {
		return nil, err
	}
	if fs.NArg() > 0 {
		return nil, fmt.Errorf("unexpected arguments: %q", fs.Args())
	}
	for _, n := range strings.Split(*cpuProcs, ",") {
		if n = strings.TrimSpace(n); n != "" {
			c.cpuProcs = append(c.cpuProcs, n)
		}
	}
	d, ok := scenarioDefaults[c.scenario]
	if !ok {
		return nil, fmt.Errorf("--scenario %q: want dm, fanout, hot, idle or reconnect", c.scenario)
	}
	def := func(v *int, d int) {
		if *v <= 0 {
			*v = d
		}
	}
	def(&c.pairs, d.pairs)
	def(&c.members, d.members)
	def(&c.senders, d.senders)
	def(&c.streams, d.streams)
	if c.rate < 0 {
		c.rate = d.rate
	}
	if c.prefix == "" {
		c.prefix = "b" + strings.ToLower(rand.Text()[:7])
	}
	switch {
	case c.adminToken == "":
		return nil, errors.New("no admin token: give --admin-token or set IMD_ADMIN_TOKEN")
	case !prefixRE.MatchString(c.prefix):
		return nil, fmt.Errorf("--prefix %q: want 1-16 of [a-z0-9]", c.prefix)
	case (c.scenario == "fanout" || c.scenario == "hot") && c.members < 1,
		c.scenario == "reconnect" && c.streams < 1,
		c.senders < 1 && c.scenario != "idle":
		return nil, errors.New("sizes must be positive")
	case c.setupConc < 1 || c.readBuf < 64 || c.waves < 0:
		return nil, errors.New("--setup-concurrency, --read-buffer and --waves must be positive")
	}
	return c, checkTarget(c.url, c.allowRemote)
}

// checkTarget refuses a URL whose host is not loopback unless allowed: a
// load tool pointed at the wrong host is an attack, and this workplace
// only permits loopback load. Only literal loopback addresses and
// "localhost" count, so deciding needs no DNS.
func checkTarget(raw string, allowRemote bool) error {
	u, err := url.Parse(raw)
	if err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
		return fmt.Errorf("--url %q: want http(s)://host:port", raw)
	}
	host := u.Hostname()
	loopback := host == "localhost" || strings.HasSuffix(host, ".localhost")
	if ip := net.ParseIP(host); ip != nil && ip.IsLoopback() {
		loopback = true
	}
	if !loopback && !allowRemote {
		return fmt.Errorf("--url %q is not a loopback address; refusing without --allow-remote", raw)
	}
	return nil
}

// run is main without the process, so tests can drive it against a fake
// server: it returns errChecks when the run's checks fail, another error
// when it could not run, nil when everything was delivered as it should.
func run(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	cfg, err := parseFlags(args, stderr)
	if errors.Is(err, flag.ErrHelp) {
		return nil
	}
	if err != nil {
		return err
	}
	rep := &report{cfg: cfg}
	rep.nofile, err = raiseNoFile()
	if err != nil {
		fmt.Fprintln(stderr, "imbench: raising RLIMIT_NOFILE:", err)
	}
	ctx, cancel := context.WithTimeout(ctx, cfg.timeout)
	defer cancel()

	errs := &statusCounter{}
	cl := newClient(cfg.url, cfg.adminToken, errs)
	defer cl.close()
	e := &engine{cfg: cfg, cl: cl, errs: errs}
	rep.e = e
	streamCtx, stopStreams := context.WithCancel(ctx)
	defer func() {
		stopStreams()
		for _, s := range e.streams {
			if s.started.Load() {
				<-s.exited
			}
		}
	}()
	fail := func(err error) error {
		rep.setupErr = err
		rep.timedOut = ctx.Err() != nil
		rep.write(stdout, stderr)
		return fmt.Errorf("setup: %w", err)
	}

	setupStart := time.Now()
	var senders int
	switch cfg.scenario {
	case "dm":
		senders, err = e.setupDM(ctx)
	case "fanout":
		senders, err = e.setupFanout(ctx)
	case "hot":
		senders, err = e.setupHot(ctx)
	case "idle":
		senders, err = e.setupIdle(ctx)
	case "reconnect":
		senders, err = e.setupReconnect(ctx)
	}
	if err != nil {
		return fail(err)
	}
	pid := cfg.serverPID
	if cfg.scenario == "idle" {
		if pid == 0 {
			port, _ := strconv.Atoi(portOf(cfg.url))
			if pid, err = findListener(port); err != nil {
				return fail(fmt.Errorf("idle needs the server's pid: %w", err))
			}
			cfg.serverPID = pid
		}
		rss, err := readRSSKB(pid)
		if err != nil {
			return fail(err)
		}
		rep.rssBefore = rss
	}
	rep.streamsStarted = true
	if err := e.openStreams(ctx, streamCtx); err != nil {
		return fail(err)
	}
	rep.setup = time.Since(setupStart)
	// Creating a group leaves work in flight on the server after the API
	// has answered (its conversation.created fan-out); messages sent at
	// once queue behind it, so their latency is the group's cold start,
	// not the steady state. --settle waits it out when steady state is
	// what is wanted; the default measures from the first message.
	if cfg.settle > 0 && !waitUntil(ctx, cfg.settle, time.Now().Add(cfg.settle+time.Second)) {
		return fail(ctx.Err())
	}

	var cpu *cpuWatch
	var cpuBefore cpuSample
	if cfg.scenario != "idle" {
		cpu, cpuBefore, rep.cpuErr = startCPU(cfg)
	}
	switch cfg.scenario {
	case "idle":
		rss, err := readRSSKB(pid)
		if err != nil {
			return fail(err)
		}
		rep.rssAfter = rss
	case "reconnect":
		e.send(ctx, senders, e.waves)
	default:
		e.send(ctx, senders, nil)
	}
	rep.drained = len(e.convs) == 0 || e.drain(ctx) // idle: nothing to drain
	if cpu != nil {
		if after, err := cpu.sample(); err != nil {
			rep.cpuErr = err
		} else {
			rep.cpuBefore, rep.cpuAfter, rep.cpuWindow = cpuBefore, after, time.Since(e.sendStart)
		}
	}
	if cfg.scenario == "hot" && ctx.Err() == nil {
		rep.histTotal, rep.seqGaps, rep.histErr = e.checkHistory(ctx, e.convs[0])
	}
	rep.timedOut = ctx.Err() != nil && !errors.Is(context.Cause(ctx), context.Canceled)
	stopStreams()
	for _, s := range e.streams {
		<-s.exited // all started: openStreams succeeded
	}
	rep.collect()
	rep.write(stdout, stderr)
	if !rep.ok() {
		return errChecks
	}
	return nil
}

// startCPU finds the processes to measure and samples them; the server
// must be local (its pid given, or found from the port).
func startCPU(cfg *config) (*cpuWatch, cpuSample, error) {
	pid := cfg.serverPID
	if pid == 0 {
		port, _ := strconv.Atoi(portOf(cfg.url))
		var err error
		if pid, err = findListener(port); err != nil {
			return nil, nil, err
		}
	}
	w := &cpuWatch{serverPID: pid, names: cfg.cpuProcs, procDir: "/proc"}
	s, err := w.sample()
	if err != nil {
		return nil, nil, err
	}
	return w, s, nil
}

func portOf(raw string) string {
	u, err := url.Parse(raw)
	if err != nil {
		return ""
	}
	if p := u.Port(); p != "" {
		return p
	}
	if u.Scheme == "https" {
		return "443"
	}
	return "80"
}
