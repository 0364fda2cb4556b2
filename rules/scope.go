package rules

import "fmt"

// Scopes of findings ([rules] scope). In a pod the network namespace is
// shared by every container (a mesh proxy, a log shipper, culprit itself),
// so a socket in it says nothing of whose it is; the collectors label
// every socket series with its owner, and rules read only the target's
// unless told to watch the whole namespace.
const (
	// ScopeTarget: findings are about the sockets the target and its
	// children hold, and only those.
	ScopeTarget = "target"
	// ScopeNamespace: other processes' sockets make findings too, titled
	// with their owner. The agent's own never do.
	ScopeNamespace = "namespace"
)

// Owner label values the sockets collector writes (collectors/sockets.go).
const (
	ownerTarget  = "target"
	ownerAgent   = "agent"
	ownerUnknown = "unknown"
)

// owned reports whether a series labelled with this owner may make a
// finding: the target's always, other processes' in namespace scope,
// never the agent's or nobody's.
func (w Window) owned(owner string) bool {
	switch owner {
	case ownerTarget:
		return true
	case ownerAgent, ownerUnknown, "":
		return false
	}
	return w.Scope == ScopeNamespace
}

// ownerKey is an observation key for what owner holds: the bare key for
// the target's (keys stay as they were), owner/key for another process's.
func ownerKey(owner, key string) string {
	if owner == ownerTarget {
		return key
	}
	return owner + "/" + key
}

// ownerTitle is what a title says of whose it is: nothing for the
// target's, "(process nginx, not the target)" for another's.
func ownerTitle(owner string) string {
	if owner == ownerTarget {
		return ""
	}
	return fmt.Sprintf(" (process %s, not the target)", owner)
}
