package main

import (
	"context"
	"database/sql"
	"database/sql/driver"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"time"
)

// Several nodes share their real-time state (event logs, Pub/Sub, presence)
// through Redis only: without REDIS_URL each node keeps it in its own memory,
// and a message sent through one node would never reach a stream on another.
// So a node that runs without Redis must be the only one on its data, and a
// node refuses to start when it would not be:
//
//   - SQLite: the data directory (for DATABASE_URL=sqlite:<file>, the
//     file's directory) is locked (flock on LockFile) for the life of the
//     process, whatever REDIS_URL says: one SQLite file serves one process.
//   - PostgreSQL: a session advisory lock on the schema imd uses. A node
//     without Redis takes it exclusively; a node with Redis takes it shared,
//     so that a node without Redis cannot join nodes with Redis either way
//     round (it would see none of their events, and they none of its).
//
// Both locks end with the process, even a killed one (the kernel drops the
// flock, PostgreSQL the session), so a crash never leaves a stale lock.

// LockFile is the data directory's lock, held by the process using it.
const LockFile = "imd.lock"

// Refusal messages, matched by the tests.
const (
	msgDataDirInUse     = "is in use by another imd process"
	msgNoRedisElse      = "another imd node is using this database without Redis; several nodes need REDIS_URL (shared real-time state)"
	msgNodesWithRedis   = "other imd nodes are using this database with Redis (REDIS_URL); a node without Redis cannot join them: set REDIS_URL to their Redis"
	msgRedisNodeRefused = "an imd node without Redis (REDIS_URL unset) is using this database; several nodes need REDIS_URL " +
		"(shared real-time state): restart that node with REDIS_URL before starting more"
)

// refusedError is a refusal to start next to another node, as opposed to a
// failure to ask.
type refusedError struct{ msg string }

func (e *refusedError) Error() string { return e.msg }

func refused(msg string) error { return &refusedError{msg} }

// lockDataDir creates dir if needed and locks dir/imd.lock exclusively
// without waiting; it fails with a clear message when another process holds
// it. The lock file holds the holder's pid, for that message. release
// unlocks it.
func lockDataDir(dir string) (release func(), err error) {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("data directory: %w", err)
	}
	if abs, err := filepath.Abs(dir); err == nil {
		dir = abs // for the messages
	}
	p := filepath.Join(dir, LockFile)
	f, err := os.OpenFile(p, os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return nil, fmt.Errorf("data directory: %w", err)
	}
	if err := flockExclusive(f); err != nil {
		_ = f.Close()
		if errors.Is(err, errLocked) {
			holder := ""
			if b, rerr := os.ReadFile(p); rerr == nil {
				if pid, perr := strconv.Atoi(strings.TrimSpace(string(b))); perr == nil && pid > 0 {
					holder = fmt.Sprintf(" (pid %d)", pid)
				}
			}
			return nil, fmt.Errorf("the data directory %s %s%s; one data directory serves one process "+
				"(stop the other one, or give this one its own --data-dir / IMD_DATA_DIR; several nodes need DATABASE_URL and REDIS_URL)",
				dir, msgDataDirInUse, holder)
		}
		return nil, fmt.Errorf("lock %s: %w", p, err)
	}
	// Best effort: the pid only makes the message above more helpful.
	if err := f.Truncate(0); err == nil {
		_, _ = f.WriteAt([]byte(strconv.Itoa(os.Getpid())+"\n"), 0)
	}
	var once sync.Once
	return func() {
		once.Do(func() {
			_ = f.Truncate(0)
			_ = funlock(f)
			_ = f.Close()
		})
	}, nil
}

// errLocked is what flockExclusive returns when another open file holds the lock.
var errLocked = errors.New("locked")

// pgLockNamespace is the first key of the PostgreSQL advisory lock; the
// second is the hash of the schema, so that deployments in different schemas
// of one database (and parallel tests) do not meet. hashtext is
// PostgreSQL's own string hash: every node asks the same server, so they
// agree on the key. The two-int4 form of the key lives apart from the
// one-bigint keys of the migration lock.
const pgLockNamespace = "imd single node"

// DefaultPGLockKeepalive is how often the lock's connection is checked: if
// the session was lost (PostgreSQL restarted, network cut), so was the
// lock, and it is taken again.
const DefaultPGLockKeepalive = 15 * time.Second

// pgNodeLock holds the advisory lock on a dedicated connection, outside the
// pool's rotation, for the life of the node.
type pgNodeLock struct {
	db        *sql.DB
	exclusive bool
	every     time.Duration // keepalive period
	log       *slog.Logger

	mu   sync.Mutex
	conn *sql.Conn // nil while the lock is lost

	ctx  context.Context // ends with Close, so that Close never waits for a slow check
	stop context.CancelFunc
	done chan struct{}
}

