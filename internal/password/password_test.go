package password

import (
	"strings"
	"testing"

	"github.com/stretchr/testify/require"
)

func TestHashVerify(t *testing.T) {
	h := Argon2id{P: OWASP}
	enc, err := h.Hash("correct horse battery staple")
	require.NoError(t, err)
	require.True(t, strings.HasPrefix(enc, "$argon2id$v=19$m=19456,t=2,p=1$"), enc)

	ok, err := h.Verify(enc, "correct horse battery staple")
	require.NoError(t, err)
	require.True(t, ok)
	ok, err = h.Verify(enc, "correct horse battery stapl")
	require.NoError(t, err)
	require.False(t, ok)

	// No truncation: passwords differing after byte 72 differ (bcrypt's trap).
	long := strings.Repeat("a", 80)
	enc, err = h.Hash(long)
	require.NoError(t, err)
	ok, _ = h.Verify(enc, strings.Repeat("a", 72)+"bbbbbbbb")
	require.False(t, ok)

	// Same password, different salts.
	enc2, _ := h.Hash(long)
	require.NotEqual(t, enc, enc2)

	_, err = h.Verify("$2a$10$bcrypt", "x")
	require.ErrorIs(t, err, ErrFormat)
}
