/*
 * smpwork: a fixed amount of compute split among the CPUs, for measuring
 * parallel speedup. The BSP reads the number of CPUs N from CPUID leaf 1
 * EBX[23:16] (0 counts as 1, more than MAX_CPUS as MAX_CPUS), prints it,
 * and starts APs 1..N-1 the way smp.S does (smp.h: a real-mode trampoline
 * at 0x7000, INIT, STARTUP, STARTUP, long mode with the BSP's page
 * tables), in long mode with the 8259 pair masked and interrupts off.
 *
 * The work is the sum (mod 2^64) of the first WORK outputs of SplitMix64
 * seeded with 0 (output i is the finalizer of the state (i + 1) * GAMMA), a
 * loop of registers only. CPU k (its APIC ID; the BSP is 0) sums the
 * outputs k * WORK / N up to (k + 1) * WORK / N and stores its partial
 * sum in its own cache line; the sum of the partial sums is the same
 * whatever N is. An AP then counts itself done (`lock inc`), sends the
 * BSP a fixed IPI of vector DONE_VECTOR and halts. The BSP does its own
 * share, then waits with `sti; hlt` until N-1 APs are done (no spinning
 * CPU takes a host core from the APs), adds the partial sums and prints
 * them as "smpwork: result 0x...". Nothing on COM1 comes from an AP (but
 * the report of an unexpected exception).
 *
 * A local APIC timer one-shot started when the BSP's own share is done
 * (divide by 64, 0x40000000 counts: about 69 s at the 1 GHz APIC bus)
 * bounds the wait: on expiry the BSP prints what it saw and exits with
 * EXIT_UNEXPECTED, as does any failed check (an AP with APIC ID 0 or N or
 * more, an AP that reported other than once, a BSP whose APIC ID is not
 * 0). Exits with SMPWORK_EXIT.
 */
#include "common.h"
#include "apic.h"
#include "smp.h"

/* Debug-exit value of this guest (QEMU exit code 0xc1). */
#define SMPWORK_EXIT 0x60
#define MAX_CPUS 8
/* SplitMix64 outputs summed, in total over all CPUs. */
#define WORK 240000
/* SplitMix64: the state's increment and the finalizer's multipliers. */
#define GAMMA 0x9E3779B97F4A7C15
#define MIX1 0xBF58476D1CE4E5B9
#define MIX2 0x94D049BB133111EB
/* Each CPU's partial sum in a cache line of its own. */
#define PARTIAL_STRIDE 64
#define DONE_VECTOR 0x40
#define TIMEOUT_VECTOR 0x30
/* Divide by 64, 0x40000000 counts: about 69 s at the 1 GHz APIC bus. */
#define TIMER_DIVIDE_64 0x9
#define TIMEOUT_COUNT 0x40000000

    MULTIBOOT_HEADER
    START32
    MAP_MMIO_GIB3
    LONGMODE_SWITCH long_entry

    .code64
long_entry:
    ENTER64
    call idt_init64
    mov $DONE_VECTOR, %edi
    lea done_irq(%rip), %rax
    call set_gate64
    mov $TIMEOUT_VECTOR, %edi
    lea timeout_irq(%rip), %rax
    call set_gate64
    MASK_8259
    LAPIC_ENABLE

    /* N: CPUID.1:EBX[23:16], 0 as 1, at most MAX_CPUS. */
    mov $1, %eax
    cpuid
    shr $16, %ebx
    and $0xff, %ebx
    jnz 1f
    mov $1, %ebx
1:  cmp $MAX_CPUS, %ebx
    jbe 2f
    mov $MAX_CPUS, %ebx
2:  mov %ebx, cpus(%rip)
    mov %ebx, %eax
    PRINT64 "smpwork: cpus "
    call putdec64
    PRINT64 "\n"

    LAPIC_READ LAPIC_ID
    shr $24, %eax
    test %eax, %eax
    jz 3f
    PRINT64 "smpwork: bsp apic id "
    call putdec64
    PRINT64 "\n"
    movb $1, failed(%rip)

    /* APs 1..N-1: INIT, STARTUP, STARTUP to each. */
3:  cmpl $1, cpus(%rip)
    jbe 5f
    AP_TRAMPOLINE_INSTALL
    mov $1, %ebx
4:  AP_START
    inc %ebx
    cmp cpus(%rip), %ebx
    jb 4b

    /* The BSP's share, then the bounded wait for the APs'. */
5:  xor %edi, %edi
    call do_share
    LAPIC_WRITE LAPIC_TIMER_DIVIDE, TIMER_DIVIDE_64
    LAPIC_WRITE LAPIC_LVT_TIMER, TIMEOUT_VECTOR
    LAPIC_WRITE LAPIC_TIMER_INITIAL, TIMEOUT_COUNT
    mov cpus(%rip), %ebx
    dec %ebx
6:  cli
    cmp %ebx, done(%rip)
    jae 7f
    cmpb $0, timed_out(%rip)
    jne timeout
    sti
    hlt
    jmp 6b
7:  LAPIC_WRITE LAPIC_LVT_TIMER, (LVT_MASKED | TIMEOUT_VECTOR)
    LAPIC_WRITE LAPIC_TIMER_INITIAL, 0

    /* Each AP reported once, and no other CPU started. */
    lea reports(%rip), %rdx
    mov $1, %ebx
8:  cmp cpus(%rip), %ebx
    jae 10f
    cmpl $1, (%rdx,%rbx,4)
    je 9f
    mov %ebx, %eax
    PRINT64 "smpwork: ap "
    call putdec64
    mov (%rdx,%rbx,4), %eax
    PRINT64 " reported "
    call putdec64
    PRINT64 " times\n"
    movb $1, failed(%rip)
