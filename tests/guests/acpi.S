/*
 * acpi: the ACPI tables and the PM block, in long mode with the 8259 pair
 * masked. Finds the RSDP by scanning 0xE0000-0xFFFFF on 16-byte boundaries
 * for "RSD PTR " with a valid checksum, checks the XSDT where the RSDP has
 * one (revision 2: its extended checksum, and that it lists the RSDT's
 * tables), follows the RSDT to the FADT
 * (FACP), the MADT (APIC) and the HPET table, and the FADT to the DSDT and
 * FACS, checking every checksum. Prints the FADT's SCI interrupt, SMI
 * command port, ACPI_ENABLE value, PM1a event and control blocks, PM timer
 * block, GPE0 block and their lengths; the MADT's local APIC address, its
 * processors, its IOAPIC, the overrides of ISA IRQ 0 and 9 (the SCI: its
 * trigger mode, not its polarity) and its local APIC NMI; the HPET table's
 * block ID and address. Values that differ between firmwares are not
 * printed (OEM IDs, revisions, the number of overrides). Reads the PM
 * timer until it changes and checks it is 24 bits wide, enables ACPI by
 * writing ACPI_ENABLE to SMI_CMD and waits for PM1_CNT.SCI_EN, then powers
 * off: SLP_TYP 0 | SLP_EN to PM1a_CNT. SLP_TYP 0 is the S5 value of QEMU's
 * PIIX4 (and of Nyx's DSDT), hardcoded rather than evaluated from the
 * DSDT's \_S5_ package. There is no debug-exit: QEMU exits with status 0,
 * Nyx ends the run as powered off; if the machine is still running after
 * a while the guest exits with EXIT_UNEXPECTED.
 */
#include "common.h"
#include "apic.h"

#define SIG_RSD_PTR 0x2052545020445352 /* "RSD PTR " */
#define SIG_RSDT 0x54445352
#define SIG_XSDT 0x54445358
#define SIG_FACP 0x50434146
#define SIG_APIC 0x43495041
#define SIG_HPET 0x54455048
#define SIG_DSDT 0x54445344
#define SIG_FACS 0x53434146
#define SCI_EN 0x0001
#define SLP_TYP_MASK 0x1C00
#define SLP_EN 0x2000
/* S5 sleep type of QEMU's PIIX4 PM (\_S5_ is not evaluated). */
#define SLP_TYP_S5 0

    MULTIBOOT_HEADER
    START32
    LONGMODE_SWITCH long_entry

    .code64
long_entry:
    ENTER64
    call idt_init64
    MASK_8259
    PRINT64 "acpi: 8259 masked\n"

    /* The RSDP. */
    mov $0xE0000, %esi
    movabs $SIG_RSD_PTR, %rdx
1:  cmp $0x100000, %esi
    jae fail
    cmp %rdx, (%rsi)
    jne 2f
    mov $20, %ecx
    call sum_bytes
    test %al, %al
    jz 3f
2:  add $16, %esi
    jmp 1b
3:  mov %rsi, %r12
    PRINT64 "rsdp: found, checksum ok\n"

    /* The RSDT and the tables it lists. */
    movl 16(%r12), %eax
    mov $SIG_RSDT, %edi
    call check_table
    mov %rax, rsdt(%rip)
    PRINT64 "rsdt: checksum ok\n"

    /* ACPI 2.0 and later (Nyx; SeaBIOS's RSDP is revision 0): the RSDP's
     * extended checksum, then the XSDT, which must list the RSDT's tables
     * in the same order. One line either way. */
    cmpb $2, 15(%r12)
    jb 5f
    mov %r12, %rsi
    movl 20(%r12), %ecx
    call sum_bytes
    test %al, %al
    jnz fail
    mov 24(%r12), %rax
    mov $SIG_XSDT, %edi
    call check_table
    mov rsdt(%rip), %rbx
    movl 4(%rbx), %ecx
    sub $36, %ecx
    shr $2, %ecx
    movl 4(%rax), %edx
    sub $36, %edx
    shr $3, %edx
    cmp %ecx, %edx
    jne fail
    test %ecx, %ecx
    jz fail
    add $36, %rbx
    add $36, %rax
