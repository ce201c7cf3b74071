/*
 * softint: software interrupts in long mode. Executes `int3` with interrupts
 * disabled and `int $0x30` with interrupts enabled; each handler stores the
 * return address it finds on its stack, and the guest checks that it points
 * just past the instruction, as the CPU's own delivery does. Prints one line
 * per interrupt and exits with SOFTINT_EXIT (UNEXPECTED on a wrong frame).
 * On the emulated KVM of Nyx's build machines both instructions are
 * emulation failures that Nyx delivers itself; on hardware KVM and under
 * QEMU they run natively, with the same output.
 */
#include "common.h"

#define SOFTINT_EXIT 0x48

    MULTIBOOT_HEADER
    START32
    LONGMODE_SWITCH long_entry

    .code64
long_entry:
    ENTER64
    call idt_init64
    mov $3, %edi
    lea on_int3(%rip), %rax
    call set_gate64
    mov $0x30, %edi
    lea on_int30(%rip), %rax
    call set_gate64

    cli
    .globl softint_int3
softint_int3:
    int3
after_int3:
    lea after_int3(%rip), %rax
    cmp %rax, returned(%rip)
    jne bad
    PRINT64 "int3 returned past itself\n"

    sti
    .globl softint_int30
softint_int30:
    int $0x30
after_int30:
    cli
    lea after_int30(%rip), %rax
    cmp %rax, returned(%rip)
    jne bad
    PRINT64 "int $0x30 returned past itself\n"
    mov hits(%rip), %eax
    PRINT64 "handlers run: "
    call putdec64
    PRINT64 "\n"
    cmpl $2, hits(%rip)
    jne bad
    EXIT SOFTINT_EXIT
bad:
    PRINT64 "softint: wrong return address\n"
    EXIT EXIT_UNEXPECTED

on_int3:
    push %rax
    mov 8(%rsp), %rax
    mov %rax, returned(%rip)
    incl hits(%rip)
    pop %rax
    iretq

on_int30:
    push %rax
    mov 8(%rsp), %rax
    mov %rax, returned(%rip)
    incl hits(%rip)
    pop %rax
    iretq

    .section SECTION_DATA64
    .balign 8
returned: .quad 0
hits: .long 0

    LIB32
    LIB64
    COMMON_DATA
