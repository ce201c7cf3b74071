#!/bin/sh
# Builds the test fixture kernel: a `tinyconfig` Linux 6.1 x86-64 `vmlinux`
# from Debian's `linux-source-6.1` package, with a serial console, ELF and
# initramfs support, PCI (which Linux's ACPI needs), ACPI (power and sleep
# buttons, lid, battery, thermal zone), the HPET and the virtio 1.x PCI
# drivers (virtio-blk, virtio-rng, virtio-console; no legacy virtio), plus a
# busybox initramfs (from `busybox-static`). The result is cached in the
# directory given as the only argument; the script prints two lines, the
# path of the vmlinux and the path of the initramfs:
#   set -- $(tools/scripts/build-test-kernel.sh ~/.cache/nyx-test-kernel)
#   NYX_TEST_VMLINUX=$1 NYX_TEST_INITRD=$2 cargo test
# A rebuild happens only when this script changes (its hash names the cache
# entry). Needs root or the packages already installed: linux-source-6.1,
# busybox-static, gcc, make, bc, flex, bison, libelf-dev, cpio.
set -eu

if [ $# -ne 1 ]; then
    echo "usage: $0 CACHE_DIR" >&2
    exit 2
fi
cache=$1
script=$(readlink -f "$0")
key=$(sha256sum "$script" | cut -c1-16)
out="$cache/$key"
if [ -f "$out/vmlinux" ] && [ -f "$out/initrd.cpio.gz" ]; then
    echo "$out/vmlinux"
    echo "$out/initrd.cpio.gz"
    exit 0
fi

need=""
for p in linux-source-6.1 busybox-static gcc make bc flex bison libelf-dev cpio xz-utils; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || need="$need $p"
done
if [ -n "$need" ]; then
    if [ "$(id -u)" -ne 0 ]; then
        echo "$0: install these packages first:$need" >&2
        exit 1
    fi
    apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $need >&2
fi

tarball=$(ls /usr/src/linux-source-6.1*.tar.xz | head -n 1)
mkdir -p "$cache"
work=$(mktemp -d "$cache/build.XXXXXX")
trap 'rm -rf "$work"' EXIT
tar -C "$work" -xf "$tarball"
src=$(ls -d "$work"/linux-source-6.1*)

cd "$src"
make -s ARCH=x86_64 tinyconfig >&2
./scripts/config \
    -e 64BIT -e PRINTK -e EARLY_PRINTK -e TTY -e SERIAL_8250 -e SERIAL_8250_CONSOLE \
    -e BLK_DEV_INITRD -e RD_GZIP -e BINFMT_ELF -e BINFMT_SCRIPT -e PROC_FS -e SYSFS \
    -e DEVTMPFS -e DEVTMPFS_MOUNT \
    -e ACPI -e ACPI_BUTTON -e ACPI_AC -e ACPI_BATTERY -e ACPI_THERMAL -e THERMAL \
    -e PCI -e HPET_TIMER -e HPET -e X86_LOCAL_APIC -e X86_IO_APIC \
    -e BLOCK -e BLK_DEV -e VIRTIO_MENU -e VIRTIO -e VIRTIO_PCI -d VIRTIO_PCI_LEGACY \
    -e VIRTIO_BLK -e HW_RANDOM -e HW_RANDOM_VIRTIO -e VIRTIO_CONSOLE \
    -d RANDOMIZE_BASE >&2
make -s ARCH=x86_64 olddefconfig >&2
make -s ARCH=x86_64 -j"$(nproc)" vmlinux >&2

# A busybox initramfs whose /init prints a line and powers off.
root="$work/initramfs"
mkdir -p "$root/bin" "$root/dev" "$root/proc" "$root/sys"
cp /bin/busybox "$root/bin/busybox"
ln -s busybox "$root/bin/sh"
cat > "$root/init" <<'INIT'
#!/bin/sh
/bin/busybox mount -t proc proc /proc
echo "nyx-test-kernel: userland reached"
/bin/busybox poweroff -f
INIT
chmod 755 "$root/init"
(cd "$root" && find . | cpio -o -H newc --quiet | gzip -9n) > "$work/initrd.cpio.gz"

mkdir -p "$out"
cp vmlinux "$out/vmlinux"
cp .config "$out/config"
cp "$work/initrd.cpio.gz" "$out/initrd.cpio.gz"
echo "$out/vmlinux"
echo "$out/initrd.cpio.gz"
