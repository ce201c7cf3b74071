/*
 * The shared part of the virtio 1.x (modern, non-legacy) PCI driver of the
 * test guests: virtio.S (the acceptance test of Nyx's virtio devices) and
 * the virtio-blk benchmark guests blk*.S. Include it after common.h and
 * apic.h; expand VIRTIO_PLATFORM_INIT first thing in long mode, and
 * VIRTIO_LIB64 and VIRTIO_DATA once. See virtio.S for what the driver does.
 *
 * The guest provides, in any section:
 * - virtio_drivers: the devices it drives, a table of .long DEVICE_ID,
 *   DEVICE pairs ended by .long 0, 0; pci_scan records the configuration
 *   address of the first function of each ID in its DEVICE (DEVICE macro).
 *   blk_dev (virtio-blk, vector BLK_VECTOR) and its queue blk_q0 are in
 *   VIRTIO_DATA.
 *
 * Everything runs in long mode with the 8259 pair and the IOAPIC masked and
 * the local APIC enabled; its timer runs periodically as a watchdog (a
 * request that does not complete in TIMEOUT_TICKS ticks is an error). Each
 * request is completed by the device's MSI-X interrupt (vq_submit).
 */

#define TIMER_VECTOR 0x30
#define BLK_VECTOR 0x41
/* Watchdog: divide by 16 at the 1 GHz APIC bus, 625000 counts are 10 ms;
 * a request may take 5 s. */
#define TIMER_DIVIDE_16 0x3
#define TIMER_COUNT 625000
#define TIMEOUT_TICKS 500
/* Iterations of the reset poll. */
#define RESET_POLLS 1000000

/* PCI configuration mechanism #1. */
#define PCI_ADDR 0xcf8
#define PCI_DATA 0xcfc
#define PCI_ENABLE 0x80000000
#define PCI_COMMAND 0x04        /* command (low half), status (high half) */
#define PCI_STATUS_CAP_LIST 20  /* bit 4 of the status register */
#define PCI_HEADER_TYPE 0x0e
#define PCI_MULTI_FUNCTION 0x80
#define PCI_BAR0 0x10
#define PCI_CAP_PTR 0x34
#define CMD_MEMORY 0x0002
#define CMD_MASTER 0x0004
#define CMD_INTX_DISABLE 0x0400
#define CAP_ID_VENDOR 0x09
#define CAP_ID_MSIX 0x11
/* At most (256 - 64) / 4 capabilities fit in the configuration space. */
#define CAP_MAX 48
/* MSI-X: message control at +2, table offset/BIR at +4, PBA at +8. */
#define MSIX_CONTROL 2
#define MSIX_TABLE 4
#define MSIX_PBA 8
#define MSIX_ENABLE 0x8000
#define MSIX_MASK_ALL 0x4000
#define MSIX_TABLE_SIZE 0x07ff
#define MSI_ADDRESS LAPIC_BASE  /* destination APIC ID 0, fixed, physical */
/* The window the BARs are placed in. */
#define BAR_WINDOW_START 0xE0000000
#define BAR_WINDOW_END 0xF0000000

#define VIRTIO_VENDOR 0x1af4
#define VIRTIO_DEVICE_FIRST 0x1040
#define VIRTIO_DEVICE_LAST 0x107f
#define VIRTIO_ID_BLK 0x1042
#define VIRTIO_ID_CONSOLE 0x1043
#define VIRTIO_ID_RNG 0x1044

/* struct virtio_pci_cap (and virtio_pci_notify_cap). */
#define VCAP_CFG_TYPE 3
#define VCAP_BAR 4
#define VCAP_OFFSET 8
#define VCAP_LENGTH 12
#define VCAP_NOTIFY_MULT 16
#define CFG_COMMON 1
#define CFG_NOTIFY 2
#define CFG_ISR 3
#define CFG_DEVICE 4

/* struct virtio_pci_common_cfg. */
#define COMMON_DFSELECT 0x00
#define COMMON_DF 0x04
#define COMMON_GFSELECT 0x08
#define COMMON_GF 0x0c
#define COMMON_MSIX 0x10
#define COMMON_NUMQ 0x12
#define COMMON_STATUS 0x14
#define COMMON_CFGGEN 0x15
#define COMMON_Q_SELECT 0x16
#define COMMON_Q_SIZE 0x18
#define COMMON_Q_MSIX 0x1a
#define COMMON_Q_ENABLE 0x1c
#define COMMON_Q_NOFF 0x1e
#define COMMON_Q_DESC 0x20
#define COMMON_Q_AVAIL 0x28
#define COMMON_Q_USED 0x30
#define COMMON_LEN 0x38
#define NO_VECTOR 0xffff

/* Device status. */
#define STATUS_ACKNOWLEDGE 0x01
#define STATUS_DRIVER 0x02
#define STATUS_DRIVER_OK 0x04
#define STATUS_FEATURES_OK 0x08

