/*
 * ticks: echo with a timer. Long mode, PIT channel 0 at 1 kHz counting
 * ticks (IRQ0, vector 0x20) and COM1 receive interrupts (IRQ4, vector
 * 0x24). It idles in HLT between bytes; each byte received is echoed
 * upper-cased, and at a '.' it stops reading, prints "ticks=N" (the ticks
 * counted since it started) and "bye", and exits with TICKS_EXIT. N depends
 * on how much time passed: on the host's timing under the host clock, on
 * nothing but the guest's own exits under the check clock.
 */
#include "common.h"

/* Debug-exit value of this guest (QEMU exit code 0x69). */
#define TICKS_EXIT 0x34

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
    mov $0x24, %edi
    lea irq4(%rip), %rax
    call set_gate64
    PIC_REMAP 0xEE, 0xFF
    PIT_RATE PIT_DIVISOR_1KHZ
    mov $(COM1 + 4), %dx
    mov $0x0B, %al      /* MCR: DTR, RTS, OUT2 (IRQ enable) */
    out %al, %dx
    mov $(COM1 + 1), %dx
    mov $0x01, %al      /* IER: received data available */
    out %al, %dx
    PRINT64 "ticks: type, end with '.'\n"
    .globl wait_input
wait_input:
    cli
    cmpb $0, saw_dot(%rip)
    jne 1f
    sti
    hlt
    jmp wait_input
1:  PRINT64 "\nticks="
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

    .globl irq4
irq4:
    push %rax
    push %rdx
    cmpb $0, saw_dot(%rip)  /* an interrupt latched before IER was cleared */
    jne 3f
1:  mov $(COM1 + 5), %dx
    in %dx, %al
    test $0x01, %al     /* LSR.DR */
    jz 3f
    mov $COM1, %dx
    in %dx, %al
    cmp $'.', %al
    jne 2f
    call putc64
    movb $1, saw_dot(%rip)
    mov $(COM1 + 1), %dx
    xor %al, %al        /* IER: no more interrupts, leave the rest unread */
    out %al, %dx
    jmp 3f
2:  cmp $'a', %al
    jb 4f
    cmp $'z', %al
    ja 4f
    sub $('a' - 'A'), %al
4:  call putc64
    jmp 1b
3:  EOI_MASTER
    pop %rdx
    pop %rax
    iretq

    .section .data
saw_dot: .byte 0
    .globl ticks
ticks: .long 0

    LIB32
    LIB64
    COMMON_DATA
