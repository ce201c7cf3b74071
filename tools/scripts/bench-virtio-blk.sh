#!/bin/sh
# Times the virtio-blk benchmark guests (tests/guests/blk*.S, see
# tests/guests/blkbench.h) as whole processes under QEMU (TCG) and under
# Nyx (a plain `nyx run` and `nyx record`): blknop (set-up only, the
# baseline), blkseq (the whole disk in 64 KiB reads), blkrand (4096 random
# 4 KiB reads), blkwrite (1024 random 4 KiB writes and a flush), one request
# in flight, each completed by an MSI-X interrupt.
#
# usage: tools/scripts/bench-virtio-blk.sh [RUNS]   (default 5)
#
# Each guest runs RUNS times in each mode (the modes and guests in turn,
# run by run) on a deterministic raw image made by
# tests/golden/blkbench-disk.sh (SECTORS sectors; 65536 = 32 MiB by
# default; no network); blkwrite on a fresh copy of it each run (copied
# before the clock starts). The image lives in a directory of mktemp -d:
# TMPDIR=/dev/shm keeps the host's disk (and blkwrite's flush) out of the
# figures. Prints the median wall time (min-max) of each
# guest and mode, and from the medians: the time net of blknop (boot, PCI
# scan, device set-up, process start and exit), per request in µs, MB/s
# (10^6 bytes) for blkseq and IOPS for blkrand and blkwrite, and the
# record/plain ratio of Nyx (whole runs and net of blknop). Checks every
# run's exit status and that every run of a guest, in every mode, prints
# the same result line (request count and data hash), and that blkwrite
# leaves the same image under QEMU and `nyx run` (and none changed under
# `nyx record`, which keeps writes in memory).
#
# Environment:
#   NYX_BIN  the nyx binary (default: target/release/nyx, built first with
#            `cargo build --release -p nyx-cli -p nyx-guests`)
#   GUESTS   directory of the guests' ELF files (default: the newest
#            TARGET/release/build/nyx-guests-*/out holding blkseq.elf, where
#            the nyx-guests build script writes NAME.elf; TARGET is
#            $CARGO_TARGET_DIR or target)
#   QEMU     the QEMU binary (default: qemu-system-x86_64)
#   MODES    any of "qemu run record embed" (default: "qemu run record";
#            embed is `nyx record --embed-disks`, every read in the trace)
#   SECTORS  the image's size in sectors (default 65536, 8..195312)
# Needs: awk, sha256sum, date +%N, timeout.
#
# The commands, for one run (W the scratch directory, disk.img the image):
#   QEMU:   qemu-system-x86_64 -machine pc -cpu qemu64 -m 64 -display none
#           -vga none -nic none -serial stdio -no-reboot
#           -device isa-debug-exit,iobase=0xf4,iosize=0x04 -kernel NAME.elf
#           -drive if=none,id=d0,file=disk.img,format=raw
#           -device virtio-blk-pci,disable-legacy=on,addr=0x3,drive=d0
#   run:    nyx run --mem 64 --kernel NAME.elf --disk disk.img
#   record: nyx record --out t.nyxtrace --mem 64 --kernel NAME.elf --disk disk.img
#   embed:  the same with --embed-disks
set -eu
cd "$(dirname "$0")/../.."
runs=${1:-5}
modes=${MODES:-qemu run record}
sectors=${SECTORS:-65536}
qemu=${QEMU:-qemu-system-x86_64}
target=${CARGO_TARGET_DIR:-target}
if [ -n "${NYX_BIN:-}" ]; then
    nyx=$(realpath "$NYX_BIN")
else
    cargo build --release -q -p nyx-cli -p nyx-guests
    nyx=$(realpath "$target/release/nyx")
fi
if [ -z "${GUESTS:-}" ]; then
    GUESTS=$(dirname "$(ls -t "$target"/release/build/nyx-guests-*/out/blkseq.elf | head -1)")
fi
GUESTS=$(realpath "$GUESTS")
guests="blknop blkseq blkrand blkwrite"
for g in $guests; do
    [ -f "$GUESTS/$g.elf" ] || { echo "no $GUESTS/$g.elf" >&2; exit 1; }
done
W=$(mktemp -d)
trap 'rm -rf "$W"' EXIT

sh tests/golden/blkbench-disk.sh "$W/base.img" "$sectors"
base_sha=$(sha256sum "$W/base.img" | cut -d' ' -f1)

exit_value() { # GUEST: its debug-exit value
    case $1 in
    blknop) echo 90 ;;   # 0x5a
    blkseq) echo 91 ;;   # 0x5b
    blkrand) echo 92 ;;  # 0x5c
    blkwrite) echo 93 ;; # 0x5d
    esac
}

now() { date +%s.%N; }

