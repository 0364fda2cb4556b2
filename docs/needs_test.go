package docs

import (
	"path"
	"regexp"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/culprit-dev/culprit/rules"
	"github.com/culprit-dev/culprit/signals"
)

// section is the text of the design's section titled title
// (up to the next "## ").
func section(t *testing.T, doc, title string) string {
	t.Helper()
	i := strings.Index(doc, "\n"+title)
	if i < 0 {
		t.Fatalf("%s has no section %q", designPath, title)
	}
	s := doc[i+1+len(title):]
	if j := strings.Index(s, "\n## "); j >= 0 {
		s = s[:j]
	}
	return s
}

// tableRows are the cells, trimmed, of the markdown table rows of s whose
// first cell names something in backticks (not the header's).
func tableRows(s string) [][]string {
	var out [][]string
	for _, line := range strings.Split(s, "\n") {
		if !strings.HasPrefix(line, "| ") {
			continue
		}
		cells := strings.Split(strings.Trim(line, "|"), "|")
		for i := range cells {
			cells[i] = strings.TrimSpace(cells[i])
		}
		if len(codeNames(cells[0])) == 0 {
			continue
		}
		out = append(out, cells)
	}
	return out
}

var codeName = regexp.MustCompile("`([^`]+)`")

// codeNames are the names in backticks of s, label selectors cut off
// (`tcp_sockets{state="LISTEN"}` is tcp_sockets).
func codeNames(s string) []string {
	var out []string
	for _, m := range codeName.FindAllStringSubmatch(s, -1) {
		n, _, _ := strings.Cut(m[1], "{")
		out = append(out, n)
	}
	return out
}

// componentOf is the component whose code a "written by" path of the
// design is, "" for the agent's own code (which no rule reads).
func componentOf(p string) string {
	switch {
	case p == "collectors/pprof.go":
		return signals.CollectorPprofHeap
	case p == "probes/cpuprofile.go":
		return signals.ProbeCPUProfile
	case strings.HasPrefix(p, "traces/"):
		return signals.ReceiverOTLP
	case strings.HasPrefix(p, "probes/"), strings.HasPrefix(p, "collectors/"):
		if c := strings.TrimSuffix(path.Base(p), ".go"); signals.ComponentKind(c) != "" {
			return c
		}
	}
	return ""
}

// writers reads the signal catalogue: which component writes each number
// series, and the side stores' rows (evidence in words, its writer, the
// rules that read it).
func writers(t *testing.T, doc string) (bySignal map[string]string, rows [][]string) {
	t.Helper()
	bySignal = map[string]string{}
	for _, r := range tableRows(section(t, doc, "## 5. Signal catalogue")) {
		var writtenBy string
		switch len(r) {
		case 5: // signal | kind | labels | written by | read by rules
			writtenBy = r[3]
			if c := componentOf(firstCode(writtenBy)); c != "" {
				bySignal[codeNames(r[0])[0]] = c
			}
		case 3: // evidence | written by | read by
			rows = append(rows, r)
		}
	}
	if len(bySignal) == 0 {
		t.Fatalf("%s: no signal of the catalogue has a component as its writer: the table changed shape", designPath)
	}
	return bySignal, rows
}

func firstCode(s string) string {
	if n := codeNames(s); len(n) > 0 {
		return n[0]
	}
	return ""
}

// mentioned is a component named in words: "(sched probe)",
// "(accept_queue collector)", "tcplife probe's", "OTLP".
var mentioned = regexp.MustCompile(`\b([a-z_]+) (probe|collector)\b|\bOTLP\b`)

func mentions(s string) []string {
	var out []string
	for _, m := range mentioned.FindAllStringSubmatch(s, -1) {
		if m[1] == "" {
			out = append(out, signals.ReceiverOTLP)
			continue
		}
		if signals.ComponentKind(m[1]) != "" {
			out = append(out, m[1])
		}
	}
	return out
}