9:  inc %ebx
    jmp 8b
10: mov cpus(%rip), %eax
    dec %eax
    cmp %eax, ap_ticket(%rip)
    jne 11f
    cmpl $0, bad_apic_ids(%rip)
    je 12f
11: PRINT64 "smpwork: tickets taken "
    mov ap_ticket(%rip), %eax
    call putdec64
    PRINT64 ", bad apic ids "
    mov bad_apic_ids(%rip), %eax
    call putdec64
    PRINT64 "\n"
    movb $1, failed(%rip)

    /* The sum of the partial sums. */
12: xor %eax, %eax
    lea partials(%rip), %rdx
    xor %ebx, %ebx
13: add (%rdx), %rax
    add $PARTIAL_STRIDE, %rdx
    inc %ebx
    cmp cpus(%rip), %ebx
    jb 13b
    PRINT64 "smpwork: result 0x"
    PUTHEX 16
    PRINT64 "\n"
    cmpb $0, failed(%rip)
    jne 14f
    EXIT SMPWORK_EXIT
14: EXIT EXIT_UNEXPECTED

timeout:
    cli
    PRINT64 "smpwork: timeout: done "
    mov done(%rip), %eax
    call putdec64
    PRINT64 ", tickets "
    mov ap_ticket(%rip), %eax
    call putdec64
    PRINT64 ", bad apic ids "
    mov bad_apic_ids(%rip), %eax
    call putdec64
    PRINT64 "\n"
    EXIT EXIT_UNEXPECTED

/* CPU %edi's share: the SplitMix64 outputs %edi * WORK / N up to
 * (%edi + 1) * WORK / N, their sum stored in its partial sum. */
do_share:
    push %rax
    push %rcx
    push %rdx
    push %rsi
    push %rdi
    mov %edi, %edi
    mov cpus(%rip), %ecx
    imul $WORK, %rdi, %rax
    xor %edx, %edx
    div %rcx
    mov %rax, %rsi
    lea 1(%rdi), %rax
    imul $WORK, %rax, %rax
    xor %edx, %edx
    div %rcx
    push %rdi
    mov %rax, %rdi
    call splitmix_sum
    pop %rdi
    imul $PARTIAL_STRIDE, %rdi, %rdi
    lea partials(%rip), %rdx
    mov %rax, (%rdx,%rdi)
    pop %rdi
    pop %rsi
    pop %rdx
    pop %rcx
    pop %rax
    ret

/* %rax = the sum (mod 2^64) of the SplitMix64 outputs %rsi up to %rdi - 1
 * (output i: z = (i + 1) * GAMMA; z = (z ^ z >> 30) * MIX1; z = (z ^ z >>
 * 27) * MIX2; z ^ z >> 31). Registers only. */
splitmix_sum:
    push %rcx
    push %rdx
    push %rdi
    push %r8
    push %r9
    push %r10
    push %r11
    xor %eax, %eax
    mov %rdi, %rcx
    sub %rsi, %rcx
    jbe 2f
    mov $GAMMA, %r8
    mov $MIX1, %r9
    mov $MIX2, %r10
    lea 1(%rsi), %rdx
    imul %r8, %rdx
1:  mov %rdx, %r11
    mov %r11, %rdi
    shr $30, %rdi
    xor %rdi, %r11
    imul %r9, %r11
    mov %r11, %rdi
    shr $27, %rdi
    xor %rdi, %r11
    imul %r10, %r11
    mov %r11, %rdi
    shr $31, %rdi
    xor %rdi, %r11
    add %r11, %rax
    add %r8, %rdx
    dec %rcx
    jnz 1b
2:  pop %r11
    pop %r10
    pop %r9
    pop %r8
    pop %rdi
    pop %rdx
    pop %rcx
    ret

/* An AP is done: the count is in `done`. */
done_irq:
    LAPIC_EOI_WRITE
    iretq

timeout_irq:
    movb $1, timed_out(%rip)
    LAPIC_EOI_WRITE
    iretq

    SMP_LIB64

/* AP, 64-bit: a stack, the BSP's GDT and IDT, the local APIC (smp.h); its
 * share, its report, the IPI to the BSP, then halted for good (interrupts
 * stay off from the trampoline on). */
ap_entry64:
    AP_ENTER64 (MAX_CPUS - 1), ap_halt
    mov %eax, %ebx
    test %ebx, %ebx
    jz 1f
    cmp cpus(%rip), %ebx
    jb 2f
1:  lock incl bad_apic_ids(%rip)
    jmp ap_halt
2:  mov %ebx, %edi
    call do_share
    lea reports(%rip), %rdx
    lock incl (%rdx,%rbx,4)
    lock incl done(%rip)
    xor %edi, %edi
    mov $(ICR_ASSERT | ICR_FIXED | DONE_VECTOR), %esi
    call send_ipi
ap_halt:
    cli
    hlt
    jmp ap_halt

/* The trampoline and the AP's way to long mode (smp.h). */
    AP_TRAMPOLINE

    .section .data
    .balign 64
cpus: .long 1
ap_cr3: .long 0
ap_ticket: .long 0
bad_apic_ids: .long 0
done: .long 0
timed_out: .byte 0
failed: .byte 0
    .balign 4
/* Reports by APIC ID. */
reports: .fill MAX_CPUS, 4, 0
    .balign PARTIAL_STRIDE
/* The partial sums by APIC ID, PARTIAL_STRIDE bytes apart. */
partials: .fill MAX_CPUS * PARTIAL_STRIDE, 1, 0

    .section .bss
    .balign 16
ap_stacks: .skip (MAX_CPUS - 1) * AP_STACK_SIZE

    LIB32
    LIB64
    APIC_LIB64
    COMMON_DATA
    APIC_DATA
