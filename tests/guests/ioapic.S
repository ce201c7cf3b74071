/*
 * ioapic: the IOAPIC, in long mode with the 8259 pair masked and the local
 * APIC enabled. Prints the IOAPIC's ID, version and maximum redirection
 * entry, masks all 24 pins and prints pin 2's entry. Routes GSI 2 (ISA
 * IRQ 0, the PIT, as the MADT's override says) edge-triggered to vector
 * 0x32, programs the PIT at 1 kHz and counts ticks through the IOAPIC
 * ("tick 10", "tick 20"). Then routes COM1 (pin 4) level-triggered to vector
 * 0x34 and enables the UART's transmitter-empty interrupt: the handler finds
 * the vector in the local APIC's TMR and ISR and the pin's Remote IRR set,
 * turns the interrupt off and EOIs; afterwards Remote IRR is clear. Exits
 * with IOAPIC_EXIT.
 */
#include "common.h"
#include "apic.h"

/* Debug-exit value of this guest (QEMU exit code 0xa3). */
#define IOAPIC_EXIT 0x51
#define PIT_VECTOR 0x32
#define COM1_VECTOR 0x34
#define PIT_PIN 2
#define COM1_PIN 4
#define TICKS_TOTAL 20
#define TICKS_STEP 10

    MULTIBOOT_HEADER
    START32
    MAP_MMIO_GIB3
    LONGMODE_SWITCH long_entry

    .code64
long_entry:
    ENTER64
    call idt_init64
    mov $PIT_VECTOR, %edi
    lea pit_irq(%rip), %rax
    call set_gate64
    mov $COM1_VECTOR, %edi
    lea com1_irq(%rip), %rax
    call set_gate64
    MASK_8259
    LAPIC_ENABLE
    PRINT64 "ioapic: 8259 masked, local apic enabled\n"

    xor %edi, %edi
    call ioapic_read
    shr $24, %eax
    and $0xf, %eax
    PRINT64 "id "
    call putdec64
    mov $1, %edi
    call ioapic_read
    mov %eax, %ebx
    PRINT64 "\nversion 0x"
    PUTHEX 2
    PRINT64 " max redirection entry "
    mov %ebx, %eax
    shr $16, %eax
    and $0xff, %eax
    call putdec64
    PRINT64 "\n"

    call ioapic_mask_all
    mov $IOAPIC_REDIR(PIT_PIN), %edi
    call ioapic_read
    PRINT64 "pin 2 masked: 0x"
    PUTHEX 8
    PRINT64 "\n"

    /* The PIT through GSI 2. */
    mov $PIT_PIN, %edi
    mov $PIT_VECTOR, %esi
    call ioapic_route
    mov $IOAPIC_REDIR(PIT_PIN), %edi
    call ioapic_read
    PRINT64 "pin 2 routed: 0x"
    PUTHEX 8
    PRINT64 "\n"
    PIT_RATE PIT_DIVISOR_1KHZ
    movl $TICKS_STEP, next_print(%rip)
wait_tick:
    cli
    mov pit_ticks(%rip), %eax
    cmp next_print(%rip), %eax
    jae 1f
    sti
    hlt
    jmp wait_tick
1:    PRINT64 "tick "
    mov next_print(%rip), %eax
    call putdec64
    PRINT64 "\n"
    addl $TICKS_STEP, next_print(%rip)
    cmpl $TICKS_TOTAL, next_print(%rip)
    jbe wait_tick
    mov $PIT_PIN, %edi
    mov $(RTE_MASKED | PIT_VECTOR), %esi
    call ioapic_route

    /* COM1, level-triggered through pin 4. */
    mov $COM1_PIN, %edi
    mov $(RTE_LEVEL | COM1_VECTOR), %esi
    call ioapic_route
    mov $(COM1 + 1), %dx
    mov $0x02, %al      /* IER: transmitter holding register empty */
    out %al, %dx
    WAIT_FOR com1_count, 1
    mov com1_tmr(%rip), %eax
    bt $(COM1_VECTOR & 31), %eax
    jnc 1f
    PRINT64 "com1 level: tmr set"
1:  mov com1_isr(%rip), %eax
    bt $(COM1_VECTOR & 31), %eax
    jnc 1f
    PRINT64 ", isr set"
1:  mov com1_rte(%rip), %eax
    test $RTE_REMOTE_IRR, %eax
    jz 1f
    PRINT64 ", remote irr set"
1:  PRINT64 " in the handler\n"
    mov $IOAPIC_REDIR(COM1_PIN), %edi
    call ioapic_read
    PRINT64 "pin 4 after eoi: 0x"
    PUTHEX 8
    PRINT64 "\n"
    mov $COM1_PIN, %edi
    mov $(RTE_MASKED | RTE_LEVEL | COM1_VECTOR), %esi
    call ioapic_route
    mov com1_count(%rip), %eax
    PRINT64 "com1 interrupts "
    call putdec64
    PRINT64 "\n"
    EXIT IOAPIC_EXIT

pit_irq:
    incl pit_ticks(%rip)
    LAPIC_EOI_WRITE
    iretq

com1_irq:
    push %rax
    push %rdx
    push %rdi
    incl com1_count(%rip)
    LAPIC_READ (LAPIC_TMR + 0x10)
    mov %eax, com1_tmr(%rip)
    LAPIC_READ (LAPIC_ISR + 0x10)
    mov %eax, com1_isr(%rip)
    mov $IOAPIC_REDIR(COM1_PIN), %edi
    call ioapic_read
    mov %eax, com1_rte(%rip)
    mov $(COM1 + 1), %dx
    xor %al, %al        /* IER: off, the line goes low */
    out %al, %dx
    mov $(COM1 + 2), %dx
    in %dx, %al         /* IIR */
    LAPIC_EOI_WRITE
    pop %rdi
    pop %rdx
    pop %rax
    iretq

    .section .data
pit_ticks: .long 0
next_print: .long 0
com1_count: .long 0
com1_tmr: .long 0
com1_isr: .long 0
com1_rte: .long 0

    LIB32
    LIB64
    APIC_LIB64
    COMMON_DATA
    APIC_DATA
