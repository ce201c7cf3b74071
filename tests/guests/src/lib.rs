//! The in-tree test guests of Nyx: small Multiboot v1 ELF32 kernels assembled
//! from `tests/guests/*.S` at build time, with what each is expected to do
//! (its debug-exit value, its serial input and, where the output does not
//! depend on timing, its golden serial output recorded under QEMU; see
//! `tests/golden/README.md`). A small ELF symbol lookup lets debugger tests
//! find the addresses of the guests' global symbols. Why guests that take
//! interrupts switch to long mode first: ARCHITECTURE.md at the repository
//! root (the emulated-KVM quirks).

use std::path::PathBuf;

macro_rules! guest_image {
    ($name:literal) => {
        include_bytes!(concat!(env!("OUT_DIR"), "/", $name, ".elf"))
    };
}

/// Prints a greeting and its Multiboot information; exits with [`HELLO_EXIT`].
pub const HELLO: &[u8] = guest_image!("hello");
/// PIT + PIC in long mode, "tick N" every 10 ticks; exits with [`PIT_EXIT`].
pub const PIT: &[u8] = guest_image!("pit");
/// Runs at a higher-half alias (`higher_half_entry`), takes `int $0x30` and PIT
/// ticks, writes `counter`; exits with [`LONGMODE_EXIT`].
pub const LONGMODE: &[u8] = guest_image!("longmode");
/// Prints some values, then triple-faults at `triple_fault_here`.
pub const TRIPLE: &[u8] = guest_image!("triple");
/// Unassigned ports and MMIO, PCI host bridge ID, CMOS memory size; exits with
/// [`PORTS_EXIT`].
pub const PORTS: &[u8] = guest_image!("ports");
/// Echoes serial input upper-cased (RX interrupts) up to a '.'; exits with
/// [`ECHO_EXIT`].
pub const ECHO: &[u8] = guest_image!("echo");
/// A register-invariant busy loop incrementing `counter`, sampled at each of
/// 50 PIT ticks; exits with [`COUNTER_EXIT`]. Timing-dependent.
pub const COUNTER: &[u8] = guest_image!("counter");
/// Hash of 1000 RDTSC values; exits with [`RDTSC_EXIT`]. Timing-dependent.
pub const RDTSC: &[u8] = guest_image!("rdtsc");
/// CMOS RTC date and a hash of 100 PIT latches; exits with [`RTC_EXIT`].
/// Timing-dependent.
pub const RTC: &[u8] = guest_image!("rtc");
/// Echo that idles with a 1 kHz PIT between bytes: every 10 ticks echoes one
/// byte of input upper-cased, at a '.' prints the ticks counted; exits with
/// [`TICKS_EXIT`]. Timing-dependent (not under the check clock).
pub const TICKS: &[u8] = guest_image!("ticks");

/// Prints what `cpuid` answers for leaves 0, 1, 7, 0xD and 0x8000_0001
/// ("LEAF SUBLEAF REG VALUE" lines); exits with [`CPUID_EXIT`]. Its output
/// depends on the CPU model and the host, so it is not in [`ALL`] (no golden
/// output).
pub const CPUID: &[u8] = guest_image!("cpuid");
/// Debug-exit value of [`CPUID`].
pub const CPUID_EXIT: u32 = 0x47;

/// A Linux-style alternative: reads the TSC through a slot holding `rdtsc`,
/// then `lfence; rdtsc`, then `rdtscp` copied over it from
/// `.altinstr_replacement` (described by `.altinstructions` in Linux 6.1's
/// layout) as Linux's `apply_alternatives` does; exits with
/// [`ALTINSTR_EXIT`] when every read advanced, else with
/// [`UNEXPECTED_EXIT`]. Timing-dependent values, so not in [`ALL`].
pub const ALTINSTR: &[u8] = guest_image!("altinstr");
/// Debug-exit value of [`ALTINSTR`].
pub const ALTINSTR_EXIT: u32 = 0x4a;
/// Long mode `int3` (interrupts off) and `int $0x30` (interrupts on), each
/// checking its handler's return address; exits with [`SOFTINT_EXIT`].
pub const SOFTINT: &[u8] = guest_image!("softint");

/// Waits for 20 PIT ticks in a loop of port 0x80 writes (an exit every few
/// microseconds, interrupts on, no HLT); exits with [`BUSYIO_EXIT`].
pub const BUSYIO: &[u8] = guest_image!("busyio");
/// Debug-exit value of [`BUSYIO`].
pub const BUSYIO_EXIT: u32 = 0x49;
/// Suspends to S3 with the FACS waking vector at a real-mode routine and the
/// RTC alarm as its wake source; the routine checks WAK_STS and RTC_STS and
/// exits with [`S3_EXIT`]. Needs the APIC platform (ACPI).
pub const S3: &[u8] = guest_image!("s3");
/// Debug-exit value of [`S3`].
pub const S3_EXIT: u32 = 0x55;
/// The [`COUNTER`] guest on the local APIC timer (1 kHz periodic, an MMIO
/// EOI per tick): a busy loop sampled at each of 50 ticks; exits with
/// [`APICCOUNTER_EXIT`]. Timing-dependent. Needs the APIC platform.
pub const APICCOUNTER: &[u8] = guest_image!("apiccounter");
/// Debug-exit value of [`APICCOUNTER`].
pub const APICCOUNTER_EXIT: u32 = 0x57;
/// A virtio 1.x PCI driver: enumerates bus 0, places the BARs of the
/// virtio devices, enables MSI-X and drives virtio-blk (reads, a write,
/// flush, write zeroes, discard, GET_ID, an out-of-range read, an unknown
/// request type), virtio-rng (16 bytes) and virtio-console (a line on the
/// transmitq, [`VIRTIO_CONSOLE_OUTPUT`]); exits with [`VIRTIO_EXIT`]. Needs
/// the APIC platform and the virtio devices of its golden run
/// ([`Expected::needs_virtio`]): virtio-blk at 00:03.0 on a copy of
/// [`virtio_disk_image`] with the serial [`VIRTIO_DISK_SERIAL`],
/// virtio-rng at 00:04.0, virtio-console at 00:05.0 (consecutive slots from 3, as Nyx places them).
pub const VIRTIO: &[u8] = guest_image!("virtio");
/// Debug-exit value of [`VIRTIO`].
pub const VIRTIO_EXIT: u32 = 0x59;
/// PCI device numbers (bus 0, function 0) of the virtio devices the
/// [`VIRTIO`] golden run had: virtio-blk (1af4:1042), virtio-rng
/// (1af4:1044), virtio-console (1af4:1043).
pub const VIRTIO_BLK_SLOT: u8 = 3;
/// See [`VIRTIO_BLK_SLOT`].
pub const VIRTIO_RNG_SLOT: u8 = 4;
/// See [`VIRTIO_BLK_SLOT`].
pub const VIRTIO_CONSOLE_SLOT: u8 = 5;
/// The virtio-blk serial (GET_ID) of the [`VIRTIO`] golden run.
pub const VIRTIO_DISK_SERIAL: &str = "nyx-disk0";
/// Sectors (512 bytes) of [`virtio_disk_image`].
pub const VIRTIO_DISK_SECTORS: usize = 256;
/// What [`VIRTIO`] writes to the virtio-console: the complete output of
/// the console's chardev in the golden run.
pub const VIRTIO_CONSOLE_OUTPUT: &str = include_str!("../../golden/virtio.console");
const VIRTIO_DISK_SHA256: &str = include_str!("../../golden/virtio.img.sha256");

/// The disk image of the [`VIRTIO`] golden run, as
/// `tests/golden/virtio-disk.sh` writes it: [`VIRTIO_DISK_SECTORS`]
/// sectors of 16 text lines of 32 bytes, line L of sector S reading
/// `sector SSSS line LL byte BBBBBB\n` (decimal; BBBBBB is the line's
/// offset in the image).
pub fn virtio_disk_image() -> Vec<u8> {
    const LINE: usize = 32;
    const LINES: usize = 512 / LINE;
    let mut image = Vec::with_capacity(VIRTIO_DISK_SECTORS * 512);
    for sector in 0..VIRTIO_DISK_SECTORS {
        for line in 0..LINES {
            let offset = sector * 512 + line * LINE;
            image.extend_from_slice(format!("sector {sector:04} line {line:02} byte {offset:06}\n").as_bytes());
        }
    }
    image
}

