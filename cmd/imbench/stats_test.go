package main

import (
	"math"
	"math/rand/v2"
	"slices"
	"testing"

	"github.com/stretchr/testify/require"
)

// exactQuantile is the nearest-rank quantile of sorted values.
func exactQuantile(sorted []int64, p float64) int64 {
	rank := int(math.Ceil(p * float64(len(sorted))))
	return sorted[min(max(rank, 1), len(sorted))-1]
}

func TestHistogramSmallValuesAreExact(t *testing.T) {
	var h histogram
	for v := int64(1); v <= 100; v++ {
		h.record(v)
	}
	require.Equal(t, int64(50), h.quantile(0.50))
	require.Equal(t, int64(90), h.quantile(0.90))
	require.Equal(t, int64(99), h.quantile(0.99))
	require.Equal(t, int64(100), h.quantile(1))
	require.Equal(t, int64(1), h.quantile(0.001))
	require.Equal(t, percentiles{P50: 0.05, P90: 0.09, P99: 0.099, Max: 0.1}, h.percentilesMs())
}

func TestHistogramEmpty(t *testing.T) {
	var h histogram
	require.Zero(t, h.quantile(0.5))
	require.Equal(t, percentiles{}, h.percentilesMs())
	var into histogram
	into.merge(&h)
	require.Zero(t, into.total)
}

func TestHistogramSingleValue(t *testing.T) {
	var h histogram
	h.record(123457)
	for _, p := range []float64{0.01, 0.5, 0.99, 1} {
		require.Equal(t, int64(123457), h.quantile(p)) // clamped to the maximum
	}
}

// TestHistogramRelativeError: over wide random samples every quantile is
// within 1/64 above the exact nearest-rank value, never below it.
func TestHistogramRelativeError(t *testing.T) {
	r := rand.New(rand.NewPCG(1, 2))
	for range 20 {
		n := 1 + r.IntN(5000)
		vals := make([]int64, n)
		var h histogram
		for i := range vals {
			vals[i] = int64(math.Exp(r.Float64() * 20)) // 1 µs .. 8 min, log-uniform
			h.record(vals[i])
		}
		slices.Sort(vals)
		for _, p := range []float64{0.01, 0.5, 0.9, 0.99, 0.999, 1} {
			want, got := exactQuantile(vals, p), h.quantile(p)
			require.GreaterOrEqual(t, got, want, "p%v", p)
			require.LessOrEqual(t, float64(got-want), float64(want)/subCount, "p%v: %d vs %d", p, got, want)
		}
		require.Equal(t, vals[n-1], h.max)
	}
}

func TestHistogramMergeEqualsRecordingAll(t *testing.T) {
	var a, b, all histogram
	for v := int64(0); v < 10000; v += 7 {
		a.record(v)
		all.record(v)
		b.record(v * 3)
		all.record(v * 3)
	}
	a.merge(&b)
	require.Equal(t, all, a)
}

func TestHistogramClampsOutOfRange(t *testing.T) {
	var h histogram
	h.record(-5)
	h.record(math.MaxInt64)
	require.Equal(t, int64(0), h.quantile(0.5))
	require.Equal(t, maxValue, h.quantile(1))
}

// TestBuckets: every value lands in a bucket whose range contains it, and
// buckets are contiguous.
func TestBuckets(t *testing.T) {
	prevHigh := int64(-1)
	for i := 0; i < numBuckets; i++ {
		high := bucketHigh(i)
		require.Greater(t, high, prevHigh, "bucket %d", i)
		require.Equal(t, i, bucketOf(high))
		require.Equal(t, i, bucketOf(prevHigh+1))
		prevHigh = high
	}
	require.Equal(t, maxValue, prevHigh)
}

func TestBitset(t *testing.T) {
	var b bitset
	require.False(t, b.set(1))
	require.True(t, b.set(1))
	require.False(t, b.set(1000))
	require.True(t, b.has(1000))
	require.False(t, b.has(999))
	require.False(t, b.has(1<<20))
	var got []int64
	b.each(func(i int64) { got = append(got, i) })
	require.Equal(t, []int64{1, 1000}, got)
}