/* Feature bits. */
#define F_VERSION_1 (1 << 32)
#define BLK_F_RO (1 << 5)
#define BLK_F_BLK_SIZE (1 << 6)
#define BLK_F_FLUSH (1 << 9)
#define BLK_F_DISCARD (1 << 13)
#define BLK_F_WRITE_ZEROES (1 << 14)
#define BLK_WANTED (F_VERSION_1 | BLK_F_FLUSH | BLK_F_DISCARD | BLK_F_WRITE_ZEROES)
#define BLK_PRINTED (BLK_WANTED | BLK_F_RO | BLK_F_BLK_SIZE)

/* virtio-blk requests. */
#define BLK_T_IN 0
#define BLK_T_OUT 1
#define BLK_T_FLUSH 4
#define BLK_T_GET_ID 8
#define BLK_T_DISCARD 11
#define BLK_T_WRITE_ZEROES 13
#define BLK_T_UNKNOWN 0x55
#define BLK_ID_BYTES 20
#define SECTOR_SIZE 512
#define BLK_BUF_LEN 4096

/* Split virtqueues of QSIZE entries, one 4 KiB page each: the descriptor
 * table at 0, the available ring at RING_AVAIL, the used ring at RING_USED. */
#define QSIZE 8
#define RING_AVAIL 0x100
#define RING_USED 0x200
#define DESC_ADDR 0
#define DESC_LEN 8
#define DESC_FLAGS 12
#define DESC_NEXT 14
#define DESC_F_NEXT 1
#define DESC_F_WRITE 2
#define AVAIL_IDX (RING_AVAIL + 2)
#define AVAIL_RING (RING_AVAIL + 4)
#define USED_IDX (RING_USED + 2)
#define USED_RING (RING_USED + 4)

/* The state of one device (DEVICE below). The capability arrays are indexed
 * by the cfg_type (1..4); a BAR of 0xff means "no such capability". */
#define DEV_CFG 0           /* u32: configuration address of the function */
#define DEV_MSIX 4          /* u32: configuration offset of the MSI-X cap */
#define DEV_VECTOR 8        /* u32: the interrupt vector of MSI-X entry 0 */
#define DEV_IRQS 12         /* u32: interrupts taken */
#define DEV_IRQ_WANT 16     /* u32: completions waited for */
#define DEV_NOTIFY_MULT 20  /* u32: notify_off_multiplier */
#define DEV_NAME 24         /* u64: the device's name (a string) */
#define DEV_FEATURES 32     /* u64: negotiated features */
#define DEV_CAP_BAR 40      /* u8[5] */
#define DEV_CAP_OFF 48      /* u32[5] */
#define DEV_CAP_LEN 68      /* u32[5] */
#define DEV_CAP_ADDR 88     /* u64[5]: where the structure is mapped */
#define DEV_BAR_ADDR 128    /* u64[6] */
#define DEV_BAR_SIZE 176    /* u64[6] */
#define DEV_MSIX_TABLE 224  /* u64 */
#define DEV_SIZE 232
#define DEV_COMMON (DEV_CAP_ADDR + 8 * CFG_COMMON)
#define DEV_NOTIFY (DEV_CAP_ADDR + 8 * CFG_NOTIFY)
#define DEV_DEVICE (DEV_CAP_ADDR + 8 * CFG_DEVICE)

/* The state of one virtqueue (QUEUE below). */
#define Q_RING 0            /* u32: its page */
#define Q_INDEX 4           /* u16: queue index */
#define Q_AVAIL 6           /* u16: the next available index */
#define Q_USED 8            /* u16: the last used index seen */
#define Q_NOTIFY 16         /* u64: its notification address */

/* Prints "NAME: error: \msg" for the device at %rbx and exits. */
.macro DEV_FAIL msg
    .pushsection SECTION_RODATA64
.Lfail_\@:
    .asciz "\msg"
    .popsection
    lea .Lfail_\@(%rip), %rsi
    jmp dev_fail
.endm

/* Prints "NAME: " for the device at %rbx. */
.macro DEV_PREFIX
    call dev_prefix
.endm

/* The state of one device: its name and vector; the rest is found. */
.macro DEVICE label, name, vector
    .balign 8
\label:
    .long 0                     /* DEV_CFG */
    .long 0                     /* DEV_MSIX */
    .long \vector               /* DEV_VECTOR */
    .long 0, 0, 0               /* DEV_IRQS, DEV_IRQ_WANT, DEV_NOTIFY_MULT */
    .long \name, 0              /* DEV_NAME */
    .skip DEV_SIZE - 32
.endm

/* The state of one queue: its ring page and index. */
.macro QUEUE label, ring, index
    .balign 8
\label:
    .long \ring                 /* Q_RING */
    .word \index                /* Q_INDEX */
    .word 0, 0, 0, 0, 0         /* Q_AVAIL, Q_USED, padding */
    .long 0, 0                  /* Q_NOTIFY */
.endm

/* The platform as the virtio guests want it, first thing in long mode: the
 * IDT with the gates of the watchdog (timer_irq) and of virtio-blk
 * (blk_irq), the 8259 pair and the IOAPIC masked, the local APIC enabled
 * and its timer running as the watchdog. A guest sets the gates of its
 * other devices afterwards. */
