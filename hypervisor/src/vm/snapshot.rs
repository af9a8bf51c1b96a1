//! Taking a running VM's snapshot, and starting a VM from one
//! (formats and checks: [`crate::snapshot`]).

use std::path::Path;
use std::time::{Duration, Instant};

use kvm_bindings::kvm_irqchip;
use kvm_ioctls::Kvm;

use super::{kvm_err, shape_of, validate, Machine, Vm, VmConfig, VmError};
use crate::bus::lock;
use crate::host::HostProfile;
use crate::snapshot::{self, SnapshotError, VcpuState, VmState, MEMORY_FILE};
use crate::{memory, vcpu};

/// The interrupt controller's chips: PIC master, PIC slave, IOAPIC.
const IRQCHIP_IDS: [u32; 3] = [0, 1, 2];
/// How long vCPUs get to stop for a snapshot (they stop at their next exit,
/// which a kick forces).
const PARK_TIMEOUT: Duration = Duration::from_secs(10);

fn kvm(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> SnapshotError {
    move |source| SnapshotError::Kvm { what, source }
}

impl Vm {
    /// Stops the VM where it stands and saves it to `dir` (an existing,
    /// empty directory): vCPUs, interrupt controller, clock, devices,
    /// memory. `identity` names the guest's inputs, which a restore must
    /// name alike. The VM is over afterwards, whether or not this worked.
    pub fn snapshot(&mut self, dir: &Path, identity: &str) -> Result<(), SnapshotError> {
        let saved = self.save_to(dir, identity);
        self.teardown();
        saved
    }

    fn save_to(&mut self, dir: &Path, identity: &str) -> Result<(), SnapshotError> {
        let started = Instant::now();
        self.parking.request();
        let deadline = started + PARK_TIMEOUT;
        for handle in &self.vcpu_threads {
            while !handle.is_finished() && Instant::now() < deadline {
                vcpu::kick(handle);
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        let parked = self.parking.take();
        for (id, _) in (0u8..).zip(&self.vcpu_threads) {
            if !parked.iter().any(|(parked_id, _)| *parked_id == id) {
                return Err(SnapshotError::VcpuNotParked(id));
            }
        }
        for handle in self.vcpu_threads.drain(..) {
            if handle.join().is_err() {
                tracing::error!("a vCPU thread panicked");
            }
        }
        let transports = self.devices.save();
        let serial = lock(&self.serial).state();
        let mut irqchips = Vec::with_capacity(IRQCHIP_IDS.len());
        for chip_id in IRQCHIP_IDS {
            let mut chip = kvm_irqchip {
                chip_id,
                ..Default::default()
            };
            self.vm_fd
                .get_irqchip(&mut chip)
                .map_err(kvm("get irqchip"))?;
            irqchips.push(chip);
        }
        let clock = self.vm_fd.get_clock().map_err(kvm("get clock"))?;
        let msr_list = Kvm::new()
            .and_then(|kvm| kvm.get_msr_index_list())
            .map_err(kvm("list MSRs"))?;
        let vcpus = parked
            .iter()
            .map(|(_, fd)| VcpuState::capture(fd, msr_list.as_slice()))
            .collect::<Result<Vec<_>, _>>()?;
        let memory = snapshot::memory::save(&self.mem, &dir.join(MEMORY_FILE))?;
        let mut shape = self.shape.clone();
        shape.identity = identity.to_string();
        snapshot::write_state(
            dir,
            &VmState {
                shape,
                vcpus,
                irqchips,
                clock,
                serial,
                transports,
                memory,
            },
        )?;
        tracing::info!(
            "VM snapshot written to {} in {:.0?}",
            dir.display(),
            started.elapsed()
        );
        Ok(())
    }

    /// Starts a VM from the snapshot in `dir` instead of booting one.
    /// `config` says what the new VM is attached to (its vsock socket,
    /// share and taps) and must have the snapshot's shape, `identity`
    /// included; the guest's memory maps the snapshot's memory file
    /// privately. The guest is told its vsock connections are gone.
    pub fn restore(config: &VmConfig, dir: &Path, identity: &str) -> Result<Vm, VmError> {
        let started = Instant::now();
        validate(config)?;
        let profile = HostProfile::resolve(config.host_profile);
        let fail = |source| VmError::Restore {
            dir: dir.to_path_buf(),
            source,
        };
        let state = snapshot::read_state(dir).map_err(fail)?;
        let shape = shape_of(config, profile, identity);
        if let Some(difference) = state.shape.difference(&shape) {
            return Err(fail(SnapshotError::Mismatch(difference)));
        }
        if state.vcpus.len() != usize::from(config.vcpus)
            || state.irqchips.len() != IRQCHIP_IDS.len()
        {
            return Err(fail(SnapshotError::Mismatch(format!(
                "{} vCPU states and {} interrupt chips for {} vCPUs",
                state.vcpus.len(),
                state.irqchips.len(),
                config.vcpus
            ))));
        }
        let ranges = memory::ram_ranges(config.memory_mib << 20)?;
        let mem =
            snapshot::memory::map(&dir.join(MEMORY_FILE), &state.memory, &ranges).map_err(fail)?;
        crate::ledger::record_restore();
        let machine = Machine::assemble(config, &mem, Some(&state.serial))?;
        for chip in &state.irqchips {
            machine
                .vm_fd
                .set_irqchip(chip)
                .map_err(kvm_err("set irqchip"))?;
        }
        // The guest's clock goes on from where it was saved (no jump for
        // its timers and watchdogs); the agent sets the wall clock.
        let mut clock = state.clock;
        clock.flags = 0;
        machine
            .vm_fd
            .set_clock(&clock)
            .map_err(kvm_err("set clock"))?;
        let mut saved_vcpus = state.vcpus.iter();
        let fds = machine.create_vcpus(config, profile, |fd, _| match saved_vcpus.next() {
            Some(saved) => saved.restore(fd).map_err(fail),
            None => Err(VmError::Config("fewer vCPU states than vCPUs".into())),
        })?;
        // Last: a device started now may interrupt the guest at once, and
        // the vCPUs' local APICs must already hold their saved state.
        machine.devices.restore(&state.transports).map_err(fail)?;
        // This guest is not the one saved: a new generation ID, announced
        // once its vCPUs run (the guest then reseeds its RNG).
        crate::vmgenid::write_new_id(&mem)?;
        let vm = machine.launch(config, profile, started, mem, fds)?;
        crate::vmgenid::announce(&vm.vm_fd)?;
        tracing::info!(
            vcpus = config.vcpus,
            memory_mib = config.memory_mib,
            "VM restored from {} in {:.1?}",
            dir.display(),
            started.elapsed()
        );
        Ok(vm)
    }
}
