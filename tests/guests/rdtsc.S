/*
 * rdtsc: long mode, RDTSC_READS reads of the time-stamp counter folded into a
 * 64-bit FNV-1a hash (each value as 8 little-endian bytes), printed in hex
 * with a monotonicity check; exits with RDTSC_EXIT. Timing-dependent: no
 * golden output; a replay must print the recorded hash.
 */
#include "common.h"

/* Debug-exit value of this guest (QEMU exit code 0x8b). */
#define RDTSC_EXIT 0x45
#define RDTSC_READS 1000

    MULTIBOOT_HEADER
    START32
    LONGMODE_SWITCH long_entry

    .code64
long_entry:
    ENTER64
    mov $RDTSC_READS, %ecx
    movabs $0xcbf29ce484222325, %r8     /* FNV-1a offset basis */
    movabs $0x100000001b3, %r9          /* FNV-1a prime */
    xor %r11d, %r11d                    /* previous value */
    xor %ebx, %ebx                      /* times it went backwards */
    .globl read_tsc
read_tsc:
    rdtsc
    shl $32, %rdx
    or %rdx, %rax
    cmp %r11, %rax
    jae 1f
    inc %ebx
1:  mov %rax, %r11
    mov $8, %esi
2:  movzbl %al, %r10d
    xor %r10, %r8
    imul %r9, %r8
    shr $8, %rax
    dec %esi
    jnz 2b
    dec %ecx
    jnz read_tsc

    PRINT64 "rdtsc: "
    mov $RDTSC_READS, %eax
    call putdec64
    PRINT64 " reads, fnv1a64 0x"
    mov %r8, %rax
    call puthex64
    PRINT64 "\n"
    test %ebx, %ebx
    jnz 3f
    PRINT64 "rdtsc monotonic\n"
    EXIT RDTSC_EXIT
3:  PRINT64 "rdtsc went backwards\n"
    EXIT EXIT_UNEXPECTED

    LIB32
    LIB64
    COMMON_DATA
