#!/usr/bin/env bash
# qemu-rr.sh: records a Multiboot guest with QEMU's record/replay (TCG,
# -icount) and replays it, for comparison with Nyx's record/replay figures.
#
# Usage: tools/scripts/qemu-rr.sh GUEST_ELF OUTDIR [SERIAL_INPUT_FILE]
#
# Writes OUTDIR/NAME.rr (QEMU's replay log), OUTDIR/NAME.record.out and
# OUTDIR/NAME.replay.out (COM1 output of each run), and prints one line:
#   NAME record_status=S record_s=T replay_status=S replay_s=T log_bytes=B outputs=same|differ
# A guest with serial input gets it on stdin (-serial stdio); without, COM1
# goes to a file. Environment: QEMU_RR_ICOUNT (default shift=auto),
# QEMU_RR_TIMEOUT (seconds per run, default 60). A run killed by the
# timeout has status 124.
set -u

if [ $# -lt 2 ]; then
    echo "usage: $0 GUEST_ELF OUTDIR [SERIAL_INPUT_FILE]" >&2
    exit 2
fi
guest=$1
outdir=$2
input=${3:-}
icount=${QEMU_RR_ICOUNT:-shift=auto}
limit=${QEMU_RR_TIMEOUT:-60}

if ! command -v qemu-system-x86_64 >/dev/null 2>&1; then
    apt-get update && apt-get install -y qemu-system-x86 || exit 1
fi
[ -r "$guest" ] || { echo "cannot read $guest" >&2; exit 2; }
[ -z "$input" ] || [ -r "$input" ] || { echo "cannot read $input" >&2; exit 2; }
mkdir -p "$outdir" || exit 1
name=$(basename "$guest" .elf)
log="$outdir/$name.rr"

# run MODE OUTFILE STDIN: prints "STATUS SECONDS"; QEMU's stderr goes to
# OUTDIR/NAME.MODE.err.
run() {
    local mode=$1 out=$2 stdin=$3 serial t0 t1 status
    if [ -n "$input" ]; then serial=(-serial stdio); else serial=(-serial "file:$out"); fi
    t0=$(date +%s.%N)
    if [ -n "$input" ]; then
        timeout "$limit" qemu-system-x86_64 -machine pc -cpu qemu64 -m 64 -display none "${serial[@]}" \
            -no-reboot -device isa-debug-exit,iobase=0xf4,iosize=0x04 \
            -icount "$icount,rr=$mode,rrfile=$log" -kernel "$guest" <"$stdin" >"$out" 2>"$outdir/$name.$mode.err"
    else
        timeout "$limit" qemu-system-x86_64 -machine pc -cpu qemu64 -m 64 -display none "${serial[@]}" \
            -no-reboot -device isa-debug-exit,iobase=0xf4,iosize=0x04 \
            -icount "$icount,rr=$mode,rrfile=$log" -kernel "$guest" </dev/null 2>"$outdir/$name.$mode.err"
    fi
    status=$?
    t1=$(date +%s.%N)
    echo "$status $(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.3f", b - a }')"
}

rm -f "$log"
read -r rs rt < <(run record "$outdir/$name.record.out" "${input:-/dev/null}")
# The replay's input comes from the log: give it none.
read -r ps pt < <(run replay "$outdir/$name.replay.out" /dev/null)
bytes=$(stat -c %s "$log" 2>/dev/null || echo 0)
if cmp -s "$outdir/$name.record.out" "$outdir/$name.replay.out"; then same=same; else same=differ; fi
printf '%s record_status=%s record_s=%.3f replay_status=%s replay_s=%.3f log_bytes=%s outputs=%s\n' \
    "$name" "$rs" "$rt" "$ps" "$pt" "$bytes" "$same"
for mode in record replay; do
    if [ -s "$outdir/$name.$mode.err" ]; then
        echo "  $mode stderr: $(head -c 300 "$outdir/$name.$mode.err" | tr '\n' ' ')"
    fi
done
