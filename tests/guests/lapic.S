/*
 * lapic: the local APIC in xAPIC mode, in long mode with the 8259 pair
 * masked. Prints the APIC base MSR, the APIC ID, the version register's
 * version and max LVT, and the SVR after software-enabling the APIC
 * (spurious vector 0xFF). Then: the timer periodic (divide by 16, 1 ms)
 * until 10 interrupts came ("tick 10"), a one-shot that must fire once and
 * leave the current count at 0, a fixed self-IPI through the ICR (self
 * shorthand) that must arrive, and TPR masking: with TPR 0x40 a self-IPI of
 * vector 0x41 stays in IRR (PPR 0x40) and is delivered once TPR is 0.
 * Every handler EOIs through the EOI register. Exits with LAPIC_EXIT.
 */
#include "common.h"
#include "apic.h"

/* Debug-exit value of this guest (QEMU exit code 0xa1). */
#define LAPIC_EXIT 0x50
#define PERIODIC_VECTOR 0x30
#define ONESHOT_VECTOR 0x31
#define IPI_VECTOR 0x40
#define TPR_VECTOR 0x41
/* Divide by 16 at the 1 GHz APIC bus: 62500 counts are 1 ms. */
#define TIMER_DIVIDE_16 0x3
#define TIMER_COUNT 62500
#define TICKS_TOTAL 10

    MULTIBOOT_HEADER
    START32
    MAP_MMIO_GIB3
    LONGMODE_SWITCH long_entry

    .code64
long_entry:
    ENTER64
    call idt_init64
    mov $PERIODIC_VECTOR, %edi
    lea periodic_irq(%rip), %rax
    call set_gate64
    mov $ONESHOT_VECTOR, %edi
    lea oneshot_irq(%rip), %rax
    call set_gate64
    mov $IPI_VECTOR, %edi
    lea ipi_irq(%rip), %rax
    call set_gate64
    mov $TPR_VECTOR, %edi
    lea tpr_irq(%rip), %rax
    call set_gate64
    MASK_8259
    PRINT64 "lapic: 8259 masked\n"

    mov $MSR_APIC_BASE, %ecx
    rdmsr
    shl $32, %rdx
    or %rdx, %rax
    PRINT64 "apic base msr 0x"
    PUTHEX 16
    PRINT64 "\n"

    LAPIC_ENABLE
    LAPIC_READ LAPIC_ID
    shr $24, %eax
    PRINT64 "apic id "
    call putdec64
    LAPIC_READ LAPIC_VERSION
    mov %eax, %ebx
    PRINT64 "\nversion 0x"
    PUTHEX 2
    PRINT64 " max lvt "
    mov %ebx, %eax
    shr $16, %eax
    and $0xff, %eax
    call putdec64
    LAPIC_READ LAPIC_SVR
    PRINT64 "\nsvr 0x"
    PUTHEX 3
    PRINT64 "\n"

    /* Periodic timer. */
    LAPIC_WRITE LAPIC_TIMER_DIVIDE, TIMER_DIVIDE_16
    LAPIC_WRITE LAPIC_LVT_TIMER, (LVT_PERIODIC | PERIODIC_VECTOR)
    LAPIC_READ LAPIC_LVT_TIMER
    PRINT64 "lvt timer 0x"
    PUTHEX 8
    PRINT64 "\n"
    LAPIC_WRITE LAPIC_TIMER_INITIAL, TIMER_COUNT
    WAIT_FOR periodic_ticks, TICKS_TOTAL
    LAPIC_WRITE LAPIC_LVT_TIMER, (LVT_MASKED | PERIODIC_VECTOR)
    LAPIC_WRITE LAPIC_TIMER_INITIAL, 0
    PRINT64 "periodic: tick "
    mov $TICKS_TOTAL, %eax
    call putdec64
    PRINT64 "\n"

    /* One-shot timer. */
    LAPIC_WRITE LAPIC_LVT_TIMER, ONESHOT_VECTOR
    LAPIC_WRITE LAPIC_TIMER_INITIAL, TIMER_COUNT
    WAIT_FOR oneshot_ticks, 1
    LAPIC_READ LAPIC_TIMER_CURRENT
    PRINT64 "one-shot: fired, current count "
    call putdec64
    PRINT64 "\n"

    /* Fixed self-IPI. */
    LAPIC_WRITE LAPIC_ICR_HIGH, 0
    LAPIC_WRITE LAPIC_ICR_LOW, (0x40000 | 0x4000 | IPI_VECTOR)
    LAPIC_READ LAPIC_ICR_LOW
    PRINT64 "self-ipi: icr 0x"
    PUTHEX 8
    WAIT_FOR ipi_count, 1
    PRINT64 ", delivered\n"

    /* TPR masking: class 4 blocked by TPR 0x40. */
    LAPIC_WRITE LAPIC_TPR, 0x40
    LAPIC_WRITE LAPIC_ICR_LOW, (0x40000 | 0x4000 | TPR_VECTOR)
    sti
    nop
    nop
    nop
    nop
    cli
    LAPIC_READ LAPIC_PPR
    PRINT64 "tpr 0x40: ppr 0x"
    PUTHEX 2
    LAPIC_READ (LAPIC_IRR + 0x20)
    bt $(TPR_VECTOR & 31), %eax
    jnc 1f
    PRINT64 ", vector 0x41 held in irr"
1:  mov tpr_count(%rip), %eax
    PRINT64 ", delivered "
    call putdec64
    PRINT64 "\n"
    LAPIC_WRITE LAPIC_TPR, 0
    WAIT_FOR tpr_count, 1
    PRINT64 "tpr 0: vector 0x41 delivered\n"

    mov oneshot_ticks(%rip), %eax
    PRINT64 "one-shot interrupts "
    call putdec64
    PRINT64 "\n"
    EXIT LAPIC_EXIT

periodic_irq:
    incl periodic_ticks(%rip)
    LAPIC_EOI_WRITE
    iretq

oneshot_irq:
    incl oneshot_ticks(%rip)
    LAPIC_EOI_WRITE
    iretq

ipi_irq:
    incl ipi_count(%rip)
    LAPIC_EOI_WRITE
    iretq

tpr_irq:
    incl tpr_count(%rip)
    LAPIC_EOI_WRITE
    iretq

    .section .data
periodic_ticks: .long 0
oneshot_ticks: .long 0
ipi_count: .long 0
tpr_count: .long 0

    LIB32
    LIB64
    APIC_LIB64
    COMMON_DATA
    APIC_DATA