.macro VIRTIO_PLATFORM_INIT
    call idt_init64
    mov $TIMER_VECTOR, %edi
    lea timer_irq(%rip), %rax
    call set_gate64
    mov $BLK_VECTOR, %edi
    lea blk_irq(%rip), %rax
    call set_gate64
    MASK_8259
    LAPIC_ENABLE
    call ioapic_mask_all
    LAPIC_WRITE LAPIC_TIMER_DIVIDE, TIMER_DIVIDE_16
    LAPIC_WRITE LAPIC_LVT_TIMER, (LVT_PERIODIC | TIMER_VECTOR)
    LAPIC_WRITE LAPIC_TIMER_INITIAL, TIMER_COUNT
.endm

/* The driver: PCI configuration space, BARs, MSI-X, device
 * initialisation, virtqueues, virtio-blk requests, the handlers. */
.macro VIRTIO_LIB64
    .section SECTION_TEXT64
    .code64
/* ---- PCI configuration space ---------------------------------------- */

/* %eax = the dword at register %esi (rounded down to 4) of the function at
 * configuration address %edi. */
pci_read32:
    push %rdx
    mov %esi, %eax
    and $0xfc, %eax
    or %edi, %eax
    mov $PCI_ADDR, %dx
    out %eax, %dx
    mov $PCI_DATA, %dx
    in %dx, %eax
    pop %rdx
    ret

/* %eax = the byte at register %esi of the function at %edi. */
pci_read8:
    push %rcx
    call pci_read32
    mov %esi, %ecx
    and $3, %ecx
    shl $3, %ecx
    shr %cl, %eax
    movzbl %al, %eax
    pop %rcx
    ret

/* %eax = the word at register %esi (even) of the function at %edi. */
pci_read16:
    push %rcx
    call pci_read32
    mov %esi, %ecx
    and $2, %ecx
    shl $3, %ecx
    shr %cl, %eax
    movzwl %ax, %eax
    pop %rcx
    ret

/* Writes %edx to the dword at register %esi of the function at %edi. */
pci_write32:
    push %rax
    push %rdx
    mov %esi, %eax
    and $0xfc, %eax
    or %edi, %eax
    mov $PCI_ADDR, %dx
    out %eax, %dx
    mov (%rsp), %eax
    mov $PCI_DATA, %dx
    out %eax, %dx
    pop %rdx
    pop %rax
    ret

/* Writes %dx to the word at register %esi (even) of the function at %edi
 * (a 16-bit access: the neighbouring half is not written). */
pci_write16:
    push %rax
    push %rdx
    mov %esi, %eax
    and $0xfc, %eax
    or %edi, %eax
    mov $PCI_ADDR, %dx
    out %eax, %dx
    mov (%rsp), %eax
    mov %esi, %edx
    and $2, %edx
    add $PCI_DATA, %edx
    out %ax, %dx
    pop %rdx
    pop %rax
    ret

/* Every function of every slot of bus 0 (functions 1..7 only where
 * function 0 says multi-function); pci_found for each present one. */
pci_scan:
    push %rax
    push %rsi
    push %rdi
    push %r12
    push %r13
    xor %r12d, %r12d            /* slot */
scan_slot:
    xor %r13d, %r13d            /* function */
scan_function:
    mov %r12d, %edi
    shl $11, %edi
    mov %r13d, %eax
    shl $8, %eax
    or %eax, %edi
    or $PCI_ENABLE, %edi
    xor %esi, %esi
    call pci_read32
    cmp $0xffff, %ax
    je scan_absent
    call pci_found
    test %r13d, %r13d
    jnz scan_next_function
    mov $PCI_HEADER_TYPE, %esi
    call pci_read8
    test $PCI_MULTI_FUNCTION, %al
    jz scan_next_slot
scan_next_function:
    inc %r13d
    cmp $8, %r13d
    jb scan_function
scan_next_slot:
    inc %r12d
    cmp $32, %r12d
    jb scan_slot
    pop %r13
    pop %r12
    pop %rdi
    pop %rsi
    pop %rax
    ret
scan_absent:
    test %r13d, %r13d
    jz scan_next_slot
    jmp scan_next_function

/* The function at %edi has vendor and device ID %eax. A virtio device is
 * printed, its memory decoding turned off, and the first of each type the
 * guest drives (listed in its virtio_drivers table) is recorded in its
 * DEVICE. */
pci_found:
    push %rax
    push %rbx
    push %rcx
    push %rdx
    push %rsi
    cmp $VIRTIO_VENDOR, %ax
    jne 9f
    mov %eax, %ecx
    shr $16, %ecx               /* device ID */
    cmp $VIRTIO_DEVICE_FIRST, %ecx
    jb 9f
    cmp $VIRTIO_DEVICE_LAST, %ecx
    ja 9f
    PRINT64 "pci 00:"
    mov %edi, %eax
    shr $11, %eax
    and $0x1f, %eax
    PUTHEX 2
    PRINT64 "."
    mov %edi, %eax
    shr $8, %eax
    and $7, %eax
    PUTHEX 1
    PRINT64 " 1af4:"
    mov %ecx, %eax
    PUTHEX 4
    PRINT64 " "
    lea virtio_drivers(%rip), %rsi
