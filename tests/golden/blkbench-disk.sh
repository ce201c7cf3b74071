#!/bin/sh
# Writes the disk image of the virtio-blk benchmark guests (blknop, blkseq,
# blkrand, blkwrite; see tests/guests/blkbench.h) to OUTPUT: SECTORS
# sectors of 512 bytes (default 65536: 32 MiB; at most 195312, so that
# every offset has 8 digits), 16 text lines of 32 bytes per sector, line L
# of sector S reading "sector SSSSSS line LL @BBBBBBBB\n" (decimal, BBBBBBBB
# the line's byte offset in the image). nyx_guests::blkbench_disk_image()
# returns the same bytes for the default size.
set -eu
if [ $# -lt 1 ] || [ $# -gt 2 ]; then
    echo "usage: $0 OUTPUT [SECTORS]" >&2
    exit 2
fi
sectors=${2:-65536}
case $sectors in
'' | *[!0-9]*) echo "$0: SECTORS must be a number" >&2; exit 2 ;;
esac
if [ "$sectors" -lt 8 ] || [ "$sectors" -gt 195312 ]; then
    echo "$0: SECTORS must be 8..195312" >&2
    exit 2
fi
LC_ALL=C awk -v sectors="$sectors" 'BEGIN {
    for (s = 0; s < sectors; s++)
        for (l = 0; l < 16; l++)
            printf "sector %06d line %02d @%08d\n", s, l, s * 512 + l * 32
}' >"$1"
