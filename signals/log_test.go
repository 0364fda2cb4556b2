package signals

import (
	"slices"
	"sync"
	"testing"
)

func TestLogKeepsTheLastMaxInOrder(t *testing.T) {
	l := NewLog[int](5)
	for i := range 12 {
		l.Add(i)
	}
	if got := l.Filter(nil); !slices.Equal(got, []int{7, 8, 9, 10, 11}) {
		t.Fatalf("log kept %v, want the last 5, oldest first", got)
	}
	if l.Len() != 5 || l.Evicted() != 7 {
		t.Fatalf("len %d evicted %d, want 5 and 7", l.Len(), l.Evicted())
	}
	if got := l.Filter(func(v int) bool { return v%2 == 0 }); !slices.Equal(got, []int{8, 10}) {
		t.Fatalf("filter kept %v, want [8 10]", got)
	}
	if got := l.Filter(func(int) bool { return false }); got != nil {
		t.Fatalf("filter of nothing = %v, want nil", got)
	}
}

func TestLogAtLeastOne(t *testing.T) {
	l := NewLog[int](0)
	l.Add(1, 2, 3)
	if got := l.Filter(nil); !slices.Equal(got, []int{3}) || l.Evicted() != 2 {
		t.Fatalf("log of max 0 kept %v evicted %d, want [3] and 2", got, l.Evicted())
	}
}

func TestLogFilterCopiesOut(t *testing.T) {
	l := NewLog[int](4)
	l.Add(1, 2)
	got := l.Filter(nil)
	got[0] = 99
	if again := l.Filter(nil); again[0] != 1 {
		t.Fatalf("writing to what Filter returned changed the log: %v", again)
	}
}

// A quiet log holds nothing; a busy one grows by doubling to its bound and
// no further.
func TestLogGrowsOnDemand(t *testing.T) {
	l := NewLog[int](100)
	if cap(l.r.buf) != 0 {
		t.Fatalf("an empty log allocated %d slots", cap(l.r.buf))
	}
	l.Add(1)
	if len(l.r.buf) != minRingBuf {
		t.Fatalf("one value: %d slots, want %d", len(l.r.buf), minRingBuf)
	}
	for i := range minRingBuf {
		l.Add(i + 2)
	}
	if len(l.r.buf) != 2*minRingBuf {
		t.Fatalf("%d values: %d slots, want %d", minRingBuf+1, len(l.r.buf), 2*minRingBuf)
	}
	for i := range 1000 {
		l.Add(i)
	}
	if len(l.r.buf) != 100 || l.Len() != 100 {
		t.Fatalf("after 1017 values: %d slots, %d values, want 100 of each", len(l.r.buf), l.Len())
	}
	if got := l.Filter(nil); got[0] != 900 || got[99] != 999 {
		t.Fatalf("after growing, the log holds %d..%d, want 900..999", got[0], got[99])
	}
	if l.Evicted() != 1017-100 {
		t.Fatalf("evicted %d, want %d", l.Evicted(), 1017-100)
	}
}

type keyed struct {
	k, v int
}

func TestKeyedLogPutReplacesInPlace(t *testing.T) {
	l := NewKeyedLog(3, func(e keyed) int { return e.k })
	l.Put(keyed{1, 10}, nil)
	l.Put(keyed{2, 20}, nil)
	l.Put(keyed{1, 11}, nil)
	if got := l.Filter(nil); !slices.Equal(got, []keyed{{1, 11}, {2, 20}}) {
		t.Fatalf("after replacing key 1: %v", got)
	}
	// replace refuses: the old value stays.
	l.Put(keyed{2, 21}, func(old, v keyed) bool { return v.v > 100 })
	if got := l.Filter(nil); !slices.Equal(got, []keyed{{1, 11}, {2, 20}}) {
		t.Fatalf("a refused replace changed the log: %v", got)
	}
	// Evicting key 1 forgets it: putting it again appends.
	l.Put(keyed{3, 30}, nil)
	l.Put(keyed{4, 40}, nil)
	l.Put(keyed{1, 12}, nil)
	if got := l.Filter(nil); !slices.Equal(got, []keyed{{3, 30}, {4, 40}, {1, 12}}) {
		t.Fatalf("after eviction: %v", got)
	}
	// Replacing after the ring wrapped finds the right slot.
	l.Put(keyed{4, 41}, nil)
	if got := l.Filter(nil); !slices.Equal(got, []keyed{{3, 30}, {4, 41}, {1, 12}}) {
		t.Fatalf("replace after wrapping: %v", got)
	}
	if l.Evicted() != 2 {
		t.Fatalf("evicted %d, want 2", l.Evicted())
	}
}

// Add on a keyed log appends a second value of a key; evicting the older
// one must not make Put lose the newer.
func TestKeyedLogAddKeepsIndexOfNewest(t *testing.T) {
	l := NewKeyedLog(2, func(e keyed) int { return e.k })
	l.Add(keyed{1, 10}, keyed{1, 11})
	l.Add(keyed{2, 20}) // evicts {1 10}
	l.Put(keyed{1, 12}, nil)
	if got := l.Filter(nil); !slices.Equal(got, []keyed{{1, 12}, {2, 20}}) {
		t.Fatalf("got %v, want {1 11} replaced by {1 12}", got)
	}
}

func TestLogConcurrentUse(t *testing.T) {
	l := NewKeyedLog(64, func(e keyed) int { return e.k })
	const writers, each = 4, 500
	var wg sync.WaitGroup
	for w := range writers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range each {
				if i%2 == 0 {
					l.Add(keyed{w*each + i, i})
				} else {
					l.Put(keyed{w*each + i - 1, i}, nil)
				}
			}
		}()
	}
	wg.Add(1)
	go func() {
		defer wg.Done()
		for range 200 {
			got := l.Filter(func(e keyed) bool { return e.v >= 0 })
			if len(got) > 64 {
				t.Errorf("read %d values from a log of 64", len(got))
				return
			}
			_, _ = l.Len(), l.Evicted()
		}
	}()
	wg.Wait()
	if l.Len() != 64 {
		t.Fatalf("len %d, want 64", l.Len())
	}
	// Each writer added each/2 values and put each one again: in place,
	// or appended when others' values had evicted it in between.
	if n := uint64(l.Len()) + l.Evicted(); n < writers*each/2 || n > writers*each {
		t.Fatalf("len+evicted %d, want between %d and %d", n, writers*each/2, writers*each)
	}
	seen := map[int]bool{}
	for _, e := range l.Filter(nil) {
		if seen[e.k] {
			t.Fatalf("key %d twice: Put appended a key the log held", e.k)
		}
		seen[e.k] = true
	}
}
