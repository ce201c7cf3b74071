//! Snapshot benchmarks for the BENCHMARKS tables (ignored by default:
//! `cargo test --release -p nyx-tests --test snapshot_bench -- --ignored
//! --nocapture`): save and restore throughput of compressed and mappable
//! snapshots, with memory dirtied from the host through the machine's
//! mapping before saving; the save and restore latency of a mostly-zero
//! 1 GiB machine, as medians of several runs; and
//! the latency of an incremental restore (`ResetPoint::reset`) after the
//! guest itself dirtied a given number of pages.

use std::time::Instant;

use nyx_vmm::reset::ResetPoint;
use nyx_vmm::snapshot::MemoryFormat;
use nyx_vmm::vm_memory::{Bytes, GuestAddress};
use nyx_vmm::{MachineBuilder, RunOutcome};

fn one(mib: u64, dirty: bool, format: MemoryFormat) {
    let dir = tempfile::tempdir().unwrap();
    let snap = dir.path().join("m.nyxsnap");
    let image = nyx_guests::image("echo").unwrap().to_vec();
    let mut m = MachineBuilder::new()
        .memory(mib)
        .kernel_image("echo", image)
        .serial_out(Box::new(std::io::sink()))
        .build()
        .unwrap();
    if dirty {
        // Pseudo-random page contents (compress poorly), 90% of RAM above 1 MiB.
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let mut page = vec![0u8; 4096];
        for gfn in 256..(mib << 8) * 9 / 10 {
            for w in page.chunks_exact_mut(8) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                w.copy_from_slice(&x.to_le_bytes());
            }
            m.memory().write_slice(&page, GuestAddress(gfn << 12)).unwrap();
        }
    }
    let t = Instant::now();
    m.save_snapshot_as(&snap, format).unwrap();
    let save = t.elapsed().as_secs_f64();
    let size = std::fs::metadata(&snap).unwrap().len();
    drop(m);
    let t = Instant::now();
    let r = MachineBuilder::from_snapshot(&snap).unwrap().build().unwrap();
    let restore = t.elapsed().as_secs_f64();
    drop(r);
    let m = mib as f64;
    println!(
        "{mib} MiB {} {format:?}: save {:.3} s ({:.0} MiB/s), file {:.1} MiB, restore {:.3} s ({:.0} MiB/s)",
        if dirty { "mostly dirty" } else { "mostly zero" },
        save,
        m / save,
        size as f64 / (1 << 20) as f64,
        restore,
        m / restore
    );
    assert!(size > 0);
}

#[test]
#[ignore]
fn snapshot_save_and_restore_throughput() {
    if !nyx_tests::kvm_available() {
        return;
    }
    for mib in [64, 1024] {
        for format in [MemoryFormat::Compressed, MemoryFormat::Mappable] {
            one(mib, false, format);
            one(mib, true, format);
        }
    }
}

/// Saves and restores a freshly built 1 GiB machine (the echo guest loaded,
/// everything else never touched) `runs` times: (save s, restore s, file
/// bytes) per run. Restore is reading the file and building the machine.
fn mostly_zero_1gib(runs: usize, format: MemoryFormat) -> Vec<(f64, f64, u64)> {
    let dir = tempfile::tempdir().unwrap();
    let snap = dir.path().join("z.nyxsnap");
    let image = nyx_guests::image("echo").unwrap().to_vec();
    (0..runs)
        .map(|_| {
            let mut m = MachineBuilder::new()
                .memory(1024)
                .kernel_image("echo", image.clone())
                .serial_out(Box::new(std::io::sink()))
                .build()
                .unwrap();
            let t = Instant::now();
            m.save_snapshot_as(&snap, format).unwrap();
            let save = t.elapsed().as_secs_f64();
            drop(m);
            let t = Instant::now();
            let r = MachineBuilder::from_snapshot(&snap).unwrap().build().unwrap();
            let restore = t.elapsed().as_secs_f64();
            drop(r);
            (save, restore, std::fs::metadata(&snap).unwrap().len())
        })
        .collect()
}

#[test]
#[ignore]
fn mostly_zero_1gib_save_and_restore_latency() {
    if !nyx_tests::kvm_available() {
        return;
    }
    for format in [MemoryFormat::Compressed, MemoryFormat::Mappable] {
        latency_of(format);
    }
}

fn latency_of(format: MemoryFormat) {
    let runs = mostly_zero_1gib(7, format);
    let ms = |v: f64| v * 1000.0;
    let mut save: Vec<f64> = runs.iter().map(|r| r.0).collect();
    let mut restore: Vec<f64> = runs.iter().map(|r| r.1).collect();
    for (i, r) in runs.iter().enumerate() {
        println!(
            "run {i}: save {:.2} ms, restore {:.2} ms, file {} bytes",
            ms(r.0),
            ms(r.1),
            r.2
        );
    }
    save.sort_by(f64::total_cmp);
    restore.sort_by(f64::total_cmp);
    println!(
        "1024 MiB mostly zero {format:?}, {} runs: save median {:.2} ms (min {:.2}, max {:.2}), restore median {:.2} ms (min {:.2}, max {:.2})",
        runs.len(),
        ms(save[save.len() / 2]),
        ms(save[0]),
        ms(save[save.len() - 1]),
        ms(restore[restore.len() / 2]),
        ms(restore[0]),
        ms(restore[restore.len() - 1])
    );
}

