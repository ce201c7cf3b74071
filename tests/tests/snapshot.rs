//! Snapshots: a machine stopped mid-run, saved, and restored into a new
//! machine continues exactly as the uninterrupted run did; a large machine
//! whose guest wrote scattered pages comes back bit for bit, from a
//! compressed snapshot and from a mapped one.

use std::time::Duration;

use nyx_tests::{kvm_available, Capture};
use nyx_vmm::machine::Stop;
use nyx_vmm::{MachineBuilder, RunOutcome};

/// Runs `guest`, stops it after `after`, snapshots it, lets it finish; then
/// restores the snapshot and runs that to the end. Returns (output before
/// the snapshot, rest of the original run, run of the restored machine,
/// original outcome, restored outcome).
fn snapshot_midway(guest: &str, after: Duration) -> (String, String, String, RunOutcome, RunOutcome) {
    let dir = tempfile::tempdir().unwrap();
    let snap = dir.path().join("mid.nyxsnap");
    let out = Capture::default();
    let image = nyx_guests::image(guest).unwrap().to_vec();
    let mut m = MachineBuilder::new()
        .memory(64)
        .kernel_image(guest, image)
        .serial_out(Box::new(out.clone()))
        .build()
        .unwrap();
    let kicker = m.kicker().unwrap();
    let t = std::thread::spawn(move || {
        std::thread::sleep(after);
        kicker.kick();
    });
    let first = m.resume().unwrap();
    t.join().unwrap();
    assert_eq!(first, Stop::Interrupted, "{guest} ended before the snapshot point");
    m.save_snapshot(&snap).unwrap();
    let before = String::from_utf8_lossy(&out.bytes()).into_owned();
    let outcome_a = m.run().unwrap();
    let all = String::from_utf8_lossy(&out.bytes()).into_owned();
    let rest_a = all[before.len()..].to_string();

    let out_b = Capture::default();
    let mut r = MachineBuilder::from_snapshot(&snap)
        .unwrap()
        .serial_out(Box::new(out_b.clone()))
        .build()
        .unwrap();
    let outcome_b = r.run().unwrap();
    (
        before,
        rest_a,
        String::from_utf8_lossy(&out_b.bytes()).into_owned(),
        outcome_a,
        outcome_b,
    )
}

#[test]
fn restored_machine_continues_like_the_original() {
    if !kvm_available() {
        return;
    }
    let (before, rest_a, rest_b, a, b) = snapshot_midway("pit", Duration::from_millis(25));
    assert!(!rest_a.is_empty(), "snapshot taken too late: {before}");
    assert_eq!(rest_b, rest_a, "restored continuation differs (before: {before:?})");
    assert_eq!(a, RunOutcome::DebugExit(nyx_guests::PIT_EXIT));
    assert_eq!(b, a);
}

#[test]
fn snapshot_taken_in_a_timer_interrupt_storm_restores() {
    if !kvm_available() {
        return;
    }
    // The counter guest takes 1 kHz ticks in a busy loop; its output depends
    // on timing, so only the shape and the end are compared.
    let (_, rest_a, rest_b, a, b) = snapshot_midway("counter", Duration::from_millis(30));
    assert_eq!(a, RunOutcome::DebugExit(nyx_guests::COUNTER_EXIT));
    assert_eq!(b, a);
    let hex = |s: &str| {
        s.lines()
            .filter(|l| l.len() == 16 && l.chars().all(|c| c.is_ascii_hexdigit()))
            .count()
    };
    assert_eq!(hex(&rest_a), hex(&rest_b), "{rest_a}\n---\n{rest_b}");
}

#[test]
fn corrupt_truncated_and_foreign_snapshots_are_refused() {
    if !kvm_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let snap = dir.path().join("s.nyxsnap");
    let mut m = MachineBuilder::new()
        .kernel_image("hello", nyx_guests::HELLO.to_vec())
        .serial_out(Box::new(std::io::sink()))
        .build()
        .unwrap();
    m.save_snapshot(&snap).unwrap();
    let bytes = std::fs::read(&snap).unwrap();
    let cut = dir.path().join("cut.nyxsnap");
    std::fs::write(&cut, &bytes[..bytes.len() * 2 / 3]).unwrap();
    let e = MachineBuilder::from_snapshot(&cut)
        .err()
        .expect("truncated snapshot accepted")
        .to_string();
    assert!(e.contains("incomplete") || e.contains("truncated"), "{e}");
    let mut flipped = bytes.clone();
    let at = flipped.len() / 2;
    flipped[at] ^= 1;
    let f = dir.path().join("flip.nyxsnap");
    std::fs::write(&f, &flipped).unwrap();
    assert!(MachineBuilder::from_snapshot(&f).is_err(), "flipped snapshot accepted");
    let g = dir.path().join("garbage.nyxsnap");
    std::fs::write(&g, b"not a snapshot at all").unwrap();
    assert!(MachineBuilder::from_snapshot(&g)
        .err()
        .unwrap()
        .to_string()
        .contains("not a Nyx"));
    // A restored fresh snapshot runs the guest from its start.
    let out = Capture::default();
    let mut r = MachineBuilder::from_snapshot(&snap)
        .unwrap()
        .serial_out(Box::new(out.clone()))
        .build()
        .unwrap();
    assert_eq!(r.run().unwrap(), RunOutcome::DebugExit(nyx_guests::HELLO_EXIT));
    assert!(String::from_utf8_lossy(&out.bytes()).contains("Hello from a Nyx guest!"));
}

