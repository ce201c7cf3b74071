/*
 * altinstr: a Linux-style alternative. `tsc_slot` holds `rdtsc` padded with
 * nops; .altinstr_replacement holds `lfence; rdtsc` and `rdtscp`, and
 * .altinstructions describes both in Linux 6.1's layout (s32 instr_offset,
 * s32 repl_offset, u16 cpuid, u8 instrlen, u8 replacementlen). The guest does
 * what Linux's apply_alternatives does at boot: it copies a replacement over
 * the slot and pads the slot with nops, then reads the TSC through the slot.
 * Every read must be above the one before, and rdtscp must write ECX. Exits
 * with ALTINSTR_EXIT, or EXIT_UNEXPECTED when a check fails. Timing-dependent
 * values, but only the checks are printed.
 */
#include "common.h"

/* Debug-exit value of this guest. */
#define ALTINSTR_EXIT 0x4a
/* Reads through the slot per check. */
#define READS 20
/* Bytes of the slot. */
#define SLOT_LEN 5

    MULTIBOOT_HEADER
    START32
    PRINT32 "altinstr: rdtsc in place\n"
    call check_slot
    mov $repl_lfence, %esi
    mov $(repl_lfence_end - repl_lfence), %ecx
    call apply
    PRINT32 "altinstr: lfence; rdtsc copied over the slot\n"
    call check_slot
    mov $repl_rdtscp, %esi
    mov $(repl_rdtscp_end - repl_rdtscp), %ecx
    call apply
    PRINT32 "altinstr: rdtscp copied over the slot\n"
    call check_slot
    /* rdtscp writes IA32_TSC_AUX to ECX. */
    mov $0xdeadbeef, %ecx
    call tsc_slot
    cmp $0xdeadbeef, %ecx
    je fail
    PRINT32 "altinstr: ok\n"
    EXIT ALTINSTR_EXIT
fail:
    PRINT32 "altinstr: a read through the slot did not advance the TSC\n"
    EXIT EXIT_UNEXPECTED

/* Copies %ecx bytes from %esi over the slot and pads it with nops. */
apply:
    mov $tsc_slot, %edi
    mov %ecx, %edx
    rep movsb
    mov $SLOT_LEN, %ecx
    sub %edx, %ecx
    mov $0x90, %al
    rep stosb
    ret

/* READS reads through the slot, each above the one before. */
check_slot:
    call tsc_slot
    mov $READS, %edi
1:  mov %eax, %ebx
    mov %edx, %ebp
    call tsc_slot
    cmp %ebp, %edx
    ja 2f
    jb fail
    cmp %ebx, %eax
    jbe fail
2:  dec %edi
    jnz 1b
    ret

/* The alternative's slot: what `rdtsc_ordered()` compiles to. */
    .globl tsc_slot
tsc_slot:
    rdtsc
    nop
    nop
    nop
    ret

    .pushsection .altinstr_replacement, "ax"
    .globl repl_lfence
repl_lfence:
    lfence
    rdtsc
repl_lfence_end:
    .globl repl_rdtscp
repl_rdtscp:
    rdtscp
repl_rdtscp_end:
    .popsection

    .pushsection .altinstructions, "a"
    .long tsc_slot - .
    .long repl_lfence - .
    .word 3 * 32 + 18           /* X86_FEATURE_LFENCE_RDTSC */
    .byte SLOT_LEN, repl_lfence_end - repl_lfence
    .long tsc_slot - .
    .long repl_rdtscp - .
    .word 1 * 32 + 27           /* X86_FEATURE_RDTSCP */
    .byte SLOT_LEN, repl_rdtscp_end - repl_rdtscp
    .popsection

    LIB32
    COMMON_DATA
