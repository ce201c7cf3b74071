/*
 * cpuid: prints what `cpuid` answers for the leaves that decide which
 * instructions a kernel uses (one line "LEAF SUBLEAF REG VALUE" each), then
 * exits with CPUID_EXIT. The answer is the machine's CPUID table, whether
 * KVM applies it or Nyx answers a patched `cpuid` from it.
 */
#include "common.h"

/* Debug-exit value of this guest. */
#define CPUID_EXIT 0x47

.macro QUERY leaf, sub, reg
    PRINT32 "\leaf \sub \reg "
    mov $\leaf, %eax
    mov $\sub, %ecx
    cpuid
    mov %\reg, %eax
    call puthex32
    PRINT32 "\n"
.endm

    MULTIBOOT_HEADER
    START32
    QUERY 0 0 eax
    QUERY 1 0 ecx
    QUERY 1 0 edx
    QUERY 7 0 ebx
    QUERY 7 0 ecx
    QUERY 7 0 edx
    QUERY 0xd 0 eax
    QUERY 0x80000001 0 ecx
    QUERY 0x80000001 0 edx
    .globl done
done:
    EXIT CPUID_EXIT

    LIB32
    COMMON_DATA
