/*
 * pwrbtn: waits for the ACPI power button on the modern platform
 * (`--irqchip apic`). Switches to long mode, routes the SCI (ISA IRQ 9)
 * through the 8259 pair (the local APIC stays in its reset state, which
 * passes the PIC's interrupts through), enables ACPI through SMI_CMD and
 * the power-button event in PM1_EN, prints "pwrbtn: waiting", then spins
 * in a loop without exits until the SCI handler has seen PWRBTN_STS. It
 * prints "pwrbtn: pressed", and powers off by S5 (SLP_TYP 0 | SLP_EN).
 * The button comes from outside (`nyx ctl SOCK power-button`), so the
 * interrupt lands wherever the loop happens to be: a recorded input that a
 * replay must deliver at the same instruction.
 */
#include "common.h"

#define PM1_STS 0x600
#define PM1_EN 0x602
#define PM1_CNT 0x604
#define SMI_CMD 0xB2
#define ACPI_ENABLE 0xF1
#define SCI_EN 0x0001
#define PWRBTN 0x0100
#define SLP_EN 0x2000

    MULTIBOOT_HEADER
    START32
    LONGMODE_SWITCH long_entry

    .code64
long_entry:
    ENTER64
    call idt_init64
    mov $0x29, %edi            /* IRQ 9 on the slave PIC (base 0x28) */
    lea sci(%rip), %rax
    call set_gate64
    PIC_REMAP 0xFB, 0xFD       /* cascade (IRQ 2) and IRQ 9 unmasked */

    mov $ACPI_ENABLE, %al
    out %al, $SMI_CMD
1:  mov $PM1_CNT, %dx
    in %dx, %ax
    test $SCI_EN, %ax
    jz 1b
    mov $PM1_EN, %dx
    mov $PWRBTN, %ax
    out %ax, %dx
    PRINT64 "pwrbtn: waiting\n"

    xor %ebx, %ebx
    sti
    .globl spin
spin:
    inc %rbx
    imul $0x5E3779B1, %rbx, %rcx
    xor %rcx, %r8
    cmpb $0, pressed(%rip)
    je spin
    cli
    PRINT64 "pwrbtn: pressed\n"
    mov $PM1_CNT, %dx
    mov $(SLP_EN | SCI_EN), %ax
    out %ax, %dx
    EXIT EXIT_UNEXPECTED

    .globl sci
sci:
    push %rax
    push %rdx
    mov $PM1_STS, %dx
    in %dx, %ax
    test $PWRBTN, %ax
    jz 2f
    movb $1, pressed(%rip)
2:  out %ax, %dx               /* write 1 to clear what was set */
    mov $0x20, %al
    out %al, $0xA0
    out %al, $0x20
    pop %rdx
    pop %rax
    iretq

    .section .data
pressed: .byte 0

    LIB32
    LIB64
    COMMON_DATA