4:  mov 0(%rsi), %eax           /* device ID; 0 ends the table */
    test %eax, %eax
    jz 2f
    mov 4(%rsi), %ebx           /* its DEVICE */
    add $8, %rsi
    cmp %eax, %ecx
    jne 4b
    cmpl $0, DEV_CFG(%rbx)
    jne 2f
    mov %edi, DEV_CFG(%rbx)
    mov DEV_NAME(%rbx), %rsi
    call puts64
    jmp 3f
2:  PRINT64 "virtio (not driven)"
3:  PRINT64 "\n"
    mov $PCI_COMMAND, %esi
    xor %edx, %edx
    call pci_write16
9:  pop %rsi
    pop %rdx
    pop %rcx
    pop %rbx
    pop %rax
    ret

/* ---- virtio over PCI: capabilities, BARs, MSI-X --------------------- */

/* The device at %rbx: finds its capabilities, places the BARs they live in,
 * enables memory space, bus master and MSI-X. */
virtio_pci_setup:
    push %rax
    push %rcx
    push %rdx
    push %rsi
    push %rdi
    push %r12
    push %r13
    push %r14
    push %r15
    mov DEV_CFG(%rbx), %edi
    movl $0xffffffff, DEV_CAP_BAR(%rbx)
    movb $0xff, DEV_CAP_BAR + 4(%rbx)
    movl $0, DEV_MSIX(%rbx)
    mov $PCI_COMMAND, %esi
    call pci_read32
    bt $PCI_STATUS_CAP_LIST, %eax
    jc 1f
    DEV_FAIL "no capability list"
1:  mov $PCI_CAP_PTR, %esi
    call pci_read8
    and $0xfc, %eax
    mov %eax, %r12d             /* the capability */
    mov $CAP_MAX, %r13d
cap_loop:
    test %r12d, %r12d
    jz caps_done
    dec %r13d
    jnz 1f
    DEV_FAIL "capability list does not end"
1:  mov %r12d, %esi
    call pci_read32
    mov %eax, %r14d             /* ID, next, length, cfg_type */
    cmp $CAP_ID_MSIX, %al
    jne 1f
    cmpl $0, DEV_MSIX(%rbx)
    jne cap_next
    mov %r12d, DEV_MSIX(%rbx)
    jmp cap_next
1:  cmp $CAP_ID_VENDOR, %al
    jne cap_next
    mov %r14d, %ecx
    shr $24, %ecx               /* cfg_type */
    cmp $CFG_COMMON, %ecx
    jb cap_next
    cmp $CFG_DEVICE, %ecx
    ja cap_next
    cmpb $0xff, DEV_CAP_BAR(%rbx,%rcx)
    jne cap_next                /* only the first of each type */
    lea VCAP_BAR(%r12), %esi
    call pci_read8
    cmp $5, %eax
    ja cap_next                 /* a reserved BAR number: ignored */
    mov %al, DEV_CAP_BAR(%rbx,%rcx)
    lea VCAP_OFFSET(%r12), %esi
    call pci_read32
    mov %eax, DEV_CAP_OFF(%rbx,%rcx,4)
    lea VCAP_LENGTH(%r12), %esi
    call pci_read32
    mov %eax, DEV_CAP_LEN(%rbx,%rcx,4)
    cmp $CFG_NOTIFY, %ecx
    jne cap_next
    lea VCAP_NOTIFY_MULT(%r12), %esi
    call pci_read32
    mov %eax, DEV_NOTIFY_MULT(%rbx)
cap_next:
    mov %r14d, %r12d
    shr $8, %r12d
    and $0xfc, %r12d
    jmp cap_loop

caps_done:
    cmpb $0xff, DEV_CAP_BAR + CFG_COMMON(%rbx)
    jne 1f
    DEV_FAIL "no common configuration capability"
1:  cmpl $COMMON_LEN, DEV_CAP_LEN + 4 * CFG_COMMON(%rbx)
    jae 1f
    DEV_FAIL "common configuration capability too short"
1:  cmpb $0xff, DEV_CAP_BAR + CFG_NOTIFY(%rbx)
    jne 1f
    DEV_FAIL "no notification capability"
1:  cmpb $0xff, DEV_CAP_BAR + CFG_ISR(%rbx)
    jne 1f
    DEV_FAIL "no isr capability"
1:  cmpl $0, DEV_MSIX(%rbx)
    jne 1f
    DEV_FAIL "no msi-x capability"

    /* The BARs needed (%r15d): those of the capabilities, of the MSI-X
     * table and of the PBA. */
1:  xor %r15d, %r15d
    mov $CFG_COMMON, %ecx
2:  movzbl DEV_CAP_BAR(%rbx,%rcx), %eax
    cmp $0xff, %eax
    je 3f
    bts %eax, %r15d
3:  inc %ecx
    cmp $CFG_DEVICE, %ecx
    jbe 2b
    mov DEV_MSIX(%rbx), %esi
    add $MSIX_TABLE, %esi
    call pci_read32
    mov %eax, %r13d             /* table offset and BIR */
    and $7, %eax
    cmp $5, %eax
    ja 4f
    bts %eax, %r15d
    mov DEV_MSIX(%rbx), %esi
    add $MSIX_PBA, %esi
    call pci_read32
    and $7, %eax
    cmp $5, %eax
    ja 4f
    bts %eax, %r15d
    jmp 5f
