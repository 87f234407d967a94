package main

import (
	"cmp"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net/url"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"imd/chat"
	"imd/handlers"
	"imd/realtime"
	"imd/store"
	"imd/web"
)

// Defaults that are not the domain's: each with its reason.
//
// DATABASE_URL and REDIS_URL have no default on purpose: unset is the
// embedded mode (see runWith), the one that works on a machine with nothing
// installed, and a guessed URL would only turn "nothing configured" into a
// connection error.
const (
	DefaultAddr = ":8080"
	// DefaultDataDir is where the embedded mode keeps its files: "data"
	// under the working directory, the way Gitea (./data) and PocketBase
	// (./pb_data) do. Not $XDG_DATA_HOME/imd: that is unset for system
	// services and in containers (and $HOME often unwritable there), it hides
	// the data somewhere a person trying imd does not look, and "./data"
	// maps onto a container volume or a service's WorkingDirectory as is.
	DefaultDataDir = "data"
	// EmbeddedDBFile is the SQLite database of the embedded mode, in the
	// data directory.
	EmbeddedDBFile = "imd.db"
	// DefaultShutdownGrace bounds a graceful stop; streams are ended first,
	// so only in-flight requests remain.
	DefaultShutdownGrace = 10 * time.Second
	// DefaultStreamEventBuffer is how many ephemeral and control events
	// (typing, presence, token revocation) may wait for one stream; typing
	// and presence past it are dropped, a control event past it ends the
	// stream, which resumes from its log. Not realtime's 64:
	// the buffer is allocated per open stream whether or not anything
	// arrives (64 events are 4 KiB, 16 are 1 KiB, docs/performance.md
	// "idle"), and the stream's goroutine empties it between two writes, so
	// it only fills while a write to a client that does not read blocks,
	// which the write timeout ends anyway.
	DefaultStreamEventBuffer = 16
)

// config is everything the server is configured with: flags, each with an
// environment variable as fallback.
type config struct {
	addr         string
	dataDir      string // the embedded mode's files: SQLite database, lock
	databaseURL  string // never empty after parseConfig: unset means sqlite:<dataDir>/imd.db
	embeddedDB   bool   // databaseURL was unset and is the data directory's SQLite file
	redisURL     string // empty: in-memory real-time state, single node
	redisPrefix  string
	adminToken   string
	registration string
	sendRate     int
	sendBurst    int
	loginRate    int
	maxTextBytes int
	logLevel     string
	cookieSecure bool
	logCap       int
	logTTL       time.Duration
	corsOrigins  []string // browser apps on other origins (handlers/web.go)
	pprofAddr    string   // profiling listener; empty: off
	streamWrite  time.Duration
	tokenCache   time.Duration // how long a node trusts a token it has read; 0: no cache
	eventBuffer  int           // per-stream buffer of ephemeral events (realtime.Config.EventBuffer)
	sendLanes    int           // PostgreSQL group-commit lanes (store.WithSendLanes)
	fanoutFast   int           // group size from which messages take the fan-out fast path; 0: off
}

