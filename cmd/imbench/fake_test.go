package main

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"net/http/httptest"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"
)

// fakeIMD implements just the routes imbench uses — admin users and
// tokens, conversations and members, sending and history, and the SSE
// event stream with Last-Event-ID resume — in memory, and can be told to
// misdeliver: drop, duplicate or reorder one user's copy of a message. It
// misdelivers into the user's event log, so a resumed stream replays the
// same faults the live one showed, as a faulty real server would.
type fakeIMD struct {
	admin string

	mu     sync.Mutex
	users  map[string]*fakeUser // by name
	tokens map[string]string    // token → user name
	convs  map[string]*fakeConv
	nconv  int
	faults map[string]map[int64]fault // user → seq → fault
	// hideFromHistory leaves seqs out of GET …/messages (a gap).
	hideFromHistory map[int64]bool
	// refuseStreams answers GET /v1/events with 403.
	refuseStreams bool
}

type fault int

const (
	deliver fault = iota
	drop          // never appended to the user's log
	dup           // appended twice (two event ids)
	reorder       // held back and appended after the conversation's next message
)

type fakeUser struct {
	name    string
	log     [][]byte // SSE frames; the event id is the index + 1
	streams map[*fakeStream]struct{}
	held    map[string][]byte // conversation → a frame held back by reorder
}

type fakeStream struct {
	frames chan []byte
	kill   func()
}

type fakeConv struct {
	id      string
	group   bool
	members []string
	msgs    [][]byte          // message JSON by seq-1
	keys    map[string][]byte // sender+key → message (idempotency)
}

func newFakeIMD(t testing.TB) (*fakeIMD, *httptest.Server) {
	f := &fakeIMD{admin: "admin-secret", users: map[string]*fakeUser{}, tokens: map[string]string{},
		convs: map[string]*fakeConv{}, faults: map[string]map[int64]fault{}, hideFromHistory: map[int64]bool{}}
	mux := http.NewServeMux()
	mux.HandleFunc("POST /v1/admin/users", f.adminUser)
	mux.HandleFunc("POST /v1/admin/users/{id}/tokens", f.adminToken)
	mux.HandleFunc("POST /v1/conversations", f.authed(f.createConv))
	mux.HandleFunc("POST /v1/conversations/{id}/members", f.authed(f.addMembers))
	mux.HandleFunc("POST /v1/conversations/{id}/messages", f.authed(f.send))
	mux.HandleFunc("GET /v1/conversations/{id}/messages", f.authed(f.history))
	mux.HandleFunc("GET /v1/events", f.authed(f.events))
	// The real server caps request bodies at 64 KiB; so does the fake, so a
	// tool that sent oversized member lists would fail here too.
	srv := httptest.NewServer(http.MaxBytesHandler(mux, 64<<10))
	t.Cleanup(srv.Close)
	return f, srv
}

// fault sets what happens to user's copy of seq (in every conversation).
func (f *fakeIMD) fault(user string, seq int64, what fault) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.faults[user] == nil {
		f.faults[user] = map[int64]fault{}
	}
	f.faults[user][seq] = what
}

func problem(w http.ResponseWriter, status int, detail string) {
	w.Header().Set("Content-Type", "application/problem+json")
	w.WriteHeader(status)
	json.NewEncoder(w).Encode(map[string]any{"status": status, "detail": detail})
}

func reply(w http.ResponseWriter, status int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	json.NewEncoder(w).Encode(v)
}

func decode(w http.ResponseWriter, r *http.Request, v any) bool {
	d := json.NewDecoder(r.Body)
	d.DisallowUnknownFields()
	if err := d.Decode(v); err != nil {
		if strings.Contains(err.Error(), "too large") {
			problem(w, 413, err.Error())
		} else {
			problem(w, 400, err.Error())
		}
		return false
	}
	return true
}

