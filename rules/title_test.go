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

// Titles and remediations are one style across rules: sentence case,
// starting with a capital or a number ("Accept queue of ...", "3 OOM kills
// ...", "Raise the listen backlog ..."), as an operator reads them in a
// list. The rules' sources are read for every string they are built from
// (a Title or Remediation field, a title or fix variable, the format of a
// fmt.Sprintf or the first operand of a + given to them). The Advisor's
// remedies are checked as whole sentences by TestAdviceSentences.
func TestTitlesAreSentenceCase(t *testing.T) {
	files, err := filepath.Glob("*.go")
	if err != nil {
		t.Fatal(err)
	}
	fset := token.NewFileSet()
	checked := 0
	check := func(e ast.Expr) {
		for {
			b, ok := e.(*ast.BinaryExpr)
			if !ok || b.Op != token.ADD {
				break
			}
			e = b.X
		}
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
			t.Errorf("%s: %q starts in lower case", fset.Position(lit.Pos()), s)
		}
	}
	isTitle := func(e ast.Expr) bool {
		switch x := e.(type) {
		case *ast.Ident:
			switch x.Name {
			case "Title", "title", "Remediation", "fix", "cookiesAdvice":
				return true
			}
		case *ast.SelectorExpr:
			return x.Sel.Name == "Title" || x.Sel.Name == "Remediation"
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
	if checked < 40 {
		t.Fatalf("only %d titles and remediations found in the rules' sources: the test no longer sees them", checked)
	}
}
