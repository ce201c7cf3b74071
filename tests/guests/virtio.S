/*
 * virtio: a small virtio 1.x (modern, non-legacy) PCI driver, the acceptance
 * test of virtio-blk, virtio-rng and virtio-console behind PCI. In long mode
 * with the 8259 pair and the IOAPIC masked and the local APIC enabled; its
 * timer runs periodically as a watchdog (a request that does not complete in
 * TIMEOUT_TICKS ticks is an error), and its ticks are never printed.
 *
 * Enumerates bus 0 through configuration mechanism #1 (ports 0xCF8/0xCFC),
 * every function of every slot, and prints each virtio device (vendor
 * 0x1AF4, device 0x1040..0x107F) as "pci 00:SS.F 1af4:DDDD NAME"; any other
 * device is ignored. Memory decoding of every virtio function is turned off
 * before its BARs are moved. For the first virtio-blk (0x1042), virtio-rng
 * (0x1044) and virtio-console (0x1043), in that order:
 *
 * - walks the capability list for the virtio capabilities (vendor-specific,
 *   ID 0x09: common, notify with its multiplier, ISR, device configuration;
 *   the first of each type) and MSI-X (ID 0x11);
 * - sizes each BAR they live in (all ones written, read back, restored; 32-
 *   or 64-bit memory BARs) and places it, naturally aligned, at the next free
 *   address from 0xE0000000 (the fourth GiB is mapped uncached); enables
 *   memory space and bus master (INTx off);
 * - enables MSI-X with table entry 0 aimed at the local APIC (0xFEE00000,
 *   the device's own vector, unmasked);
 * - initialises the device: reset (status 0, read back until 0),
 *   ACKNOWLEDGE, DRIVER, device features (select 0 and 1), driver features
 *   (only the bits it negotiates, read back), FEATURES_OK (read back),
 *   config_msix_vector = NO_VECTOR (read back); per queue a size of QSIZE,
 *   queue_msix_vector = 0 (read back), the rings in guest RAM, queue_enable;
 *   DRIVER_OK.
 *
 * Each request is completed by the device's MSI-X interrupt: the guest
 * idles (sti; hlt) until the used index moved and the interrupt arrived,
 * then prints the used length. virtio-blk (features printed masked to RO,
 * BLK_SIZE, FLUSH, DISCARD, WRITE_ZEROES and VERSION_1; it accepts
 * VERSION_1, FLUSH, DISCARD and WRITE_ZEROES): capacity; a read of sectors
 * 0..7 (FNV-1a 32 hash of the data); a write of sectors 16..23 with the
 * pattern byte i = (7 * i + i / 512) mod 256 of the 4 KiB, a flush, the read
 * back (compared, hashed); WRITE_ZEROES of sectors 32..39 and their read back
 * (all zero?); DISCARD of sectors 40..47; GET_ID (the serial string); a read
 * of the sector at the capacity (out of range: IOERR) and a request of the
 * unknown type 0x55 (UNSUPP); the number of interrupts, one per request.
 * virtio-rng: one 16-byte request (only its used length is printed).
 * virtio-console (not MULTIPORT): a 64-byte receive buffer posted on queue
 * 0, the line "hello from virtio-console" sent on queue 1 (the transmitq).
 * Only virtio-blk's interrupts are counted aloud: a device may send a
 * used-buffer notification that used nothing (QEMU's virtio-serial does,
 * for the queue kick it gives itself at DRIVER_OK, merged with the guest's
 * own kick or not, depending on timing); the driver tolerates it.
 *
 * Nothing that is a QEMU implementation detail is printed: no BAR address or
 * size, capability offset, maximum queue size, subsystem ID, random byte or
 * feature bit outside the masks. Exits with VIRTIO_EXIT, or EXIT_UNEXPECTED
 * after "NAME: error: ..." or when a device is missing.
 *
 * The driver itself (PCI, BARs, MSI-X, device initialisation, virtqueues,
 * virtio-blk requests) is in virtio.h, shared with the virtio-blk benchmark
 * guests.
 */
#include "common.h"
#include "apic.h"
#include "virtio.h"

/* Debug-exit value of this guest (QEMU exit code 0xb3). */
#define VIRTIO_EXIT 0x59
#define RNG_VECTOR 0x42
#define CON_VECTOR 0x43

    MULTIBOOT_HEADER
    START32
    MAP_MMIO_GIB3
    LONGMODE_SWITCH long_entry

    .code64
