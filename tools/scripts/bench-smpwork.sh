#!/bin/sh
# Times the smpwork guest (tests/guests/smpwork.S: a fixed amount of work
# split among the vCPUs) as whole `nyx run` processes with 1, 2 and 4
# vCPUs, for the parallel speedup of several vCPUs.
#
# usage: tools/scripts/bench-smpwork.sh [RUNS]   (default 7)
#
# Each vCPU count runs RUNS times, the counts in turn, run by run
# (1 2 4 1 2 4 ...), each under /usr/bin/time -f "%e %U %S":
#   nyx run --kernel smpwork.elf --cpus N --cmdline "nyx-test arg=1"
# Prints every run's wall, user and system seconds, then per count the
# medians and the speedup: the median wall time of 1 vCPU over that of N.
# Checks that every run exits with the guest's debug-exit value (0x60,
# exit status 96) and prints the same result line.
#
# Environment:
#   NYX_BIN  the nyx binary (default: target/release/nyx, built first with
#            `cargo build --release -p nyx-cli -p nyx-guests`)
#   GUESTS   directory of the guests' ELF files (default: the newest
#            TARGET/release/build/nyx-guests-*/out holding smpwork.elf;
#            TARGET is $CARGO_TARGET_DIR or target)
#   CPUS     the vCPU counts (default "1 2 4"; the first is the baseline)
# Needs: awk, GNU time (/usr/bin/time).
set -eu
cd "$(dirname "$0")/../.."
runs=${1:-7}
cpus=${CPUS:-1 2 4}
target=${CARGO_TARGET_DIR:-target}
if [ -n "${NYX_BIN:-}" ]; then
    nyx=$(realpath "$NYX_BIN")
else
    cargo build --release -q -p nyx-cli -p nyx-guests
    nyx=$(realpath "$target/release/nyx")
fi
if [ -n "${GUESTS:-}" ]; then
    guest="$GUESTS/smpwork.elf"
else
    guest=$(ls -t "$target"/release/build/nyx-guests-*/out/smpwork.elf | head -n 1)
fi
[ -f "$guest" ] || { echo "no smpwork.elf: $guest" >&2; exit 1; }
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

echo "host: $(nproc) cores, load average $(cut -d' ' -f1-3 /proc/loadavg)"
echo "guest: $guest"
i=0
while [ "$i" -lt "$runs" ]; do
    i=$((i + 1))
    for n in $cpus; do
        set +e
        /usr/bin/time -o "$work/time" -f "%e %U %S" \
            "$nyx" run --kernel "$guest" --cpus "$n" --cmdline "nyx-test arg=1" \
            >"$work/out" 2>"$work/err"
        status=$?
        set -e
        if [ "$status" != 96 ]; then
            echo "run $i, $n vCPUs: exit status $status" >&2
            cat "$work/out" "$work/err" >&2
            exit 1
        fi
        grep '^smpwork: result ' "$work/out" >>"$work/results"
        # GNU time puts "Command exited with non-zero status" first.
        t=$(tail -n 1 "$work/time")
        echo "$n $t" >>"$work/times"
        echo "run $i: $n vCPUs: $t (wall, user, sys s)"
    done
done
if [ "$(sort -u "$work/results" | wc -l)" != 1 ]; then
    echo "the result lines differ:" >&2
    sort "$work/results" | uniq -c >&2
    exit 1
fi
echo "every run: $(head -n 1 "$work/results")"

median() { sort -n | awk '{ v[NR] = $1 } END { m = int((NR + 1) / 2); print (NR % 2) ? v[m] : (v[m] + v[m + 1]) / 2 }'; }
base=
printf '%-6s %10s %10s %10s %8s\n' vCPUs "wall s" "user s" "sys s" speedup
for n in $cpus; do
    wall=$(awk -v n="$n" '$1 == n { print $2 }' "$work/times" | median)
    user=$(awk -v n="$n" '$1 == n { print $3 }' "$work/times" | median)
    sys=$(awk -v n="$n" '$1 == n { print $4 }' "$work/times" | median)
    base=${base:-$wall}
    printf '%-6s %10s %10s %10s %8s\n' "$n" "$wall" "$user" "$sys" \
        "$(awk -v b="$base" -v w="$wall" 'BEGIN { printf "%.2f", b / w }')"
done
