#!/bin/bash
# PID 1 of the sandbox's new namespaces (started by sd-up.sh): builds a container-like view of the
# host, then becomes systemd. Every mount below happens in the new mount namespace only.
#
# Why each piece is needed (all seen on the project's hosts):
# - private /tmp: Debian's tmpfiles.d/tmp.conf has `D /tmp`, and systemd-tmpfiles-setup.service
#   (pulled in by every unit with default dependencies) would empty the host's /tmp;
# - read-only /proc/sys and /sys: systemd-sysctl, udev, binfmt and systemd's own fs.nr_open bump
#   would otherwise change the host kernel;
# - private /run: /run/systemd/system on the host makes every program believe systemd is PID 1;
# - /etc behind an overlay: users and configuration a test installs stay in the sandbox;
# - private /dev without /dev/kmsg: the console is a log file, the host's kernel log stays clean.
set -euo pipefail
STATE=$1

# The host procfs is still mounted here, where pids are host pids: field 1 of our stat is our own
# host pid (systemd's, after the exec below), field 4 that of unshare. The teardown needs both.
read -r self _ _ parent _ < /proc/self/stat
echo "$self" > "$STATE/systemd.pid"
echo "$parent" > "$STATE/unshare.pid"

mount --make-rprivate /

# /proc of the new pid namespace; sysctls and sysrq read-only.
mount -t proc -o nosuid,nodev,noexec proc /proc
mount --bind /proc/sys /proc/sys
mount -o remount,bind,ro,nosuid,nodev,noexec /proc/sys
if [ -e /proc/sysrq-trigger ]; then
  mount --bind /proc/sysrq-trigger /proc/sysrq-trigger
  mount -o remount,bind,ro /proc/sysrq-trigger
fi

# /sys read-only (a bind, so the flag is per mount and does not reach the host). The udev units
# skip themselves on it (ConditionPathIsReadWrite=/sys). Then a fresh /sys/fs/cgroup with every
# hierarchy mounted again: inside the cgroup namespace each is rooted at our subtree.
mount --bind /sys /sys
mount -o remount,bind,ro,nosuid,nodev,noexec /sys
mount -t tmpfs -o mode=755,nosuid,nodev,noexec,size=1m cgroup-root /sys/fs/cgroup
for controller in cpu cpuacct cpuset memory devices freezer blkio pids; do
  mkdir "/sys/fs/cgroup/$controller"
  mount -t cgroup -o "nosuid,nodev,noexec,$controller" cgroup "/sys/fs/cgroup/$controller"
done
mkdir /sys/fs/cgroup/systemd
mount -t cgroup -o nosuid,nodev,noexec,none,name=systemd cgroup /sys/fs/cgroup/systemd
mkdir /sys/fs/cgroup/unified
mount -t cgroup2 -o nosuid,nodev,noexec cgroup2 /sys/fs/cgroup/unified

# /dev: a few character devices, a private devpts, and the console bound to console.log.
dev="$STATE/mnt/dev"
mount -t tmpfs -o mode=755,nosuid,size=4m sandbox-dev "$dev"
mknod -m 666 "$dev/null" c 1 3
mknod -m 666 "$dev/zero" c 1 5
mknod -m 666 "$dev/full" c 1 7
mknod -m 666 "$dev/random" c 1 8
mknod -m 666 "$dev/urandom" c 1 9
mknod -m 666 "$dev/tty" c 5 0
mkdir "$dev/pts" "$dev/shm" "$dev/mqueue"
ln -s /proc/self/fd "$dev/fd"
ln -s pts/ptmx "$dev/ptmx"
ln -s /proc/self/fd/0 "$dev/stdin"
ln -s /proc/self/fd/1 "$dev/stdout"
ln -s /proc/self/fd/2 "$dev/stderr"
touch "$dev/console"
mount --bind "$STATE/console.log" "$dev/console"
mount --move "$dev" /dev
mount -t devpts -o newinstance,ptmxmode=0666,mode=620,gid=5 devpts /dev/pts
mount -t tmpfs -o mode=1777,nosuid,nodev shm /dev/shm

# /tmp: empty, except the host folders that must stay visible at the same path: the state dir's
# top folder under /tmp, and DROP_SD_KEEP_TMP (colon-separated).
keep="${DROP_SD_KEEP_TMP:-}"
case "$STATE" in
  /tmp/?*) rest="${STATE#/tmp/}"; keep="/tmp/${rest%%/*}${keep:+:$keep}" ;;
esac
tmp="$STATE/mnt/tmp"
mount -t tmpfs -o mode=1777,nosuid,nodev sandbox-tmp "$tmp"
IFS=: read -ra kept <<< "$keep"
for path in "${kept[@]}"; do
  [ -n "$path" ] || continue
  case "$path" in /tmp/?*) ;; *) echo "DROP_SD_KEEP_TMP: $path is not under /tmp" >&2; exit 1 ;; esac
  mkdir -p "$tmp/${path#/tmp/}"
  mount --bind "$path" "$tmp/${path#/tmp/}"
done
mount --move "$tmp" /tmp

# /var: empty (journald keeps its files in /run/log/journal then). $STATE still resolves: its top
# folder was re-bound into the new /tmp just above.
var="$STATE/mnt/var"
mount -t tmpfs -o mode=755,nosuid,nodev sandbox-var "$var"
mkdir -p "$var/tmp" "$var/lib" "$var/log" "$var/cache"
chmod 1777 "$var/tmp"
ln -s /run "$var/run"
ln -s /run/lock "$var/lock"
mount --move "$var" /var

mount --bind "$STATE/run" /run

# /etc: the host's, under a private writable overlay layer ($STATE/etc), so that a test can create
# users (systemd-sysusers) or drop in configuration as a package would, and the host's /etc stays
# untouched.
mount -t overlay -o "lowerdir=/etc,upperdir=$STATE/etc/upper,workdir=$STATE/etc/work" sandbox-etc /etc

# Everything else of the host read-only (again a per-mount flag on a bind, the host's / stays rw).
mount -o remount,bind,ro /

hostname drop-test-systemd
# `container=` tells systemd it runs in a container: no hardware setup, exit (not halt) on poweroff.
export container=drop-test
exec /lib/systemd/systemd --system --unit=drop-test.target \
  --log-target=console --log-level=info --show-status=no
