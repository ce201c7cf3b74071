#!/bin/sh
# Overhead of Nyx's per-exit metrics on the serial-heavy `hello` guest:
# runs `nyx run` alternately with and without --no-metrics, RUNS times each
# (default 200), and prints the median wall time per run of each and their
# ratio. Build first: cargo build --release -p nyx-cli
set -eu
RUNS=${RUNS:-200}
NYX=${NYX:-target/release/nyx}
HELLO=${HELLO:-$(ls target/release/build/nyx-guests-*/out/hello.elf 2>/dev/null | head -1)}
[ -x "$NYX" ] && [ -f "$HELLO" ] || { echo "build first: cargo build --release -p nyx-cli (guest: $HELLO)" >&2; exit 1; }
on=$(mktemp) off=$(mktemp)
trap 'rm -f "$on" "$off"' EXIT
i=0
while [ "$i" -lt "$RUNS" ]; do
    for mode in on off; do
        flag=""; [ "$mode" = off ] && flag=--no-metrics
        t0=$(date +%s%N)
        "$NYX" run --kernel "$HELLO" $flag >/dev/null 2>&1 || [ $? -eq 33 ]
        t1=$(date +%s%N)
        echo $(( (t1 - t0) / 1000 )) >> "$( [ "$mode" = on ] && echo "$on" || echo "$off")"
    done
    i=$((i + 1))
done
median() { sort -n "$1" | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
m_on=$(median "$on"); m_off=$(median "$off")
echo "runs $RUNS  median wall per run: metrics on ${m_on} us, off ${m_off} us"
awk -v a="$m_on" -v b="$m_off" 'BEGIN {printf "overhead %.2f%%\n", (a - b) * 100 / b}'
