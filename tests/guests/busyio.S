/*
 * busyio: waits for 20 PIT ticks (1 kHz) in a loop that writes port 0x80
 * with interrupts on, never halting: every iteration is an exit, far more
 * often than a timer period. The timer interrupts must still come (a
 * recorder that postponed its kick at every exit starved this loop).
 * Prints "busyio: 20 ticks" and exits with BUSYIO_EXIT.
 */
#include "common.h"

/* Debug-exit value of this guest (QEMU exit code 0x93). */
#define BUSYIO_EXIT 0x49
#define TICKS_TOTAL 20

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
    PRINT64 "busyio: writing port 0x80\n"
    sti
    .globl poll_loop
poll_loop:
    out %al, $0x80
    cmpl $TICKS_TOTAL, ticks(%rip)
    jb poll_loop
    cli
    PRINT64 "busyio: 20 ticks\n"
    EXIT BUSYIO_EXIT

    .globl irq0
irq0:
    push %rax
    incl ticks(%rip)
    EOI_MASTER
    pop %rax
    iretq

    .section .data
    .globl ticks
ticks: .long 0

    LIB32
    LIB64
    COMMON_DATA
