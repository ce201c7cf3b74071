/*
 * smp: four CPUs (APIC IDs 0..3) on the local APICs, in long mode with the
 * 8259 pair masked. The BSP copies a real-mode trampoline to TRAMPOLINE
 * (below 1 MiB, outside the Multiboot loaders' area at 0x8000-0xFFFF) and
 * starts APs 1, 2 and 3 one after the other, each with an INIT IPI and two
 * STARTUP IPIs of vector SIPI_VECTOR (the MP spec's sequence; its delays
 * are short bounded spins that correctness does not depend on).
 *
 * An AP goes from real mode to protected mode (the trampoline's GDT) to
 * long mode with the BSP's page tables (its CR3), loads the BSP's GDT and
 * IDT, takes a stack by ticket (`lock xadd`), software-enables its local
 * APIC, reads its APIC ID, marks itself online and enables interrupts. It
 * waits until all three APs got there (so that their loops overlap), then
 * increments `locked_counter` ITERS times under a spinlock (`lock
 * bts`, `pause` while held, a plain store to release) and `racy_counter`
 * ITERS times without a lock (a load, an increment and a store: updates
 * are lost when CPUs interleave), counts itself done (`lock inc`), sends
 * the BSP a fixed IPI of vector 0x40 + its APIC ID and waits for the
 * BSP's broadcast.
 *
 * The BSP waits in HLT (each AP's IPI wakes it to look) until the three
 * APs are done and their three IPIs arrived: a VMM that runs one vCPU at
 * a time then gives the APs all the time. It sends a fixed IPI of vector 0x50 to all
 * excluding self and an NMI to APIC ID 2, and waits until every AP took
 * the broadcast and AP 2 the NMI. Only then does it print, in a fixed
 * order: nothing on COM1 comes from an AP (but the report of an
 * unexpected exception). The one line that varies from run to run is
 * "smp: racy total 0x...". A local APIC timer one-shot of about 60 s
 * (1 GHz bus) bounds the BSP's waits: on expiry it prints what it saw and
 * exits with EXIT_UNEXPECTED, as does any failed check. Exits with
 * SMP_EXIT. The trampoline, the INIT-STARTUP-STARTUP sequence and the
 * AP's first steps in long mode are smp.h's.
 */
#include "common.h"
#include "apic.h"
#include "smp.h"

/* Debug-exit value of this guest (QEMU exit code 0xbf). */
#define SMP_EXIT 0x5f
#define CPUS 4
#define APS (CPUS - 1)
/* Increments of each counter per AP. */
#define ITERS 50000
/* AP N sends vector IPI_VECTOR_BASE + N to the BSP. */
#define IPI_VECTOR_BASE 0x40
#define BROADCAST_VECTOR 0x50
#define NMI_TARGET 2
#define TIMEOUT_VECTOR 0x30
/* Divide by 32, 0x70000000 counts: about 60 s at the 1 GHz APIC bus. */
#define TIMER_DIVIDE_32 0x8
#define TIMEOUT_COUNT 0x70000000

    MULTIBOOT_HEADER
    START32
    MAP_MMIO_GIB3
    LONGMODE_SWITCH long_entry

    .code64
long_entry:
    ENTER64
    call idt_init64
    mov $2, %edi
    lea nmi_handler(%rip), %rax
    call set_gate64
    mov $(IPI_VECTOR_BASE + 1), %edi
    lea ipi_irq_1(%rip), %rax
    call set_gate64
    mov $(IPI_VECTOR_BASE + 2), %edi
    lea ipi_irq_2(%rip), %rax
    call set_gate64
    mov $(IPI_VECTOR_BASE + 3), %edi
    lea ipi_irq_3(%rip), %rax
    call set_gate64
    mov $BROADCAST_VECTOR, %edi
    lea broadcast_irq(%rip), %rax
    call set_gate64
    mov $TIMEOUT_VECTOR, %edi
    lea timeout_irq(%rip), %rax
    call set_gate64
    MASK_8259
    LAPIC_ENABLE

    LAPIC_READ LAPIC_ID
    shr $24, %eax
    PRINT64 "smp: bsp apic id "
    call putdec64
    PRINT64 "\nsmp: starting "
    mov $APS, %eax
    call putdec64
    PRINT64 " aps\n"

    /* The trampoline below 1 MiB; the APs take the BSP's CR3. */
    AP_TRAMPOLINE_INSTALL

    /* The timeout, then INIT, STARTUP, STARTUP to each AP. */
    LAPIC_WRITE LAPIC_TIMER_DIVIDE, TIMER_DIVIDE_32
    LAPIC_WRITE LAPIC_LVT_TIMER, TIMEOUT_VECTOR
    LAPIC_WRITE LAPIC_TIMER_INITIAL, TIMEOUT_COUNT
    mov $1, %ebx
1:  AP_START
    inc %ebx
    cmp $APS, %ebx
    jbe 1b

    /* Every AP done and its IPI taken: halted meanwhile (each AP's IPI
     * comes after its `done`, and wakes the BSP to look), so that a VMM
     * running one vCPU at a time gives the APs the time. */
