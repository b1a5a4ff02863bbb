# %post: users, folders, systemd's view of the unit; on an upgrade the daemon restarts in %postun.
if command -v systemd-sysusers >/dev/null 2>&1; then systemd-sysusers drop.conf || :; fi
if command -v systemd-tmpfiles >/dev/null 2>&1; then systemd-tmpfiles --create drop.conf || :; fi
if [ -d /run/systemd/system ]; then systemctl daemon-reload || :; fi
