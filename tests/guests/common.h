/*
 * Shared macros of the Nyx test guests: the Multiboot v1 header, the 32-bit
 * entry, COM1 polling output, the debug-exit port, the switch to long mode
 * (4-level paging, 2 MiB pages identity-mapping the first GiB), a 64-bit IDT,
 * and PIC/PIT programming. Each guest includes this file once and expands the
 * library macros it needs exactly once.
 *
 * Calling convention of the print routines: argument in %eax/%rax (value) or
 * %esi/%rsi (NUL-terminated string), digit count in %ecx; every register is
 * preserved.
 */

#define COM1 0x3f8
#define DEBUG_EXIT_PORT 0xf4
#define MULTIBOOT_MAGIC 0x1BADB002
#define MULTIBOOT_FLAGS 0x00000003 /* page-aligned modules, memory info */
#define MULTIBOOT_BOOT_MAGIC 0x2BADB002
/* Exit value used by the exception handlers: something went wrong. */
#define EXIT_UNEXPECTED 0x7f
/* Virtual offset of the higher-half alias (PDPT entry 3 maps physical 0..1 GiB). */
#define VIRT_OFFSET 0xC0000000
/* PIT input clock / 1000: a 1 kHz tick. */
#define PIT_DIVISOR_1KHZ 1193

/* Sections used by the 64-bit library; a guest running in the higher half
 * defines them before including this file. */
#ifndef SECTION_TEXT64
#define SECTION_TEXT64 .text
#define SECTION_RODATA64 .rodata
#define SECTION_DATA64 .data
#endif

.macro MULTIBOOT_HEADER
    .section .multiboot, "a"
    .balign 4
    .long MULTIBOOT_MAGIC
    .long MULTIBOOT_FLAGS
    .long -(MULTIBOOT_MAGIC + MULTIBOOT_FLAGS)
.endm

/* The first instructions of every guest: stack, saved boot registers, COM1. */
.macro START32
    .section .text
    .code32
    .globl _start
    .type _start, @function
_start:
    cli
    cld
    mov $stack_top, %esp
    mov %eax, mb_magic
    mov %ebx, mb_info
    call serial_init32
.endm

/* Writes \value to the debug-exit port (QEMU exits with (\value << 1) | 1),
 * then halts for good. Works in 32- and 64-bit code. */
.macro EXIT value
    mov $\value, %eax
    out %eax, $DEBUG_EXIT_PORT
9001:
    cli
    hlt
    jmp 9001b
.endm

.macro PRINT32 str
    .pushsection .rodata
.Lstr32_\@:
    .asciz "\str"
    .popsection
    push %esi
    mov $.Lstr32_\@, %esi
    call puts32
    pop %esi
.endm

.macro PRINT64 str
    .pushsection SECTION_RODATA64
.Lstr64_\@:
    .asciz "\str"
    .popsection
    push %rsi
    lea .Lstr64_\@(%rip), %rsi
    call puts64
    pop %rsi
.endm

/* Common data: stack, boot registers, page tables. */
.macro COMMON_DATA
    .section .bss
    .balign 4096
    .globl pml4, pdpt, pd
pml4: .skip 4096
pdpt: .skip 4096
pd: .skip 4096
stack_bottom: .skip 16384
    .globl stack_top
stack_top:
    .globl mb_magic, mb_info
mb_magic: .skip 4
mb_info: .skip 4

    .section .rodata
hexdigits32: .ascii "0123456789abcdef"
    .balign 8
gdt64:
    .quad 0
    .quad 0x00AF9A000000FFFF /* 0x08: 64-bit code */
    .quad 0x00CF92000000FFFF /* 0x10: data */
gdt64_end:
    .balign 8
gdt64_ptr:
    .word gdt64_end - gdt64 - 1
    .long gdt64
    .long 0
.endm

/* 32-bit COM1 routines. */
.macro LIB32
    .section .text
    .code32
