package main

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"time"
)

// client is the tool's only way into imd: the public REST API and the event
// stream, nothing else, so what it measures is what any client would see.
// Every non-2xx answer and every transport failure is counted by status.
type client struct {
	base  string
	admin string
	// rest carries the short requests; its pool keeps one idle connection
	// per concurrent sender, so a run at full speed never pays for a TCP
	// handshake (the default of 2 idle connections per host would).
	rest *http.Client
	// streams carries the SSE requests: each holds its connection for the
	// stream's life, without a client timeout.
	streams *http.Client
	errs    *statusCounter
}

func newClient(base, admin string, errs *statusCounter) *client {
	return &client{
		base:    strings.TrimSuffix(base, "/"),
		admin:   admin,
		rest:    &http.Client{Transport: newTransport(), Timeout: 60 * time.Second},
		streams: &http.Client{Transport: newTransport()},
		errs:    errs,
	}
}

// newTransport: no proxy (the target is loopback, whatever the environment
// says), no per-host connection cap, and a large idle pool.
func newTransport() *http.Transport {
	return &http.Transport{
		Proxy:               nil,
		DialContext:         (&net.Dialer{Timeout: 10 * time.Second, KeepAlive: 30 * time.Second}).DialContext,
		MaxIdleConns:        0, // no overall limit
		MaxIdleConnsPerHost: 16384,
		MaxConnsPerHost:     0,
		IdleConnTimeout:     90 * time.Second,
		DisableCompression:  true, // the server does not compress; asking would only cost a header
		ForceAttemptHTTP2:   false,
	}
}

func (c *client) close() {
	c.rest.CloseIdleConnections()
	c.streams.CloseIdleConnections()
}

// apiError is a non-2xx answer.
type apiError struct {
	method, path string
	status       int
	body         string
}

func (e *apiError) Error() string {
	return fmt.Sprintf("%s %s: %d %s", e.method, e.path, e.status, strings.TrimSpace(e.body))
}

// do sends one request and returns the body of a 2xx answer; anything
// else is counted and returned as an error. buf, when given, is reused
// for the body so hot paths do not allocate one per request.
func (c *client) do(ctx context.Context, method, path, token string, body []byte, hdr http.Header, buf *bytes.Buffer) (int, []byte, http.Header, error) {
	var rd io.Reader
	if body != nil {
		rd = bytes.NewReader(body)
	}
	req, err := http.NewRequestWithContext(ctx, method, c.base+path, rd)
	if err != nil {
		return 0, nil, nil, err
	}
	for k, v := range hdr {
		req.Header[k] = v
	}
	if body != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	req.Header.Set("Authorization", "Bearer "+token)
	res, err := c.rest.Do(req)
	if err != nil {
		if ctx.Err() == nil {
			c.errs.add(0)
		}
		return 0, nil, nil, err
	}
	defer res.Body.Close()
	if buf == nil {
		buf = new(bytes.Buffer)
	}
	buf.Reset()
	if _, err := buf.ReadFrom(res.Body); err != nil {
		if ctx.Err() == nil {
			c.errs.add(0)
		}
		return res.StatusCode, nil, res.Header, err
	}
	if res.StatusCode < 200 || res.StatusCode > 299 {
		c.errs.add(res.StatusCode)
		return res.StatusCode, buf.Bytes(), res.Header, &apiError{method: method, path: path, status: res.StatusCode, body: buf.String()}
	}
	return res.StatusCode, buf.Bytes(), res.Header, nil
}

func (c *client) doJSON(ctx context.Context, method, path, token string, in, out any) error {
	var body []byte
	if in != nil {
		var err error
		if body, err = json.Marshal(in); err != nil {
			return err
		}
	}
	_, rb, _, err := c.do(ctx, method, path, token, body, nil, nil)
	if err != nil {
		return err
	}
	if out != nil {
		if err := json.Unmarshal(rb, out); err != nil {
			return fmt.Errorf("%s %s: %w", method, path, err)
		}
	}
	return nil
}

// createUser provisions a user without a password (POST /v1/admin/users).
func (c *client) createUser(ctx context.Context, name string) error {
	return c.doJSON(ctx, "POST", "/v1/admin/users", c.admin, map[string]any{"username": name}, nil)
}

// mintToken mints a bearer token for a user (POST /v1/admin/users/{id}/tokens).
func (c *client) mintToken(ctx context.Context, name string) (string, error) {
	var out struct {
		AccessToken string `json:"access_token"`
	}
	err := c.doJSON(ctx, "POST", "/v1/admin/users/"+url.PathEscape(name)+"/tokens", c.admin, map[string]any{"name": "imbench"}, &out)
	if err == nil && out.AccessToken == "" {
		err = fmt.Errorf("token for %s: empty access_token", name)
	}
	return out.AccessToken, err
}

