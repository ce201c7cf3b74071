/*
 * netping: a virtio-net driver that finds a peer on the link, the
 * machine-level test of network frames in both directions. On the driver
 * of virtio.S (virtio.h): long mode, the 8259 pair and the IOAPIC masked,
 * the local APIC enabled, its timer running periodically (TICK_COUNT: 20
 * ms).
 *
 * Enumerates bus 0 (printing every virtio function) and sets up the first
 * virtio-net (0x1041, modern only) under the name "netping": VERSION_1
 * and MAC only (any other feature offered is refused; the features are
 * printed masked to those two), the receiveq (queue 0) and the transmitq
 * (queue 1), no control queue. Reads the MAC from the device configuration
 * (offset 0, 6 bytes, under config_generation) and prints it. Every buffer
 * on both queues starts with the 12-byte virtio_net_hdr: sent zeroed,
 * skipped on receive.
 *
 * Posts RX_BUFS receive buffers of RX_LEN bytes (the header and 1536),
 * re-posting each as soon as it is used. Every tick it sends two frames,
 * each in one descriptor, once the two of the tick before were used:
 * - an ARP request, broadcast from its MAC: htype 1, ptype 0x0800, hlen 6,
 *   plen 4, oper 1, sender its MAC and 10.0.2.15, target zeros and
 *   10.0.2.2 (42 bytes);
 * - an IPv4/UDP datagram, broadcast from its MAC: 10.0.2.15 -> 10.0.2.2,
 *   TTL 64, no options, the header checksum computed here, UDP port 5555
 *   to 5555, UDP checksum 0, the 14-byte payload "nyx netping XX" (XX: the
 *   last byte of its MAC in hex) (56 bytes).
 * A received frame whose source is its own MAC is ignored; any other is a
 * peer's: the first ARP request and the first UDP datagram to port 5555
 * are kept (source MAC, target IP; source MAC, up to PAYLOAD_MAX bytes of
 * payload), other frames are counted only. Once it has both it prints
 * "netping: arp from MAC who-has A.B.C.D" and then "netping: udp from
 * MAC: "PAYLOAD"" (bytes outside 0x20..0x7e as '?'), always in that
 * order: which of a peer's frames comes first depends on when the link
 * came up. It sends for EXTRA_TICKS more ticks (so that the peer surely
 * has its frames too), prints "netping: done" and exits with NETPING_EXIT.
 *
 * Without any peer frame for NO_PEER_TICKS ticks (3 s) it prints
 * "netping: no peer" and exits with NETPING_EXIT: alone on a link that
 * delivers nothing it prints its MAC and that. A peer that sends frames
 * but not both kinds within GIVE_UP_TICKS ticks is an error. Nothing
 * printed depends on timing. Exits with EXIT_UNEXPECTED after "netping:
 * error: ..." (also when there is no virtio-net).
 */
#include "common.h"
#include "apic.h"
#include "virtio.h"

/* Debug-exit value of this guest (QEMU exit code 0xc3). */
#define NETPING_EXIT 0x61
#define NET_VECTOR 0x44
#define VIRTIO_ID_NET 0x1041
#define NET_F_MAC (1 << 5)
#define NET_WANTED (F_VERSION_1 | NET_F_MAC)
/* 20 ms ticks: divide by 16 at the 1 GHz APIC bus. */
#define TICK_COUNT 1250000
#define NO_PEER_TICKS 150
#define GIVE_UP_TICKS 500
#define EXTRA_TICKS 5

/* struct virtio_net_hdr with VERSION_1 (num_buffers included). */
#define NET_HDR_LEN 12
/* Receive buffers: the header and a frame of up to 1536 bytes. */
#define RX_BUFS 4
#define RX_LEN (NET_HDR_LEN + 1536)
#define RX_STRIDE 2048
#define PAYLOAD_MAX 64