2:  cli
    cmpb $0, timed_out(%rip)
    jne timeout
    cmpl $APS, done(%rip)
    jb 1f
    cmpl $APS, ipi_total(%rip)
    jae 3f
1:  sti
    hlt
    jmp 2b
3:

    /* The broadcast to all but self, the NMI to one AP. */
    xor %edi, %edi
    mov $(ICR_ALL_BUT_SELF | ICR_ASSERT | ICR_FIXED | BROADCAST_VECTOR), %esi
    call send_ipi
    mov $NMI_TARGET, %edi
    mov $(ICR_ASSERT | ICR_NMI), %esi
    call send_ipi
    sti
4:  pause
    cmpb $0, timed_out(%rip)
    jne timeout
    cmpl $APS, broadcast_total(%rip)
    jb 4b
    cmpl $1, nmi_total(%rip)
    jb 4b
    cli
    LAPIC_WRITE LAPIC_LVT_TIMER, (LVT_MASKED | TIMEOUT_VECTOR)
    LAPIC_WRITE LAPIC_TIMER_INITIAL, 0

    /* What the APs left: online flags by APIC ID. */
    lea ap_online(%rip), %rdx
    mov $1, %ebx
4:  mov %ebx, %eax
    cmpb $0, (%rdx,%rbx)
    je 5f
    PRINT64 "smp: ap "
    call putdec64
    PRINT64 " online\n"
    jmp 6f
5:  PRINT64 "smp: ap "
    call putdec64
    PRINT64 " not online\n"
    movb $1, failed(%rip)
6:  inc %ebx
    cmp $APS, %ebx
    jbe 4b
    cmpl $APS, ap_ticket(%rip)
    je 7f
    mov ap_ticket(%rip), %eax
    PRINT64 "smp: tickets taken "
    call putdec64
    PRINT64 "\n"
    movb $1, failed(%rip)

7:  mov locked_counter(%rip), %eax
    PRINT64 "smp: locked total 0x"
    PUTHEX 8
    PRINT64 "\n"
    cmp $(APS * ITERS), %eax
    je 8f
    movb $1, failed(%rip)

    /* The IPIs: one of vector 0x40 + N from AP N, each taken by the BSP. */
8:  lea ipi_vector(%rip), %rsi
    lea ipi_count(%rip), %rdi
    lea ipi_receiver(%rip), %rdx
    mov $1, %ebx
9:  mov %ebx, %eax
    PRINT64 "smp: ipi from ap "
    call putdec64
    mov (%rsi,%rbx,4), %eax
    PRINT64 " vector 0x"
    PUTHEX 2
    PRINT64 "\n"
    cmpl $1, (%rdi,%rbx,4)
    jne 10f
    cmpl $0, (%rdx,%rbx,4)
    je 11f
10: mov (%rdi,%rbx,4), %eax
    PRINT64 "smp: taken "
    call putdec64
    mov (%rdx,%rbx,4), %eax
    PRINT64 " times, last by apic "
    call putdec64
    PRINT64 "\n"
    movb $1, failed(%rip)
11: inc %ebx
    cmp $APS, %ebx
    jbe 9b

    /* The broadcast: once on each AP, never on the BSP. */
    mov broadcast_total(%rip), %eax
    PRINT64 "smp: broadcast acknowledged by "
    call putdec64
    PRINT64 " aps\n"
    lea broadcast_ack(%rip), %rdx
    cmpl $0, (%rdx)
    jne 13f
    mov $1, %ebx
12: cmpl $1, (%rdx,%rbx,4)
    jne 13f
    inc %ebx
    cmp $APS, %ebx
    jbe 12b
    cmpl $APS, broadcast_total(%rip)
    je 14f
13: PRINT64 "smp: broadcast acknowledged by the wrong cpus\n"
    movb $1, failed(%rip)

    /* The NMI: once, on AP NMI_TARGET alone. */
14: mov nmi_by(%rip), %eax
    PRINT64 "smp: nmi acknowledged by ap "
    call putdec64
    PRINT64 "\n"
    cmpl $NMI_TARGET, nmi_by(%rip)
    jne 15f
    cmpl $1, nmi_total(%rip)
    je 16f
15: mov nmi_total(%rip), %eax
    PRINT64 "smp: nmis taken "
    call putdec64
    PRINT64 "\n"
    movb $1, failed(%rip)

    /* The racy counter: lost updates, never more than the increments. */
16: mov racy_counter(%rip), %eax
    PRINT64 "smp: racy total 0x"
    PUTHEX 8
    PRINT64 "\nsmp: racy total <= locked total: "
    cmp locked_counter(%rip), %eax
    ja 17f
    PRINT64 "yes\n"
    jmp 18f
17: PRINT64 "no\n"
    movb $1, failed(%rip)
18: cmpb $0, failed(%rip)
    jne 19f
    EXIT SMP_EXIT
19: EXIT EXIT_UNEXPECTED

