package handlers

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"maps"
	"net"
	"net/http"
	"slices"
	"strconv"
	"strings"
	"unicode/utf8"

	"github.com/getkin/kin-openapi/openapi3"
	"github.com/getkin/kin-openapi/openapi3filter"
	"github.com/getkin/kin-openapi/routers"
	"github.com/go-chi/chi/v5"

	"imd/chat"
)

type ctxKey int

const (
	principalKey ctxKey = iota
	clientAddrKey
	cookieAuthKey
)

// principalFrom returns the authenticated caller; the auth middleware has
// run for every route that declares security, so it is always there.
func principalFrom(ctx context.Context) chat.Principal {
	p, _ := ctx.Value(principalKey).(chat.Principal)
	return p
}

func clientAddr(ctx context.Context) string {
	a, _ := ctx.Value(clientAddrKey).(string)
	return a
}

// viaCookie reports whether the request authenticated with the session cookie.
func viaCookie(ctx context.Context) bool { v, _ := ctx.Value(cookieAuthKey).(bool); return v }

// limitBody rejects bodies over max with 413 before anything reads them.
func (s *Server) limitBody(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.ContentLength > s.cfg.MaxBodyBytes {
			writeError(w, r, s.log, errTooLarge)
			return
		}
		r.Body = http.MaxBytesReader(w, r.Body, s.cfg.MaxBodyBytes)
		host, _, err := net.SplitHostPort(r.RemoteAddr)
		if err != nil {
			host = r.RemoteAddr
		}
		next.ServeHTTP(w, r.WithContext(context.WithValue(r.Context(), clientAddrKey, host)))
	})
}

// authKind is what a route's declared security asks for.
type authKind int

const (
	authNone authKind = iota
	authUser
	authAdmin
)

// securityOf reads each operation's security from the spec, so the contract
// and the enforcement cannot disagree. Keys are "METHOD /path/{param}".
func securityOf(doc *openapi3.T) map[string]authKind {
	out := map[string]authKind{}
	for path, item := range doc.Paths.Map() {
		for method, op := range item.Operations() {
			reqs := doc.Security
			if op.Security != nil {
				reqs = *op.Security
			}
			kind := authNone
			for _, req := range reqs {
				if _, ok := req["adminToken"]; ok {
					kind = authAdmin
				} else if len(req) > 0 && kind == authNone {
					kind = authUser
				}
			}
			out[method+" "+path] = kind
		}
	}
	return out
}

// authenticate enforces the route's security: a user token (Bearer header or
// the session cookie) or the admin token. It runs after chi routed the
// request, so the route pattern is known.
func (s *Server) authenticate(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		pattern := chi.RouteContext(r.Context()).RoutePattern()
		switch s.security[r.Method+" "+pattern] {
		case authNone:
			next.ServeHTTP(w, r)
		case authAdmin:
			if err := chat.CheckAdmin(s.cfg.AdminToken, bearer(r)); err != nil {
				writeError(w, r, s.log, err)
				return
			}
			next.ServeHTTP(w, r)
		default:
			p, cookie, err := s.principal(r)
			if err != nil {
				writeError(w, r, s.log, err)
				return
			}
			ctx := context.WithValue(r.Context(), principalKey, p)
			ctx = context.WithValue(ctx, cookieAuthKey, cookie)
			next.ServeHTTP(w, r.WithContext(ctx))
		}
	})
}

// SessionCookie is the name of the cookie login sets.
const SessionCookie = "imd_session"

// principal authenticates by Bearer header, else by session cookie. A
// cookie-authenticated unsafe request must be same-origin: cookies ride
// along on cross-site requests, bearer headers do not (CSRF).
func (s *Server) principal(r *http.Request) (chat.Principal, bool, error) {
	if tok := bearer(r); tok != "" {
		p, err := s.svc.Authenticate(r.Context(), tok)
		return p, false, err
	}
	if c, err := r.Cookie(SessionCookie); err == nil && c.Value != "" {
		if err := s.csrf.Check(r); err != nil {
			return chat.Principal{}, true, chat.Errorf(chat.CodeForbidden, "cross-origin request with the session cookie")
		}
		p, err := s.svc.Authenticate(r.Context(), c.Value)
		return p, true, err
	}
	return chat.Principal{}, false, chat.Errorf(chat.CodeUnauthorized, "missing credentials: send Authorization: Bearer <token>")
}

