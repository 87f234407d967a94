package handlers

import (
	"bytes"
	"compress/gzip"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"testing/fstest"

	"github.com/go-chi/chi/v5"
)

func testSite(t *testing.T) staticSite {
	t.Helper()
	site, err := newStaticSite(fstest.MapFS{
		"index.html":    {Data: []byte("<!doctype html><title>imd</title>")},
		"docs.html":     {Data: []byte("<!doctype html><title>docs</title>")},
		"assets/app.js": {Data: []byte(strings.Repeat("console.log('imd');\n", 200))},
	})
	if err != nil {
		t.Fatal(err)
	}
	return site
}

func TestStaticSiteServesWithValidatorsAndGzip(t *testing.T) {
	s := &Server{web: testSite(t)}
	r := chi.NewRouter()
	s.mountWeb(r)

	get := func(path string, hdr ...string) *httptest.ResponseRecorder {
		req := httptest.NewRequest(http.MethodGet, path, nil)
		for i := 0; i+1 < len(hdr); i += 2 {
			req.Header.Set(hdr[i], hdr[i+1])
		}
		w := httptest.NewRecorder()
		r.ServeHTTP(w, req)
		return w
	}

	w := get("/")
	if w.Code != 200 || !strings.Contains(w.Body.String(), "<title>imd</title>") {
		t.Fatalf("GET / = %d %q", w.Code, w.Body)
	}
	if got := w.Header().Get("Content-Type"); got != "text/html; charset=utf-8" {
		t.Errorf("Content-Type = %q", got)
	}
	if csp := w.Header().Get("Content-Security-Policy"); !strings.Contains(csp, "script-src 'self'") {
		t.Errorf("CSP = %q", csp)
	}
	etag := w.Header().Get("ETag")
	if etag == "" || w.Header().Get("Cache-Control") != "no-cache" {
		t.Fatalf("validators: ETag %q, Cache-Control %q", etag, w.Header().Get("Cache-Control"))
	}
	if w := get("/", "If-None-Match", etag); w.Code != http.StatusNotModified || w.Body.Len() != 0 {
		t.Errorf("revalidation = %d with %d bytes", w.Code, w.Body.Len())
	}
	if w := get("/docs"); w.Code != 200 || !strings.Contains(w.Body.String(), "docs") {
		t.Errorf("GET /docs = %d", w.Code)
	}

	plain := get("/assets/app.js")
	zipped := get("/assets/app.js", "Accept-Encoding", "gzip, br")
	if zipped.Header().Get("Content-Encoding") != "gzip" || zipped.Body.Len() >= plain.Body.Len() {
		t.Fatalf("gzip: encoding %q, %d vs %d bytes", zipped.Header().Get("Content-Encoding"), zipped.Body.Len(), plain.Body.Len())
	}
	zr, err := gzip.NewReader(zipped.Body)
	if err != nil {
		t.Fatal(err)
	}
	unzipped, _ := io.ReadAll(zr)
	if !bytes.Equal(unzipped, plain.Body.Bytes()) {
		t.Error("gzip body differs from the file")
	}
	if zipped.Header().Get("ETag") == plain.Header().Get("ETag") {
		t.Error("the gzip variant needs its own ETag")
	}
	if !strings.Contains(plain.Header().Get("Vary"), "Accept-Encoding") {
		t.Error("Vary: Accept-Encoding missing")
	}
	if w := get("/assets/../index.html"); w.Code != http.StatusNotFound {
		t.Errorf("a path out of assets/ = %d, want 404", w.Code)
	}
	if w := get("/assets/nope.js"); w.Code != http.StatusNotFound || !strings.Contains(w.Header().Get("Content-Type"), "problem+json") {
		t.Errorf("missing asset = %d %s", w.Code, w.Header().Get("Content-Type"))
	}
}

func TestNewStaticSiteNeedsItsPages(t *testing.T) {
	if _, err := newStaticSite(fstest.MapFS{"index.html": {Data: []byte("x")}}); err == nil {
		t.Error("no error without docs.html")
	}
}

