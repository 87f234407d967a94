// Package web is imd's browser client and API reference page: plain HTML,
// CSS and JavaScript modules with no build step, embedded in the binary and
// served by the HTTP adapter at / (the chat client), /docs (the reference,
// rendered by Redoc from /openapi.yaml) and /assets/. The server never needs
// Node at run time.
//
// The client uses only the public API: fetch with the session cookie set by
// login (same-origin, no bearer header) and one EventSource on /v1/events.
//
// assets/redoc.standalone.js is bundles/redoc.standalone.js of the npm
// package redoc@2.5.4 (MIT, see assets/redoc.LICENSE), copied unchanged. To
// update it: `npm pack redoc@<version>`, extract, copy the bundle and its
// LICENSE files here, and bump the version in this comment and docs.html.
// (Redoc 3 was not chosen: it is twice the size and reports usage to
// otel.cloud.redocly.com unless disabled.)
package web

import "embed"

// Files holds index.html, docs.html and assets/.
//
//go:embed index.html docs.html assets
var Files embed.FS