timeout:
    cli
    PRINT64 "smp: timeout: done "
    mov done(%rip), %eax
    call putdec64
    PRINT64 ", ipis "
    mov ipi_total(%rip), %eax
    call putdec64
    PRINT64 ", tickets "
    mov ap_ticket(%rip), %eax
    call putdec64
    PRINT64 ", bad apic ids "
    mov bad_apic_ids(%rip), %eax
    call putdec64
    PRINT64 ", arrived "
    mov arrived(%rip), %eax
    call putdec64
    PRINT64 ", broadcasts "
    mov broadcast_total(%rip), %eax
    call putdec64
    PRINT64 ", nmis "
    mov nmi_total(%rip), %eax
    call putdec64
    PRINT64 "\n"
    EXIT EXIT_UNEXPECTED

    SMP_LIB64

/* The BSP's IPI from AP N: records the vector, the receiving APIC and the
 * count. */
.irp n, 1, 2, 3
ipi_irq_\n:
    push %rax
    movl $(IPI_VECTOR_BASE + \n), ipi_vector + 4 * \n(%rip)
    LAPIC_READ LAPIC_ID
    shr $24, %eax
    mov %eax, ipi_receiver + 4 * \n(%rip)
    lock incl ipi_count + 4 * \n(%rip)
    lock incl ipi_total(%rip)
    LAPIC_EOI_WRITE
    pop %rax
    iretq
.endr

/* The broadcast, on each AP: acknowledged by APIC ID. */
broadcast_irq:
    push %rax
    push %rdx
    LAPIC_READ LAPIC_ID
    shr $24, %eax
    cmp $CPUS, %eax
    jae 1f
    lea broadcast_ack(%rip), %rdx
    lock incl (%rdx,%rax,4)
1:  lock incl broadcast_total(%rip)
    LAPIC_EOI_WRITE
    pop %rdx
    pop %rax
    iretq

/* An NMI (no EOI): acknowledged by APIC ID. */
nmi_handler:
    push %rax
    LAPIC_READ LAPIC_ID
    shr $24, %eax
    mov %eax, nmi_by(%rip)
    lock incl nmi_total(%rip)
    pop %rax
    iretq

timeout_irq:
    movb $1, timed_out(%rip)
    LAPIC_EOI_WRITE
    iretq

/* AP, 64-bit: a stack, the BSP's GDT and IDT, the local APIC (smp.h). */
ap_entry64:
    AP_ENTER64 APS, ap_halt
    mov %eax, %ebx
    test %ebx, %ebx
    jz 1f
    cmp $CPUS, %ebx
    jb 2f
1:  lock incl bad_apic_ids(%rip)
    jmp ap_halt
2:  lea ap_online(%rip), %rdx
    movb $1, (%rdx,%rbx)
    sti

    /* Until every AP is here, so that their loops overlap. */
    lock incl arrived(%rip)
3:  pause
    cmpl $APS, arrived(%rip)
    jb 3b

    /* ITERS increments under the spinlock. */
    mov $ITERS, %ecx
4:  lock btsl $0, spinlock(%rip)
    jnc 6f
5:  pause
    testl $1, spinlock(%rip)
    jnz 5b
    jmp 4b
6:  mov locked_counter(%rip), %eax
    inc %eax
    mov %eax, locked_counter(%rip)
    movl $0, spinlock(%rip)
    dec %ecx
    jnz 4b

    /* ITERS increments without a lock. */
    mov $ITERS, %ecx
7:  mov racy_counter(%rip), %eax
    inc %eax
racy_store:
    mov %eax, racy_counter(%rip)
    dec %ecx
    jnz 7b

    /* Done, then the IPI to the BSP: the BSP, halted, wakes to see it. */
    lock incl done(%rip)
    xor %edi, %edi
    lea (ICR_ASSERT | ICR_FIXED | IPI_VECTOR_BASE)(%rbx), %esi
    call send_ipi

    /* Until the broadcast came; the NMI may come at any time. */
    lea broadcast_ack(%rip), %rdx
8:  cli
    cmpl $0, (%rdx,%rbx,4)
    jne ap_halt
    sti
    hlt
    jmp 8b
ap_halt:
    cli
    hlt
    jmp ap_halt

/* The trampoline and the AP's way to long mode (smp.h). */
    AP_TRAMPOLINE

    .section .data
    .balign 64
spinlock: .long 0
locked_counter: .long 0
    .balign 64
racy_counter: .long 0
    .balign 64
ap_cr3: .long 0
ap_ticket: .long 0
bad_apic_ids: .long 0
arrived: .long 0
done: .long 0
ipi_total: .long 0
broadcast_total: .long 0
nmi_total: .long 0
nmi_by: .long 0
timed_out: .byte 0
failed: .byte 0
ap_online: .byte 0, 0, 0, 0
    .balign 4
/* Indexed by AP (1..APS); entry 0 unused. */
ipi_vector: .fill CPUS, 4, 0
ipi_count: .fill CPUS, 4, 0
ipi_receiver: .fill CPUS, 4, 0
/* Indexed by APIC ID. */
broadcast_ack: .fill CPUS, 4, 0

    .section .bss
    .balign 16
ap_stacks: .skip APS * AP_STACK_SIZE

    LIB32
    LIB64
    APIC_LIB64
    COMMON_DATA
    APIC_DATA
