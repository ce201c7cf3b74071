/*
 * tscdl: the local APIC timer in TSC-deadline mode, in long mode with the
 * 8259 pair masked. Prints whether CPUID.1:ECX bit 24 (TSC-deadline)
 * is set, enables the local APIC and puts the LVT timer in TSC-deadline
 * mode (bits 18:17 = 10b). The PIT at 100 Hz through IOAPIC GSI 2 is the
 * watchdog: every wait below gives up after a number of PIT ticks (slow
 * ticks: each is an interrupt to record). Then,
 * ten times: IA32_TSC_DEADLINE (MSR 0x6E0) = rdtsc + DEADLINE_DELTA, idle
 * with `sti; hlt` until the timer interrupt came, EOI at the local APIC,
 * "tsc-deadline tick N", and the MSR must read 0 now that the timer fired.
 * While armed the MSR reads back what was written; writing 0 disarms (no
 * interrupt within QUIET_TICKS PIT ticks, and the MSR reads 0); a
 * deadline already in the past fires at once. Exits with TSCDL_EXIT.
 */
#include "common.h"
#include "apic.h"

/* Debug-exit value of this guest (QEMU exit code 0xad). */
#define TSCDL_EXIT 0x56
#define DEADLINE_VECTOR 0x30
#define PIT_VECTOR 0x32
#define PIT_PIN 2
#define MSR_TSC_DEADLINE 0x6E0
#define LVT_TSC_DEADLINE 0x40000
#define CPUID1_ECX_TSC_DEADLINE 24
/* About 1 ms at 2 GHz. */
#define DEADLINE_DELTA 2000000
/* The deadline the disarm test arms and at once disarms: about 10 ms at
 * 2 GHz, well inside the quiet ticks that follow, yet far enough that a
 * host that deschedules the vCPU between the two writes (a loaded machine)
 * does not let it expire first. */
#define DISARM_DELTA 20000000
/* Far in the future: more than an hour at any TSC rate of today. */
#define DEADLINE_FAR (1 << 44)
#define TICKS_TOTAL 10
/* PIT input clock / 100: a 100 Hz tick. */
#define PIT_DIVISOR_100HZ 11932
/* PIT ticks (at least 90 ms) a deadline interrupt may take before the
 * guest gives up. */
#define TIMEOUT_TICKS 10
/* PIT ticks (at least 20 ms) without an interrupt after a disarm. */
#define QUIET_TICKS 3

    MULTIBOOT_HEADER
    START32
    MAP_MMIO_GIB3
    LONGMODE_SWITCH long_entry

    .code64
long_entry:
    ENTER64
    call idt_init64
    mov $DEADLINE_VECTOR, %edi
    lea deadline_irq(%rip), %rax
    call set_gate64
    mov $PIT_VECTOR, %edi
    lea pit_irq(%rip), %rax
    call set_gate64
    MASK_8259
    LAPIC_ENABLE
    PRINT64 "tscdl: 8259 masked, local apic enabled\n"

    mov $1, %eax
    xor %ecx, %ecx
    cpuid
    xor %eax, %eax
    bt $CPUID1_ECX_TSC_DEADLINE, %ecx
    setc %al
    PRINT64 "cpuid: tsc-deadline "
    call putdec64
    PRINT64 "\n"

    /* The watchdog: the PIT through GSI 2. */
    call ioapic_mask_all
    mov $PIT_PIN, %edi
    mov $PIT_VECTOR, %esi
    call ioapic_route
    PIT_RATE PIT_DIVISOR_100HZ

    LAPIC_WRITE LAPIC_LVT_TIMER, (LVT_TSC_DEADLINE | DEADLINE_VECTOR)
    LAPIC_READ LAPIC_LVT_TIMER
    PRINT64 "lvt timer 0x"
    PUTHEX 8
    PRINT64 "\n"

    /* Ten deadlines, each rdtsc + DEADLINE_DELTA. */
    xor %r12d, %r12d            /* deadlines taken */
    xor %r13d, %r13d            /* MSR reads after expiry that were not 0 */
