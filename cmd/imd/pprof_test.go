package main

import (
	"io"
	"log/slog"
	"net/http"
	"testing"

	"github.com/stretchr/testify/require"
)

func TestPprofListener(t *testing.T) {
	addr, stop, err := servePprof("127.0.0.1:0", slog.New(slog.DiscardHandler))
	require.NoError(t, err)
	defer stop()
	res, err := http.Get("http://" + addr + "/debug/pprof/goroutine?debug=1")
	require.NoError(t, err)
	body, _ := io.ReadAll(res.Body)
	res.Body.Close()
	require.Equal(t, 200, res.StatusCode)
	require.Contains(t, string(body), "goroutine profile")

	cfg, err := parseConfig("serve", nil, func(k string) string {
		return map[string]string{"IMD_PPROF_ADDR": "127.0.0.1:6060"}[k]
	}, io.Discard)
	require.NoError(t, err)
	require.Equal(t, "127.0.0.1:6060", cfg.pprofAddr)
}
