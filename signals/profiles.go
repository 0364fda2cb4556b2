package signals

import (
	"errors"
	"fmt"
	"sort"
	"strings"
	"sync"
	"time"

	"github.com/google/pprof/profile"
)

// TimedProfile is one parsed profile and when the agent took it.
type TimedProfile struct {
	T       time.Time
	Profile *profile.Profile
}

// Profiles keeps the last few parsed profiles of each kind ("heap"), because
// a leak is named by diffing two profiles and a number series cannot carry
// allocation sites. Profiles are large (a parsed heap profile of a big
// service is megabytes), so the bound is per kind and small: pprof.keep.
// Stored profiles are shared with readers and must not be modified. It is
// safe for concurrent use.
type Profiles struct {
	mu     sync.RWMutex
	keep   int
	byKind map[string][]TimedProfile // oldest first, at most keep each
}

// NewProfiles returns a store keeping at most keep profiles per kind (at
// least one).
func NewProfiles(keep int) *Profiles {
	if keep < 1 {
		keep = 1
	}
	return &Profiles{keep: keep, byKind: make(map[string][]TimedProfile)}
}

// Add stores p under kind, evicting the oldest profile of that kind when
// keep are already stored. A profile older than the newest one stored is
// put in time order, so that List stays oldest first whatever the order of
// Add calls.
func (ps *Profiles) Add(kind string, t time.Time, p *profile.Profile) {
	if p == nil {
		return
	}
	ps.mu.Lock()
	defer ps.mu.Unlock()
	list := ps.byKind[kind]
	i := sort.Search(len(list), func(i int) bool { return list[i].T.After(t) })
	list = append(list, TimedProfile{})
	copy(list[i+1:], list[i:])
	list[i] = TimedProfile{T: t, Profile: p}
	if over := len(list) - ps.keep; over > 0 {
		// Shift down rather than reslice, so the backing array does not
		// keep evicted profiles reachable.
		n := copy(list, list[over:])
		clear(list[n:])
		list = list[:n]
	}
	ps.byKind[kind] = list
}

// List returns the profiles of kind, oldest first. The slice is a copy;
// the profiles are not.
func (ps *Profiles) List(kind string) []TimedProfile {
	ps.mu.RLock()
	defer ps.mu.RUnlock()
	list := ps.byKind[kind]
	if len(list) == 0 {
		return nil
	}
	return append([]TimedProfile(nil), list...)
}

// Latest returns the newest profile of kind.
func (ps *Profiles) Latest(kind string) (TimedProfile, bool) {
	ps.mu.RLock()
	defer ps.mu.RUnlock()
	list := ps.byKind[kind]
	if len(list) == 0 {
		return TimedProfile{}, false
	}
	return list[len(list)-1], true
}

// Sample types of a heap profile, as Go's runtime/pprof names them.
const (
	InuseSpace   = "inuse_space"
	InuseObjects = "inuse_objects"
	AllocSpace   = "alloc_space"
)

// ErrNoInuseSpace is returned for a profile that is not a heap profile, or
// one from a producer that does not report live bytes.
var ErrNoInuseSpace = errors.New("profile has no inuse_space sample type")

// SampleIndex returns the index in Sample.Value of the sample type named
// typ, matched exactly: profile.SampleIndexByName would also take "space"
// for "inuse_space", which some legacy profiles use for allocated bytes.
func SampleIndex(p *profile.Profile, typ string) (int, bool) {
	for i, st := range p.SampleType {
		if st != nil && st.Type == typ {
			return i, true
		}
	}
	return -1, false
}

// SiteGrowth is how much the live heap attributed to one allocation site
// grew between two heap profiles. Negative values mean it shrank.
type SiteGrowth struct {
	Function string
	File     string
	Line     int64
	Bytes    int64 // growth of inuse_space
	Objects  int64 // growth of inuse_objects; 0 when a profile lacks them
}

type siteKey struct {
	function, file string
	line           int64
}

// allocatorPrefixes are the frames skipped to find the site that
// allocated: the Go runtime's allocator (mallocgc, makeslice, newobject)
// and, since Go 1.24, the map implementation in internal/runtime/maps,
// whose growth is the caller's map growing.
var allocatorPrefixes = []string{"runtime.", "runtime/", "internal/runtime/"}

