package rules

import (
	"go/ast"
	"go/parser"
	"go/token"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"unicode"
	"unicode/utf8"
)

// Titles are one style across rules: sentence case, starting with a
// capital or a number ("Accept queue of ...", "3 OOM kills ..."), as the
// first line an operator reads in a list. The rules' sources are read for
// every string a title is built from (a Title field, a title variable, and
// the format of a fmt.Sprintf given to them).
func TestTitlesAreSentenceCase(t *testing.T) {
	files, err := filepath.Glob("*.go")
	if err != nil {
		t.Fatal(err)
	}
	fset := token.NewFileSet()
	checked := 0
	check := func(e ast.Expr) {
		if call, ok := e.(*ast.CallExpr); ok && len(call.Args) > 0 {
			if sel, ok := call.Fun.(*ast.SelectorExpr); ok && sel.Sel.Name == "Sprintf" {
				e = call.Args[0]
			}
		}
		lit, ok := e.(*ast.BasicLit)
		if !ok || lit.Kind != token.STRING {
			return
		}
		s, err := strconv.Unquote(lit.Value)
		if err != nil || s == "" || strings.HasPrefix(s, "%") {
			return
		}
		checked++
		if r, _ := utf8.DecodeRuneInString(s); unicode.IsLower(r) {
			t.Errorf("%s: title %q starts in lower case", fset.Position(lit.Pos()), s)
		}
	}
	isTitle := func(e ast.Expr) bool {
		switch x := e.(type) {
		case *ast.Ident:
			return x.Name == "Title" || x.Name == "title"
		case *ast.SelectorExpr:
			return x.Sel.Name == "Title"
		}
		return false
	}
	for _, f := range files {
		if strings.HasSuffix(f, "_test.go") {
			continue
		}
		file, err := parser.ParseFile(fset, f, nil, 0)
		if err != nil {
			t.Fatal(err)
		}
		ast.Inspect(file, func(n ast.Node) bool {
			switch x := n.(type) {
			case *ast.KeyValueExpr:
				if isTitle(x.Key) {
					check(x.Value)
				}
			case *ast.AssignStmt:
				for i, l := range x.Lhs {
					if isTitle(l) && i < len(x.Rhs) {
						check(x.Rhs[i])
					}
				}
			}
			return true
		})
	}
	if checked < 20 {
		t.Fatalf("only %d titles found in the rules' sources: the test no longer sees them", checked)
	}
}