func TestCORS(t *testing.T) {
	ok := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { w.WriteHeader(http.StatusNoContent) })
	do := func(mw func(http.Handler) http.Handler, method, origin string, hdr ...string) http.Header {
		req := httptest.NewRequest(method, "/v1/me", nil)
		if origin != "" {
			req.Header.Set("Origin", origin)
		}
		for i := 0; i+1 < len(hdr); i += 2 {
			req.Header.Set(hdr[i], hdr[i+1])
		}
		w := httptest.NewRecorder()
		mw(ok).ServeHTTP(w, req)
		return w.Header()
	}

	mw, trusted, err := newCORS([]string{" https://App.Example.com ", "http://localhost:5173", ""})
	if err != nil {
		t.Fatal(err)
	}
	if strings.Join(trusted, ",") != "https://app.example.com,http://localhost:5173" {
		t.Errorf("trusted = %v", trusted)
	}
	h := do(mw, http.MethodGet, "https://app.example.com")
	if h.Get("Access-Control-Allow-Origin") != "https://app.example.com" || h.Get("Access-Control-Allow-Credentials") != "true" {
		t.Errorf("listed origin: %v", h)
	}
	if !strings.Contains(h.Get("Access-Control-Expose-Headers"), "Retry-After") {
		t.Errorf("Retry-After not exposed: %v", h)
	}
	pre := do(mw, http.MethodOptions, "http://localhost:5173",
		"Access-Control-Request-Method", "POST",
		"Access-Control-Request-Headers", "authorization, content-type, idempotency-key, last-event-id")
	if pre.Get("Access-Control-Allow-Origin") != "http://localhost:5173" || pre.Get("Access-Control-Allow-Methods") != "POST" ||
		!strings.Contains(strings.ToLower(pre.Get("Access-Control-Allow-Headers")), "idempotency-key") {
		t.Errorf("preflight: %v", pre)
	}
	if h := do(mw, http.MethodGet, "https://evil.example"); h.Get("Access-Control-Allow-Origin") != "" || h.Get("Access-Control-Allow-Credentials") != "" {
		t.Errorf("unlisted origin got CORS headers: %v", h)
	}
	if h := do(mw, http.MethodGet, ""); h.Get("Access-Control-Allow-Origin") != "" {
		t.Errorf("same-origin request got CORS headers: %v", h)
	}

	// "*" admits everyone else, never with credentials.
	mw, _, err = newCORS([]string{"https://app.example.com", "*"})
	if err != nil {
		t.Fatal(err)
	}
	h = do(mw, http.MethodGet, "https://other.example")
	if h.Get("Access-Control-Allow-Origin") != "*" || h.Get("Access-Control-Allow-Credentials") != "" {
		t.Errorf("wildcard: %v", h)
	}
	h = do(mw, http.MethodGet, "https://app.example.com")
	if h.Get("Access-Control-Allow-Origin") != "https://app.example.com" || h.Get("Access-Control-Allow-Credentials") != "true" {
		t.Errorf("listed next to *: %v", h)
	}

	if mw, _, err := newCORS(nil); mw != nil || err != nil {
		t.Errorf("no origins: %v %v", mw != nil, err)
	}
	for _, bad := range []string{"app.example.com", "ftp://x.example", "https://x.example/path", "https://*.example.com", "https://"} {
		if _, _, err := newCORS([]string{bad}); err == nil {
			t.Errorf("%q accepted", bad)
		}
	}
}

// Listed origins may use the session cookie for unsafe requests (a same-site
// app on another origin); others stay refused by the CSRF check.
func TestCORSOriginsAreTrustedByTheCSRFCheck(t *testing.T) {
	s := &Server{cfg: Config{CORSOrigins: []string{"https://app.example.com"}}, csrf: http.NewCrossOriginProtection()}
	if err := s.initWeb(); err != nil {
		t.Fatal(err)
	}
	post := func(origin string) error {
		req := httptest.NewRequest(http.MethodPost, "https://api.example.com/v1/conversations", nil)
		req.Header.Set("Origin", origin)
		req.Header.Set("Sec-Fetch-Site", "same-site")
		return s.csrf.Check(req)
	}
	if err := post("https://app.example.com"); err != nil {
		t.Errorf("listed origin refused: %v", err)
	}
	if err := post("https://evil.example.com"); err == nil {
		t.Error("unlisted origin accepted")
	}
	bad := &Server{cfg: Config{CORSOrigins: []string{"not an origin"}}, csrf: http.NewCrossOriginProtection()}
	if err := bad.initWeb(); err == nil {
		t.Error("a bad origin is not a configuration error")
	}
}
