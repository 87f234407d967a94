package store

import (
	"context"
	"database/sql"
	"time"

	"github.com/jmoiron/sqlx"

	"imd/chat"
)

type tokenRow struct {
	ID         string       `db:"id"`
	UserID     string       `db:"user_id"`
	Kind       string       `db:"kind"`
	Name       string       `db:"name"`
	CreatedAt  time.Time    `db:"created_at"`
	ExpiresAt  sql.NullTime `db:"expires_at"`
	LastUsedAt sql.NullTime `db:"last_used_at"`
	RevokedAt  sql.NullTime `db:"revoked_at"`
}

func (r tokenRow) token() chat.Token {
	return chat.Token{
		ID:         r.ID,
		UserID:     r.UserID,
		Kind:       chat.TokenKind(r.Kind),
		Name:       r.Name,
		CreatedAt:  r.CreatedAt.UTC(),
		ExpiresAt:  timePtr(r.ExpiresAt),
		LastUsedAt: timePtr(r.LastUsedAt),
		RevokedAt:  timePtr(r.RevokedAt),
	}
}

func timePtr(t sql.NullTime) *time.Time {
	if !t.Valid {
		return nil
	}
	u := t.Time.UTC()
	return &u
}

const tokenCols = `id, user_id, kind, name, created_at, expires_at, last_used_at, revoked_at`

// CreateToken stores t under the hash of its secret.
func (s *Store) CreateToken(ctx context.Context, t chat.Token, secretHash []byte) error {
	_, err := s.db.ExecContext(ctx,
		`INSERT INTO tokens (id, user_id, kind, name, secret_hash, created_at, expires_at, last_used_at, revoked_at)
		 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)`,
		t.ID, t.UserID, string(t.Kind), t.Name, secretHash, t.CreatedAt, t.ExpiresAt, t.LastUsedAt, t.RevokedAt)
	return dbErr(err)
}

// TokenByHash returns the token whatever its state; the caller checks expiry
// and revocation.
func (s *Store) TokenByHash(ctx context.Context, secretHash []byte) (chat.Token, error) {
	var r tokenRow
	if err := s.rdb.GetContext(ctx, &r,
		`SELECT `+tokenCols+` FROM tokens WHERE secret_hash = $1`, secretHash); err != nil {
		return chat.Token{}, dbErr(err)
	}
	return r.token(), nil
}

// TokenByID returns the token whatever its state (open streams re-check the
// token they were opened with).
func (s *Store) TokenByID(ctx context.Context, id string) (chat.Token, error) {
	var r tokenRow
	if err := s.rdb.GetContext(ctx, &r, `SELECT `+tokenCols+` FROM tokens WHERE id = $1`, id); err != nil {
		return chat.Token{}, dbErr(err)
	}
	return r.token(), nil
}

// TokensByID returns those of ids that exist, whatever their state, in no
// particular order: the token cache reads its live tokens again in bulk.
func (s *Store) TokensByID(ctx context.Context, ids []string) ([]chat.Token, error) {
	if len(ids) == 0 {
		return nil, nil
	}
	var rows []tokenRow
	if err := s.rdb.SelectContext(ctx, &rows,
		`SELECT `+tokenCols+` FROM tokens WHERE id `+s.d.inTexts(1), s.d.texts(ids)); err != nil {
		return nil, dbErr(err)
	}
	out := make([]chat.Token, len(rows))
	for i, r := range rows {
		out[i] = r.token()
	}
	return out, nil
}

// Tokens lists userID's tokens of kind that are neither revoked nor expired,
// newest first. Expiry is judged by the database clock: the port gives no time.
func (s *Store) Tokens(ctx context.Context, userID string, kind chat.TokenKind) ([]chat.Token, error) {
	var rows []tokenRow
	if err := s.rdb.SelectContext(ctx, &rows,
		`SELECT `+tokenCols+` FROM tokens
		 WHERE user_id = $1 AND kind = $2 AND revoked_at IS NULL
		   AND (expires_at IS NULL OR expires_at > `+s.d.now+`)
		 ORDER BY created_at DESC, id DESC`,
		userID, string(kind)); err != nil {
		return nil, dbErr(err)
	}
	out := make([]chat.Token, 0, len(rows))
	for _, r := range rows {
		out = append(out, r.token())
	}
	return out, nil
}

