/*
 * blkrand: a virtio-blk benchmark guest (blkbench.h): BLKRAND_READS random
 * 4 KiB reads, the sector of each picked by the LCG (aligned to 8
 * sectors, inside the capacity), one at a time, each completed by its
 * MSI-X interrupt. Prints "blkrand: R requests, B bytes, I interrupts,
 * fnv1a64 0xHASH" and exits with BLKRAND_EXIT. Needs virtio-blk at
 * 00:03.0 with at least 8 sectors.
 */
#include "common.h"
#include "apic.h"
#include "virtio.h"
#include "blkbench.h"

/* Debug-exit value of this guest (QEMU exit code 0xb9). */
#define BLKRAND_EXIT 0x5c
#define BLKRAND_READS 4096

    MULTIBOOT_HEADER
    START32
    MAP_MMIO_GIB3
    LONGMODE_SWITCH long_entry

    .code64
long_entry:
    ENTER64
    BLK_BENCH_START
    mov $BLK_T_IN, %r8d
    lea bench_buf(%rip), %r10
    mov $BENCH_IO_LEN, %r11d
    mov $DESC_F_WRITE, %r12d
    mov $BLKRAND_READS, %r14d
1:  call bench_random_sector
    call bench_request
    dec %r14d
    jnz 1b
    PRINT64 "blkrand"
    call bench_report
    EXIT BLKRAND_EXIT

    LIB32
    LIB64
    APIC_LIB64
    VIRTIO_LIB64
    BLK_BENCH_LIB64
    COMMON_DATA
    APIC_DATA
    VIRTIO_DATA
    BLK_BENCH_DATA