serial_init32:
    push %eax
    push %edx
    mov $(COM1 + 1), %dx
    xor %al, %al
    out %al, %dx        /* IER: no interrupts */
    mov $(COM1 + 3), %dx
    mov $0x80, %al
    out %al, %dx        /* LCR: DLAB */
    mov $COM1, %dx
    mov $1, %al
    out %al, %dx        /* DLL: 115200 baud */
    mov $(COM1 + 1), %dx
    xor %al, %al
    out %al, %dx        /* DLM */
    mov $(COM1 + 3), %dx
    mov $0x03, %al
    out %al, %dx        /* LCR: 8N1 */
    mov $(COM1 + 2), %dx
    xor %al, %al
    out %al, %dx        /* FCR: no FIFO */
    mov $(COM1 + 4), %dx
    mov $0x03, %al
    out %al, %dx        /* MCR: DTR, RTS */
    pop %edx
    pop %eax
    ret

    .globl putc32
putc32:
    push %edx
    push %eax
    mov $(COM1 + 5), %dx
1:  in %dx, %al
    test $0x20, %al     /* LSR.THRE */
    jz 1b
    pop %eax
    mov $COM1, %dx
    out %al, %dx
    pop %edx
    ret

puts32:
    push %eax
    push %esi
1:  lodsb
    test %al, %al
    jz 2f
    call putc32
    jmp 1b
2:  pop %esi
    pop %eax
    ret

putdec32:
    pusha
    mov $10, %ecx
    xor %ebx, %ebx
1:  xor %edx, %edx
    div %ecx
    push %edx
    inc %ebx
    test %eax, %eax
    jnz 1b
2:  pop %eax
    add $'0', %al
    call putc32
    dec %ebx
    jnz 2b
    popa
    ret

puthex32:
    push %ecx
    mov $8, %ecx
    call puthexn32
    pop %ecx
    ret

puthex8_32:
    push %ecx
    mov $2, %ecx
    call puthexn32
    pop %ecx
    ret

puthex16_32:
    push %ecx
    mov $4, %ecx
    call puthexn32
    pop %ecx
    ret

/* The low %ecx (1..8) hex digits of %eax. */
puthexn32:
    pusha
    mov %eax, %edx
    mov $8, %ebx
    sub %ecx, %ebx
    shl $2, %ebx
    xchg %ecx, %ebx
    shl %cl, %edx
    xchg %ecx, %ebx
1:  rol $4, %edx
    mov %edx, %eax
    and $0xf, %eax
    movb hexdigits32(%eax), %al
    call putc32
    loop 1b
    popa
    ret
.endm

/* Enters long mode and far-jumps to \target (64-bit code). Identity-maps the
 * first GiB with 2 MiB pages; a guest may add PDPT entries before. */
.macro LONGMODE_SWITCH target
    mov $pd, %edi
    mov $0x83, %eax     /* present, writable, 2 MiB */
    mov $512, %ecx
1:  mov %eax, (%edi)
    movl $0, 4(%edi)
    add $0x200000, %eax
    add $8, %edi
    loop 1b
    movl $(pd + 3), pdpt
    movl $(pdpt + 3), pml4
    mov %cr4, %eax
    or $0x20, %eax      /* PAE */
    mov %eax, %cr4
    mov $pml4, %eax
    mov %eax, %cr3
    mov $0xC0000080, %ecx
    rdmsr
    or $0x100, %eax     /* EFER.LME */
    wrmsr
    mov %cr0, %eax
    or $0x80000001, %eax /* PG, PE */
    mov %eax, %cr0
    lgdt gdt64_ptr
    ljmp $0x08, $\target
.endm

/* First instructions in 64-bit mode. */
.macro ENTER64
    .code64
    mov $0x10, %ax
    mov %ax, %ds
    mov %ax, %es
    mov %ax, %ss
    mov %ax, %fs
    mov %ax, %gs
    mov $stack_top, %esp
.endm

.macro PIC_REMAP mask_master, mask_slave
    mov $0x11, %al
    out %al, $0x20
    out %al, $0xA0
    mov $0x20, %al
    out %al, $0x21
    mov $0x28, %al
    out %al, $0xA1
    mov $0x04, %al
    out %al, $0x21
    mov $0x02, %al
    out %al, $0xA1
    mov $0x01, %al
    out %al, $0x21
    out %al, $0xA1
    mov $\mask_master, %al
    out %al, $0x21
    mov $\mask_slave, %al
    out %al, $0xA1
.endm

/* PIT channel 0, lobyte/hibyte, mode 2 (rate generator). */
.macro PIT_RATE divisor
    mov $0x34, %al
    out %al, $0x43
    mov $((\divisor) & 0xff), %al
    out %al, $0x40
    mov $((\divisor) >> 8), %al
    out %al, $0x40
