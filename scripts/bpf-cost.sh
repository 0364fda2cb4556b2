#!/usr/bin/env bash
# What each eBPF program of a running culprit agent costs, measured by the
# kernel itself (kernel.bpf_stats_enabled): runs per second, ns per run
# (the stats add ~20 ns to each) and % of one core, over SECONDS seconds.
# Run it beside a load, e.g. during a "with agent" round of
# scripts/bench-nginx.sh; it waits for an agent (a process named culprit*)
# that has run WARMUP seconds. docs/NOTES.md Sessions 7 and 8 read it.
#
# Exit status: 0 measured, 1 a step failed, 2 usage or missing tools.
set -euo pipefail

readonly USAGE="usage: scripts/bpf-cost.sh [-h]   env: SECONDS_=5 WARMUP=6 TIMEOUT=600 AGENT_PID=(the first process named culprit*)"
case "${1:-}" in
  -h|--help) echo "$USAGE"; exit 0 ;;
  "") ;;
  *) echo "bpf-cost: unknown argument $1" >&2; echo "$USAGE" >&2; exit 2 ;;
esac
SECONDS_=${SECONDS_:-5}
WARMUP=${WARMUP:-6}
TIMEOUT=${TIMEOUT:-600}
for v in SECONDS_ WARMUP TIMEOUT; do
  [[ ${!v} =~ ^[1-9][0-9]*$ ]] || { echo "bpf-cost: $v must be a positive number of seconds, not '${!v}'" >&2; exit 2; }
done
for t in bpftool python3 sysctl pgrep; do
  command -v "$t" >/dev/null 2>&1 || { echo "bpf-cost: $t not found (apt-get install -y bpftool python3 procps)" >&2; exit 2; }
done
[ "$(id -u)" = 0 ] || { echo "bpf-cost: needs root (bpf_stats, bpftool)" >&2; exit 2; }

deadline=$((SECONDS + TIMEOUT))
pid=""
while :; do
  pid=${AGENT_PID:-$(pgrep '^culprit' | head -1 || true)}
  if [ -n "$pid" ]; then
    age=$(ps -o etimes= -p "$pid" 2>/dev/null | tr -d ' ' || true)
    [ -n "$age" ] && [ "$age" -ge "$WARMUP" ] && break
  fi
  [ "$SECONDS" -lt "$deadline" ] || { echo "bpf-cost: no culprit agent running for ${WARMUP}s within ${TIMEOUT}s" >&2; exit 1; }
  sleep 0.5
done

tmp=$(mktemp -d)
was=$(sysctl -n kernel.bpf_stats_enabled)
trap 'sysctl -qw kernel.bpf_stats_enabled="$was"; rm -rf "$tmp"' EXIT
sysctl -qw kernel.bpf_stats_enabled=1
# Only this agent's programs (the prog_id of its descriptors): another
# agent on the machine (a test's) loads programs of the same names.
grep -h '^prog_id:' /proc/"$pid"/fdinfo/* 2>/dev/null | awk '{print $2}' | sort -u >"$tmp/ids"
[ -s "$tmp/ids" ] || { echo "bpf-cost: process $pid holds no eBPF program" >&2; exit 1; }
bpftool prog show -j >"$tmp/before.json"
sleep "$SECONDS_"
bpftool prog show -j >"$tmp/after.json"
python3 - "$tmp/before.json" "$tmp/after.json" "$SECONDS_" "$tmp/ids" <<'PY'
import json, sys
mine = {int(l) for l in open(sys.argv[4]) if l.strip()}
before = {p["id"]: p for p in json.load(open(sys.argv[1]))}
after = {p["id"]: p for p in json.load(open(sys.argv[2])) if p["id"] in mine}
secs = float(sys.argv[3])
total = 0.0
print(f"{'program':30s} {'runs/s':>10s} {'ns/run':>8s} {'% core':>7s}")
for pid, p in sorted(after.items()):
    q = before.get(pid)
    name = p.get("name", "?")
    if q is None or not name.startswith("culprit_") or "run_cnt" not in p:
        continue
    n = p["run_cnt"] - q.get("run_cnt", 0)
    t = p["run_time_ns"] - q.get("run_time_ns", 0)
    if n <= 0:
        continue
    total += t
    print(f"{name:30s} {n / secs:10.0f} {t / n:8.0f} {100 * t / secs / 1e9:7.2f}")
print(f"{'all culprit programs':30s} {'':10s} {'':8s} {100 * total / secs / 1e9:7.2f}")
PY
