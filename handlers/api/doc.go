// Package api is generated from openapi.yaml by oapi-codegen; do not edit.
// Regenerate with go generate ./...
//
// It holds the wire types (models), the chi router and the strict-server
// interface (StrictServerInterface) that the handlers package implements, and
// the embedded contract (GetSwagger). The event stream (streamEvents),
// /metrics and /openapi.yaml are not generated: they are mounted by hand on the
// same router, because the SSE writer needs the raw http.ResponseWriter and the
// other two are not JSON.
package api