func bearer(r *http.Request) string {
	h := r.Header.Get("Authorization")
	if len(h) > 7 && strings.EqualFold(h[:7], "bearer ") {
		return strings.TrimSpace(h[7:])
	}
	return ""
}

// validator checks requests against openapi.yaml (kin-openapi) and answers
// problem+json naming the offending field.
//
// It does not route: chi has already matched the request to a spec
// operation when validate runs, so the operation is looked up by chi's
// route pattern (the spec's path template) in a map built once. Routing
// every request a second time through kin-openapi's gorilla/mux router
// (a regular expression per path, tried in order) cost as much as the rest
// of the validation together.
type validator struct {
	routes map[string]*specRoute // "METHOD /path/{param}", as securityOf
}

// specRoute is one operation and where its path parameters sit.
type specRoute struct {
	route *routers.Route
	// params names the path template's parameter segments by index.
	params map[int]string
}

func newValidator(doc *openapi3.T) (*validator, error) {
	// Match on paths only: the servers list describes deployments, not this listener.
	d := *doc
	d.Servers = nil
	// Security is the authenticate middleware's (securityOf, from the
	// document as it is). Left in, kin-openapi would "check" it with
	// NoopAuthenticationFunc, which passes everything, after reading the
	// whole body once more per requirement so that such a function could
	// read it: ~2 % of what imd allocates per send, for nothing.
	d.Security = nil
	noSecurity := &openapi3.SecurityRequirements{}
	v := &validator{routes: map[string]*specRoute{}}
	for path, item := range d.Paths.Map() {
		params := map[int]string{}
		for i, seg := range strings.Split(path, "/") {
			if strings.HasPrefix(seg, "{") && strings.HasSuffix(seg, "}") {
				params[i] = seg[1 : len(seg)-1]
			} else if strings.ContainsAny(seg, "{}") {
				return nil, fmt.Errorf("validator: path %q: a parameter must be a whole segment", path)
			}
		}
		for method, op := range item.Operations() {
			o := *op
			o.Security = noSecurity
			v.routes[method+" "+path] = &specRoute{
				route:  &routers.Route{Spec: &d, Path: path, PathItem: item, Method: method, Operation: &o},
				params: params,
			}
		}
	}
	return v, nil
}

// find returns the operation chi matched and its path parameters as
// kin-openapi's router would give them: the segments of the escaped path.
func (v *validator) find(r *http.Request) (*routers.Route, map[string]string, bool) {
	sr := v.routes[r.Method+" "+chi.RouteContext(r.Context()).RoutePattern()]
	if sr == nil {
		return nil, nil, false
	}
	if len(sr.params) == 0 {
		return sr.route, nil, true
	}
	params := make(map[string]string, len(sr.params))
	path := r.URL.EscapedPath()
	for i := 0; ; i++ {
		seg, rest, more := strings.Cut(path, "/")
		if name, ok := sr.params[i]; ok {
			params[name] = seg
		}
		if !more {
			break
		}
		path = rest
	}
	return sr.route, params, true
}

// validateOptions are the same for every request (kin-openapi only reads them).
var validateOptions = &openapi3filter.Options{AuthenticationFunc: openapi3filter.NoopAuthenticationFunc, MultiError: true}

func (s *Server) validate(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		route, params, ok := s.validator.find(r)
		if !ok {
			next.ServeHTTP(w, r) // chi routed it; nothing in the spec to check
			return
		}
		if r.Body != nil && r.Body != http.NoBody {
			body, err := io.ReadAll(r.Body)
			if err != nil {
				if tooLarge(err) {
					writeError(w, r, s.log, errTooLarge)
				} else {
					writeError(w, r, s.log, chat.Invalid("body", "could not be read"))
				}
				return
			}
			r.Body = io.NopCloser(bytes.NewReader(body))
			if err := checkUnicode(body); err != nil {
				writeError(w, r, s.log, err)
				return
			}
		}
		in := &openapi3filter.RequestValidationInput{Request: r, PathParams: params, Route: route, Options: validateOptions}
		if err := openapi3filter.ValidateRequest(r.Context(), in); err != nil {
			writeError(w, r, s.log, translateValidation(err))
			return
		}
		next.ServeHTTP(w, r)
	})
}

