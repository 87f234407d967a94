package handlers

import (
	"context"
	"net/http"
	"net/http/httptest"
	"testing"

	"github.com/getkin/kin-openapi/routers/gorillamux"
	"github.com/go-chi/chi/v5"
	"github.com/stretchr/testify/require"

	"imd/handlers/api"
)

// TestValidatorKnowsEveryRoute: validate finds the spec operation by chi's
// route pattern and lets a request through unchecked when there is none, so
// every route of the router must be an operation of the spec under the same
// method and template, and the other way round.
func TestValidatorKnowsEveryRoute(t *testing.T) {
	h, _ := newBenchServer(t)
	doc, err := api.GetSwagger()
	require.NoError(t, err)
	v, err := newValidator(doc)
	require.NoError(t, err)
	routed := map[string]bool{}
	err = chi.Walk(h.(chi.Routes), func(method, route string, _ http.Handler, _ ...func(http.Handler) http.Handler) error {
		if route == "/" || route == "/docs" || route == "/assets/*" {
			return nil // the browser client (web.go), not part of the API
		}
		routed[method+" "+route] = true
		require.Contains(t, v.routes, method+" "+route, "routed but not in openapi.yaml")
		return nil
	})
	require.NoError(t, err)
	for key := range v.routes {
		require.True(t, routed[key], "%s is in openapi.yaml but not routed", key)
	}
}

// TestValidatorPathParams: the path parameters validate hands kin-openapi
// are what kin-openapi's own router (gorilla/mux on the escaped path) would
// have found, escapes included, so the checks and messages stay the same.
func TestValidatorPathParams(t *testing.T) {
	h, _ := newBenchServer(t)
	mux := h.(*chi.Mux)
	doc, err := api.GetSwagger()
	require.NoError(t, err)
	v, err := newValidator(doc)
	require.NoError(t, err)
	d := *doc
	d.Servers = nil
	kin, err := gorillamux.NewRouter(&d)
	require.NoError(t, err)

	for _, tc := range []struct{ method, target string }{
		{"POST", "/v1/conversations/c_0123456789abcdefghij/messages"},
		{"GET", "/v1/conversations/caf%C3%A9/messages/12"},
		{"GET", "/v1/conversations/a%3Bb%2Cc/messages/x"},
		{"DELETE", "/v1/conversations/a%2Fb/members/x%20y"},
		{"GET", "/v1/users/%7Bid%7D"},
		{"POST", "/v1/users/bob/messages"},
		{"DELETE", "/v1/auth/tokens/tok_%00"},
		{"GET", "/v1/me"},
	} {
		req := httptest.NewRequest(tc.method, tc.target, nil)
		path := req.URL.Path // what chi routes on
		if req.URL.RawPath != "" {
			path = req.URL.RawPath
		}
		rctx := chi.NewRouteContext()
		pattern := mux.Find(rctx, tc.method, path)
		require.NotEmpty(t, pattern, "%s %s not routed", tc.method, tc.target)
		rctx.RoutePatterns = []string{pattern}
		req = req.WithContext(context.WithValue(req.Context(), chi.RouteCtxKey, rctx))

		route, params, ok := v.find(req)
		require.True(t, ok, "%s %s", tc.method, tc.target)
		want, wantParams, err := kin.FindRoute(req)
		require.NoError(t, err, "%s %s", tc.method, tc.target)
		require.Equal(t, want.Path, route.Path, "%s %s", tc.method, tc.target)
		require.Equal(t, want.Method, route.Method)
		// The same operation, its security left to the authenticate
		// middleware (newValidator).
		require.Equal(t, want.Operation.OperationID, route.Operation.OperationID)
		require.Equal(t, want.Operation.Parameters, route.Operation.Parameters)
		require.Same(t, want.Operation.RequestBody, route.Operation.RequestBody)
		require.Empty(t, *route.Operation.Security)
		if len(wantParams) == 0 {
			wantParams = nil
		}
		require.Equal(t, wantParams, params, "%s %s", tc.method, tc.target)
	}
}
