// Package sockdiag is culprit's one client of the kernel's sock_diag
// netlink interface (inet_diag): it dumps the TCP sockets of a network
// namespace straight off a netlink socket into a reused buffer and hands
// each one to a callback, decoded in place, without an allocation per
// socket. Over 100k sockets, vishvananda/netlink's SocketDiagTCPInfo took
// 89-102 ms and 48.7 MB per dump; this takes ~30 ms (nearly all of it the
// kernel's walk) and nothing.
//
// A netlink socket stays in the network namespace it was created in, so a
// Conn is opened once per namespace (joining it with setns on a thread of
// its own when the agent is elsewhere, see InNetns) and reused.
package sockdiag