next_deadline:
    inc %r12d
    rdtsc
    shl $32, %rdx
    or %rdx, %rax
    add $DEADLINE_DELTA, %rax
    call write_deadline
    mov %r12d, %edi
    call wait_deadline
    jc timed_out
    PRINT64 "tsc-deadline tick "
    mov %r12d, %eax
    call putdec64
    PRINT64 "\n"
    call read_deadline
    test %rax, %rax
    jz 1f
    inc %r13d
1:  cmp $TICKS_TOTAL, %r12d
    jb next_deadline
    PRINT64 "msr 0x6e0 after expiry: "
    test %r13d, %r13d
    jnz 1f
    PRINT64 "0 every time\n"
    jmp 2f
1:  PRINT64 "not 0 "
    mov %r13d, %eax
    call putdec64
    PRINT64 " times\n"
2:

    /* Armed far away: reads back as written. Then 0 disarms. */
    rdtsc
    shl $32, %rdx
    or %rdx, %rax
    movabs $DEADLINE_FAR, %rbx
    add %rax, %rbx
    mov %rbx, %rax
    call write_deadline
    call read_deadline
    PRINT64 "msr 0x6e0 armed: "
    cmp %rbx, %rax
    jne 1f
    PRINT64 "reads as written\n"
    jmp 2f
1:  PRINT64 "reads something else\n"
2:  rdtsc
    shl $32, %rdx
    or %rdx, %rax
    add $DISARM_DELTA, %rax
    call write_deadline
    xor %eax, %eax
    call write_deadline
    call read_deadline
    PRINT64 "msr 0x6e0 after writing 0: "
    test %rax, %rax
    jnz 1f
    PRINT64 "0\n"
    jmp 2f
1:  PRINT64 "not 0\n"
2:
    mov pit_ticks(%rip), %ebx
    add $QUIET_TICKS, %ebx
1:  cli
    cmp pit_ticks(%rip), %ebx
    jbe 2f
    sti
    hlt
    jmp 1b
2:  mov deadline_ticks(%rip), %eax
    sub %r12d, %eax
    PRINT64 "disarmed: interrupts in 3 pit periods "
    call putdec64
    PRINT64 "\n"

    /* A deadline in the past fires at once. */
    inc %r12d
    mov $1, %eax
    call write_deadline
    mov %r12d, %edi
    call wait_deadline
    jc timed_out
    PRINT64 "deadline in the past: fired\n"

    mov $PIT_PIN, %edi
    mov $(RTE_MASKED | PIT_VECTOR), %esi
    call ioapic_route
    mov deadline_ticks(%rip), %eax
    PRINT64 "tsc-deadline interrupts "
    call putdec64
    PRINT64 "\n"
    EXIT TSCDL_EXIT

timed_out:
    PRINT64 "tsc-deadline: no interrupt within 10 pit periods\n"
    EXIT EXIT_UNEXPECTED

/* IA32_TSC_DEADLINE = %rax. */
write_deadline:
    push %rax
    push %rcx
    push %rdx
    mov %rax, %rdx
    shr $32, %rdx
    mov $MSR_TSC_DEADLINE, %ecx
    wrmsr
    pop %rdx
    pop %rcx
    pop %rax
    ret

/* %rax = IA32_TSC_DEADLINE. */
read_deadline:
    push %rcx
    push %rdx
    mov $MSR_TSC_DEADLINE, %ecx
    rdmsr
    shl $32, %rdx
    or %rdx, %rax
    pop %rdx
    pop %rcx
    ret

/* Idles until deadline_ticks reaches %edi; carry set if TIMEOUT_TICKS PIT
 * ticks passed first. Returns with interrupts disabled. */
wait_deadline:
    push %rbx
    mov pit_ticks(%rip), %ebx
    add $TIMEOUT_TICKS, %ebx
1:  cli
    cmp deadline_ticks(%rip), %edi
    jbe 2f
    cmp pit_ticks(%rip), %ebx
    jbe 3f
    sti
    hlt
    jmp 1b
2:  pop %rbx
    clc
    ret
3:  pop %rbx
    stc
    ret

deadline_irq:
    incl deadline_ticks(%rip)
    LAPIC_EOI_WRITE
    iretq

pit_irq:
    incl pit_ticks(%rip)
    LAPIC_EOI_WRITE
    iretq

    .section .data
deadline_ticks: .long 0
pit_ticks: .long 0

    LIB32
    LIB64
    APIC_LIB64
    COMMON_DATA
    APIC_DATA
