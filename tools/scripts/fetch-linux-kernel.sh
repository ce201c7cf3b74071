#!/bin/sh
# Downloads Debian's stock x86-64 Linux kernel package (the version that
# `linux-image-amd64` currently depends on), extracts it into the cache
# directory given as the only argument, and prints the path of its bzImage
# (boot/vmlinuz-*). Used by the Linux loader tests:
#   NYX_LINUX_KERNEL=$(tools/scripts/fetch-linux-kernel.sh /var/cache/nyx-kernel) \
#       cargo test -p nyx-vmm loader
# Needs apt-get (a Debian or Ubuntu host); the package is downloaded, not installed.
set -eu

if [ $# -ne 1 ]; then
    echo "usage: $0 CACHE_DIR" >&2
    exit 2
fi
cache=$1
mkdir -p "$cache"
cd "$cache"

# Reuse an earlier extraction.
found=$(ls x/boot/vmlinuz-* 2>/dev/null | head -n 1 || true)
if [ -n "$found" ]; then
    echo "$cache/$found"
    exit 0
fi

if ! apt-cache show linux-image-amd64 >/dev/null 2>&1; then
    apt-get update >&2
fi
pkg=$(apt-cache depends linux-image-amd64 | sed -n 's/^ *Depends: \(linux-image-[0-9][^ ]*-amd64\)$/\1/p' | head -n 1)
if [ -z "$pkg" ]; then
    echo "$0: cannot tell which kernel package linux-image-amd64 depends on" >&2
    exit 1
fi
rm -f ./*.deb
apt-get download "$pkg" >&2
dpkg-deb -x ./*.deb x
found=$(ls x/boot/vmlinuz-* | head -n 1)
echo "$cache/$found"
