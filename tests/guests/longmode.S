/*
 * longmode: enters long mode with 4-level paging, maps the first GiB both at
 * its physical address and at VIRT_OFFSET + physical (PDPT entry 3), jumps to
 * the higher-half alias (`higher_half_entry`), sets up an IDT there, takes a
 * few PIT ticks, writes the global `counter` along the way, and exits with
 * LONGMODE_EXIT (0: QEMU exit code 1). No software `int n`: the emulated KVM
 * of Nyx's build machines fails to emulate it in long mode (an emulation
 * failure), while injected hardware interrupts work.
 * Everything after the jump is linked at its higher-half address.
 */
#define SECTION_TEXT64 .high.text, "ax", @progbits
#define SECTION_RODATA64 .high.rodata, "a", @progbits
#define SECTION_DATA64 .high.data, "aw", @progbits
#include "common.h"

#define LONGMODE_EXIT 0x00
#define TICKS_WANTED 5

    MULTIBOOT_HEADER
    START32
    PRINT32 "longmode: protected mode, enabling paging\n"
    movl $(pd + 3), pdpt + 3 * 8    /* 0xC0000000.. -> physical 0.. */
    LONGMODE_SWITCH long_entry

    /* Identity-mapped 64-bit code: just jump to the higher half. */
    .code64
long_entry:
    ENTER64
    mov $higher_half_entry, %eax
    jmp *%rax

    .section SECTION_TEXT64
    .code64
    .globl higher_half_entry
    .type higher_half_entry, @function
higher_half_entry:
    movq $1, counter(%rip)
    PRINT64 "long mode: running at 0x"
    lea higher_half_entry(%rip), %rax
    call puthex64
    PRINT64 "\n"
    call idt_init64
    mov $0x20, %edi
    lea irq0(%rip), %rax
    call set_gate64

    movq $2, counter(%rip)

    PIC_REMAP 0xFE, 0xFF
    PIT_RATE PIT_DIVISOR_1KHZ
1:  cli
    cmpl $TICKS_WANTED, ticks(%rip)
    jae 2f
    sti
    hlt
    jmp 1b
2:  PRINT64 "timer: "
    mov ticks(%rip), %eax
    call putdec64
    PRINT64 " ticks\n"
    movq $3, counter(%rip)
    addq $39, counter(%rip)
    PRINT64 "counter = "
    mov counter(%rip), %rax
    call putdec64
    PRINT64 "\ndone\n"
    EXIT LONGMODE_EXIT
    .globl irq0
irq0:
    push %rax
    incl ticks(%rip)
    /* stop the PIT interrupts once enough ticks are in */
    cmpl $TICKS_WANTED, ticks(%rip)
    jb 1f
    mov $0xFF, %al
    out %al, $0x21
1:  EOI_MASTER
    pop %rax
    iretq

    .section SECTION_DATA64
    .balign 8
    .globl counter
    .type counter, @object
    .size counter, 8
counter: .quad 0
ticks: .long 0

    LIB32
    LIB64
    COMMON_DATA