long_entry:
    ENTER64
    VIRTIO_PLATFORM_INIT
    mov $RNG_VECTOR, %edi
    lea rng_irq(%rip), %rax
    call set_gate64
    mov $CON_VECTOR, %edi
    lea con_irq(%rip), %rax
    call set_gate64
    PRINT64 "virtio: 8259 masked, local apic enabled\n"

    call pci_scan
    lea blk_dev(%rip), %rbx
    call blk_test
    lea rng_dev(%rip), %rbx
    call rng_test
    lea con_dev(%rip), %rbx
    call con_test
    cmpl $0, missing(%rip)
    je 1f
    EXIT EXIT_UNEXPECTED
1:  PRINT64 "virtio: done\n"
    EXIT VIRTIO_EXIT

/* ---- virtio-blk ------------------------------------------------------ */

/* Prints "status S, used %eax". */
blk_print_result:
    push %rax
    PRINT64 "status "
    movzbl blk_status(%rip), %eax
    call putdec64
    PRINT64 ", used "
    mov (%rsp), %eax
    call putdec64
    pop %rax
    ret

/* %eax = the FNV-1a 32-bit hash of the %ecx bytes at %rsi. */
fnv1a:
    push %rcx
    push %rdx
    push %rsi
    mov $0x811c9dc5, %eax
    test %ecx, %ecx
    jz 2f
1:  movzbl (%rsi), %edx
    xor %edx, %eax
    imul $0x01000193, %eax, %eax
    inc %rsi
    dec %ecx
    jnz 1b
2:  pop %rsi
    pop %rdx
    pop %rcx
    ret

/* Prints ", fnv1a 0xHASH" of the 4 KiB at %rsi. */
print_hash:
    push %rax
    push %rcx
    mov $BLK_BUF_LEN, %ecx
    call fnv1a
    PRINT64 ", fnv1a 0x"
    PUTHEX 8
    pop %rcx
    pop %rax
    ret

/* Fills the 4 KiB blk_buf2 with the byte %al. */
fill_buf2:
    push %rcx
    push %rdi
    lea blk_buf2(%rip), %rdi
    mov $BLK_BUF_LEN, %ecx
    rep stosb
    pop %rdi
    pop %rcx
    ret

/* The virtio-blk device at %rbx. */
blk_test:
    cmpl $0, DEV_CFG(%rbx)
    jne 1f
    DEV_PREFIX
    PRINT64 "not found\n"
    incl missing(%rip)
    ret
1:  push %r8
    push %r9
    push %r10
    push %r11
    push %r12
    push %r13
    call blk_setup

    /* Read sectors 0..7. */
    DEV_PREFIX
    PRINT64 "read sectors 0-7: "
    mov $BLK_T_IN, %r8d
    xor %r9d, %r9d
    lea blk_buf(%rip), %r10
    mov $BLK_BUF_LEN, %r11d
    mov $DESC_F_WRITE, %r12d
    call blk_request
    call blk_print_result
    lea blk_buf(%rip), %rsi
    call print_hash
    PRINT64 "\n"

    /* Write sectors 16..23: byte i = (7 * i + i / 512) mod 256. */
    lea blk_buf(%rip), %rdi
    xor %ecx, %ecx
1:  imul $7, %ecx, %eax
    mov %ecx, %edx
    shr $9, %edx
    add %edx, %eax
    mov %al, (%rdi,%rcx)
    inc %ecx
    cmp $BLK_BUF_LEN, %ecx
    jb 1b
    DEV_PREFIX
    PRINT64 "write sectors 16-23: "
    mov $BLK_T_OUT, %r8d
    mov $16, %r9d
    lea blk_buf(%rip), %r10
    mov $BLK_BUF_LEN, %r11d
    xor %r12d, %r12d
    call blk_request
    call blk_print_result
    lea blk_buf(%rip), %rsi
    call print_hash
    PRINT64 "\n"

    /* Flush. */
    DEV_PREFIX
    btq $9, DEV_FEATURES(%rbx)
    jc 1f
    PRINT64 "flush not negotiated\n"
    jmp 2f
1:  PRINT64 "flush: "
    mov $BLK_T_FLUSH, %r8d
    xor %r9d, %r9d
    xor %r11d, %r11d
    call blk_request
    call blk_print_result
    PRINT64 "\n"

    /* Read sectors 16..23 back. */
