/*
 * Shared macros of the test guests of the modern PC platform (local APIC,
 * IOAPIC, HPET, ACPI): the MMIO addresses and register offsets, an uncached
 * identity mapping of the fourth GiB (where the APIC, IOAPIC and HPET
 * registers live) for the page tables of common.h, masking the 8259 pair,
 * enabling the local APIC, IOAPIC register access, and an interrupt-driven
 * wait. Include it after common.h; a guest that uses the APIC helpers
 * expands MAP_MMIO_GIB3 in 32-bit code before LONGMODE_SWITCH, and
 * APIC_LIB64 and APIC_DATA once.
 */

#define LAPIC_BASE 0xFEE00000
#define IOAPIC_BASE 0xFEC00000
#define HPET_BASE 0xFED00000

/* Local APIC registers (offsets in the 4 KiB page). */
#define LAPIC_ID 0x020
#define LAPIC_VERSION 0x030
#define LAPIC_TPR 0x080
#define LAPIC_PPR 0x0A0
#define LAPIC_EOI 0x0B0
#define LAPIC_SVR 0x0F0
#define LAPIC_ISR 0x100
#define LAPIC_TMR 0x180
#define LAPIC_IRR 0x200
#define LAPIC_ICR_LOW 0x300
#define LAPIC_ICR_HIGH 0x310
#define LAPIC_LVT_TIMER 0x320
#define LAPIC_LVT_LINT0 0x350
#define LAPIC_TIMER_INITIAL 0x380
#define LAPIC_TIMER_CURRENT 0x390
#define LAPIC_TIMER_DIVIDE 0x3E0
#define LAPIC_SPURIOUS_VECTOR 0xFF
#define LVT_MASKED 0x10000
#define LVT_PERIODIC 0x20000
#define MSR_APIC_BASE 0x1B

/* ICR low: delivery mode (bits 8-10), delivery status (bit 12, read only),
 * level assert (bit 14), destination shorthand (bits 18-19); the
 * destination APIC ID is in bits 24-31 of ICR high. */
#define ICR_FIXED 0x000
#define ICR_NMI 0x400
#define ICR_INIT 0x500
#define ICR_STARTUP 0x600
#define ICR_BUSY 0x1000
#define ICR_ASSERT 0x4000
#define ICR_SELF 0x40000
#define ICR_ALL_BUT_SELF 0xC0000

/* IOAPIC: index register, data window; redirection entry N at 0x10 + 2N. */
#define IOAPIC_REGSEL 0x00
#define IOAPIC_WIN 0x10
#define IOAPIC_REDIR(pin) (0x10 + 2 * (pin))
#define RTE_MASKED 0x10000
#define RTE_LEVEL 0x8000
#define RTE_REMOTE_IRR 0x4000

/* Maps 3..4 GiB identity with uncached 2 MiB pages (PCD, PWT) through PDPT
 * entry 3. 32-bit code, before LONGMODE_SWITCH. */
.macro MAP_MMIO_GIB3
    mov $pd_mmio, %edi
    mov $(0xC0000000 | 0x9B), %eax /* present, writable, PWT, PCD, 2 MiB */
    mov $512, %ecx
1:  mov %eax, (%edi)
    movl $0, 4(%edi)
    add $0x200000, %eax
    add $8, %edi
    loop 1b
    movl $(pd_mmio + 3), pdpt + 24
    movl $0, pdpt + 28
.endm

/* Re-initialises the 8259 pair (vectors 0x20 and 0x28) with every line
 * masked: no interrupt of the firmware's PIT or of any other ISA line
 * reaches the CPU through the PIC (LAPIC_ENABLE also masks LINT0). */
.macro MASK_8259
    PIC_REMAP 0xFF, 0xFF
.endm

/* Writes \value to local APIC register \reg. */
.macro LAPIC_WRITE reg, value
    push %rax
    mov $LAPIC_BASE, %eax
    movl $(\value), \reg(%rax)
    pop %rax
.endm

/* Reads local APIC register \reg into %eax. */
.macro LAPIC_READ reg
    mov $LAPIC_BASE, %eax
    movl \reg(%rax), %eax
.endm

/* The interrupt handlers' end of interrupt. */
.macro LAPIC_EOI_WRITE
    LAPIC_WRITE LAPIC_EOI, 0
.endm

/* Software-enables the local APIC (spurious vector 0xFF), TPR 0, LINT0
 * masked. Sets the gate of the spurious vector. */
.macro LAPIC_ENABLE
    mov $LAPIC_SPURIOUS_VECTOR, %edi
    lea spurious_irq(%rip), %rax
    call set_gate64
    LAPIC_WRITE LAPIC_SVR, (0x100 | LAPIC_SPURIOUS_VECTOR)
    LAPIC_WRITE LAPIC_TPR, 0
    LAPIC_WRITE LAPIC_LVT_LINT0, LVT_MASKED
.endm

/* Idles with `sti; hlt` until the 32-bit \counter reaches \target; returns
 * with interrupts disabled. */
.macro WAIT_FOR counter, target
1:  cli
    cmpl $(\target), \counter(%rip)
    jae 2f
    sti
    hlt
    jmp 1b
2:
.endm

/* Prints the low \digits hex digits of %rax. */
.macro PUTHEX digits
    push %rcx
    mov $\digits, %ecx
    call puthexn64
    pop %rcx
.endm

/* 64-bit helpers: IOAPIC access, the spurious-interrupt handler. */
.macro APIC_LIB64
    .section SECTION_TEXT64
    .code64
/* %eax = IOAPIC register %edi. */
ioapic_read:
    push %rbx
    mov $IOAPIC_BASE, %ebx
    movl %edi, IOAPIC_REGSEL(%rbx)
    movl IOAPIC_WIN(%rbx), %eax
    pop %rbx
    ret

/* IOAPIC register %edi = %esi. */
ioapic_write:
    push %rbx
    mov $IOAPIC_BASE, %ebx
    movl %edi, IOAPIC_REGSEL(%rbx)
    movl %esi, IOAPIC_WIN(%rbx)
    pop %rbx
    ret

/* Redirection entry of pin %edi: destination APIC 0, low half %esi. */
ioapic_route:
    push %rdi
    push %rsi
    lea 0x11(,%rdi,2), %edi
    xor %esi, %esi
    call ioapic_write
    dec %edi
    mov (%rsp), %esi
    call ioapic_write
    pop %rsi
    pop %rdi
    ret

/* Masks every redirection entry of the IOAPIC (24 pins). */
ioapic_mask_all:
    push %rdi
    push %rsi
    xor %edi, %edi
1:  mov $RTE_MASKED, %esi
    call ioapic_route
    inc %edi
    cmp $24, %edi
    jb 1b
    pop %rsi
    pop %rdi
    ret

/* A spurious interrupt takes no EOI. */
spurious_irq:
    iretq
.endm

.macro APIC_DATA
    .section .bss
    .balign 4096
pd_mmio: .skip 4096
.endm