/// Echoes lines read from the virtio-console's receive queue: each line
/// printed on COM1 and sent upper-cased on the transmitq, up to a '.';
/// exits with [`CONECHO_EXIT`]. Needs the APIC platform and a
/// virtio-console alone at 00:03.0 whose input is [`CONECHO_INPUT`]
/// ([`Expected::needs_virtio`]); its console output is then
/// [`CONECHO_CONSOLE_OUTPUT`].
pub const CONECHO: &[u8] = guest_image!("conecho");
/// Debug-exit value of [`CONECHO`].
pub const CONECHO_EXIT: u32 = 0x5e;
/// The virtio-console input of the [`CONECHO`] golden run: three lines up
/// to the '.', and bytes after it that the guest never takes in.
pub const CONECHO_INPUT: &[u8] = include_bytes!("../../golden/conecho.in");
/// What [`CONECHO`] writes to the virtio-console given [`CONECHO_INPUT`]:
/// the complete console output of the golden run.
pub const CONECHO_CONSOLE_OUTPUT: &str = include_str!("../../golden/conecho.console");

/// A virtio-net driver looking for a peer on its link: prints its MAC,
/// then every 20 ms (local APIC timer) sends an ARP request for 10.0.2.2
/// and a UDP datagram to port 5555 (payload "nyx netping XX", XX the last
/// byte of its MAC), both broadcast from 10.0.2.15; once it has a peer's
/// first ARP request and first UDP datagram it prints them, sends for five
/// more ticks and exits with [`NETPING_EXIT`]. With no peer frame within
/// 150 ticks (3 s) it prints "netping: no peer" and exits with the same
/// value. Needs the APIC platform and a virtio-net alone at 00:03.0 (1af4:1041,
/// offering VERSION_1 and MAC) with the MAC [`NETPING_MAC`]
/// ([`Expected::needs_virtio`]); its golden run's link delivered nothing.
/// Two instances on one link, with [`NETPING_MAC`] and [`NETPING_PEER_MAC`],
/// print [`NETPING_A_OUTPUT`] and [`NETPING_B_OUTPUT`].
pub const NETPING: &[u8] = guest_image!("netping");
/// Debug-exit value of [`NETPING`], with a peer or without.
pub const NETPING_EXIT: u32 = 0x61;
/// The MAC of [`NETPING`]'s virtio-net in its golden run, and of the first
/// of the pair.
pub const NETPING_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];
/// The MAC of the second [`NETPING`] of the pair.
pub const NETPING_PEER_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x57];
/// The complete serial output of the [`NETPING`] with [`NETPING_MAC`] when
/// its peer is the one with [`NETPING_PEER_MAC`] (recorded by
/// `tests/golden/netping-pair.sh`).
pub const NETPING_A_OUTPUT: &str = include_str!("../../golden/netping-a.out");
/// The complete serial output of the [`NETPING`] with [`NETPING_PEER_MAC`]
/// in the pair of [`NETPING_A_OUTPUT`].
pub const NETPING_B_OUTPUT: &str = include_str!("../../golden/netping-b.out");

/// The ARP request [`NETPING`] with the MAC `mac` sends every tick (42
/// bytes, after the zeroed 12-byte virtio_net_hdr): broadcast, who-has
/// 10.0.2.2 tell 10.0.2.15.
pub fn netping_arp_request(mac: [u8; 6]) -> Vec<u8> {
    let mut f = Vec::with_capacity(42);
    f.extend_from_slice(&[0xff; 6]);
    f.extend_from_slice(&mac);
    f.extend_from_slice(&[0x08, 0x06, 0x00, 0x01, 0x08, 0x00, 6, 4, 0x00, 0x01]);
    f.extend_from_slice(&mac);
    f.extend_from_slice(&[10, 0, 2, 15]);
    f.extend_from_slice(&[0; 6]);
    f.extend_from_slice(&[10, 0, 2, 2]);
    f
}

/// The UDP datagram [`NETPING`] with the MAC `mac` sends every tick (56
/// bytes, after the zeroed 12-byte virtio_net_hdr): broadcast, IPv4
/// 10.0.2.15 to 10.0.2.2 (TTL 64, ID 0, no fragmentation, header checksum
/// set), UDP port 5555 to 5555 without a checksum, the payload "nyx
/// netping XX" (XX: the MAC's last byte in lower-case hex).
pub fn netping_udp_datagram(mac: [u8; 6]) -> Vec<u8> {
    let payload = format!("nyx netping {:02x}", mac[5]);
    let udp_len = 8 + payload.len() as u16;
    let ip_len = 20 + udp_len;
    let mut ip = vec![0x45, 0x00];
    ip.extend_from_slice(&ip_len.to_be_bytes());
    ip.extend_from_slice(&[0, 0, 0, 0, 64, 17, 0, 0, 10, 0, 2, 15, 10, 0, 2, 2]);
    let mut sum: u32 = ip.chunks(2).map(|w| u32::from(u16::from_be_bytes([w[0], w[1]]))).sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    ip[10..12].copy_from_slice(&(!(sum as u16)).to_be_bytes());
    let mut f = Vec::with_capacity(14 + usize::from(ip_len));
    f.extend_from_slice(&[0xff; 6]);
    f.extend_from_slice(&mac);
    f.extend_from_slice(&[0x08, 0x00]);
    f.extend_from_slice(&ip);
    f.extend_from_slice(&5555u16.to_be_bytes());
    f.extend_from_slice(&5555u16.to_be_bytes());
    f.extend_from_slice(&udp_len.to_be_bytes());
    f.extend_from_slice(&[0, 0]);
    f.extend_from_slice(payload.as_bytes());
    f
}

/// The SHA-256 (lower-case hex) of the [`VIRTIO`] golden run's disk image
/// after the run: [`virtio_disk_image`] with sectors 16..23 written, 32..39
/// zeroed by WRITE_ZEROES and 40..47 discarded, which QEMU (`discard=unmap`
/// on a file system that punches holes) left reading as zeros.
pub fn virtio_disk_sha256_after_run() -> &'static str {
    VIRTIO_DISK_SHA256.trim_end()
}

/// A virtio-blk benchmark guest (`tests/guests/blkbench.h`, on the driver
/// of [`VIRTIO`]): sets up virtio-blk and makes no request, the baseline
/// of [`BLKSEQ`], [`BLKRAND`] and [`BLKWRITE`]; exits with
/// [`BLKNOP_EXIT`]. Each of the four needs the APIC platform and
/// virtio-blk alone at 00:03.0 ([`VIRTIO_BLK_SLOT`]) on a copy of
/// [`blkbench_disk_image`] ([`Expected::needs_virtio`]), and ends with the
/// line "NAME: R requests, B bytes, I interrupts, fnv1a64 0xHASH" (an
/// FNV-1a 64 over two 64-bit words of every request's data: the one at
/// offset 8 and the last).
pub const BLKNOP: &[u8] = guest_image!("blknop");
/// Debug-exit value of [`BLKNOP`].
pub const BLKNOP_EXIT: u32 = 0x5a;
/// Reads the whole disk in 64 KiB requests, one at a time; exits with
/// [`BLKSEQ_EXIT`]. See [`BLKNOP`].
pub const BLKSEQ: &[u8] = guest_image!("blkseq");
/// Debug-exit value of [`BLKSEQ`].
pub const BLKSEQ_EXIT: u32 = 0x5b;
/// 4096 random 4 KiB reads (sectors from an LCG, aligned to 8), one at a
/// time; exits with [`BLKRAND_EXIT`]. See [`BLKNOP`].
pub const BLKRAND: &[u8] = guest_image!("blkrand");
/// Debug-exit value of [`BLKRAND`].
pub const BLKRAND_EXIT: u32 = 0x5c;
/// 1024 random 4 KiB writes (sectors from the LCG of [`BLKRAND`]), one at
/// a time, then a flush; exits with [`BLKWRITE_EXIT`]. See [`BLKNOP`] and
/// [`blkwrite_disk_sha256_after_run`].
pub const BLKWRITE: &[u8] = guest_image!("blkwrite");
/// Debug-exit value of [`BLKWRITE`].
pub const BLKWRITE_EXIT: u32 = 0x5d;
/// Sectors (512 bytes) of [`blkbench_disk_image`]: 32 MiB.
pub const BLKBENCH_DISK_SECTORS: usize = 65536;
const BLKWRITE_DISK_SHA256: &str = include_str!("../../golden/blkwrite.img.sha256");

