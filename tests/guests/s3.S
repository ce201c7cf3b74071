/*
 * s3: suspends to ACPI S3 and is woken by the RTC alarm. In 32-bit
 * protected mode without interrupts: finds the FACS (RSDP in the BIOS area,
 * checksum checked, RSDT, FACP, FIRMWARE_CTRL), copies a real-mode resume
 * routine to 0x8000 and puts that address in the FACS's firmware waking
 * vector, sets the RTC alarm to fire every second (all three alarm bytes
 * "don't care") with AIE, enables the RTC as a wake source (PM1_EN.RTC_EN)
 * and writes SLP_TYP 1 (S3 on QEMU's PIIX4 and on Nyx) with SLP_EN. The
 * alarm wakes the machine; the firmware (SeaBIOS under QEMU, Nyx itself)
 * enters the waking vector in real mode with CS = 0x800, IP = 0. The
 * resume routine re-initialises COM1 (QEMU resets the devices on wake),
 * checks that PM1_STS has WAK_STS and RTC_STS, prints what it found and
 * exits with S3_EXIT.
 */
#include "common.h"

#define S3_EXIT 0x55
#define PM1_STS 0x600
#define PM1_EN 0x602
#define PM1_CNT 0x604
#define RTC_EN 0x0400
#define WAK_STS 0x8000
#define RTC_STS 0x0400
#define SLP_EN 0x2000
#define SLP_TYP_S3 (1 << 10)
#define RESUME_AT 0x8000
#define CMOS_INDEX 0x70
#define CMOS_DATA 0x71

    MULTIBOOT_HEADER
    START32
    PRINT32 "s3: looking for the FACS\n"

    /* The RSDP: "RSD PTR " on a 16-byte boundary in 0xE0000-0xFFFFF. */
    mov $0xE0000, %ebx
1:  cmpl $0x20445352, (%ebx)
    jne 2f
    cmpl $0x20525450, 4(%ebx)
    jne 2f
    /* ACPI 1.0 checksum over the first 20 bytes. */
    xor %eax, %eax
    xor %ecx, %ecx
3:  add (%ebx,%ecx), %al
    inc %ecx
    cmp $20, %ecx
    jb 3b
    test %al, %al
    jz found_rsdp
2:  add $16, %ebx
    cmp $0x100000, %ebx
    jb 1b
    PRINT32 "s3: no RSDP\n"
    EXIT EXIT_UNEXPECTED

found_rsdp:
    PRINT32 "s3: rsdp ok\n"
    mov 16(%ebx), %esi          /* RSDT */
    cmpl $0x54445352, (%esi)    /* "RSDT" */
    jne bad_table
    mov 4(%esi), %ecx           /* length */
    lea 36(%esi), %edi
    add %esi, %ecx
4:  cmp %ecx, %edi
    jae bad_table
    mov (%edi), %edx
    cmpl $0x50434146, (%edx)    /* "FACP" */
    je found_fadt
    add $4, %edi
    jmp 4b

found_fadt:
    mov 36(%edx), %edi          /* FIRMWARE_CTRL: the FACS */
    cmpl $0x53434146, (%edi)    /* "FACS" */
    jne bad_table
    PRINT32 "s3: facs found\n"
    movl $RESUME_AT, 12(%edi)   /* firmware waking vector */
    movl $0, 24(%edi)           /* X_FIRMWARE_WAKING_VECTOR low */
    movl $0, 28(%edi)           /* and high: use the real-mode vector */

    /* The resume routine to 0x8000. */
    mov $resume_start, %esi
    mov $RESUME_AT, %edi
    mov $(resume_end - resume_start), %ecx
    rep movsb

    /* RTC alarm every second: alarm bytes 0xFF ("don't care"), AIE. */
    mov $0x01, %al
    out %al, $CMOS_INDEX
    mov $0xFF, %al
    out %al, $CMOS_DATA
    mov $0x03, %al
    out %al, $CMOS_INDEX
    mov $0xFF, %al
    out %al, $CMOS_DATA
    mov $0x05, %al
    out %al, $CMOS_INDEX
    mov $0xFF, %al
    out %al, $CMOS_DATA
    mov $0x0B, %al
    out %al, $CMOS_INDEX
    in $CMOS_DATA, %al
    or $0x20, %al               /* AIE */
    mov %al, %ah
    mov $0x0B, %al
    out %al, $CMOS_INDEX
    mov %ah, %al
    out %al, $CMOS_DATA
    mov $0x0C, %al              /* reading C clears pending flags */
    out %al, $CMOS_INDEX
    in $CMOS_DATA, %al

    /* Clear PM1 status, enable the RTC wake, sleep. */
    mov $PM1_STS, %dx
    mov $0xFFFF, %ax
    out %ax, %dx
    mov $PM1_EN, %dx
    mov $RTC_EN, %ax
    out %ax, %dx
    PRINT32 "s3: sleeping\n"
    mov $PM1_CNT, %dx
    mov $(SLP_TYP_S3 | SLP_EN), %ax
    out %ax, %dx
    /* Only a machine that did not sleep gets here. */
5:  PRINT32 "s3: did not sleep\n"
    EXIT EXIT_UNEXPECTED

bad_table:
    PRINT32 "s3: bad table\n"
    EXIT EXIT_UNEXPECTED

/* Real-mode code, copied to RESUME_AT and entered at CS = RESUME_AT >> 4,
 * IP = 0; it addresses its data relative to CS. */
    .code16
    .globl resume_start
resume_start:
    cli
    mov %cs, %ax
    mov %ax, %ds
    /* COM1: 115200 8N1, FIFOs on. */
    mov $(COM1 + 1), %dx
    xor %al, %al
    out %al, %dx
    mov $(COM1 + 3), %dx
    mov $0x80, %al
    out %al, %dx
    mov $COM1, %dx
    mov $1, %al
    out %al, %dx
    mov $(COM1 + 1), %dx
    xor %al, %al
    out %al, %dx
    mov $(COM1 + 3), %dx
    mov $0x03, %al
    out %al, %dx
    mov $(COM1 + 2), %dx
    mov $0xC7, %al
    out %al, %dx
    mov $(COM1 + 4), %dx
    mov $0x03, %al
    out %al, %dx

    mov $(msg_woke - resume_start), %si
    call rputs
    mov $PM1_STS, %dx
    in %dx, %ax
    mov %ax, %bx
    and $(WAK_STS | RTC_STS), %bx
    cmp $(WAK_STS | RTC_STS), %bx
    jne 6f
    mov $(msg_rtc - resume_start), %si
    call rputs
    mov $S3_EXIT, %eax
    out %eax, $DEBUG_EXIT_PORT
7:  hlt
    jmp 7b
6:  mov $(msg_bad - resume_start), %si
    call rputs
    mov $EXIT_UNEXPECTED, %eax
    out %eax, $DEBUG_EXIT_PORT
    jmp 7b

/* Prints the NUL-terminated string at DS:SI. */
rputs:
    lodsb
    test %al, %al
    jz 9f
    mov %al, %ah
    mov $(COM1 + 5), %dx
8:  in %dx, %al
    test $0x20, %al
    jz 8b
    mov $COM1, %dx
    mov %ah, %al
    out %al, %dx
    jmp rputs
9:  ret

msg_woke: .asciz "s3: woke in real mode at the waking vector\n"
msg_rtc: .asciz "s3: PM1_STS has WAK_STS and RTC_STS\n"
msg_bad: .asciz "s3: PM1_STS lacks WAK_STS or RTC_STS\n"
resume_end:
    .code32

    LIB32
    COMMON_DATA
