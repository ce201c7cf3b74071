/*
 * Shared macros of the test guests that start application processors
 * (APs) on the local APICs: the real-mode trampoline at TRAMPOLINE (below
 * 1 MiB, outside the Multiboot loaders' area at 0x8000-0xFFFF) that takes an
 * AP from real mode to protected mode (the trampoline's GDT) to long mode
 * with the BSP's page tables, the MP spec's INIT, STARTUP, STARTUP
 * sequence (its delays are short bounded spins that correctness does not
 * depend on), and the AP's first steps in long mode. Include it after
 * common.h and apic.h.
 *
 * The guest defines:
 * - `ap_cr3` (.long), where AP_TRAMPOLINE_INSTALL leaves the BSP's CR3;
 * - `ap_ticket` (.long, zero), `ap_stacks` (AP_STACK_SIZE bytes per AP)
 *   for AP_ENTER64;
 * - `ap_entry64`, the 64-bit code where the trampoline lands; it starts
 *   with AP_ENTER64.
 * and expands SMP_LIB64 and AP_TRAMPOLINE once, in 64-bit text.
 */

/* The trampoline's page; the STARTUP IPI's vector is its page number. */
#define TRAMPOLINE 0x7000
#define SIPI_VECTOR (TRAMPOLINE >> 12)
#define AP_STACK_SIZE 4096
/* Pause iterations after INIT and after each STARTUP IPI. */
#define INIT_DELAY 10000
#define SIPI_DELAY 1000
#define MSR_EFER 0xC0000080

/* BSP, 64-bit: copies the trampoline below 1 MiB and records the BSP's CR3
 * for the APs. Clobbers %rax, %rcx, %rsi, %rdi. */
.macro AP_TRAMPOLINE_INSTALL
    lea ap_trampoline(%rip), %rsi
    mov $TRAMPOLINE, %edi
    mov $(ap_trampoline_end - ap_trampoline), %ecx
    rep movsb
    mov %cr3, %rax
    mov %eax, ap_cr3(%rip)
.endm

/* BSP, 64-bit: INIT, STARTUP, STARTUP to APIC ID %ebx. Clobbers %ecx,
 * %esi, %edi. */
.macro AP_START
    mov %ebx, %edi
    mov $(ICR_ASSERT | ICR_INIT), %esi
    call send_ipi
    mov $INIT_DELAY, %ecx
    call spin
    mov $(ICR_ASSERT | ICR_STARTUP | SIPI_VECTOR), %esi
    call send_ipi
    mov $SIPI_DELAY, %ecx
    call spin
    call send_ipi
    mov $SIPI_DELAY, %ecx
    call spin
.endm

/* AP, 64-bit, first instructions at `ap_entry64` (entered on the
 * trampoline's GDT, whose selectors 0x08 and 0x10 are those of the
 * BSP's): the BSP's GDT, a stack by ticket (`lock xadd`; the AP that draws
 * ticket \aps or later jumps to \halt), the BSP's IDT, the local APIC
 * software-enabled with TPR 0. Ends with the AP's APIC ID in %eax. */
.macro AP_ENTER64 aps, halt
    lgdt gdt64_ptr(%rip)
    mov $0x10, %ax
    mov %ax, %ds
    mov %ax, %es
    mov %ax, %ss
    mov %ax, %fs
    mov %ax, %gs
    mov $1, %eax
    lock xadd %eax, ap_ticket(%rip)
    cmp $(\aps), %eax
    jae \halt
    inc %eax
    imul $AP_STACK_SIZE, %eax, %eax
    lea ap_stacks(%rip), %rsp
    add %rax, %rsp
    lidt idt64_ptr(%rip)
    LAPIC_WRITE LAPIC_SVR, (0x100 | LAPIC_SPURIOUS_VECTOR)
    LAPIC_WRITE LAPIC_TPR, 0
    LAPIC_READ LAPIC_ID
    shr $24, %eax
.endm

/* 64-bit helpers: send_ipi, spin. */
.macro SMP_LIB64
/* Sends the IPI of ICR low %esi to APIC ID %edi (ignored with a
 * shorthand) and waits until the ICR's delivery status is idle. */
send_ipi:
    push %rax
    push %rdi
    mov $LAPIC_BASE, %eax
    shl $24, %edi
    mov %edi, LAPIC_ICR_HIGH(%rax)
    mov %esi, LAPIC_ICR_LOW(%rax)
1:  testl $ICR_BUSY, LAPIC_ICR_LOW(%rax)
    jz 2f
    pause
    jmp 1b
2:  pop %rdi
    pop %rax
    ret

/* %ecx iterations of `pause`. */
spin:
    push %rcx
1:  pause
    dec %ecx
    jnz 1b
    pop %rcx
    ret
.endm

/* The trampoline, real mode: copied to TRAMPOLINE and entered at CS =
 * TRAMPOLINE >> 4, IP = 0; addresses its data relative to CS. Then
 * `ap_entry32`, protected mode (flat, on the trampoline's GDT): long mode
 * with the BSP's page tables, on to `ap_entry64`. Leaves the assembler in
 * 32-bit mode. */
.macro AP_TRAMPOLINE
    .code16
ap_trampoline:
    cli
    mov %cs, %ax
    mov %ax, %ds
    lgdtl ap_gdt_ptr - ap_trampoline
    mov %cr0, %eax
    or $1, %eax         /* PE */
    mov %eax, %cr0
    ljmpl $0x18, $ap_entry32
    .balign 8
ap_gdt:
    .quad 0
    .quad 0x00AF9A000000FFFF /* 0x08: 64-bit code, as in the BSP's GDT */
    .quad 0x00CF92000000FFFF /* 0x10: data, as in the BSP's GDT */
    .quad 0x00CF9A000000FFFF /* 0x18: 32-bit code */
ap_gdt_end:
ap_gdt_ptr:
    .word ap_gdt_end - ap_gdt - 1
    .long TRAMPOLINE + (ap_gdt - ap_trampoline)
ap_trampoline_end:

    .code32
ap_entry32:
    mov $0x10, %ax
    mov %ax, %ds
    mov %ax, %es
    mov %ax, %ss
    mov %ax, %fs
    mov %ax, %gs
    mov %cr4, %eax
    or $0x20, %eax      /* PAE */
    mov %eax, %cr4
    mov ap_cr3, %eax
    mov %eax, %cr3
    mov $MSR_EFER, %ecx
    rdmsr
    or $0x100, %eax     /* LME */
    wrmsr
    mov %cr0, %eax
    or $0x80000001, %eax /* PG, PE */
    mov %eax, %cr0
    ljmp $0x08, $ap_entry64
.endm
