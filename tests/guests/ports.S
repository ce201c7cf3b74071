/*
 * ports: reads unassigned I/O ports at byte, word and dword size (QEMU's
 * `-machine pc` answers all ones, and so must Nyx), writes to them, reads and
 * writes an unassigned MMIO address in the PCI hole (only "mmio read done" is
 * printed: the value may differ between VMMs), reads the PCI host bridge's
 * vendor and device ID through 0xCF8/0xCFC and the CMOS memory-size bytes
 * 0x34/0x35, then exits with PORTS_EXIT. Stays in 32-bit protected mode.
 */
#include "common.h"

/* Debug-exit value of this guest (QEMU exit code 0x45). */
#define PORTS_EXIT 0x22
/* Unassigned in QEMU's pc machine and in Nyx. */
#define UNASSIGNED_MMIO 0xFEB00000

/* Prints "NAME PORT = VALUE" for one `in` of the given width. */
.macro READ_PORT port, width
    mov $\port, %dx
    .if \width == 8
    PRINT32 "in8  0x"
    xor %eax, %eax
    in %dx, %al
    .elseif \width == 16
    PRINT32 "in16 0x"
    xor %eax, %eax
    in %dx, %ax
    .else
    PRINT32 "in32 0x"
    in %dx, %eax
    .endif
    mov %eax, %ebx
    mov $\port, %eax
    call puthex16_32
    PRINT32 " = 0x"
    mov %ebx, %eax
    .if \width == 8
    call puthex8_32
    .elseif \width == 16
    call puthex16_32
    .else
    call puthex32
    .endif
    PRINT32 "\n"
.endm

    MULTIBOOT_HEADER
    START32
    PRINT32 "ports: unassigned I/O ports\n"
    .irp port, 0x100, 0x1234, 0xe000
    READ_PORT \port, 8
    READ_PORT \port, 16
    READ_PORT \port, 32
    .endr

    mov $0x5a, %al
    mov $0x100, %dx
    out %al, %dx
    mov $0x1234, %ax
    mov $0x1234, %dx
    out %ax, %dx
    mov $0xdeadbeef, %eax
    mov $0xe000, %dx
    out %eax, %dx
    PRINT32 "port writes done\n"
    READ_PORT 0x1234, 16

    .globl mmio_read
mmio_read:
    mov UNASSIGNED_MMIO, %eax
    PRINT32 "mmio read done\n"
    movl $0x12345678, UNASSIGNED_MMIO
    PRINT32 "mmio write done\n"

    mov $0x80000000, %eax   /* bus 0, device 0, function 0, register 0 */
    mov $0xcf8, %dx
    out %eax, %dx
    mov $0xcfc, %dx
    in %dx, %eax
    mov %eax, %ebx
    PRINT32 "pci 00:00.0 "
    mov %ebx, %eax
    call puthex16_32
    PRINT32 ":"
    mov %ebx, %eax
    shr $16, %eax
    call puthex16_32
    PRINT32 "\n"

    mov $0x34, %al
    out %al, $0x70
    in $0x71, %al
    mov %al, %bl
    mov $0x35, %al
    out %al, $0x70
    in $0x71, %al
    mov %al, %bh
    PRINT32 "cmos 0x34 = 0x"
    mov %bl, %al
    call puthex8_32
    PRINT32 ", 0x35 = 0x"
    mov %bh, %al
    call puthex8_32
    PRINT32 "\n"
    EXIT PORTS_EXIT

    LIB32
    COMMON_DATA