// memberChunk bounds the ids in one request: the server caps a request
// body at 64 KiB, which 5000 ids of this tool's length (~16 bytes each
// in JSON) would exceed, so groups are built in chunks of this size.
const memberChunk = 1000

// createGroup creates a group owned by owner with the given members,
// adding beyond the first chunk with POST …/members.
func (c *client) createGroup(ctx context.Context, owner *user, title string, members []string) (string, error) {
	first := members[:min(len(members), memberChunk-1)]
	var conv struct {
		ID string `json:"id"`
	}
	if err := c.doJSON(ctx, "POST", "/v1/conversations", owner.token,
		map[string]any{"type": "group", "title": title, "member_ids": first}, &conv); err != nil {
		return "", err
	}
	for rest := members[len(first):]; len(rest) > 0; {
		n := min(len(rest), memberChunk)
		if err := c.doJSON(ctx, "POST", "/v1/conversations/"+conv.ID+"/members", owner.token,
			map[string]any{"user_ids": rest[:n]}, nil); err != nil {
			return "", err
		}
		rest = rest[n:]
	}
	return conv.ID, nil
}

// createDirect returns the direct conversation between u and peer.
func (c *client) createDirect(ctx context.Context, u *user, peer string) (string, error) {
	var conv struct {
		ID string `json:"id"`
	}
	err := c.doJSON(ctx, "POST", "/v1/conversations", u.token, map[string]any{"type": "direct", "member_ids": []string{peer}}, &conv)
	return conv.ID, err
}

// send posts one message. It returns the status, the stored message's
// fields, and for a 429 how long the server asks to wait.
func (c *client) send(ctx context.Context, token, path string, body []byte, key string, buf *bytes.Buffer, m *msgInfo) (int, time.Duration, error) {
	status, rb, hdr, err := c.do(ctx, "POST", path, token, body, http.Header{"Idempotency-Key": {key}}, buf)
	if err != nil {
		var retry time.Duration
		if status == http.StatusTooManyRequests && hdr != nil {
			if s, perr := strconv.Atoi(hdr.Get("Retry-After")); perr == nil {
				retry = time.Duration(s) * time.Second
			}
		}
		return status, retry, err
	}
	if !parseMessage(rb, m) || m.seq < 1 {
		return status, 0, fmt.Errorf("send: unreadable message in the answer: %.200s", rb)
	}
	return status, 0, nil
}

// histMsg is one entry of a history page.
type histMsg struct {
	ID  string `json:"id"`
	Seq int64  `json:"seq"`
}

// history reads one page of a conversation's messages after afterSeq.
func (c *client) history(ctx context.Context, token, cid string, afterSeq int64, limit int) ([]histMsg, bool, error) {
	var out struct {
		Messages []histMsg `json:"messages"`
		HasMore  bool      `json:"has_more"`
	}
	path := fmt.Sprintf("/v1/conversations/%s/messages?after_seq=%d&limit=%d", cid, afterSeq, limit)
	err := c.doJSON(ctx, "GET", path, token, nil, &out)
	return out.Messages, out.HasMore, err
}

// openStream opens GET /v1/events as SSE, resuming after lastID when it is
// not empty. The caller reads and closes the body.
func (c *client) openStream(ctx context.Context, token string, lastID []byte) (*http.Response, error) {
	req, err := http.NewRequestWithContext(ctx, "GET", c.base+"/v1/events", nil)
	if err != nil {
		return nil, err
	}
	req.Header.Set("Accept", "text/event-stream")
	req.Header.Set("Authorization", "Bearer "+token)
	if len(lastID) > 0 {
		req.Header.Set("Last-Event-ID", string(lastID))
	}
	res, err := c.streams.Do(req)
	if err != nil {
		if ctx.Err() == nil {
			c.errs.add(0)
		}
		return nil, err
	}
	if res.StatusCode != http.StatusOK || !strings.HasPrefix(res.Header.Get("Content-Type"), "text/event-stream") {
		b, _ := io.ReadAll(io.LimitReader(res.Body, 4096))
		res.Body.Close()
		if res.StatusCode == http.StatusOK {
			return nil, fmt.Errorf("GET /v1/events: content type %q", res.Header.Get("Content-Type"))
		}
		c.errs.add(res.StatusCode)
		return nil, &apiError{method: "GET", path: "/v1/events", status: res.StatusCode, body: string(b)}
	}
	return res, nil
}
