/*
 * conecho: echoes lines read from the virtio-console's receive queue, the
 * machine-level test of console input (recorded as ConsoleInput events
 * and served back by a replay). On the driver of virtio.S (virtio.h): long
 * mode, the 8259 pair and the IOAPIC masked, the local APIC enabled, its
 * timer running as the watchdog of the transmit requests.
 *
 * Enumerates bus 0 (printing every virtio function), sets up the first
 * virtio-console (0x1043; VERSION_1 only, not MULTIPORT): port 0's
 * receiveq (queue 0) and transmitq (queue 1). Then, until a '.' arrives:
 * posts one 64-byte receive buffer, idles (sti; hlt) until the device has
 * used it, and appends the bytes it got to the current line (at most
 * LINE_MAX bytes are kept, the rest of a longer line are counted only). A
 * line ends at a '\n' or at the '.': the guest prints
 * "virtio-console: line N, B bytes: "TEXT"" on COM1 (TEXT without the
 * newline, bytes outside 0x20..0x7e as '?') and sends the line upper-cased
 * (newline or '.' included) on the transmitq. At the '.' it stops reading:
 * the rest of that buffer and of the input are ignored. It prints the
 * number of lines and of bytes up to the '.', and exits with CONECHO_EXIT.
 *
 * Nothing printed depends on how the input was cut into buffers: a device
 * may fill a buffer with whatever it has (QEMU reads a file as the guest
 * posts buffers; Nyx gives what its input has). The receive wait has no
 * timeout: the input may come from a person. Exits with EXIT_UNEXPECTED
 * after "NAME: error: ..." or when there is no virtio-console.
 */
#include "common.h"
#include "apic.h"
#include "virtio.h"

/* Debug-exit value of this guest (QEMU exit code 0xbd). */
#define CONECHO_EXIT 0x5e
#define CON_VECTOR 0x43
/* The receive buffer's size; the longest line kept. */
#define RX_LEN 64
#define LINE_MAX 128

    MULTIBOOT_HEADER
    START32
    MAP_MMIO_GIB3
    LONGMODE_SWITCH long_entry

    .code64
long_entry:
    ENTER64
    VIRTIO_PLATFORM_INIT
    mov $CON_VECTOR, %edi
    lea con_irq(%rip), %rax
    call set_gate64
    PRINT64 "conecho: 8259 masked, local apic enabled\n"
    call pci_scan
    lea con_dev(%rip), %rbx
    cmpl $0, DEV_CFG(%rbx)
    jne 1f
    PRINT64 "virtio-console: not found\n"
    EXIT EXIT_UNEXPECTED
1:  call virtio_pci_setup
    mov $F_VERSION_1, %rsi
    mov %rsi, %rdx
    call virtio_init
    lea con_rxq(%rip), %r13
    call virtio_queue
    lea con_txq(%rip), %r13
    call virtio_queue
    call virtio_driver_ok
    DEV_PREFIX
    PRINT64 "reading lines up to a '.'\n"

read_loop:
    call receive
    lea rx_buf(%rip), %rsi
    mov %eax, %ecx
    test %ecx, %ecx
    jz read_loop
1:  lodsb
    incl bytes(%rip)
    mov line_len(%rip), %edx
    incl line_len(%rip)
    cmp $LINE_MAX, %edx
    jae 2f
    lea line(%rip), %rdi
    mov %al, (%rdi,%rdx)
2:  cmp $'\n', %al
    je 3f
    cmp $'.', %al
    je 4f
    loop 1b
    jmp read_loop
3:  call end_line
    loop 1b
    jmp read_loop
4:  call end_line
    DEV_PREFIX
    PRINT64 "received "
    mov lines(%rip), %eax
    call putdec64
    PRINT64 " lines, "
    mov bytes(%rip), %eax
    call putdec64
    PRINT64 " bytes up to the '.'\n"
    PRINT64 "conecho: done\n"
    EXIT CONECHO_EXIT

/* Posts the receive buffer on the receiveq of the device at %rbx and idles
 * until the device used it; returns the bytes it holds in %eax. */