// lockPostgres takes the node lock: exclusive when this node runs without
// Redis, shared when it runs with Redis. It refuses (with the message for
// the operator) when the other kind is held. Close releases it.
func lockPostgres(ctx context.Context, db *sql.DB, exclusive bool, every time.Duration, log *slog.Logger) (*pgNodeLock, error) {
	if every <= 0 {
		every = DefaultPGLockKeepalive
	}
	l := &pgNodeLock{db: db, exclusive: exclusive, every: every, log: log, done: make(chan struct{})}
	conn, err := l.acquire(ctx)
	if err != nil {
		return nil, err
	}
	l.ctx, l.stop = context.WithCancel(context.Background())
	l.conn = conn
	go l.keep()
	return l, nil
}

// acquire takes the lock on a new connection, or says why not.
func (l *pgNodeLock) acquire(ctx context.Context) (*sql.Conn, error) {
	conn, err := l.db.Conn(ctx)
	if err != nil {
		return nil, fmt.Errorf("single-node lock: %w", err)
	}
	ok, err := tryAdvisory(ctx, conn, l.exclusive)
	if err == nil && !ok && l.exclusive {
		// Who holds it? If the shared form can be had, only nodes with Redis
		// hold it; otherwise another node without Redis does.
		var shared bool
		if shared, err = tryAdvisory(ctx, conn, false); err == nil && shared {
			_, err = conn.ExecContext(ctx, `SELECT pg_advisory_unlock_shared(hashtext($1), hashtext(coalesce(current_schema(), '')))`, pgLockNamespace)
			discard(conn, err)
			return nil, refused(msgNodesWithRedis)
		}
	}
	if err != nil {
		discard(conn, err)
		return nil, fmt.Errorf("single-node lock: %w", err)
	}
	if !ok {
		_ = conn.Close()
		if l.exclusive {
			return nil, refused(msgNoRedisElse)
		}
		return nil, refused(msgRedisNodeRefused)
	}
	return conn, nil
}

func tryAdvisory(ctx context.Context, conn *sql.Conn, exclusive bool) (bool, error) {
	fn := "pg_try_advisory_lock_shared"
	if exclusive {
		fn = "pg_try_advisory_lock"
	}
	var ok bool
	err := conn.QueryRowContext(ctx, `SELECT `+fn+`(hashtext($1), hashtext(coalesce(current_schema(), '')))`, pgLockNamespace).Scan(&ok)
	return ok, err
}

// discard closes conn; after an error it takes the connection out of the
// pool instead of returning it (it may still hold a lock, or be broken).
func discard(conn *sql.Conn, err error) {
	if err != nil {
		_ = conn.Raw(func(any) error { return driver.ErrBadConn })
	}
	_ = conn.Close()
}

// keep checks the session every l.every and takes the lock again
// when it was lost. While PostgreSQL is away the node cannot serve anyway;
// if another node took the lock meanwhile, this one says so loudly (it
// keeps running: stopping a serving node would be worse than the warning).
func (l *pgNodeLock) keep() {
	defer close(l.done)
	t := time.NewTicker(l.every)
	defer t.Stop()
	for {
		select {
		case <-l.ctx.Done():
			return
		case <-t.C:
		}
		ctx, cancel := context.WithTimeout(l.ctx, 5*time.Second)
		l.mu.Lock()
		if l.conn != nil {
			if _, err := l.conn.ExecContext(ctx, "SELECT 1"); err != nil {
				discard(l.conn, err)
				l.conn = nil
				l.log.Warn("single-node lock: the database session was lost; taking the lock again", "err", err)
			}
		}
		if l.conn == nil {
			conn, err := l.acquire(ctx)
			switch {
			case err == nil:
				l.conn = conn
				l.log.Info("single-node lock: taken again")
			case !errors.As(err, new(*refusedError)):
				l.log.Warn("single-node lock: cannot take it again yet", "err", err)
			default:
				l.log.Error("single-node lock: another node took it while this node's session was lost: "+
					"stop one of them", "err", err)
			}
		}
		l.mu.Unlock()
		cancel()
	}
}

// Close stops the keeper and releases the lock (ending its session's hold
// on it; the connection is not returned to the pool holding it).
func (l *pgNodeLock) Close() {
	l.stop()
	<-l.done
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.conn == nil {
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	fn := "pg_advisory_unlock_shared"
	if l.exclusive {
		fn = "pg_advisory_unlock"
	}
	var released bool
	err := l.conn.QueryRowContext(ctx, `SELECT `+fn+`(hashtext($1), hashtext(coalesce(current_schema(), '')))`, pgLockNamespace).Scan(&released)
	if err == nil && !released {
		err = errors.New("not held")
	}
	discard(l.conn, err)
	l.conn = nil
}
