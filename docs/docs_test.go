package docs

import (
	"bufio"
	"errors"
	"go/ast"
	"go/parser"
	"go/token"
	"io/fs"
	"net/url"
	"os"
	"path"
	"path/filepath"
	"regexp"
	"sort"
	"strconv"
	"strings"
	"testing"
	"time"
	"unicode"

	"github.com/culprit-dev/culprit/rules"
)

// root is the repository root, seen from this package's directory (where
// go test runs).
const root = ".."

// designPath is the document the catalogue tests hold to the code.
const designPath = "docs/DESIGN.md"

func readRepoFile(t *testing.T, rel string) string {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(root, filepath.FromSlash(rel)))
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

// where is a source position with its file relative to the repository
// root, as a reader of the failure finds it.
func where(fset *token.FileSet, pos token.Pos) string {
	p := fset.Position(pos)
	if rel, err := filepath.Rel(root, p.Filename); err == nil {
		p.Filename = filepath.ToSlash(rel)
	}
	return p.String()
}

// named reports whether doc names s as code, in backticks. Every name the
// design catalogues is written so; a plain substring test would find a
// cause such as "heap" in any sentence about memory and prove nothing.
func named(doc, s string) bool { return strings.Contains(doc, "`"+s+"`") }

// TestDesignNamesEveryRule builds the rules the way the agent does and
// wants each one's name in the design.
func TestDesignNamesEveryRule(t *testing.T) {
	doc := readRepoFile(t, designPath)
	// The heap interval only sets how fresh a heap sample must be; it does
	// not change which rules exist. 10s is pprof.interval's default.
	rs := rules.New(rules.DefaultOptions(), 10*time.Second)
	if len(rs) == 0 {
		t.Fatal("rules.New returned no rules: nothing to check")
	}
	for _, r := range rs {
		if !named(doc, r.Name()) {
			t.Errorf("%s does not name rule `%s` (registered by rules.New)", designPath, r.Name())
		}
	}
}

// TestDesignNamesEveryCause reads every exported Cause* constant of
// package rules from its source, since causes are plain strings that no
// value at run time lists.
func TestDesignNamesEveryCause(t *testing.T) {
	doc := readRepoFile(t, designPath)
	files, err := filepath.Glob(filepath.Join(root, "rules", "*.go"))
	if err != nil {
		t.Fatal(err)
	}
	fset := token.NewFileSet()
	found := 0
	for _, f := range files {
		if strings.HasSuffix(f, "_test.go") {
			continue
		}
		af, err := parser.ParseFile(fset, f, nil, parser.SkipObjectResolution)
		if err != nil {
			t.Fatal(err)
		}
		for _, d := range af.Decls {
			gd, ok := d.(*ast.GenDecl)
			if !ok || gd.Tok != token.CONST {
				continue
			}
			for _, spec := range gd.Specs {
				vs := spec.(*ast.ValueSpec)
				for i, n := range vs.Names {
					if !n.IsExported() || !strings.HasPrefix(n.Name, "Cause") {
						continue
					}
					pos := where(fset, n.Pos())
					v, ok := stringLit(vs.Values, i)
					if !ok {
						t.Errorf("%s: %s is not a string literal, so this test cannot read the cause it names", pos, n.Name)
						continue
					}
					found++
					if !named(doc, v) {
						t.Errorf("%s does not name cause `%s` (%s, %s)", designPath, v, n.Name, pos)
					}
				}
			}
		}
	}
	if found == 0 {
		t.Fatal("no Cause* constant found in rules/*.go: the test reads the wrong files")
	}
}

// stringLit is the value of the i-th expression when it is a string
// literal.
func stringLit(values []ast.Expr, i int) (string, bool) {
	if i >= len(values) {
		return "", false
	}
	lit, ok := values[i].(*ast.BasicLit)
	if !ok || lit.Kind != token.STRING {
		return "", false
	}
	v, err := strconv.Unquote(lit.Value)
	return v, err == nil
}