func parseConfig(cmd string, args []string, getenv func(string) string, stderr io.Writer) (config, error) {
	var c config
	fs := flag.NewFlagSet("imd "+cmd, flag.ContinueOnError)
	fs.SetOutput(stderr)
	str := func(p *string, name, env, def, usage string) {
		if v := getenv(env); v != "" {
			def = v
		}
		fs.StringVar(p, name, def, usage+" ($"+env+")")
	}
	var intErr error
	num := func(p *int, name, env string, def int, usage string) {
		if v := getenv(env); v != "" {
			n, err := strconv.Atoi(v)
			if err != nil {
				intErr = errors.Join(intErr, fmt.Errorf("%s: %q is not a number", env, v))
			}
			def = n
		}
		fs.IntVar(p, name, def, usage+" ($"+env+")")
	}
	str(&c.addr, "addr", "IMD_ADDR", DefaultAddr, "listen address")
	str(&c.dataDir, "data-dir", "IMD_DATA_DIR", DefaultDataDir, "directory of the embedded mode's files (SQLite database, lock)")
	str(&c.databaseURL, "database-url", "DATABASE_URL", "",
		"postgres://… for PostgreSQL, or sqlite:<file>; unset: SQLite at <data dir>/"+EmbeddedDBFile)
	str(&c.redisURL, "redis-url", "REDIS_URL", "",
		"redis://host:port/db; unset: real-time state in memory (one node only)")
	str(&c.redisPrefix, "redis-prefix", "IMD_REDIS_PREFIX", "", "prefix of every Redis key (to share one Redis between deployments)")
	str(&c.adminToken, "admin-token", "IMD_ADMIN_TOKEN", "", "token of the admin API; empty disables it")
	str(&c.registration, "registration", "IMD_REGISTRATION", "open", "self-registration: open or closed")
	num(&c.sendRate, "send-rate", "IMD_SEND_RATE", chat.DefaultSendRate, "messages per second per user; 0 turns the limit off")
	num(&c.sendBurst, "send-burst", "IMD_SEND_BURST", chat.DefaultSendBurst, "messages a user may send at once")
	num(&c.loginRate, "login-rate", "IMD_LOGIN_RATE", chat.DefaultLoginRate, "failed logins per minute per username and per address; 0 off")
	num(&c.maxTextBytes, "max-text-bytes", "IMD_MAX_TEXT_BYTES", chat.DefaultMaxTextBytes, "largest message text in bytes")
	num(&c.eventBuffer, "stream-event-buffer", "IMD_STREAM_EVENT_BUFFER", DefaultStreamEventBuffer,
		"ephemeral events (typing, presence) that may wait for one stream before it is ended as too slow")
	num(&c.sendLanes, "send-lanes", "IMD_SEND_LANES", store.DefaultSendLanes,
		"PostgreSQL transactions committing sends at once; more overlap round trips but split batches, costing the database more per message (SQLite: always 1)")
	num(&c.fanoutFast, "fanout-fast", "IMD_FANOUT_FAST", chat.DefaultFanoutFast,
		"groups of at least this many members get their messages to live streams before the members' logs have them; 0 off (the default without Redis)")
	num(&c.logCap, "log-cap", "IMD_LOG_CAP", realtime.DefaultLogCap, "events kept per user for resume")
	str(&c.logLevel, "log-level", "IMD_LOG_LEVEL", "info", "debug, info, warn or error")
	str(&c.pprofAddr, "pprof-addr", "IMD_PPROF_ADDR", "",
		"serve Go profiles (/debug/pprof/) on this separate address, e.g. 127.0.0.1:6060; empty: off")
	var corsOrigins string
	str(&corsOrigins, "cors-origins", "IMD_CORS_ORIGINS", "",
		"comma-separated origins (scheme://host[:port]) of browser apps allowed to call the API, with credentials; * allows any origin without credentials")
	secure := getenv("IMD_COOKIE_SECURE") != "false"
	fs.BoolVar(&c.cookieSecure, "cookie-secure", secure, "mark the session cookie Secure (turn off only for plain-HTTP development) ($IMD_COOKIE_SECURE)")
	dur := func(p *time.Duration, name, env string, def time.Duration, usage string) {
		if v := getenv(env); v != "" {
			d, err := time.ParseDuration(v)
			if err != nil {
				intErr = errors.Join(intErr, fmt.Errorf("%s: %q is not a duration", env, v))
			}
			def = d
		}
		fs.DurationVar(p, name, def, usage+" ($"+env+")")
	}
	dur(&c.logTTL, "log-ttl", "IMD_LOG_TTL", realtime.DefaultLogTTL, "how long events are kept per user for resume")
	dur(&c.tokenCache, "token-cache-ttl", "IMD_TOKEN_CACHE_TTL", chat.DefaultTokenCacheTTL,
		"how long a node answers for a token from memory; also the worst delay before another node refuses a revoked one if the revocation's message is lost; 0 off")
	dur(&c.streamWrite, "stream-write-timeout", "IMD_STREAM_WRITE_TIMEOUT", handlers.DefaultStreamWriteTimeout,
		"disconnect an event stream whose client reads nothing for this long")
	if err := fs.Parse(args); err != nil {
		return c, err
	}
	if intErr != nil {
		return c, intErr
	}
	if fs.NArg() > 0 {
		return c, fmt.Errorf("unexpected arguments: %v", fs.Args())
	}
	if c.dataDir == "" {
		return c, errors.New("IMD_DATA_DIR must not be empty")
	}
	set := getenv("IMD_FANOUT_FAST") != ""
	fs.Visit(func(f *flag.Flag) { set = set || f.Name == "fanout-fast" })
	if !set && c.redisURL == "" {
		// The in-memory logs are appended as fast as the fast path would
		// deliver, which then only adds work: measured p99 at 50 sends/s
		// to 1000 members 30-33 ms without it, 47-49 ms with it.
		c.fanoutFast = 0
	}
	if c.databaseURL == "" {
		c.databaseURL = "sqlite:" + filepath.Join(c.dataDir, EmbeddedDBFile)
		c.embeddedDB = true
	}
	for _, o := range strings.Split(corsOrigins, ",") {
		if o = strings.TrimSpace(o); o != "" {
			c.corsOrigins = append(c.corsOrigins, o)
		}
	}
	switch {
	case c.registration != "open" && c.registration != "closed":
		return c, fmt.Errorf("IMD_REGISTRATION must be open or closed, not %q", c.registration)
	case c.sendRate < 0 || c.sendBurst < 1 || c.loginRate < 0:
		return c, errors.New("rates must not be negative and the burst must be at least 1")
	case c.maxTextBytes < 1:
		return c, errors.New("IMD_MAX_TEXT_BYTES must be positive")
	case c.eventBuffer < 1:
		return c, errors.New("IMD_STREAM_EVENT_BUFFER must be positive")
	case c.sendLanes < 1 || c.sendLanes > store.MaxSendLanes:
		return c, fmt.Errorf("IMD_SEND_LANES must be 1 to %d", store.MaxSendLanes)
	case c.fanoutFast < 0:
		return c, errors.New("IMD_FANOUT_FAST must not be negative (0 turns the fast path off)")
	case c.tokenCache < 0:
		return c, errors.New("IMD_TOKEN_CACHE_TTL must not be negative (0 turns the cache off)")
	}
	return c, nil
}

