package handlers

import (
	"encoding/json"
	"errors"
	"log/slog"
	"math"
	"net/http"
	"strconv"

	"imd/chat"
)

// statusOf is the one map from error codes to HTTP statuses.
var statusOf = map[chat.Code]int{
	chat.CodeInvalid:         http.StatusBadRequest,
	chat.CodeUnauthorized:    http.StatusUnauthorized,
	chat.CodeForbidden:       http.StatusForbidden,
	chat.CodeNotFound:        http.StatusNotFound,
	chat.CodeConflict:        http.StatusConflict,
	chat.CodePayloadTooLarge: http.StatusRequestEntityTooLarge,
	chat.CodeRateLimited:     http.StatusTooManyRequests,
	chat.CodeUnavailable:     http.StatusServiceUnavailable,
	chat.CodeInternal:        http.StatusInternalServerError,
}

// problem is an RFC 9457 problem document with imd's stable code.
type problem struct {
	Type   string            `json:"type"`
	Title  string            `json:"title"`
	Status int               `json:"status"`
	Detail string            `json:"detail"`
	Code   chat.Code         `json:"code"`
	Errors []chat.FieldError `json:"errors,omitempty"`
}

// writeError answers with the problem for err. Internal details go to the
// log only; the client sees the error's safe message.
func writeError(w http.ResponseWriter, r *http.Request, log *slog.Logger, err error) {
	e := chat.AsError(err)
	status, ok := statusOf[e.Code]
	if !ok {
		status = http.StatusInternalServerError
	}
	switch {
	case r.Context().Err() != nil:
		// The client went away; nobody reads this answer and it is not a server fault.
		log.Debug("request canceled", "method", r.Method, "path", r.URL.Path, "err", err)
	case status >= 500:
		log.Error("request failed", "method", r.Method, "path", r.URL.Path, "code", e.Code, "err", err)
	}
	if e.Code == chat.CodeRateLimited {
		w.Header().Set("Retry-After", strconv.Itoa(max(1, int(math.Ceil(e.RetryAfter.Seconds())))))
	}
	if e.Code == chat.CodeUnauthorized {
		w.Header().Set("WWW-Authenticate", `Bearer realm="imd"`)
	}
	if e.Code == chat.CodeUnavailable {
		w.Header().Set("Retry-After", "1")
	}
	writeProblem(w, problem{Type: "about:blank", Title: http.StatusText(status), Status: status,
		Detail: e.Message, Code: e.Code, Errors: e.Fields})
}

func writeProblem(w http.ResponseWriter, p problem) {
	w.Header().Set("Content-Type", "application/problem+json")
	w.Header().Set("Cache-Control", "no-store")
	w.WriteHeader(p.Status)
	_ = json.NewEncoder(w).Encode(p)
}

// tooLarge reports whether err comes from the body size limit.
func tooLarge(err error) bool {
	var mbe *http.MaxBytesError
	return errors.As(err, &mbe)
}

var errTooLarge = &chat.Error{Code: chat.CodePayloadTooLarge, Message: "request body is too large"}
