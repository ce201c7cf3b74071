#!/bin/sh
# Records the fixture kernel (tools/scripts/build-test-kernel.sh) until an
# early console line, replays it, and runs it plainly to the same line, RUNS
# times each in turn (record, replay, run); prints one line per run with the
# wall seconds, then the trace's figures (events, landings, bytes, guest
# time). Then, once, under the real gdb on the replay: continue to the end,
# `break start_kernel` and a reverse-continue over the whole recording, with
# the seconds each took.
#
# usage: tools/scripts/bench-kernel.sh VMLINUX INITRD [RUNS]
# needs: a release build (cargo build --release -p nyx-cli), gdb.
# NYX_IRQCHIP=legacy (the default here: `nolapic noapic`, until `pid_max:`)
# or apic (the modern machine, until `pnp: PnP ACPI init`).
set -eu
cd "$(dirname "$0")/../.."
vmlinux=$1
initrd=$2
runs=${3:-3}
nyx=${NYX_BIN:-target/release/nyx}
irqchip=${NYX_IRQCHIP:-legacy}
case "$irqchip" in
legacy)
    until="pid_max: default"
    cmdline="console=ttyS0 nolapic noapic"
    ;;
apic)
    until="pnp: PnP ACPI init"
    cmdline="console=ttyS0 lapic=notscdeadline apic=verbose"
    ;;
*)
    echo "NYX_IRQCHIP must be legacy or apic" >&2
    exit 2
    ;;
esac
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

now() { date +%s.%N; }
for r in $(seq "$runs"); do
    t0=$(now)
    "$nyx" record --irqchip "$irqchip" --out "$tmp/k$r.nyxtrace" --kernel "$vmlinux" --initrd "$initrd" \
        --cmdline "$cmdline" --mem 128 --until-output "$until" >"$tmp/rec.out" 2>"$tmp/rec.err"
    t1=$(now)
    "$nyx" replay "$tmp/k$r.nyxtrace" >"$tmp/rep.out" 2>"$tmp/rep.err"
    t2=$(now)
    "$nyx" run --irqchip "$irqchip" --kernel "$vmlinux" --initrd "$initrd" --cmdline "$cmdline" --mem 128 \
        --until-output "$until" >"$tmp/run.out" 2>"$tmp/run.err"
    t3=$(now)
    cmp -s "$tmp/rec.out" "$tmp/rep.out" || echo "run $r: replay output differs" >&2
    echo "run $r: record $(echo "$t1 - $t0" | bc) s, replay $(echo "$t2 - $t1" | bc) s, plain run $(echo "$t3 - $t2" | bc) s"
done
"$nyx" trace info "$tmp/k1.nyxtrace" | grep -E "^(events|  landing|  pio|  patched|  soft-int|frames|guest time)"
"$nyx" report "$tmp/k1.nyxtrace" 2>/dev/null | grep -iE "landing|keyframe" | head -8 || true

port=47900
"$nyx" replay "$tmp/k1.nyxtrace" --gdb "127.0.0.1:$port" >/dev/null 2>"$tmp/gdb-nyx.err" &
sleep 1
timeout 1800 gdb -nx -batch -ex "set remotetimeout 1200" -ex "target remote 127.0.0.1:$port" \
    -ex "python import time" \
    -ex "python t0 = time.time()" -ex "continue" \
    -ex "python print('T continue-to-end %.2f' % (time.time() - t0))" \
    -ex "break start_kernel" \
    -ex "python t0 = time.time()" -ex "reverse-continue" \
    -ex "python print('T reverse-continue-to-start_kernel %.2f' % (time.time() - t0))" \
    -ex "python t0 = time.time()" -ex "reverse-stepi" \
    -ex "python print('T reverse-stepi %.2f' % (time.time() - t0))" \
    -ex "monitor info" "$vmlinux" 2>&1 | grep -E "^T |checkpoints|start_kernel"
wait