2:  mov $0xff, %al
    call fill_buf2
    DEV_PREFIX
    PRINT64 "read sectors 16-23: "
    mov $BLK_T_IN, %r8d
    mov $16, %r9d
    lea blk_buf2(%rip), %r10
    mov $BLK_BUF_LEN, %r11d
    mov $DESC_F_WRITE, %r12d
    call blk_request
    call blk_print_result
    lea blk_buf(%rip), %rsi
    lea blk_buf2(%rip), %rdi
    mov $BLK_BUF_LEN, %ecx
    repe cmpsb
    je 1f
    PRINT64 ", differs from what was written"
    jmp 2f
1:  PRINT64 ", matches what was written"
2:  lea blk_buf2(%rip), %rsi
    call print_hash
    PRINT64 "\n"

    /* Write zeroes to sectors 32..39, read them back. */
    DEV_PREFIX
    btq $14, DEV_FEATURES(%rbx)
    jc 1f
    PRINT64 "write zeroes not negotiated\n"
    jmp 3f
1:  PRINT64 "write zeroes sectors 32-39: "
    lea blk_seg(%rip), %rdi
    movq $32, 0(%rdi)           /* sector */
    movl $8, 8(%rdi)            /* num_sectors */
    movl $0, 12(%rdi)           /* flags: no unmap */
    mov $BLK_T_WRITE_ZEROES, %r8d
    xor %r9d, %r9d
    mov %rdi, %r10
    mov $16, %r11d
    xor %r12d, %r12d
    call blk_request
    call blk_print_result
    PRINT64 "\n"
    mov $0xff, %al
    call fill_buf2
    DEV_PREFIX
    PRINT64 "read sectors 32-39: "
    mov $BLK_T_IN, %r8d
    mov $32, %r9d
    lea blk_buf2(%rip), %r10
    mov $BLK_BUF_LEN, %r11d
    mov $DESC_F_WRITE, %r12d
    call blk_request
    call blk_print_result
    lea blk_buf2(%rip), %rdi
    mov $BLK_BUF_LEN, %ecx
    xor %eax, %eax
    repe scasb
    je 1f
    PRINT64 ", not all zero\n"
    jmp 3f
1:  PRINT64 ", all zero\n"

    /* Discard sectors 40..47. */
3:  DEV_PREFIX
    btq $13, DEV_FEATURES(%rbx)
    jc 1f
    PRINT64 "discard not negotiated\n"
    jmp 2f
1:  PRINT64 "discard sectors 40-47: "
    lea blk_seg(%rip), %rdi
    movq $40, 0(%rdi)
    movl $8, 8(%rdi)
    movl $0, 12(%rdi)
    mov $BLK_T_DISCARD, %r8d
    xor %r9d, %r9d
    mov %rdi, %r10
    mov $16, %r11d
    xor %r12d, %r12d
    call blk_request
    call blk_print_result
    PRINT64 "\n"

    /* GET_ID: the serial, up to 20 bytes, NUL-terminated if shorter. */
2:  lea blk_id(%rip), %rdi
    mov $BLK_ID_BYTES, %ecx
    xor %eax, %eax
    rep stosb
    DEV_PREFIX
    PRINT64 "get id: "
    mov $BLK_T_GET_ID, %r8d
    xor %r9d, %r9d
    lea blk_id(%rip), %r10
    mov $BLK_ID_BYTES, %r11d
    mov $DESC_F_WRITE, %r12d
    call blk_request
    call blk_print_result
    PRINT64 ", id "
    mov $0x22, %al              /* '"' */
    call putc64
    lea blk_id(%rip), %rsi
    mov $BLK_ID_BYTES, %ecx
1:  lodsb
    test %al, %al
    jz 2f
    cmp $0x20, %al
    jb 3f
    cmp $0x7e, %al
    jbe 4f
3:  mov $'?', %al
4:  call putc64
    loop 1b
2:  mov $0x22, %al
    call putc64
    PRINT64 "\n"

    /* A read of one sector at the capacity: out of range. */
    DEV_PREFIX
    PRINT64 "read sector "
    mov blk_capacity(%rip), %rax
    call putdec64
    PRINT64 " (past the end): "
    mov $BLK_T_IN, %r8d
    mov blk_capacity(%rip), %r9
    lea blk_buf2(%rip), %r10
    mov $SECTOR_SIZE, %r11d
    mov $DESC_F_WRITE, %r12d
    call blk_request
    call blk_print_result
    PRINT64 "\n"

    /* A request of an unknown type. */
    DEV_PREFIX
    PRINT64 "request type 0x55: "
    mov $BLK_T_UNKNOWN, %r8d
    xor %r9d, %r9d
    xor %r11d, %r11d
    call blk_request
    call blk_print_result
    PRINT64 "\n"

    call print_irqs
    pop %r13
    pop %r12
    pop %r11
    pop %r10
    pop %r9
    pop %r8
    ret

