//! Decoding KVM exits: port and MMIO accesses go to the platform's buses,
//! MSR accesses and patched-instruction traps are completed with the vCPU.

use super::*;

/// What exit handling touches besides the vCPU.
pub(super) struct ExitIo<'a> {
    pub(super) platform: &'a Platform,
    pub(super) stats: &'a mut ExitStats,
    pub(super) unknown: &'a mut UnknownAccesses,
    pub(super) patched: bool,
}

impl ExitIo<'_> {
    fn note_unknown(&mut self, mmio: bool, addr: u64, write: bool, size: usize) {
        self.unknown.note(mmio, addr, write, size);
    }

    /// Handles an exit that needs only the devices. Returns the record (None
    /// for crashes, whose RIP is read afterwards) and what the loop does
    /// next; or, as `Err`, an exit that needs the vCPU to complete.
    pub(super) fn handle(&mut self, exit: VcpuExit<'_>) -> Result<(Option<ExitRecord>, Next), Pending> {
        let core = self;
        let mut rec = ExitRecord {
            kind: ExitKind::PioIn,
            addr: 0,
            size: 0,
            data: 0,
            rip: 0,
        };
        let next = match exit {
            VcpuExit::IoIn(port, data) => {
                core.stats.pio += 1;
                if core.platform.pio.read(u64::from(port), data).is_err() {
                    data.fill(0xff);
                    let len = data.len();
                    core.note_unknown(false, u64::from(port), false, len);
                }
                rec = ExitRecord {
                    kind: ExitKind::PioIn,
                    addr: u64::from(port),
                    size: data.len() as u8,
                    data: le_value(data),
                    rip: 0,
                };
                if (0x3f8..0x400).contains(&port) {
                    core.platform.poll_serial_input();
                }
                Next::Continue
            }
            VcpuExit::IoOut(port, data) => {
                core.stats.pio += 1;
                if crate::patch::is_trap_exit(port, data) && core.patched {
                    return Err(Pending::Trap(port));
                }
                rec = ExitRecord {
                    kind: ExitKind::PioOut,
                    addr: u64::from(port),
                    size: data.len() as u8,
                    data: le_value(data),
                    rip: 0,
                };
                let next = match core.platform.pio.write(u64::from(port), data) {
                    Ok(None) => Next::Continue,
                    Ok(Some(ev)) => next_of(ev),
                    Err(_) => {
                        let len = data.len();
                        core.note_unknown(false, u64::from(port), true, len);
                        Next::Continue
                    }
                };
                if (0x3f8..0x400).contains(&port) {
                    core.platform.poll_serial_input();
                }
                next
            }
            VcpuExit::MmioRead(addr, data) => {
                core.stats.mmio += 1;
                if core.platform.mmio.read(addr, data).is_err() {
                    data.fill(0xff);
                    let len = data.len();
                    core.note_unknown(true, addr, false, len);
                }
                rec = ExitRecord {
                    kind: ExitKind::MmioRead,
                    addr,
                    size: data.len() as u8,
                    data: le_value(data),
                    rip: 0,
                };
                Next::Continue
            }
            VcpuExit::MmioWrite(addr, data) => {
                core.stats.mmio += 1;
                rec = ExitRecord {
                    kind: ExitKind::MmioWrite,
                    addr,
                    size: data.len() as u8,
                    data: le_value(data),
                    rip: 0,
                };
                match core.platform.mmio.write(addr, data) {
                    Ok(None) => Next::Continue,
                    Ok(Some(ev)) => next_of(ev),
                    Err(_) => {
                        let len = data.len();
                        core.note_unknown(true, addr, true, len);
                        Next::Continue
                    }
                }
            }
            VcpuExit::Hlt => {
                core.stats.hlt += 1;
                rec.kind = ExitKind::Hlt;
                Next::Hlt
            }
            VcpuExit::IrqWindowOpen => {
                core.stats.irq_window += 1;
                rec.kind = ExitKind::IrqWindow;
                Next::Continue
            }
            VcpuExit::X86Rdmsr(exit) => {
                core.stats.msr += 1;
                return Err(Pending::Msr {
                    index: exit.index,
                    write: None,
                });
            }
            VcpuExit::X86Wrmsr(exit) => {
                core.stats.msr += 1;
                return Err(Pending::Msr {
                    index: exit.index,
                    write: Some(exit.data),
                });
            }
            VcpuExit::Shutdown => return Ok((None, Next::Crash("triple fault (KVM_EXIT_SHUTDOWN)".into()))),
            VcpuExit::FailEntry(reason, cpu) => {
                return Ok((
                    None,
                    Next::Crash(format!("VM entry failed (hardware reason {reason:#x}, cpu {cpu})")),
                ))
            }
            VcpuExit::InternalError => return Ok((None, Next::InternalError)),
            VcpuExit::Debug(arch) => {
                return Ok((
                    None,
                    Next::Debug(DebugStop {
                        exception: arch.exception,
                        pc: arch.pc,
                        dr6: arch.dr6,
                    }),
                ))
            }
            VcpuExit::SystemEvent(kind, _) => match kind {
                kvm_bindings::KVM_SYSTEM_EVENT_RESET => Next::End(RunOutcome::Reset),
                kvm_bindings::KVM_SYSTEM_EVENT_SHUTDOWN => Next::End(RunOutcome::PowerOff),
                _ => return Ok((None, Next::Crash(format!("unexpected system event {kind}")))),
            },
            other => return Ok((None, Next::Crash(format!("unexpected VM exit {other:?}")))),
        };
        // RIP is part of the verification record; with no sync_regs, KVM_GET_REGS
        // would cost an ioctl per exit, so the run loop fills it lazily: the
        // position plus the exit's own data identify it well enough, and
        // `--verify full` adds the register digest.
        Ok((Some(rec), next))
    }
}

