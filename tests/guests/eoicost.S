/*
 * eoicost: what the interrupt controllers' exits cost, measured by the
 * guest with RDTSC (a benchmark guest: timing-dependent output, no golden).
 * Long mode, 8259 pair masked, local APIC enabled, interrupts off except in
 * the last phase. Each phase repeats one access ROUNDS times and prints
 * "NAME CYCLES" with the TSC cycles per repetition:
 *   port80     `out` to the POST port (the cheapest port exit)
 *   pic-eoi    a non-specific EOI to the master 8259 (`out` to 0x20)
 *   lapic-eoi  a write to the local APIC's EOI register (an MMIO exit)
 *   lapic-ipi  a fixed self-IPI through the ICR, taken by a handler that
 *              ends with a local APIC EOI: an interrupt's whole round trip
 * Exits with EOICOST_EXIT.
 */
#include "common.h"
#include "apic.h"

#define EOICOST_EXIT 0x58
#define ROUNDS 2000
#define IPI_VECTOR 0x40
#define ICR_FIXED_SELF (0x40000 | IPI_VECTOR)

    MULTIBOOT_HEADER
    START32
    MAP_MMIO_GIB3
    LONGMODE_SWITCH long_entry

    .code64
long_entry:
    ENTER64
    call idt_init64
    mov $IPI_VECTOR, %edi
    lea ipi_irq(%rip), %rax
    call set_gate64
    MASK_8259
    LAPIC_ENABLE

    PRINT64 "port80 "
    call tsc_start
    mov $ROUNDS, %ecx
1:  out %al, $0x80
    dec %ecx
    jnz 1b
    call tsc_report

    PRINT64 "pic-eoi "
    call tsc_start
    mov $ROUNDS, %ecx
    mov $0x20, %al
2:  out %al, $0x20
    dec %ecx
    jnz 2b
    call tsc_report

    PRINT64 "lapic-eoi "
    call tsc_start
    mov $ROUNDS, %ecx
    mov $LAPIC_BASE, %ebx
3:  movl $0, LAPIC_EOI(%rbx)
    dec %ecx
    jnz 3b
    call tsc_report

    PRINT64 "lapic-ipi "
    call tsc_start
    mov $ROUNDS, %ecx
    mov $LAPIC_BASE, %ebx
4:  movl $0, ipi_seen(%rip)
    movl $ICR_FIXED_SELF, LAPIC_ICR_LOW(%rbx)
    sti
5:  cmpl $0, ipi_seen(%rip)
    je 5b
    cli
    dec %ecx
    jnz 4b
    call tsc_report
    EXIT EOICOST_EXIT

/* Saves the TSC in %r12. */
tsc_start:
    rdtsc
    shl $32, %rdx
    or %rdx, %rax
    mov %rax, %r12
    ret

/* Prints (TSC - %r12) / ROUNDS in decimal and a newline. */
tsc_report:
    rdtsc
    shl $32, %rdx
    or %rdx, %rax
    sub %r12, %rax
    xor %edx, %edx
    mov $ROUNDS, %ecx
    div %rcx
    call putdec64
    PRINT64 "\n"
    ret

ipi_irq:
    movl $1, ipi_seen(%rip)
    push %rbx
    mov $LAPIC_BASE, %ebx
    movl $0, LAPIC_EOI(%rbx)
    pop %rbx
    iretq

    .section .data
ipi_seen: .long 0

    LIB32
    LIB64
    APIC_LIB64
    COMMON_DATA
    APIC_DATA
