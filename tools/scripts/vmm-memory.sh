#!/bin/sh
# Memory Nyx itself holds beyond guest RAM, for `nyx run`, `nyx record` and
# `nyx replay`: starts each on GUEST (a guest that waits for serial input,
# such as the in-tree `echo`; the replay waits for gdb), reads
# /proc/PID/smaps once the machine is up, and splits the resident memory
# into guest RAM (anonymous mappings of at least the guest's size), Nyx's
# own anonymous memory (heap, stacks, bitmaps, buffers) and file-backed
# pages (the nyx binary's code and data, shared libraries: clean pages
# shared by every nyx process).
#
# usage: tools/scripts/vmm-memory.sh NYX GUEST.elf [MEM_MIB ...]
set -eu
nyx=$1; guest=$2; shift 2
[ $# -gt 0 ] || set -- 64 1024
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

probe() { # probe PID MEM_MIB
    awk -v big=$(($2 * 1024)) '
/^[0-9a-f]+-[0-9a-f]+ /{ anon = ($5 == 0) }
/^Size:/{ size = $2 }
/^Rss:/{ if (anon && size >= big) guest += $2; else if (anon) own += $2; else file += $2 }
END{ printf "guest RAM resident %6d KiB | Nyx anonymous %6d KiB | file-backed %6d KiB\n", guest, own, file }' "/proc/$1/smaps"
}

started() { # started PATTERN: the PID once the process has been up for a while
    sleep 2
    pgrep -f "$1" | head -1
}

for mem in "$@"; do
    ("$nyx" run --kernel "$guest" --mem "$mem" >/dev/null 2>&1 &)
    pid=$(started "nyx run --kernel $guest --mem $mem")
    printf 'run    %5s MiB: ' "$mem"; probe "$pid" "$mem"
    kill "$pid" 2>/dev/null || true

    ("$nyx" record --kernel "$guest" --mem "$mem" --out "$tmp/live.nyxtrace" >/dev/null 2>&1 &)
    pid=$(started "nyx record --kernel $guest --mem $mem --out $tmp/live.nyxtrace")
    printf 'record %5s MiB: ' "$mem"; probe "$pid" "$mem"
    kill "$pid" 2>/dev/null || true

    printf 'abc.' | "$nyx" record --kernel "$guest" --mem "$mem" --serial-in - --out "$tmp/t.nyxtrace" >/dev/null 2>&1 || true
    ("$nyx" replay --gdb 127.0.0.1:0 "$tmp/t.nyxtrace" >/dev/null 2>&1 &)
    pid=$(started "nyx replay --gdb 127.0.0.1:0 $tmp/t.nyxtrace")
    printf 'replay %5s MiB: ' "$mem"; probe "$pid" "$mem"
    kill "$pid" 2>/dev/null || true
done