impl Machine {
    /// Completes an exit that needs the vCPU's registers.
    pub(super) fn complete(&mut self, pending: Pending) -> Result<ExitRecord, Error> {
        match pending {
            Pending::Msr { index, write } => {
                let virtual_tsc = self.hooks.virtual_tsc();
                let apic = self.core.platform.apic_msr(index, write);
                let result = match write {
                    _ if apic.is_some() => apic.flatten(),
                    None if virtual_tsc => self.virtual_msr_read(index),
                    None => msr_read(&self.core.vcpu, index),
                    Some(_) if virtual_tsc => None,
                    Some(v) => msr_write(&self.core.vcpu, index, v).then_some(v),
                };
                Ok(finish_msr(&mut self.core.vcpu, index, write, result))
            }
            Pending::Trap(port) => {
                let trap = complete_trap(&mut self.core.vcpu, &self.core.patches, &self.core.mem)?;
                let Trap {
                    mut regs,
                    sregs,
                    site: Some(site),
                } = trap
                else {
                    // An ordinary write to the trap port: nothing there.
                    self.core.note_unknown(false, u64::from(port), true, 1);
                    return Ok(unknown_trap_write(port, trap.regs.rip));
                };
                if site.kind == crate::patch::TrapKind::Cpuid {
                    // The running vCPU's own table (its APIC ID).
                    let table = match self.core.vcpu_index {
                        0 => &self.core.cpuid,
                        ap => &self.aps[ap - 1].cpuid,
                    };
                    return emulate_cpuid_trap(&self.core.vcpu, table, &site, regs, &sregs);
                }
                let value = match site.kind {
                    crate::patch::TrapKind::Rdtsc | crate::patch::TrapKind::Rdtscp => {
                        self.core.virtual_tsc(self.core.clock.now_ns())
                    }
                    _ => {
                        let mut ctx = self.core.ctx();
                        self.hooks.entropy(&mut ctx)?
                    }
                };
                crate::patch::emulate(&site, value, 0, &mut regs);
                self.core.vcpu.set_regs(&regs).map_err(kvm_err("KVM_SET_REGS"))?;
                Ok(ExitRecord {
                    kind: ExitKind::Patched,
                    addr: site.gpa,
                    size: site.len,
                    data: value,
                    rip: regs.rip,
                })
            }
        }
    }

    /// Trapped MSRs under the virtual TSC: derived from the virtual clock.
    fn virtual_msr_read(&mut self, index: u32) -> Option<u64> {
        match index {
            msr::IA32_TSC | msr::IA32_MPERF | msr::IA32_APERF => Some(self.core.virtual_tsc(self.core.clock.now_ns())),
            msr::IA32_TSC_ADJUST | msr::IA32_TSC_AUX => Some(0),
            _ => None,
        }
    }
}

/// Gives KVM the result of an MSR exit (`None`: the guest gets #GP) and
/// makes its record.
pub(super) fn finish_msr(vcpu: &mut VcpuFd, index: u32, write: Option<u64>, result: Option<u64>) -> ExitRecord {
    let run = vcpu.get_kvm_run();
    // SAFETY: the exit reason is KVM_EXIT_X86_RDMSR/WRMSR, whose union
    // member is `msr`.
    let msr = unsafe { &mut run.__bindgen_anon_1.msr };
    match result {
        Some(v) => {
            if write.is_none() {
                msr.data = v;
            }
            msr.error = 0;
        }
        None => msr.error = 1,
    }
    let kind = if write.is_some() {
        ExitKind::MsrWrite
    } else {
        ExitKind::MsrRead
    };
    ExitRecord {
        kind,
        addr: u64::from(index),
        size: 8,
        data: result.or(write).unwrap_or(0),
        rip: 0,
    }
}

