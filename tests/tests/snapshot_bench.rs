//! Snapshot save and restore throughput for the BENCHMARKS table (ignored
//! by default: `cargo test --release -p nyx-tests --test snapshot_bench --
//! --ignored --nocapture`). Memory is dirtied from the host through the
//! machine's mapping before saving.

use std::time::Instant;

use nyx_vmm::vm_memory::{Bytes, GuestAddress};
use nyx_vmm::MachineBuilder;

fn one(mib: u64, dirty: bool) {
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
    m.save_snapshot(&snap).unwrap();
    let save = t.elapsed().as_secs_f64();
    let size = std::fs::metadata(&snap).unwrap().len();
    drop(m);
    let t = Instant::now();
    let r = MachineBuilder::from_snapshot(&snap).unwrap().build().unwrap();
    let restore = t.elapsed().as_secs_f64();
    drop(r);
    let m = mib as f64;
    println!(
        "{mib} MiB {}: save {:.3} s ({:.0} MiB/s), file {:.1} MiB, restore {:.3} s ({:.0} MiB/s)",
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
        one(mib, false);
        one(mib, true);
    }
}
