/*
 * hello: prints a greeting and the Multiboot information it was given
 * (mem_lower, mem_upper, the command line), then exits with HELLO_EXIT.
 */
#include "common.h"

/* Debug-exit value of this guest (QEMU exit code 0x43). */
#define HELLO_EXIT 0x21

    MULTIBOOT_HEADER
    START32
    PRINT32 "Hello from a Nyx guest!\n"
    cmpl $MULTIBOOT_BOOT_MAGIC, mb_magic
    je 1f
    PRINT32 "bad multiboot magic 0x"
    mov mb_magic, %eax
    call puthex32
    PRINT32 "\n"
    jmp done
1:  mov mb_info, %ebx
    testl $1, (%ebx)
    jz 2f
    PRINT32 "mem_lower "
    mov 4(%ebx), %eax
    call putdec32
    PRINT32 " KiB\nmem_upper "
    mov 8(%ebx), %eax
    call putdec32
    PRINT32 " KiB\n"
2:  testl $4, (%ebx)
    jz 3f
    PRINT32 "cmdline \""
    mov 16(%ebx), %esi
    call puts32
    PRINT32 "\"\n"
    jmp done
3:  PRINT32 "no cmdline\n"
    .globl done
done:
    EXIT HELLO_EXIT

    LIB32
    COMMON_DATA