func (f *fakeIMD) adminUser(w http.ResponseWriter, r *http.Request) {
	if r.Header.Get("Authorization") != "Bearer "+f.admin {
		problem(w, 401, "admin token")
		return
	}
	var in struct {
		Username string `json:"username"`
	}
	if !decode(w, r, &in) {
		return
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	if _, ok := f.users[in.Username]; ok {
		problem(w, 409, "taken")
		return
	}
	f.users[in.Username] = &fakeUser{name: in.Username, streams: map[*fakeStream]struct{}{}, held: map[string][]byte{}}
	reply(w, 201, map[string]any{"id": in.Username, "display_name": in.Username, "created_at": "2025-01-01T00:00:00.000Z"})
}

func (f *fakeIMD) adminToken(w http.ResponseWriter, r *http.Request) {
	if r.Header.Get("Authorization") != "Bearer "+f.admin {
		problem(w, 401, "admin token")
		return
	}
	var in struct {
		Name string `json:"name"`
	}
	if !decode(w, r, &in) {
		return
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	name := r.PathValue("id")
	if _, ok := f.users[name]; !ok {
		problem(w, 404, "no user")
		return
	}
	tok := fmt.Sprintf("tok-%d-%s", len(f.tokens), name)
	f.tokens[tok] = name
	reply(w, 201, map[string]any{"id": "t" + strconv.Itoa(len(f.tokens)), "name": in.Name, "access_token": tok,
		"created_at": "2025-01-01T00:00:00.000Z", "expires_at": nil, "last_used_at": nil})
}

func (f *fakeIMD) authed(h func(w http.ResponseWriter, r *http.Request, me string)) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		f.mu.Lock()
		me, ok := f.tokens[strings.TrimPrefix(r.Header.Get("Authorization"), "Bearer ")]
		f.mu.Unlock()
		if !ok {
			problem(w, 401, "token")
			return
		}
		h(w, r, me)
	}
}