/* Ethernet, ARP, IPv4 and UDP offsets in a frame. */
#define ETH_DST 0
#define ETH_SRC 6
#define ETH_TYPE 12
#define ETH_LEN 14
#define ETHERTYPE_IPV4 0x0800
#define ETHERTYPE_ARP 0x0806
#define ARP_OPER 20
#define ARP_SHA 22
#define ARP_TPA 38
#define ARP_END 42
#define IP_VER_IHL 14
#define IP_PROTO 23
#define IP_CSUM 24
#define IP_END 34
#define IP_PROTO_UDP 17
#define UDP_PORT 5555
#define ARP_FRAME_LEN 42
#define UDP_FRAME_LEN 56
/* The last two bytes of the UDP payload: the MAC's last byte in hex. */
#define UDP_HEX 54

    MULTIBOOT_HEADER
    START32
    MAP_MMIO_GIB3
    LONGMODE_SWITCH long_entry

    .code64
long_entry:
    ENTER64
    VIRTIO_PLATFORM_INIT
    LAPIC_WRITE LAPIC_TIMER_INITIAL, TICK_COUNT
    mov $NET_VECTOR, %edi
    lea net_irq(%rip), %rax
    call set_gate64
    call pci_scan
    lea net_dev(%rip), %rbx
    cmpl $0, DEV_CFG(%rbx)
    jne 1f
    PRINT64 "netping: error: no virtio-net\n"
    EXIT EXIT_UNEXPECTED
1:  call virtio_pci_setup
    cmpb $0xff, DEV_CAP_BAR + CFG_DEVICE(%rbx)
    jne 1f
    DEV_FAIL "no device configuration capability"
1:  cmpl $6, DEV_CAP_LEN + 4 * CFG_DEVICE(%rbx)
    jae 1f
    DEV_FAIL "device configuration too short for the mac"
1:  mov $NET_WANTED, %rsi
    mov %rsi, %rdx
    call virtio_init
    mov DEV_FEATURES(%rbx), %rax
    test $NET_F_MAC, %eax
    jnz 1f
    DEV_FAIL "mac not offered"
1:  lea net_rxq(%rip), %r13
    call virtio_queue
    lea net_txq(%rip), %r13
    call virtio_queue
    call virtio_driver_ok
    call read_mac
    DEV_PREFIX
    PRINT64 "mac "
    lea own_mac(%rip), %rsi
    call print_mac
    PRINT64 "\n"
    call build_frames
    call rx_post_all
    mov ticks(%rip), %eax
    mov %eax, start_tick(%rip)
    mov %eax, last_tick(%rip)

/* Idles until a queue was used or the timer ticked, then does the work. */
main_loop:
    cli
    mov net_rxq + Q_RING(%rip), %edi
    movzwl USED_IDX(%rdi), %eax
    cmp %ax, net_rxq + Q_USED(%rip)
    jne 1f
    mov net_txq + Q_RING(%rip), %edi
    movzwl USED_IDX(%rdi), %eax
    cmp %ax, net_txq + Q_USED(%rip)
    jne 1f
    mov ticks(%rip), %eax
    cmp last_tick(%rip), %eax
    jne 1f
    sti
    hlt
    jmp main_loop
1:  sti
    call rx_poll
    call tx_poll
    call tick_poll
    jmp main_loop

/* Copies the MAC from the device configuration into own_mac, again if
 * config_generation changed meanwhile. */
read_mac:
    push %rax
    push %rcx
    push %rdx
    push %rsi
    push %rdi
    push %r8
    mov DEV_COMMON(%rbx), %rsi
    mov DEV_DEVICE(%rbx), %rdi
    lea own_mac(%rip), %r8
1:  movzbl COMMON_CFGGEN(%rsi), %ecx
    xor %edx, %edx
2:  movb (%rdi,%rdx), %al
    mov %al, (%r8,%rdx)
    inc %edx
    cmp $6, %edx
    jb 2b
    movzbl COMMON_CFGGEN(%rsi), %edx
    cmp %ecx, %edx
    jne 1b
    pop %r8
    pop %rdi
    pop %rsi
    pop %rdx
    pop %rcx
    pop %rax
    ret

/* Prints the 6-byte MAC at %rsi as xx:xx:xx:xx:xx:xx. */
print_mac:
    push %rax
    push %rcx
    xor %ecx, %ecx
1:  test %ecx, %ecx
    jz 2f
    PRINT64 ":"
2:  movzbl (%rsi,%rcx), %eax
    PUTHEX 2
    inc %ecx
    cmp $6, %ecx
    jb 1b
    pop %rcx
    pop %rax
    ret