6:  movl (%rbx), %edx
    cmp (%rax), %rdx
    jne fail
    add $4, %rbx
    add $8, %rax
    loop 6b
5:  PRINT64 "xsdt: absent, or lists the rsdt's tables\n"
    mov $SIG_FACP, %edi
    call find_table
    mov %rax, %r14
    PRINT64 "facp: checksum ok\n"
    mov $SIG_APIC, %edi
    call find_table
    mov %rax, %r15
    PRINT64 "apic: checksum ok\n"
    mov $SIG_HPET, %edi
    call find_table
    mov %rax, %r13
    PRINT64 "hpet: checksum ok\n"
    movl 40(%r14), %eax
    mov $SIG_DSDT, %edi
    call check_table
    PRINT64 "dsdt: checksum ok\n"
    movl 36(%r14), %eax
    cmpl $SIG_FACS, (%rax)
    jne fail
    PRINT64 "facs: found\n"

    /* FADT fields. */
    PRINT64 "fadt: sci_int "
    movzwl 46(%r14), %eax
    call putdec64
    PRINT64 " smi_cmd 0x"
    movl 48(%r14), %eax
    PUTHEX 2
    PRINT64 " acpi_enable 0x"
    movzbl 52(%r14), %eax
    PUTHEX 2
    PRINT64 "\nfadt: pm1a_evt_blk 0x"
    movl 56(%r14), %eax
    PUTHEX 4
    PRINT64 " pm1a_cnt_blk 0x"
    movl 64(%r14), %eax
    PUTHEX 4
    PRINT64 " pm_tmr_blk 0x"
    movl 76(%r14), %eax
    PUTHEX 4
    PRINT64 " gpe0_blk 0x"
    movl 80(%r14), %eax
    PUTHEX 4
    PRINT64 "\nfadt: lengths pm1_evt "
    movzbl 88(%r14), %eax
    call putdec64
    PRINT64 " pm1_cnt "
    movzbl 89(%r14), %eax
    call putdec64
    PRINT64 " pm_tmr "
    movzbl 91(%r14), %eax
    call putdec64
    PRINT64 " gpe0 "
    movzbl 92(%r14), %eax
    call putdec64
    PRINT64 "\n"

    /* MADT. */
    PRINT64 "madt: local apic 0x"
    movl 36(%r15), %eax
    PUTHEX 8
    PRINT64 " pcat_compat "
    movl 40(%r15), %eax
    and $1, %eax
    call putdec64
    PRINT64 "\n"
    lea 44(%r15), %rbx          /* entry */
    movl 4(%r15), %ebp
    add %r15, %rbp              /* end */
    xor %r8d, %r8d              /* enabled processors */
madt_entry:
    cmp %rbp, %rbx
    jae madt_done
    movzbl (%rbx), %eax
    cmp $0, %eax
    je madt_lapic
    cmp $1, %eax
    je madt_ioapic
    cmp $2, %eax
    je madt_override
    cmp $4, %eax
    je madt_nmi
madt_next:
    movzbl 1(%rbx), %eax
    test %eax, %eax
    jz fail
    add %rax, %rbx
    jmp madt_entry
madt_lapic:
    testb $1, 4(%rbx)
    jz madt_next
    inc %r8d
    jmp madt_next
madt_ioapic:
    PRINT64 "madt: ioapic id "
    movzbl 2(%rbx), %eax
    call putdec64
    PRINT64 " address 0x"
    movl 4(%rbx), %eax
    PUTHEX 8
    PRINT64 " gsi base "
    movl 8(%rbx), %eax
    call putdec64
    PRINT64 "\n"
    jmp madt_next
madt_override:
    movzbl 3(%rbx), %eax
    cmp $0, %eax
    je 1f
    cmp $9, %eax
    jne madt_next
    PRINT64 "madt: irq 9 -> gsi "
    movl 4(%rbx), %eax
    call putdec64
    movzwl 8(%rbx), %eax
    shr $2, %eax
    and $3, %eax
    cmp $3, %eax
    jne 2f
    PRINT64 " level"