func needsOf(r rules.Rule) map[string]bool {
	out := map[string]bool{}
	for _, n := range r.Needs() {
		out[n.Component] = true
	}
	return out
}

// TestDesignRuleInputsAreNeeds holds the rule catalogue's "what it reads"
// to the rules' declared needs (rules.Need), both ways: each series it
// names is written by a component the rule needs, and so is each probe or
// collector it names; each need shows in the row, by a series its
// component writes or by the component's name. The needs are what the
// agent reports lost when a component does not run.
func TestDesignRuleInputsAreNeeds(t *testing.T) {
	doc := readRepoFile(t, designPath)
	bySignal, _ := writers(t, doc)
	reads := map[string]string{}
	for _, r := range tableRows(section(t, doc, "## 4. Rule catalogue")) {
		if len(r) == 4 {
			reads[codeNames(r[0])[0]] = r[2]
		}
	}
	for _, r := range rules.New(rules.DefaultOptions(), 10*time.Second) {
		cell, ok := reads[r.Name()]
		if !ok {
			t.Errorf("%s: the rule catalogue has no row for `%s`", designPath, r.Name())
			continue
		}
		needs := needsOf(r)
		shown := map[string]bool{}
		for _, s := range codeNames(cell) {
			c, ok := bySignal[s]
			if !ok {
				continue
			}
			shown[c] = true
			if !needs[c] {
				t.Errorf("%s: `%s` reads `%s`, written by %s, which is not among its needs (rules/%s.go Needs)", designPath, r.Name(), s, c, r.Name())
			}
		}
		for _, c := range mentions(cell) {
			shown[c] = true
			if !needs[c] {
				t.Errorf("%s: `%s` reads from the %s %s, which is not among its needs (rules/%s.go Needs)", designPath, r.Name(), c, signals.ComponentKind(c), r.Name())
			}
		}
		for _, n := range r.Needs() {
			if !shown[n.Component] {
				t.Errorf("%s: the row of `%s` says nothing of the %s %s it needs (%s): name a series it writes, or the component", designPath, r.Name(), n.Component, signals.ComponentKind(n.Component), n.What)
			}
		}
	}
}

// TestDesignReadersNeedWriters holds the signal catalogue's "read by"
// columns to the needs: a rule said to read a series, or a side store,
// needs the component that writes it.
func TestDesignReadersNeedWriters(t *testing.T) {
	doc := readRepoFile(t, designPath)
	byName := map[string]rules.Rule{}
	for _, r := range rules.New(rules.DefaultOptions(), 10*time.Second) {
		byName[r.Name()] = r
	}
	check := func(what, writer, readBy string) {
		if strings.HasPrefix(readBy, "—") {
			return // people's and dashboards', or another component's: no rule's
		}
		for _, n := range codeNames(readBy) {
			r, ok := byName[n]
			if !ok {
				continue
			}
			if !needsOf(r)[writer] {
				t.Errorf("%s: %s is read by `%s` and written by %s, which `%s` does not need (rules/%s.go Needs)", designPath, what, n, writer, n, n)
			}
		}
	}
	bySignal, sideRows := writers(t, doc)
	checked := 0
	for _, r := range tableRows(section(t, doc, "## 5. Signal catalogue")) {
		if len(r) != 5 {
			continue
		}
		s := codeNames(r[0])[0]
		if c, ok := bySignal[s]; ok {
			check("`"+s+"`", c, r[4])
			checked++
		}
	}
	for _, r := range sideRows {
		c := componentOf(firstCode(r[1]))
		if c == "" {
			t.Errorf("%s: side store %q is written by %q, which is no component", designPath, r[0], r[1])
			continue
		}
		check(strings.SplitN(r[0], ":", 2)[0], c, r[2])
		checked++
	}
	if checked == 0 || !slices.ContainsFunc(sideRows, func(r []string) bool { return strings.Contains(r[0], "episodes") }) {
		t.Fatalf("%s: the signal catalogue's tables were not found", designPath)
	}
}
