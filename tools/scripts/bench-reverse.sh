#!/bin/sh
# Times reverse execution on a replay of the counter guest (1 kHz timer,
# keyframed landings) under the real gdb, for several checkpoint intervals:
# finding the exact position of a breakpoint stop (`monitor when`), two
# reverse-stepi, a reverse-continue to the previous IRQ0 and a
# reverse-continue on a write watchpoint. Prints one line per run with the
# seconds each took and the single steps it re-executed.
#
# usage: tools/scripts/bench-reverse.sh [RUNS] [INTERVALS_MS...]
# needs: a release build (cargo build --release -p nyx-cli), gdb, nm.
set -eu
cd "$(dirname "$0")/../.."
runs=${1:-3}
shift || true
intervals=${*:-1 5 20 100}
nyx=${NYX_BIN:-target/release/nyx}
guest=$(ls -t target/*/build/nyx-guests-*/out/counter.elf | head -1)
ticks=0x$(nm "$guest" | awk '$3 == "ticks" { print $1 }')
tmp=$(mktemp -d)
trap '[ -n "${KEEP:-}" ] || rm -rf "$tmp"' EXIT; [ -n "${KEEP:-}" ] && echo "files in $tmp"
"$nyx" record --out "$tmp/c.nyxtrace" --kernel "$guest" >/dev/null 2>&1 || true

timed() {
    # $1: label, rest: the gdb command
    label=$1
    shift
    printf '%s\n' "python t0 = time.time(); s0 = steps()" "$*" \
        "python print('T $label %.4f %d' % (time.time() - t0, steps() - s0))"
}

port=47000
for iv in $intervals; do
    for r in $(seq "$runs"); do
        port=$((port + 1))
        "$nyx" replay "$tmp/c.nyxtrace" --gdb "127.0.0.1:$port" --checkpoint-interval "$iv" \
            >/dev/null 2>"$tmp/nyx.err" &
        sleep 0.5
        {
            echo "set architecture i386:x86-64"
            echo "set remotetimeout 600"
            echo "target remote 127.0.0.1:$port"
            echo "python import time"
            echo "python"
            echo "def steps():"
            echo "    out = gdb.execute('monitor info', to_string=True)"
            echo "    return int(out.split(' steps re-executed')[0].split(', ')[-1])"
            echo "end"
            echo "hbreak irq0"
            for _ in $(seq 20); do echo "continue"; done
            timed resolve monitor when
            timed rstepi reverse-stepi
            timed rstepi2 reverse-stepi
            timed rcont reverse-continue
            echo "delete"
            echo "watch *(int *)$ticks"
            timed rwatch reverse-continue
            echo "kill"
        } >"$tmp/cmds"
        gdb -nx -batch -x "$tmp/cmds" "$guest" 2>&1 | tee "$tmp/gdb.out" | awk -v iv="$iv" -v r="$r" '
            $1 == "T" { line = line sprintf(" %s=%ss/%dsteps", $2, $3, $4) }
            END { print "interval=" iv "ms run=" r line }'
        wait
    done
done
