package handlers

// The browser side of imd: the web client at / and the API reference at
// /docs (static files from Config.Web, served outside authentication and the
// OpenAPI validator: they are not API routes), and CORS for browser apps
// served from other origins (Config.CORSOrigins).

import (
	"bytes"
	"compress/gzip"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io/fs"
	"mime"
	"net/http"
	"net/url"
	"path"
	"slices"
	"strings"

	"github.com/go-chi/chi/v5"
	"github.com/go-chi/cors"

	"imd/chat"
)

// Content-Security-Policy of the pages. The client is plain modules from
// this origin and talks only to this origin. Redoc injects <style> elements
// (styled-components) and runs its search index in a blob: worker.
const (
	cspApp = "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; " +
		"connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
	cspDocs = "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; " +
		"font-src 'self' data:; connect-src 'self'; worker-src 'self' blob:; object-src 'none'; base-uri 'none'; frame-ancestors 'none'"
)

// staticFile is one embedded file, read once at start.
type staticFile struct {
	body, gz []byte // gz: gzip of body, nil when not worth it
	ctype    string
	etag     string // strong validator of body; the gzip variant appends -gz
}

// staticSite is the web client's files by slash path ("index.html",
// "assets/app.js").
type staticSite map[string]*staticFile

func newStaticSite(fsys fs.FS) (staticSite, error) {
	site := staticSite{}
	err := fs.WalkDir(fsys, ".", func(name string, d fs.DirEntry, err error) error {
		if err != nil || d.IsDir() {
			return err
		}
		body, err := fs.ReadFile(fsys, name)
		if err != nil {
			return err
		}
		sum := sha256.Sum256(body)
		f := &staticFile{body: body, etag: `"` + hex.EncodeToString(sum[:12]) + `"`,
			ctype: mime.TypeByExtension(path.Ext(name))}
		if f.ctype == "" {
			f.ctype = "application/octet-stream"
		}
		if compressible(f.ctype) && len(body) > 1024 {
			var buf bytes.Buffer
			zw, _ := gzip.NewWriterLevel(&buf, gzip.BestCompression)
			_, _ = zw.Write(body)
			_ = zw.Close()
			if buf.Len() < len(body) {
				f.gz = buf.Bytes()
			}
		}
		site[name] = f
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("web client files: %w", err)
	}
	for _, need := range []string{"index.html", "docs.html"} {
		if site[need] == nil {
			return nil, fmt.Errorf("web client files: %s is missing", need)
		}
	}
	return site, nil
}

func compressible(ctype string) bool {
	return strings.HasPrefix(ctype, "text/") || strings.Contains(ctype, "javascript") ||
		strings.Contains(ctype, "json") || strings.Contains(ctype, "svg")
}

// serve writes one file. Every response is revalidated (no-cache) against
// its ETag, so a new binary's client is picked up at once while an
// unchanged one costs a 304.
func (site staticSite) serve(w http.ResponseWriter, r *http.Request, name, csp string) bool {
	f := site[name]
	if f == nil {
		return false
	}
	h := w.Header()
	body, etag := f.body, f.etag
	if f.gz != nil {
		h.Add("Vary", "Accept-Encoding")
		if acceptsGzip(r) {
			body, etag = f.gz, strings.TrimSuffix(f.etag, `"`)+`-gz"`
			h.Set("Content-Encoding", "gzip")
		}
	}
	h.Set("Content-Type", f.ctype)
	h.Set("Cache-Control", "no-cache")
	h.Set("ETag", etag)
	h.Set("X-Content-Type-Options", "nosniff")
	if csp != "" {
		h.Set("Content-Security-Policy", csp)
		h.Set("Referrer-Policy", "no-referrer")
	}
	if etagMatches(r.Header.Get("If-None-Match"), etag) {
		h.Del("Content-Encoding")
		w.WriteHeader(http.StatusNotModified)
		return true
	}
	h.Set("Content-Length", fmt.Sprint(len(body)))
	w.WriteHeader(http.StatusOK)
	if r.Method != http.MethodHead {
		_, _ = w.Write(body)
	}
	return true
}

func acceptsGzip(r *http.Request) bool {
	for _, part := range strings.Split(r.Header.Get("Accept-Encoding"), ",") {
		coding, params, _ := strings.Cut(strings.TrimSpace(part), ";")
		if strings.EqualFold(strings.TrimSpace(coding), "gzip") {
			return strings.ReplaceAll(params, " ", "") != "q=0"
		}
	}
	return false
}

func etagMatches(header, etag string) bool {
	for _, t := range strings.Split(header, ",") {
		t = strings.TrimPrefix(strings.TrimSpace(t), "W/")
		if t == etag || t == "*" {
			return true
		}
	}
	return false
}

// mountWeb adds the client's routes: GET (and HEAD) /, /docs and /assets/*.
// They are mounted on the base router, so neither the authentication nor
// the request validator of the API routes applies.
func (s *Server) mountWeb(r chi.Router) {
	if s.web == nil {
		return
	}
	page := func(name, csp string) http.HandlerFunc {
		return func(w http.ResponseWriter, req *http.Request) { s.web.serve(w, req, name, csp) }
	}
	assets := func(w http.ResponseWriter, req *http.Request) {
		name := path.Clean("assets/" + chi.URLParam(req, "*"))
		if !strings.HasPrefix(name, "assets/") || !s.web.serve(w, req, name, "") {
			writeError(w, req, s.log, chat.Errorf(chat.CodeNotFound, "no such file"))
		}
	}
	for _, m := range []string{http.MethodGet, http.MethodHead} {
		r.Method(m, "/", page("index.html", cspApp))
		r.Method(m, "/docs", page("docs.html", cspDocs))
		r.Method(m, "/assets/*", http.HandlerFunc(assets))
	}
}

// CORS. Browser apps on other origins call the API with
// `Authorization: Bearer` and open the event stream with a single-use ticket
// (cookies are SameSite=Lax and do not travel cross-site). Origins listed
// exactly are answered with credentials allowed (Access-Control-Allow-
// Credentials) and are trusted by the CSRF check, so a same-site app
// (https://app.example.com calling https://api.example.com) may also use the
// session cookie. The lone entry "*" admits every other origin, but never
// with credentials.
var (
	corsMethods = []string{http.MethodGet, http.MethodHead, http.MethodPost, http.MethodPut,
		http.MethodPatch, http.MethodDelete}
	corsAllowHeaders  = []string{"Authorization", "Content-Type", "Idempotency-Key", "Last-Event-ID"}
	corsExposeHeaders = []string{"Retry-After", "WWW-Authenticate"}
)

const corsMaxAge = 600 // seconds a browser may cache a preflight

// newCORS returns the CORS middleware for origins (nil for none) and the
// exact origins, to be trusted by the CSRF check.
func newCORS(origins []string) (func(http.Handler) http.Handler, []string, error) {
	var exact []string
	wildcard := false
	for _, o := range origins {
		o = strings.TrimSpace(o)
		switch {
		case o == "":
			continue
		case o == "*":
			wildcard = true
			continue
		}
		norm, err := normalizeOrigin(o)
		if err != nil {
			return nil, nil, err
		}
		if !slices.Contains(exact, norm) {
			exact = append(exact, norm)
		}
	}
	if len(exact) == 0 && !wildcard {
		return nil, nil, nil
	}
	opts := func(origins []string, credentials bool) cors.Options {
		return cors.Options{AllowedOrigins: origins, AllowCredentials: credentials,
			AllowedMethods: corsMethods, AllowedHeaders: corsAllowHeaders,
			ExposedHeaders: corsExposeHeaders, MaxAge: corsMaxAge}
	}
	var listed, anyOrigin func(http.Handler) http.Handler
	if len(exact) > 0 { // never empty: go-chi/cors reads no origins as all origins
		listed = cors.Handler(opts(exact, true))
	}
	if wildcard {
		anyOrigin = cors.Handler(opts([]string{"*"}, false))
	}
	mw := func(next http.Handler) http.Handler {
		var withListed, withAny http.Handler = next, next
		if listed != nil {
			withListed = listed(next)
		}
		if anyOrigin != nil {
			withAny = anyOrigin(next)
		}
		return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			origin := r.Header.Get("Origin")
			switch {
			case origin == "":
				next.ServeHTTP(w, r)
			case listed != nil && slices.Contains(exact, strings.ToLower(origin)):
				withListed.ServeHTTP(w, r)
			case anyOrigin != nil:
				withAny.ServeHTTP(w, r)
			default:
				w.Header().Add("Vary", "Origin")
				next.ServeHTTP(w, r)
			}
		})
	}
	return mw, exact, nil
}

