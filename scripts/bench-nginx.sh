#!/usr/bin/env bash
# What culprit costs a real server: nginx (private config, 2 workers, a static
# 1 KiB file) under wrk, without the agent and with the agent watching nginx's
# master, in interleaved rounds (A B, then B A, then A B ...) so machine
# drift hits both sides alike and no side always goes first. HOLD
# established connections (two sockets each) held by another process stay
# in the namespace through every round. Prints the median requests/s and p99
# of each side, the ratio of the medians and the median of the per-round
# ratios (each round's two runs are back to back), the agent's CPU (% of one
# core, from schedstat over the wrk run) and RSS (max VmRSS sampled
# during the run, and VmHWM) at that load, and the findings the agent opened
# under this healthy load (there should be none). As root with bpftool,
# it also gives the ratio from costs, which holds still where requests/s
# do not: 1 - (the agent's CPU + its eBPF programs' run time) / the CPU
# the machine was busy (see bpf_ns). The last line,
# "BENCH-NGINX key=value ...", is for make bench's table.
#
# The agent runs only during its own rounds: it is started before and stopped
# (and waited for) after each of them, never during a baseline round.
#
# Exit status: 0 measured, 1 a step failed, 2 usage or missing tools.
set -euo pipefail

readonly USAGE="usage: scripts/bench-nginx.sh [-h] [path/to/culprit]   (default bin/culprit, built with 'make build' if missing)
env: ROUNDS=6 DURATION=10s THREADS=2 CONNS=64 WARMUP=3s SETTLE=2 READY_TIMEOUT=30 URL_PATH=/index.html HOLD=5000
     AGENT_ARGS='--set profiling.enabled=false' (more flags for the agent: what a part costs)"

die() { echo "bench-nginx: $*" >&2; exit 1; }
usage_error() { echo "bench-nginx: $*" >&2; echo "$USAGE" >&2; exit 2; }

case "${1:-}" in
  -h|--help) echo "$USAGE"; exit 0 ;;
  -*) usage_error "unknown option $1" ;;
