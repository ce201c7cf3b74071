/*
 * triple: prints "working..." and a few computed values, then loads an IDT
 * with limit 0 and executes `int3`: #GP, #DF, triple fault. There is no
 * debug-exit: QEMU with -no-reboot shuts down (exit code 0); Nyx reports a
 * guest crash at `triple_fault_here`. Each value is also stored in
 * `result` (the last store is at `last_result_write`), for debuggers
 * that look for who wrote it.
 */
#include "common.h"

    MULTIBOOT_HEADER
    START32
    PRINT32 "working...\n"

    /* sum of 1..1000 */
    xor %eax, %eax
    mov $1000, %ecx
1:  add %ecx, %eax
    loop 1b
    mov %eax, result
    PRINT32 "sum(1..1000) = "
    call putdec32
    PRINT32 "\n"

    /* fib(30) */
    xor %eax, %eax
    mov $1, %ebx
    mov $30, %ecx
2:  xadd %eax, %ebx
    loop 2b
    mov %eax, result
    PRINT32 "fib(30) = "
    call putdec32
    PRINT32 "\n"

    /* 12! */
    mov $1, %eax
    mov $12, %ecx
3:  mul %ecx
    loop 3b
    .globl last_result_write
last_result_write:
    mov %eax, result
    PRINT32 "12! = "
    call putdec32
    PRINT32 "\n"

    PRINT32 "triple faulting now\n"
    .globl load_empty_idt
load_empty_idt:
    lidt empty_idt
    .globl triple_fault_here
triple_fault_here:
    int3
    PRINT32 "still alive?\n"
    EXIT EXIT_UNEXPECTED

    .data
    .balign 4
    .globl result
result:
    .long 0

    .section .rodata
    .balign 8
empty_idt:
    .word 0
    .long 0

    LIB32
    COMMON_DATA
