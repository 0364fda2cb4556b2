package signals

import (
	"go/ast"
	"go/parser"
	"go/token"
	"io/fs"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"
)

// modulePath is the import path of this package, as other files of the
// repository import it.
const modulePath = "github.com/culprit-dev/culprit/signals"

// catalogEntry is one Desc of catalog.go as the source has it.
type catalogEntry struct {
	v    string // the Go var
	name string
	pos  token.Position
}

// parseCatalog reads catalog.go's Descs, failing on anything in it that is
// not a package-level var set to a &Desc{...} with a literal Name.
func parseCatalog(t *testing.T) []catalogEntry {
	t.Helper()
	fset := token.NewFileSet()
	f, err := parser.ParseFile(fset, "catalog.go", nil, parser.SkipObjectResolution)
	if err != nil {
		t.Fatal(err)
	}
	if len(f.Imports) != 0 {
		t.Errorf("catalog.go imports %d packages: it must import nothing, so that writers and readers both can import signals", len(f.Imports))
	}
	var out []catalogEntry
	for _, d := range f.Decls {
		gd, ok := d.(*ast.GenDecl)
		if !ok || gd.Tok != token.VAR {
			t.Errorf("%s: catalog.go holds only var declarations of Descs", fset.Position(d.Pos()))
			continue
		}
		for _, sp := range gd.Specs {
			vs := sp.(*ast.ValueSpec)
			if len(vs.Names) != 1 || len(vs.Values) != 1 {
				t.Errorf("%s: one Desc per var", fset.Position(vs.Pos()))
				continue
			}
			u, ok := vs.Values[0].(*ast.UnaryExpr)
			var cl *ast.CompositeLit
			if ok {
				cl, _ = u.X.(*ast.CompositeLit)
			}
			if cl == nil || !isIdent(cl.Type, "Desc") {
				t.Errorf("%s: %s is not a &Desc{...}", fset.Position(vs.Pos()), vs.Names[0].Name)
				continue
			}
			e := catalogEntry{v: vs.Names[0].Name, pos: fset.Position(vs.Pos())}
			fields := map[string]ast.Expr{}
			for _, el := range cl.Elts {
				if kv, ok := el.(*ast.KeyValueExpr); ok {
					if k, ok := kv.Key.(*ast.Ident); ok {
						fields[k.Name] = kv.Value
					}
				}
			}
			if lit, ok := fields["Name"].(*ast.BasicLit); ok && lit.Kind == token.STRING {
				e.name, _ = strconv.Unquote(lit.Value)
			}
			if e.name == "" {
				t.Errorf("%s: %s has no literal Name", e.pos, e.v)
				continue
			}
			if fields["Kind"] == nil || fields["Help"] == nil {
				t.Errorf("%s: %s says neither its Kind nor its Help, or not both", e.pos, e.v)
			}
			if !ast.IsExported(e.v) {
				t.Errorf("%s: %s is not exported: writers and readers are other packages", e.pos, e.v)
			}
			out = append(out, e)
		}
	}
	return out
}

func isIdent(e ast.Expr, name string) bool {
	id, ok := e.(*ast.Ident)
	return ok && id.Name == name
}

// TestCatalogNamesAreUnique wants one Desc per signal name: two Descs of
// one name would put into one series with two helps, or two kinds.
func TestCatalogNamesAreUnique(t *testing.T) {
	entries := parseCatalog(t)
	if len(entries) < 100 {
		t.Fatalf("catalog.go has %d Descs: the test reads it wrong", len(entries))
	}
	valid := regexp.MustCompile(`^[a-z][a-z0-9]*(_[a-z0-9]+)*$`)
	seen := map[string]catalogEntry{}
	for _, e := range entries {
		if !valid.MatchString(e.name) {
			t.Errorf("%s: %q is not snake_case", e.pos, e.name)
		}
		if prev, ok := seen[e.name]; ok {
			t.Errorf("%s: %s names %q, as %s does (%s)", e.pos, e.v, e.name, prev.v, prev.pos)
		}
		seen[e.name] = e
	}
	// The vars are the ones the parse found, and they hold what it read.
	for _, d := range []*Desc{ListenQueueLength, TCPSocketsByRemote, TCPExtListenOverflowsTotal, CollectorSuccess} {
		if _, ok := seen[d.Name]; !ok {
			t.Errorf("%s is not among the Descs parsed from catalog.go", d.Name)
		}
	}
}

// repoRoot is the module's root: the nearest directory above this
// package's holding go.mod.
func repoRoot(t *testing.T) string {
	t.Helper()
	dir, err := filepath.Abs(".")
	if err != nil {
		t.Fatal(err)
	}
	for {
		if _, err := os.Stat(filepath.Join(dir, "go.mod")); err == nil {
			return dir
		}
		up := filepath.Dir(dir)
		if up == dir {
			t.Fatal("no go.mod above the signals package")
		}
		dir = up
	}
}

