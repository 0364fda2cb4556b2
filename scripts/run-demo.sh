#!/usr/bin/env bash
# make run: start the agent on its built-in demo (it starts the demo itself),
# wait until it serves, then follow its findings until Ctrl-C.
#
# The terminal shows findings and how to cause them; the agent's own log
# (its INFO lines carry whole root causes, and would bury the findings)
# goes to a file, AGENT_LOG (not CULPRIT_*: the agent refuses unknown
# CULPRIT_ variables). When the agent exits (its demo died, say),
# this script exits too, with the agent's error line and its status.
set -euo pipefail
bin=${1:-bin/culprit}
log=${AGENT_LOG:-${TMPDIR:-/tmp}/culprit-agent.log}
if [ "$(id -u)" != 0 ]; then
  echo "note: not root — eBPF probes will not load; the agent runs on procfs and netlink and says what it loses." >&2
fi
"$bin" agent "${@:2}" >"$log" 2>&1 &
agent=$!
follow=
# On any exit: stop what is still running, and reap it.
trap '[ -n "$follow" ] && kill "$follow" 2>/dev/null; kill "$agent" 2>/dev/null; wait 2>/dev/null || true' EXIT
# Ctrl-C: the agent and the follower get it too (same process group) and
# stop on their own; the EXIT trap reaps them.
trap 'exit 130' INT TERM

# agent_exited STATUS: the agent is gone; say why, and exit non-zero.
agent_exited() {
  echo >&2
  echo "The culprit agent exited (status $1). Its error:" >&2
  # run() prints its error as "culprit: ..."; without one, the log's end.
  grep '^culprit: ' "$log" >&2 || tail -n 5 "$log" >&2
  echo "Its whole log: $log" >&2
  exit $(($1 == 0 ? 1 : $1))
}

ready=
for _ in $(seq 300); do
  if curl -fsS http://127.0.0.1:9461/readyz >/dev/null 2>&1; then
    ready=1
    break
  fi
  if ! kill -0 "$agent" 2>/dev/null; then
    st=0
    wait "$agent" || st=$?
    agent_exited "$st"
  fi
  sleep 0.1
done
[ -n "$ready" ] || echo "warning: the agent is not ready after 30 s (see $log); following anyway" >&2
# What the agent could not do (a probe that did not load) is worth seeing.
if grep -qE 'level=(WARN|ERROR)' "$log"; then
  echo "The agent warns (from its log):" >&2
  grep -E 'level=(WARN|ERROR)' "$log" | head -n 5 >&2
fi

echo
echo "culprit agent (pid $agent) is watching its built-in demo. Its log: $log"
echo "Following findings. In another terminal trigger a fault (curl -s http://127.0.0.1:8081/ lists them all):"
echo "   curl -s -XPOST 'http://127.0.0.1:8081/fault/stop-accepting?seconds=15&load=64'"
echo "   curl -s -XPOST 'http://127.0.0.1:8081/fault/block-worker?ms=800&for=20s'"
echo "   curl -s -XPOST 'http://127.0.0.1:8081/fault/spin-worker?for=10s'"
echo "   curl -s -XPOST 'http://127.0.0.1:8081/fault/leak-heap?mb=4&every=500ms&for=60s'"
echo "Metrics: curl -s http://127.0.0.1:9461/metrics | grep culprit_listen"
echo "Ctrl-C stops the agent and the demo."
echo
"$bin" findings --follow &
follow=$!

# Whichever ends first: the agent (its demo died, or it failed) ends the
# run with its error; the follower's end ends it with the follower's status.
st=0
wait -n -p done "$agent" "$follow" || st=$?
if [ "${done:-}" = "$agent" ]; then
  agent_exited "$st"
fi
exit "$st"