/* Copies the 6-byte MAC at %rsi to %rdi. */
copy_mac:
    push %rax
    mov (%rsi), %eax
    mov %eax, (%rdi)
    movzwl 4(%rsi), %eax
    mov %ax, 4(%rdi)
    pop %rax
    ret

/* Fills the own MAC into the two frames, the hex digits of its last byte
 * into the UDP payload, and the IPv4 header checksum. */
build_frames:
    push %rax
    push %rcx
    push %rdx
    push %rsi
    push %rdi
    lea own_mac(%rip), %rsi
    lea arp_frame + ETH_SRC(%rip), %rdi
    call copy_mac
    lea arp_frame + ARP_SHA(%rip), %rdi
    call copy_mac
    lea udp_frame + ETH_SRC(%rip), %rdi
    call copy_mac
    movzbl 5(%rsi), %eax
    lea hex_digits(%rip), %rdx
    mov %eax, %ecx
    shr $4, %ecx
    movb (%rdx,%rcx), %cl
    mov %cl, udp_frame + UDP_HEX(%rip)
    and $0xf, %eax
    movb (%rdx,%rax), %al
    mov %al, udp_frame + UDP_HEX + 1(%rip)
    /* The one's-complement sum of the header's 16-bit words (read in
     * either byte order: the sum's bytes swap with them). */
    movw $0, udp_frame + IP_CSUM(%rip)
    lea udp_frame + ETH_LEN(%rip), %rsi
    xor %eax, %eax
    xor %ecx, %ecx
1:  movzwl (%rsi,%rcx,2), %edx
    add %edx, %eax
    inc %ecx
    cmp $10, %ecx
    jb 1b
2:  mov %eax, %edx
    shr $16, %edx
    jz 3f
    and $0xffff, %eax
    add %edx, %eax
    jmp 2b
3:  not %eax
    mov %ax, udp_frame + IP_CSUM(%rip)
    pop %rdi
    pop %rsi
    pop %rdx
    pop %rcx
    pop %rax
    ret

/* Notifies the device at %rbx of new buffers on queue %r13. */
q_notify:
    push %rax
    push %rdx
    mfence
    mov Q_NOTIFY(%r13), %rdx
    movzwl Q_INDEX(%r13), %eax
    mov %ax, (%rdx)
    pop %rdx
    pop %rax
    ret

/* Makes descriptor %ecx of queue %r13 available (without notifying). */
q_offer:
    push %rax
    push %rdx
    push %rdi
    mov Q_RING(%r13), %edi
    movzwl Q_AVAIL(%r13), %eax
    mov %eax, %edx
    and $(QSIZE - 1), %edx
    mov %cx, AVAIL_RING(%rdi,%rdx,2)
    inc %eax
    mov %ax, Q_AVAIL(%r13)
    /* x86 keeps stores in order: the ring entry is seen before the index. */
    mov %ax, AVAIL_IDX(%rdi)
    pop %rdi
    pop %rdx
    pop %rax
    ret

/* Describes the RX_BUFS receive buffers (descriptors 0..RX_BUFS-1) and
 * makes them all available. */
rx_post_all:
    push %rax
    push %rcx
    push %rdx
    push %rsi
    push %rdi
    push %r13
    lea net_rxq(%rip), %r13
    mov Q_RING(%r13), %edi
    xor %ecx, %ecx
1:  mov %ecx, %eax
    imul $RX_STRIDE, %eax, %eax
    lea rx_bufs(%rip), %rdx
    add %rdx, %rax
    mov $RX_LEN, %edx
    mov $DESC_F_WRITE, %esi
    call desc_set
    call q_offer
    inc %ecx
    cmp $RX_BUFS, %ecx
    jb 1b
    call q_notify
    pop %r13
    pop %rdi
    pop %rsi
    pop %rdx
    pop %rcx
    pop %rax
    ret

/* Takes every buffer the device used on the receiveq, looks at its frame
 * and makes it available again. */
rx_poll:
    push %rax
    push %rcx
    push %rdx
    push %rsi
    push %rdi
    push %r8
    push %r13
    lea net_rxq(%rip), %r13
    mov Q_RING(%r13), %edi
    xor %r8d, %r8d              /* buffers made available again */
