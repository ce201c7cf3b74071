/*
 * blknop: the baseline of the virtio-blk benchmark guests (blkbench.h):
 * the same boot, PCI scan and virtio-blk set-up as blkseq, blkrand and
 * blkwrite, then no request at all. Subtracting its run time from theirs
 * leaves the cost of their requests. Prints "blknop: 0 requests, ..." and
 * exits with BLKNOP_EXIT. Needs virtio-blk at 00:03.0 (any capacity).
 */
#include "common.h"
#include "apic.h"
#include "virtio.h"
#include "blkbench.h"

/* Debug-exit value of this guest (QEMU exit code 0xb5). */
#define BLKNOP_EXIT 0x5a

    MULTIBOOT_HEADER
    START32
    MAP_MMIO_GIB3
    LONGMODE_SWITCH long_entry

    .code64
long_entry:
    ENTER64
    BLK_BENCH_START
    PRINT64 "blknop"
    call bench_report
    EXIT BLKNOP_EXIT

    LIB32
    LIB64
    APIC_LIB64
    VIRTIO_LIB64
    BLK_BENCH_LIB64
    COMMON_DATA
    APIC_DATA
    VIRTIO_DATA
    BLK_BENCH_DATA
