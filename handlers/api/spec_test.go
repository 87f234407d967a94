package api

import (
	"context"
	"net/http"
	"slices"
	"strings"
	"testing"

	"github.com/getkin/kin-openapi/openapi3"
)

// apiRoutes is every route of /work/shared/API.md (the wire contract), with
// the operationId openapi.yaml gives it. The spec must hold exactly these.
var apiRoutes = []struct {
	method, path, operationID string
}{
	{http.MethodPost, "/v1/auth/register", "register"},
	{http.MethodPost, "/v1/auth/login", "login"},
	{http.MethodPost, "/v1/auth/logout", "logout"},
	{http.MethodPost, "/v1/auth/tokens", "createToken"},
	{http.MethodGet, "/v1/auth/tokens", "listTokens"},
	{http.MethodDelete, "/v1/auth/tokens/{tokenId}", "revokeToken"},
	{http.MethodPost, "/v1/auth/stream-tickets", "createStreamTicket"},
	{http.MethodPost, "/v1/admin/users", "adminCreateUser"},
	{http.MethodPost, "/v1/admin/users/{userId}/tokens", "adminCreateUserToken"},
	{http.MethodGet, "/v1/me", "getMe"},
	{http.MethodPatch, "/v1/me", "updateMe"},
	{http.MethodGet, "/v1/users/{userId}", "getUser"},
	{http.MethodPost, "/v1/conversations", "createConversation"},
	{http.MethodGet, "/v1/conversations", "listConversations"},
	{http.MethodGet, "/v1/conversations/{conversationId}", "getConversation"},
	{http.MethodPatch, "/v1/conversations/{conversationId}", "updateConversation"},
	{http.MethodGet, "/v1/conversations/{conversationId}/members", "listMembers"},
	{http.MethodPost, "/v1/conversations/{conversationId}/members", "addMembers"},
	{http.MethodPatch, "/v1/conversations/{conversationId}/members/{userId}", "updateMember"},
	{http.MethodDelete, "/v1/conversations/{conversationId}/members/{userId}", "removeMember"},
	{http.MethodPost, "/v1/conversations/{conversationId}/messages", "sendMessage"},
	{http.MethodPost, "/v1/users/{userId}/messages", "sendDirectMessage"},
	{http.MethodGet, "/v1/conversations/{conversationId}/messages", "listMessages"},
	{http.MethodGet, "/v1/conversations/{conversationId}/messages/{seq}", "getMessage"},
	{http.MethodPut, "/v1/conversations/{conversationId}/read", "markRead"},
	{http.MethodPost, "/v1/conversations/{conversationId}/typing", "sendTyping"},
	{http.MethodGet, "/v1/presence", "getPresence"},
	{http.MethodGet, "/v1/events", "streamEvents"},
	{http.MethodGet, "/healthz", "healthz"},
	{http.MethodGet, "/readyz", "readyz"},
	{http.MethodGet, "/metrics", "metrics"},
	{http.MethodGet, "/openapi.yaml", "getOpenAPI"},
}

// publicOperations need no credentials (security: []).
var publicOperations = []string{"register", "login", "healthz", "readyz", "metrics", "getOpenAPI"}

func loadSpec(t *testing.T) *openapi3.T {
	t.Helper()
	doc, err := GetSwagger()
	if err != nil {
		t.Fatalf("GetSwagger: %v", err)
	}
	return doc
}

func TestSpecIsValid(t *testing.T) {
	doc := loadSpec(t)
	if err := doc.Validate(context.Background()); err != nil {
		t.Fatalf("embedded openapi.yaml is invalid: %v", err)
	}
	if doc.OpenAPI != "3.0.3" {
		t.Errorf("openapi version = %q, want 3.0.3", doc.OpenAPI)
	}
}

func TestSpecHasEveryRouteOfAPIMD(t *testing.T) {
	doc := loadSpec(t)
	want := map[string]bool{}
	for _, r := range apiRoutes {
		key := r.method + " " + r.path
		want[key] = true
		item := doc.Paths.Find(r.path)
		if item == nil {
			t.Errorf("%s: path missing from openapi.yaml", key)
			continue
		}
		op := item.GetOperation(r.method)
		if op == nil {
			t.Errorf("%s: method missing from openapi.yaml", key)
			continue
		}
		if op.OperationID != r.operationID {
			t.Errorf("%s: operationId = %q, want %q", key, op.OperationID, r.operationID)
		}
	}
	// And nothing beyond the contract.
	for path, item := range doc.Paths.Map() {
		for method := range item.Operations() {
			if key := method + " " + path; !want[key] {
				t.Errorf("%s: in openapi.yaml but not in API.md", key)
			}
		}
	}
}

func TestSpecRequestBodiesAreClosed(t *testing.T) {
	doc := loadSpec(t)
	for path, item := range doc.Paths.Map() {
		for method, op := range item.Operations() {
			if op.RequestBody == nil {
				continue
			}
			for ct, mt := range op.RequestBody.Value.Content {
				s := mt.Schema.Value
				if ap := s.AdditionalProperties.Has; ap == nil || *ap {
					t.Errorf("%s %s (%s): request body schema must set additionalProperties: false", method, path, ct)
				}
			}
		}
	}
}

func TestSpecErrorsAreProblems(t *testing.T) {
	doc := loadSpec(t)
	for path, item := range doc.Paths.Map() {
		for method, op := range item.Operations() {
			has4xx := false
			for code, ref := range op.Responses.Map() {
				if !strings.HasPrefix(code, "4") && !strings.HasPrefix(code, "5") {
					continue
				}
				has4xx = has4xx || strings.HasPrefix(code, "4")
				if op.OperationID == "readyz" && code == "503" {
					continue // readiness reports its checks as a Health body
				}
				if ref.Value.Content.Get("application/problem+json") == nil {
					t.Errorf("%s %s: response %s is not application/problem+json", method, path, code)
				}
			}
			if !has4xx {
				t.Errorf("%s %s: documents no 4xx response", method, path)
			}
		}
	}
}

func TestSpecSecurity(t *testing.T) {
	doc := loadSpec(t)
	for path, item := range doc.Paths.Map() {
		for method, op := range item.Operations() {
			id := op.OperationID
			switch {
			case slices.Contains(publicOperations, id):
				if op.Security == nil || len(*op.Security) != 0 {
					t.Errorf("%s %s (%s): want security: []", method, path, id)
				}
			case strings.HasPrefix(path, "/v1/admin/"):
				if op.Security == nil || len(*op.Security) != 1 || (*op.Security)[0]["adminToken"] == nil {
					t.Errorf("%s %s (%s): want security adminToken", method, path, id)
				}
			case id == "streamEvents":
				// Bearer, cookie, or none (then the ticket query parameter).
				if op.Security == nil || len(*op.Security) != 3 {
					t.Errorf("%s %s (%s): want security bearerAuth | cookieAuth | {}", method, path, id)
				}
				if op.Parameters.GetByInAndName(openapi3.ParameterInQuery, "ticket") == nil {
					t.Errorf("%s %s (%s): ticket query parameter missing", method, path, id)
				}
			default:
				if op.Security != nil {
					t.Errorf("%s %s (%s): want the global security (bearerAuth | cookieAuth)", method, path, id)
				}
			}
		}
	}
	if len(doc.Security) != 2 {
		t.Errorf("global security = %v, want bearerAuth | cookieAuth", doc.Security)
	}
}