1:  movzwl USED_IDX(%rdi), %eax
    movzwl Q_USED(%r13), %edx
    cmp %ax, %dx
    je 2f
    inc %edx
    mov %dx, Q_USED(%r13)
    dec %edx
    and $(QSIZE - 1), %edx
    mov USED_RING(%rdi,%rdx,8), %ecx
    mov USED_RING + 4(%rdi,%rdx,8), %eax
    cmp $RX_BUFS, %ecx
    jb 3f
    DEV_FAIL "receiveq: used element names no receive buffer"
3:  cmp $RX_LEN, %eax
    jbe 3f
    DEV_FAIL "receiveq: used length beyond the buffer"
3:  cmp $NET_HDR_LEN, %eax
    jae 3f
    DEV_FAIL "receiveq: used length shorter than the header"
3:  push %rcx
    mov %ecx, %esi
    imul $RX_STRIDE, %esi, %esi
    lea rx_bufs + NET_HDR_LEN(%rip), %rdx
    add %rdx, %rsi
    lea -NET_HDR_LEN(%rax), %ecx
    call rx_frame
    pop %rcx
    call q_offer
    inc %r8d
    jmp 1b
2:  test %r8d, %r8d
    jz 1f
    call q_notify
1:  pop %r13
    pop %r8
    pop %rdi
    pop %rsi
    pop %rdx
    pop %rcx
    pop %rax
    ret

/* %eax = the big-endian 16-bit field at offset \off of the frame %rsi. */
.macro BE16 off
    movzwl \off(%rsi), %eax
    xchg %al, %ah
.endm

/* The frame of %ecx bytes at %rsi. */
rx_frame:
    push %rax
    push %rcx
    push %rdx
    push %rsi
    push %rdi
    cmp $ETH_LEN, %ecx
    jb rx_other
    /* Our own frames, if the link echoes them: ignored. */
    mov ETH_SRC(%rsi), %eax
    cmp own_mac(%rip), %eax
    jne 1f
    movzwl ETH_SRC + 4(%rsi), %eax
    cmp own_mac + 4(%rip), %ax
    jne 1f
    incl own_frames(%rip)
    jmp rx_done
1:  movl $1, peer_seen(%rip)
    BE16 ETH_TYPE
    cmp $ETHERTYPE_ARP, %eax
    je rx_arp
    cmp $ETHERTYPE_IPV4, %eax
    je rx_ipv4
rx_other:
    incl other_frames(%rip)
    jmp rx_done

rx_arp:
    cmp $ARP_END, %ecx
    jb rx_other
    /* htype 1, ptype 0x0800, hlen 6, plen 4, oper 1 (a request). */
    BE16 ETH_LEN
    cmp $1, %eax
    jne rx_other
    BE16 (ETH_LEN+2)
    cmp $ETHERTYPE_IPV4, %eax
    jne rx_other
    BE16 (ETH_LEN+4)
    cmp $0x0604, %eax
    jne rx_other
    BE16 ARP_OPER
    cmp $1, %eax
    jne rx_other
    cmpl $0, arp_seen(%rip)
    jne rx_done
    movl $1, arp_seen(%rip)
    mov ARP_TPA(%rsi), %eax
    mov %eax, arp_ip(%rip)
    lea ETH_SRC(%rsi), %rsi
    lea arp_mac(%rip), %rdi
    call copy_mac
    jmp rx_done

rx_ipv4:
    cmp $IP_END, %ecx
    jb rx_other
    movzbl IP_VER_IHL(%rsi), %eax
    mov %eax, %edx
    shr $4, %eax
    cmp $4, %eax
    jne rx_other
    cmpb $IP_PROTO_UDP, IP_PROTO(%rsi)
    jne rx_other
    and $0xf, %edx
    shl $2, %edx                /* the IPv4 header's length */
    cmp $20, %edx
    jb rx_other
    add $(ETH_LEN + 8), %edx    /* the UDP payload's offset */
    cmp %edx, %ecx
    jb rx_other
    movzwl -8 + 2(%rsi,%rdx), %eax  /* the destination port */
    xchg %al, %ah
    cmp $UDP_PORT, %eax
    jne rx_other
    cmpl $0, udp_seen(%rip)
    jne rx_done
    movl $1, udp_seen(%rip)
    /* The payload: what the UDP length says, within the frame. */
    movzwl -8 + 4(%rsi,%rdx), %eax  /* the UDP length */
    xchg %al, %ah
    sub $8, %eax
    jae 1f
    xor %eax, %eax