4:  DEV_FAIL "msi-x structure in a reserved bar"

    /* Size and place them, BAR 0 first. */
5:  xor %ecx, %ecx
6:  bt %ecx, %r15d
    jnc 7f
    call bar_assign
    jnc 7f
    /* A 64-bit BAR: the next one is its upper half. */
    inc %ecx
    bt %ecx, %r15d
    jnc 7f
    DEV_FAIL "structure in the upper half of a 64-bit bar"
7:  inc %ecx
    cmp $6, %ecx
    jb 6b

    /* Where the structures are mapped; each must fit in its BAR. */
    mov $CFG_COMMON, %ecx
1:  movzbl DEV_CAP_BAR(%rbx,%rcx), %edx
    cmp $0xff, %edx
    je 2f
    mov DEV_CAP_OFF(%rbx,%rcx,4), %eax
    mov DEV_CAP_LEN(%rbx,%rcx,4), %esi
    add %rax, %rsi
    cmp DEV_BAR_SIZE(%rbx,%rdx,8), %rsi
    jbe 3f
    DEV_FAIL "capability outside its bar"
3:  add DEV_BAR_ADDR(%rbx,%rdx,8), %rax
    mov %rax, DEV_CAP_ADDR(%rbx,%rcx,8)
2:  inc %ecx
    cmp $CFG_DEVICE, %ecx
    jbe 1b
    mov DEV_MSIX(%rbx), %esi
    add $MSIX_CONTROL, %esi
    call pci_read16
    and $MSIX_TABLE_SIZE, %eax
    inc %eax
    shl $4, %eax                /* 16 bytes per entry */
    mov %r13d, %esi
    and $~7, %esi
    add %rax, %rsi
    mov %r13d, %edx
    and $7, %edx
    cmp DEV_BAR_SIZE(%rbx,%rdx,8), %rsi
    jbe 1f
    DEV_FAIL "msi-x table outside its bar"
1:  mov %r13d, %eax
    and $~7, %eax
    add DEV_BAR_ADDR(%rbx,%rdx,8), %rax
    mov %rax, DEV_MSIX_TABLE(%rbx)

    mov $PCI_COMMAND, %esi
    mov $(CMD_MEMORY | CMD_MASTER | CMD_INTX_DISABLE), %edx
    call pci_write16

    /* MSI-X on with every vector masked, entry 0, then unmasked. */
    mov DEV_MSIX(%rbx), %esi
    add $MSIX_CONTROL, %esi
    mov $(MSIX_ENABLE | MSIX_MASK_ALL), %edx
    call pci_write16
    mov DEV_MSIX_TABLE(%rbx), %rax
    movl $MSI_ADDRESS, 0(%rax)
    movl $0, 4(%rax)
    mov DEV_VECTOR(%rbx), %edx
    mov %edx, 8(%rax)
    movl $0, 12(%rax)           /* vector control: unmasked */
    cmp 8(%rax), %edx
    je 1f
    DEV_FAIL "msi-x table entry 0 does not read back"
1:  mov $MSIX_ENABLE, %edx
    call pci_write16
    call pci_read16
    and $(MSIX_ENABLE | MSIX_MASK_ALL), %eax
    cmp $MSIX_ENABLE, %eax
    je 1f
    DEV_FAIL "msi-x not enabled"
1:  DEV_PREFIX
    PRINT64 "msi-x enabled, entry 0 vector 0x"
    mov DEV_VECTOR(%rbx), %eax
    PUTHEX 2
    PRINT64 "\n"
    pop %r15
    pop %r14
    pop %r13
    pop %r12
    pop %rdi
    pop %rsi
    pop %rdx
    pop %rcx
    pop %rax
    ret

/* Sizes BAR %ecx of the device at %rbx and places it at the next free,
 * naturally aligned address of the window. Carry set if it is a 64-bit BAR
 * (BAR %ecx + 1 is then its upper half). */
bar_assign:
    push %rax
    push %rdx
    push %rsi
    push %rdi
    push %r8
    push %r9
    push %r10
    mov DEV_CFG(%rbx), %edi
    lea PCI_BAR0(,%rcx,4), %esi
    call pci_read32
    mov %eax, %r8d              /* as found */
    test $1, %al
    jz 1f
    DEV_FAIL "structure in an i/o bar"
1:  and $6, %eax
    mov %eax, %r10d             /* 0: 32-bit, 4: 64-bit */
    jz 1f
    cmp $4, %eax
    je 2f
    DEV_FAIL "bar of a reserved type"
2:  cmp $5, %ecx
    jb 1f
    DEV_FAIL "64-bit bar 5"
1:  mov $0xffffffff, %edx
    call pci_write32
    call pci_read32
    mov %eax, %r9d              /* low half of the mask */
    mov %r8d, %edx
    call pci_write32
    mov $0xffffffff, %eax       /* a 32-bit BAR: the upper half is all ones */
    test %r10d, %r10d
    jz 1f
    add $4, %esi
    call pci_read32
    mov %eax, %r8d
    mov $0xffffffff, %edx
    call pci_write32
    call pci_read32
    mov %r8d, %edx
    call pci_write32
    sub $4, %esi