// moduleDirs returns the directories of the main module that hold Go
// files, relative to root with forward slashes: the packages `go list
// ./...` lists, found without the go command. testdata, hidden and
// underscore directories and nested modules (with a go.mod of their own)
// are not part of the module, as for the go command.
func moduleDirs(t *testing.T) []string {
	t.Helper()
	abs, err := filepath.Abs(root)
	if err != nil {
		t.Fatal(err)
	}
	var dirs []string
	err = filepath.WalkDir(abs, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if !d.IsDir() {
			return nil
		}
		if p != abs {
			name := d.Name()
			if name == "testdata" || strings.HasPrefix(name, ".") || strings.HasPrefix(name, "_") {
				return filepath.SkipDir
			}
			if _, err := os.Stat(filepath.Join(p, "go.mod")); err == nil {
				return filepath.SkipDir
			}
		}
		gos, err := filepath.Glob(filepath.Join(p, "*.go"))
		if err != nil {
			return err
		}
		if len(gos) > 0 && p != abs {
			rel, err := filepath.Rel(abs, p)
			if err != nil {
				return err
			}
			dirs = append(dirs, filepath.ToSlash(rel))
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	sort.Strings(dirs)
	return dirs
}

// TestDesignNamesEveryPackage wants each package directory in the design,
// written as `dir/`.
func TestDesignNamesEveryPackage(t *testing.T) {
	doc := readRepoFile(t, designPath)
	dirs := moduleDirs(t)
	if len(dirs) == 0 {
		t.Fatal("no Go package found under the repository root")
	}
	for _, d := range dirs {
		if !named(doc, d+"/") {
			t.Errorf("%s does not name package `%s/`", designPath, d)
		}
	}
}

// catalogPath is the file that declares every signal the agent writes,
// once (signals/catalog.go); no other file may build a signals.Desc
// (signals/catalog_test.go holds the repository to that).
const catalogPath = "signals/catalog.go"

// signalNames returns every signal name the catalogue declares, with
// where: the Name of each Desc literal of signals/catalog.go. A Desc whose
// name the test cannot read is an error rather than a silent gap in the
// check.
func signalNames(t *testing.T) map[string]string {
	t.Helper()
	out := map[string]string{}
	fset := token.NewFileSet()
	af, err := parser.ParseFile(fset, filepath.Join(root, filepath.FromSlash(catalogPath)), nil, parser.SkipObjectResolution)
	if err != nil {
		t.Fatal(err)
	}
	ast.Inspect(af, func(n ast.Node) bool {
		cl, ok := n.(*ast.CompositeLit)
		if !ok {
			return true
		}
		if id, ok := cl.Type.(*ast.Ident); !ok || id.Name != "Desc" {
			return true
		}
		for _, el := range cl.Elts {
			kv, ok := el.(*ast.KeyValueExpr)
			if !ok {
				continue
			}
			if k, ok := kv.Key.(*ast.Ident); !ok || k.Name != "Name" {
				continue
			}
			pos := where(fset, kv.Pos())
			if v, ok := stringLit([]ast.Expr{kv.Value}, 0); ok {
				out[v] = pos
			} else {
				t.Errorf("%s: a Desc whose Name this test cannot read: give it a string literal", pos)
			}
		}
		return true
	})
	return out
}

// TestDesignNamesEverySignal wants every signal the store can carry in the
// design's signal catalogue.
func TestDesignNamesEverySignal(t *testing.T) {
	doc := readRepoFile(t, designPath)
	sigs := signalNames(t)
	if len(sigs) == 0 {
		t.Fatalf("no Desc found in %s: the test reads the wrong file", catalogPath)
	}
	names := make([]string, 0, len(sigs))
	for n := range sigs {
		names = append(names, n)
	}
	sort.Strings(names)
	for _, n := range names {
		if !named(doc, n) {
			t.Errorf("%s does not name signal `%s` (declared at %s)", designPath, n, sigs[n])
		}
	}
}

// confKeys reads agent.conf's sections and keys as dotted names:
// "rules.accept_overflow" is a section, "rules.accept_overflow.window" a
// key.
func confKeys(t *testing.T) (keys, sections map[string]bool) {
	t.Helper()
	keys, sections = map[string]bool{}, map[string]bool{}
	section := ""
	sc := bufio.NewScanner(strings.NewReader(readRepoFile(t, "agent.conf")))
	keyLine := regexp.MustCompile(`^([A-Za-z0-9_]+)\s*=`)
	for sc.Scan() {
		line := strings.TrimSpace(sc.Text())
		switch {
		case strings.HasPrefix(line, "[") && strings.HasSuffix(line, "]"):
			section = strings.Trim(line, "[]")
			sections[section] = true
		case keyLine.MatchString(line):
			k := keyLine.FindStringSubmatch(line)[1]
			if section != "" {
				k = section + "." + k
			}
			keys[k] = true
		}
	}
	if len(keys) == 0 {
		t.Fatal("agent.conf has no keys")
	}
	return keys, sections
}

// TestDesignConfigKeysExist checks the configuration keys the design
// names: a key renamed or removed in agent.conf leaves the design pointing
// operators at nothing.
func TestDesignConfigKeysExist(t *testing.T) {
	doc := readRepoFile(t, designPath)
	keys, sections := confKeys(t)
	keyLike := regexp.MustCompile("`([a-z][a-z0-9_]*(?:\\.[a-z0-9_]+)+)`")
	seen := map[string]bool{}
	for _, m := range keyLike.FindAllStringSubmatch(doc, -1) {
		k := m[1]
		if seen[k] {
			continue
		}
		seen[k] = true
		top, _, _ := strings.Cut(k, ".")
		if !sections[top] {
			continue // not a configuration key: a file, a Go name
		}
		if _, err := os.Stat(filepath.Join(root, filepath.FromSlash(k))); err == nil {
			continue // a file of the repository, agent.conf itself
		}
		if !keys[k] && !sections[k] {
			t.Errorf("%s names `%s`, which is no key or section of agent.conf", designPath, k)
		}
	}
}

// linkedDocs returns the documents whose links must resolve.
func linkedDocs(t *testing.T) []string {
	t.Helper()
	docs := []string{"README.md", "deploy/README.md"}
	md, err := filepath.Glob(filepath.Join(root, "docs", "*.md"))
	if err != nil {
		t.Fatal(err)
	}
	for _, f := range md {
		docs = append(docs, "docs/"+filepath.Base(f))
	}
	return docs
}

var (
	fence      = regexp.MustCompile("^ {0,3}(```|~~~)")
	codeSpan   = regexp.MustCompile("`[^`]*`")
	inlineLink = regexp.MustCompile(`!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*(<[^>]*>|[^)\s]*)(?:\s+(?:"[^"]*"|'[^']*'))?\s*\)`)
	refLink    = regexp.MustCompile(`^ {0,3}\[[^\]]+\]:\s*(<[^>]*>|\S+)`)
	scheme     = regexp.MustCompile(`^[A-Za-z][A-Za-z0-9+.-]*:`)
	heading    = regexp.MustCompile(`^ {0,3}(#{1,6})\s+(.*?)\s*#*\s*$`)
	// Paths that climb out of the directory they are written in, and this
	// machine's own tree: neither exists in a clone of the repository.
	upPath   = regexp.MustCompile("(?:^|[^A-Za-z0-9_./-])((?:\\.\\./)+[^\\s)\\]`'\"<>]*)")
	workPath = regexp.MustCompile("/work/[^\\s)\\]`'\"<>]*")
	mdLinkIn = regexp.MustCompile(`\[([^\]]*)\]\([^)]*\)`)
)

// mdLine is one line of a markdown file outside code blocks.
type mdLine struct {
	n    int
	text string
}

// prose returns the lines of a markdown document that are not in fenced
// code blocks, where a bracket is text, not a link.
func prose(doc string) []mdLine {
	var out []mdLine
	in := false
	for i, l := range strings.Split(doc, "\n") {
		if fence.MatchString(l) {
			in = !in
			continue
		}
		if !in {
			out = append(out, mdLine{i + 1, l})
		}
	}
	return out
}

// slug is the anchor GitHub gives a heading: its text lowercased, code
// and emphasis marks and link targets dropped, every character that is
// not a letter, digit, space, hyphen or underscore removed, and spaces
// turned into hyphens.
func slug(h string) string {
	h = mdLinkIn.ReplaceAllString(h, "$1")
	var b strings.Builder
	for _, r := range strings.ToLower(h) {
		switch {
		case r == ' ':
			b.WriteByte('-')
		case r == '-' || r == '_' || unicode.IsLetter(r) || unicode.IsDigit(r):
			b.WriteRune(r)
		}
	}
	return b.String()
}

// anchors returns the heading anchors of a markdown document; repeated
// headings get -1, -2... as on GitHub.
func anchors(doc string) map[string]bool {
	out := map[string]bool{}
	count := map[string]int{}
	for _, l := range prose(doc) {
		m := heading.FindStringSubmatch(l.text)
		if m == nil {
			continue
		}
		s := slug(m[2])
		if n := count[s]; n > 0 {
			out[s+"-"+strconv.Itoa(n)] = true
		} else {
			out[s] = true
		}
		count[s]++
	}
	return out
}

// outside reports whether rel, a path written in the document at docRel,
// resolves outside the repository.
func outside(docRel, rel string) bool {
	p := path.Clean(path.Join(path.Dir(docRel), rel))
	return p == ".." || strings.HasPrefix(p, "../")
}

// checkLink says what is wrong with one link target of the document at
// docRel (relative to root, slashes), or "" when it resolves.
func checkLink(docRel, doc, target string, anchorsOf func(string) (map[string]bool, error)) string {
	target = strings.TrimSuffix(strings.TrimPrefix(target, "<"), ">")
	if target == "" {
		return "empty link"
	}
	if scheme.MatchString(target) || strings.HasPrefix(target, "//") {
		return "" // a URL, not a file of the repository
	}
	p, frag, _ := strings.Cut(target, "#")
	if unesc, err := url.PathUnescape(p); err == nil {
		p = unesc
	}
	if p == "" {
		if !anchors(doc)[frag] {
			return "no heading #" + frag + " in this document"
		}
		return ""
	}
	var rel string
	if strings.HasPrefix(p, "/") {
		rel = path.Clean(strings.TrimPrefix(p, "/")) // GitHub: from the repository root
	} else {
		if outside(docRel, p) {
			return "points outside the repository"
		}
		rel = path.Clean(path.Join(path.Dir(docRel), p))
	}
	fi, err := os.Stat(filepath.Join(root, filepath.FromSlash(rel)))
	if err != nil {
		if errors.Is(err, fs.ErrNotExist) {
			return "no such file in the repository: " + rel
		}
		return err.Error()
	}
	if frag == "" || fi.IsDir() || !strings.HasSuffix(rel, ".md") {
		return ""
	}
	as, err := anchorsOf(rel)
	if err != nil {
		return err.Error()
	}
	if !as[frag] {
		return "no heading #" + frag + " in " + rel
	}
	return ""
}

// TestLinksResolve checks every relative link of the repository's
// documents, and that the README names no path outside the repository: a
// reader of a clone has nothing there.
func TestLinksResolve(t *testing.T) {
	cache := map[string]map[string]bool{}
	anchorsOf := func(rel string) (map[string]bool, error) {
		if a, ok := cache[rel]; ok {
			return a, nil
		}
		b, err := os.ReadFile(filepath.Join(root, filepath.FromSlash(rel)))
		if err != nil {
			return nil, err
		}
		cache[rel] = anchors(string(b))
		return cache[rel], nil
	}
	checked := 0
	for _, docRel := range linkedDocs(t) {
		doc := readRepoFile(t, docRel)
		reported := map[string]bool{} // line and path, so one mistake is one error
		for _, l := range prose(doc) {
			text := codeSpan.ReplaceAllStringFunc(l.text, func(s string) string { return strings.Repeat(" ", len(s)) })
			var targets []string
			for _, m := range inlineLink.FindAllStringSubmatch(text, -1) {
				targets = append(targets, m[1])
			}
			if m := refLink.FindStringSubmatch(text); m != nil {
				targets = append(targets, m[1])
			}
			for _, target := range targets {
				checked++
				if why := checkLink(docRel, doc, target, anchorsOf); why != "" {
					t.Errorf("%s:%d: link %q: %s", docRel, l.n, target, why)
					p, _, _ := strings.Cut(target, "#")
					reported[strconv.Itoa(l.n)+"\x00"+p] = true
				}
			}
		}
		if docRel != "README.md" {
			continue
		}
		// Paths in prose and code alike: a command that reads ../shared
		// fails in a clone as surely as a link does.
		for i, l := range strings.Split(doc, "\n") {
			n := i + 1
			var bad []string
			for _, m := range upPath.FindAllStringSubmatch(l, -1) {
				if outside(docRel, m[1]) {
					bad = append(bad, m[1])
				}
			}
			bad = append(bad, workPath.FindAllString(l, -1)...)
			for _, p := range bad {
				key := strconv.Itoa(n) + "\x00" + p
				if reported[key] {
					continue
				}
				reported[key] = true
				t.Errorf("%s:%d: path %q is outside the repository", docRel, n, p)
			}
		}
	}
	if checked == 0 {
		t.Fatal("no link found in any document: the link parser is broken")
	}
}
