package realtime

import (
	"time"

	"github.com/redis/go-redis/v9"
)

// NewWithHealthInterval is New with a shorter Pub/Sub health-check interval,
// so that tests of a silently dead connection do not take 10 s.
func NewWithHealthInterval(rdb *redis.Client, cfg Config, health time.Duration) *Redis {
	return newRedis(rdb, cfg, health)
}