/// The disk image of the virtio-blk benchmark guests' golden runs, as
/// `tests/golden/blkbench-disk.sh` writes it: [`BLKBENCH_DISK_SECTORS`]
/// sectors of 16 text lines of 32 bytes, line L of sector S reading
/// `sector SSSSSS line LL @BBBBBBBB\n` (decimal; BBBBBBBB is the line's
/// offset in the image).
pub fn blkbench_disk_image() -> Vec<u8> {
    const LINE: usize = 32;
    const LINES: usize = 512 / LINE;
    let mut image = Vec::with_capacity(BLKBENCH_DISK_SECTORS * 512);
    for sector in 0..BLKBENCH_DISK_SECTORS {
        for line in 0..LINES {
            let offset = sector * 512 + line * LINE;
            image.extend_from_slice(format!("sector {sector:06} line {line:02} @{offset:08}\n").as_bytes());
        }
    }
    image
}

/// The SHA-256 (lower-case hex) of [`blkbench_disk_image`] after
/// [`BLKWRITE`]'s golden run under QEMU.
pub fn blkwrite_disk_sha256_after_run() -> &'static str {
    BLKWRITE_DISK_SHA256.trim_end()
}
/// A benchmark guest: TSC cycles per port 0x80 write, PIC EOI, local APIC
/// EOI (MMIO) and self-IPI round trip ("NAME CYCLES" lines); exits with
/// [`EOICOST_EXIT`]. Timing-dependent, needs the APIC platform; not in
/// [`ALL`].
pub const EOICOST: &[u8] = guest_image!("eoicost");
/// Debug-exit value of [`EOICOST`].
pub const EOICOST_EXIT: u32 = 0x58;
/// Waits for the ACPI power button (the SCI through the 8259 pair, on the
/// modern platform) in a loop without exits, prints "pwrbtn: pressed" and
/// powers off by S5. The press comes from outside, so there is no golden
/// output and it is not in [`ALL`].
pub const PWRBTN: &[u8] = guest_image!("pwrbtn");
/// The local APIC: version, SVR, periodic and one-shot timer, self-IPI, TPR
/// masking; exits with [`LAPIC_EXIT`]. Needs the APIC platform
/// ([`Expected::needs_apic`]).
pub const LAPIC: &[u8] = guest_image!("lapic");
/// The IOAPIC: version, the PIT through GSI 2, COM1 level-triggered through
/// pin 4; exits with [`IOAPIC_EXIT`]. Needs the APIC platform.
pub const IOAPIC: &[u8] = guest_image!("ioapic");
/// The HPET: capabilities, timer 0 periodic in legacy replacement mode
/// through IOAPIC pin 2; exits with [`HPET_EXIT`]. Needs the APIC platform.
pub const HPET: &[u8] = guest_image!("hpet");
/// The ACPI tables (RSDP, RSDT, FADT, MADT, HPET, DSDT), the PM timer,
/// ACPI_ENABLE through SMI_CMD, then S5: it powers off
/// ([`Expected::powers_off`]) instead of writing to the debug-exit port.
/// Needs the APIC platform.
pub const ACPI: &[u8] = guest_image!("acpi");
/// The ACPI PM timer (port 0x608) measured against 20 PIT ticks at 100 Hz
/// through the 8259 pair: within 5% of 3.579545 MHz, handling the 24-bit
/// wrap, up to five tries; prints "pm timer rate ok" and exits with
/// [`PMTIMER_EXIT`]. Needs the APIC platform (the legacy machine has no PM
/// block).
pub const PMTIMER: &[u8] = guest_image!("pmtimer");
/// The local APIC timer in TSC-deadline mode: CPUID.1:ECX bit 24, ten
/// deadlines of `rdtsc` + 2,000,000 through IA32_TSC_DEADLINE (MSR 0x6E0),
/// the MSR reading 0 after each expiry, as written while armed, disarming
/// by writing 0, a deadline in the past; exits with [`TSCDL_EXIT`]. Needs
/// the APIC platform. QEMU's TCG has no TSC-deadline timer (it drops the
/// CPUID bit and never delivers the interrupt), so there is no golden
/// output and it is not in [`ALL`].
pub const TSCDL: &[u8] = guest_image!("tscdl");
/// The complete serial output of [`TSCDL`] when every check passes: what
/// QEMU 7.2 prints over KVM's in-kernel local APIC (`-accel kvm -cpu
/// qemu64,+tsc-deadline`), the reference in place of a golden file.
pub const TSCDL_OUTPUT: &str = "tscdl: 8259 masked, local apic enabled
cpuid: tsc-deadline 1
lvt timer 0x00040030
tsc-deadline tick 1
tsc-deadline tick 2
tsc-deadline tick 3
tsc-deadline tick 4
tsc-deadline tick 5
tsc-deadline tick 6
tsc-deadline tick 7
tsc-deadline tick 8
tsc-deadline tick 9
tsc-deadline tick 10
msr 0x6e0 after expiry: 0 every time
msr 0x6e0 armed: reads as written
msr 0x6e0 after writing 0: 0
disarmed: interrupts in 3 pit periods 0
deadline in the past: fired
tsc-deadline interrupts 11
";

/// Debug-exit values (the value written to port 0xF4; QEMU exits with
/// `(value << 1) | 1`, see [`qemu_exit_code`]).
pub const HELLO_EXIT: u32 = 0x21;
/// Debug-exit value of [`PIT`].
pub const PIT_EXIT: u32 = 0x11;
/// Debug-exit value of [`LONGMODE`].
pub const LONGMODE_EXIT: u32 = 0x00;
/// Debug-exit value of [`PORTS`].
pub const PORTS_EXIT: u32 = 0x22;
/// Debug-exit value of [`ECHO`].
pub const ECHO_EXIT: u32 = 0x33;
/// Debug-exit value of [`COUNTER`].
pub const COUNTER_EXIT: u32 = 0x44;
/// Debug-exit value of [`RDTSC`].
pub const RDTSC_EXIT: u32 = 0x45;
/// Debug-exit value of [`SOFTINT`].
pub const SOFTINT_EXIT: u32 = 0x48;
/// Debug-exit value of [`RTC`].
pub const RTC_EXIT: u32 = 0x46;
/// Debug-exit value of [`TICKS`].
pub const TICKS_EXIT: u32 = 0x34;
/// Debug-exit value of [`LAPIC`].
pub const LAPIC_EXIT: u32 = 0x50;
/// Debug-exit value of [`IOAPIC`].
pub const IOAPIC_EXIT: u32 = 0x51;
/// Debug-exit value of [`HPET`].
pub const HPET_EXIT: u32 = 0x52;
/// Debug-exit value of [`PMTIMER`].
pub const PMTIMER_EXIT: u32 = 0x53;
/// Debug-exit value of [`TSCDL`].
pub const TSCDL_EXIT: u32 = 0x56;

/// Four CPUs: the BSP starts APs 1..3 (INIT, STARTUP, STARTUP; a
/// real-mode trampoline at 0x7000, STARTUP vector 0x07), each goes to long
/// mode and increments a counter [`SMP_ITERS`] times under a spinlock and
/// another without a lock, sends the BSP a fixed IPI (vector 0x40 + its
/// APIC ID); the BSP then sends a fixed IPI to all excluding self and an
/// NMI to AP 2, and prints what the APs left; exits with [`SMP_EXIT`].
/// Needs the APIC platform and [`SMP_CPUS`] vCPUs (APIC IDs 0..3). One
/// line of its output varies from run to run, the lock-free counter's
/// total: compare through [`mask_smp_racy`].
pub const SMP: &[u8] = guest_image!("smp");
/// Debug-exit value of [`SMP`].
pub const SMP_EXIT: u32 = 0x5f;
/// The vCPUs [`SMP`] needs (QEMU `-smp 4`).
pub const SMP_CPUS: u32 = 4;
/// The increments of each counter per AP in [`SMP`] (`ITERS` in
/// `tests/guests/smp.S`).
pub const SMP_ITERS: u32 = 50000;
/// The start of the one line of [`SMP`]'s output that varies: the total of
/// the counter the APs increment without a lock.
pub const SMP_RACY_PREFIX: &str = "smp: racy total 0x";