/// Guest code (the same bytes in 32- and 64-bit mode): writes each
/// address `base + k * stride` (k < n) as a 32-bit word at that address,
/// then 0 to the debug-exit port.
fn scatter(base: u32, stride: u32, n: u32) -> Vec<u8> {
    let mut c = vec![0xfa, 0xbf]; // cli; mov edi, base
    c.extend(base.to_le_bytes());
    c.push(0xb9); // mov ecx, n
    c.extend(n.to_le_bytes());
    c.extend([0x89, 0x3f, 0x81, 0xc7]); // 1: mov [edi], edi; add edi, stride
    c.extend(stride.to_le_bytes());
    c.extend([0xff, 0xc9, 0x75, 0xf4]); // dec ecx; jnz 1b
    c.extend([0xb0, 0x00, 0xe6, 0xf4]); // mov al, 0; out 0xf4, al
    c
}

/// Where [`scatter`] writes (1740 words 4-byte aligned at every offset of
/// a page, from 16 MiB to the last few MiB of a 1 GiB machine) and where
/// its code goes.
const SCATTER: (u32, u32, u32, u64) = (0x100_0000, 0x9_1004, 1740, 0x80_0000);

/// A 1 GiB machine that ran hello to its end and then [`scatter`]: the
/// pattern is written by the guest, through KVM, not through Nyx's mapping.
fn scattered_1gib() -> nyx_vmm::Machine {
    use nyx_vmm::vm_memory::{Bytes, GuestAddress};
    let (base, stride, n, stub) = SCATTER;
    let mut m = MachineBuilder::new()
        .memory(1024)
        .kernel_image("hello", nyx_guests::HELLO.to_vec())
        .serial_out(Box::new(std::io::sink()))
        .build()
        .unwrap();
    // hello's end: 32-bit protected mode, flat segments.
    assert_eq!(m.run().unwrap(), RunOutcome::DebugExit(nyx_guests::HELLO_EXIT));
    m.memory()
        .write_slice(&scatter(base, stride, n), GuestAddress(stub))
        .unwrap();
    let mut regs = m.vcpu().get_regs().unwrap();
    regs.rip = stub;
    regs.rflags = 2;
    m.vcpu_mut().set_regs(&regs).unwrap();
    assert_eq!(m.run().unwrap(), RunOutcome::DebugExit(0));
    m
}

/// Checks that `r` holds every word of [`scatter`]'s pattern.
fn assert_scattered(r: &nyx_vmm::Machine) {
    use nyx_vmm::vm_memory::{Bytes, GuestAddress};
    let (base, stride, n, _) = SCATTER;
    let last = u64::from(base) + u64::from(n - 1) * u64::from(stride);
    assert!(last > 1000 << 20, "the pattern reaches the top of RAM");
    for k in 0..u64::from(n) {
        let at = u64::from(base) + k * u64::from(stride);
        let word: u32 = r.memory().read_obj(GuestAddress(at)).unwrap();
        assert_eq!(u64::from(word), at, "the guest's word at {at:#x}");
    }
}

/// The first guest address where `a` and `b` differ, comparing all of RAM
/// a MiB at a time (a `memcmp`, quick in any build profile, where a
/// digest of 1 GiB takes seconds in a debug build); None when equal.
fn first_difference(a: &nyx_vmm::memory::GuestMemory, b: &nyx_vmm::memory::GuestMemory) -> Option<u64> {
    use nyx_vmm::vm_memory::{GuestMemoryBackend as _, GuestMemoryRegion as _};
    assert_eq!(a.num_regions(), b.num_regions());
    for (ra, rb) in a.iter().zip(b.iter()) {
        assert_eq!((ra.start_addr(), ra.len()), (rb.start_addr(), rb.len()));
        // SAFETY: each region is a live mapping of `len` bytes that its
        // memory owns and keeps while the slices are used; no vCPU of
        // either runs meanwhile (the test drives both machines), so
        // nothing writes them while they are compared.
        let (x, y) = unsafe {
            (
                std::slice::from_raw_parts(ra.as_ptr(), ra.len() as usize),
                std::slice::from_raw_parts(rb.as_ptr(), rb.len() as usize),
            )
        };
        for (i, (cx, cy)) in x.chunks(1 << 20).zip(y.chunks(1 << 20)).enumerate() {
            if cx != cy {
                let at = cx.iter().zip(cy).position(|(p, q)| p != q).unwrap_or(0);
                return Some(ra.start_addr().0 + (i << 20) as u64 + at as u64);
            }
        }
    }
    None
}

