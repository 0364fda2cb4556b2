#!/usr/bin/env bash
# What culprit costs a real server: nginx under wrk, with the agent watching
# it and without, rounds alternating (ABAB) so machine drift hits both.
# Prints requests/s and p99 for each, their ratio, and the agent's CPU and
# RSS at that load. Usage: scripts/bench-nginx.sh [bin/culprit]
# Env: ROUNDS (3), DURATION (10s), CONNS (64).
set -euo pipefail
BIN=${1:-bin/culprit}
ROUNDS=${ROUNDS:-3}
DURATION=${DURATION:-10s}
CONNS=${CONNS:-64}
for t in nginx wrk python3; do
  command -v "$t" >/dev/null || { echo "bench-nginx: $t missing: apt-get install -y nginx wrk python3" >&2; exit 2; }
done
[ -x "$BIN" ] || make build >/dev/null

tmp=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$tmp"; }
trap cleanup EXIT
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

port=$(free_port)
mkdir -p "$tmp/www" "$tmp/tmp"
head -c 1024 /dev/urandom | base64 > "$tmp/www/index.html"
cat > "$tmp/nginx.conf" <<CONF
worker_processes 2;
pid $tmp/nginx.pid;
error_log $tmp/error.log;
events { worker_connections 1024; }
http {
  access_log off;
  client_body_temp_path $tmp/tmp; proxy_temp_path $tmp/tmp; fastcgi_temp_path $tmp/tmp;
  uwsgi_temp_path $tmp/tmp; scgi_temp_path $tmp/tmp;
  server {
    listen 127.0.0.1:$port;
    root $tmp/www;
    location = /ok { return 200 "ok\n"; }
  }
}
CONF
nginx -c "$tmp/nginx.conf" -g 'daemon off;' &
pids+=($!)
nginx_pid=$!
for _ in $(seq 50); do curl -fs "http://127.0.0.1:$port/ok" >/dev/null && break; sleep 0.1; done

# run_wrk prints "requests/s p99_ms".
run_wrk() {
  wrk -t2 -c"$CONNS" -d"$DURATION" --latency "http://127.0.0.1:$port/index.html" > "$tmp/wrk.out"
  rps=$(awk '/Requests\/sec/ {print $2}' "$tmp/wrk.out")
  p99=$(awk '$1=="99%" {v=$2; if (v ~ /us$/) {sub(/us/,"",v); v=v/1000} else if (v ~ /ms$/) {sub(/ms/,"",v)} else if (v ~ /s$/) {sub(/s/,"",v); v=v*1000}; print v}' "$tmp/wrk.out")
  echo "$rps $p99"
}
cpu_ticks() { awk '{print $14+$15}' "/proc/$1/stat"; }

base=() with=() cpus=() rss=() findings=0
for r in $(seq "$ROUNDS"); do
  read -r rps p99 < <(run_wrk); base+=("$rps $p99")

  http=$(free_port); grpc=$(free_port)
  "$BIN" agent --pid "$nginx_pid" --http-addr "127.0.0.1:$http" --grpc-addr "127.0.0.1:$grpc" \
    --set traces.grpc_addr=127.0.0.1:0 --set traces.http_addr=127.0.0.1:0 >/dev/null 2>"$tmp/agent.log" &
  agent=$!
  for _ in $(seq 100); do curl -fs "http://127.0.0.1:$http/readyz" >/dev/null && break; sleep 0.1; done
  sleep 2 # past start-up (symbol tables, kallsyms)
  t0=$(cpu_ticks "$agent"); s0=$(date +%s.%N)
  read -r rps p99 < <(run_wrk); with+=("$rps $p99")
  t1=$(cpu_ticks "$agent"); s1=$(date +%s.%N)
  cpus+=("$(python3 -c "print(round(100*($t1-$t0)/100/($s1-$s0),1))")")
  rss+=("$(awk '/VmHWM/ {print int($2/1024)}' "/proc/$agent/status")")
  n=$("$BIN" findings --addr "127.0.0.1:$grpc" --json --all 2>/dev/null | grep -c '"rule"' || true)
  findings=$((findings + n))
  kill "$agent"; wait "$agent" 2>/dev/null || true
done

median() { printf '%s\n' "$@" | sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
col() { local i=$1; shift; for x in "$@"; do echo "$x" | awk -v i="$i" '{print $i}'; done; }
b_rps=$(median $(col 1 "${base[@]}")); w_rps=$(median $(col 1 "${with[@]}"))
b_p99=$(median $(col 2 "${base[@]}")); w_p99=$(median $(col 2 "${with[@]}"))
printf '\nnginx, wrk -t2 -c%s -d%s, %s rounds each, alternating (medians):\n' "$CONNS" "$DURATION" "$ROUNDS"
printf '  %-22s %12s %12s %8s\n' "" "without" "with agent" "ratio"
printf '  %-22s %12s %12s %8s\n' "requests/s" "$b_rps" "$w_rps" "$(python3 -c "print(round($w_rps/$b_rps,3))")"
printf '  %-22s %12s %12s %8s\n' "p99 latency (ms)" "$b_p99" "$w_p99" "$(python3 -c "print(round($w_p99/max($b_p99,0.001),3))")"
printf '  agent CPU at that load: %s %% of one core (median), RSS peak %s MiB (median)\n' "$(median "${cpus[@]}")" "$(median "${rss[@]}")"
printf '  findings opened under this healthy load: %s\n' "$findings"