.endm

.macro EOI_MASTER
    mov $0x20, %al
    out %al, $0x20
.endm

/* 64-bit COM1 routines, the IDT and its default handlers. */
.macro LIB64
    .section SECTION_TEXT64
    .code64
putc64:
    push %rdx
    push %rax
    mov $(COM1 + 5), %dx
1:  in %dx, %al
    test $0x20, %al
    jz 1b
    pop %rax
    mov $COM1, %dx
    out %al, %dx
    pop %rdx
    ret

puts64:
    push %rax
    push %rsi
1:  lodsb
    test %al, %al
    jz 2f
    call putc64
    jmp 1b
2:  pop %rsi
    pop %rax
    ret

putdec64:
    push %rax
    push %rbx
    push %rcx
    push %rdx
    mov $10, %ecx
    xor %ebx, %ebx
1:  xor %edx, %edx
    div %rcx
    push %rdx
    inc %ebx
    test %rax, %rax
    jnz 1b
2:  pop %rax
    add $'0', %al
    call putc64
    dec %ebx
    jnz 2b
    pop %rdx
    pop %rcx
    pop %rbx
    pop %rax
    ret

puthex64:
    push %rcx
    mov $16, %ecx
    call puthexn64
    pop %rcx
    ret

puthex16_64:
    push %rcx
    mov $4, %ecx
    call puthexn64
    pop %rcx
    ret

/* The low %ecx (1..16) hex digits of %rax. */
puthexn64:
    push %rax
    push %rbx
    push %rcx
    push %rdx
    push %rsi
    mov %rax, %rdx
    mov $16, %ebx
    sub %ecx, %ebx
    shl $2, %ebx
    xchg %ecx, %ebx
    shl %cl, %rdx
    xchg %ecx, %ebx
    lea hexdigits64(%rip), %rsi
1:  rol $4, %rdx
    mov %edx, %eax
    and $0xf, %eax
    movb (%rsi,%rax), %al
    call putc64
    loop 1b
    pop %rsi
    pop %rdx
    pop %rcx
    pop %rbx
    pop %rax
    ret

/* Gate %edi (vector) -> handler %rax: present, DPL 0, 64-bit interrupt gate. */
set_gate64:
    push %rax
    push %rdi
    push %rsi
    and $0xff, %edi
    shl $4, %edi
    lea idt64(%rip), %rsi
    add %rsi, %rdi
    mov %ax, (%rdi)
    movw $0x08, 2(%rdi)
    movw $0x8E00, 4(%rdi)
    shr $16, %rax
    mov %ax, 6(%rdi)
    shr $16, %rax
    mov %eax, 8(%rdi)
    movl $0, 12(%rdi)
    pop %rsi
    pop %rdi
    pop %rax
    ret

/* Points vectors 0-31 at exception stubs and the rest at unexpected_irq. */
idt_init64:
    push %rax
    push %rdi
    xor %edi, %edi
    lea exception_stubs(%rip), %rax
1:  call set_gate64
    add $16, %rax
    inc %edi
    cmp $32, %edi
    jb 1b
    lea unexpected_irq(%rip), %rax
2:  call set_gate64
    inc %edi
    cmp $256, %edi
    jb 2b
    lidt idt64_ptr(%rip)
    pop %rdi
    pop %rax
    ret

    .balign 16
exception_stubs:
    .set vector, 0
    .rept 32
    .balign 16
    push $vector
    jmp exception_common
    .set vector, vector + 1
    .endr

exception_common:
    PRINT64 "unexpected exception 0x"
    mov (%rsp), %rax
    push %rcx
    mov $2, %ecx
    call puthexn64
    pop %rcx
    mov $10, %al
    call putc64
    EXIT EXIT_UNEXPECTED

unexpected_irq:
    PRINT64 "unexpected interrupt\n"
    EXIT EXIT_UNEXPECTED

    .section SECTION_RODATA64
hexdigits64: .ascii "0123456789abcdef"
    .balign 8
idt64_ptr:
    .word 256 * 16 - 1
    .long idt64
    .long 0

    .section SECTION_DATA64
    .balign 16
idt64: .skip 256 * 16
.endm
