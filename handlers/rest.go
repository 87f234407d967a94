package handlers

import (
	"context"
	"net/http"
	"time"

	"imd/chat"
	"imd/handlers/api"
)

// The REST operations of openapi.yaml. Each one decodes the request, makes
// one use-case call and encodes the answer; errors go back unchanged to the
// strict server's ResponseErrorHandlerFunc, which is the one place that maps
// them to a status and a problem+json body. The spec validator has already
// checked the request, so only what it cannot express is checked here.

// errNoBody answers a required body that is missing (the validator catches
// it first; this keeps a nil dereference impossible should it not run). A
// fresh error each time: an *chat.Error is a mutable value.
func errNoBody() error { return chat.Invalid("body", "required") }

func deref[T any](p *T) T {
	var zero T
	if p == nil {
		return zero
	}
	return *p
}

// ---- operations ----

// Healthz says the process is alive; it checks no dependency.
func (s *Server) Healthz(ctx context.Context, _ api.HealthzRequestObject) (api.HealthzResponseObject, error) {
	return api.Healthz200JSONResponse{Status: api.LivenessStatusOk}, nil
}

// Readyz reports whether PostgreSQL and Redis answer. A failure is a 503
// Health body naming the dependency, not a problem document: load balancers
// and operators read the checks.
func (s *Server) Readyz(ctx context.Context, _ api.ReadyzRequestObject) (api.ReadyzResponseObject, error) {
	pgErr, redisErr := s.svc.Ready(ctx)
	h := api.Health{Status: api.HealthStatusOk,
		Checks: api.HealthChecks{Postgres: api.HealthStatusOk, Redis: api.HealthStatusOk}}
	if pgErr != nil {
		h.Checks.Postgres = api.HealthStatusUnavailable
	}
	if redisErr != nil {
		h.Checks.Redis = api.HealthStatusUnavailable
	}
	if pgErr == nil && redisErr == nil {
		return api.Readyz200JSONResponse(h), nil
	}
	h.Status = api.HealthStatusUnavailable
	if s.log != nil {
		s.log.Warn("not ready", "postgres", pgErr, "redis", redisErr)
	}
	return api.Readyz503JSONResponse(h), nil
}

// ---- accounts and tokens ----

func (s *Server) Register(ctx context.Context, req api.RegisterRequestObject) (api.RegisterResponseObject, error) {
	if req.Body == nil {
		return nil, errNoBody()
	}
	b := req.Body
	res, err := s.svc.Register(ctx, b.Username, b.Password, deref(b.DisplayName))
	if err != nil {
		return nil, err
	}
	return api.Register201JSONResponse(apiAuth(res)), nil
}

// Login also sets the session cookie carrying the same token, for
// same-origin browser apps and their EventSource.
func (s *Server) Login(ctx context.Context, req api.LoginRequestObject) (api.LoginResponseObject, error) {
	if req.Body == nil {
		return nil, errNoBody()
	}
	res, err := s.svc.Login(ctx, req.Body.Username, req.Body.Password, clientAddr(ctx))
	if err != nil {
		return nil, err
	}
	c := s.sessionCookie(res.Secret)
	if exp := res.Token.ExpiresAt; exp != nil {
		c.Expires = *exp
		// Max-Age wins over Expires in browsers and does not depend on the
		// client's clock.
		c.MaxAge = max(1, int(time.Until(*exp).Seconds()))
	}
	return api.Login200JSONResponse{
		Body:    apiAuth(res),
		Headers: api.Login200ResponseHeaders{SetCookie: c.String()},
	}, nil
}

// sessionCookie is the cookie login sets and logout clears; both must agree
// on name, path and attributes or the browser keeps two cookies.
func (s *Server) sessionCookie(value string) *http.Cookie {
	return &http.Cookie{Name: SessionCookie, Value: value, Path: "/", HttpOnly: true,
		SameSite: http.SameSiteLaxMode, Secure: s.cfg.CookieSecure}
}

