/*
 * The shared part of the virtio-blk benchmark guests (blknop, blkseq,
 * blkrand, blkwrite): the driver of virtio.h set up for virtio-blk alone,
 * requests that must succeed, an LCG that picks 4 KiB-aligned sectors, and
 * the line each guest prints at the end. Include it after virtio.h; expand
 * BLK_BENCH_START first thing in long mode, BLK_BENCH_LIB64 and
 * BLK_BENCH_DATA once.
 *
 * One request is in flight at a time and each waits for its MSI-X
 * interrupt (virtio.h's vq_submit). The guests print the driver's set-up
 * lines, then one line:
 *
 *   NAME: R requests, B bytes, I interrupts, fnv1a64 0xHASH
 *
 * R counts every request (reads, writes, the flush), B the bytes of data
 * they moved, I virtio-blk's interrupts (one per request). HASH is FNV-1a
 * 64 over 64-bit words: of every request with data, the word at offset 8
 * and the last word of its buffer, in request order. A sample, not all of
 * the data: on an emulated KVM (guest code interpreted at a few million
 * instructions per second) hashing every byte would cost far more than the
 * I/O being measured. With the benchmark image of
 * tools/scripts/bench-virtio-blk.sh (text lines "sector SSSSSS line LL
 * @BBBBBBBB\n") the word at offset 8 holds the digits of the first sector
 * and the last word those of the last line's offset, so a request that
 * read the wrong place or a short buffer changes the hash.
 */

/* The read buffer: 64 KiB, 128 sectors. */
#define BENCH_BUF_LEN 65536
#define BENCH_BUF_SECTORS (BENCH_BUF_LEN / SECTOR_SIZE)
/* 4 KiB requests: 8 sectors, aligned to 8. */
#define BENCH_IO_LEN 4096
#define BENCH_IO_SECTORS (BENCH_IO_LEN / SECTOR_SIZE)
/* Knuth's MMIX LCG; the sector comes from the high half of the state. */
#define LCG_MUL 6364136223846793005
#define LCG_ADD 1442695040888963407
#define LCG_SEED 0x6e79782d626c6b00
#define FNV64_OFFSET 0xcbf29ce484222325
#define FNV64_PRIME 0x100000001b3

/* The platform, the PCI scan and virtio-blk set up (virtio.h); without a
 * virtio-blk device "virtio-blk: error: not found" and EXIT_UNEXPECTED.
 * Leaves %rbx at blk_dev. */
.macro BLK_BENCH_START
    VIRTIO_PLATFORM_INIT
    call pci_scan
    lea blk_dev(%rip), %rbx
    cmpl $0, DEV_CFG(%rbx)
    jne 9002f
    DEV_FAIL "not found"
9002:
    call blk_setup
.endm

.macro BLK_BENCH_LIB64
    .section SECTION_TEXT64
    .code64
/* A request of type %r8d at sector %r9 with the buffer %r10 of %r11d
 * bytes (none if 0), device-writable if %r12d is DESC_F_WRITE, on
 * virtio-blk (%rbx): its status must be 0. Counts it and its bytes and
 * hashes the buffer's word at offset 8 and its last word. */
bench_request:
    push %rax
    call blk_request
    cmpb $0, blk_status(%rip)
    je 1f
    DEV_FAIL "request failed"
1:  incq bench_requests(%rip)
    test %r11d, %r11d
    jz 2f
    mov %r11d, %eax
    add %rax, bench_bytes(%rip)
    mov 8(%r10), %rax
    call bench_hash
    mov -8(%r10,%r11), %rax
    call bench_hash
2:  pop %rax
    ret

/* Hashes the word %rax into bench_fnv (FNV-1a over 64-bit words). */
bench_hash:
    push %rax
    push %rdx
    xor bench_fnv(%rip), %rax
    mov $FNV64_PRIME, %rdx
    imul %rdx, %rax
    mov %rax, bench_fnv(%rip)
    pop %rdx
    pop %rax
    ret

/* %r9 = the next sector of the LCG: a multiple of BENCH_IO_SECTORS with
 * the request inside the capacity. */
bench_random_sector:
    push %rax
    push %rcx
    push %rdx
    mov blk_capacity(%rip), %rcx
    shr $3, %rcx                /* 4 KiB blocks (BENCH_IO_SECTORS) */
    jnz 1f
    DEV_FAIL "capacity below 8 sectors"
1:  mov bench_lcg(%rip), %rax
    mov $LCG_MUL, %rdx
    imul %rdx, %rax
    mov $LCG_ADD, %rdx
    add %rdx, %rax
    mov %rax, bench_lcg(%rip)
    shr $32, %rax
    xor %edx, %edx
    div %rcx
    lea 0(,%rdx,8), %r9         /* BENCH_IO_SECTORS */
    pop %rdx
    pop %rcx
    pop %rax
    ret

/* Prints ": R requests, B bytes, I interrupts, fnv1a64 0xHASH\n" (after
 * the guest's name). */
bench_report:
    push %rax
    PRINT64 ": "
    mov bench_requests(%rip), %rax
    call putdec64
    PRINT64 " requests, "
    mov bench_bytes(%rip), %rax
    call putdec64
    PRINT64 " bytes, "
    mov blk_dev + DEV_IRQS(%rip), %eax
    call putdec64
    PRINT64 " interrupts, fnv1a64 0x"
    mov bench_fnv(%rip), %rax
    PUTHEX 16
    PRINT64 "\n"
    pop %rax
    ret
.endm

.macro BLK_BENCH_DATA
    .section .rodata
    .balign 4
virtio_drivers:
    .long VIRTIO_ID_BLK, blk_dev
    .long 0, 0

    .section .data
    .balign 8
bench_requests: .quad 0
bench_bytes: .quad 0
bench_fnv: .quad FNV64_OFFSET
bench_lcg: .quad LCG_SEED

    .section .bss
    .balign 4096
bench_buf: .skip BENCH_BUF_LEN
.endm