func (c config) level() slog.Level {
	var l slog.Level
	if err := l.UnmarshalText([]byte(c.logLevel)); err != nil {
		return slog.LevelInfo
	}
	return l
}

func (c config) service() chat.Config {
	return chat.Config{
		Registration: c.registration == "open",
		MaxTextBytes: c.maxTextBytes,
		SendLimit:    chat.Limit{Rate: c.sendRate, Period: time.Second, Burst: c.sendBurst},
		LoginLimit:   chat.Limit{Rate: c.loginRate, Period: time.Minute, Burst: c.loginRate},
		// chat.Config takes 0 for its default and a negative value for off.
		TokenCacheTTL: cmp.Or(c.tokenCache, -1),
		FanoutFast:    cmp.Or(c.fanoutFast, -1),
	}
}

func (c config) http(spec []byte) handlers.Config {
	return handlers.Config{AdminToken: c.adminToken, CookieSecure: c.cookieSecure, SpecYAML: spec,
		Web: web.Files, CORSOrigins: c.corsOrigins, StreamWriteTimeout: c.streamWrite}
}

func (c config) store() []store.Option {
	return []store.Option{store.WithSendLanes(c.sendLanes)}
}

func (c config) realtime() realtime.Config {
	return realtime.Config{Prefix: c.redisPrefix, LogCap: c.logCap, LogTTL: c.logTTL, EventBuffer: c.eventBuffer}
}

// mode describes the storage and real-time back ends in one line, logged at
// start so that nobody wonders which mode a node runs in.
func (c config) mode() string {
	var db, rt string
	file, ok := store.SQLitePath(c.databaseURL)
	if abs, err := filepath.Abs(file); ok && err == nil {
		file = abs
	}
	switch {
	case ok && c.embeddedDB:
		db = "SQLite at " + file + " (DATABASE_URL unset)"
	case ok:
		db = "SQLite at " + file
	default:
		db = "PostgreSQL at " + redactURL(c.databaseURL)
	}
	if c.redisURL == "" {
		rt = "in-memory real-time (REDIS_URL unset: single node)"
	} else {
		rt = "Redis at " + redactURL(c.redisURL)
	}
	if c.embeddedDB && c.redisURL == "" {
		return "embedded: " + db + ", " + rt
	}
	return db + " + " + rt
}

// redactURL hides a password; key=value connection strings are reduced to
// their host, if they name one.
func redactURL(raw string) string {
	u, err := url.Parse(raw)
	if err != nil || u.Scheme == "" {
		for _, kv := range strings.Fields(raw) {
			if h, ok := strings.CutPrefix(kv, "host="); ok {
				return "host=" + h
			}
		}
		return "(connection string)"
	}
	u.RawQuery = ""
	return u.Redacted()
}
