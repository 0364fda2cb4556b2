// Command schedab compares the eBPF run time of two builds of bpf/sched.c
// under the same load. Run-time figures of one build from one run to the
// next (scripts/bpf-cost.sh) move by 10 % or more beside nginx flat out,
// more than most changes to the program are worth. So both builds are
// loaded at once and attached in turns, one second each, with the
// kernel's BPF stats on, and each program's run time per run is printed
// per build. Attached both at once, the first in line paid 40-55 % more
// (it takes the cache misses on the task structs); in turns, the build
// loaded first still pays a few percent more, so run it twice, A B and
// B A (docs/NOTES.md, Session 16).
//
//	go build -o /tmp/schedab ./scripts/schedab
//	cp probes/sched_bpfel.o /tmp/A.o   # before the change; go generate ./probes/ after
//	wrk -t2 -c64 -d44s http://127.0.0.1:PORT/ &
//	/tmp/schedab /tmp/A.o probes/sched_bpfel.o 40 $(pgrep nginx)
package main