func isAllocatorFrame(fn string) bool {
	for _, p := range allocatorPrefixes {
		if strings.HasPrefix(fn, p) {
			return true
		}
	}
	return false
}

// allocSite is the innermost frame of s outside the allocator. Inlined
// calls are frames of their own (Line[0] is the innermost), so a helper
// inlined into its caller is still named. A sample made only of allocator
// frames is attributed to its leaf, and an unsymbolized frame to its
// address, so that no live byte drops out of the diff.
func allocSite(s *profile.Sample) siteKey {
	var leaf *siteKey
	for _, loc := range s.Location {
		if len(loc.Line) == 0 {
			k := siteKey{function: fmt.Sprintf("%#x", loc.Address)}
			if loc.Mapping != nil {
				k.file = loc.Mapping.File
			}
			return k
		}
		for _, ln := range loc.Line {
			k := siteKey{line: ln.Line}
			if ln.Function != nil {
				k.function, k.file = ln.Function.Name, ln.Function.Filename
			}
			if !isAllocatorFrame(k.function) {
				return k
			}
			if leaf == nil {
				leaf = &k
			}
		}
	}
	if leaf != nil {
		return *leaf
	}
	return siteKey{function: "unknown"}
}

type siteValue struct{ bytes, objects int64 }

// inuseBySite sums the live heap of p per allocation site.
func inuseBySite(p *profile.Profile) (map[siteKey]siteValue, error) {
	bi, ok := SampleIndex(p, InuseSpace)
	if !ok {
		return nil, ErrNoInuseSpace
	}
	oi, hasObjects := SampleIndex(p, InuseObjects)
	out := make(map[siteKey]siteValue)
	for _, s := range p.Sample {
		if s == nil {
			return nil, fmt.Errorf("nil sample: %w", errMalformedProfile)
		}
		if bi >= len(s.Value) {
			return nil, fmt.Errorf("sample with %d values for %d sample types: %w", len(s.Value), len(p.SampleType), errMalformedProfile)
		}
		k := allocSite(s)
		v := out[k]
		v.bytes += s.Value[bi]
		if hasObjects && oi < len(s.Value) {
			v.objects += s.Value[oi]
		}
		out[k] = v
	}
	return out, nil
}

var errMalformedProfile = errors.New("malformed profile")

// DiffInuse returns the allocation sites whose live heap grew the most from
// older to newer, largest growth first, at most top of them (all when top
// <= 0). A site is the innermost frame outside the Go allocator, file and
// line included, so that two allocations in one function stay apart. Sites
// that shrank are included after those that grew, for a caller that wants
// the whole picture; a leak rule reads the positive ones.
func DiffInuse(older, newer *profile.Profile, top int) ([]SiteGrowth, error) {
	if older == nil || newer == nil {
		return nil, errors.New("diff of a nil profile")
	}
	a, err := inuseBySite(older)
	if err != nil {
		return nil, fmt.Errorf("older profile: %w", err)
	}
	b, err := inuseBySite(newer)
	if err != nil {
		return nil, fmt.Errorf("newer profile: %w", err)
	}
	for k, v := range a {
		w := b[k]
		w.bytes -= v.bytes
		w.objects -= v.objects
		b[k] = w
	}
	out := make([]SiteGrowth, 0, len(b))
	for k, v := range b {
		if v.bytes == 0 && v.objects == 0 {
			continue
		}
		out = append(out, SiteGrowth{Function: k.function, File: k.file, Line: k.line, Bytes: v.bytes, Objects: v.objects})
	}
	sort.Slice(out, func(i, j int) bool {
		x, y := out[i], out[j]
		switch {
		case x.Bytes != y.Bytes:
			return x.Bytes > y.Bytes
		case x.Objects != y.Objects:
			return x.Objects > y.Objects
		case x.Function != y.Function:
			return x.Function < y.Function
		case x.File != y.File:
			return x.File < y.File
		}
		return x.Line < y.Line
	})
	if top > 0 && len(out) > top {
		out = out[:top:top]
	}
	return out, nil
}
