/*
 * ticks: echo that idles with a timer between bytes. Long mode, PIT channel
 * 0 at 1 kHz counting ticks (IRQ0, vector 0x20), COM1 polled without
 * interrupts: every TICKS_STEP ticks (idling in HLT meanwhile) it reads one
 * byte if there is one and echoes it upper-cased; at a '.' it prints
 * "ticks=N" (the ticks counted since it started) and "bye" and exits with
 * TICKS_EXIT. N depends on how much time passed: on the host's timing under
 * the host clock, on nothing but the guest's own exits under the check
 * clock.
 */
#include "common.h"

/* Debug-exit value of this guest (QEMU exit code 0x69). */
#define TICKS_EXIT 0x34
#define TICKS_STEP 10

    MULTIBOOT_HEADER
    START32
    LONGMODE_SWITCH long_entry

    .code64
long_entry:
    ENTER64
    call idt_init64
    mov $0x20, %edi
    lea irq0(%rip), %rax
    call set_gate64
    PIC_REMAP 0xFE, 0xFF
    PIT_RATE PIT_DIVISOR_1KHZ
    PRINT64 "ticks: type, end with '.'\n"
    movl $TICKS_STEP, next_read(%rip)
    .globl wait_tick
wait_tick:
    cli
    mov ticks(%rip), %eax
    cmp next_read(%rip), %eax
    jae 1f
    sti
    hlt
    jmp wait_tick
1:  sti
    addl $TICKS_STEP, next_read(%rip)
    mov $(COM1 + 5), %dx
    in %dx, %al
    test $0x01, %al     /* LSR.DR */
    jz wait_tick
    mov $COM1, %dx
    in %dx, %al
    cmp $'.', %al
    je 3f
    cmp $'a', %al
    jb 2f
    cmp $'z', %al
    ja 2f
    sub $('a' - 'A'), %al
2:  call putc64
    jmp wait_tick
3:  call putc64
    PRINT64 "\nticks="
    mov ticks(%rip), %eax
    call putdec64
    PRINT64 "\nbye\n"
    EXIT TICKS_EXIT

    .globl irq0
irq0:
    push %rax
    incl ticks(%rip)
    EOI_MASTER
    pop %rax
    iretq

    .section .data
next_read: .long 0
    .globl ticks
ticks: .long 0

    LIB32
    LIB64
    COMMON_DATA