# One run of GUEST in MODE: its wall seconds appended to W/GUEST.MODE.t,
# its result line to W/GUEST.lines, blkwrite's image hash to
# W/blkwrite.MODE.sha.
run_one() {
    g=$1
    mode=$2
    img=base.img
    if [ "$g" = blkwrite ]; then
        cp "$W/base.img" "$W/disk.img"
        img=disk.img
    fi
    rm -f "$W/t.nyxtrace"
    want=$(exit_value "$g")
    t0=$(now)
    set +e
    case $mode in
    qemu)
        (cd "$W" && timeout 600 "$qemu" -machine pc -cpu qemu64 -m 64 -display none \
            -vga none -nic none -serial stdio -no-reboot \
            -device isa-debug-exit,iobase=0xf4,iosize=0x04 -kernel "$GUESTS/$g.elf" \
            -drive if=none,id=d0,file=$img,format=raw \
            -device virtio-blk-pci,disable-legacy=on,addr=0x3,drive=d0) </dev/null >"$W/out" 2>"$W/err"
        got=$?
        want=$((want * 2 + 1))
        ;;
    run)
        (cd "$W" && timeout 600 "$nyx" run --mem 64 --kernel "$GUESTS/$g.elf" --disk "$img") \
            </dev/null >"$W/out" 2>"$W/err"
        got=$?
        ;;
    record | embed)
        embed=
        [ "$mode" = embed ] && embed=--embed-disks
        (cd "$W" && timeout 600 "$nyx" record --out t.nyxtrace --mem 64 --kernel "$GUESTS/$g.elf" \
            --disk "$img" $embed) </dev/null >"$W/out" 2>"$W/err"
        got=$?
        ;;
    *)
        echo "unknown mode $mode" >&2
        exit 2
        ;;
    esac
    set -e
    t1=$(now)
    if [ "$got" != "$want" ]; then
        echo "$g under $mode: exit status $got, expected $want" >&2
        cat "$W/out" "$W/err" >&2
        exit 1
    fi
    echo "$t1 $t0" | awk '{ printf "%.6f\n", $1 - $2 }' >>"$W/$g.$mode.t"
    grep "^$g: " "$W/out" | sed "s/^/$mode: /" >>"$W/$g.lines"
    if [ "$g" = blkwrite ]; then
        sha256sum "$W/disk.img" | cut -d' ' -f1 >>"$W/blkwrite.$mode.sha"
    fi
}

echo "image: $sectors sectors ($((sectors * 512)) bytes), $runs runs of each guest in each mode: $modes"
echo "qemu: $("$qemu" --version | head -1)"
echo "nyx: $nyx"
echo "guests: $GUESTS"
for r in $(seq "$runs"); do
    for g in $guests; do
        for mode in $modes; do
            run_one "$g" "$mode"
        done
    done
done

# The result lines: one per guest, whatever the mode.
status=0
for g in $guests; do
    n=$(sed 's/^[a-z]*: //' "$W/$g.lines" | sort -u | wc -l)
    if [ "$n" != 1 ]; then
        echo "$g: the result lines differ:" >&2
        sort "$W/$g.lines" | uniq -c >&2
        status=1
    fi
done
shas=""
for mode in $modes; do
    s=$(sort -u "$W/blkwrite.$mode.sha")
    case $mode in
    record | embed)
        [ "$s" = "$base_sha" ] || { echo "blkwrite: nyx record changed the image" >&2; status=1; }
        ;;
    *)
        [ "$(echo "$s" | wc -l)" = 1 ] || { echo "blkwrite under $mode: images differ between runs" >&2; status=1; }
        shas="$shas$s
"
        ;;
    esac
done
if [ "$(sha256sum "$W/base.img" | cut -d' ' -f1)" != "$base_sha" ]; then
    echo "the image changed under a guest that only reads" >&2
    status=1
fi
if [ "$(printf '%s' "$shas" | sort -u | grep -c .)" -gt 1 ]; then
    echo "blkwrite: the image afterwards differs between QEMU and nyx run" >&2
    status=1
fi

echo
echo "result lines (every run, every mode):"
for g in $guests; do
    sed -n '1s/^[a-z]*: /  /p' "$W/$g.lines"
done
if [ -n "$shas" ]; then
    echo "  blkwrite image afterwards: sha256 $(printf '%s' "$shas" | head -1)"
fi

# median min max of a file of numbers
stats() { sort -n "$1" | awk '{ v[NR] = $1 } END {
    m = (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2
    printf "%.4f %.4f %.4f\n", m, v[1], v[NR] }'; }

echo
printf '%-9s %-7s %9s %19s %9s %11s %13s\n' guest mode "median s" "(min-max)" "net s" "us/request" "rate"
for g in $guests; do
    line=$(sed -n '1s/^[a-z]*: //p' "$W/$g.lines")
    requests=$(echo "$line" | awk '{ print $2 }')
    bytes=$(echo "$line" | awk '{ print $4 }')
    for mode in $modes; do
        set -- $(stats "$W/$g.$mode.t")
        echo "$1" >"$W/$g.$mode.median"
        base=$(cat "$W/blknop.$mode.median")
        echo "$g $mode $1 $2 $3 $base $requests $bytes" | awk '{
            net = $3 - $6
            printf "%-9s %-7s %9.3f %19s", $1, $2, $3, sprintf("(%.3f-%.3f)", $4, $5)
            if ($1 == "blknop" || $7 == 0) { printf "\n"; next }
            printf " %9.3f", net
            if (net <= 0) { printf " %11s %13s\n", "-", "-"; next }
            printf " %11.1f", net / $7 * 1e6
            if ($1 == "blkseq") printf " %8.1f MB/s\n", $8 / net / 1e6
            else printf " %8.0f IOPS\n", $7 / net
        }'
    done
done

case " $modes " in *" run "*)
    for rec in record embed; do
        case " $modes " in *" $rec "*) ;; *) continue ;; esac
        echo
        echo "nyx $rec/run, from the medians (whole run; net of blknop):"
        for g in $guests; do
            awk -v g="$g" -v r="$(cat "$W/$g.$rec.median")" -v p="$(cat "$W/$g.run.median")" \
                -v rb="$(cat "$W/blknop.$rec.median")" -v pb="$(cat "$W/blknop.run.median")" 'BEGIN {
                printf "  %-9s %.2f", g, r / p
                if (g != "blknop" && p - pb > 0) printf "; %.2f", (r - rb) / (p - pb)
                printf "\n" }'
        done
    done
    ;; esac
exit $status
