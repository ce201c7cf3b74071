#!/bin/sh
# Regenerates the golden serial outputs of the deterministic Nyx test guests
# by running them under QEMU (see README.md): all of them, or those named
# as arguments. Needs gcc (or $CC), GNU
# binutils and qemu-system-x86_64. Assembles the guests with the same flags
# as tests/guests/build.rs, names each kernel file after its guest (QEMU puts
# the file name in front of the Multiboot command line) and checks QEMU's
# exit status against the expected one.
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
    lapic:161 ioapic:163 hpet:165 acpi:0 busyio:147 s3:171 pmtimer:167; do
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
    (cd "$work" && timeout 60 qemu-system-x86_64 -machine pc -cpu qemu64 -m 64 \
        -display none -serial stdio -no-reboot \
        -device isa-debug-exit,iobase=0xf4,iosize=0x04 \
        -kernel "$name" -append "$append") <"$input" >"$here/$name.out"
    got=$?
    set -e
    if [ "$got" = "$want" ]; then
        echo "$name: exit status $got"
    else
        echo "$name: exit status $got, expected $want" >&2
        status=1
    fi
done
exit $status
