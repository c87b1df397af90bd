//! Creating a KVM VM: the in-kernel interrupt controllers (PIC, IOAPIC, LAPICs), the PIT,
//! and guest RAM slots.

use kvm_bindings::{kvm_pit_config, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{Kvm, VmFd};

use crate::{Error, GuestMemory, Result};

/// Where KVM may place its three-page TSS for real-mode emulation: just below the BIOS
/// area at the top of 32-bit space, outside guest RAM and the device window.
const KVM_TSS_ADDRESS: usize = 0xfffb_d000;

/// Create a VM, register `mem` with it, then add the in-kernel irqchip and PIT.
///
/// Guest RAM is registered first on purpose: measured on our machines, registering a
/// 128 MiB slot takes ~0.1 ms on a fresh VM but 4–7 ms once the TSS, irqchip and PIT
/// exist (they add KVM-internal memory slots, and every later slot change costs more).
/// `dirty_log`: KVM logs which pages the guest writes (the pool reads it).
pub fn create(kvm: &Kvm, mem: &GuestMemory, dirty_log: bool) -> Result<VmFd> {
    // KVM_CREATE_VM may be interrupted by a signal (a kick aimed at another partition's
    // vCPU thread, SIGCHLD): that is no failure, ask again.
    let mut tries = 0;
    let vm = loop {
        match kvm.create_vm() {
            Err(e) if e.errno() == libc::EINTR && tries < 100 => tries += 1,
            r => break r.map_err(Error::kvm("KVM_CREATE_VM"))?,
        }
    };
    super::memory::register(&vm, mem, dirty_log)?;
    vm.set_tss_address(KVM_TSS_ADDRESS).map_err(Error::kvm("KVM_SET_TSS_ADDR"))?;
    vm.create_irq_chip().map_err(Error::kvm("KVM_CREATE_IRQCHIP"))?;
    let pit = kvm_pit_config { flags: KVM_PIT_SPEAKER_DUMMY, ..Default::default() };
    vm.create_pit2(pit).map_err(Error::kvm("KVM_CREATE_PIT2"))?;
    Ok(vm)
}

/// Mask every line of both 8259 PICs. Native images run with no IDT: an interrupt
/// delivered to them would be fatal, so their devices' interrupt lines (irqfds) must
/// never reach the vCPU. The IOAPIC's redirection entries are masked from reset and the
/// image never unmasks anything.
pub fn mask_legacy_pic(vm: &VmFd) -> Result<()> {
    for chip_id in [kvm_bindings::KVM_IRQCHIP_PIC_MASTER, kvm_bindings::KVM_IRQCHIP_PIC_SLAVE] {
        let mut chip = kvm_bindings::kvm_irqchip { chip_id, ..Default::default() };
        vm.get_irqchip(&mut chip).map_err(Error::kvm("KVM_GET_IRQCHIP"))?;
        // chip_id selects a PIC, so `pic` is the union member KVM filled in (writing a
        // union field is safe; only reads are not).
        chip.chip.pic.imr = 0xff;
        vm.set_irqchip(&chip).map_err(Error::kvm("KVM_SET_IRQCHIP"))?;
    }
    Ok(())
}
