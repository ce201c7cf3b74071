//! End-to-end checks of the loaders on a real KVM vCPU: load a tiny kernel,
//! apply [`configure_vcpu`](super::configure_vcpu), run, and watch the port
//! writes that the kernel's first instructions make from the registers and
//! boot information it was handed. Skipped (with a message) where the KVM
//! device cannot be opened, failed then under `NYX_REQUIRE_KVM=1` (the
//! shared probe, [`crate::probe::kvm_available`]).

use kvm_ioctls::VcpuExit;
use vm_memory::{GuestMemoryBackend as _, GuestMemoryRegion as _};

use super::elf::tests::build;
use super::elf::{Class, EM_386, EM_X86_64, PF_X};
use super::{configure_vcpu, load};
use crate::memory;

/// Runs `image` until it halts, returning every `(port, bytes)` it wrote.
fn run(image: &[u8], cmdline: &str) -> Option<Vec<(u16, Vec<u8>)>> {
    let kvm = crate::vcpu_state::tests::test_kvm()?;
    let mem = memory::create(64).unwrap();
    let setup = load(&mem, image, None, cmdline).unwrap();
    let vm = kvm.create_vm().unwrap();
    for (slot, r) in mem.iter().enumerate() {
        let region = kvm_bindings::kvm_userspace_memory_region {
            slot: slot as u32,
            guest_phys_addr: r.start_addr().0,
            memory_size: r.len(),
            userspace_addr: mem.get_host_address(r.start_addr()).unwrap() as u64,
            flags: 0,
        };
        // SAFETY: the mapping outlives the VM, which is dropped at the end of this function.
        unsafe { vm.set_user_memory_region(region).unwrap() };
    }
    let mut vcpu = vm.create_vcpu(0).unwrap();
    let cpuid = kvm.get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES).unwrap();
    vcpu.set_cpuid2(&cpuid).unwrap();
    let mut regs = vcpu.get_regs().unwrap();
    let mut sregs = vcpu.get_sregs().unwrap();
    configure_vcpu(&setup, &mut regs, &mut sregs);
    vcpu.set_sregs(&sregs).unwrap();
    vcpu.set_regs(&regs).unwrap();
    let mut outs = Vec::new();
    for _ in 0..100 {
        match vcpu.run().unwrap() {
            VcpuExit::IoOut(port, data) => outs.push((port, data.to_vec())),
            VcpuExit::Hlt => return Some(outs),
            other => panic!("unexpected exit {other:?} after {outs:x?}"),
        }
    }
    panic!("the kernel did not halt: {outs:x?}");
}

#[test]
fn multiboot_entry_sees_magic_and_info() {
    let code: &[u8] = &[
        0xe7, 0x80, // out 0x80, eax          (boot magic)
        0x8b, 0x43, 0x04, // mov eax, [ebx+4] (mem_lower)
        0xe7, 0x81, // out 0x81, eax
        0x8b, 0x43, 0x10, // mov eax, [ebx+16] (cmdline)
        0x8a, 0x00, // mov al, [eax]
        0xe6, 0x82, // out 0x82, al
        0xf4, // hlt
    ];
    let seg = [(1, 0x10_0000, 0xc010_0000, code, code.len() as u64, PF_X)];
    let image = build(Class::Elf32, EM_386, 0xc010_0000, &seg);
    let Some(outs) = run(&image, "Zebra") else {
        return;
    };
    assert_eq!(
        outs,
        vec![
            (0x80, 0x2bad_b002u32.to_le_bytes().to_vec()),
            (0x81, 639u32.to_le_bytes().to_vec()),
            (0x82, vec![b'Z']),
        ]
    );
}

#[test]
fn linux_entry_runs_in_long_mode_with_boot_params() {
    let code: &[u8] = &[
        0x8a, 0x86, 0x10, 0x02, 0, 0, // mov al, [rsi+0x210] (type_of_loader)
        0xe6, 0x80, // out 0x80, al
        0x8b, 0x86, 0x28, 0x02, 0, 0, // mov eax, [rsi+0x228] (cmd_line_ptr)
        0x8a, 0x00, // mov al, [rax]
        0xe6, 0x81, // out 0x81, al
        0x48, 0x89, 0xe0, // mov rax, rsp
        0xe7, 0x82, // out 0x82, eax
        0xf4, // hlt
    ];
    let vaddr = 0xffff_ffff_8100_0000;
    let seg = [(1, 0x100_0000, vaddr, code, code.len() as u64, PF_X)];
    let image = build(Class::Elf64, EM_X86_64, 0x100_0000, &seg);
    let Some(outs) = run(&image, "quiet") else {
        return;
    };
    assert_eq!(
        outs,
        vec![
            (0x80, vec![0xff]),
            (0x81, vec![b'q']),
            (0x82, 0x8ff0u32.to_le_bytes().to_vec()),
        ]
    );
}
