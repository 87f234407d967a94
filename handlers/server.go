// Package handlers is imd's HTTP adapter: the chi router, the strict-server
// handlers generated from openapi.yaml (package api), authentication, request
// validation against the spec, the one error-to-problem+json mapping, and the
// SSE writer of the event stream. Handlers are thin: decode, one use-case
// call, encode.
package handlers

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"net/http"
	"runtime/debug"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/getkin/kin-openapi/openapi3"
	"github.com/go-chi/chi/v5"
	"github.com/go-chi/chi/v5/middleware"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"imd/chat"
	"imd/handlers/api"
)

// Config is the adapter's configuration.
type Config struct {
	AdminToken   string // empty: admin routes answer 403
	MaxBodyBytes int64
	// CookieSecure marks the session cookie Secure; on by default, off only
	// for plain-HTTP development.
	CookieSecure bool
	// StreamWriteTimeout bounds each write to an event stream; a client that
	// reads nothing for this long is disconnected (it resumes from its log).
	StreamWriteTimeout time.Duration
	// SpecYAML is openapi.yaml, served at /openapi.yaml.
	SpecYAML []byte
	// Web client (issue 5; see web.go). Web holds the browser client's
	// files, served at /, /docs and /assets/ (nil: not served).
	// CORSOrigins are the origins of browser apps allowed to call the API
	// cross-origin; "*" admits any origin, without credentials.
	Web         fs.FS
	CORSOrigins []string
}

// DefaultMaxBodyBytes is API.md's request body limit.
const DefaultMaxBodyBytes = 64 << 10

// Server serves the API. It implements api.StrictServerInterface.
type Server struct {
	svc       *chat.Service
	cfg       Config
	log       *slog.Logger
	security  map[string]authKind
	validator *validator
	csrf      *http.CrossOriginProtection
	metrics   *metrics
	web       staticSite                      // the browser client (web.go); nil: none
	cors      func(http.Handler) http.Handler // nil: no CORS configured

	// streams ends every open event stream on shutdown, before
	// http.Server.Shutdown, which would otherwise wait for them forever.
	streams      context.Context
	closeStreams context.CancelFunc
	streamWG     sync.WaitGroup
}

var _ api.StrictServerInterface = (*Server)(nil)

// New builds the HTTP adapter over the use cases.
func New(svc *chat.Service, cfg Config, log *slog.Logger, reg prometheus.Registerer) (*Server, error) {
	if cfg.MaxBodyBytes == 0 {
		cfg.MaxBodyBytes = DefaultMaxBodyBytes
	}
	if cfg.StreamWriteTimeout == 0 {
		cfg.StreamWriteTimeout = DefaultStreamWriteTimeout
	}
	doc, err := api.GetSwagger()
	if err != nil {
		return nil, err
	}
	v, err := newValidator(doc)
	if err != nil {
		return nil, err
	}
	s := &Server{svc: svc, cfg: cfg, log: log, security: securityOf(doc), validator: v,
		csrf: http.NewCrossOriginProtection(), metrics: newMetrics(reg)}
	s.streams, s.closeStreams = context.WithCancel(context.Background())
	if err := s.initWeb(); err != nil { // browser client and CORS (web.go)
		return nil, err
	}
	return s, nil
}

// Spec returns the embedded contract (for tests that validate responses).
func Spec() (*openapi3.T, error) { return api.GetSwagger() }

// CloseStreams ends every open event stream and waits for their handlers.
func (s *Server) CloseStreams() {
	s.closeStreams()
	s.streamWG.Wait()
}

// Handler returns the router. The event stream is mounted outside any
// timeout or compression middleware (DESIGN.md §7).
func (s *Server) Handler() http.Handler {
	r := chi.NewRouter()
	r.Use(s.recoverer, s.metrics.middleware, s.limitBody)
	if s.cors != nil {
		r.Use(s.cors) // CORS for the listed origins; answers preflights (web.go)
	}
	r.NotFound(func(w http.ResponseWriter, r *http.Request) {
		writeError(w, r, s.log, chat.Errorf(chat.CodeNotFound, "no such route"))
	})
	r.MethodNotAllowed(func(w http.ResponseWriter, req *http.Request) {
		// RFC 9110: a 405 lists the methods the resource has.
		var allow []string
		for _, m := range []string{http.MethodGet, http.MethodPost, http.MethodPut, http.MethodPatch, http.MethodDelete} {
			if r.Match(chi.NewRouteContext(), m, req.URL.Path) {
				allow = append(allow, m)
			}
		}
		w.Header().Set("Allow", strings.Join(allow, ", "))
		writeProblem(w, problem{Type: "about:blank", Title: "Method Not Allowed", Status: http.StatusMethodNotAllowed,
			Detail: "method not allowed on this route", Code: chat.CodeInvalid})
	})
	r.Get("/v1/events", s.events)
	r.Get("/openapi.yaml", s.openapi)
	s.mountWeb(r) // the browser client: /, /docs, /assets/* (web.go)
	r.Method(http.MethodGet, "/metrics", s.metrics.handler())

	strict := api.NewStrictHandlerWithOptions(s, nil, api.StrictHTTPServerOptions{
		RequestErrorHandlerFunc: func(w http.ResponseWriter, r *http.Request, err error) {
			if tooLarge(err) {
				writeError(w, r, s.log, errTooLarge)
				return
			}
			writeError(w, r, s.log, chat.Invalid("body", "malformed JSON"))
		},
		ResponseErrorHandlerFunc: func(w http.ResponseWriter, r *http.Request, err error) {
			writeError(w, r, s.log, err)
		},
	})
	api.HandlerWithOptions(strict, api.ChiServerOptions{
		BaseRouter: r,
		// The last middleware runs first: authenticate, then validate.
		Middlewares: []api.MiddlewareFunc{s.validate, s.authenticate},
		// The generated wrapper binds parameters before the middlewares run:
		// still answer 401 before 400, and name the parameter without the
		// parser's internals.
		ErrorHandlerFunc: func(w http.ResponseWriter, r *http.Request, err error) {
			s.authenticate(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
				writeError(w, r, s.log, paramError(err))
			})).ServeHTTP(w, r)
		},
	})
	return r
}

