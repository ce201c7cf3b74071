#!/bin/sh
# Regenerates the golden serial outputs of the deterministic Nyx test guests
# by running them under QEMU (see README.md): all of them, or those named
# as arguments. Needs gcc (or $CC), GNU
# binutils and qemu-system-x86_64. Assembles the guests with the same flags
# as tests/guests/build.rs, names each kernel file after its guest (QEMU puts
# the file name in front of the Multiboot command line) and checks QEMU's
# exit status against the expected one.
#
# virtio runs with virtio-blk, virtio-rng and virtio-console devices (see
# README.md): its disk image is created afresh by virtio-disk.sh before the
# run, the console output is recorded as virtio.console and the SHA-256 of
# the image after the run as virtio.img.sha256 (needs sha256sum).
#
# conecho runs with a virtio-console alone at 00:03.0 on QEMU's stdin and
# stdout: it reads conecho.in there, its console output is recorded as
# conecho.console, and COM1 goes to a file that becomes conecho.out.
#
# The virtio-blk benchmark guests (blknop, blkseq, blkrand, blkwrite) run
# with virtio-blk alone at 00:03.0 on a fresh copy of the image
# blkbench-disk.sh writes (32 MiB); the SHA-256 of blkwrite's image after
# its run is recorded as blkwrite.img.sha256.
#
# netping runs with a virtio-net alone at 00:03.0 (MAC 52:54:00:12:34:56)
# on a stream netdev listening on a Unix socket nobody connects to: the
# link delivers nothing, so the guest prints its MAC and "no peer". Then
# netping-pair.sh runs two instances of it on one link and records
# netping-a.out and netping-b.out.
#
# smp runs with four CPUs (-smp 4); its "smp: racy total 0x" line varies
# from run to run (see README.md). smpwork runs with four CPUs too; its
# result line is the same with any number.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
guests="$here/../guests"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cc=${CC:-cc}
append="nyx-test arg=1"
status=0