2:  PRINT64 "\n"
    jmp madt_next
1:  PRINT64 "madt: irq 0 -> gsi "
    movl 4(%rbx), %eax
    call putdec64
    PRINT64 " flags 0x"
    movzwl 8(%rbx), %eax
    PUTHEX 4
    PRINT64 "\n"
    jmp madt_next
madt_nmi:
    PRINT64 "madt: nmi processor 0x"
    movzbl 2(%rbx), %eax
    PUTHEX 2
    PRINT64 " flags 0x"
    movzwl 3(%rbx), %eax
    PUTHEX 4
    PRINT64 " lint "
    movzbl 5(%rbx), %eax
    call putdec64
    PRINT64 "\n"
    jmp madt_next
madt_done:
    PRINT64 "madt: enabled processors "
    mov %r8d, %eax
    call putdec64
    PRINT64 "\n"

    /* HPET table. */
    PRINT64 "hpet: block id 0x"
    movl 36(%r13), %eax
    PUTHEX 8
    PRINT64 " address 0x"
    mov 44(%r13), %rax
    PUTHEX 16
    PRINT64 "\n"

    /* PM timer: 24 bits, running. */
    movl 76(%r14), %edx
    in %dx, %eax
    mov %eax, %ebx
    mov $1000000, %ecx
1:  in %dx, %eax
    test $0xFF000000, %eax
    jnz fail
    cmp %eax, %ebx
    jne 2f
    loop 1b
    jmp fail
2:  PRINT64 "pm timer: 24-bit, advances\n"

    /* ACPI mode through SMI_CMD. */
    movl 64(%r14), %edx
    in %dx, %ax
    and $SCI_EN, %eax
    PRINT64 "pm1_cnt: sci_en "
    call putdec64
    movl 48(%r14), %edx
    movzbl 52(%r14), %eax
    out %al, %dx
    movl 64(%r14), %edx
    mov $1000000, %ecx
1:  in %dx, %ax
    test $SCI_EN, %ax
    jnz 2f
    loop 1b
    jmp fail
2:  PRINT64 ", after acpi_enable sci_en 1\n"

    /* S5. */
    PRINT64 "s5: slp_typ 0 | slp_en\n"
    in %dx, %ax
    and $~SLP_TYP_MASK, %ax
    or $((SLP_TYP_S5 << 10) | SLP_EN), %ax
    out %ax, %dx
    mov $10000000, %ecx
1:  loop 1b
    PRINT64 "still running after s5\n"
fail:
    PRINT64 "acpi: check failed\n"
    EXIT EXIT_UNEXPECTED

/* %al = sum of the %ecx bytes at %rsi. */
sum_bytes:
    push %rcx
    push %rsi
    push %rdx
    xor %eax, %eax
1:  movb (%rsi), %dl
    add %dl, %al
    inc %rsi
    loop 1b
    pop %rdx
    pop %rsi
    pop %rcx
    ret

/* The table at %eax must have signature %edi and sum to 0; returns it in
 * %rax (zero-extended), or fails. */
check_table:
    push %rcx
    push %rsi
    mov %eax, %eax
    cmpl %edi, (%rax)
    jne fail
    mov %rax, %rsi
    movl 4(%rsi), %ecx
    cmp $36, %ecx
    jb fail
    call sum_bytes
    test %al, %al
    jnz fail
    mov %rsi, %rax
    pop %rsi
    pop %rcx
    ret

/* %rax = the RSDT's table with signature %edi, checked, or fails. */
find_table:
    push %rbx
    push %rcx
    mov rsdt(%rip), %rbx
    movl 4(%rbx), %ecx
    sub $36, %ecx
    shr $2, %ecx
    jz fail
    add $36, %rbx
1:  movl (%rbx), %eax
    cmpl %edi, (%rax)
    je 2f
    add $4, %rbx
    loop 1b
    jmp fail
2:  call check_table
    pop %rcx
    pop %rbx
    ret

    .section .data
    .balign 8
rsdt: .quad 0

    LIB32
    LIB64
    COMMON_DATA
