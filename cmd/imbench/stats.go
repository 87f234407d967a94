package main

import (
	"maps"
	"math"
	"math/bits"
	"slices"
	"strconv"
	"sync"
)

// The histogram is log-linear (the HDR layout): values below 2·subCount are
// kept exactly, and every power of two above is split into subCount
// buckets, so a reported quantile is within 1/subCount (1.6 %) of a value
// that was recorded. Its size is fixed, so recording never allocates, and
// each stream and sender owns one, so the hot path never contends on a
// lock or a shared cache line; they are merged once at the end.
const (
	subBits  = 6
	subCount = 1 << subBits
	// maxExp caps recorded values at 2^41 µs (25 days): anything larger is
	// a clock problem, not a latency.
	maxExp     = 41 - subBits - 1
	numBuckets = (maxExp + 2) * subCount
	maxValue   = int64(1)<<41 - 1
)

// histogram counts non-negative int64 values (microseconds in this tool).
// The zero value is empty and ready; the bucket array is allocated at the
// first record, so the 10,000 streams of the idle scenario, which record
// nothing, cost nothing.
type histogram struct {
	counts []uint32
	total  uint64
	max    int64
}

// bucketOf maps v to its bucket: e is how far v is shifted so that it fits
// the sub-bucket range; below 2·subCount e is 0 and the bucket is v itself.
func bucketOf(v int64) int {
	e := 0
	if v >= 2*subCount {
		e = bits.Len64(uint64(v)) - subBits - 1
	}
	return e*subCount + int(v>>e)
}

// bucketHigh is the largest value that falls into bucket i.
func bucketHigh(i int) int64 {
	e := 0
	if i >= 2*subCount {
		e = i/subCount - 1
	}
	low := int64(i-e*subCount) << e
	return low + int64(1)<<e - 1
}

func (h *histogram) record(v int64) {
	v = min(max(v, 0), maxValue)
	if h.counts == nil {
		h.counts = make([]uint32, numBuckets)
	}
	h.counts[bucketOf(v)]++
	h.total++
	h.max = max(h.max, v)
}

func (h *histogram) merge(o *histogram) {
	if o.total == 0 {
		return
	}
	if h.counts == nil {
		h.counts = make([]uint32, numBuckets)
	}
	for i, c := range o.counts {
		h.counts[i] += c
	}
	h.total += o.total
	h.max = max(h.max, o.max)
}

// quantile returns the nearest-rank p-quantile (0 < p ≤ 1): the smallest
// recorded value such that at least ⌈p·total⌉ values are ≤ it, rounded up
// to its bucket's upper edge but never above the true maximum. 0 when
// empty.
func (h *histogram) quantile(p float64) int64 {
	if h.total == 0 {
		return 0
	}
	rank := uint64(math.Ceil(p * float64(h.total)))
	rank = min(max(rank, 1), h.total)
	var seen uint64
	for i, c := range h.counts {
		seen += uint64(c)
		if seen >= rank {
			return min(bucketHigh(i), h.max)
		}
	}
	return h.max
}

// percentiles is the JSON form of a latency histogram, in milliseconds.
type percentiles struct {
	P50 float64 `json:"p50"`
	P90 float64 `json:"p90"`
	P99 float64 `json:"p99"`
	Max float64 `json:"max"`
}

func (h *histogram) percentilesMs() percentiles {
	ms := func(us int64) float64 { return math.Round(float64(us)) / 1000 }
	return percentiles{P50: ms(h.quantile(0.50)), P90: ms(h.quantile(0.90)), P99: ms(h.quantile(0.99)), Max: ms(h.max)}
}

// statusCounter counts failed requests by HTTP status ("429", "503", …),
// or "transport" when no response came back. Failures are rare next to
// successes, so one mutex is enough.
type statusCounter struct {
	mu sync.Mutex
	m  map[string]int64
}

func (c *statusCounter) add(status int) {
	key := "transport"
	if status > 0 {
		key = strconv.Itoa(status)
	}
	c.mu.Lock()
	if c.m == nil {
		c.m = map[string]int64{}
	}
	c.m[key]++
	c.mu.Unlock()
}

func (c *statusCounter) snapshot() map[string]int64 {
	c.mu.Lock()
	defer c.mu.Unlock()
	out := make(map[string]int64, len(c.m))
	for k, v := range c.m {
		out[k] = v
	}
	return out
}

func sortedKeys[V any](m map[string]V) []string {
	return slices.Sorted(maps.Keys(m))
}

// bitset records which seqs a stream received, and which sends were
// accepted, per conversation: one bit per seq instead of a set of message
// id strings keeps a 1000-stream fan-out of millions of deliveries at a few
// megabytes. A seq identifies a message within its conversation, so "the
// same seq twice" is "the same message twice".
type bitset []uint64

// set marks i and reports whether it was already marked.
func (b *bitset) set(i int64) bool {
	w := int(i >> 6)
	if w >= len(*b) {
		n := max(2*len(*b), w+1)
		nb := make(bitset, n)
		copy(nb, *b)
		*b = nb
	}
	m := uint64(1) << (i & 63)
	was := (*b)[w]&m != 0
	(*b)[w] |= m
	return was
}

func (b bitset) has(i int64) bool {
	w := int(i >> 6)
	return w < len(b) && b[w]&(uint64(1)<<(i&63)) != 0
}

// each calls f for every marked i, ascending.
func (b bitset) each(f func(i int64)) {
	for w, x := range b {
		for x != 0 {
			t := bits.TrailingZeros64(x)
			f(int64(w)<<6 | int64(t))
			x &= x - 1
		}
	}
}