esac
[ $# -le 1 ] || usage_error "too many arguments"

ROUNDS=${ROUNDS:-6}
HOLD=${HOLD:-5000}
DURATION=${DURATION:-10s}
THREADS=${THREADS:-2}
CONNS=${CONNS:-64}
WARMUP=${WARMUP:-3s}
SETTLE=${SETTLE:-2}
READY_TIMEOUT=${READY_TIMEOUT:-30}
URL_PATH=${URL_PATH:-/index.html}
# Split on blanks, no globbing: flags such as --set key=value.
read -r -a agent_args <<<"${AGENT_ARGS:-}"
[[ $ROUNDS =~ ^[1-9][0-9]*$ ]] || usage_error "ROUNDS must be a positive integer, not '$ROUNDS'"
[[ $HOLD =~ ^[0-9]+$ ]] || usage_error "HOLD must be a number of connections, not '$HOLD'"
[[ $THREADS =~ ^[1-9][0-9]*$ ]] || usage_error "THREADS must be a positive integer, not '$THREADS'"
[[ $CONNS =~ ^[1-9][0-9]*$ ]] || usage_error "CONNS must be a positive integer, not '$CONNS'"
[[ $DURATION =~ ^[1-9][0-9]*[smh]?$ ]] || usage_error "DURATION must look like 10s, 1m or 30, not '$DURATION'"
[[ $WARMUP =~ ^[0-9]+[smh]?$ ]] || usage_error "WARMUP must look like 3s or 0, not '$WARMUP'"
[[ $SETTLE =~ ^[0-9]+(\.[0-9]+)?$ ]] || usage_error "SETTLE must be seconds, not '$SETTLE'"
[[ $READY_TIMEOUT =~ ^[1-9][0-9]*$ ]] || usage_error "READY_TIMEOUT must be whole seconds, not '$READY_TIMEOUT'"
[ "$CONNS" -ge "$THREADS" ] || usage_error "CONNS ($CONNS) must be at least THREADS ($THREADS)"

# Tools. nginx and wrk are the ones usually missing.
missing=()
for t in nginx wrk; do command -v "$t" >/dev/null 2>&1 || missing+=("$t"); done
if [ ${#missing[@]} -gt 0 ]; then
  echo "bench-nginx: ${missing[*]} not installed; install with:" >&2
  echo "    apt-get update && apt-get install -y nginx wrk" >&2
  exit 2
fi
for t in python3 curl timeout getconf; do
  command -v "$t" >/dev/null 2>&1 || { echo "bench-nginx: $t not installed (apt-get install -y python3 curl coreutils)" >&2; exit 2; }
done

# The binary: relative to where we were called, then work from the repo root.
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
if [ $# -eq 1 ]; then
  case "$1" in /*) BIN=$1 ;; *) BIN=$PWD/$1 ;; esac
  [ -x "$BIN" ] || usage_error "$1 is not an executable culprit binary"
else
  BIN=$repo/bin/culprit
  if [ ! -x "$BIN" ]; then
    echo "bench-nginx: $BIN missing, running make build" >&2
    make -C "$repo" build >&2 || die "make build failed"
  fi
fi
cd "$repo"
[ "$(id -u)" = 0 ] || echo "bench-nginx: note: not root; the agent runs without its eBPF probes, so this measures less than it costs in production" >&2

tmp=$(mktemp -d "${TMPDIR:-/tmp}/bench-nginx.XXXXXX")
nginx_pid="" agent_pid="" sampler_pid="" wrk_pid="" holder_pid=""

# stop_pid PID SECONDS: TERM, wait up to SECONDS, then KILL. Only our own
# children are ever signalled, by PID.
stop_pid() {
  local p=$1 t=${2:-10} i
  [ -n "$p" ] || return 0
  kill -TERM "$p" 2>/dev/null || { wait "$p" 2>/dev/null || true; return 0; }
  for ((i = 0; i < t * 10; i++)); do
    kill -0 "$p" 2>/dev/null || break
    sleep 0.1
  done
  if kill -0 "$p" 2>/dev/null; then
    echo "bench-nginx: pid $p did not stop within ${t}s, killing it" >&2
    kill -KILL "$p" 2>/dev/null || true
  fi
  wait "$p" 2>/dev/null || true
}
# shellcheck disable=SC2317 # run by the EXIT trap
cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  stop_pid "$wrk_pid" 2
  stop_pid "$sampler_pid" 2
  stop_pid "$agent_pid" 10
  stop_pid "$holder_pid" 5
  stop_pid "$nginx_pid" 10 # TERM to the master: it takes its workers down
  [ -z "$bpf_stats_was" ] || sysctl -qw kernel.bpf_stats_enabled="$bpf_stats_was" 2>/dev/null || true
  rm -rf "$tmp"
  exit "$rc"
}
trap cleanup EXIT
trap 'echo "bench-nginx: interrupted" >&2; exit 130' INT
trap 'echo "bench-nginx: terminated" >&2; exit 143' TERM

# A port the kernel says is free now (a small race with other programs, and
# the reason the chosen ports are checked below).
free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}
# A few distinct free ports.
free_ports() {
  python3 - "$1" <<'PY'
import socket, sys
socks = []
for _ in range(int(sys.argv[1])):
    s = socket.socket(); s.bind(("127.0.0.1", 0)); socks.append(s)
print(" ".join(str(s.getsockname()[1]) for s in socks))
PY
}

# ---- nginx -----------------------------------------------------------------
port=$(free_port)
mkdir -p "$tmp/www" "$tmp/tmp" "$tmp/logs"
python3 -c 'import sys; sys.stdout.write(("culprit bench " * 80)[:1023] + "\n")' > "$tmp/www/index.html"
[ "$(stat -c %s "$tmp/www/index.html")" = 1024 ] || die "could not write the 1 KiB file"
user_line=""
if [ "$(id -u)" = 0 ]; then
  # Workers drop to an unprivileged user, as in production; they must be
  # able to read the document root in our (0700 by mktemp) temp dir.
  user_line="user nobody $(id -gn nobody 2>/dev/null || echo nogroup);"
  chmod 0755 "$tmp" "$tmp/www"
  chmod 0644 "$tmp/www/index.html"
  chown nobody "$tmp/tmp" 2>/dev/null || true
fi
cat > "$tmp/nginx.conf" <<CONF
$user_line
worker_processes 2;
pid $tmp/nginx.pid;
error_log $tmp/logs/error.log warn;
events { worker_connections 4096; }
http {
  access_log off;
  default_type text/html;
  client_body_temp_path $tmp/tmp/body;
  proxy_temp_path $tmp/tmp/proxy;
  fastcgi_temp_path $tmp/tmp/fastcgi;
  uwsgi_temp_path $tmp/tmp/uwsgi;
  scgi_temp_path $tmp/tmp/scgi;
  server {
    listen 127.0.0.1:$port;
    root $tmp/www;
    location = /ok { return 200 "ok\n"; }
  }
}
CONF
# -p and -e keep nginx away from /usr/share/nginx and /var/log/nginx.
nginx_args=(-p "$tmp/" -e "$tmp/logs/error.log" -c "$tmp/nginx.conf")
nginx "${nginx_args[@]}" -t >"$tmp/nginx-t.log" 2>&1 || { cat "$tmp/nginx-t.log" >&2; die "nginx rejected the generated config"; }
nginx "${nginx_args[@]}" -g 'daemon off;' >"$tmp/logs/nginx.out" 2>&1 &
nginx_pid=$!
ok=""
for ((i = 0; i < 100; i++)); do
  kill -0 "$nginx_pid" 2>/dev/null || break
  if curl -fs --max-time 1 "http://127.0.0.1:$port/ok" >/dev/null 2>&1; then ok=1; break; fi
  sleep 0.1
done
if [ -z "$ok" ]; then
  cat "$tmp/logs/nginx.out" "$tmp/logs/error.log" >&2 2>/dev/null || true
  die "nginx did not answer on 127.0.0.1:$port within 10s"
fi
got=$(curl -fs --max-time 2 -o /dev/null -w '%{http_code} %{size_download}' "http://127.0.0.1:$port$URL_PATH") \
  || die "GET $URL_PATH failed: $(tail -n 3 "$tmp/logs/error.log" 2>/dev/null)"
[ "${got%% *}" = 200 ] || die "GET $URL_PATH answered $got, not 200"

# ---- held connections ------------------------------------------------------
# HOLD connections to a listener of a helper process, both ends held: 2*HOLD
# established sockets in the namespace that are neither nginx's nor the
# agent's, as a pod's other containers have.
if [ "$HOLD" -gt 0 ]; then
  cat >"$tmp/hold.py" <<'PY'
import os, resource, select, socket, sys, time
n = int(sys.argv[1])
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
want = 2 * n + 64
if soft < want:
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(want, hard), hard))
ls = socket.socket(); ls.bind(("127.0.0.1", 0)); ls.listen(4096)
port = ls.getsockname()[1]
held = []
for i in range(n):
    c = socket.create_connection(("127.0.0.1", port))
    s, _ = ls.accept()
    held += [c, s]
print("held", n, flush=True)
while True:
    time.sleep(3600)
PY
  python3 "$tmp/hold.py" "$HOLD" >"$tmp/hold.out" 2>&1 &
  holder_pid=$!
  for ((i = 0; i < 600; i++)); do
    grep -q '^held' "$tmp/hold.out" 2>/dev/null && break
    kill -0 "$holder_pid" 2>/dev/null || { cat "$tmp/hold.out" >&2; die "the connection holder exited"; }
    sleep 0.1
  done
  grep -q '^held' "$tmp/hold.out" || die "the connection holder did not hold $HOLD connections within 60 s"
fi

# ---- measuring -------------------------------------------------------------
now_ns() { date +%s%N; }
# cpu_ns PID: the CPU time every thread of PID ran, from schedstat (ns, as
# the scheduler counts it). /proc/PID/stat's ticks are sampled at the
# timer tick: a process that wakes briefly is charged whole ticks.
cpu_ns() {
  cat /proc/"$1"/task/*/schedstat 2>/dev/null | awk '{s += $1} END {printf "%.0f\n", s}'
}

# CPU used by everything outside this script's tree (other people's builds
# and tests, a hypervisor's steal), which makes the figures noisy. snap
# writes a snapshot; others_pct A B NS prints the % of one core the rest of
# the machine used between two snapshots NS ns apart, and its top users.
# The rest is the machine's busy time (user+nice+system+steal of
# /proc/stat) minus this tree's (own and reaped children's ticks of every
# live member, so children that came and went count too).
cat >"$tmp/procsnap.py" <<'PY'
import json, os, sys
def snap(root):
    with open("/proc/stat") as f:
        c = [int(x) for x in f.readline().split()[1:]]
    busy = c[0] + c[1] + c[2] + (c[7] if len(c) > 7 else 0)
    procs, parent = {}, {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                s = f.read()
        except OSError:
            continue
        comm = s[s.index("(") + 1 : s.rindex(")")]
        f = s[s.rindex(")") + 2 :].split()
        parent[int(d)] = int(f[1])
        procs[int(d)] = (f[19], int(f[11]) + int(f[12]), int(f[13]) + int(f[14]), comm)
    mine = 0
    others = {}
    for p, (start, own, children, comm) in procs.items():
        q, n = p, 0
        while q > 1 and q != root and n < 64:
            q, n = parent.get(q, 0), n + 1
        if q == root:
            mine += own + children
        else:
            others[str(p)] = (start, own, comm)
    return {"busy": busy, "mine": mine, "others": others}
if sys.argv[1] == "snap":
    with open(sys.argv[3], "w") as f:
        json.dump(snap(int(sys.argv[2])), f)
else:
    with open(sys.argv[2]) as f:
        a = json.load(f)
    with open(sys.argv[3]) as f:
        b = json.load(f)
    secs, hz = float(sys.argv[4]) / 1e9, os.sysconf("SC_CLK_TCK")
    rest = max((b["busy"] - a["busy"]) - (b["mine"] - a["mine"]), 0)
    used = {}
    for p, (start, own, comm) in b["others"].items():
        old = a["others"].get(p)
        used[comm] = used.get(comm, 0) + max(own - (old[1] if old and old[0] == start else 0), 0)
    top = sorted(used.items(), key=lambda kv: -kv[1])[:3]
    desc = ", ".join(f"{c} {100 * t / hz / secs:.0f}%" for c, t in top if t > 0)
    print(f"{100 * rest / hz / secs:.1f} {desc or '-'}")
PY
snap() { python3 "$tmp/procsnap.py" snap $$ "$1"; }
others_pct() { python3 "$tmp/procsnap.py" diff "$1" "$2" "$3"; }

# What the agent costs nginx flat out, from accounting rather than from
# requests/s, which on a noisy VM moves more between rounds than the agent
# costs: the agent's CPU plus the run time of its eBPF programs (kernel BPF
# stats, on during the agent's rounds only), against the CPU the whole
# machine was busy. With every CPU busy, what the agent takes nginx and wrk
# do not get, so nginx's requests/s with the agent are about 1 - cost/busy
# of without it. It leaves out what accounting cannot see (caches the
# agent evicts, lock waits); the stats' own clock reads and the iterators
# the agent runs in its own reads (counted in its CPU too) make it err
# high. bpf_ns prints the culprit programs' total run time in ns, or "-"
# without root or bpftool.
bpf_stats_was=""
bpf_ns() {
  [ -n "$bpf_stats_was" ] || { echo -; return; }
  bpftool prog show -j 2>/dev/null | python3 -c '
import json, sys
print(sum(p.get("run_time_ns", 0) for p in json.load(sys.stdin) if p.get("name", "").startswith("culprit_")))' 2>/dev/null || echo -
}
# busy_ticks: the machine's busy time (user, nice, system, irq, softirq,
# steal) in clock ticks, from /proc/stat.
busy_ticks() { awk '$1 == "cpu" {print $2 + $3 + $4 + $7 + $8 + $9; exit}' /proc/stat; }

# sample_rss PID OUT: max VmRSS (kB) of PID every 0.2 s into OUT, until
# killed. Runs in the baseline rounds too (on nginx's master), so both sides
# carry the same sampling cost.
sample_rss() {
  local pid=$1 out=$2 max=0 k v _
  echo 0 >"$out"
  while kill -0 "$pid" 2>/dev/null; do
    while read -r k v _; do
      if [ "$k" = VmRSS: ]; then
        if [ "$v" -gt "$max" ]; then max=$v; echo "$max" >"$out"; fi
        break
      fi
    done <"/proc/$pid/status" 2>/dev/null || true
    sleep 0.2
  done
}

# run_wrk OUTFILE [DURATION]: wrk in the background of the script (so a
# trap can stop it), bounded by a timeout.
run_wrk() {
  local out=$1 d=${2:-$DURATION} secs
  secs=${d%[smh]}
  case "$d" in *m) secs=$((secs * 60)) ;; *h) secs=$((secs * 3600)) ;; esac
  timeout -k 5 $((secs + 60)) wrk -t"$THREADS" -c"$CONNS" -d"$d" --latency "http://127.0.0.1:$port$URL_PATH" >"$out" 2>&1 &
  wrk_pid=$!
  local rc=0
  wait "$wrk_pid" || rc=$?
  wrk_pid=""
  [ "$rc" = 0 ] || { cat "$out" >&2; die "wrk failed (status $rc)"; }
}

# parse_wrk FILE: prints "requests/s p99_ms errors" and warns on non-2xx.
parse_wrk() {
  awk '
    function ms(v) {
      if (v ~ /us$/) { sub(/us$/, "", v); return v / 1000 }
      if (v ~ /ms$/) { sub(/ms$/, "", v); return v + 0 }
      if (v ~ /m$/)  { sub(/m$/, "", v);  return v * 60000 }
      if (v ~ /s$/)  { sub(/s$/, "", v);  return v * 1000 }
      return v + 0
    }
    /Requests\/sec:/ { rps = $2 }
    $1 == "99%" && p99 == "" { p99 = ms($2) }
    /Non-2xx or 3xx responses:/ { non2xx = $NF }
    /Socket errors:/ { gsub(/,/, ""); errs = $4 + $6 + $8 + $10 }
    END {
      if (rps == "" || p99 == "") exit 1
      printf "%s %.3f %d %d\n", rps, p99, non2xx + 0, errs + 0
    }' "$1"
}

# ---- rounds ----------------------------------------------------------------
# BPF run-time stats, for the cost estimate: on during the agent's wrk runs
# only (they cost two clock reads per program run), restored after each
# and on exit.
if [ "$(id -u)" = 0 ] && command -v bpftool >/dev/null 2>&1 && command -v sysctl >/dev/null 2>&1; then
  bpf_stats_was=$(sysctl -n kernel.bpf_stats_enabled 2>/dev/null || true)
fi
[ -n "$bpf_stats_was" ] || echo "bench-nginx: note: no root or bpftool: the cost estimate (agent + its eBPF against the busy machine) is left out" >&2
if [ "$WARMUP" != 0 ] && [ "${WARMUP%[smh]}" != 0 ]; then
  echo "bench-nginx: warming nginx up for $WARMUP" >&2
  run_wrk "$tmp/warmup.out" "$WARMUP"
fi

# measure NAME: one wrk run into $tmp/NAME.out, with the CPU the rest of the
# machine used meanwhile in $others ("pct top-users").
measure() {
  snap "$tmp/snap0"
  local n0 n1
  n0=$(now_ns)
  run_wrk "$tmp/$1.out"
  n1=$(now_ns)
  snap "$tmp/snap1"
  others=$(others_pct "$tmp/snap0" "$tmp/snap1" "$((n1 - n0))")
}

base_rps=() base_p99=() with_rps=() with_p99=() cpus=() rss=() hwm=() others_all=() pair_ratios=() bpfs=() ests=()
ratio() { awk -v a="$1" -v b="$2" 'BEGIN {if (b > 0) printf "%.3f", a / b; else print "n/a"}'; }
findings_total=0 bad_responses=0
: >"$tmp/findings.txt"
# round_without R and round_with R: one side of round R each.
round_without() {
  local r=$1
  # A: nginx alone. No agent of ours is running here (stopped and waited
  # for at the end of the previous round).
  [ -z "$agent_pid" ] || die "internal: agent still running before a baseline round"
  sample_rss "$nginx_pid" "$tmp/rss-base" & sampler_pid=$!
  measure "base-$r"
  stop_pid "$sampler_pid" 2; sampler_pid=""
  read -r rps p99 non2xx errs < <(parse_wrk "$tmp/base-$r.out") || { cat "$tmp/base-$r.out" >&2; die "could not parse wrk's output"; }
  base_rps+=("$rps"); base_p99+=("$p99"); bad_responses=$((bad_responses + non2xx)); others_all+=("${others%% *}")
  printf 'round %d/%d  without agent: %9.0f req/s  p99 %8.2f ms  non-2xx %s, socket errors %s; other processes: %s%% of a core (%s)\n' \
    "$r" "$ROUNDS" "$rps" "$p99" "$non2xx" "$errs" "${others%% *}" "${others#* }" >&2

}
round_with() {
  local r=$1
  # B: the agent watching nginx's master.
  read -r http grpc < <(free_ports 2)
  "$BIN" agent --pid "$nginx_pid" --http-addr "127.0.0.1:$http" --grpc-addr "127.0.0.1:$grpc" \
    --set traces.grpc_addr=127.0.0.1:0 --set traces.http_addr=127.0.0.1:0 "${agent_args[@]}" \
    >"$tmp/agent-$r.out" 2>"$tmp/agent-$r.log" &
  agent_pid=$!
  ok=""
  for ((i = 0; i < READY_TIMEOUT * 10; i++)); do
    kill -0 "$agent_pid" 2>/dev/null || break
    if curl -fs --max-time 1 "http://127.0.0.1:$http/readyz" >/dev/null 2>&1; then ok=1; break; fi
    sleep 0.1
  done
  if [ -z "$ok" ]; then
    tail -n 30 "$tmp/agent-$r.log" >&2 || true
    kill -0 "$agent_pid" 2>/dev/null && die "agent not ready on 127.0.0.1:$http/readyz within ${READY_TIMEOUT}s (log above)"
    die "agent exited before it was ready (log above)"
  fi
  sleep "$SETTLE" # past start-up: probes attached, symbol tables read

  sample_rss "$agent_pid" "$tmp/rss-agent" & sampler_pid=$!
  [ -z "$bpf_stats_was" ] || sysctl -qw kernel.bpf_stats_enabled=1
  b0=$(bpf_ns) k0=$(busy_ticks)
  t0=$(cpu_ns "$agent_pid") || die "agent vanished"
  n0=$(now_ns)
  measure "with-$r"
  t1=$(cpu_ns "$agent_pid") || { tail -n 30 "$tmp/agent-$r.log" >&2; die "agent exited during the load (log above)"; }
  kill -0 "$agent_pid" 2>/dev/null || { tail -n 30 "$tmp/agent-$r.log" >&2; die "agent exited during the load (log above)"; }
  n1=$(now_ns)
  b1=$(bpf_ns) k1=$(busy_ticks)
  [ -z "$bpf_stats_was" ] || sysctl -qw kernel.bpf_stats_enabled="$bpf_stats_was"
  stop_pid "$sampler_pid" 2; sampler_pid=""
  hwm_kb=$(awk '$1 == "VmHWM:" {print $2}' "/proc/$agent_pid/status")
  read -r rps p99 non2xx errs < <(parse_wrk "$tmp/with-$r.out") || { cat "$tmp/with-$r.out" >&2; die "could not parse wrk's output"; }
  with_rps+=("$rps"); with_p99+=("$p99"); bad_responses=$((bad_responses + non2xx)); others_all+=("${others%% *}")
  cpu=$(awk -v d="$((t1 - t0))" -v ns="$((n1 - n0))" 'BEGIN {printf "%.2f", 100 * d / ns}')
  rss_mib=$(awk -v k="$(<"$tmp/rss-agent")" 'BEGIN {printf "%.1f", k / 1024}')
  hwm_mib=$(awk -v k="${hwm_kb:-0}" 'BEGIN {printf "%.1f", k / 1024}')
  cpus+=("$cpu"); rss+=("$rss_mib"); hwm+=("$hwm_mib")
  # The cost estimate (see bpf_ns): agent and eBPF, % of one core, and
  # 1 - their sum over the machine's busy CPU.
  read -r bpf est < <(awk -v b0="$b0" -v b1="$b1" -v ns="$((n1 - n0))" -v a="$((t1 - t0))" -v k="$((k1 - k0))" -v hz="$(getconf CLK_TCK)" 'BEGIN {
    if (b0 == "-" || b1 == "-") { print "- -"; exit }
    busy = k / hz * 1e9
    printf "%.2f %.4f\n", 100 * (b1 - b0) / ns, (busy > 0) ? 1 - (a + b1 - b0) / busy : 0 }')
  bpfs+=("$bpf"); ests+=("$est")

  # Every finding this agent opened (it was started for this round), open
  # or already resolved.
  timeout 15 "$BIN" findings --addr "127.0.0.1:$grpc" --json --all >"$tmp/findings-$r.json" 2>"$tmp/findings-$r.err" \
    || { cat "$tmp/findings-$r.err" >&2; die "could not list the agent's findings on 127.0.0.1:$grpc"; }
  n=$(grep -c . "$tmp/findings-$r.json" || true)
  findings_total=$((findings_total + n))
  if [ "$n" -gt 0 ]; then
    { echo "round $r:"; timeout 15 "$BIN" findings --addr "127.0.0.1:$grpc" --all 2>&1 || cat "$tmp/findings-$r.json"; } >>"$tmp/findings.txt"
  fi
  printf 'round %d/%d  with agent:    %9.0f req/s  p99 %8.2f ms  non-2xx %s, socket errors %s; other processes: %s%% of a core (%s); agent %s%% of a core, its eBPF %s%%, from costs %s; RSS max %s MiB, %s findings\n' \
    "$r" "$ROUNDS" "$rps" "$p99" "$non2xx" "$errs" "${others%% *}" "${others#* }" "$cpu" "$bpf" "$est" "$rss_mib" "$n" >&2

  stop_pid "$agent_pid" 10; agent_pid=""
}
for ((r = 1; r <= ROUNDS; r++)); do
  # Odd rounds start without the agent, even ones with it.
  if ((r % 2)); then
    round_without "$r"; round_with "$r"
  else
    round_with "$r"; round_without "$r"
  fi
  pair_ratios+=("$(ratio "${with_rps[$((r - 1))]}" "${base_rps[$((r - 1))]}")")
done

# ---- report ----------------------------------------------------------------
# summary FMT VALUES...: "median (min-max)" formatted with FMT.
summary() {
  local fmt=$1; shift
  printf '%s\n' "$@" | sort -g | awk -v f="$fmt" '{a[NR] = $1} END {
    m = (NR % 2) ? a[(NR + 1) / 2] : (a[NR / 2] + a[NR / 2 + 1]) / 2
    if (NR == 1) printf f, m; else printf f " (" f "-" f ")", m, a[1], a[NR] }'
}
median() { printf '%s\n' "$@" | sort -g | awk '{a[NR] = $1} END {print (NR % 2) ? a[(NR + 1) / 2] : (a[NR / 2] + a[NR / 2 + 1]) / 2}'; }
row() { printf '| %-31s | %-25s | %-25s | %-5s |\n' "$@"; }

echo
echo "nginx $(nginx -v 2>&1 | sed 's/.*nginx\///'), 2 workers, GET $URL_PATH (1 KiB static file); wrk -t$THREADS -c$CONNS -d$DURATION --latency;"
echo "$ROUNDS rounds each, interleaved (A B, B A, ...) without/with the agent; median (min-max) over rounds; $((2 * HOLD)) established sockets of another process in the namespace. $(nproc) CPUs, Linux $(uname -r)."
echo
row "" "without agent" "with agent" "ratio"
row "-------------------------------" "-------------------------" "-------------------------" "-----"
row "requests/s" "$(summary %.0f "${base_rps[@]}")" "$(summary %.0f "${with_rps[@]}")" "$(ratio "$(median "${with_rps[@]}")" "$(median "${base_rps[@]}")")"
row "requests/s, per-round ratio" "-" "-" "$(summary %.3f "${pair_ratios[@]}")"
row "p99 latency, ms" "$(summary %.2f "${base_p99[@]}")" "$(summary %.2f "${with_p99[@]}")" "$(ratio "$(median "${with_p99[@]}")" "$(median "${base_p99[@]}")")"
row "agent CPU, % of one core" "-" "$(summary %.1f "${cpus[@]}")" ""
if [ -n "$bpf_stats_was" ]; then
  row "its eBPF programs, % of one core" "-" "$(summary %.2f "${bpfs[@]}")" ""
  row "requests/s ratio from costs" "-" "-" "$(summary %.3f "${ests[@]}")"
fi
row "agent RSS, max during load, MiB" "-" "$(summary %.1f "${rss[@]}")" ""
row "agent RSS, peak (VmHWM), MiB" "-" "$(summary %.1f "${hwm[@]}")" ""
row "findings opened" "-" "$findings_total" ""
echo
other_med=$(median "${others_all[@]}")
# How much nginx's own throughput moved between the rounds without the
# agent, (max - min) / median: on a VM whose host is busy it moved by a
# third between rounds a minute apart (nothing on this machine used a CPU
# and /proc/stat showed no steal), and a ratio is no better than that.
base_spread=$(awk -v m="$(median "${base_rps[@]}")" -v lo="$(printf '%s\n' "${base_rps[@]}" | sort -g | head -1)" -v hi="$(printf '%s\n' "${base_rps[@]}" | sort -g | tail -1)" \
  'BEGIN {printf "%.3f", (m > 0) ? (hi - lo) / m : 0}')
if awk -v s="$base_spread" 'BEGIN {exit !(s > 0.05)}'; then
  echo "warning: without the agent, nginx's requests/s moved by $(awk -v s="$base_spread" 'BEGIN {printf "%.0f", 100 * s}')% between rounds: the machine is noisy, and a ratio near 1 cannot be told from that noise" >&2
fi
if awk -v o="$other_med" 'BEGIN {exit !(o >= 10)}'; then
  echo "warning: other processes on this machine used $other_med% of a core (median) during the rounds; the figures are noisy, compare ranges" >&2
fi
if [ "$bad_responses" -gt 0 ]; then
  echo "warning: $bad_responses non-2xx responses in total: the figures above are not for a healthy load" >&2
fi
if [ "$findings_total" -gt 0 ]; then
  echo "The agent opened findings under this healthy load (false positives?):"
  cat "$tmp/findings.txt"
else
  echo "The agent opened no findings under this healthy load."
fi
echo "BENCH-NGINX rps_without=$(median "${base_rps[@]}") rps_with=$(median "${with_rps[@]}") ratio=$(ratio "$(median "${with_rps[@]}")" "$(median "${base_rps[@]}")") pair_ratio=$(median "${pair_ratios[@]}") pair_min=$(printf '%s\n' "${pair_ratios[@]}" | sort -g | head -1) agent_cpu=$(median "${cpus[@]}") rss_mib=$(median "${rss[@]}") hwm_mib=$(printf '%s\n' "${hwm[@]}" | sort -g | tail -1) sockets=$((2 * HOLD)) others=$(median "${others_all[@]}") base_spread=$base_spread findings=$findings_total agent_bpf=$( [ -n "$bpf_stats_was" ] && median "${bpfs[@]}" || echo -) cost_ratio=$( [ -n "$bpf_stats_was" ] && median "${ests[@]}" || echo -)"
exit 0
