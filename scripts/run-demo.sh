#!/usr/bin/env bash
# make run: start the agent on its built-in demo (it starts the demo itself),
# wait until it serves, then follow its findings until Ctrl-C.
set -euo pipefail
bin=${1:-bin/culprit}
if [ "$(id -u)" != 0 ]; then
  echo "note: not root — eBPF probes will not load; the agent runs on procfs and netlink and says what it loses." >&2
fi
"$bin" agent "${@:2}" &
agent=$!
trap 'kill $agent 2>/dev/null; wait $agent 2>/dev/null' EXIT INT TERM
for _ in $(seq 50); do
  curl -fsS http://127.0.0.1:9461/readyz >/dev/null 2>&1 && break
  kill -0 $agent 2>/dev/null || { echo "agent exited" >&2; exit 1; }
  sleep 0.1
done
echo
echo "Following findings. In another terminal trigger a fault (curl -s http://127.0.0.1:8081/ lists them all):"
echo "   curl -s -XPOST 'http://127.0.0.1:8081/fault/stop-accepting?seconds=15&load=64'"
echo "   curl -s -XPOST 'http://127.0.0.1:8081/fault/block-worker?ms=800&for=20s'"
echo "   curl -s -XPOST 'http://127.0.0.1:8081/fault/spin-worker?for=10s'"
echo "   curl -s -XPOST 'http://127.0.0.1:8081/fault/leak-heap?mb=4&every=500ms&for=60s'"
echo "Metrics: curl -s http://127.0.0.1:9461/metrics | grep culprit_listen"
echo
"$bin" findings --follow
