# %postun: reload systemd; on upgrade restart a running daemon once, with the new binary.
if [ -d /run/systemd/system ]; then
  systemctl daemon-reload || :
  if [ "$1" -ge 1 ]; then systemctl try-restart drop-supervisor.service || :; fi
fi
