//! Benchmark: the cost of a VM exit in Nyx's run loop, on the serial hello
//! guest (every byte it prints is an LSR poll and a THR write: port-I/O
//! exits). Runs the guest many times in-process and reports exits per
//! second of run time, and the vCPU thread's user CPU (Nyx's own handling)
//! and system CPU (KVM; on emulated KVM also the guest's execution) per exit.
//!
//! `cargo bench -p nyx-tests --bench exits [-- RUNS]`

use std::time::Instant;

use nyx_tests::{kvm_available, run_guest_stats};

fn rusage_thread() -> (f64, f64) {
    // SAFETY: getrusage fills the zeroed struct.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: valid pointer.
    unsafe { libc::getrusage(libc::RUSAGE_THREAD, &mut ru) };
    let s = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    (s(ru.ru_utime), s(ru.ru_stime))
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn main() {
    if !kvm_available() {
        return;
    }
    let runs: usize = std::env::args().filter_map(|a| a.parse().ok()).next().unwrap_or(300);
    let guest = "hello";
    // Warm-up.
    let _ = run_guest_stats(guest);
    let mut per_exit_wall = Vec::new();
    let (mut exits, mut run_wall, mut run_user, mut run_sys) = (0u64, 0u64, 0u64, 0u64);
    let (u0, s0) = rusage_thread();
    let t0 = Instant::now();
    for _ in 0..runs {
        let st = run_guest_stats(guest);
        exits += st.exits();
        run_wall += st.wall_ns;
        run_user += st.user_ns;
        run_sys += st.sys_ns;
        per_exit_wall.push(st.wall_ns as f64 / st.exits() as f64);
    }
    let total = t0.elapsed().as_secs_f64();
    let (u1, s1) = rusage_thread();
    let (user, sys) = (u1 - u0, s1 - s0);
    println!("guest: {guest}, runs: {runs}, exits per run: {}", exits / runs as u64);
    println!(
        "exits per second of run time: {:.0}",
        exits as f64 / (run_wall as f64 / 1e9)
    );
    println!(
        "median wall time per exit (run loop, guest included): {:.2} us",
        median(&mut per_exit_wall) / 1e3
    );
    println!(
        "vCPU thread CPU per exit over all runs (incl. machine build): user {:.2} us, sys {:.2} us",
        user / exits as f64 * 1e6,
        sys / exits as f64 * 1e6
    );
    println!(
        "vCPU thread CPU per exit inside Machine::run only: user {:.2} us, sys {:.2} us",
        run_user as f64 / exits as f64 / 1e3,
        run_sys as f64 / exits as f64 / 1e3
    );
    println!("machine build + run, per run: {:.2} ms", total / runs as f64 * 1e3);
}