// Logout revokes the token in use. When that token came from the session
// cookie, the cookie is cleared too; a bearer logout leaves any cookie (which
// may hold another session) alone, as the spec says.
func (s *Server) Logout(ctx context.Context, _ api.LogoutRequestObject) (api.LogoutResponseObject, error) {
	if err := s.svc.Logout(ctx, principalFrom(ctx)); err != nil {
		return nil, err
	}
	var resp api.Logout204Response
	if viaCookie(ctx) {
		c := s.sessionCookie("")
		c.MaxAge = -1 // renders Max-Age=0: delete now
		v := c.String()
		resp.Headers.SetCookie = &v
	}
	return resp, nil
}

func (s *Server) CreateToken(ctx context.Context, req api.CreateTokenRequestObject) (api.CreateTokenResponseObject, error) {
	if req.Body == nil {
		return nil, errNoBody()
	}
	iss, err := s.svc.CreateAPIToken(ctx, principalFrom(ctx), req.Body.Name, ttlOf(req.Body.ExpiresInSeconds))
	if err != nil {
		return nil, err
	}
	return api.CreateToken201JSONResponse(apiTokenCreated(iss)), nil
}

// ttlOf maps an absent lifetime to 0, which the domain reads as "never expires".
func ttlOf(seconds *int64) time.Duration {
	return time.Duration(deref(seconds)) * time.Second
}

func (s *Server) ListTokens(ctx context.Context, _ api.ListTokensRequestObject) (api.ListTokensResponseObject, error) {
	ts, err := s.svc.ListTokens(ctx, principalFrom(ctx))
	if err != nil {
		return nil, err
	}
	return api.ListTokens200JSONResponse{Tokens: apiTokens(ts)}, nil
}

func (s *Server) RevokeToken(ctx context.Context, req api.RevokeTokenRequestObject) (api.RevokeTokenResponseObject, error) {
	if err := s.svc.RevokeToken(ctx, principalFrom(ctx), req.TokenID); err != nil {
		return nil, err
	}
	return api.RevokeToken204Response{}, nil
}

func (s *Server) CreateStreamTicket(ctx context.Context, _ api.CreateStreamTicketRequestObject) (api.CreateStreamTicketResponseObject, error) {
	t, err := s.svc.CreateTicket(ctx, principalFrom(ctx))
	if err != nil {
		return nil, err
	}
	return api.CreateStreamTicket201JSONResponse{Ticket: t.Secret, ExpiresAt: t.ExpiresAt}, nil
}

// AdminCreateUser runs behind the admin-token check of the auth middleware.
func (s *Server) AdminCreateUser(ctx context.Context, req api.AdminCreateUserRequestObject) (api.AdminCreateUserResponseObject, error) {
	if req.Body == nil {
		return nil, errNoBody()
	}
	b := req.Body
	u, err := s.svc.AdminCreateUser(ctx, b.Username, deref(b.Password), deref(b.DisplayName))
	if err != nil {
		return nil, err
	}
	return api.AdminCreateUser201JSONResponse(apiUser(u)), nil
}

// AdminCreateUserToken takes an optional body: without one the token is
// named by the domain's default and does not expire.
func (s *Server) AdminCreateUserToken(ctx context.Context, req api.AdminCreateUserTokenRequestObject) (api.AdminCreateUserTokenResponseObject, error) {
	var name string
	var ttl time.Duration
	if req.Body != nil {
		name, ttl = req.Body.Name, ttlOf(req.Body.ExpiresInSeconds)
	}
	iss, err := s.svc.AdminCreateToken(ctx, req.UserID, name, ttl)
	if err != nil {
		return nil, err
	}
	return api.AdminCreateUserToken201JSONResponse(apiTokenCreated(iss)), nil
}

// ---- users ----

func (s *Server) GetMe(ctx context.Context, _ api.GetMeRequestObject) (api.GetMeResponseObject, error) {
	u, err := s.svc.Me(ctx, principalFrom(ctx))
	if err != nil {
		return nil, err
	}
	return api.GetMe200JSONResponse(apiUser(u)), nil
}

func (s *Server) UpdateMe(ctx context.Context, req api.UpdateMeRequestObject) (api.UpdateMeResponseObject, error) {
	if req.Body == nil {
		return nil, errNoBody()
	}
	u, err := s.svc.UpdateMe(ctx, principalFrom(ctx), req.Body.DisplayName)
	if err != nil {
		return nil, err
	}
	return api.UpdateMe200JSONResponse(apiUser(u)), nil
}