/// `output` with the rest of each line that starts with
/// [`SMP_RACY_PREFIX`] replaced by `<masked>`, for comparing [`SMP`]'s
/// output with its golden.
pub fn mask_smp_racy(output: &str) -> String {
    output
        .split_inclusive('\n')
        .map(|line| match line.strip_prefix(SMP_RACY_PREFIX) {
            Some(rest) => {
                let end = if rest.ends_with('\n') { "\n" } else { "" };
                format!("{SMP_RACY_PREFIX}<masked>{end}")
            }
            None => line.to_string(),
        })
        .collect()
}

/// Work split among the CPUs, for measuring parallel speedup: the BSP
/// reads the number of CPUs N from CPUID leaf 1 EBX[23:16] (0 as 1, at
/// most [`SMPWORK_MAX_CPUS`]), starts APs 1..N-1 as [`SMP`] does, and each
/// CPU k sums its share of the first [`SMPWORK_ITERS`] outputs of
/// SplitMix64 (outputs k x ITERS / N up to (k + 1) x ITERS / N); the BSP
/// prints N and the total ([`smpwork_sum`], whatever N is); exits with
/// [`SMPWORK_EXIT`]. Needs the APIC platform; its golden run had
/// [`SMPWORK_CPUS`] vCPUs.
pub const SMPWORK: &[u8] = guest_image!("smpwork");
/// Debug-exit value of [`SMPWORK`].
pub const SMPWORK_EXIT: u32 = 0x60;
/// The vCPUs of [`SMPWORK`]'s golden run (QEMU `-smp 4`).
pub const SMPWORK_CPUS: u32 = 4;
/// The most CPUs [`SMPWORK`] uses (`MAX_CPUS` in
/// `tests/guests/smpwork.S`).
pub const SMPWORK_MAX_CPUS: u32 = 8;
/// The SplitMix64 outputs [`SMPWORK`] sums over all its CPUs (`WORK` in
/// `tests/guests/smpwork.S`).
pub const SMPWORK_ITERS: u64 = 240_000;
/// The start of [`SMPWORK`]'s result line, followed by 16 hex digits.
pub const SMPWORK_RESULT_PREFIX: &str = "smpwork: result 0x";

/// The sum (mod 2^64) of the SplitMix64 outputs `range` (seeded with 0:
/// output i is the finalizer of the state (i + 1) x 0x9E3779B97F4A7C15):
/// what [`SMPWORK`]'s CPUs compute, each for its share of
/// `0..SMPWORK_ITERS`.
pub fn smpwork_sum(range: std::ops::Range<u64>) -> u64 {
    const GAMMA: u64 = 0x9E37_79B9_7F4A_7C15;
    range.fold(0u64, |sum, i| {
        let mut z = i.wrapping_add(1).wrapping_mul(GAMMA);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        sum.wrapping_add(z ^ (z >> 31))
    })
}

/// Debug-exit value any guest writes when something unexpected happened
/// (an exception, a stray interrupt, a failed self-check).
pub const UNEXPECTED_EXIT: u32 = 0x7f;

/// Guest RAM the goldens were recorded with (QEMU `-m 64`).
pub const MEM_MIB: u64 = 64;
/// The `-append` string of the golden runs. QEMU's Multiboot loader prepends
/// the kernel's file name, so the guest sees [`multiboot_cmdline`].
pub const GOLDEN_APPEND: &str = "nyx-test arg=1";
/// Offset of the higher-half alias used by [`LONGMODE`].
pub const VIRT_OFFSET: u32 = 0xC000_0000;

/// Every guest, by name.
pub const ALL: &[(&str, &[u8])] = &[
    ("hello", HELLO),
    ("pit", PIT),
    ("longmode", LONGMODE),
    ("triple", TRIPLE),
    ("ports", PORTS),
    ("echo", ECHO),
    ("counter", COUNTER),
    ("rdtsc", RDTSC),
    ("rtc", RTC),
    ("ticks", TICKS),
    ("softint", SOFTINT),
    ("busyio", BUSYIO),
    ("s3", S3),
    ("lapic", LAPIC),
    ("ioapic", IOAPIC),
    ("hpet", HPET),
    ("acpi", ACPI),
    ("pmtimer", PMTIMER),
    ("apiccounter", APICCOUNTER),
    ("virtio", VIRTIO),
    ("conecho", CONECHO),
    ("blknop", BLKNOP),
    ("blkseq", BLKSEQ),
    ("blkrand", BLKRAND),
    ("blkwrite", BLKWRITE),
    ("smp", SMP),
    ("smpwork", SMPWORK),
    ("netping", NETPING),
];

/// What a guest is expected to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Expected {
    /// The guest's name (its file stem).
    pub name: &'static str,
    /// The value it writes to the debug-exit port; `None` if it ends in a
    /// triple fault instead, or powers off ([`Expected::powers_off`]).
    pub exit_value: Option<u32>,
    /// Whether it ends by powering the machine off through ACPI (QEMU exit
    /// status 0) rather than by a debug-exit or a triple fault.
    pub powers_off: bool,
    /// Whether it needs the modern PC platform (local APIC, IOAPIC, HPET,
    /// ACPI: Nyx's `--irqchip apic`, QEMU's `pc` machine); the others run on
    /// either.
    pub needs_apic: bool,
    /// Whether it needs the virtio PCI devices of its golden run (see
    /// [`VIRTIO`], [`CONECHO`], [`BLKNOP`] for the virtio-blk benchmark
    /// guests, and [`NETPING`]); only on the APIC platform.
    pub needs_virtio: bool,
    /// Its complete serial output under QEMU; `None` if timing-dependent.
    /// (One line of [`SMP`]'s varies: see [`mask_smp_racy`].)
    pub golden: Option<&'static str>,
    /// The bytes fed to its COM1 receiver, if any.
    pub input: Option<&'static [u8]>,
}

