/*
 * rtc: waits for the CMOS RTC's update-in-progress flag to clear, prints the
 * date and time it reads, then latches PIT channel 0 (mode 2, free-running
 * over the full 16-bit range, its interrupt never enabled) RTC_LATCHES times
 * and folds the counts into a 64-bit FNV-1a hash, printed in hex. Exits with
 * RTC_EXIT. Timing-dependent: no golden output.
 */
#include "common.h"

/* Debug-exit value of this guest (QEMU exit code 0x8d). */
#define RTC_EXIT 0x46
#define RTC_LATCHES 100

/* %al = CMOS register \reg */
.macro CMOS_READ reg
    mov $\reg, %al
    out %al, $0x70
    in $0x71, %al
.endm

/* Prints CMOS register \reg as two digits (BCD or binary per status B). */
.macro PRINT_RTC reg
    CMOS_READ \reg
    call put_rtc_field
.endm

    MULTIBOOT_HEADER
    START32
    LONGMODE_SWITCH long_entry

    .code64
long_entry:
    ENTER64
    .globl wait_uip
wait_uip:
    CMOS_READ 0x0A
    test $0x80, %al
    jnz wait_uip
    CMOS_READ 0x0B
    mov %al, status_b(%rip)

    PRINT64 "rtc: "
    PRINT_RTC 0x32
    PRINT_RTC 0x09
    PRINT64 "-"
    PRINT_RTC 0x08
    PRINT64 "-"
    PRINT_RTC 0x07
    PRINT64 " "
    PRINT_RTC 0x04
    PRINT64 ":"
    PRINT_RTC 0x02
    PRINT64 ":"
    PRINT_RTC 0x00
    PRINT64 "\n"

    PIT_RATE 0                          /* 65536: full range */
    mov $RTC_LATCHES, %ecx
    movabs $0xcbf29ce484222325, %r8
    movabs $0x100000001b3, %r9
    .globl latch_pit
latch_pit:
    xor %al, %al
    out %al, $0x43
    in $0x40, %al
    movzbl %al, %r10d
    xor %r10, %r8
    imul %r9, %r8
    in $0x40, %al
    movzbl %al, %r10d
    xor %r10, %r8
    imul %r9, %r8
    dec %ecx
    jnz latch_pit

    PRINT64 "pit: "
    mov $RTC_LATCHES, %eax
    call putdec64
    PRINT64 " latches, fnv1a64 0x"
    mov %r8, %rax
    call puthex64
    PRINT64 "\n"
    EXIT RTC_EXIT

/* %al: a field read from the RTC, in BCD unless status B bit 2 is set. */
put_rtc_field:
    push %rax
    push %rcx
    testb $0x04, status_b(%rip)
    jnz 1f
    mov $2, %ecx
    call puthexn64
    jmp 2f
1:  movzbl %al, %eax
    mov $10, %cl
    div %cl                             /* %al = tens, %ah = ones */
    mov %ah, %cl
    add $'0', %al
    call putc64
    mov %cl, %al
    add $'0', %al
    call putc64
2:  pop %rcx
    pop %rax
    ret

    .section .data
status_b: .byte 0

    LIB32
    LIB64
    COMMON_DATA
