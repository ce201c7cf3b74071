/*
 * blkwrite: a virtio-blk benchmark guest (blkbench.h): BLKWRITE_WRITES
 * random 4 KiB writes, the sector of each picked by the LCG (aligned to 8
 * sectors, inside the capacity), then one flush; one request at a time,
 * each completed by its MSI-X interrupt. The data written: 128 text lines
 * "blkwrite: data of a 4 KiB write\n" with the first three 64-bit words
 * replaced by the sector, the write's index (from 0) and their sum
 * (little-endian). Prints "blkwrite: R requests, B bytes, I interrupts,
 * fnv1a64 0xHASH" (R counts the flush) and exits with BLKWRITE_EXIT. The
 * image afterwards depends only on the image before. Needs virtio-blk at
 * 00:03.0 with at least 8 sectors, writable, with FLUSH.
 */
#include "common.h"
#include "apic.h"
#include "virtio.h"
#include "blkbench.h"

/* Debug-exit value of this guest (QEMU exit code 0xbb). */
#define BLKWRITE_EXIT 0x5d
#define BLKWRITE_WRITES 1024

    MULTIBOOT_HEADER
    START32
    MAP_MMIO_GIB3
    LONGMODE_SWITCH long_entry

    .code64
long_entry:
    ENTER64
    BLK_BENCH_START
    btq $9, DEV_FEATURES(%rbx)  /* FLUSH */
    jc 1f
    DEV_FAIL "flush not negotiated"
1:  mov $BLK_T_OUT, %r8d
    lea write_buf(%rip), %r10
    mov $BENCH_IO_LEN, %r11d
    xor %r12d, %r12d            /* device-readable */
    xor %r14d, %r14d            /* the write's index */
2:  call bench_random_sector
    mov %r9, 0(%r10)
    mov %r14, 8(%r10)
    lea (%r9,%r14), %rax
    mov %rax, 16(%r10)
    call bench_request
    inc %r14d
    cmp $BLKWRITE_WRITES, %r14d
    jb 2b
    mov $BLK_T_FLUSH, %r8d
    xor %r9d, %r9d
    xor %r11d, %r11d
    call bench_request
    PRINT64 "blkwrite"
    call bench_report
    EXIT BLKWRITE_EXIT

    .section .data
    .balign 4096
write_buf:
    .rept BENCH_IO_LEN / 32
    .ascii "blkwrite: data of a 4 KiB write\n"
    .endr

    LIB32
    LIB64
    APIC_LIB64
    VIRTIO_LIB64
    BLK_BENCH_LIB64
    COMMON_DATA
    APIC_DATA
    VIRTIO_DATA
    BLK_BENCH_DATA
