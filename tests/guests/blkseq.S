/*
 * blkseq: a virtio-blk benchmark guest (blkbench.h): reads the whole disk
 * from sector 0 to the capacity in 64 KiB requests (the last one shorter
 * if the capacity is not a multiple of 128 sectors), one at a time, each
 * completed by its MSI-X interrupt. Prints "blkseq: R requests, B bytes,
 * I interrupts, fnv1a64 0xHASH" and exits with BLKSEQ_EXIT. Needs
 * virtio-blk at 00:03.0.
 */
#include "common.h"
#include "apic.h"
#include "virtio.h"
#include "blkbench.h"

/* Debug-exit value of this guest (QEMU exit code 0xb7). */
#define BLKSEQ_EXIT 0x5b

    MULTIBOOT_HEADER
    START32
    MAP_MMIO_GIB3
    LONGMODE_SWITCH long_entry

    .code64
long_entry:
    ENTER64
    BLK_BENCH_START
    mov $BLK_T_IN, %r8d
    xor %r9d, %r9d              /* the sector */
    lea bench_buf(%rip), %r10
    mov $DESC_F_WRITE, %r12d
1:  mov blk_capacity(%rip), %rax
    sub %r9, %rax               /* sectors left */
    jbe 2f
    mov $BENCH_BUF_SECTORS, %ecx
    cmp %rcx, %rax
    cmova %rcx, %rax
    mov %eax, %r11d
    shl $9, %r11d               /* bytes */
    call bench_request
    add %rax, %r9
    jmp 1b
2:  PRINT64 "blkseq"
    call bench_report
    EXIT BLKSEQ_EXIT

    LIB32
    LIB64
    APIC_LIB64
    VIRTIO_LIB64
    BLK_BENCH_LIB64
    COMMON_DATA
    APIC_DATA
    VIRTIO_DATA
    BLK_BENCH_DATA