1:  sub %edx, %ecx
    cmp %eax, %ecx
    jbe 1f
    mov %eax, %ecx
1:  cmp $PAYLOAD_MAX, %ecx
    jbe 1f
    mov $PAYLOAD_MAX, %ecx
1:  mov %ecx, udp_len(%rip)
    push %rsi
    lea ETH_SRC(%rsi), %rsi
    lea udp_mac(%rip), %rdi
    call copy_mac
    pop %rsi
    add %rdx, %rsi
    lea udp_payload(%rip), %rdi
    rep movsb

rx_done:
    pop %rdi
    pop %rsi
    pop %rdx
    pop %rcx
    pop %rax
    ret

/* Takes back the frames the device used on the transmitq. */
tx_poll:
    push %rax
    push %rcx
    push %rdx
    push %rdi
    push %r13
    lea net_txq(%rip), %r13
    mov Q_RING(%r13), %edi
1:  movzwl USED_IDX(%rdi), %eax
    movzwl Q_USED(%r13), %edx
    cmp %ax, %dx
    je 2f
    inc %edx
    mov %dx, Q_USED(%r13)
    dec %edx
    and $(QSIZE - 1), %edx
    mov USED_RING(%rdi,%rdx,8), %ecx
    cmp $2, %ecx
    jb 3f
    DEV_FAIL "transmitq: used element names no frame"
3:  cmpl $0, tx_pending(%rip)
    jne 3f
    DEV_FAIL "transmitq: a frame used twice"
3:  decl tx_pending(%rip)
    jmp 1b
2:  pop %r13
    pop %rdi
    pop %rdx
    pop %rcx
    pop %rax
    ret

/* Sends the ARP request (descriptor 0) and the UDP datagram (descriptor
 * 1) of the transmitq, unless the device still has those of the tick
 * before. */
tx_send:
    push %rax
    push %rcx
    push %rdx
    push %rsi
    push %rdi
    push %r13
    cmpl $0, tx_pending(%rip)
    jne 1f
    lea net_txq(%rip), %r13
    mov Q_RING(%r13), %edi
    xor %esi, %esi
    xor %ecx, %ecx
    lea arp_buf(%rip), %rax
    mov $(NET_HDR_LEN + ARP_FRAME_LEN), %edx
    call desc_set
    call q_offer
    inc %ecx
    lea udp_buf(%rip), %rax
    mov $(NET_HDR_LEN + UDP_FRAME_LEN), %edx
    call desc_set
    call q_offer
    movl $2, tx_pending(%rip)
    call q_notify
1:  pop %r13
    pop %rdi
    pop %rsi
    pop %rdx
    pop %rcx
    pop %rax
    ret

/* Once per tick: the deadlines, then the frames of this tick. */
tick_poll:
    push %rax
    mov ticks(%rip), %eax
    cmp last_tick(%rip), %eax
    je 9f
    mov %eax, last_tick(%rip)
    sub start_tick(%rip), %eax
    cmpl $0, both_seen(%rip)
    jne 2f
    cmpl $0, arp_seen(%rip)
    je 1f
    cmpl $0, udp_seen(%rip)
    je 1f
    movl $1, both_seen(%rip)
    call print_peer
    jmp 8f
1:  cmpl $0, peer_seen(%rip)
    jne 1f
    cmp $NO_PEER_TICKS, %eax
    jb 8f
    PRINT64 "netping: no peer\n"
    EXIT NETPING_EXIT
1:  cmp $GIVE_UP_TICKS, %eax
    jb 8f
    call print_peer
    PRINT64 "netping: error: no arp request and udp datagram from the peer\n"
    EXIT EXIT_UNEXPECTED
2:  incl extra_ticks(%rip)
    cmpl $EXTRA_TICKS, extra_ticks(%rip)
    jbe 8f
    PRINT64 "netping: done\n"
    EXIT NETPING_EXIT
8:  call tx_send
9:  pop %rax
    ret

/* Prints what was kept of the peer's ARP request and UDP datagram. */
print_peer:
    push %rax
    push %rcx
    push %rsi
    cmpl $0, arp_seen(%rip)
    je 1f
    PRINT64 "netping: arp from "
    lea arp_mac(%rip), %rsi
    call print_mac
    PRINT64 " who-has "
    xor %ecx, %ecx