/// A trap port write completed: the registers after it and the patched
/// site it came from (None: an ordinary write to the port).
pub(super) struct Trap {
    pub(super) regs: kvm_bindings::kvm_regs,
    pub(super) sregs: kvm_bindings::kvm_sregs,
    pub(super) site: Option<crate::patch::PatchSite>,
}

/// Completes a trap's `out` and finds the patched site it came from.
pub(super) fn complete_trap(vcpu: &mut VcpuFd, patches: &PatchTable, mem: &GuestMemory) -> Result<Trap, Error> {
    // KVM completes the `out` on the next KVM_RUN and refuses register
    // changes before that: complete it with an immediate exit (RIP is then
    // just past the `out`).
    vcpu.set_kvm_immediate_exit(1);
    let r = vcpu.run().map(|_| ());
    vcpu.set_kvm_immediate_exit(0);
    match r {
        Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {}
        Err(e) => {
            return Err(Error::Kvm {
                what: "KVM_RUN (completing a trap)",
                source: e,
            })
        }
        Ok(()) => {}
    }
    let regs = vcpu.get_regs().map_err(kvm_err("KVM_GET_REGS"))?;
    let sregs = vcpu.get_sregs().map_err(kvm_err("KVM_GET_SREGS"))?;
    let paging = crate::paging::PagingRegs::of(&sregs);
    let cs_base = if sregs.efer & (1 << 10) != 0 && sregs.cs.l != 0 {
        0
    } else {
        sregs.cs.base
    };
    let site = patches.site_for_exit(mem, &paging, regs.rip, cs_base).cloned();
    Ok(Trap { regs, sregs, site })
}

/// The record of a write to a trap port that no patched site made.
pub(super) fn unknown_trap_write(port: u16, rip: u64) -> ExitRecord {
    ExitRecord {
        kind: ExitKind::PioOut,
        addr: u64::from(port),
        size: 1,
        data: 0,
        rip,
    }
}

/// Answers a patched `cpuid` from the vCPU's CPUID table (deterministic).
pub(super) fn emulate_cpuid_trap(
    vcpu: &VcpuFd,
    table: &[cpuid::CpuidEntry],
    site: &crate::patch::PatchSite,
    mut regs: kvm_bindings::kvm_regs,
    sregs: &kvm_bindings::kvm_sregs,
) -> Result<ExitRecord, Error> {
    let (leaf, subleaf) = (regs.rax as u32, regs.rcx as u32);
    let xcr0 = if leaf == 0xd {
        vcpu.get_xcrs().map_or(1, |x| x.xcrs[0].value)
    } else {
        0
    };
    let out = cpuid::lookup(table, leaf, subleaf, sregs.cr4, xcr0);
    crate::patch::emulate_cpuid(site, out, &mut regs);
    vcpu.set_regs(&regs).map_err(kvm_err("KVM_SET_REGS"))?;
    Ok(ExitRecord {
        kind: ExitKind::Patched,
        addr: site.gpa,
        size: site.len,
        data: u64::from(subleaf) << 32 | u64::from(leaf),
        rip: regs.rip,
    })
}

/// An exit that needs the vCPU to complete.
pub(super) enum Pending {
    Msr {
        index: u32,
        write: Option<u64>,
    },
    /// A one-byte write to a trap port (which one).
    Trap(u16),
}

fn next_of(ev: BusEvent) -> Next {
    Next::End(match ev {
        BusEvent::DebugExit(v) => RunOutcome::DebugExit(v),
        BusEvent::Reset => RunOutcome::Reset,
        BusEvent::PowerOff => RunOutcome::PowerOff,
        BusEvent::Sleep(state) => return Next::Sleep(state),
    })
}

/// A plain run passes trapped MSRs through to KVM's own emulation (the
/// recorder logs them instead). None: the guest gets #GP.
pub(super) fn msr_read(vcpu: &VcpuFd, index: u32) -> Option<u64> {
    if !msr::passes_through(index) {
        return None;
    }
    let mut msrs = kvm_bindings::Msrs::from_entries(&[kvm_bindings::kvm_msr_entry {
        index,
        ..Default::default()
    }])
    .ok()?;
    match vcpu.get_msrs(&mut msrs) {
        Ok(1) => Some(msrs.as_slice()[0].data),
        _ => None,
    }
}

pub(super) fn msr_write(vcpu: &VcpuFd, index: u32, data: u64) -> bool {
    if !msr::passes_through(index) {
        return false;
    }
    let Ok(msrs) = kvm_bindings::Msrs::from_entries(&[kvm_bindings::kvm_msr_entry {
        index,
        data,
        ..Default::default()
    }]) else {
        return false;
    };
    matches!(vcpu.set_msrs(&msrs), Ok(1))
}