// normalizeOrigin checks that o is a bare origin, scheme://host[:port], and
// returns it in lower case as browsers send it.
func normalizeOrigin(o string) (string, error) {
	bad := func(why string) error {
		return fmt.Errorf("CORS origin %q: %s (want scheme://host[:port], or *)", o, why)
	}
	u, err := url.Parse(o)
	switch {
	case err != nil:
		return "", bad("not a URL")
	case u.Scheme != "http" && u.Scheme != "https":
		return "", bad("scheme must be http or https")
	case u.Host == "" || u.Hostname() == "":
		return "", bad("no host")
	case strings.Contains(o, "*"):
		return "", bad("wildcards other than a lone * are not supported")
	case u.User != nil || (u.Path != "" && u.Path != "/") || u.RawQuery != "" || u.Fragment != "":
		return "", bad("an origin has no user, path, query or fragment")
	}
	return strings.ToLower(u.Scheme + "://" + u.Host), nil
}

// initWeb prepares the static site and CORS from the configuration.
func (s *Server) initWeb() error {
	if s.cfg.Web != nil {
		site, err := newStaticSite(s.cfg.Web)
		if err != nil {
			return err
		}
		s.web = site
	}
	mw, trusted, err := newCORS(s.cfg.CORSOrigins)
	if err != nil {
		return err
	}
	s.cors = mw
	for _, o := range trusted {
		if err := s.csrf.AddTrustedOrigin(o); err != nil {
			return errors.Join(fmt.Errorf("CORS origin %q", o), err)
		}
	}
	return nil
}
