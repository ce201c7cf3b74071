#!/bin/sh
# Measures `nyx check` on two snapshots of in-tree guests waiting for input:
# echo (a short case: a few hundred instructions and ~60 exits) and ticks
# (an idle-heavy case: 10 timer ticks idled in HLT between bytes), under the
# check clock and the host clock, and the cost of a failure (its recorded
# re-run). Usage: tools/scripts/bench-check.sh [NYX] (default: the release
# build, built first). Prints each command and nyx's summary line.
set -eu
cd "$(dirname "$0")/../.."
if [ $# -ge 1 ]; then
    NYX=$(realpath "$1")
else
    cargo build --release -q -p nyx-cli
    NYX=$(realpath target/release/nyx)
fi
GUESTS=$(dirname "$(ls -t target/*/build/nyx-guests-*/out/echo.elf | head -1)")
W=$(mktemp -d)
trap 'rm -rf "$W"' EXIT

snapshot() { # NAME: a snapshot of guest NAME idling for input, W/NAME.nyxsnap
    mkfifo "$W/$1.fifo"
    "$NYX" run --kernel "$GUESTS/$1.elf" --serial-in - --api "$W/$1.sock" <"$W/$1.fifo" >/dev/null 2>&1 &
    exec 3>"$W/$1.fifo"
    while [ ! -S "$W/$1.sock" ]; do sleep 0.05; done
    sleep 0.3
    "$NYX" ctl "$W/$1.sock" pause >/dev/null
    "$NYX" ctl "$W/$1.sock" snapshot "$W/$1.nyxsnap" >/dev/null
    "$NYX" ctl "$W/$1.sock" quit >/dev/null
    exec 3>&-
    wait
}

run() {
    echo "\$ nyx $*"
    (cd "$W" && "$NYX" "$@" 2>&1 | grep -v blessed)
}

printf 'abc.' >"$W/in.txt"
snapshot echo
snapshot ticks
run check echo.nyxsnap --input in.txt --expect echo.out --bless --repeat 1
run check echo.nyxsnap --input in.txt --expect echo.out --repeat 2000
run check echo.nyxsnap --input in.txt --expect echo.out --repeat 4000 --jobs 2
run check ticks.nyxsnap --input in.txt --expect ticks.out --bless --repeat 1
run check ticks.nyxsnap --input in.txt --expect ticks.out --repeat 1000
run check ticks.nyxsnap --input in.txt --expect ticks-host.out --clock host --bless --repeat 100 --keep-going
# A failure: every repetition fails the same way; one recorded re-run.
printf 'wrong' >"$W/wrong.out"
run check echo.nyxsnap --input in.txt --expect wrong.out --repeat 2000 --keep-going
run check ticks.nyxsnap --input in.txt --expect wrong.out --repeat 1000 --keep-going
for g in echo ticks; do
    echo "\$ time nyx record --from-snapshot $g.nyxsnap --clock check --serial-in in.txt"
    (cd "$W" && /usr/bin/time -f "%e s wall, %M KiB max RSS" "$NYX" record --from-snapshot $g.nyxsnap --clock check \
        --serial-in in.txt --out $g.nyxtrace 2>&1 >/dev/null | tail -2)
    (cd "$W" && "$NYX" trace info $g.nyxtrace | grep -E "events|guest time|file|size" || true)
    ls -l "$W/$g.nyxtrace" | awk '{print $5 " bytes of trace"}'
done