1:  shl $32, %rax
    and $~0xf, %r9d
    or %r9, %rax
    neg %rax                    /* the size */
    jnz 1f
    DEV_FAIL "bar not implemented"
1:  lea -1(%rax), %rdx
    test %rdx, %rax
    jz 1f
    DEV_FAIL "bar size not a power of two"
1:  mov %rax, DEV_BAR_SIZE(%rbx,%rcx,8)
    mov next_bar(%rip), %rdx
    add %rax, %rdx
    dec %rdx
    neg %rax
    and %rax, %rdx              /* aligned */
    neg %rax
    lea (%rdx,%rax), %r8
    mov $BAR_WINDOW_END, %r9d
    cmp %r9, %r8
    jbe 1f
    DEV_FAIL "no room for a bar"
1:  mov %r8, next_bar(%rip)
    mov %rdx, DEV_BAR_ADDR(%rbx,%rcx,8)
    call pci_write32            /* the address; the low bits are read-only */
    test %r10d, %r10d
    jz 1f
    add $4, %esi
    xor %edx, %edx
    call pci_write32
    stc
    jmp 2f
1:  clc
2:  pop %r10
    pop %r9
    pop %r8
    pop %rdi
    pop %rsi
    pop %rdx
    pop %rax
    ret

/* ---- virtio device initialisation ----------------------------------- */

/* Resets the device at %rbx, negotiates the features %rsi (of those it
 * offers; VERSION_1 required) and sets FEATURES_OK. Prints the offered and
 * accepted features masked to %rdx and the status. */
virtio_init:
    push %rax
    push %rcx
    push %r12
    push %r13
    push %r14
    push %r15
    mov DEV_COMMON(%rbx), %r12
    movb $0, COMMON_STATUS(%r12)
    mov $RESET_POLLS, %ecx
1:  movzbl COMMON_STATUS(%r12), %eax
    test %eax, %eax
    jz 2f
    pause
    loop 1b
    DEV_FAIL "reset does not complete"
2:  movb $STATUS_ACKNOWLEDGE, COMMON_STATUS(%r12)
    movb $(STATUS_ACKNOWLEDGE | STATUS_DRIVER), COMMON_STATUS(%r12)
    movl $1, COMMON_DFSELECT(%r12)
    mov COMMON_DF(%r12), %r13d
    shl $32, %r13
    movl $0, COMMON_DFSELECT(%r12)
    mov COMMON_DF(%r12), %eax
    or %rax, %r13               /* offered */
    bt $32, %r13
    jc 1f
    DEV_FAIL "version_1 not offered"
1:  mov %r13, %r14
    and %rsi, %r14              /* accepted */
    movl $0, COMMON_GFSELECT(%r12)
    mov %r14d, COMMON_GF(%r12)
    mov %r14, %rax
    shr $32, %rax
    movl $1, COMMON_GFSELECT(%r12)
    mov %eax, COMMON_GF(%r12)
    /* The driver features read back. */
    mov COMMON_GF(%r12), %eax
    shl $32, %rax
    movl $0, COMMON_GFSELECT(%r12)
    mov COMMON_GF(%r12), %ecx
    or %rcx, %rax
    cmp %r14, %rax
    je 1f
    DEV_FAIL "driver features do not read back"
1:  mov %r14, DEV_FEATURES(%rbx)
    movb $(STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK), COMMON_STATUS(%r12)
    movzbl COMMON_STATUS(%r12), %r15d
    test $STATUS_FEATURES_OK, %r15d
    jnz 1f
    DEV_FAIL "features_ok did not stick"
1:  movw $NO_VECTOR, COMMON_MSIX(%r12)
    movzwl COMMON_MSIX(%r12), %eax
    cmp $NO_VECTOR, %eax
    je 1f
    DEV_FAIL "config_msix_vector does not read back no_vector"
1:  DEV_PREFIX
    PRINT64 "features offered 0x"
    mov %r13, %rax
    and %rdx, %rax
    PUTHEX 16
    PRINT64 ", accepted 0x"
    mov %r14, %rax
    and %rdx, %rax
    PUTHEX 16
    PRINT64 ", status 0x"
    mov %r15d, %eax
    PUTHEX 2
    PRINT64 "\n"
    pop %r15
    pop %r14
    pop %r13
    pop %r12
    pop %rcx
    pop %rax
    ret

/* Sets up the queue %r13 of the device at %rbx: size QSIZE, MSI-X entry 0,
 * its rings, enabled. */
virtio_queue:
    push %rax
    push %rcx
    push %rdx
    push %r12
    mov DEV_COMMON(%rbx), %r12
    movzwl Q_INDEX(%r13), %eax
    mov %ax, COMMON_Q_SELECT(%r12)
    movzwl COMMON_Q_SIZE(%r12), %eax
    test %eax, %eax
    jnz 1f
    DEV_FAIL "queue not available"
1:  cmp $QSIZE, %eax
    jae 1f
    DEV_FAIL "queue smaller than 8 entries"