// RevokeToken revokes one of userID's live tokens; CodeNotFound if userID has
// no unrevoked token by that id (so a user cannot probe others' token ids).
func (s *Store) RevokeToken(ctx context.Context, userID, tokenID string, at time.Time) error {
	res, err := s.db.ExecContext(ctx,
		`UPDATE tokens SET revoked_at = $3 WHERE id = $1 AND user_id = $2 AND revoked_at IS NULL`,
		tokenID, userID, at)
	return affected(res, err)
}

// TouchToken records a use of the token. GREATEST keeps last_used_at from
// moving back when requests of one token finish out of order (COALESCE:
// SQLite's MAX is NULL when an argument is, PostgreSQL's GREATEST ignores it).
func (s *Store) TouchToken(ctx context.Context, tokenID string, at time.Time) error {
	res, err := s.db.ExecContext(ctx,
		`UPDATE tokens SET last_used_at = `+s.d.greatest+`(COALESCE(last_used_at, $2), $2) WHERE id = $1`, tokenID, at)
	return affected(res, err)
}

// ticketPurgeAge is how long past its expiry an unused ticket is kept: long
// enough that a database clock ahead of the nodes' never purges a ticket a
// node still accepts, short enough that abandoned tickets do not pile up.
const ticketPurgeAge = time.Hour

// CreateTicket stores a single-use stream ticket, and purges tickets that
// expired long ago and were never used (the table has no other cleanup).
// Two statements in one transaction: SQLite has no DELETE inside a WITH.
func (s *Store) CreateTicket(ctx context.Context, secretHash []byte, p chat.Principal, expiresAt time.Time) error {
	return s.inTx(ctx, func(tx *sqlx.Tx) error {
		if _, err := tx.ExecContext(ctx,
			`DELETE FROM stream_tickets WHERE expires_at < `+s.d.plusMicros(s.d.now, "$1"),
			-ticketPurgeAge.Microseconds()); err != nil {
			return err
		}
		_, err := tx.ExecContext(ctx,
			`INSERT INTO stream_tickets (secret_hash, user_id, token_id, expires_at)
			 VALUES ($1, $2, NULLIF($3, ''), $4)`,
			secretHash, p.UserID, p.TokenID, expiresAt)
		return err
	})
}

// ConsumeTicket deletes the ticket and returns its principal: a DELETE ...
// RETURNING hands the row to exactly one of concurrent consumers. CodeNotFound
// if absent or expired (an expired ticket is deleted all the same).
func (s *Store) ConsumeTicket(ctx context.Context, secretHash []byte, now time.Time) (chat.Principal, error) {
	var r struct {
		UserID    string         `db:"user_id"`
		TokenID   sql.NullString `db:"token_id"`
		ExpiresAt time.Time      `db:"expires_at"`
	}
	if err := s.db.GetContext(ctx, &r,
		`DELETE FROM stream_tickets WHERE secret_hash = $1 RETURNING user_id, token_id, expires_at`,
		secretHash); err != nil {
		return chat.Principal{}, dbErr(err)
	}
	if !r.ExpiresAt.After(now) {
		return chat.Principal{}, chat.ErrNotFound
	}
	return chat.Principal{UserID: r.UserID, TokenID: r.TokenID.String}, nil
}

// affected maps an UPDATE or DELETE that matched no row to CodeNotFound.
func affected(res sql.Result, err error) error {
	if err != nil {
		return dbErr(err)
	}
	n, err := res.RowsAffected()
	if err != nil {
		return dbErr(err)
	}
	if n == 0 {
		return chat.ErrNotFound
	}
	return nil
}
