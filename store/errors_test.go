package store

import (
	"context"
	"database/sql"
	"database/sql/driver"
	"errors"
	"fmt"
	"net"
	"syscall"
	"testing"
	"time"

	"github.com/jmoiron/sqlx"
	"github.com/lib/pq"
	"github.com/stretchr/testify/require"

	"imd/chat"
	"imd/internal/testenv"
)

func TestDBErrMapping(t *testing.T) {
	pqErr := func(code, constraint string) error {
		return fmt.Errorf("wrapped: %w", &pq.Error{Code: pq.ErrorCode(code), Constraint: constraint, Message: "x"})
	}
	notFound := chat.Errorf(chat.CodeNotFound, "user not found")
	cases := []struct {
		name  string
		err   error
		code  chat.Code
		field string
		msg   string
	}{
		{"no rows", sql.ErrNoRows, chat.CodeNotFound, "", "not found"},
		{"domain error passes through", notFound, chat.CodeNotFound, "", "user not found"},
		{"unique", pqErr("23505", "users_pkey"), chat.CodeConflict, "", "username is taken"},
		{"unique, other", pqErr("23505", "whatever"), chat.CodeConflict, "", "already exists"},
		{"foreign key", pqErr("23503", "members_user_id_fkey"), chat.CodeInvalid, "user_id", ""},
		{"check", pqErr("23514", "tokens_kind_check"), chat.CodeInvalid, "", ""},
		{"connection exception", pqErr("08006", ""), chat.CodeUnavailable, "", ""},
		{"admin shutdown", pqErr("57P01", ""), chat.CodeUnavailable, "", ""},
		{"crash shutdown", pqErr("57P02", ""), chat.CodeUnavailable, "", ""},
		{"cannot connect now", pqErr("57P03", ""), chat.CodeUnavailable, "", ""},
		{"too many connections", pqErr("53300", ""), chat.CodeUnavailable, "", ""},
		{"bad conn", driver.ErrBadConn, chat.CodeUnavailable, "", ""},
		{"conn done", sql.ErrConnDone, chat.CodeUnavailable, "", ""},
		{"refused", &net.OpError{Op: "dial", Net: "tcp", Err: syscall.ECONNREFUSED}, chat.CodeUnavailable, "", ""},
		{"deadline", fmt.Errorf("dial: %w", context.DeadlineExceeded), chat.CodeUnavailable, "", ""},
		{"closed pool", errors.New("sql: database is closed"), chat.CodeUnavailable, "", ""},
		{"syntax error", pqErr("42601", ""), chat.CodeInternal, "", "internal error"},
		{"anything else", errors.New("boom"), chat.CodeInternal, "", "internal error"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			err := dbErr(tc.err)
			var ce *chat.Error
			require.True(t, errors.As(err, &ce), "always a *chat.Error")
			require.Equal(t, tc.code, ce.Code)
			if tc.field != "" {
				require.Equal(t, tc.field, ce.Fields[0].Field)
			}
			if tc.msg != "" {
				require.Equal(t, tc.msg, ce.Message)
			}
			require.NotContains(t, ce.Message, "pq:", "driver text never reaches the client message")
		})
	}
	require.NoError(t, dbErr(nil))
}

// A backend killed in the middle of a transaction (a PostgreSQL restart, a
// failover): database/sql cannot retry inside a transaction, so the error
// reaches us, and it must say unavailable, never internal.
func TestTerminatedBackendIsUnavailable(t *testing.T) {
	t.Parallel()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	url := testenv.DatabaseURL(t)
	s, err := Open(ctx, url)
	require.NoError(t, err)
	t.Cleanup(func() { _ = s.Close() })
	admin, err := sqlx.Open("postgres", url)
	require.NoError(t, err)
	t.Cleanup(func() { _ = admin.Close() })

	err = s.inTx(ctx, func(tx *sqlx.Tx) error {
		var pid int
		if err := tx.GetContext(ctx, &pid, `SELECT pg_backend_pid()`); err != nil {
			return err
		}
		var done bool // waits (up to 5 s) until the backend is gone
		if err := admin.GetContext(ctx, &done, `SELECT pg_terminate_backend($1, 5000)`, pid); err != nil {
			return fmt.Errorf("admin: %w", err)
		}
		require.True(t, done)
		_, err := tx.ExecContext(ctx, `SELECT 1`)
		return err
	})
	require.Equal(t, chat.CodeUnavailable, chat.ErrorCode(err), "%v", err)
	require.NoError(t, s.Ping(ctx), "the pool recovers by itself")
}

// The error messages are keyed by constraint name: a migration that renames
// a constraint must fail here, not silently degrade a 409's message.
func TestConstraintNamesExist(t *testing.T) {
	t.Parallel()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	s, err := Open(ctx, testenv.DatabaseURL(t))
	require.NoError(t, err)
	t.Cleanup(func() { _ = s.Close() })
	require.NoError(t, s.Migrate(ctx))
	var names []string
	require.NoError(t, s.db.SelectContext(ctx, &names,
		`SELECT conname FROM pg_constraint WHERE connamespace = current_schema()::regnamespace
		 UNION SELECT indexname FROM pg_indexes WHERE schemaname = current_schema()`))
	for name := range conflictMessages {
		require.Contains(t, names, name)
	}
	for name := range foreignKeyFields {
		require.Contains(t, names, name)
	}
}