func (s *Server) GetUser(ctx context.Context, req api.GetUserRequestObject) (api.GetUserResponseObject, error) {
	u, err := s.svc.GetUser(ctx, req.UserID)
	if err != nil {
		return nil, err
	}
	return api.GetUser200JSONResponse(apiUser(u)), nil
}

// ---- conversations and members ----

// CreateConversation answers 201 for a new conversation and 200 when the
// caller's existing direct conversation with the peer was returned.
func (s *Server) CreateConversation(ctx context.Context, req api.CreateConversationRequestObject) (api.CreateConversationResponseObject, error) {
	if req.Body == nil {
		return nil, errNoBody()
	}
	b := req.Body
	c, created, err := s.svc.CreateConversation(ctx, principalFrom(ctx), chat.NewConversation{
		Type: chat.ConvType(b.Type), Title: deref(b.Title), MemberIDs: b.MemberIDs})
	if err != nil {
		return nil, err
	}
	if created {
		return api.CreateConversation201JSONResponse(apiConversation(c)), nil
	}
	return api.CreateConversation200JSONResponse(apiConversation(c)), nil
}

func (s *Server) ListConversations(ctx context.Context, req api.ListConversationsRequestObject) (api.ListConversationsResponseObject, error) {
	page := chat.Page{Cursor: deref(req.Params.Cursor), Limit: deref(req.Params.Limit)}
	cs, next, err := s.svc.ListConversations(ctx, principalFrom(ctx), page)
	if err != nil {
		return nil, err
	}
	return api.ListConversations200JSONResponse{Conversations: apiConversations(cs), NextCursor: apiCursor(next)}, nil
}

func (s *Server) GetConversation(ctx context.Context, req api.GetConversationRequestObject) (api.GetConversationResponseObject, error) {
	c, err := s.svc.GetConversation(ctx, principalFrom(ctx), req.ConversationID)
	if err != nil {
		return nil, err
	}
	return api.GetConversation200JSONResponse(apiConversation(c)), nil
}

func (s *Server) UpdateConversation(ctx context.Context, req api.UpdateConversationRequestObject) (api.UpdateConversationResponseObject, error) {
	if req.Body == nil {
		return nil, errNoBody()
	}
	c, err := s.svc.UpdateConversation(ctx, principalFrom(ctx), req.ConversationID, req.Body.Title)
	if err != nil {
		return nil, err
	}
	return api.UpdateConversation200JSONResponse(apiConversation(c)), nil
}

func (s *Server) ListMembers(ctx context.Context, req api.ListMembersRequestObject) (api.ListMembersResponseObject, error) {
	page := chat.Page{Cursor: deref(req.Params.Cursor), Limit: deref(req.Params.Limit)}
	ms, next, err := s.svc.ListMembers(ctx, principalFrom(ctx), req.ConversationID, page)
	if err != nil {
		return nil, err
	}
	return api.ListMembers200JSONResponse{Members: apiMembers(ms), NextCursor: apiCursor(next)}, nil
}

func (s *Server) AddMembers(ctx context.Context, req api.AddMembersRequestObject) (api.AddMembersResponseObject, error) {
	if req.Body == nil {
		return nil, errNoBody()
	}
	ms, err := s.svc.AddMembers(ctx, principalFrom(ctx), req.ConversationID, req.Body.UserIDs)
	if err != nil {
		return nil, err
	}
	return api.AddMembers200JSONResponse{Members: apiMembers(ms)}, nil
}

func (s *Server) UpdateMember(ctx context.Context, req api.UpdateMemberRequestObject) (api.UpdateMemberResponseObject, error) {
	if req.Body == nil {
		return nil, errNoBody()
	}
	m, err := s.svc.UpdateMember(ctx, principalFrom(ctx), req.ConversationID, req.UserID, chat.Role(req.Body.Role))
	if err != nil {
		return nil, err
	}
	return api.UpdateMember200JSONResponse(apiMember(m)), nil
}

func (s *Server) RemoveMember(ctx context.Context, req api.RemoveMemberRequestObject) (api.RemoveMemberResponseObject, error) {
	if err := s.svc.RemoveMember(ctx, principalFrom(ctx), req.ConversationID, req.UserID); err != nil {
		return nil, err
	}
	return api.RemoveMember204Response{}, nil
}

// ---- messages ----

