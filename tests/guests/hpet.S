/*
 * hpet: the HPET at 0xFED00000, in long mode with the 8259 pair masked and
 * the local APIC enabled. Prints the general capabilities (revision, number
 * of timers, 64-bit counter, legacy replacement capable, vendor, period in
 * femtoseconds) and timer 0's capabilities (periodic, 64-bit, the GSIs it
 * may be routed to: GSI 2 only on QEMU's pc machine). With the counter
 * halted and zeroed, arms timer 0 periodic with a 1 ms period (comparator
 * written in two 32-bit halves, each with SETVAL) and prints its
 * configuration and comparator. Enables the counter in legacy replacement
 * mode, so timer 0 drives ISA IRQ 0 = IOAPIC pin 2, routed to vector 0x33;
 * counts ticks ("tick 10", "tick 20"), checks the main counter advanced by
 * at least 19 periods meanwhile, then halts it and checks it holds. No
 * counter value is printed. Exits with HPET_EXIT.
 */
#include "common.h"
#include "apic.h"

/* Debug-exit value of this guest (QEMU exit code 0xa5). */
#define HPET_EXIT 0x52
#define HPET_VECTOR 0x33
#define PIT_PIN 2
#define TICKS_TOTAL 20
#define TICKS_STEP 10

#define HPET_CAP 0x000
#define HPET_PERIOD 0x004
#define HPET_CFG 0x010
#define HPET_STATUS 0x020
#define HPET_COUNTER 0x0F0
#define HPET_T0_CFG 0x100
#define HPET_T0_ROUTE_CAP 0x104
#define HPET_T0_CMP 0x108
#define CFG_ENABLE 0x1
#define CFG_LEGACY 0x2
#define TN_ENABLE 0x04
#define TN_PERIODIC 0x08
#define TN_SETVAL 0x40
/* 1 ms at the 10 ns period. */
#define PERIOD_TICKS 100000

    MULTIBOOT_HEADER
    START32
    MAP_MMIO_GIB3
    LONGMODE_SWITCH long_entry

    .code64
long_entry:
    ENTER64
    call idt_init64
    mov $HPET_VECTOR, %edi
    lea hpet_irq(%rip), %rax
    call set_gate64
    MASK_8259
    LAPIC_ENABLE
    call ioapic_mask_all
    PRINT64 "hpet: 8259 masked, local apic enabled\n"
    mov $HPET_BASE, %ebx

    movl HPET_CAP(%rbx), %r12d
    PRINT64 "revision "
    movzbl %r12b, %eax
    call putdec64
    PRINT64 " timers "
    mov %r12d, %eax
    shr $8, %eax
    and $0x1f, %eax
    inc %eax
    call putdec64
    PRINT64 " 64-bit counter "
    bt $13, %r12d
    setc %al
    movzbl %al, %eax
    call putdec64
    PRINT64 " legacy replacement "
    bt $15, %r12d
    setc %al
    movzbl %al, %eax
    call putdec64
    PRINT64 "\nvendor 0x"
    mov %r12d, %eax
    shr $16, %eax
    PUTHEX 4
    PRINT64 " period "
    movl HPET_PERIOD(%rbx), %eax
    call putdec64
    PRINT64 " fs\n"
    movl HPET_T0_CFG(%rbx), %eax
    PRINT64 "timer 0: periodic capable "
    bt $4, %eax
    setc %al
    movzbl %al, %eax
    call putdec64
    movl HPET_T0_CFG(%rbx), %eax
    PRINT64 " 64-bit capable "
    bt $5, %eax
    setc %al
    movzbl %al, %eax
    call putdec64
    movl HPET_T0_ROUTE_CAP(%rbx), %eax
    PRINT64 " route capability 0x"
    PUTHEX 8
    PRINT64 "\n"

    /* Halted, zeroed counter; timer 0 periodic, 1 ms. */
    movl $0, HPET_CFG(%rbx)
    movl $0, HPET_COUNTER(%rbx)
    movl $0, (HPET_COUNTER + 4)(%rbx)
    movl $(TN_ENABLE | TN_PERIODIC | TN_SETVAL), HPET_T0_CFG(%rbx)
    movl $PERIOD_TICKS, HPET_T0_CMP(%rbx)
    movl $(TN_ENABLE | TN_PERIODIC | TN_SETVAL), HPET_T0_CFG(%rbx)
    movl $0, (HPET_T0_CMP + 4)(%rbx)
    movl HPET_T0_CFG(%rbx), %eax
    PRINT64 "timer 0 config 0x"
    PUTHEX 4
    movl (HPET_T0_CMP + 4)(%rbx), %eax
    shl $32, %rax
    movl HPET_T0_CMP(%rbx), %ecx
    or %rcx, %rax
    PRINT64 " comparator 0x"
    PUTHEX 16
    movl HPET_COUNTER(%rbx), %eax
    movl (HPET_COUNTER + 4)(%rbx), %ecx
    or %ecx, %eax
    jnz 1f
    PRINT64 "\nhalted counter reads 0"
1:  PRINT64 "\n"

    /* Legacy replacement: timer 0 is ISA IRQ 0, IOAPIC pin 2. */
    movl $(CFG_ENABLE | CFG_LEGACY), HPET_CFG(%rbx)
    movl HPET_CFG(%rbx), %eax
    PRINT64 "config 0x"
    PUTHEX 2
    PRINT64 "\n"
    movl HPET_COUNTER(%rbx), %r13d
    mov $PIT_PIN, %edi
    mov $HPET_VECTOR, %esi
    call ioapic_route
    movl $TICKS_STEP, next_print(%rip)
wait_tick:
    cli
    mov hpet_ticks(%rip), %eax
    cmp next_print(%rip), %eax
    jae 1f
    sti
    hlt
    jmp wait_tick
1:  PRINT64 "tick "
    mov next_print(%rip), %eax
    call putdec64
    PRINT64 "\n"
    addl $TICKS_STEP, next_print(%rip)
    cmpl $TICKS_TOTAL, next_print(%rip)
    jbe wait_tick

    mov $HPET_BASE, %ebx
    movl HPET_COUNTER(%rbx), %eax
    sub %r13d, %eax
    cmp $((TICKS_TOTAL - 1) * PERIOD_TICKS), %eax
    jb 1f
    PRINT64 "main counter advanced at least 19 periods\n"
1:  mov $PIT_PIN, %edi
    mov $(RTE_MASKED | HPET_VECTOR), %esi
    call ioapic_route
    movl $0, HPET_CFG(%rbx)
    movl HPET_COUNTER(%rbx), %r13d
    mov $1000, %ecx
2:  pause
    loop 2b
    movl HPET_COUNTER(%rbx), %eax
    cmp %eax, %r13d
    jne 1f
    PRINT64 "halted counter holds\n"
1:  movl HPET_STATUS(%rbx), %eax
    PRINT64 "interrupt status 0x"
    PUTHEX 8
    PRINT64 "\n"
    EXIT HPET_EXIT

hpet_irq:
    incl hpet_ticks(%rip)
    LAPIC_EOI_WRITE
    iretq

    .section .data
hpet_ticks: .long 0
next_print: .long 0

    LIB32
    LIB64
    APIC_LIB64
    COMMON_DATA
    APIC_DATA