# name, expected QEMU exit status, serial input
for spec in hello:67 pit:35 longmode:1 triple:0 ports:69 echo:103:echo.in softint:145 \
    lapic:161 ioapic:163 hpet:165 acpi:0 busyio:147 s3:171 pmtimer:167 virtio:179 \
    conecho:189:conecho.in blknop:181 blkseq:183 blkrand:185 blkwrite:187 smp:191 \
    smpwork:193 netping:195; do
    name=${spec%%:*}
    # With arguments, only the guests they name.
    if [ $# -gt 0 ]; then
        case " $* " in *" $name "*) ;; *) continue ;; esac
    fi
    rest=${spec#*:}
    want=${rest%%:*}
    input=/dev/null
    case "$rest" in *:*) input="$here/${rest#*:}" ;; esac
    "$cc" -m32 -c -g -nostdinc -Wa,--noexecstack -I "$guests" \
        -o "$work/$name.o" "$guests/$name.S"
    ld -m elf_i386 -nostdlib --build-id=none -z max-page-size=0x1000 \
        -z noexecstack -T "$guests/link.ld" -o "$work/$name" "$work/$name.o"
    set +e
    case $name in
    virtio)
        # No VGA and no default NIC (the pc machine's e1000 would sit at
        # 00:03.0); the virtio devices at the slots Nyx gives them.
        rm -f "$work/disk.img" "$work/console.out"
        sh "$here/virtio-disk.sh" "$work/disk.img" || exit 1
        (cd "$work" && timeout 60 qemu-system-x86_64 -machine pc -cpu qemu64 -m 64 \
            -display none -vga none -nic none -serial stdio -no-reboot \
            -device isa-debug-exit,iobase=0xf4,iosize=0x04 \
            -kernel "$name" -append "$append" \
            -drive if=none,id=d0,file=disk.img,format=raw,discard=unmap \
            -device virtio-blk-pci,disable-legacy=on,addr=0x3,drive=d0,serial=nyx-disk0 \
            -device virtio-rng-pci,disable-legacy=on,addr=0x4 \
            -device virtio-serial-pci,disable-legacy=on,addr=0x5 \
            -device virtconsole,chardev=vc0 \
            -chardev file,id=vc0,path=console.out) <"$input" >"$here/$name.out"
        got=$?
        ;;
    conecho)
        # The console's input and output are QEMU's stdin and stdout.
        rm -f "$work/serial.out"
        (cd "$work" && timeout 60 qemu-system-x86_64 -machine pc -cpu qemu64 -m 64 \
            -display none -vga none -nic none -monitor none -no-reboot \
            -serial file:serial.out \
            -device isa-debug-exit,iobase=0xf4,iosize=0x04 \
            -kernel "$name" -append "$append" \
            -device virtio-serial-pci,disable-legacy=on,addr=0x3 \
            -device virtconsole,chardev=vc0 -chardev stdio,id=vc0) <"$input" >"$here/$name.console"
        got=$?
        cp "$work/serial.out" "$here/$name.out"
        ;;
    blk*)
        # Only virtio-blk, at the slot Nyx gives the first --disk.
        rm -f "$work/disk.img"
        sh "$here/blkbench-disk.sh" "$work/disk.img" || exit 1
        (cd "$work" && timeout 60 qemu-system-x86_64 -machine pc -cpu qemu64 -m 64 \
            -display none -vga none -nic none -serial stdio -no-reboot \
            -device isa-debug-exit,iobase=0xf4,iosize=0x04 \
            -kernel "$name" -append "$append" \
            -drive if=none,id=d0,file=disk.img,format=raw \
            -device virtio-blk-pci,disable-legacy=on,addr=0x3,drive=d0) <"$input" >"$here/$name.out"
        got=$?
        ;;
    netping)
        # A link that delivers nothing: a stream server nobody connects to.
        rm -f "$work/net.sock"
        (cd "$work" && timeout 60 qemu-system-x86_64 -machine pc -cpu qemu64 -m 64 \
            -display none -vga none -nic none -serial stdio -no-reboot \
            -device isa-debug-exit,iobase=0xf4,iosize=0x04 \
            -kernel "$name" -append "$append" \
            -netdev stream,id=n0,server=on,addr.type=unix,addr.path=net.sock \
            -device virtio-net-pci,disable-legacy=on,addr=0x3,netdev=n0,mac=52:54:00:12:34:56) \
            <"$input" >"$here/$name.out"
        got=$?
        ;;
    smp | smpwork)
        # Four CPUs, APIC IDs 0..3.
        (cd "$work" && timeout 60 qemu-system-x86_64 -machine pc -cpu qemu64 -m 64 \
            -smp 4 -display none -serial stdio -no-reboot \
            -device isa-debug-exit,iobase=0xf4,iosize=0x04 \
            -kernel "$name" -append "$append") <"$input" >"$here/$name.out"
        got=$?
        ;;
    *)
        (cd "$work" && timeout 60 qemu-system-x86_64 -machine pc -cpu qemu64 -m 64 \
            -display none -serial stdio -no-reboot \
            -device isa-debug-exit,iobase=0xf4,iosize=0x04 \
            -kernel "$name" -append "$append") <"$input" >"$here/$name.out"
        got=$?
        ;;
    esac
    set -e
    if [ "$name" = virtio ]; then
        cp "$work/console.out" "$here/virtio.console"
        sha=$(sha256sum "$work/disk.img" | cut -d' ' -f1)
        old=$(cat "$here/virtio.img.sha256" 2>/dev/null || true)
        if [ "$sha" != "$old" ]; then
            echo "virtio: disk image after the run changed: $sha (was ${old:-none})"
        fi
        echo "$sha" >"$here/virtio.img.sha256"
    fi
    if [ "$name" = blkwrite ]; then
        sha=$(sha256sum "$work/disk.img" | cut -d' ' -f1)
        old=$(cat "$here/blkwrite.img.sha256" 2>/dev/null || true)
        if [ "$sha" != "$old" ]; then
            echo "blkwrite: disk image after the run changed: $sha (was ${old:-none})"
        fi
        echo "$sha" >"$here/blkwrite.img.sha256"
    fi
    if [ "$name" = netping ]; then
        sh "$here/netping-pair.sh" "$work/netping" || status=1
    fi
    if [ "$got" = "$want" ]; then
        echo "$name: exit status $got"
    else
        echo "$name: exit status $got, expected $want" >&2
        status=1
    fi
done
exit $status
