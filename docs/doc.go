// Package docs holds only tests over the repository's documents: that
// docs/DESIGN.md names every rule, cause, signal, package and configuration
// key the code has, and that the links of README.md, docs/*.md and
// deploy/README.md resolve inside the repository. A document nobody checks
// drifts from the code; these tests make the drift a failure.
package docs
