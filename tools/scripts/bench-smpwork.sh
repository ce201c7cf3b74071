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
# Prints every run's wall, user and system seconds and the CPU seconds
# that other processes used on the host meanwhile ("other": the host's
# busy time from /proc/stat less the run's user and system time), then
# per count the medians and the speedup: the median wall time of 1 vCPU
# over that of N. On a shared host the speedup is only as good as the
# cores the runs got: look at "other". Checks that every run exits with
# the guest's debug-exit value (0x60, exit status 96) and prints the
# same result line.
#
# Environment:
#   NYX_BIN  the nyx binary (default: target/release/nyx, built first with
#            `cargo build --release -p nyx-cli -p nyx-guests`)
#   GUESTS   directory of the guests' ELF files (default: the newest
#            TARGET/release/build/nyx-guests-*/out holding smpwork.elf;
#            TARGET is $CARGO_TARGET_DIR or target)
#   CPUS     the vCPU counts (default "1 2 4"; the first is the baseline)
#   IDLE     if set, wait before each round (at most 10 minutes) until the
#            host's cores have been under 10% busy for 3 s in a row
#   MAX_OTHER  if set (seconds), a round in which a run saw other
#            processes use more CPU than that is discarded and run again
#            (at most 3 x RUNS rounds in all); the medians are of the
#            rounds kept
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

# The host's busy time so far, in clock ticks (user, nice, system, irq,
# softirq, steal).
busy() { awk '/^cpu / { print $2 + $3 + $4 + $7 + $8 + $9 }' /proc/stat; }
ticks=$(getconf CLK_TCK)
cores=$(nproc)
# Waits until the host was under 10% busy in three 1 s samples in a row.
wait_idle() {
    calm=0
    waited=0
    while [ "$calm" -lt 3 ] && [ "$waited" -lt 600 ]; do
        b0=$(busy)
        sleep 1
        waited=$((waited + 1))
        if [ $(($(busy) - b0)) -lt $((ticks * cores / 10)) ]; then
            calm=$((calm + 1))
        else
            calm=0
        fi
    done
}

echo "host: $cores cores, load average $(cut -d' ' -f1-3 /proc/loadavg)"
echo "guest: $guest"
i=0
rounds=0
while [ "$i" -lt "$runs" ] && [ "$rounds" -lt $((3 * runs)) ]; do
    i=$((i + 1))
    rounds=$((rounds + 1))
    [ -z "${IDLE:-}" ] || wait_idle
    : >"$work/round"
    for n in $cpus; do
        b0=$(busy)
        set +e
        /usr/bin/time -o "$work/time" -f "%e %U %S" \
            "$nyx" run --kernel "$guest" --cpus "$n" --cmdline "nyx-test arg=1" \
            >"$work/out" 2>"$work/err"
        status=$?
        b1=$(busy)
        set -e
        if [ "$status" != 96 ]; then
            echo "run $i, $n vCPUs: exit status $status" >&2
            cat "$work/out" "$work/err" >&2
            exit 1
        fi
        grep '^smpwork: result ' "$work/out" >>"$work/results"
        # GNU time puts "Command exited with non-zero status" first.
        t=$(tail -n 1 "$work/time")
        other=$(echo "$t" | awk -v b=$((b1 - b0)) -v hz="$ticks" '{ o = b / hz - $2 - $3; printf "%.2f", o < 0 ? 0 : o }')
        echo "$n $t $other" >>"$work/round"
        echo "run $i: $n vCPUs: $t $other (wall, user, sys, other s)"
    done
    if [ -n "${MAX_OTHER:-}" ] && awk -v m="$MAX_OTHER" '$5 > m { bad = 1 } END { exit !bad }' "$work/round"; then
        echo "run $i: discarded (other processes above ${MAX_OTHER} s)"
        i=$((i - 1))
    else
        cat "$work/round" >>"$work/times"
    fi
done
[ "$i" -eq "$runs" ] || echo "only $i of $runs rounds kept in $rounds" >&2
[ "$i" -gt 0 ] || exit 1
if [ "$(sort -u "$work/results" | wc -l)" != 1 ]; then
    echo "the result lines differ:" >&2
    sort "$work/results" | uniq -c >&2
    exit 1
fi
echo "every run: $(head -n 1 "$work/results")"

median() { sort -n | awk '{ v[NR] = $1 } END { m = int((NR + 1) / 2); print (NR % 2) ? v[m] : (v[m] + v[m + 1]) / 2 }'; }
base=
printf '%-6s %8s %8s %8s %8s %8s\n' vCPUs "wall s" "user s" "sys s" "other s" speedup
for n in $cpus; do
    wall=$(awk -v n="$n" '$1 == n { print $2 }' "$work/times" | median)
    user=$(awk -v n="$n" '$1 == n { print $3 }' "$work/times" | median)
    sys=$(awk -v n="$n" '$1 == n { print $4 }' "$work/times" | median)
    other=$(awk -v n="$n" '$1 == n { print $5 }' "$work/times" | median)
    base=${base:-$wall}
    printf '%-6s %8s %8s %8s %8s %8s\n' "$n" "$wall" "$user" "$sys" "$other" \
        "$(awk -v b="$base" -v w="$wall" 'BEGIN { printf "%.2f", b / w }')"
done
