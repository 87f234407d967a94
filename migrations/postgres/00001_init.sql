-- The initial schema of imd. PostgreSQL is the source of truth (DESIGN.md):
-- every guarantee that must survive a crash or a race (idempotent sends, gap-free
-- seq, single-use tickets, one direct conversation per pair) is a constraint or
-- a row lock here, not a check in application memory.
--
-- Times are timestamptz written by the application already truncated to the
-- millisecond (chat.Now), so what is read back equals what was returned.

-- +goose Up

CREATE TABLE users (
	id            text PRIMARY KEY,           -- the username: immutable and addressable
	display_name  text NOT NULL,
	password_hash text,                       -- NULL for users provisioned without a password
	created_at    timestamptz NOT NULL
);

CREATE TABLE tokens (
	id           text PRIMARY KEY,
	user_id      text NOT NULL REFERENCES users (id) ON DELETE CASCADE,
	kind         text NOT NULL CHECK (kind IN ('session', 'api')),
	name         text NOT NULL DEFAULT '',
	-- Only a hash of the secret: a leaked database holds no usable token.
	secret_hash  bytea NOT NULL UNIQUE,
	created_at   timestamptz NOT NULL,
	expires_at   timestamptz,
	last_used_at timestamptz,
	revoked_at   timestamptz
);
-- Listing a user's tokens of a kind, newest first.
CREATE INDEX tokens_user_idx ON tokens (user_id, kind, created_at DESC);

-- Single-use tickets for EventSource, which cannot send an Authorization header.
CREATE TABLE stream_tickets (
	secret_hash bytea PRIMARY KEY,
	user_id     text NOT NULL REFERENCES users (id) ON DELETE CASCADE,
	token_id    text,
	expires_at  timestamptz NOT NULL
);
-- Purging expired tickets that were never used.
CREATE INDEX stream_tickets_expires_idx ON stream_tickets (expires_at);

CREATE TABLE conversations (
	-- Byte order (COLLATE "C"): lists break activity ties by id, and the
	-- Redis session cache orders ties by raw bytes; both must agree.
	id               text COLLATE "C" PRIMARY KEY,
	type             text NOT NULL CHECK (type IN ('direct', 'group')),
	title            text NOT NULL DEFAULT '',
	-- The pair's user ids, sorted and joined by a space: the UNIQUE constraint
	-- makes "one direct conversation per pair" hold under concurrent creation.
	direct_key       text UNIQUE,
	created_at       timestamptz NOT NULL,
	-- The seq of the newest message; incremented under the row lock by each
	-- send, so commit order equals seq order (G3).
	last_seq         bigint NOT NULL DEFAULT 0,
	last_activity_at timestamptz NOT NULL,
	member_count     integer NOT NULL,
	CHECK ((type = 'direct') = (direct_key IS NOT NULL))
);

CREATE TABLE members (
	conversation_id text NOT NULL REFERENCES conversations (id) ON DELETE CASCADE,
	user_id         text NOT NULL REFERENCES users (id) ON DELETE CASCADE,
	role            text NOT NULL CHECK (role IN ('owner', 'admin', 'member')),
	joined_at       timestamptz NOT NULL,
	last_read_seq   bigint NOT NULL DEFAULT 0,
	PRIMARY KEY (conversation_id, user_id)
);
-- A user's conversations (list, activity page, sharing and peer look-ups).
CREATE INDEX members_user_idx ON members (user_id, conversation_id);
-- Member pages in join order.
CREATE INDEX members_join_idx ON members (conversation_id, joined_at, user_id);

CREATE TABLE messages (
	conversation_id text NOT NULL REFERENCES conversations (id) ON DELETE CASCADE,
	seq             bigint NOT NULL,
	id              text NOT NULL UNIQUE,
	sender_id       text NOT NULL,
	text            text NOT NULL,
	metadata        jsonb,
	client_msg_id   text,
	created_at      timestamptz NOT NULL,
	-- History pages and unread counts are range scans of this key.
	PRIMARY KEY (conversation_id, seq)
);
-- G2: a sender's idempotency key is used once per conversation, enforced by
-- the database so that retries racing on different nodes still store one message.
CREATE UNIQUE INDEX messages_idempotency_idx ON messages (conversation_id, sender_id, client_msg_id)
	WHERE client_msg_id IS NOT NULL;

-- Events committed with the change that caused them and deleted once
-- dispatched; a node dying between commit and dispatch leaves them here for
-- any node's sweeper.
CREATE TABLE outbox (
	id              bigserial PRIMARY KEY,
	conversation_id text NOT NULL,
	type            text NOT NULL,
	seq             bigint NOT NULL DEFAULT 0,
	data            bytea,        -- the payload exactly as marshalled (bytea: no re-normalisation)
	recipients      text[],       -- NULL: all current members
	extra           text[],       -- recipients beyond the members (the member just removed)
	created_at      timestamptz NOT NULL DEFAULT date_trunc('milliseconds', now()),
	-- A sweeper leases rows so that nodes do not dispatch the same events at once.
	lease_until     timestamptz NOT NULL DEFAULT '-infinity'
);
-- The sweeper looks for events older than the fast path's grace period.
CREATE INDEX outbox_created_idx ON outbox (created_at);

-- +goose Down

DROP TABLE outbox;
DROP TABLE messages;
DROP TABLE members;
DROP TABLE conversations;
DROP TABLE stream_tickets;
DROP TABLE tokens;
DROP TABLE users;