/// Where [`dirty_stub`] is put, and the first page it writes.
const STUB_GPA: u64 = 0x80_0000;
const FIRST_DIRTY_GPA: u32 = 0x100_0000;

/// Code (the same bytes in 32- and 64-bit mode) that writes one byte into
/// each of `n` consecutive pages from 16 MiB up, then writes 0 to the
/// debug-exit port.
fn dirty_stub(n: u32) -> Vec<u8> {
    let mut c = vec![0xfa]; // cli
    c.push(0xbf); // mov edi, FIRST_DIRTY_GPA
    c.extend(FIRST_DIRTY_GPA.to_le_bytes());
    c.push(0xb9); // mov ecx, n
    c.extend(n.to_le_bytes());
    c.extend([0x88, 0x07]); // 1: mov [edi], al
    c.extend([0x81, 0xc7, 0x00, 0x10, 0x00, 0x00]); // add edi, 4096
    c.extend([0xff, 0xc9]); // dec ecx
    c.extend([0x75, 0xf4]); // jnz 1b
    c.extend([0xb0, 0x00, 0xe6, 0xf4]); // mov al, 0; out 0xf4, al
    c
}

/// The `q` quantile (nearest rank) of sorted `v`.
fn quantile(v: &[u64], q: f64) -> u64 {
    let rank = ((v.len() as f64 * q).ceil() as usize).clamp(1, v.len());
    v[rank - 1]
}

/// Resets of a machine whose guest dirtied `pages` pages since the reset
/// point, `reps` times: (pages rewritten, total ns, memory ns) per reset.
fn incremental(pages: u32, reps: usize) -> Vec<(usize, u64, u64)> {
    let image = nyx_guests::image("hello").unwrap().to_vec();
    let mut m = MachineBuilder::new()
        .memory(64)
        .kernel_image("hello", image)
        .serial_out(Box::new(std::io::sink()))
        .build()
        .unwrap();
    // The reset point: hello's end (32-bit protected mode, flat segments).
    assert_eq!(m.run().unwrap(), RunOutcome::DebugExit(0x21));
    let (state, memory) = m.capture_state().unwrap();
    let mut point = ResetPoint::new(&m, state, &memory).unwrap();
    // Written from the host: not in the dirty log, so resets keep it.
    m.memory()
        .write_slice(&dirty_stub(pages), GuestAddress(STUB_GPA))
        .unwrap();
    let mut out = Vec::new();
    for rep in 0..=reps {
        let s = point
            .reset(
                &mut m,
                Box::new(std::io::sink()),
                Box::new(nyx_devices::io::BufferInput::new(Vec::new())),
            )
            .unwrap();
        if rep > 0 {
            out.push((s.pages, s.ns, s.memory_ns));
        }
        let mut regs = m.vcpu().get_regs().unwrap();
        regs.rip = STUB_GPA;
        regs.rflags = 2;
        m.vcpu_mut().set_regs(&regs).unwrap();
        assert_eq!(m.run().unwrap(), RunOutcome::DebugExit(0));
    }
    out
}

/// The median time to copy `pages` pages from one host buffer into
/// another: what rewriting them costs at least.
fn memcpy_ns(pages: usize) -> u64 {
    let src = vec![0x5au8; pages * 4096];
    let mut dst = vec![1u8; pages * 4096];
    let mut t: Vec<u64> = (0..50)
        .map(|_| {
            let s = Instant::now();
            for (d, p) in dst.chunks_exact_mut(4096).zip(src.chunks_exact(4096)) {
                d.copy_from_slice(std::hint::black_box(p));
            }
            std::hint::black_box(&mut dst);
            s.elapsed().as_nanos() as u64
        })
        .collect();
    t.sort_unstable();
    quantile(&t, 0.5)
}

#[test]
#[ignore]
fn incremental_restore_latency() {
    if !nyx_tests::kvm_available() {
        return;
    }
    for (pages, reps) in [(50u32, 400usize), (5000, 200)] {
        let r = incremental(pages, reps);
        for &(n, _, _) in &r {
            // The stub's pages, and none the guest did not write.
            assert!(n >= pages as usize && n <= pages as usize + 4, "{n} pages reset");
        }
        let mut total: Vec<u64> = r.iter().map(|x| x.1).collect();
        let mut mem: Vec<u64> = r.iter().map(|x| x.2).collect();
        total.sort_unstable();
        mem.sort_unstable();
        let us = |ns: u64| ns as f64 / 1000.0;
        let copy = memcpy_ns(pages as usize);
        println!(
            "{pages} dirty pages, {reps} resets: total p50 {:.1} us p99 {:.1} us; memory p50 {:.1} us p99 {:.1} us \
             ({:.1}x a host memcpy of those pages, {:.1} us); devices+vCPU p50 {:.1} us",
            us(quantile(&total, 0.5)),
            us(quantile(&total, 0.99)),
            us(quantile(&mem, 0.5)),
            us(quantile(&mem, 0.99)),
            quantile(&mem, 0.5) as f64 / copy.max(1) as f64,
            us(copy),
            us(quantile(&total, 0.5).saturating_sub(quantile(&mem, 0.5)))
        );
    }
}
