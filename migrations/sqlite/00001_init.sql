-- The initial schema of imd on SQLite (the embedded mode): the same tables,
-- keys and constraints as ../postgres/00001_init.sql, version for version, so
-- that the one store package behaves the same over both (store/dialect.go
-- lists the differences). Every guarantee that must survive a crash or a
-- race is still a constraint here; the conversation row lock of PostgreSQL
-- is SQLite's single writer (transactions begin IMMEDIATE).
--
-- Types, where SQLite has no equivalent of the PostgreSQL column:
--   - times (timestamptz): INTEGER microseconds since the Unix epoch, UTC, in
--     columns declared TIMESTAMP: the driver binds time.Time so and reads such
--     columns back as UTC time.Time (store/dialect.go). Microseconds are
--     timestamptz's precision, and integers order and compare like times;
--   - bytea: BLOB; jsonb: TEXT checked with json_valid (RFC 8259 only, like
--     jsonb; SQLite's json() would accept JSON5);
--   - text[]: TEXT holding a JSON array of strings;
--   - bigserial: INTEGER PRIMARY KEY AUTOINCREMENT, which, unlike a plain
--     rowid, never reuses the id of a deleted row: outbox ids must only grow,
--     and a late EventsDone for a dispatched event must not delete a new one;
--   - COLLATE "C": SQLite's default BINARY collation already orders by bytes.
-- TEXT primary keys are NOT NULL explicitly: SQLite would otherwise accept
-- NULL in them.

-- +goose Up

CREATE TABLE users (
	id            TEXT NOT NULL PRIMARY KEY,
	display_name  TEXT NOT NULL,
	password_hash TEXT,
	created_at    TIMESTAMP NOT NULL
);

CREATE TABLE tokens (
	id           TEXT NOT NULL PRIMARY KEY,
	user_id      TEXT NOT NULL REFERENCES users (id) ON DELETE CASCADE,
	kind         TEXT NOT NULL CHECK (kind IN ('session', 'api')),
	name         TEXT NOT NULL DEFAULT '',
	secret_hash  BLOB NOT NULL UNIQUE,
	created_at   TIMESTAMP NOT NULL,
	expires_at   TIMESTAMP,
	last_used_at TIMESTAMP,
	revoked_at   TIMESTAMP
);
CREATE INDEX tokens_user_idx ON tokens (user_id, kind, created_at DESC);

CREATE TABLE stream_tickets (
	secret_hash BLOB NOT NULL PRIMARY KEY,
	user_id     TEXT NOT NULL REFERENCES users (id) ON DELETE CASCADE,
	token_id    TEXT,
	expires_at  TIMESTAMP NOT NULL
);
CREATE INDEX stream_tickets_expires_idx ON stream_tickets (expires_at);

CREATE TABLE conversations (
	id               TEXT NOT NULL PRIMARY KEY,
	type             TEXT NOT NULL CHECK (type IN ('direct', 'group')),
	title            TEXT NOT NULL DEFAULT '',
	direct_key       TEXT UNIQUE,
	created_at       TIMESTAMP NOT NULL,
	last_seq         INTEGER NOT NULL DEFAULT 0,
	last_activity_at TIMESTAMP NOT NULL,
	member_count     INTEGER NOT NULL,
	CHECK ((type = 'direct') = (direct_key IS NOT NULL))
);

CREATE TABLE members (
	conversation_id TEXT NOT NULL REFERENCES conversations (id) ON DELETE CASCADE,
	user_id         TEXT NOT NULL REFERENCES users (id) ON DELETE CASCADE,
	role            TEXT NOT NULL CHECK (role IN ('owner', 'admin', 'member')),
	joined_at       TIMESTAMP NOT NULL,
	last_read_seq   INTEGER NOT NULL DEFAULT 0,
	PRIMARY KEY (conversation_id, user_id)
);
CREATE INDEX members_user_idx ON members (user_id, conversation_id);
CREATE INDEX members_join_idx ON members (conversation_id, joined_at, user_id);

CREATE TABLE messages (
	conversation_id TEXT NOT NULL REFERENCES conversations (id) ON DELETE CASCADE,
	seq             INTEGER NOT NULL,
	id              TEXT NOT NULL UNIQUE,
	sender_id       TEXT NOT NULL,
	text            TEXT NOT NULL,
	metadata        TEXT CHECK (metadata IS NULL OR json_valid(metadata)),
	client_msg_id   TEXT,
	created_at      TIMESTAMP NOT NULL,
	PRIMARY KEY (conversation_id, seq)
);
-- G2, as on PostgreSQL: the store's ON CONFLICT names this partial index.
CREATE UNIQUE INDEX messages_idempotency_idx ON messages (conversation_id, sender_id, client_msg_id)
	WHERE client_msg_id IS NOT NULL;

CREATE TABLE outbox (
	id              INTEGER PRIMARY KEY AUTOINCREMENT,
	conversation_id TEXT NOT NULL,
	type            TEXT NOT NULL,
	seq             INTEGER NOT NULL DEFAULT 0,
	data            BLOB,
	recipients      TEXT,         -- JSON array; NULL: all current members
	extra           TEXT,         -- JSON array; recipients beyond the members
	-- The current time truncated to the millisecond, in microseconds.
	created_at      TIMESTAMP NOT NULL DEFAULT (CAST(round(unixepoch('subsec') * 1000) AS INTEGER) * 1000),
	-- 0 (1970) plays PostgreSQL's '-infinity': never leased.
	lease_until     TIMESTAMP NOT NULL DEFAULT 0
);
CREATE INDEX outbox_created_idx ON outbox (created_at);

-- +goose Down

DROP TABLE outbox;
DROP TABLE messages;
DROP TABLE members;
DROP TABLE conversations;
DROP TABLE stream_tickets;
DROP TABLE tokens;
DROP TABLE users;