2:  test %ecx, %ecx
    jz 3f
    PRINT64 "."
3:  lea arp_ip(%rip), %rsi
    movzbl (%rsi,%rcx), %eax
    call putdec64
    inc %ecx
    cmp $4, %ecx
    jb 2b
    PRINT64 "\n"
1:  cmpl $0, udp_seen(%rip)
    je 1f
    PRINT64 "netping: udp from "
    lea udp_mac(%rip), %rsi
    call print_mac
    PRINT64 ": \""
    lea udp_payload(%rip), %rsi
    mov udp_len(%rip), %ecx
    test %ecx, %ecx
    jz 4f
2:  lodsb
    cmp $0x20, %al
    jb 3f
    cmp $0x7e, %al
    jbe 5f
3:  mov $'?', %al
5:  call putc64
    dec %ecx
    jnz 2b
4:  PRINT64 "\"\n"
1:  pop %rsi
    pop %rcx
    pop %rax
    ret

net_irq:
    incl net_dev + DEV_IRQS(%rip)
    LAPIC_EOI_WRITE
    iretq

    .section .rodata
/* The devices this guest drives (see virtio.h). */
    .balign 4
virtio_drivers:
    .long VIRTIO_ID_NET, net_dev
    .long 0, 0
net_name: .asciz "netping"
hex_digits: .ascii "0123456789abcdef"

    .section .data
    DEVICE net_dev, net_name, NET_VECTOR
    QUEUE net_rxq, net_rx_ring, 0
    QUEUE net_txq, net_tx_ring, 1
    .balign 4
start_tick: .long 0
last_tick: .long 0
extra_ticks: .long 0
tx_pending: .long 0
peer_seen: .long 0
arp_seen: .long 0
udp_seen: .long 0
both_seen: .long 0
own_frames: .long 0
other_frames: .long 0
arp_ip: .long 0
udp_len: .long 0
own_mac: .skip 8
arp_mac: .skip 8
udp_mac: .skip 8

/* The two frames, each after its zeroed virtio_net_hdr; the MAC, the
 * payload's hex digits and the checksum are filled in by build_frames. */
    .balign 16
arp_buf:
    .skip NET_HDR_LEN
arp_frame:
    .byte 0xff, 0xff, 0xff, 0xff, 0xff, 0xff   /* destination: broadcast */
    .skip 6                                     /* source: own MAC */
    .byte 0x08, 0x06                            /* ARP */
    .byte 0x00, 0x01, 0x08, 0x00, 6, 4          /* Ethernet, IPv4 */
    .byte 0x00, 0x01                            /* request */
    .skip 6                                     /* sender: own MAC */
    .byte 10, 0, 2, 15
    .skip 6                                     /* target MAC: zeros */
    .byte 10, 0, 2, 2
    .balign 16
udp_buf:
    .skip NET_HDR_LEN
udp_frame:
    .byte 0xff, 0xff, 0xff, 0xff, 0xff, 0xff   /* destination: broadcast */
    .skip 6                                     /* source: own MAC */
    .byte 0x08, 0x00                            /* IPv4 */
    .byte 0x45, 0x00, 0x00, 42                  /* version 4, IHL 5, length */
    .byte 0x00, 0x00, 0x00, 0x00                /* ID, no fragmentation */
    .byte 64, IP_PROTO_UDP, 0x00, 0x00          /* TTL, UDP, checksum */
    .byte 10, 0, 2, 15
    .byte 10, 0, 2, 2
    .byte UDP_PORT >> 8, UDP_PORT & 0xff, UDP_PORT >> 8, UDP_PORT & 0xff
    .byte 0x00, 22, 0x00, 0x00                  /* UDP length, no checksum */
    .ascii "nyx netping "
    .skip 2                                     /* the MAC's last byte */

    .section .bss
    .balign 4096
net_rx_ring: .skip 4096
net_tx_ring: .skip 4096
rx_bufs: .skip RX_BUFS * RX_STRIDE
udp_payload: .skip PAYLOAD_MAX

    LIB32
    LIB64
    APIC_LIB64
    VIRTIO_LIB64
    COMMON_DATA
    APIC_DATA
    VIRTIO_DATA
