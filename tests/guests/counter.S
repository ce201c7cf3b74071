/*
 * counter: long mode, PIT at 1 kHz. The main loop only increments the 64-bit
 * `counter` (`incq counter(%rip); jmp`: the registers are identical in every
 * iteration); the IRQ0 handler stores `counter` into `samples` at each tick.
 * After COUNTER_TICKS ticks it prints the samples in hex and exits with
 * COUNTER_EXIT. The values depend on timing: there is no golden output; a
 * replay must reproduce the recorded ones.
 */
#include "common.h"

/* Debug-exit value of this guest (QEMU exit code 0x89). */
#define COUNTER_EXIT 0x44
#define COUNTER_TICKS 50

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
    PRINT64 "counter: counting\n"
    sti
    .globl count_loop
count_loop:
    incq counter(%rip)
    jmp count_loop

    .globl irq0
irq0:
    push %rax
    push %rcx
    push %rdx
    mov ticks(%rip), %ecx
    cmp $COUNTER_TICKS, %ecx
    jae 1f
    mov counter(%rip), %rax
    lea samples(%rip), %rdx
    mov %rax, (%rdx,%rcx,8)
    inc %ecx
    mov %ecx, ticks(%rip)
    cmp $COUNTER_TICKS, %ecx
    jae print_samples
1:  EOI_MASTER
    pop %rdx
    pop %rcx
    pop %rax
    iretq

/* Runs with interrupts off (inside the handler) and does not return. */
print_samples:
    xor %ecx, %ecx
    lea samples(%rip), %rdx
2:  mov (%rdx,%rcx,8), %rax
    call puthex64
    PRINT64 "\n"
    inc %ecx
    cmp $COUNTER_TICKS, %ecx
    jb 2b
    EXIT COUNTER_EXIT

    .section .data
    .balign 8
    .globl counter, samples, ticks
    .type counter, @object
    .size counter, 8
counter: .quad 0
samples: .skip 8 * COUNTER_TICKS
ticks: .long 0

    LIB32
    LIB64
    COMMON_DATA
