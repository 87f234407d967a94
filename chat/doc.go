// Package chat is imd's domain: the types (User, Conversation, Message, Event),
// the one error type with its stable codes, the ports the adapters implement
// (Store for PostgreSQL, the realtime ports for Redis) and the use cases that
// tie them together (Send, CreateGroup, MarkRead, Stream...).
//
// It imports nothing but the standard library so that it can be read, tested
// and reused without a database: HTTP lives in handlers, SQL in store, Redis
// in realtime, and only cmd/imd knows all of them.
package chat
