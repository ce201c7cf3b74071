//! Capturing and restoring a machine's state (snapshots, checkpoints,
//! `nyx check` resets) and the pages written since a point.

use super::*;

impl Machine {
    /// The machine's state and memory now (at a stop of [`Machine::resume`]).
    pub fn capture_state(&mut self) -> Result<(crate::snapshot::MachineState, Vec<crate::mem_state::PageRun>), Error> {
        let (state, ()) = self.capture_state_without_memory()?;
        Ok((state, crate::mem_state::capture_all(&self.core.mem)))
    }

    /// The machine's state without its memory (a checkpoint that saves
    /// only written pages itself).
    pub fn capture_state_without_memory(&mut self) -> Result<(crate::snapshot::MachineState, ()), Error> {
        let (vcpu, aps, schedule) = self.capture_vcpus()?;
        let state = crate::snapshot::MachineState {
            vcpu,
            aps,
            schedule,
            platform: self.core.platform.state(),
            virtual_ns: self.core.clock.last(),
            exit_seq: self.core.exit_seq,
            poll_pending: self.poll_pending,
            patches: self.core.patches.clone(),
        };
        Ok((state, ()))
    }

    /// The configuration and images a saved copy of this machine carries
    /// in its container header: configuration, kernel, initrd.
    pub fn saved_parts(&self) -> (&crate::config::MachineConfig, &[u8], Option<&[u8]>) {
        let c = &self.core;
        (&c.config, &c.kernel_image, c.initrd_image.as_deref())
    }

    /// A second handle on the VM (a duplicated file descriptor), for a
    /// thread that reads KVM's dirty log while this one runs the vCPU.
    pub fn vm_handle(&self) -> Result<VmFd, Error> {
        use std::os::fd::AsRawFd;
        // SAFETY: dup of a descriptor this machine owns; the copy is handed
        // to the VmFd below, its only owner.
        let fd = unsafe { libc::dup(self.core.vm.as_raw_fd()) };
        if fd < 0 {
            return Err(Error::Kvm {
                what: "dup of the VM descriptor",
                source: kvm_ioctls::Error::last(),
            });
        }
        // SAFETY: `fd` is a fresh, valid VM descriptor that nothing else owns.
        unsafe { self.core._kvm.create_vmfd_from_rawfd(fd) }.map_err(kvm_err("KVM_GET_VCPU_MMAP_SIZE"))
    }

    /// Saves the machine into a snapshot file (at a stop of [`Machine::resume`]).
    pub fn save_snapshot(&mut self, path: &Path) -> Result<PathBuf, Error> {
        self.save_snapshot_as(path, crate::snapshot::MemoryFormat::Compressed)
    }

    /// [`Machine::save_snapshot`] with memory stored as `format` says.
    pub fn save_snapshot_as(&mut self, path: &Path, format: crate::snapshot::MemoryFormat) -> Result<PathBuf, Error> {
        let (state, memory) = self.capture_state()?;
        let c = &self.core;
        Ok(crate::snapshot::write_as(
            path,
            &c.config,
            &c.kernel_image,
            c.initrd_image.as_deref(),
            &state,
            &memory,
            format,
        )?)
    }

    /// The vCPU, for register access by a debugger.
    pub fn vcpu_mut(&mut self) -> &mut VcpuFd {
        &mut self.core.vcpu
    }

    /// Puts the vCPU, the devices, the virtual time, the position and the
    /// patch table back to `state` in place, with COM1 wired to
    /// `serial_out` and `serial_in` (the run mode's own time source is the
    /// caller's to reset). Guest memory is the caller's too: see
    /// [`crate::reset::ResetPoint`]. Order as at restore: the pending exit
    /// is completed first (KVM refuses register changes before that), then
    /// the devices, then the vCPU.
    pub fn reset_state(
        &mut self,
        state: &crate::snapshot::MachineState,
        serial_out: Box<dyn Write + Send>,
        serial_in: Box<dyn Input>,
        platform_in: Box<dyn Input>,
    ) -> Result<(), Error> {
        crate::vcpu_state::complete_pending_exit(&mut self.core.vcpu)
            .map_err(vcpu_err("complete the pending exit of"))?;
        let io = PlatformIo {
            clock: self.core.clock.clone(),
            wall: Box::new(nyx_devices::io::FixedWallClock(self.core.config.wall_seconds)),
            serial_out,
            serial_in,
            platform_in,
            tsc_hz: u64::from(self.core.tsc_khz) * 1000,
            // The functions (and the disks behind them) move into the new
            // platform and take the snapshot's state there. Should the
            // rebuild fail, the machine cannot run on anyway.
            pci: self.core.platform.take_pci_functions(),
            chip_link: self.core.chip_link.clone(),
            ram_below_4g: (self.core.config.mem_mib << 20).min(crate::memory::MMIO_HOLE_START),
        };
        self.core.platform = Arc::new(Platform::from_state(io, &state.platform)?);
        self.idle_stopped = false;
        self.halted_stopped = false;
        self.restore_vcpus(state)?;
        self.core.clock.set_last(state.virtual_ns);
        self.core.exit_seq = state.exit_seq;
        self.poll_pending = state.poll_pending;
        self.sleeping = None;
        self.cr8_entered = None;
        self.mid_step = false;
        self.core.patches = state.patches.clone();
        Ok(())
    }

    /// Where inside a step the machine stopped ([`StepState`]).
    pub fn step_state(&self) -> StepState {
        StepState {
            mid_step: self.mid_step,
            clock_sample: self.core.clock.cached(),
        }
    }

    /// Puts back a [`Machine::step_state`] (after [`Machine::reset_state`]).
    pub fn set_step_state(&mut self, s: StepState) {
        self.mid_step = s.mid_step;
        self.core.clock.set_cached(s.clock_sample);
    }

    /// The pages written since the last call (KVM's dirty log, collected
    /// now, plus the VMM's own writes that hooks noted): the delta a
    /// reverse debugger's checkpoint saves. Empty when the mode does not
    /// track dirty pages.
    pub fn take_written(&mut self) -> Result<BTreeSet<u64>, Error> {
        self.core.ctx().collect_dirty().map_err(Error::DirtyLog)?;
        Ok(std::mem::take(&mut self.core.written))
    }

    /// Forgets the pages written so far: the machine's memory is its base
    /// again (a fast reset rolled every written page back; its run mode
    /// tracks no dirty pages of its own, see [`crate::reset::ResetPoint`]).
    pub fn forget_touched(&mut self) {
        self.core.touched.clear();
    }

    /// Pages written since the previous landing (what the next landing's
    /// memory digest covers): part of a replay checkpoint.
    pub fn dirty_since_landing(&self) -> &BTreeSet<u64> {
        &self.core.dirty_since_landing
    }

    /// Sets the pages written since the previous landing (restoring a
    /// replay checkpoint).
    pub fn set_dirty_since_landing(&mut self, pages: BTreeSet<u64>) {
        self.core.dirty_since_landing = pages;
    }
}
