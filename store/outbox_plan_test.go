package store

import (
	"strings"
	"testing"

	"github.com/stretchr/testify/require"
)

// TestPendingMessagesUsesIndex: after an outage the outbox holds every
// message sent meanwhile, and that is when PendingMessages is asked; each
// conversation's answer must be one step into outbox_message_seq_idx, not
// a scan of the table or of all the conversation's pending messages.
func TestPendingMessagesUsesIndex(t *testing.T) {
	bothDialects(t, func(t *testing.T, s *Store) {
		ctx := batchCtx(t)
		// 20,000 pending messages of 100 conversations, and other events.
		series := `WITH RECURSIVE i(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM i WHERE n < 20000) SELECT n FROM i`
		if !s.d.sqlite() {
			series = `SELECT n FROM generate_series(1, 20000) AS g(n)`
		}
		_, err := s.db.ExecContext(ctx, `INSERT INTO outbox (conversation_id, type, seq)
			SELECT 'c' || (n % 100), CASE WHEN n % 7 = 0 THEN 'member.added' ELSE 'message.created' END, n
			FROM (`+series+`) AS s`)
		require.NoError(t, err)
		_, err = s.db.ExecContext(ctx, `ANALYZE outbox`)
		require.NoError(t, err)

		explain := "EXPLAIN "
		if s.d.sqlite() {
			explain = "EXPLAIN QUERY PLAN "
		}
		rows, err := s.db.QueryxContext(ctx, explain+s.pendingMessagesSQL(), s.d.texts([]string{"c1", "c2"}))
		require.NoError(t, err)
		var lines []string
		for rows.Next() {
			cols, err := rows.SliceScan()
			require.NoError(t, err)
			line := cols[len(cols)-1] // PostgreSQL: the one column; SQLite: detail
			if b, ok := line.([]byte); ok {
				line = string(b)
			}
			lines = append(lines, line.(string))
		}
		require.NoError(t, rows.Err())
		plan := strings.Join(lines, "\n")
		require.Contains(t, plan, "outbox_message_seq_idx", plan)
		require.NotContains(t, plan, "Seq Scan", plan)
		require.NotContains(t, plan, "SCAN o", plan) // SQLite's full scan of the outbox

		p, err := s.PendingMessages(ctx, []string{"c1", "c2", "c7", "none"})
		require.NoError(t, err)
		require.Equal(t, map[string]int64{"c1": 1, "c2": 2, "c7": 107}, p, "c7's event 7 is a member event")
	})
}
