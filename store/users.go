package store

import (
	"context"
	"database/sql"
	"slices"
	"time"

	"imd/chat"
)

type userRow struct {
	ID           string         `db:"id"`
	DisplayName  string         `db:"display_name"`
	PasswordHash sql.NullString `db:"password_hash"`
	CreatedAt    time.Time      `db:"created_at"`
}

func (r userRow) user() chat.User {
	return chat.User{
		ID:           r.ID,
		DisplayName:  r.DisplayName,
		CreatedAt:    r.CreatedAt.UTC(),
		PasswordHash: r.PasswordHash.String,
	}
}

const userCols = `id, display_name, password_hash, created_at`

// CreateUser inserts u; CodeConflict "username is taken" if the id exists.
func (s *Store) CreateUser(ctx context.Context, u chat.User) error {
	// An empty hash is stored as NULL: "no password" is not a hash.
	_, err := s.db.ExecContext(ctx,
		`INSERT INTO users (id, display_name, password_hash, created_at)
		 VALUES ($1, $2, NULLIF($3, ''), $4)`,
		u.ID, u.DisplayName, u.PasswordHash, u.CreatedAt)
	return dbErr(err)
}

// User returns one user; CodeNotFound if there is none.
func (s *Store) User(ctx context.Context, id string) (chat.User, error) {
	var r userRow
	if err := s.rdb.GetContext(ctx, &r, `SELECT `+userCols+` FROM users WHERE id = $1`, id); err != nil {
		return chat.User{}, dbErr(err)
	}
	return r.user(), nil
}

// Users returns those of ids that exist, in the order of ids (once each).
func (s *Store) Users(ctx context.Context, ids []string) ([]chat.User, error) {
	ids = dedupe(ids)
	var rows []userRow
	if err := s.rdb.SelectContext(ctx, &rows,
		`SELECT `+userCols+` FROM users WHERE id `+s.d.inTexts(1), s.d.texts(ids)); err != nil {
		return nil, dbErr(err)
	}
	out := make([]chat.User, 0, len(rows))
	for _, r := range rows {
		out = append(out, r.user())
	}
	slices.SortFunc(out, byIndex(ids, func(u chat.User) string { return u.ID }))
	return out, nil
}

// UpdateUser sets the display name; CodeNotFound if there is no such user.
func (s *Store) UpdateUser(ctx context.Context, id, displayName string) (chat.User, error) {
	var r userRow
	if err := s.db.GetContext(ctx, &r,
		`UPDATE users SET display_name = $2 WHERE id = $1 RETURNING `+userCols,
		id, displayName); err != nil {
		return chat.User{}, dbErr(err)
	}
	return r.user(), nil
}

// dedupe returns ids without repetitions, keeping the first occurrence's
// place, and without empty strings.
func dedupe(ids []string) []string {
	seen := make(map[string]bool, len(ids))
	out := make([]string, 0, len(ids))
	for _, id := range ids {
		if id == "" || seen[id] {
			continue
		}
		seen[id] = true
		out = append(out, id)
	}
	return out
}

// byIndex orders values by the position of their key in keys: results of
// "= ANY($1)" queries come back in the order the caller asked for.
func byIndex[T any](keys []string, key func(T) string) func(a, b T) int {
	pos := make(map[string]int, len(keys))
	for i, k := range keys {
		if _, ok := pos[k]; !ok {
			pos[k] = i
		}
	}
	return func(a, b T) int { return pos[key(a)] - pos[key(b)] }
}
