#!/usr/bin/env bash
# The figures make bench measured, as one table: each goal, what this run
# measured, and the baseline the same run measured beside it. Reads the
# outputs make bench saved in DIR:
#   footprint.txt  go test -bench BenchmarkFootprint ./agent/
#   probes.txt     go test -bench . ./probes/ (BenchmarkSchedProbe)
#   nginx.txt      scripts/bench-nginx.sh (its BENCH-NGINX line)
# A figure whose output is missing (a step skipped: no nginx, no
# node_exporter) is shown as "-".
#
# Exit status: 0 printed, 2 usage.
set -euo pipefail

[ $# -eq 1 ] && [ -d "$1" ] || { echo "usage: scripts/bench-table.sh DIR" >&2; exit 2; }
dir=$1

# metric FILE BENCH UNIT: the value a Go benchmark (name prefix BENCH)
# reported with UNIT, or "-".
metric() {
  local f=$dir/$1
  [ -f "$f" ] || { echo -; return; }
  awk -v b="$2" -v u="$3" '
    index($1, b) == 1 {
      for (i = 3; i < NF; i++) if ($(i + 1) == u) { v = $i }
    }
    END { if (v == "") print "-"; else print v }' "$f"
}

# nginx KEY: a value of the BENCH-NGINX line, or "-".
nginx() {
  local f=$dir/nginx.txt
  [ -f "$f" ] || { echo -; return; }
  awk -v k="$1" '$1 == "BENCH-NGINX" { for (i = 2; i <= NF; i++) { split($i, kv, "="); if (kv[1] == k) v = kv[2] } }
    END { if (v == "") print "-"; else print v }' "$f"
}

fmt() { # fmt PRINTF VALUE: VALUE formatted, "-" kept
  if [ "$2" = - ]; then echo -; else awk -v f="$1" -v v="$2" 'BEGIN { printf f, v }'; fi
}

# verdict VALUE OP LIMIT: "ok" or "MISSED" (or "?" without a value).
verdict() {
  [ "$1" = - ] && { echo "?"; return; }
  awk -v v="$1" -v op="$2" -v l="$3" 'BEGIN { ok = (op == "<=") ? v <= l : v >= l; print ok ? "ok" : "MISSED" }'
}

ns_op() { # the ns/op of a sub-benchmark of probes.txt
  local f=$dir/probes.txt
  [ -f "$f" ] || { echo -; return; }
  awk -v b="$1" 'index($1, b) == 1 { for (i = 2; i < NF; i++) if ($(i + 1) == "ns/op") v = $i } END { if (v == "") print "-"; else print v }' "$f"
}

row() { printf '| %-52s | %-9s | %-28s | %-44s | %-6s |\n' "$@"; }

idle_rss=$(metric footprint.txt BenchmarkFootprint/idle agent-rss-MiB)
idle_anon=$(metric footprint.txt BenchmarkFootprint/idle agent-rss-anon-MiB)
ne_idle_rss=$(metric footprint.txt BenchmarkFootprint/idle node-exporter-rss-MiB)
idle_cpu=$(metric footprint.txt BenchmarkFootprint/idle agent-cpu-%)
ne_idle_cpu=$(metric footprint.txt BenchmarkFootprint/idle node-exporter-cpu-%)
idle_alloc=$(metric footprint.txt BenchmarkFootprint/idle agent-alloc-KB/s)
ne_idle_alloc=$(metric footprint.txt BenchmarkFootprint/idle node-exporter-alloc-KB/s)
k40_cpu=$(metric footprint.txt BenchmarkFootprint/40k_sockets agent-cpu-%)
k40_socks=$(metric footprint.txt BenchmarkFootprint/40k_sockets sockets)
ne_k40_cpu=$(metric footprint.txt BenchmarkFootprint/40k_sockets node-exporter-cpu-%)
rps_cpu=$(metric footprint.txt BenchmarkFootprint/nginx_20k_rps agent-cpu-%)
rps_rate=$(metric footprint.txt BenchmarkFootprint/nginx_20k_rps requests/s)
rps_rss=$(metric footprint.txt BenchmarkFootprint/nginx_20k_rps agent-rss-MiB)
ne_rps_cpu=$(metric footprint.txt BenchmarkFootprint/nginx_20k_rps node-exporter-cpu-%)
ne_rps_rss=$(metric footprint.txt BenchmarkFootprint/nginx_20k_rps node-exporter-rss-MiB)
wrk_rss=$(nginx rss_mib)
wrk_hwm=$(nginx hwm_mib)
wrk_socks=$(nginx sockets)
pair=$(nginx pair_ratio)
pair_min=$(nginx pair_min)
base_spread=$(nginx base_spread)
ratio=$(nginx ratio)
rps_without=$(nginx rps_without)
rps_with=$(nginx rps_with)
cost_ratio=$(nginx cost_ratio)
agent_cpu=$(nginx agent_cpu)
agent_bpf=$(nginx agent_bpf)
base=$(ns_op BenchmarkSchedProbe/baseline)
probe=$(ns_op BenchmarkSchedProbe/target)
runqlat=$(ns_op BenchmarkSchedProbe/runqlat)
offcpu=$(ns_op BenchmarkSchedProbe/offcputime)
bpf_probe=$(metric probes.txt BenchmarkSchedProbe/target bpf-ns/op)
bpf_other=$(metric probes.txt BenchmarkSchedProbe/other bpf-ns/op)
bpf_epoll=$(metric probes.txt BenchmarkSchedProbe/epoll-target bpf-ns/op)
epoll_base=$(ns_op BenchmarkSchedProbe/epoll-baseline)
epoll_probe=$(ns_op BenchmarkSchedProbe/epoll-target)
bpf_runqlat=$(metric probes.txt BenchmarkSchedProbe/runqlat bpf-ns/op)
bpf_offcpu=$(metric probes.txt BenchmarkSchedProbe/offcputime bpf-ns/op)
yield_base=$(ns_op BenchmarkSchedProbe/yield-baseline)
yield_probe=$(ns_op BenchmarkSchedProbe/yield-target)
bpf_yield=$(metric probes.txt BenchmarkSchedProbe/yield-target bpf-ns/op)
x() { # x A B: A/B as a ratio, "-" when either is missing
  if [ "$1" = - ] || [ "$2" = - ]; then echo -; else awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2fx", a / b }'; fi
}

echo
echo "culprit footprint, $(date -u +%Y-%m-%dT%H:%MZ), $(nproc) CPUs, Linux $(uname -r); every baseline from the same make bench run"
echo
row "figure" "goal" "measured" "baseline (same run)" "goal?"
row "----------------------------------------------------" "---------" "----------------------------" "--------------------------------------------" "------"
row "RSS, quiet target, $(fmt %.0f "$(metric footprint.txt BenchmarkFootprint/idle sockets)") sockets in the namespace" "<= 32 MiB" \
  "$(fmt %.1f "$idle_rss") MiB ($(fmt %.1f "$idle_anon") anon)" "node_exporter $(fmt %.1f "$ne_idle_rss") MiB" "$(verdict "$idle_rss" '<=' 32)"
# The steady state is judged: bench-nginx.sh starts the agent for each
# 10 s round, so its figure is the first seconds' RSS, before the agent
# drops its start-up pages (agent/binary_pages.go, 30 s after the start).
row "RSS, nginx under load, $(fmt %.0f "$wrk_socks") established sockets, after 80 s" "<= 40 MiB" \
  "$(fmt %.1f "$rps_rss") MiB at 20k req/s" "node_exporter $(fmt %.1f "$ne_rps_rss") MiB; flat out, first 15 s: agent $(fmt %.1f "$wrk_rss") (peak $(fmt %.1f "$wrk_hwm"))" "$(verdict "$rps_rss" '<=' 40)"
row "CPU, quiet target (% of one core)" "<= 0.5%" "$(fmt %.2f "$idle_cpu")%" "node_exporter scraped each 1 s: $(fmt %.2f "$ne_idle_cpu")%" "$(verdict "$idle_cpu" '<=' 0.5)"
row "CPU, $(fmt %.0f "$k40_socks") established sockets of other processes" "<= 2%" "$(fmt %.2f "$k40_cpu")%" "node_exporter scraped each 1 s: $(fmt %.2f "$ne_k40_cpu")%" "$(verdict "$k40_cpu" '<=' 2)"
row "CPU at 20k requests/s to the target" "<= 2%" "$(fmt %.2f "$rps_cpu")% at $(fmt %.0f "$rps_rate") req/s" "node_exporter scraped each 1 s: $(fmt %.2f "$ne_rps_cpu")%" "$(verdict "$rps_cpu" '<=' 2)"
row "allocation rate while idle" "<= 100 KB/s" "$(fmt %.1f "$idle_alloc") KB/s" "node_exporter scraped each 1 s: $(fmt %.1f "$ne_idle_alloc") KB/s" "$(verdict "$idle_alloc" '<=' 100)"
# A ratio is judged only where nginx alone held still between rounds
# (within 5 %): on a noisy host the verdict would be the host's.
ratio_verdict=$(verdict "$pair" '>=' 0.99)
if [ "$base_spread" != - ] && awk -v s="$base_spread" 'BEGIN {exit !(s > 0.05)}'; then
  ratio_verdict="NOISY ($(fmt %.0f "$(awk -v s="$base_spread" 'BEGIN {print 100 * s}')")% without the agent)"
fi
row "requests/s of nginx under wrk, agent on / off" ">= 0.99" "$(fmt %.3f "$pair") per round (min $(fmt %.3f "$pair_min"))" "$(fmt %.0f "$rps_with") / $(fmt %.0f "$rps_without") req/s = $(fmt %.3f "$ratio")" "$ratio_verdict"
# The same from accounting (bench-nginx.sh bpf_ns): the agent's CPU and
# its eBPF run time against the busy machine, which holds still where the
# requests/s do not. An estimate: it cannot see evicted caches.
row "the same from costs: 1 - (agent + its eBPF) / busy CPU" ">= 0.99" "$(fmt %.3f "$cost_ratio")" "agent $(fmt %.1f "$agent_cpu")% + eBPF $(fmt %.2f "$agent_bpf")% of a core, flat out" "$(verdict "$cost_ratio" '>=' 0.99)"
row "thread round trip (2 wake-ups, 4 switches), sched probe" "-" "$(fmt %.0f "$probe") ns ($(x "$probe" "$base"))" "none $(fmt %.0f "$base"); runqlat -p $(x "$runqlat" "$base"), offcputime -p $(x "$offcpu" "$base")" "-"
# The kernel's own count of eBPF run time, per round trip: what the wall
# time above shows only blurred.
row "eBPF run time per round trip, sched probe on the target" "-" "$(fmt %.0f "$bpf_probe") ns; watching another process: $(fmt %.0f "$bpf_other") ns" "runqlat -p $(fmt %.0f "$bpf_runqlat") ns, offcputime -p $(fmt %.0f "$bpf_offcpu") ns" "-"
# The same between two event loops asleep in epoll_wait, their idle wait:
# nginx's and tokio's path, where the probe reuses the stacks of the site.
row "event-loop round trip (epoll_wait), sched probe" "-" "$(fmt %.0f "$epoll_probe") ns, eBPF $(fmt %.0f "$bpf_epoll") ns" "none $(fmt %.0f "$epoll_base") ns" "-"
# Two threads yielding one CPU to each other: a preempted worker's path,
# most of the switches nginx's workers take flat out.
row "sched_yield between two threads on one CPU, sched probe" "-" "$(fmt %.0f "$yield_probe") ns, eBPF $(fmt %.0f "$bpf_yield") ns" "none $(fmt %.0f "$yield_base") ns" "-"
echo
