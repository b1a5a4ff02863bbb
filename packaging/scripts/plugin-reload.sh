# %post of a plugin package (install, upgrade): a running daemon applies the plugin's flow now; a
# stopped one does when it starts. (Its %postun, in the package's table in
# drop-supervisor/Cargo.toml, reloads the same way so that an erase stops the flow.) A plugin
# that cannot be applied (a conflict) is reported here and by `dropctl plugin ls`; it never
# fails the transaction.
if command -v dropctl >/dev/null 2>&1 && [ -S /run/drop/drop.sock ]; then
  dropctl plugin reload || :
fi