/// Expectations of every guest, in the order of [`ALL`].
pub const EXPECTED: &[Expected] = &[
    Expected {
        name: "hello",
        exit_value: Some(HELLO_EXIT),
        golden: Some(include_str!("../../golden/hello.out")),
        input: None,
        powers_off: false,
        needs_apic: false,
        needs_virtio: false,
    },
    Expected {
        name: "pit",
        exit_value: Some(PIT_EXIT),
        golden: Some(include_str!("../../golden/pit.out")),
        input: None,
        powers_off: false,
        needs_apic: false,
        needs_virtio: false,
    },
    Expected {
        name: "longmode",
        exit_value: Some(LONGMODE_EXIT),
        golden: Some(include_str!("../../golden/longmode.out")),
        input: None,
        powers_off: false,
        needs_apic: false,
        needs_virtio: false,
    },
    Expected {
        name: "triple",
        exit_value: None,
        golden: Some(include_str!("../../golden/triple.out")),
        input: None,
        powers_off: false,
        needs_apic: false,
        needs_virtio: false,
    },
    Expected {
        name: "ports",
        exit_value: Some(PORTS_EXIT),
        golden: Some(include_str!("../../golden/ports.out")),
        input: None,
        powers_off: false,
        needs_apic: false,
        needs_virtio: false,
    },
    Expected {
        name: "echo",
        exit_value: Some(ECHO_EXIT),
        golden: Some(include_str!("../../golden/echo.out")),
        input: Some(include_bytes!("../../golden/echo.in")),
        powers_off: false,
        needs_apic: false,
        needs_virtio: false,
    },
    Expected {
        name: "counter",
        exit_value: Some(COUNTER_EXIT),
        golden: None,
        input: None,
        powers_off: false,
        needs_apic: false,
        needs_virtio: false,
    },
    Expected {
        name: "rdtsc",
        exit_value: Some(RDTSC_EXIT),
        golden: None,
        input: None,
        powers_off: false,
        needs_apic: false,
        needs_virtio: false,
    },
    Expected {
        name: "rtc",
        exit_value: Some(RTC_EXIT),
        golden: None,
        input: None,
        powers_off: false,
        needs_apic: false,
        needs_virtio: false,
    },
    Expected {
        name: "ticks",
        exit_value: Some(TICKS_EXIT),
        golden: None,
        input: Some(b"abc."),
        powers_off: false,
        needs_apic: false,
        needs_virtio: false,
    },
    Expected {
        name: "softint",
        exit_value: Some(SOFTINT_EXIT),
        golden: Some(include_str!("../../golden/softint.out")),
        input: None,
        powers_off: false,
        needs_apic: false,
        needs_virtio: false,
    },
    Expected {
        name: "busyio",
        exit_value: Some(BUSYIO_EXIT),
        golden: Some(include_str!("../../golden/busyio.out")),
        input: None,
        powers_off: false,
        needs_apic: false,
        needs_virtio: false,
    },
    Expected {
        name: "s3",
        exit_value: Some(S3_EXIT),
        golden: Some(include_str!("../../golden/s3.out")),
        input: None,
        powers_off: false,
        needs_apic: true,
        needs_virtio: false,
    },
    Expected {
        name: "lapic",
        exit_value: Some(LAPIC_EXIT),
        golden: Some(include_str!("../../golden/lapic.out")),
        input: None,
        powers_off: false,
        needs_apic: true,
        needs_virtio: false,
    },
    Expected {
        name: "ioapic",
        exit_value: Some(IOAPIC_EXIT),
        golden: Some(include_str!("../../golden/ioapic.out")),
        input: None,
        powers_off: false,
        needs_apic: true,
        needs_virtio: false,
    },
    Expected {
        name: "hpet",
        exit_value: Some(HPET_EXIT),
        golden: Some(include_str!("../../golden/hpet.out")),
        input: None,
        powers_off: false,
        needs_apic: true,
        needs_virtio: false,
    },
    Expected {
        name: "acpi",
        exit_value: None,
        golden: Some(include_str!("../../golden/acpi.out")),
        input: None,
        powers_off: true,
        needs_apic: true,
        needs_virtio: false,
    },
    Expected {
        name: "pmtimer",
        exit_value: Some(PMTIMER_EXIT),
        golden: Some(include_str!("../../golden/pmtimer.out")),
        input: None,
        powers_off: false,
        needs_apic: true,
        needs_virtio: false,
    },
    Expected {
        name: "apiccounter",
        exit_value: Some(APICCOUNTER_EXIT),
        golden: None,
        input: None,
        powers_off: false,
        needs_apic: true,
        needs_virtio: false,
    },
    Expected {
        name: "virtio",
        exit_value: Some(VIRTIO_EXIT),
        golden: Some(include_str!("../../golden/virtio.out")),
        input: None,
        powers_off: false,
        needs_apic: true,
        needs_virtio: true,
    },
    Expected {
        name: "conecho",
        exit_value: Some(CONECHO_EXIT),
        golden: Some(include_str!("../../golden/conecho.out")),
        input: None,
        powers_off: false,
        needs_apic: true,
        needs_virtio: true,
    },
    Expected {
        name: "blknop",
        exit_value: Some(BLKNOP_EXIT),
        golden: Some(include_str!("../../golden/blknop.out")),
        input: None,
        powers_off: false,
        needs_apic: true,
        needs_virtio: true,
    },
    Expected {
        name: "blkseq",
        exit_value: Some(BLKSEQ_EXIT),
        golden: Some(include_str!("../../golden/blkseq.out")),
        input: None,
        powers_off: false,
        needs_apic: true,
        needs_virtio: true,
    },
    Expected {
        name: "blkrand",
        exit_value: Some(BLKRAND_EXIT),
        golden: Some(include_str!("../../golden/blkrand.out")),
        input: None,
        powers_off: false,
        needs_apic: true,
        needs_virtio: true,
    },
    Expected {
        name: "blkwrite",
        exit_value: Some(BLKWRITE_EXIT),
        golden: Some(include_str!("../../golden/blkwrite.out")),
        input: None,
        powers_off: false,
        needs_apic: true,
        needs_virtio: true,
    },
    Expected {
        name: "smp",
        exit_value: Some(SMP_EXIT),
        golden: Some(include_str!("../../golden/smp.out")),
        input: None,
        powers_off: false,
        needs_apic: true,
        needs_virtio: false,
    },
    Expected {
        name: "smpwork",
        exit_value: Some(SMPWORK_EXIT),
        golden: Some(include_str!("../../golden/smpwork.out")),
        input: None,
        powers_off: false,
        needs_apic: true,
        needs_virtio: false,
    },
    Expected {
        name: "netping",
        exit_value: Some(NETPING_EXIT),
        golden: Some(include_str!("../../golden/netping.out")),
        input: None,
        powers_off: false,
        needs_apic: true,
        needs_virtio: true,
    },
];

/// The image of the guest called `name`.
pub fn image(name: &str) -> Option<&'static [u8]> {
    ALL.iter()
        .chain(OTHERS)
        .find(|(n, _)| *n == name)
        .map(|(_, image)| *image)
}

/// The guests outside [`ALL`]: their output depends on the host or on
/// input from outside, or they test one thing and have no golden.
pub const OTHERS: &[(&str, &[u8])] = &[
    ("cpuid", CPUID),
    ("pwrbtn", PWRBTN),
    ("tscdl", TSCDL),
    ("eoicost", EOICOST),
    ("altinstr", ALTINSTR),
];

/// The built ELF file of the guest called `name` (in Cargo's `OUT_DIR`).
pub fn path(name: &str) -> Option<PathBuf> {
    image(name)?;
    Some(PathBuf::from(env!("OUT_DIR")).join(format!("{name}.elf")))
}

/// What the guest called `name` is expected to do.
pub fn expected(name: &str) -> Option<&'static Expected> {
    EXPECTED.iter().find(|e| e.name == name)
}

/// The Multiboot command line the golden runs gave the guest called `name`:
/// its file name, a space, [`GOLDEN_APPEND`].
pub fn multiboot_cmdline(name: &str) -> String {
    format!("{name} {GOLDEN_APPEND}")
}

/// QEMU's exit status when a guest writes `value` to isa-debug-exit.
pub const fn qemu_exit_code(value: u32) -> u32 {
    (value << 1) | 1
}

/// Multiboot v1 header magic.
pub const MULTIBOOT_MAGIC: u32 = 0x1BAD_B002;
/// Multiboot v1 requires its header within the image's first 8 KiB.
pub const MULTIBOOT_SEARCH_LEN: usize = 8192;

fn u16_at(bytes: &[u8], offset: usize) -> Option<u16> {
    let b = bytes.get(offset..offset.checked_add(2)?)?;
    Some(u16::from_le_bytes([b[0], b[1]]))
}

