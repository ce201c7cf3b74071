#!/bin/sh
# Builds the SMP variant of the test fixture kernel: the configuration of
# build-test-kernel.sh plus CONFIG_SMP with NR_CPUS=4, for the tests that
# boot Linux on several vCPUs. Same usage and output as that script (two
# lines: the vmlinux and the initramfs), cached in CACHE_DIR under a key of
# its own (the hash of the variant script written there).
set -eu

if [ $# -ne 1 ]; then
    echo "usage: $0 CACHE_DIR" >&2
    exit 2
fi
here=$(dirname "$(readlink -f "$0")")
mkdir -p "$1"
variant="$1/build-test-kernel-smp.sh"
sed 's/^    -d RANDOMIZE_BASE >&2$/    -d RANDOMIZE_BASE -e SMP --set-val NR_CPUS 4 >\&2/' \
    "$here/build-test-kernel.sh" > "$variant.tmp"
if ! grep -q 'NR_CPUS 4' "$variant.tmp"; then
    echo "$0: the configuration lines of build-test-kernel.sh changed; update this script" >&2
    exit 1
fi
mv "$variant.tmp" "$variant"
exec sh "$variant" "$1"