// sendRequest builds the domain request. The idempotency key may come from
// the body or the Idempotency-Key header; both given must agree, or a retry
// could silently be stored twice under two different keys.
func sendRequest(body *api.SendMessageRequest, header *string) (chat.SendRequest, error) {
	if body == nil {
		return chat.SendRequest{}, errNoBody()
	}
	req := chat.SendRequest{Text: body.Text, ClientMsgID: deref(body.ClientMsgID)}
	if h := deref(header); h != "" {
		if req.ClientMsgID != "" && req.ClientMsgID != h {
			return chat.SendRequest{}, chat.Invalid("client_msg_id", "differs from the Idempotency-Key header")
		}
		req.ClientMsgID = h
	}
	if body.Metadata != nil {
		req.Metadata = *body.Metadata
	}
	return req, nil
}

// SendMessage answers 201 for a new message and 200 for a replay of an
// idempotency key, with the original message.
func (s *Server) SendMessage(ctx context.Context, req api.SendMessageRequestObject) (api.SendMessageResponseObject, error) {
	sr, err := sendRequest(req.Body, req.Params.IdempotencyKey)
	if err != nil {
		return nil, err
	}
	m, created, err := s.svc.Send(ctx, principalFrom(ctx), req.ConversationID, sr)
	if err != nil {
		return nil, err
	}
	if created {
		return api.SendMessage201JSONResponse(apiMessage(m)), nil
	}
	return api.SendMessage200JSONResponse(apiMessage(m)), nil
}

func (s *Server) SendDirectMessage(ctx context.Context, req api.SendDirectMessageRequestObject) (api.SendDirectMessageResponseObject, error) {
	sr, err := sendRequest(req.Body, req.Params.IdempotencyKey)
	if err != nil {
		return nil, err
	}
	m, created, err := s.svc.SendDirect(ctx, principalFrom(ctx), req.UserID, sr)
	if err != nil {
		return nil, err
	}
	if created {
		return api.SendDirectMessage201JSONResponse(apiMessage(m)), nil
	}
	return api.SendDirectMessage200JSONResponse(apiMessage(m)), nil
}

func (s *Server) ListMessages(ctx context.Context, req api.ListMessagesRequestObject) (api.ListMessagesResponseObject, error) {
	q := chat.HistoryQuery{
		BeforeSeq: deref(req.Params.BeforeSeq),
		AfterSeq:  deref(req.Params.AfterSeq),
		After:     req.Params.AfterSeq != nil,
		Limit:     deref(req.Params.Limit),
	}
	ms, more, err := s.svc.History(ctx, principalFrom(ctx), req.ConversationID, q)
	if err != nil {
		return nil, err
	}
	return api.ListMessages200JSONResponse{Messages: apiMessages(ms), HasMore: more}, nil
}

func (s *Server) GetMessage(ctx context.Context, req api.GetMessageRequestObject) (api.GetMessageResponseObject, error) {
	m, err := s.svc.GetMessage(ctx, principalFrom(ctx), req.ConversationID, req.Seq)
	if err != nil {
		return nil, err
	}
	return api.GetMessage200JSONResponse(apiMessage(m)), nil
}

func (s *Server) MarkRead(ctx context.Context, req api.MarkReadRequestObject) (api.MarkReadResponseObject, error) {
	if req.Body == nil {
		return nil, errNoBody()
	}
	rs, err := s.svc.MarkRead(ctx, principalFrom(ctx), req.ConversationID, req.Body.Seq)
	if err != nil {
		return nil, err
	}
	return api.MarkRead200JSONResponse(apiReadState(rs)), nil
}

func (s *Server) SendTyping(ctx context.Context, req api.SendTypingRequestObject) (api.SendTypingResponseObject, error) {
	if err := s.svc.Typing(ctx, principalFrom(ctx), req.ConversationID); err != nil {
		return nil, err
	}
	return api.SendTyping204Response{}, nil
}

// ---- presence ----

func (s *Server) GetPresence(ctx context.Context, req api.GetPresenceRequestObject) (api.GetPresenceResponseObject, error) {
	ps, err := s.svc.Presence(ctx, principalFrom(ctx), req.Params.UserIDs)
	if err != nil {
		return nil, err
	}
	return api.GetPresence200JSONResponse{Presence: apiPresences(ps)}, nil
}