#[test]
fn a_1gib_machine_whose_guest_wrote_scattered_pages_restores_bit_for_bit() {
    use nyx_vmm::snapshot::MemoryFormat;
    if !kvm_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut m = scattered_1gib();
    let mut sizes = Vec::new();
    for format in [MemoryFormat::Compressed, MemoryFormat::Mappable] {
        let snap = dir.path().join(format!("{format:?}.nyxsnap"));
        m.save_snapshot_as(&snap, format).unwrap();
        sizes.push(std::fs::metadata(&snap).unwrap().len());
        let r = MachineBuilder::from_snapshot(&snap)
            .unwrap()
            .serial_out(Box::new(std::io::sink()))
            .build()
            .unwrap();
        assert_scattered(&r);
        assert_eq!(
            first_difference(r.memory(), m.memory()),
            None,
            "all 1 GiB equal ({format:?})"
        );
        // Read whole rather than mapped, the same memory.
        let whole = nyx_vmm::snapshot::read(&snap).unwrap();
        assert!(whole.image.is_none());
        let fresh = nyx_vmm::memory::create(1024).unwrap();
        nyx_vmm::mem_state::restore_runs(&fresh, &whole.memory).unwrap();
        assert_eq!(first_difference(&fresh, m.memory()), None, "{format:?} read whole");
    }
    // Compressed, each written page is a few bytes and the untouched rest
    // nothing; mappable, every page that is not zero is stored whole.
    assert!(sizes[0] < 1 << 20, "a {}-byte snapshot", sizes[0]);
    assert!(sizes[1] > u64::from(SCATTER.2) * 4096, "a {}-byte snapshot", sizes[1]);
}

#[test]
fn a_mapped_snapshot_is_checked_copied_on_write_and_reset() {
    use nyx_vmm::reset::ResetPoint;
    use nyx_vmm::snapshot::MemoryFormat;
    use nyx_vmm::vm_memory::{Bytes, GuestAddress};
    if !kvm_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let snap = dir.path().join("m.nyxsnap");
    // The saved machine stays, stopped, to compare with.
    let mut m = scattered_1gib();
    m.save_snapshot_as(&snap, MemoryFormat::Mappable).unwrap();
    let clean = std::fs::read(&snap).unwrap();

    // Damaged inside the image (a guest page's byte) or cut short: refused
    // with an error, before any machine is built.
    let (base, stride, _, stub) = SCATTER;
    let word = (base + 7 * stride).to_le_bytes();
    let at = clean
        .windows(4)
        .position(|w| w == word)
        .expect("the image holds the guest's words as they are");
    let mut flipped = clean.clone();
    flipped[at] ^= 0x10;
    let bad = dir.path().join("bad.nyxsnap");
    std::fs::write(&bad, &flipped).unwrap();
    let e = MachineBuilder::from_snapshot(&bad)
        .err()
        .expect("damaged image accepted")
        .to_string();
    assert!(e.contains("checksum"), "{e}");
    std::fs::write(&bad, &clean[..clean.len() / 2]).unwrap();
    let e = MachineBuilder::from_snapshot(&bad)
        .err()
        .expect("cut snapshot accepted")
        .to_string();
    assert!(e.contains("incomplete"), "{e}");

    // The guest writes over mapped pages (copies of its own), the file stays.
    let mut r = MachineBuilder::from_snapshot(&snap)
        .unwrap()
        .serial_out(Box::new(std::io::sink()))
        .build()
        .unwrap();
    let whole = nyx_vmm::snapshot::read(&snap).unwrap();
    let mut point = ResetPoint::new(&r, whole.state, &whole.memory).unwrap();
    r.memory()
        .write_slice(&scatter(base + 8, stride, 400), GuestAddress(stub))
        .unwrap();
    let input = || Box::new(nyx_devices::io::BufferInput::new(Vec::new()));
    for round in 0..2 {
        let mut regs = r.vcpu().get_regs().unwrap();
        regs.rip = stub;
        regs.rflags = 2;
        r.vcpu_mut().set_regs(&regs).unwrap();
        assert_eq!(r.run().unwrap(), RunOutcome::DebugExit(0));
        let moved: u32 = r.memory().read_obj(GuestAddress(u64::from(base + 8))).unwrap();
        assert_eq!(moved, base + 8, "round {round}: the guest wrote");
        assert_eq!(std::fs::read(&snap).unwrap(), clean, "the file is never written");
        // Fast reset: the dirtied pages come back from the snapshot.
        let stats = point.reset(&mut r, Box::new(std::io::sink()), input()).unwrap();
        assert!(stats.pages >= 400, "{} pages reset", stats.pages);
        assert_scattered(&r);
        // The new stub was written by Nyx, not the guest, so the reset kept
        // it: put the snapshot's back, and all memory is the snapshot's.
        r.memory()
            .write_slice(&scatter(base, stride, SCATTER.2), GuestAddress(stub))
            .unwrap();
        assert_eq!(
            first_difference(r.memory(), m.memory()),
            None,
            "round {round}: memory is the snapshot's again"
        );
        r.memory()
            .write_slice(&scatter(base + 8, stride, 400), GuestAddress(stub))
            .unwrap();
    }
}