fn u32_at(bytes: &[u8], offset: usize) -> Option<u32> {
    let b = bytes.get(offset..offset.checked_add(4)?)?;
    Some(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
}

/// Offset of a valid Multiboot v1 header (magic, flags, checksum summing to
/// zero, 4-byte aligned) in the first 8 KiB of `image`.
pub fn multiboot_header_offset(image: &[u8]) -> Option<usize> {
    let end = image.len().min(MULTIBOOT_SEARCH_LEN);
    (0..end).step_by(4).find(|&off| {
        let (Some(magic), Some(flags), Some(sum)) =
            (u32_at(image, off), u32_at(image, off + 4), u32_at(image, off + 8))
        else {
            return false;
        };
        magic == MULTIBOOT_MAGIC && magic.wrapping_add(flags).wrapping_add(sum) == 0
    })
}

/// Whether `image` is a little-endian ELF32 file for i386.
pub fn is_elf32_i386(image: &[u8]) -> bool {
    image.get(..6) == Some(&[0x7f, b'E', b'L', b'F', 1, 1][..]) && u16_at(image, 18) == Some(3)
}

const SHT_SYMTAB: u32 = 2;
const SHDR_LEN: usize = 40;
const SYM_LEN: usize = 16;

/// The value (address) of the symbol `name` in the ELF32 `image`'s symbol
/// table. `None` if the image is not ELF32, has no symbol table or no such
/// symbol; never panics on malformed input.
pub fn symbol(image: &[u8], name: &str) -> Option<u32> {
    if !is_elf32_i386(image) {
        return None;
    }
    let shoff = usize::try_from(u32_at(image, 0x20)?).ok()?;
    let shentsize = usize::from(u16_at(image, 0x2E)?);
    let shnum = usize::from(u16_at(image, 0x30)?);
    if shentsize < SHDR_LEN {
        return None;
    }
    let section = |index: usize| -> Option<usize> { shoff.checked_add(index.checked_mul(shentsize)?) };
    for index in 0..shnum {
        let sh = section(index)?;
        if u32_at(image, sh + 4)? != SHT_SYMTAB {
            continue;
        }
        let offset = usize::try_from(u32_at(image, sh + 16)?).ok()?;
        let size = usize::try_from(u32_at(image, sh + 20)?).ok()?;
        let link = usize::try_from(u32_at(image, sh + 24)?).ok()?;
        let strtab = section(link)?;
        let str_offset = usize::try_from(u32_at(image, strtab + 16)?).ok()?;
        let str_size = usize::try_from(u32_at(image, strtab + 20)?).ok()?;
        let strings = image.get(str_offset..str_offset.checked_add(str_size)?)?;
        let symbols = image.get(offset..offset.checked_add(size)?)?;
        for entry in symbols.chunks_exact(SYM_LEN) {
            let name_offset = usize::try_from(u32_at(entry, 0)?).ok()?;
            let Some(rest) = strings.get(name_offset..) else {
                continue;
            };
            let end = rest.iter().position(|&b| b == 0).unwrap_or(rest.len());
            if &rest[..end] == name.as_bytes() {
                return u32_at(entry, 4);
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// (p_vaddr, p_paddr, p_memsz) of each PT_LOAD segment.
    fn load_segments(image: &[u8]) -> Vec<(u32, u32, u32)> {
        let phoff = u32_at(image, 0x1C).expect("e_phoff") as usize;
        let phentsize = u16_at(image, 0x2A).expect("e_phentsize") as usize;
        let phnum = u16_at(image, 0x2C).expect("e_phnum") as usize;
        (0..phnum)
            .map(|i| phoff + i * phentsize)
            .filter(|&ph| u32_at(image, ph) == Some(1))
            .map(|ph| {
                (
                    u32_at(image, ph + 8).expect("p_vaddr"),
                    u32_at(image, ph + 12).expect("p_paddr"),
                    u32_at(image, ph + 20).expect("p_memsz"),
                )
            })
            .collect()
    }

    #[test]
    fn every_image_is_multiboot_elf32_loaded_in_ram() {
        assert_eq!(ALL.len(), EXPECTED.len());
        for ((name, image), expected) in ALL.iter().zip(EXPECTED) {
            assert_eq!(*name, expected.name);
            assert!(is_elf32_i386(image), "{name} is not ELF32 i386");
            let offset = multiboot_header_offset(image);
            assert!(offset.is_some(), "{name} has no Multiboot header");
            let entry = u32_at(image, 0x18).expect("e_entry");
            assert_eq!(symbol(image, "_start"), Some(entry), "{name}: _start");
            let segments = load_segments(image);
            assert!(!segments.is_empty(), "{name} has no PT_LOAD");
            for (vaddr, paddr, memsz) in segments {
                assert!(paddr >= 0x10_0000, "{name} loads below 1 MiB");
                assert!(
                    u64::from(paddr) + u64::from(memsz) <= MEM_MIB << 20,
                    "{name} does not fit in RAM"
                );
                assert!(
                    vaddr == paddr || vaddr == paddr.wrapping_add(VIRT_OFFSET),
                    "{name}: unexpected virtual address {vaddr:#x}"
                );
            }
        }
    }

    #[test]
    fn path_names_the_built_image() {
        for (name, image) in ALL {
            let file = path(name).expect("known guest");
            let bytes = std::fs::read(&file).expect("built guest file");
            assert_eq!(&bytes[..], *image, "{}", file.display());
        }
        assert_eq!(path("no-such-guest"), None);
        assert_eq!(image("no-such-guest"), None);
    }

    #[test]
    fn debugger_symbols_are_where_the_guests_use_them() {
        let entry = symbol(LONGMODE, "higher_half_entry").expect("higher_half_entry");
        assert!(entry >= VIRT_OFFSET, "{entry:#x} is not in the higher half");
        let counter = symbol(LONGMODE, "counter").expect("counter");
        assert!(counter >= VIRT_OFFSET, "{counter:#x}");
        let start = symbol(LONGMODE, "_start").expect("_start");
        assert!(start < VIRT_OFFSET);
        assert!(symbol(COUNTER, "counter").is_some());
        assert!(symbol(COUNTER, "count_loop").is_some());
        assert!(symbol(TRIPLE, "triple_fault_here").is_some());
        assert_eq!(symbol(HELLO, "no_such_symbol"), None);
    }

    #[test]
    fn images_carry_debug_information() {
        for (name, image) in ALL {
            let has = image.windows(12).any(|w| w == b".debug_line\0");
            assert!(has, "{name} has no .debug_line");
        }
    }

    #[test]
    fn goldens_end_as_their_guests_do() {
        for e in EXPECTED {
            let Some(golden) = e.golden else { continue };
            assert!(!golden.is_empty(), "{}: empty golden", e.name);
            assert!(golden.ends_with('\n'), "{}: golden output cut short", e.name);
            assert!(!golden.contains("unexpected"), "{}: {golden}", e.name);
        }
        let longmode = expected("longmode").and_then(|e| e.golden).expect("longmode");
        let entry = symbol(LONGMODE, "higher_half_entry").expect("higher_half_entry");
        assert!(longmode.contains(&format!("running at 0x{entry:016x}\n")), "{longmode}");
        let hello = expected("hello").and_then(|e| e.golden).expect("hello golden");
        assert!(hello.starts_with("Hello from a Nyx guest!\n"));
        assert!(hello.contains(&format!("cmdline \"{}\"", multiboot_cmdline("hello"))));
        let echo = expected("echo").expect("echo");
        let input = std::str::from_utf8(echo.input.expect("echo input")).expect("utf-8");
        let upto_dot = &input[..=input.find('.').expect("a '.' in the input")];
        let golden = echo.golden.expect("echo golden");
        assert!(golden.contains(&upto_dot.to_uppercase()), "{golden}");
        assert!(golden.ends_with("bye\n"));
    }

    #[test]
    fn modern_platform_guests_say_so() {
        let apic: Vec<_> = EXPECTED.iter().filter(|e| e.needs_apic).map(|e| e.name).collect();
        assert_eq!(
            apic,
            [
                "s3",
                "lapic",
                "ioapic",
                "hpet",
                "acpi",
                "pmtimer",
                "apiccounter",
                "virtio",
                "conecho",
                "blknop",
                "blkseq",
                "blkrand",
                "blkwrite",
                "smp",
                "smpwork",
                "netping"
            ]
        );
        for e in EXPECTED {
            assert!(!e.powers_off || e.exit_value.is_none(), "{}", e.name);
        }
        let acpi = expected("acpi").expect("acpi");
        assert!(acpi.powers_off);
        assert!(acpi.golden.expect("acpi golden").ends_with("slp_en\n"));
        assert_eq!(qemu_exit_code(LAPIC_EXIT), 0xa1);
        assert_eq!(qemu_exit_code(IOAPIC_EXIT), 0xa3);
        assert_eq!(qemu_exit_code(HPET_EXIT), 0xa5);
        assert_eq!(qemu_exit_code(PMTIMER_EXIT), 0xa7);
        assert_eq!(qemu_exit_code(TSCDL_EXIT), 0xad);
        assert_eq!(qemu_exit_code(SMP_EXIT), 0xbf);
        assert_eq!(qemu_exit_code(SMPWORK_EXIT), 0xc1);
        assert!(expected("pmtimer")
            .and_then(|e| e.golden)
            .expect("pmtimer golden")
            .ends_with("pm timer rate ok\n"));
        assert_eq!(expected("tscdl"), None, "tscdl has no golden output");
        assert_eq!(image("tscdl"), Some(TSCDL));
    }

    #[test]
    fn smp_golden_varies_in_one_line_only() {
        let golden = expected("smp").and_then(|e| e.golden).expect("smp golden");
        let racy: Vec<_> = golden.lines().filter(|l| l.contains("racy total 0x")).collect();
        assert_eq!(racy.len(), 1, "{golden}");
        assert!(racy[0].starts_with(SMP_RACY_PREFIX), "{golden}");
        let locked = format!("smp: locked total 0x{:08x}\n", (SMP_CPUS - 1) * SMP_ITERS);
        assert!(golden.contains(&locked), "{golden}");
        assert!(golden.ends_with("smp: racy total <= locked total: yes\n"), "{golden}");
        for ap in 1..SMP_CPUS {
            assert!(golden.contains(&format!("smp: ap {ap} online\n")), "{golden}");
            let ipi = format!("smp: ipi from ap {ap} vector 0x{:02x}\n", 0x40 + ap);
            assert!(golden.contains(&ipi), "{golden}");
        }
        let value = if racy[0].ends_with("00000000") {
            "00000001"
        } else {
            "00000000"
        };
        let other = golden.replace(racy[0], &format!("{SMP_RACY_PREFIX}{value}"));
        assert_ne!(other, golden);
        assert_eq!(mask_smp_racy(&other), mask_smp_racy(golden));
        let masked = mask_smp_racy(golden);
        assert!(masked.contains("smp: racy total 0x<masked>\nsmp: racy total <= locked"));
        assert_eq!(masked.lines().count(), golden.lines().count());
        assert_eq!(
            mask_smp_racy("x\nsmp: racy total 0x12"),
            "x\nsmp: racy total 0x<masked>"
        );
        assert_ne!(
            mask_smp_racy(&golden.replace("locked total 0x", "locked total 0x1")),
            masked
        );
    }

    /// The golden's result is the model's sum, and the model's sum does
    /// not depend on how the work is split.
    #[test]
    fn smpwork_golden_is_the_models_sum_whatever_the_split() {
        let golden = expected("smpwork").and_then(|e| e.golden).expect("smpwork golden");
        let total = smpwork_sum(0..SMPWORK_ITERS);
        assert_eq!(
            golden,
            format!("smpwork: cpus {SMPWORK_CPUS}\n{SMPWORK_RESULT_PREFIX}{total:016x}\n")
        );
        // The guest's split, for every N it uses.
        for n in 1..=u64::from(SMPWORK_MAX_CPUS) {
            let split = (0..n)
                .map(|k| smpwork_sum(k * SMPWORK_ITERS / n..(k + 1) * SMPWORK_ITERS / n))
                .fold(0u64, u64::wrapping_add);
            assert_eq!(split, total, "{n} cpus");
        }
        // SplitMix64 seeded with 0 starts 0xe220a8397b1dcdaf.
        assert_eq!(smpwork_sum(0..1), 0xe220_a839_7b1d_cdaf);
    }

    #[test]
    fn virtio_guest_needs_its_devices() {
        let virtio: Vec<_> = EXPECTED.iter().filter(|e| e.needs_virtio).map(|e| e.name).collect();
        assert_eq!(
            virtio,
            ["virtio", "conecho", "blknop", "blkseq", "blkrand", "blkwrite", "netping"]
        );
        for e in EXPECTED {
            assert!(
                !e.needs_virtio || e.needs_apic,
                "{}: MSI-X needs the local APIC",
                e.name
            );
        }
        assert_eq!(qemu_exit_code(VIRTIO_EXIT), 0xb3);
        let golden = expected("virtio").and_then(|e| e.golden).expect("virtio golden");
        assert!(golden.ends_with("virtio: done\n"), "{golden}");
        assert!(!golden.contains("error"), "{golden}");
        for (slot, id, name) in [
            (VIRTIO_BLK_SLOT, 0x1042, "virtio-blk"),
            (VIRTIO_RNG_SLOT, 0x1044, "virtio-rng"),
            (VIRTIO_CONSOLE_SLOT, 0x1043, "virtio-console"),
        ] {
            let line = format!("pci 00:{slot:02x}.0 1af4:{id:04x} {name}\n");
            assert!(golden.contains(&line), "{line}");
        }
        assert!(golden.contains(&format!("capacity {VIRTIO_DISK_SECTORS} sectors\n")));
        assert!(golden.contains(&format!("id \"{VIRTIO_DISK_SERIAL}\"\n")));
        assert_eq!(VIRTIO_CONSOLE_OUTPUT, "hello from virtio-console\n");
        let sha = virtio_disk_sha256_after_run();
        assert_eq!(sha.len(), 64, "{sha}");
        assert!(
            sha.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)),
            "{sha}"
        );
    }

    /// The bytes of the loaded `image` at the address of `name`, `len` of
    /// them (from the PT_LOAD segment holding it).
    fn data_at(image: &[u8], name: &str, len: usize) -> Vec<u8> {
        let addr = symbol(image, name).unwrap_or_else(|| panic!("{name}"));
        let phoff = u32_at(image, 0x1C).expect("e_phoff") as usize;
        let phentsize = u16_at(image, 0x2A).expect("e_phentsize") as usize;
        let phnum = u16_at(image, 0x2C).expect("e_phnum") as usize;
        for ph in (0..phnum).map(|i| phoff + i * phentsize) {
            let offset = u32_at(image, ph + 4).expect("p_offset");
            let paddr = u32_at(image, ph + 12).expect("p_paddr");
            let filesz = u32_at(image, ph + 16).expect("p_filesz");
            if u32_at(image, ph) == Some(1) && (paddr..paddr + filesz).contains(&addr) {
                let at = (offset + addr - paddr) as usize;
                return image[at..at + len].to_vec();
            }
        }
        panic!("{name} is not in a loaded segment");
    }

    #[test]
    fn netping_goldens_alone_and_in_a_pair() {
        let e = expected("netping").expect("netping");
        assert_eq!(e.exit_value, Some(NETPING_EXIT));
        assert!(e.needs_apic && e.needs_virtio);
        assert_eq!(qemu_exit_code(NETPING_EXIT), 195);
        let setup = "pci 00:03.0 1af4:1041 netping\n\
             netping: msi-x enabled, entry 0 vector 0x44\n\
             netping: features offered 0x0000000100000020, accepted 0x0000000100000020, status 0x0b\n\
             netping: queue 0 enabled, size 8, msix vector 0\n\
             netping: queue 1 enabled, size 8, msix vector 0\n\
             netping: driver_ok, status 0x0f\n";
        let mac = |m: [u8; 6]| m.map(|b| format!("{b:02x}")).join(":");
        assert_eq!(
            e.golden.expect("netping golden"),
            format!("{setup}netping: mac {}\nnetping: no peer\n", mac(NETPING_MAC))
        );
        for (out, own, peer) in [
            (NETPING_A_OUTPUT, NETPING_MAC, NETPING_PEER_MAC),
            (NETPING_B_OUTPUT, NETPING_PEER_MAC, NETPING_MAC),
        ] {
            let want = format!(
                "{setup}netping: mac {}\n\
                 netping: arp from {} who-has 10.0.2.2\n\
                 netping: udp from {}: \"nyx netping {:02x}\"\n\
                 netping: done\n",
                mac(own),
                mac(peer),
                mac(peer),
                peer[5]
            );
            assert_eq!(out, want);
        }
    }

    /// The frames of the model are what QEMU's filter-dump captured of the
    /// guest, and the guest's templates are the model without what it fills
    /// in (MAC, the payload's hex digits, the checksum).
    #[test]
    fn netping_frames_match_the_guest() {
        let arp = netping_arp_request(NETPING_MAC);
        let udp = netping_udp_datagram(NETPING_MAC);
        let hex = |f: &[u8]| f.iter().map(|b| format!("{b:02x}")).collect::<String>();
        assert_eq!(
            hex(&arp),
            "ffffffffffff525400123456080600010800060400015254001234560a00020f0000000000000a000202"
        );
        assert_eq!(
            hex(&udp),
            "ffffffffffff52540012345608004500002a00000000401162b30a00020f0a00020215b315b3\
             001600006e7978206e657470696e67203536"
        );
        let blank = |mut f: Vec<u8>, at: &[std::ops::Range<usize>]| {
            for r in at {
                f[r.clone()].fill(0);
            }
            f
        };
        assert_eq!(
            data_at(NETPING, "arp_buf", 12 + 42),
            [vec![0; 12], blank(arp, &[6..12, 22..28])].concat()
        );
        assert_eq!(
            data_at(NETPING, "udp_buf", 12 + 56),
            [vec![0; 12], blank(udp, &[6..12, 24..26, 54..56])].concat()
        );
    }

    #[test]
    fn virtio_disk_image_is_256_sectors_of_text_lines() {
        let image = virtio_disk_image();
        assert_eq!(image.len(), VIRTIO_DISK_SECTORS * 512);
        assert_eq!(image.len(), 128 << 10);
        assert_eq!(&image[..32], b"sector 0000 line 00 byte 000000\n");
        assert_eq!(&image[512 + 3 * 32..512 + 4 * 32], b"sector 0001 line 03 byte 000608\n");
        assert_eq!(&image[image.len() - 32..], b"sector 0255 line 15 byte 131040\n");
        assert!(image.chunks(32).all(|line| line.len() == 32 && line[31] == b'\n'));
    }

    /// Runs `tests/golden/NAME.sh` (what `regen.sh` gives QEMU) and checks
    /// that it writes `want`; skipped without `sh`.
    fn assert_script_writes(name: &str, want: &[u8]) {
        let script = format!("{}/../golden/{name}.sh", env!("CARGO_MANIFEST_DIR"));
        let out = std::env::temp_dir().join(format!("nyx-guests-{name}-{}.img", std::process::id()));
        let status = match std::process::Command::new("sh").arg(&script).arg(&out).status() {
            Ok(status) => status,
            Err(e) => {
                eprintln!("skipped: cannot run sh: {e}");
                return;
            }
        };
        let written = std::fs::read(&out);
        let _ = std::fs::remove_file(&out);
        assert!(status.success(), "{script}: {status}");
        let written = written.expect("the script's image");
        assert!(written == want, "{script} and the image built in Rust differ");
    }

    /// `virtio_disk_image` and `tests/golden/virtio-disk.sh` write the
    /// same bytes.
    #[test]
    fn virtio_disk_image_matches_the_script() {
        assert_script_writes("virtio-disk", &virtio_disk_image());
    }

    const BLK_BENCH: [(&str, u32); 4] = [
        ("blknop", BLKNOP_EXIT),
        ("blkseq", BLKSEQ_EXIT),
        ("blkrand", BLKRAND_EXIT),
        ("blkwrite", BLKWRITE_EXIT),
    ];

    /// The benchmark guests' goldens: the same set-up lines (virtio-blk
    /// alone at its slot, the image's capacity), then the guest's line.
    #[test]
    fn blk_bench_goldens_set_up_alike_and_count_their_requests() {
        let setup = format!(
            "pci 00:{VIRTIO_BLK_SLOT:02x}.0 1af4:1042 virtio-blk\n\
             virtio-blk: msi-x enabled, entry 0 vector 0x41\n\
             virtio-blk: features offered 0x0000000100006240, accepted 0x0000000100006200, status 0x0b\n\
             virtio-blk: queue 0 enabled, size 8, msix vector 0\n\
             virtio-blk: driver_ok, status 0x0f\n\
             virtio-blk: capacity {BLKBENCH_DISK_SECTORS} sectors\n"
        );
        let counts = [
            ("blknop", "0 requests, 0 bytes, 0 interrupts"),
            ("blkseq", "512 requests, 33554432 bytes, 512 interrupts"),
            ("blkrand", "4096 requests, 16777216 bytes, 4096 interrupts"),
            ("blkwrite", "1025 requests, 4194304 bytes, 1025 interrupts"),
        ];
        for ((name, exit), (counted, line)) in BLK_BENCH.iter().zip(counts) {
            assert_eq!(*name, counted);
            let e = expected(name).expect("known guest");
            assert_eq!(e.exit_value, Some(*exit), "{name}");
            assert!(e.needs_apic && e.needs_virtio, "{name}");
            let golden = e.golden.expect("golden");
            let last = golden
                .strip_prefix(setup.as_str())
                .unwrap_or_else(|| panic!("{name}: {golden}"));
            assert!(last.starts_with(&format!("{name}: {line}, fnv1a64 0x")), "{last}");
            assert_eq!(last.len(), format!("{name}: {line}, fnv1a64 0x").len() + 17, "{last}");
            assert!(last.ends_with('\n'));
        }
        assert_eq!(qemu_exit_code(BLKNOP_EXIT), 181);
        assert_eq!(qemu_exit_code(BLKWRITE_EXIT), 187);
        let sha = blkwrite_disk_sha256_after_run();
        assert_eq!(sha.len(), 64, "{sha}");
    }

    /// A model of the benchmark guests on [`blkbench_disk_image`] gives the
    /// hashes of their goldens: each request's data came from the right
    /// place (`tests/guests/blkbench.h`).
    #[test]
    fn blk_bench_golden_hashes_follow_from_the_image() {
        const LCG_MUL: u64 = 6364136223846793005;
        const LCG_ADD: u64 = 1442695040888963407;
        const LCG_SEED: u64 = 0x6e79782d626c6b00;
        let image = blkbench_disk_image();
        let word = |data: &[u8], at: usize| u64::from_le_bytes(data[at..at + 8].try_into().expect("8 bytes"));
        let fnv = |words: &[u64]| {
            words
                .iter()
                .fold(0xcbf29ce484222325u64, |h, w| (h ^ w).wrapping_mul(0x100000001b3))
        };
        let sectors = |n: usize| {
            let blocks = (BLKBENCH_DISK_SECTORS / 8) as u64;
            let mut x = LCG_SEED;
            (0..n)
                .map(move |_| {
                    x = x.wrapping_mul(LCG_MUL).wrapping_add(LCG_ADD);
                    ((x >> 32) % blocks * 8) as usize
                })
                .collect::<Vec<_>>()
        };
        let mut seq = Vec::new();
        for chunk in image.chunks(65536) {
            seq.extend([word(chunk, 8), word(chunk, chunk.len() - 8)]);
        }
        let mut rand = Vec::new();
        for s in sectors(4096) {
            let data = &image[s * 512..s * 512 + 4096];
            rand.extend([word(data, 8), word(data, 4088)]);
        }
        let mut write = Vec::new();
        let line = b"blkwrite: data of a 4 KiB write\n";
        for (i, s) in sectors(1024).into_iter().enumerate() {
            // The words at offset 8 (the write's index) and 4088 (text).
            write.extend([i as u64, word(line, 24)]);
            assert!(s + 8 <= BLKBENCH_DISK_SECTORS);
        }
        for (name, words) in [
            ("blknop", &[][..]),
            ("blkseq", &seq[..]),
            ("blkrand", &rand[..]),
            ("blkwrite", &write[..]),
        ] {
            let golden = expected(name).and_then(|e| e.golden).expect("golden");
            let want = format!("fnv1a64 0x{:016x}\n", fnv(words));
            assert!(golden.ends_with(&want), "{name}: {golden} (model: {want})");
        }
    }

    #[test]
    fn blkbench_disk_image_is_32_mib_of_text_lines() {
        let image = blkbench_disk_image();
        assert_eq!(image.len(), BLKBENCH_DISK_SECTORS * 512);
        assert_eq!(image.len(), 32 << 20);
        assert_eq!(&image[..32], b"sector 000000 line 00 @00000000\n");
        assert_eq!(&image[512 + 3 * 32..512 + 4 * 32], b"sector 000001 line 03 @00000608\n");
        assert_eq!(&image[image.len() - 32..], b"sector 065535 line 15 @33554400\n");
        assert!(image.chunks(32).all(|line| line.len() == 32 && line[31] == b'\n'));
    }

    /// `blkbench_disk_image` and `tests/golden/blkbench-disk.sh` write the
    /// same bytes.
    #[test]
    fn blkbench_disk_image_matches_the_script() {
        assert_script_writes("blkbench-disk", &blkbench_disk_image());
    }

    #[test]
    fn qemu_exit_codes() {
        assert_eq!(qemu_exit_code(HELLO_EXIT), 0x43);
        assert_eq!(qemu_exit_code(0), 1);
    }

    #[test]
    fn multiboot_search_rejects_a_bad_checksum() {
        let mut image = HELLO.to_vec();
        let offset = multiboot_header_offset(&image).expect("header");
        image[offset + 8] ^= 1;
        assert_eq!(multiboot_header_offset(&image), None);
        assert_eq!(multiboot_header_offset(&[]), None);
    }

    proptest! {
        #[test]
        fn parsers_never_panic_on_garbage(bytes in proptest::collection::vec(any::<u8>(), 0..4096)) {
            let _ = symbol(&bytes, "counter");
            let _ = multiboot_header_offset(&bytes);
            let _ = is_elf32_i386(&bytes);
        }

        #[test]
        fn symbol_lookup_survives_corrupted_images(
            flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..16),
        ) {
            let mut image = LONGMODE.to_vec();
            for (at, value) in flips {
                let len = image.len();
                image[at % len] = value;
            }
            let _ = symbol(&image, "higher_half_entry");
            let _ = multiboot_header_offset(&image);
        }
    }
}
