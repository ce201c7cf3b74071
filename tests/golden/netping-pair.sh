#!/bin/sh
# Records the golden serial outputs of two netping guests on one link (see
# README.md): netping-a.out (MAC 52:54:00:12:34:56) and netping-b.out
# (52:54:00:12:34:57). Usage: netping-pair.sh [KERNEL] — KERNEL is a built
# netping (regen.sh passes its own); without it the guest is assembled
# here with the flags of tests/guests/build.rs. Needs qemu-system-x86_64
# (7.2: the stream netdev); with KERNEL absent also gcc (or $CC) and GNU
# binutils.
#
# Two QEMU instances of the same ELF, each with a virtio-net alone at
# 00:03.0, are joined by a stream netdev over a Unix socket: a is the
# server, b connects once the socket is there. Both must exit with
# NETPING_EXIT (QEMU exit status 195).
set -eu
here=$(cd "$(dirname "$0")" && pwd)
guests="$here/../guests"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cc=${CC:-cc}
append="nyx-test arg=1"
want=195

if [ $# -gt 0 ]; then
    cp "$1" "$work/netping"
else
    "$cc" -m32 -c -g -nostdinc -Wa,--noexecstack -I "$guests" \
        -o "$work/netping.o" "$guests/netping.S"
    ld -m elf_i386 -nostdlib --build-id=none -z max-page-size=0x1000 \
        -z noexecstack -T "$guests/link.ld" -o "$work/netping" "$work/netping.o"
fi

# run SIDE MAC SERVER: one instance, COM1 to SIDE.serial, its exit status
# to SIDE.status.
run() {
    (cd "$work" && set +e && timeout 60 qemu-system-x86_64 -machine pc -cpu qemu64 -m 64 \
        -display none -vga none -nic none -monitor none -no-reboot \
        -serial "file:$1.serial" \
        -device isa-debug-exit,iobase=0xf4,iosize=0x04 \
        -kernel netping -append "$append" \
        -netdev "stream,id=n0,server=$3,addr.type=unix,addr.path=net.sock" \
        -device "virtio-net-pci,disable-legacy=on,addr=0x3,netdev=n0,mac=$2" \
        </dev/null; echo $? >"$1.status")
}

run a 52:54:00:12:34:56 on &
a=$!
# b connects only to a listening socket: wait (up to 10 s) for a's.
i=0
while [ ! -S "$work/net.sock" ]; do
    i=$((i + 1))
    if [ $i -gt 100 ]; then
        echo "netping-pair: the server's socket did not appear" >&2
        wait $a || true
        exit 1
    fi
    sleep 0.1
done
run b 52:54:00:12:34:57 off &
b=$!
wait $a || true
wait $b || true

status=0
for side in a b; do
    cp "$work/$side.serial" "$here/netping-$side.out"
    got=$(cat "$work/$side.status")
    if [ "$got" = "$want" ]; then
        echo "netping-$side: exit status $got"
    else
        echo "netping-$side: exit status $got, expected $want" >&2
        status=1
    fi
done
exit $status