receive:
    push %rcx
    push %rdx
    push %rdi
    push %r13
    lea con_rxq(%rip), %r13
    mov Q_RING(%r13), %edi
    xor %ecx, %ecx
    lea rx_buf(%rip), %rax
    mov $RX_LEN, %edx
    push %rsi
    mov $DESC_F_WRITE, %esi
    call desc_set
    pop %rsi
    call vq_post
1:  cli
    movzwl USED_IDX(%rdi), %eax
    cmp %ax, Q_USED(%r13)
    jne 2f
    sti
    hlt
    jmp 1b
2:  sti
    movzwl Q_USED(%r13), %edx
    inc %edx
    cmp %ax, %dx
    je 1f
    DEV_FAIL "receiveq: used index moved by more than one"
1:  mov %dx, Q_USED(%r13)
    dec %edx
    and $(QSIZE - 1), %edx
    cmpl $0, USED_RING(%rdi,%rdx,8)
    je 1f
    DEV_FAIL "receiveq: used element names another chain"
1:  mov USED_RING + 4(%rdi,%rdx,8), %eax
    cmp $RX_LEN, %eax
    jbe 1f
    DEV_FAIL "receiveq: used length beyond the buffer"
1:  pop %r13
    pop %rdi
    pop %rdx
    pop %rcx
    ret

/* The current line is complete: prints it, sends it upper-cased on the
 * transmitq, starts the next one. */
end_line:
    push %rax
    push %rcx
    push %rdx
    push %rsi
    push %rdi
    push %r13
    incl lines(%rip)
    mov line_len(%rip), %ecx
    cmp $LINE_MAX, %ecx
    jbe 1f
    mov $LINE_MAX, %ecx
1:  DEV_PREFIX
    PRINT64 "line "
    mov lines(%rip), %eax
    call putdec64
    PRINT64 ", "
    mov line_len(%rip), %eax
    call putdec64
    PRINT64 " bytes: \""
    /* The text, without the newline. */
    lea line(%rip), %rsi
    mov %ecx, %edx
    test %edx, %edx
    jz 4f
    cmpb $'\n', -1(%rsi,%rdx)
    jne 1f
    dec %edx
1:  test %edx, %edx
    jz 4f
2:  lodsb
    cmp $0x20, %al
    jb 3f
    cmp $0x7e, %al
    jbe 5f
3:  mov $'?', %al
5:  call putc64
    dec %edx
    jnz 2b
4:  PRINT64 "\"\n"
    /* Upper-cased into tx_buf, sent. */
    lea line(%rip), %rsi
    lea tx_buf(%rip), %rdi
    mov %ecx, %edx
    test %ecx, %ecx
    jz 2f
1:  lodsb
    cmp $'a', %al
    jb 3f
    cmp $'z', %al
    ja 3f
    sub $0x20, %al
3:  stosb
    loop 1b
2:  lea con_txq(%rip), %r13
    mov Q_RING(%r13), %edi
    xor %ecx, %ecx
    lea tx_buf(%rip), %rax
    xor %esi, %esi
    call desc_set
    call vq_submit
    movl $0, line_len(%rip)
    pop %r13
    pop %rdi
    pop %rsi
    pop %rdx
    pop %rcx
    pop %rax
    ret

con_irq:
    incl con_dev + DEV_IRQS(%rip)
    LAPIC_EOI_WRITE
    iretq

    .section .rodata
/* The devices this guest drives (see virtio.h). */
    .balign 4
virtio_drivers:
    .long VIRTIO_ID_CONSOLE, con_dev
    .long 0, 0
con_name: .asciz "virtio-console"

    .section .data
    DEVICE con_dev, con_name, CON_VECTOR
    QUEUE con_rxq, con_rx_ring, 0
    QUEUE con_txq, con_tx_ring, 1
    .balign 4
line_len: .long 0
lines: .long 0
bytes: .long 0

    .section .bss
    .balign 4096
con_rx_ring: .skip 4096
con_tx_ring: .skip 4096
rx_buf: .skip RX_LEN
line: .skip LINE_MAX
tx_buf: .skip LINE_MAX

    LIB32
    LIB64
    APIC_LIB64
    VIRTIO_LIB64
    COMMON_DATA
    APIC_DATA
    VIRTIO_DATA
