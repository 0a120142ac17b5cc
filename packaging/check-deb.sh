#!/usr/bin/env bash
# Checks the contents of the .deb built by `cargo deb`: the files it must
# install, the conffile, and maintainer scripts that enable the service
# without starting it.
set -euo pipefail
deb=${1:-$(ls -t "${CARGO_TARGET_DIR:-target}"/debian/usersync_*.deb | head -n 1)}
echo "checking $deb"
contents=$(dpkg-deb -c "$deb" | awk '{print $6}')
fail=0
need() {
    if ! grep -qxE "$1" <<<"$contents"; then
        echo "missing from the package: $1"; fail=1
    fi
}
need '\./usr/bin/usersync'
need '\./etc/usersync/usersync\.toml'
need '\./(usr/)?lib/systemd/system/usersync\.service'
need '\./usr/share/doc/usersync/README\.md'
need '\./usr/share/doc/usersync/examples/demo\.toml'
need '\./usr/share/man/man1/usersync\.1(\.gz)?'
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
dpkg-deb -e "$deb" "$tmp"
grep -qx '/etc/usersync/usersync.toml' "$tmp/conffiles" || { echo "usersync.toml is not a conffile"; fail=1; }
grep -q 'enable' "$tmp/postinst" || { echo "postinst does not enable the unit"; fail=1; }
if grep -E '^\s*(systemctl|invoke-rc\.d|deb-systemd-invoke)\b.*\bstart\b' "$tmp/postinst" | grep -vq 'try-restart'; then
    echo "postinst starts the service before it is configured"; fail=1
fi
dpkg-deb -x "$deb" "$tmp/root"
"$tmp/root/usr/bin/usersync" --version
"$tmp/root/usr/bin/usersync" check-config "$tmp/root/etc/usersync/usersync.toml" >/dev/null 2>&1 && {
    echo "the shipped config should need the site's CA before it validates"; fail=1; } || true
# The README's two-terminal walkthrough, installed: the shipped demo config
# validates against a CA the installed simulator writes (its paths moved
# into $tmp, so no demo of the machine is touched).
demo="$tmp/root/usr/share/doc/usersync/examples/demo.toml"
if [ -f "$demo" ]; then
    "$tmp/root/usr/bin/usersync" sim --listen 127.0.0.1:0 --devices 1 --cert-dir "$tmp/demo" </dev/null >/dev/null 2>&1 &
    sim=$!
    for _ in $(seq 50); do [ -s "$tmp/demo/ca.crt" ] && break; sleep 0.1; done
    kill "$sim" 2>/dev/null || true
    wait "$sim" 2>/dev/null || true
    sed "s#/tmp/usersync-demo#$tmp/demo#g" "$demo" >"$tmp/demo.toml"
    "$tmp/root/usr/bin/usersync" check-config "$tmp/demo.toml" >/dev/null 2>&1 ||
        { echo "the shipped demo config does not validate"; fail=1; }
fi
[ "$fail" = 0 ] && echo "package ok: $(dpkg-deb -f "$deb" Package) $(dpkg-deb -f "$deb" Version), $(wc -l <<<"$contents") entries"
exit "$fail"
