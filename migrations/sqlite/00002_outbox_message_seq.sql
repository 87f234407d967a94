-- +goose Up

-- A user's event log that has lost its place in a conversation (Redis lost
-- the log, or a new member's conversation.created is still in flight) is
-- filled from the conversation's oldest message still awaiting dispatch
-- (store.PendingMessages): only such a message can still arrive late. This
-- index finds it per conversation, however many events an outage left.
CREATE INDEX outbox_message_seq_idx ON outbox (conversation_id, seq) WHERE type = 'message.created';

-- +goose Down

DROP INDEX outbox_message_seq_idx;
