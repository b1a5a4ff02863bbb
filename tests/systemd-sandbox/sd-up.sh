#!/bin/bash
# A throw-away systemd for DROP's privileged tests: systemd (the distribution's, 252 on Debian 12)
# runs as PID 1 of new pid/mount/uts/ipc/cgroup namespaces, with its own D-Bus system bus, its own
# cgroup subtree, and nothing it may write that belongs to the host.
#
# usage: sd-up.sh STATE_DIR
#   Runs in the foreground until that systemd exits (this process becomes `unshare`).
#   The Rust fixture (tests/src/systemd.rs) starts it, waits for "running" and tears it down; by
#   hand: `sd-up.sh /tmp/x & ...; nsenter -t "$(cat /tmp/x/systemd.pid)" -m -p -C -- systemctl status`,
#   then `sd-down.sh /tmp/x`.
#
# What ends up in STATE_DIR:
#   run/              the sandbox's /run: run/dbus/system_bus_socket is its system bus,
#                     run/systemd/system/ takes unit files (it outranks /etc and /usr/lib)
#   etc/upper/        what the sandbox wrote to its /etc (an overlay over the host's)
#   console.log       systemd's console: its own log (units log to the sandbox's journal)
#   unshare.log       stderr of unshare and of the namespace setup
#   cgroups           one line per cgroup directory created on the host, for the teardown
#   systemd.pid       host pid of the sandbox's PID 1 (systemd), written by sd-inner.sh
#   unshare.pid       host pid of the `unshare` process, written by sd-inner.sh
#
# Environment: DROP_SD_KEEP_TMP=/tmp/a:/tmp/b  host folders under /tmp that must stay visible inside
# (the sandbox gets a private /tmp; STATE_DIR's top folder under /tmp is always kept).
set -euo pipefail
STATE=$(realpath -m "${1:?usage: sd-up.sh STATE_DIR}")
HERE=$(dirname "$(realpath "$0")")

mkdir -p "$STATE"/run/systemd/system "$STATE"/mnt/{dev,tmp,var} "$STATE"/etc/{upper,work}
: > "$STATE/console.log"

# /run/systemd/system (here: $STATE/run/systemd/system) overrides /etc and /usr/lib. Mask every unit
# that would touch hardware, the host kernel's global state, or wait for a terminal.
UNITS="$STATE/run/systemd/system"
for unit in systemd-modules-load.service systemd-binfmt.service \
            proc-sys-fs-binfmt_misc.automount proc-sys-fs-binfmt_misc.mount \
            systemd-sysctl.service systemd-udevd.service systemd-udev-trigger.service \
            systemd-udev-settle.service systemd-hwdb-update.service systemd-timesyncd.service \
            systemd-pstore.service systemd-random-seed.service systemd-firstboot.service \
            systemd-repart.service systemd-pcrphase.service systemd-pcrphase-sysinit.service \
            sys-kernel-debug.mount sys-kernel-tracing.mount sys-kernel-config.mount \
            sys-fs-fuse-connections.mount dev-hugepages.mount \
            console-getty.service getty@tty1.service e2scrub_reap.service postgresql.service; do
  ln -sfn /dev/null "$UNITS/$unit"
done
# The only goal: sysinit (journald, tmpfiles inside the private /tmp and /var) and the system bus.
cat > "$UNITS/drop-test.target" <<'EOF'
[Unit]
Description=DROP test sandbox (sysinit and the D-Bus system bus only)
Requires=sysinit.target dbus.socket dbus.service
After=sysinit.target dbus.socket dbus.service
AllowIsolate=yes
EOF

# Our own subtree in every hierarchy, under the caller's cgroup (on these hosts a per-command memory
# cgroup of the agent, so the sandbox stays in its accounting). This shell moves itself in, so
# everything it execs is born inside; with --cgroup the subtree becomes the namespace's root and
# the sandbox's systemd puts init.scope and system.slice there.
CGROUP_NAME="sd-$(basename "$STATE")"
: > "$STATE/cgroups"
for hierarchy in cpu cpuacct cpuset memory devices freezer blkio pids systemd unified; do
  case $hierarchy in
    systemd) key="name=systemd" ;;
    unified) key="" ;;
    *) key=$hierarchy ;;
  esac
  [ -d "/sys/fs/cgroup/$hierarchy" ] || continue
  current=$(awk -F: -v k="$key" '$2 == k { print $3 }' /proc/self/cgroup)
  dir="/sys/fs/cgroup/$hierarchy${current%/}/$CGROUP_NAME"
  mkdir -p "$dir"
  echo "$dir" >> "$STATE/cgroups"
  if [ "$hierarchy" = cpuset ]; then
    # a v1 cpuset group accepts no task until it has cpus and mems
    cat "$(dirname "$dir")/cpuset.cpus" > "$dir/cpuset.cpus"
    cat "$(dirname "$dir")/cpuset.mems" > "$dir/cpuset.mems"
  fi
  echo $$ > "$dir/cgroup.procs"
done

# setsid: no controlling terminal, so a Ctrl-C meant for the test runner does not reach the sandbox
# (run from a program this process is no group leader, so setsid does not fork).
# setpriv: capabilities that act on the whole host kernel whatever the namespace are dropped.
# unshare --kill-child: if unshare is SIGKILLed (it ignores SIGTERM), the namespace's PID 1 gets
# SIGKILL, which ends every process of the pid namespace.
exec </dev/null >>"$STATE/unshare.log" 2>&1
exec setsid setpriv \
  --bounding-set -sys_module,-sys_time,-sys_rawio,-syslog,-wake_alarm,-mac_admin,-mac_override \
  unshare --pid --fork --kill-child --mount --uts --ipc --cgroup --propagation private \
  /bin/bash "$HERE/sd-inner.sh" "$STATE"
