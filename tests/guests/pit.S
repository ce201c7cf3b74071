/*
 * pit: switches to long mode, programs the PIC and PIT channel 0 (mode 2,
 * 1 kHz), idles with `sti; hlt` while the IRQ0 handler counts ticks, prints
 * "tick N" every 10 ticks up to 50, then latches the PIT counter and checks
 * that it lies in the reload range 1..PIT_DIVISOR_1KHZ. Exits with PIT_EXIT.
 */
#include "common.h"

/* Debug-exit value of this guest (QEMU exit code 0x23). */
#define PIT_EXIT 0x11
#define TICKS_TOTAL 50
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
    PRINT64 "pit: mode 2 at 1 kHz\n"
    movl $TICKS_STEP, next_print(%rip)
    .globl wait_tick
wait_tick:
    cli
    mov ticks(%rip), %eax
    cmp next_print(%rip), %eax
    jae 1f
    sti
    hlt
    jmp wait_tick
1:  sti
    PRINT64 "tick "
    mov next_print(%rip), %eax
    call putdec64
    PRINT64 "\n"
    addl $TICKS_STEP, next_print(%rip)
    cmpl $TICKS_TOTAL, next_print(%rip)
    jbe wait_tick

    cli
    xor %al, %al
    out %al, $0x43      /* latch channel 0 */
    in $0x40, %al
    mov %al, %cl
    in $0x40, %al
    mov %al, %ch
    movzwl %cx, %eax
    test %eax, %eax
    jz 2f
    cmp $PIT_DIVISOR_1KHZ, %eax
    ja 2f
    PRINT64 "latch ok\n"
    EXIT PIT_EXIT
2:  PRINT64 "latch out of range 0x"
    call puthex16_64
    PRINT64 "\n"
    EXIT EXIT_UNEXPECTED

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
next_print: .long 0

    LIB32
    LIB64
    COMMON_DATA
