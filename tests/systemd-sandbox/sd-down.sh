#!/bin/bash
# Tear down a sandbox started by sd-up.sh: what the Rust fixture's Drop does, for hand use and for
# the leftovers of a test run that was killed before it could clean up.
# usage: sd-down.sh STATE_DIR [--keep-state]
#   poweroff (SIGRTMIN+4) -> wait up to 10 s -> SIGKILL unshare -> rmdir the cgroups depth-first
#   -> remove STATE_DIR (unless --keep-state)
set -uo pipefail
STATE=$(realpath -m "${1:?usage: sd-down.sh STATE_DIR [--keep-state]}")
sd=$(cat "$STATE/systemd.pid" 2>/dev/null)
up=$(cat "$STATE/unshare.pid" 2>/dev/null)

# A pid is only ours while its command line is still the one we started (pids get reused).
is_ours() { [ -n "$1" ] && grep -qaE "$2" "/proc/$1/cmdline" 2>/dev/null; }

if is_ours "$sd" 'systemd|sd-inner'; then
  kill -s RTMIN+4 "$sd"     # poweroff.target; in a container systemd then exits instead of halting
  for _ in $(seq 100); do is_ours "$sd" 'systemd|sd-inner' || break; sleep 0.1; done
fi
if is_ours "$up" unshare; then
  for _ in $(seq 20); do is_ours "$up" unshare || break; sleep 0.05; done
  # unshare ignores SIGTERM; on SIGKILL, --kill-child SIGKILLs the namespace's PID 1 and with it
  # every process of the pid namespace
  is_ours "$up" unshare && { echo "sd-down: poweroff timed out, SIGKILL" >&2; kill -KILL "$up"; }
fi

status=0
if [ -f "$STATE/cgroups" ]; then
  while read -r dir; do
    # a cgroup is busy until the killed processes are really gone: retry for a few seconds
    for _ in $(seq 50); do
      [ -d "$dir" ] || break
      find "$dir" -depth -type d -exec rmdir {} + 2>/dev/null
      [ -d "$dir" ] && sleep 0.1
    done
    [ -d "$dir" ] && { echo "sd-down: could not remove $dir" >&2; status=1; }
  done < "$STATE/cgroups"
fi
[ "${2:-}" = --keep-state ] || rm -rf --one-file-system "$STATE"
exit $status