// TestDescsOnlyInCatalog fails when a Go file of the repository other than
// catalog.go builds a Desc: a signal declared there is one that readers
// may know by another Desc, or by none. Tests may build Descs of made-up
// names, to test the store or an exporter on signals the agent never
// writes; a test of a real signal uses the catalogue's var, and a Desc of
// a catalogue name anywhere else is an error.
func TestDescsOnlyInCatalog(t *testing.T) {
	names := map[string]string{}
	for _, e := range parseCatalog(t) {
		names[e.name] = e.v
	}
	root := repoRoot(t)
	self, err := filepath.Abs("catalog.go")
	if err != nil {
		t.Fatal(err)
	}
	files := 0
	err = filepath.WalkDir(root, func(path string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if d.IsDir() {
			// What the go command ignores, and other languages' trees.
			if n := d.Name(); path != root && (strings.HasPrefix(n, ".") || strings.HasPrefix(n, "_") || n == "testdata" || n == "node_modules" || n == "vendor") {
				return filepath.SkipDir
			}
			return nil
		}
		if !strings.HasSuffix(path, ".go") || path == self {
			return nil
		}
		files++
		checkNoDesc(t, root, path, names)
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	if files < 100 {
		t.Fatalf("read %d Go files under %s: the test walks the wrong tree", files, root)
	}
}

// checkNoDesc reports each Desc composite literal of one file (typed, or
// elided inside a literal of Descs) that the rules above do not allow.
func checkNoDesc(t *testing.T, root, path string, catalog map[string]string) {
	t.Helper()
	fset := token.NewFileSet()
	f, err := parser.ParseFile(fset, path, nil, parser.SkipObjectResolution)
	if err != nil {
		t.Errorf("%s: %v", path, err)
		return
	}
	// How this file names the Desc type: signals.Desc, under whatever name
	// it imports the package, or Desc inside the package itself.
	local := ""
	if f.Name.Name == "signals" && filepath.Dir(path) == filepath.Join(root, "signals") {
		local = "."
	}
	for _, imp := range f.Imports {
		if p, _ := strconv.Unquote(imp.Path.Value); p == modulePath {
			local = "signals"
			if imp.Name != nil {
				local = imp.Name.Name
			}
		}
	}
	if local == "" {
		return
	}
	isDesc := func(e ast.Expr) bool {
		if s, ok := e.(*ast.StarExpr); ok {
			e = s.X
		}
		switch x := e.(type) {
		case *ast.Ident:
			return local == "." && x.Name == "Desc"
		case *ast.SelectorExpr:
			return isIdent(x.X, local) && x.Sel.Name == "Desc"
		}
		return false
	}
	// elemIsDesc: a literal whose elements may leave out their type
	// ([]*signals.Desc{{Name: ...}}, map[string]signals.Desc{...}).
	elemIsDesc := func(e ast.Expr) bool {
		switch x := e.(type) {
		case *ast.ArrayType:
			return isDesc(x.Elt)
		case *ast.MapType:
			return isDesc(x.Value)
		}
		return false
	}
	test := strings.HasSuffix(path, "_test.go")
	rel, _ := filepath.Rel(root, path)
	check := func(cl *ast.CompositeLit) {
		pos := fset.Position(cl.Pos())
		pos.Filename = rel
		name := ""
		for _, el := range cl.Elts {
			if kv, ok := el.(*ast.KeyValueExpr); ok && isIdent(kv.Key, "Name") {
				if lit, ok := kv.Value.(*ast.BasicLit); ok && lit.Kind == token.STRING {
					name, _ = strconv.Unquote(lit.Value)
				}
			}
		}
		switch v, real := catalog[name]; {
		case !test:
			t.Errorf("%s: a signals.Desc built outside signals/catalog.go: declare the signal there and use its var", pos)
		case real:
			t.Errorf("%s: a second Desc of %q: use signals.%s", pos, name, v)
		case name == "":
			t.Errorf("%s: a test's Desc without a literal Name: this test cannot tell it is a made-up signal", pos)
		}
	}
	ast.Inspect(f, func(n ast.Node) bool {
		if call, ok := n.(*ast.CallExpr); ok && isIdent(call.Fun, "new") && len(call.Args) == 1 && isDesc(call.Args[0]) {
			pos := fset.Position(call.Pos())
			pos.Filename = rel
			t.Errorf("%s: new(Desc): declare the signal in signals/catalog.go", pos)
		}
		cl, ok := n.(*ast.CompositeLit)
		if !ok {
			return true
		}
		if cl.Type != nil && isDesc(cl.Type) {
			check(cl)
		}
		if cl.Type != nil && elemIsDesc(cl.Type) {
			for _, el := range cl.Elts {
				if kv, ok := el.(*ast.KeyValueExpr); ok {
					el = kv.Value
				}
				if u, ok := el.(*ast.UnaryExpr); ok && u.Op == token.AND {
					el = u.X
				}
				if inner, ok := el.(*ast.CompositeLit); ok && inner.Type == nil {
					check(inner)
				}
			}
		}
		return true
	})
}
