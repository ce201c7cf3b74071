/*
 * apiccounter: the counter guest on the local APIC timer. Long mode, 8259
 * masked, the local APIC timer periodic at 1 kHz (divide by 16 of Nyx's and
 * QEMU's 1 GHz APIC bus: 62500 counts), each tick acknowledged with an EOI
 * at the local APIC (an MMIO write). The main loop only increments the
 * 64-bit `counter` (registers identical in every iteration), so every tick
 * lands in it; the handler stores `counter` into `samples`. After
 * COUNTER_TICKS ticks it prints the samples in hex and exits with
 * APICCOUNTER_EXIT. Timing-dependent: no golden; a replay must print what
 * the recording printed.
 */
#include "common.h"
#include "apic.h"

#define APICCOUNTER_EXIT 0x57
#define TIMER_VECTOR 0x30
#define TIMER_DIVIDE_16 0x3
#define TIMER_COUNT 62500
#define COUNTER_TICKS 50

    MULTIBOOT_HEADER
    START32
    MAP_MMIO_GIB3
    LONGMODE_SWITCH long_entry

    .code64
long_entry:
    ENTER64
    call idt_init64
    mov $TIMER_VECTOR, %edi
    lea timer_irq(%rip), %rax
    call set_gate64
    MASK_8259
    LAPIC_ENABLE
    LAPIC_WRITE LAPIC_TIMER_DIVIDE, TIMER_DIVIDE_16
    LAPIC_WRITE LAPIC_LVT_TIMER, (LVT_PERIODIC | TIMER_VECTOR)
    LAPIC_WRITE LAPIC_TIMER_INITIAL, TIMER_COUNT
    PRINT64 "apiccounter: counting\n"
    sti
    .globl count_loop
count_loop:
    incq counter(%rip)
    jmp count_loop

    .globl timer_irq
timer_irq:
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
1:  LAPIC_EOI_WRITE
    pop %rdx
    pop %rcx
    pop %rax
    iretq

/* Runs with interrupts off (inside the handler) and does not return. */
print_samples:
    LAPIC_WRITE LAPIC_LVT_TIMER, (LVT_MASKED | TIMER_VECTOR)
    xor %ecx, %ecx
    lea samples(%rip), %rdx
2:  mov (%rdx,%rcx,8), %rax
    call puthex64
    PRINT64 "\n"
    inc %ecx
    cmp $COUNTER_TICKS, %ecx
    jb 2b
    EXIT APICCOUNTER_EXIT

    .section .data
    .balign 8
    .globl counter, samples, ticks
counter: .quad 0
samples: .skip 8 * COUNTER_TICKS
ticks: .long 0

    LIB32
    LIB64
    APIC_LIB64
    COMMON_DATA
    APIC_DATA