1:  movw $QSIZE, COMMON_Q_SIZE(%r12)
    movw $0, COMMON_Q_MSIX(%r12)
    movzwl COMMON_Q_MSIX(%r12), %eax
    test %eax, %eax
    jz 1f
    DEV_FAIL "queue_msix_vector 0 not accepted"
1:  mov Q_RING(%r13), %eax
    mov %eax, COMMON_Q_DESC(%r12)
    movl $0, COMMON_Q_DESC + 4(%r12)
    add $RING_AVAIL, %eax
    mov %eax, COMMON_Q_AVAIL(%r12)
    movl $0, COMMON_Q_AVAIL + 4(%r12)
    add $(RING_USED - RING_AVAIL), %eax
    mov %eax, COMMON_Q_USED(%r12)
    movl $0, COMMON_Q_USED + 4(%r12)
    /* The notification address: notify_off * notify_off_multiplier into
     * the notification structure; 2 bytes must fit. */
    movzwl COMMON_Q_NOFF(%r12), %eax
    mull DEV_NOTIFY_MULT(%rbx)
    shl $32, %rdx
    or %rdx, %rax
    lea 2(%rax), %rcx
    mov DEV_CAP_LEN + 4 * CFG_NOTIFY(%rbx), %edx
    cmp %rdx, %rcx
    jbe 1f
    DEV_FAIL "notification address outside its capability"
1:  add DEV_NOTIFY(%rbx), %rax
    mov %rax, Q_NOTIFY(%r13)
    movw $1, COMMON_Q_ENABLE(%r12)
    DEV_PREFIX
    PRINT64 "queue "
    movzwl Q_INDEX(%r13), %eax
    call putdec64
    PRINT64 " enabled, size "
    movzwl COMMON_Q_SIZE(%r12), %eax
    call putdec64
    PRINT64 ", msix vector "
    movzwl COMMON_Q_MSIX(%r12), %eax
    call putdec64
    PRINT64 "\n"
    pop %r12
    pop %rdx
    pop %rcx
    pop %rax
    ret

/* DRIVER_OK for the device at %rbx; prints the status. */
virtio_driver_ok:
    push %rax
    push %r12
    mov DEV_COMMON(%rbx), %r12
    movb $(STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK), COMMON_STATUS(%r12)
    DEV_PREFIX
    PRINT64 "driver_ok, status 0x"
    movzbl COMMON_STATUS(%r12), %eax
    PUTHEX 2
    PRINT64 "\n"
    pop %r12
    pop %rax
    ret

/* ---- virtqueues ----------------------------------------------------- */

/* Descriptor %ecx of the ring page %rdi: address %rax, length %edx, flags
 * %esi; with DESC_F_NEXT it chains to descriptor %ecx + 1. */
desc_set:
    push %rdi
    push %rcx
    shl $4, %ecx
    add %rcx, %rdi
    mov (%rsp), %rcx
    mov %rax, DESC_ADDR(%rdi)
    mov %edx, DESC_LEN(%rdi)
    mov %si, DESC_FLAGS(%rdi)
    movw $0, DESC_NEXT(%rdi)
    test $DESC_F_NEXT, %esi
    jz 1f
    inc %ecx
    mov %cx, DESC_NEXT(%rdi)
1:  pop %rcx
    pop %rdi
    ret

/* Makes the chain at descriptor 0 of queue %r13 available and notifies the
 * device. */
vq_post:
    push %rax
    push %rcx
    push %rdx
    push %rdi
    mov Q_RING(%r13), %edi
    movzwl Q_AVAIL(%r13), %eax
    mov %eax, %ecx
    and $(QSIZE - 1), %ecx
    movw $0, AVAIL_RING(%rdi,%rcx,2)
    inc %eax
    mov %ax, Q_AVAIL(%r13)
    /* x86 keeps stores in order: the ring entry is seen before the index,
     * the index before the notification. */
    mov %ax, AVAIL_IDX(%rdi)
    mfence
    mov Q_NOTIFY(%r13), %rdx
    movzwl Q_INDEX(%r13), %eax
    mov %ax, (%rdx)
    pop %rdi
    pop %rdx
    pop %rcx
    pop %rax
    ret

/* Posts the chain at descriptor 0 of queue %r13 of the device at %rbx and
 * idles until the device used it and its interrupt came. Returns the used
 * length in %eax. */
vq_submit:
    push %rcx
    push %rdx
    push %rdi
    incl DEV_IRQ_WANT(%rbx)
    call vq_post
    mov Q_RING(%r13), %edi
    mov ticks(%rip), %ecx       /* the watchdog's start */
1:  cli
    mov DEV_IRQS(%rbx), %eax
    cmp DEV_IRQ_WANT(%rbx), %eax
    jb 2f
    movzwl USED_IDX(%rdi), %eax
    cmp %ax, Q_USED(%r13)
    jne 3f
2:  mov ticks(%rip), %eax
    sub %ecx, %eax
    cmp $TIMEOUT_TICKS, %eax
    jb 4f
    DEV_FAIL "request timed out"
4:  sti
    hlt
    jmp 1b
