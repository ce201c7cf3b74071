#!/bin/sh
# Writes the disk image of the virtio guest's golden run to OUTPUT: 128 KiB
# (256 sectors of 512 bytes), 16 text lines of 32 bytes per sector, line L
# of sector S reading "sector SSSS line LL byte BBBBBB\n" (decimal, BBBBBB
# the line's byte offset in the image). nyx_guests::virtio_disk_image()
# returns the same bytes.
set -eu
if [ $# -ne 1 ]; then
    echo "usage: $0 OUTPUT" >&2
    exit 2
fi
LC_ALL=C awk 'BEGIN {
    for (s = 0; s < 256; s++)
        for (l = 0; l < 16; l++)
            printf "sector %04d line %02d byte %06d\n", s, l, s * 512 + l * 32
}' >"$1"