/* Prints "NAME: interrupts N" for the device at %rbx. */
print_irqs:
    push %rax
    DEV_PREFIX
    PRINT64 "interrupts "
    mov DEV_IRQS(%rbx), %eax
    call putdec64
    PRINT64 "\n"
    pop %rax
    ret

/* ---- virtio-rng ------------------------------------------------------ */

/* The virtio-rng device at %rbx: one 16-byte request. */
rng_test:
    cmpl $0, DEV_CFG(%rbx)
    jne 1f
    DEV_PREFIX
    PRINT64 "not found\n"
    incl missing(%rip)
    ret
1:  push %r13
    call virtio_pci_setup
    mov $F_VERSION_1, %rsi
    mov %rsi, %rdx
    call virtio_init
    lea rng_q0(%rip), %r13
    call virtio_queue
    call virtio_driver_ok
    mov Q_RING(%r13), %edi
    xor %ecx, %ecx
    lea rng_buf(%rip), %rax
    mov $16, %edx
    mov $DESC_F_WRITE, %esi
    call desc_set
    DEV_PREFIX
    PRINT64 "request 16 bytes: used "
    call vq_submit
    call putdec64
    PRINT64 "\n"
    pop %r13
    ret

/* ---- virtio-console -------------------------------------------------- */

/* The virtio-console device at %rbx (port 0 only, no MULTIPORT): a receive
 * buffer on the receiveq, a line on the transmitq. */
con_test:
    cmpl $0, DEV_CFG(%rbx)
    jne 1f
    DEV_PREFIX
    PRINT64 "not found\n"
    incl missing(%rip)
    ret
1:  push %r13
    call virtio_pci_setup
    mov $F_VERSION_1, %rsi
    mov %rsi, %rdx
    call virtio_init
    lea con_rxq(%rip), %r13
    call virtio_queue
    lea con_txq(%rip), %r13
    call virtio_queue
    call virtio_driver_ok
    /* A receive buffer (nothing arrives: it stays available). */
    lea con_rxq(%rip), %r13
    mov Q_RING(%r13), %edi
    xor %ecx, %ecx
    lea con_rx_buf(%rip), %rax
    mov $64, %edx
    mov $DESC_F_WRITE, %esi
    call desc_set
    call vq_post
    /* The line. */
    lea con_txq(%rip), %r13
    mov Q_RING(%r13), %edi
    xor %ecx, %ecx
    lea con_msg(%rip), %rax
    mov $(con_msg_end - con_msg), %edx
    xor %esi, %esi
    call desc_set
    DEV_PREFIX
    PRINT64 "sent "
    mov %edx, %eax
    call putdec64
    PRINT64 " bytes on the transmitq: used "
    call vq_submit
    call putdec64
    PRINT64 "\n"
    pop %r13
    ret

/* ---- handlers and data ---------------------------------------------- */

rng_irq:
    incl rng_dev + DEV_IRQS(%rip)
    LAPIC_EOI_WRITE
    iretq

con_irq:
    incl con_dev + DEV_IRQS(%rip)
    LAPIC_EOI_WRITE
    iretq

    .section .rodata
/* The devices this guest drives (see virtio.h). */
    .balign 4
virtio_drivers:
    .long VIRTIO_ID_BLK, blk_dev
    .long VIRTIO_ID_CONSOLE, con_dev
    .long VIRTIO_ID_RNG, rng_dev
    .long 0, 0
rng_name: .asciz "virtio-rng"
con_name: .asciz "virtio-console"
con_msg: .ascii "hello from virtio-console\n"
con_msg_end:

    .section .data
    DEVICE rng_dev, rng_name, RNG_VECTOR
    DEVICE con_dev, con_name, CON_VECTOR
    QUEUE rng_q0, rng_ring, 0
    QUEUE con_rxq, con_rx_ring, 0
    QUEUE con_txq, con_tx_ring, 1
missing: .long 0

    .section .bss
    .balign 4096
rng_ring: .skip 4096
con_rx_ring: .skip 4096
con_tx_ring: .skip 4096
blk_buf: .skip BLK_BUF_LEN
blk_buf2: .skip BLK_BUF_LEN
blk_seg: .skip 16
blk_id: .skip BLK_ID_BYTES
rng_buf: .skip 16
con_rx_buf: .skip 64

    LIB32
    LIB64
    APIC_LIB64
    VIRTIO_LIB64
    COMMON_DATA
    APIC_DATA
    VIRTIO_DATA