3:  movzwl Q_USED(%r13), %edx
    inc %edx
    cmp %ax, %dx
    je 1f
    DEV_FAIL "used index moved by more than one"
1:  mov %dx, Q_USED(%r13)
    dec %edx
    and $(QSIZE - 1), %edx
    cmpl $0, USED_RING(%rdi,%rdx,8)
    je 1f
    DEV_FAIL "used element names another chain"
1:  mov USED_RING + 4(%rdi,%rdx,8), %eax
    pop %rdi
    pop %rdx
    pop %rcx
    ret

/* ---- virtio-blk ------------------------------------------------------ */

/* A request of type %r8d at sector %r9 with the data buffer %r10 of %r11d
 * bytes (none if 0), device-writable if %r12d is DESC_F_WRITE, on the
 * device at %rbx. The status byte is left in blk_status; returns the used
 * length in %eax. */
blk_request:
    push %rcx
    push %rdx
    push %rsi
    push %rdi
    push %r13
    lea blk_q0(%rip), %r13
    lea blk_hdr(%rip), %rdi
    mov %r8d, 0(%rdi)
    movl $0, 4(%rdi)
    mov %r9, 8(%rdi)
    movb $0xff, blk_status(%rip)
    mov Q_RING(%r13), %edi
    xor %ecx, %ecx
    lea blk_hdr(%rip), %rax
    mov $16, %edx
    mov $DESC_F_NEXT, %esi
    call desc_set
    inc %ecx
    test %r11d, %r11d
    jz 1f
    mov %r10, %rax
    mov %r11d, %edx
    mov %r12d, %esi
    or $DESC_F_NEXT, %esi
    call desc_set
    inc %ecx
1:  lea blk_status(%rip), %rax
    mov $1, %edx
    mov $DESC_F_WRITE, %esi
    call desc_set
    call vq_submit
    pop %r13
    pop %rdi
    pop %rsi
    pop %rdx
    pop %rcx
    ret

/* Sets up the virtio-blk device at %rbx (found by pci_scan): BARs and
 * MSI-X, the features BLK_WANTED (of those offered; printed masked to
 * BLK_PRINTED), queue 0 (blk_q0), DRIVER_OK. Reads the capacity into
 * blk_capacity and prints it. */
blk_setup:
    push %rax
    push %rcx
    push %rdx
    push %rsi
    push %rdi
    push %r13
    call virtio_pci_setup
    cmpb $0xff, DEV_CAP_BAR + CFG_DEVICE(%rbx)
    jne 1f
    DEV_FAIL "no device configuration capability"
1:  cmpl $8, DEV_CAP_LEN + 4 * CFG_DEVICE(%rbx)
    jae 1f
    DEV_FAIL "device configuration too short for the capacity"
1:  mov $BLK_WANTED, %rsi
    mov $BLK_PRINTED, %rdx
    call virtio_init
    lea blk_q0(%rip), %r13
    call virtio_queue
    call virtio_driver_ok

    /* The capacity, a 64-bit field: read again if config_generation
     * changed meanwhile. */
    mov DEV_COMMON(%rbx), %rsi
    mov DEV_DEVICE(%rbx), %rdi
1:  movzbl COMMON_CFGGEN(%rsi), %ecx
    mov 4(%rdi), %eax
    shl $32, %rax
    mov 0(%rdi), %edx
    or %rdx, %rax
    movzbl COMMON_CFGGEN(%rsi), %edx
    cmp %ecx, %edx
    jne 1b
    mov %rax, blk_capacity(%rip)
    DEV_PREFIX
    PRINT64 "capacity "
    call putdec64
    PRINT64 " sectors\n"
    pop %r13
    pop %rdi
    pop %rsi
    pop %rdx
    pop %rcx
    pop %rax
    ret

/* ---- shared routines and handlers ----------------------------------- */

/* Prints "NAME: " for the device at %rbx. */
dev_prefix:
    push %rsi
    mov DEV_NAME(%rbx), %rsi
    call puts64
    PRINT64 ": "
    pop %rsi
    ret

/* Prints "NAME: error: " and the string at %rsi for the device at %rbx,
 * then exits. */
dev_fail:
    DEV_PREFIX
    PRINT64 "error: "
    call puts64
    PRINT64 "\n"
    EXIT EXIT_UNEXPECTED

timer_irq:
    incl ticks(%rip)
    LAPIC_EOI_WRITE
    iretq

blk_irq:
    incl blk_dev + DEV_IRQS(%rip)
    LAPIC_EOI_WRITE
    iretq
.endm

/* The driver's data: virtio-blk's DEVICE and queue, the BAR allocator, the
 * watchdog's ticks. */
.macro VIRTIO_DATA
    .section .rodata
blk_name: .asciz "virtio-blk"

    .section .data
    DEVICE blk_dev, blk_name, BLK_VECTOR
    QUEUE blk_q0, blk_ring, 0
    .balign 8
next_bar: .quad BAR_WINDOW_START
blk_capacity: .quad 0
ticks: .long 0

    .section .bss
    .balign 4096
blk_ring: .skip 4096
blk_hdr: .skip 16
blk_status: .skip 1
.endm