func (f *fakeIMD) createConv(w http.ResponseWriter, r *http.Request, me string) {
	var in struct {
		Type      string   `json:"type"`
		Title     string   `json:"title"`
		MemberIDs []string `json:"member_ids"`
	}
	if !decode(w, r, &in) {
		return
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	for _, m := range in.MemberIDs {
		if _, ok := f.users[m]; !ok {
			problem(w, 400, "unknown member "+m)
			return
		}
	}
	if in.Type == "direct" {
		for _, c := range f.convs {
			if !c.group && ((c.members[0] == me && c.members[1] == in.MemberIDs[0]) || (c.members[1] == me && c.members[0] == in.MemberIDs[0])) {
				reply(w, 200, map[string]any{"id": c.id, "type": "direct"})
				return
			}
		}
	}
	f.nconv++
	c := &fakeConv{id: fmt.Sprintf("c_%d", f.nconv), group: in.Type == "group", members: append([]string{me}, in.MemberIDs...), keys: map[string][]byte{}}
	if len(c.members) > 5000 {
		problem(w, 400, "too many members")
		return
	}
	f.convs[c.id] = c
	reply(w, 201, map[string]any{"id": c.id, "type": in.Type, "member_count": len(c.members)})
}

func (f *fakeIMD) addMembers(w http.ResponseWriter, r *http.Request, me string) {
	var in struct {
		UserIDs []string `json:"user_ids"`
	}
	if !decode(w, r, &in) {
		return
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	c, ok := f.convs[r.PathValue("id")]
	if !ok || c.members[0] != me {
		problem(w, 404, "conversation")
		return
	}
	c.members = append(c.members, in.UserIDs...)
	reply(w, 200, map[string]any{"members": []any{}})
}

func (f *fakeIMD) send(w http.ResponseWriter, r *http.Request, me string) {
	var in struct {
		Text     string          `json:"text"`
		Metadata json.RawMessage `json:"metadata"`
	}
	if !decode(w, r, &in) {
		return
	}
	key := r.Header.Get("Idempotency-Key")
	f.mu.Lock()
	defer f.mu.Unlock()
	c, ok := f.convs[r.PathValue("id")]
	if !ok || !c.has(me) {
		problem(w, 404, "conversation")
		return
	}
	if m, ok := c.keys[me+"\x00"+key]; key != "" && ok {
		w.Header().Set("Content-Type", "application/json")
		w.WriteHeader(200)
		w.Write(m)
		return
	}
	seq := int64(len(c.msgs) + 1)
	msg, _ := json.Marshal(map[string]any{"id": fmt.Sprintf("m_%s_%d", c.id, seq), "conversation_id": c.id, "seq": seq,
		"sender_id": me, "text": in.Text, "metadata": in.Metadata, "client_msg_id": key, "created_at": "2025-01-01T00:00:00.000Z"})
	c.msgs = append(c.msgs, msg)
	if key != "" {
		c.keys[me+"\x00"+key] = msg
	}
	for _, name := range c.members {
		f.deliver(f.users[name], c.id, seq, msg)
	}
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(201)
	w.Write(msg)
}

func (c *fakeConv) has(u string) bool {
	for _, m := range c.members {
		if m == u {
			return true
		}
	}
	return false
}

// deliver appends msg to u's log as the configured fault says and pushes
// what was appended to u's live streams. f.mu is held.
func (f *fakeIMD) deliver(u *fakeUser, cid string, seq int64, msg []byte) {
	frame := func() []byte { return []byte("event: message.created\ndata: " + string(msg) + "\n\n") }
	var out [][]byte
	switch f.faults[u.name][seq] {
	case drop:
	case dup:
		out = append(out, frame(), frame())
	case reorder:
		u.held[cid] = frame()
	default:
		out = append(out, frame())
	}
	if h, ok := u.held[cid]; ok && f.faults[u.name][seq] != reorder {
		out = append(out, h)
		delete(u.held, cid)
	}
	for _, fr := range out {
		u.log = append(u.log, fr)
		withID := append([]byte("id: e-"+strconv.Itoa(len(u.log))+"\n"), fr...)
		for s := range u.streams {
			select {
			case s.frames <- withID:
			default: // a stream that does not keep up is ended; it resumes from the log
				delete(u.streams, s)
				s.kill()
			}
		}
	}
}

func (f *fakeIMD) history(w http.ResponseWriter, r *http.Request, me string) {
	after, _ := strconv.ParseInt(r.URL.Query().Get("after_seq"), 10, 64)
	limit, _ := strconv.Atoi(r.URL.Query().Get("limit"))
	f.mu.Lock()
	defer f.mu.Unlock()
	c, ok := f.convs[r.PathValue("id")]
	if !ok || !c.has(me) {
		problem(w, 404, "conversation")
		return
	}
	var page []json.RawMessage
	i := after
	for ; i < int64(len(c.msgs)) && len(page) < limit; i++ {
		if !f.hideFromHistory[i+1] {
			page = append(page, c.msgs[i])
		}
	}
	reply(w, 200, map[string]any{"messages": page, "has_more": i < int64(len(c.msgs))})
}

// events serves SSE: the log after Last-Event-ID ("e-N"), ready, then live
// frames. Registration and the replay snapshot happen under f.mu, as
// appends do, so nothing falls between replay and live.
func (f *fakeIMD) events(w http.ResponseWriter, r *http.Request, me string) {
	f.mu.Lock()
	refuse := f.refuseStreams
	f.mu.Unlock()
	if refuse {
		problem(w, 403, "streams refused")
		return
	}
	ctx, cancel := context.WithCancel(r.Context())
	defer cancel()
	s := &fakeStream{frames: make(chan []byte, 4096), kill: cancel}
	from := 0
	if id := r.Header.Get("Last-Event-ID"); id != "" {
		n, err := strconv.Atoi(strings.TrimPrefix(id, "e-"))
		if err != nil {
			problem(w, 400, "bad id")
			return
		}
		from = n
	}
	f.mu.Lock()
	u := f.users[me]
	var replay []byte
	for i := from; i < len(u.log); i++ {
		replay = append(replay, "id: e-"+strconv.Itoa(i+1)+"\n"...)
		replay = append(replay, u.log[i]...)
	}
	pos := len(u.log)
	u.streams[s] = struct{}{}
	f.mu.Unlock()
	defer func() {
		f.mu.Lock()
		delete(u.streams, s)
		f.mu.Unlock()
	}()

	w.Header().Set("Content-Type", "text/event-stream")
	w.Header().Set("Cache-Control", "no-cache")
	w.WriteHeader(200)
	fmt.Fprintf(w, "retry: 1000\n\n%s: ping\n\nevent: ready\ndata: {\"last_event_id\":\"e-%d\"}\n\n", replay, pos)
	w.(http.Flusher).Flush()
	for {
		select {
		case <-ctx.Done():
			return
		case fr := <-s.frames:
			w.Write(fr)
			for more := true; more; {
				select {
				case fr := <-s.frames:
					w.Write(fr)
				default:
					more = false
				}
			}
			w.(http.Flusher).Flush()
		}
	}
}

// testTimeout bounds a whole tool run in the tests, so a bug hangs nothing.
const testTimeout = 60 * time.Second
