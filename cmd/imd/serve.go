package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/pprof"
	"path/filepath"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"imd"
	"imd/chat"
	"imd/handlers"
	"imd/internal/password"
	"imd/realtime"
	"imd/store"
)

// options are the seams tests use; production runs with the zero value.
type options struct {
	hooks chat.Hooks
	// ready receives the base URL once the server accepts connections.
	ready func(url string)
	// realtime, if set, wraps the real-time adapter the service uses (tests
	// observe subscriptions through it, in either mode).
	realtime func(chat.Realtime) chat.Realtime
	// lockKeepalive, if set, replaces DefaultPGLockKeepalive (single.go).
	lockKeepalive time.Duration
}

func runWith(ctx context.Context, args []string, getenv func(string) string, stdout, stderr io.Writer, opt options) error {
	cmd := "serve"
	if len(args) > 0 && (args[0] == "serve" || args[0] == "migrate") {
		cmd, args = args[0], args[1:]
	} else if len(args) > 0 && args[0] != "" && args[0][0] != '-' {
		return fmt.Errorf("unknown command %q (want serve or migrate)", args[0])
	}
	cfg, err := parseConfig(cmd, args, getenv, stderr)
	if err != nil {
		return err
	}
	log := slog.New(slog.NewTextHandler(stderr, &slog.HandlerOptions{Level: cfg.level()}))
	log.Info("mode: "+cfg.mode(), "command", cmd)

	// One SQLite file serves one process (single.go): lock before opening,
	// so that a refused process does not even migrate. migrate locks too: it
	// must not change the schema under a running server.
	file, isSQLite := store.SQLitePath(cfg.databaseURL)
	if isSQLite {
		dir := filepath.Dir(file)
		if cfg.embeddedDB {
			dir = cfg.dataDir
		}
		release, err := lockDataDir(dir)
		if err != nil {
			return err
		}
		defer release()
	}
	st, err := store.Open(ctx, cfg.databaseURL, cfg.store()...)
	if err != nil {
		return fmt.Errorf("database: %w", err)
	}
	defer st.Close()
	if cmd == "serve" && st.Dialect() == "postgres" {
		// Exclusive without Redis, shared with it (single.go).
		lock, err := lockPostgres(ctx, st.DB().DB, cfg.redisURL == "", opt.lockKeepalive, log)
		if err != nil {
			return err
		}
		defer lock.Close()
	}
	if err := st.Migrate(ctx); err != nil {
		return fmt.Errorf("migrate: %w", err)
	}
	if cmd == "migrate" {
		fmt.Fprintln(stdout, "imd: migrations applied")
		return nil
	}
	return serve(ctx, cfg, st, log, stdout, opt)
}

// openRealtime returns the Redis adapter, or the in-memory one when REDIS_URL
// is unset (one node only: runWith has made sure of that).
func openRealtime(ctx context.Context, cfg config) (interface {
	chat.Realtime
	Close() error
}, error) {
	if cfg.redisURL == "" {
		return realtime.NewMemory(cfg.realtime()), nil
	}
	// Redis may be down at start: sends still work (G6), real-time resumes when it returns.
	rt, err := realtime.Open(ctx, cfg.redisURL, cfg.realtime())
	if err != nil {
		return nil, fmt.Errorf("redis: %w", err)
	}
	return rt, nil
}

func serve(ctx context.Context, cfg config, st *store.Store, log *slog.Logger, stdout io.Writer, opt options) error {
	rtc, err := openRealtime(ctx, cfg)
	if err != nil {
		return err
	}
	defer rtc.Close()
	var rt chat.Realtime = rtc
	if opt.realtime != nil {
		rt = opt.realtime(rt)
	}

	svc := chat.NewService(st, rt, password.Argon2id{P: password.OWASP}, cfg.service(), log, opt.hooks)
	reg := prometheus.NewRegistry()
	reg.MustRegister(prometheus.NewGoCollector(), prometheus.NewProcessCollector(prometheus.ProcessCollectorOpts{}))
	h, err := handlers.New(svc, cfg.http(imd.OpenAPI), log, reg)
	if err != nil {
		return err
	}

	ln, err := net.Listen("tcp", cfg.addr)
	if err != nil {
		return err
	}
	srv := &http.Server{
		Handler:           h.Handler(),
		ReadHeaderTimeout: 10 * time.Second,
		ReadTimeout:       30 * time.Second,
		// No WriteTimeout: it is absolute and would kill event streams; the
		// stream writer sets a deadline per write instead.
		IdleTimeout: 120 * time.Second,
		ErrorLog:    slog.NewLogLogger(log.Handler(), slog.LevelWarn),
	}
	bg, stopBg := context.WithCancel(context.WithoutCancel(ctx))
	svc.Start(bg)
	if cfg.pprofAddr != "" {
		_, stop, err := servePprof(cfg.pprofAddr, log)
		if err != nil {
			stopBg()
			return err
		}
		defer stop()
	}

	url := "http://" + displayAddr(ln.Addr())
	fmt.Fprintf(stdout, "imd: listening on %s\n", url)
	if opt.ready != nil {
		opt.ready(url)
	}
	errc := make(chan error, 1)
	go func() { errc <- srv.Serve(ln) }()

	select {
	case err = <-errc:
	case <-ctx.Done():
	}
	log.Info("shutting down")
	// Streams first: Shutdown does not see them (a stream's connection is
	// taken over from net/http once it starts) or, where it does, would
	// wait for them forever (they never go idle).
	h.CloseStreams()
	sctx, cancel := context.WithTimeout(context.Background(), DefaultShutdownGrace)
	defer cancel()
	if serr := srv.Shutdown(sctx); serr != nil && err == nil {
		err = serr
	}
	stopBg()
	svc.Wait()
	if errors.Is(err, http.ErrServerClosed) {
		err = nil
	}
	return err
}

// displayAddr turns ":8080" into "localhost:8080" so the printed URL works.
func displayAddr(a net.Addr) string {
	tcp, ok := a.(*net.TCPAddr)
	if !ok {
		return a.String()
	}
	if tcp.IP.IsUnspecified() {
		return fmt.Sprintf("localhost:%d", tcp.Port)
	}
	return tcp.String()
}

// servePprof serves the Go profiler on its own listener, never on the public
// one: profiles expose internals and cost CPU, so they are opt-in and meant
// for a loopback address.
func servePprof(addr string, log *slog.Logger) (bound string, stop func(), err error) {
	mux := http.NewServeMux()
	mux.HandleFunc("/debug/pprof/", pprof.Index)
	mux.HandleFunc("/debug/pprof/cmdline", pprof.Cmdline)
	mux.HandleFunc("/debug/pprof/profile", pprof.Profile)
	mux.HandleFunc("/debug/pprof/symbol", pprof.Symbol)
	mux.HandleFunc("/debug/pprof/trace", pprof.Trace)
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return "", nil, fmt.Errorf("pprof: %w", err)
	}
	srv := &http.Server{Handler: mux, ReadHeaderTimeout: 10 * time.Second}
	go func() { _ = srv.Serve(ln) }()
	log.Info("profiling enabled", "addr", ln.Addr().String())
	return ln.Addr().String(), func() { _ = srv.Close() }, nil
}