// paramError names the parameter the generated wrapper could not bind.
func paramError(err error) error {
	var (
		format    *api.InvalidParamFormatError
		unmarshal *api.UnmarshalingParamError
		required  *api.RequiredParamError
		header    *api.RequiredHeaderError
		many      *api.TooManyValuesForParamError
	)
	switch {
	case errors.As(err, &format):
		return chat.Invalid(format.ParamName, "has an invalid format")
	case errors.As(err, &unmarshal):
		return chat.Invalid(unmarshal.ParamName, "has an invalid format")
	case errors.As(err, &required):
		return chat.Invalid(required.ParamName, "is required")
	case errors.As(err, &header):
		return chat.Invalid(header.ParamName, "is required")
	case errors.As(err, &many):
		return chat.Invalid(many.ParamName, "must be given once")
	}
	return chat.Invalid("request", "invalid parameters")
}

func (s *Server) openapi(w http.ResponseWriter, r *http.Request) {
	w.Header().Set("Content-Type", "application/yaml")
	_, _ = w.Write(s.cfg.SpecYAML)
}

// metrics are the adapter's Prometheus series.
type metrics struct {
	gatherer prometheus.Gatherer
	requests *prometheus.CounterVec
	latency  *prometheus.HistogramVec
	streams  prometheus.Gauge
}

func newMetrics(reg prometheus.Registerer) *metrics {
	m := &metrics{
		requests: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "imd_http_requests_total",
			Help: "HTTP requests by route and status."}, []string{"method", "route", "status"}),
		latency: prometheus.NewHistogramVec(prometheus.HistogramOpts{Name: "imd_http_request_duration_seconds",
			Help: "HTTP request latency by route (streams excluded).", Buckets: prometheus.DefBuckets}, []string{"method", "route"}),
		streams: prometheus.NewGauge(prometheus.GaugeOpts{Name: "imd_streams_open", Help: "Open event streams on this node."}),
	}
	if reg == nil {
		r := prometheus.NewRegistry()
		r.MustRegister(prometheus.NewGoCollector(), prometheus.NewProcessCollector(prometheus.ProcessCollectorOpts{}))
		reg = r
	}
	reg.MustRegister(m.requests, m.latency, m.streams)
	if g, ok := reg.(prometheus.Gatherer); ok {
		m.gatherer = g
	} else {
		m.gatherer = prometheus.DefaultGatherer
	}
	return m
}

func (m *metrics) handler() http.Handler {
	return promhttp.HandlerFor(m.gatherer, promhttp.HandlerOpts{})
}

func (m *metrics) middleware(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		ww := middleware.NewWrapResponseWriter(w, r.ProtoMajor)
		t := prometheusTimer()
		next.ServeHTTP(ww, r)
		route := chi.RouteContext(r.Context()).RoutePattern()
		if route == "" {
			route = "unmatched"
		}
		m.requests.WithLabelValues(r.Method, route, statusClass(ww.Status())).Inc()
		if route != "/v1/events" {
			m.latency.WithLabelValues(r.Method, route).Observe(t())
		}
	})
}

// writeJSON writes a non-generated JSON response (the poll form of the stream).
func writeJSON(w http.ResponseWriter, status int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	_ = json.NewEncoder(w).Encode(v)
}

func statusClass(code int) string {
	if code == 0 {
		code = http.StatusOK
	}
	return strconv.Itoa(code)
}

func prometheusTimer() func() float64 {
	start := time.Now()
	return func() float64 { return time.Since(start).Seconds() }
}

// recoverer turns a panic into a logged 500 problem instead of a dropped connection.
func (s *Server) recoverer(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		defer func() {
			if v := recover(); v != nil {
				if v == http.ErrAbortHandler {
					panic(v)
				}
				writeError(w, r, s.log, chat.Internal(fmt.Errorf("panic: %v\n%s", v, debug.Stack())))
			}
		}()
		next.ServeHTTP(w, r)
	})
}
