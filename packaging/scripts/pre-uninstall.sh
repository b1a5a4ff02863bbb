# %preun: on erase (not upgrade) stop and disable the daemon; its state stays in /var/lib/drop.
if [ "$1" -eq 0 ] && [ -d /run/systemd/system ]; then
  systemctl --no-reload disable --now drop-supervisor.service || :
fi