// translateValidation turns kin-openapi errors into one invalid_request with
// a field per problem.
func translateValidation(err error) error {
	if tooLarge(err) {
		return errTooLarge
	}
	var v chat.Validation
	var walk func(error)
	walk = func(err error) {
		switch e := err.(type) {
		case openapi3.MultiError:
			for _, x := range e {
				walk(x)
			}
		case *openapi3filter.RequestError:
			if tooLarge(e.Err) {
				v.Add("body", "too large")
				return
			}
			field := "body"
			if e.Parameter != nil {
				field = e.Parameter.Name
			}
			switch inner := e.Err.(type) {
			case openapi3.MultiError:
				for _, x := range inner {
					addSchemaError(&v, field, x, e.Parameter != nil)
				}
			case nil:
				v.Add(field, e.Reason)
			default:
				addSchemaError(&v, field, inner, e.Parameter != nil)
			}
		default:
			v.Add("request", err.Error())
		}
	}
	walk(err)
	out := v.Err()
	for _, f := range out.(*chat.Error).Fields {
		if f.Message == "too large" && f.Field == "body" {
			return errTooLarge
		}
	}
	return out
}

func addSchemaError(v *chat.Validation, field string, err error, isParam bool) {
	se, ok := err.(*openapi3.SchemaError)
	if !ok {
		if pe, ok := err.(*openapi3filter.ParseError); ok {
			v.Add(field, pe.Reason)
			return
		}
		v.Add(field, "is invalid")
		return
	}
	if ptr := se.JSONPointer(); len(ptr) > 0 && !isParam {
		field = strings.Join(ptr, ".")
	}
	reason := se.Reason
	if se.SchemaField == "additionalProperties" || se.SchemaField == "properties" {
		// kin-openapi says: property "x" is unsupported (filed under
		// "properties" by v0.153, under "additionalProperties" by older ones)
		var name string
		if _, err := fmt.Sscanf(reason, "property %q is unsupported", &name); err == nil {
			if field == "body" {
				field = name
			} else {
				field += "." + name
			}
			reason = "unknown field"
		}
	}
	v.Add(field, reason)
}

// checkUnicode rejects a JSON body whose strings are not valid Unicode.
// encoding/json silently turns invalid UTF-8 and lone surrogate escapes
// into U+FFFD, so without this a message would be stored with text the
// client never sent. The error names the top-level field holding the bad
// string; malformed JSON is left to the validator.
func checkUnicode(body []byte) error {
	if utf8.Valid(body) && !bytes.Contains(body, []byte(`\u`)) {
		return nil // the common case: nothing that could be wrong
	}
	var obj map[string]json.RawMessage
	if json.Unmarshal(body, &obj) != nil {
		if !validUnicode(body) {
			return chat.Invalid("body", "must be valid UTF-8")
		}
		return nil
	}
	var v chat.Validation
	for _, k := range slices.Sorted(maps.Keys(obj)) {
		if !validUnicode(obj[k]) {
			v.Add(k, "must be valid UTF-8 (no invalid bytes or lone surrogates)")
		}
	}
	if err := v.Err(); err != nil {
		return err
	}
	if !validUnicode(body) { // in a key
		return chat.Invalid("body", "must be valid UTF-8")
	}
	return nil
}

// validUnicode reports whether raw JSON is valid UTF-8 and none of its
// strings has a \u escape of a lone surrogate.
func validUnicode(raw []byte) bool {
	if !utf8.Valid(raw) {
		return false
	}
	hex4 := func(i int) (rune, bool) {
		if i+6 > len(raw) || raw[i] != '\\' || raw[i+1] != 'u' {
			return 0, false
		}
		n, err := strconv.ParseUint(string(raw[i+2:i+6]), 16, 16)
		return rune(n), err == nil
	}
	inString := false
	for i := 0; i < len(raw); i++ {
		switch c := raw[i]; {
		case !inString:
			inString = c == '"'
		case c == '"':
			inString = false
		case c == '\\':
			r, ok := hex4(i)
			if !ok {
				i++ // a one-character escape (or malformed: the decoder reports it)
				continue
			}
			i += 5
			switch {
			case r >= 0xDC00 && r <= 0xDFFF:
				return false
			case r >= 0xD800 && r <= 0xDBFF:
				if lo, ok := hex4(i + 1); ok && lo >= 0xDC00 && lo <= 0xDFFF {
					i += 6
					continue
				}
				return false
			}
		}
	}
	return true
}
