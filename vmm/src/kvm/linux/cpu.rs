//! vCPU state for the Linux boot path: CPUID, MSRs, LAPIC, and for the boot vCPU the
//! 64-bit boot-protocol entry state (long mode, flat segments from the boot GDT, `rsi` =
//! zero page).

use kvm_bindings::{
    kvm_cpuid_entry2, kvm_fpu, kvm_msr_entry, kvm_regs, kvm_segment, CpuId, Msrs,
    KVM_CPUID_FLAG_SIGNIFCANT_INDEX, KVM_MAX_CPUID_ENTRIES,
};
use kvm_ioctls::{Kvm, VcpuFd};

use super::{layout, LinuxBoot, LinuxError};

/// Boot GDT: null, null, `__BOOT_CS` (0x10), `__BOOT_DS` (0x18), a 64-bit TSS (0x20, two
/// slots). The selectors are the ones the boot protocol names.
pub const GDT_ENTRIES: usize = 6;
pub const BOOT_CS: u16 = 0x10;
pub const BOOT_DS: u16 = 0x18;
pub const BOOT_TSS: u16 = 0x20;

/// A GDT descriptor from access/flags bits (`0xF0FF` layout: flags nibble in bits 12–15,
/// access byte in bits 0–7), base and 20-bit limit.
const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((base as u64 & 0xff00_0000) << 32)
        | ((flags as u64 & 0xf0ff) << 40)
        | ((limit as u64 & 0x000f_0000) << 32)
        | ((base as u64 & 0x00ff_ffff) << 16)
        | (limit as u64 & 0x0000_ffff)
}

/// The boot GDT (written to [`layout::GDT`] by [`super::load`]).
pub fn gdt() -> [u64; GDT_ENTRIES] {
    [
        0,
        0,
        gdt_entry(0xa09b, 0, 0xfffff), // 64-bit code, DPL0, execute/read
        gdt_entry(0xc093, 0, 0xfffff), // data, DPL0, read/write
        gdt_entry(0x808b, 0, 0xfffff), // busy 64-bit TSS
        0,                             // upper half of the TSS descriptor
    ]
}

/// The KVM segment register matching GDT descriptor `entry` loaded with `selector`.
fn segment(selector: u16, entry: u64) -> kvm_segment {
    let g = ((entry >> 55) & 1) as u8;
    let raw_limit = ((entry & 0xffff) | ((entry >> 32) & 0xf_0000)) as u32;
    kvm_segment {
        base: ((entry >> 16) & 0xff_ffff) | ((entry >> 32) & 0xff00_0000),
        limit: if g == 1 { (raw_limit << 12) | 0xfff } else { raw_limit },
        selector,
        type_: ((entry >> 40) & 0xf) as u8,
        present: ((entry >> 47) & 1) as u8,
        dpl: ((entry >> 45) & 3) as u8,
        db: ((entry >> 54) & 1) as u8,
        s: ((entry >> 44) & 1) as u8,
        l: ((entry >> 53) & 1) as u8,
        g,
        avl: ((entry >> 52) & 1) as u8,
        unusable: 0,
        padding: 0,
    }
}

const CR0_PE: u64 = 1 << 0;
const CR0_MP: u64 = 1 << 1;
const CR0_ET: u64 = 1 << 4;
const CR0_NE: u64 = 1 << 5;
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;

/// MSRs written on every vCPU, as Firecracker and vmm-reference do for Linux.
pub mod msr {
    pub const IA32_TSC: u32 = 0x10;
    pub const IA32_SYSENTER_CS: u32 = 0x174;
    pub const IA32_SYSENTER_ESP: u32 = 0x175;
    pub const IA32_SYSENTER_EIP: u32 = 0x176;
    pub const IA32_MISC_ENABLE: u32 = 0x1a0;
    pub const IA32_MISC_ENABLE_FAST_STRING: u64 = 1;
    pub const MTRR_DEF_TYPE: u32 = 0x2ff;
    /// MTRRs enabled, default memory type write-back.
    pub const MTRR_DEF_TYPE_WB_ENABLED: u64 = (1 << 11) | 6;
    pub const STAR: u32 = 0xc000_0081;
    pub const LSTAR: u32 = 0xc000_0082;
    pub const CSTAR: u32 = 0xc000_0083;
    pub const SYSCALL_MASK: u32 = 0xc000_0084;
    pub const KERNEL_GS_BASE: u32 = 0xc000_0102;
}

/// (index, value) of the boot MSRs.
pub fn boot_msrs() -> Vec<(u32, u64)> {
    vec![
        (msr::IA32_SYSENTER_CS, 0),
        (msr::IA32_SYSENTER_ESP, 0),
        (msr::IA32_SYSENTER_EIP, 0),
        (msr::STAR, 0),
        (msr::CSTAR, 0),
        (msr::KERNEL_GS_BASE, 0),
        (msr::SYSCALL_MASK, 0),
        (msr::LSTAR, 0),
        (msr::IA32_TSC, 0),
        (msr::IA32_MISC_ENABLE, msr::IA32_MISC_ENABLE_FAST_STRING),
        (msr::MTRR_DEF_TYPE, msr::MTRR_DEF_TYPE_WB_ENABLED),
    ]
}

/// LAPIC register offsets and delivery modes.
pub const APIC_LVT0: usize = 0x350;
pub const APIC_LVT1: usize = 0x360;
pub const APIC_MODE_NMI: u32 = 4;
pub const APIC_MODE_EXTINT: u32 = 7;

/// The KVM paravirtual signature, leaf 0x4000_0000 EBX/ECX/EDX.
const KVM_SIGNATURE: &[u8; 12] = b"KVMKVMKVM\0\0\0";
const HYPERVISOR_LEAF: u32 = 0x4000_0000;

/// Bits needed to number `n` things (ceil(log2(n))).
fn bits_for(n: u32) -> u32 {
    if n <= 1 {
        0
    } else {
        32 - (n - 1).leading_zeros()
    }
}

fn leaf(function: u32, index: u32, eax: u32, ebx: u32, ecx: u32, edx: u32) -> kvm_cpuid_entry2 {
    kvm_cpuid_entry2 {
        function,
        index,
        flags: KVM_CPUID_FLAG_SIGNIFCANT_INDEX,
        eax,
        ebx,
        ecx,
        edx,
        padding: [0; 3],
    }
}

/// Adapts KVM's supported CPUID to vCPU `id` of `vcpus`: one package of `vcpus` cores,
/// one thread each, APIC id = `id` (leaves 1, 4, 0xB, 0x1F, 0x8000_0008, 0x8000_001E), the
/// hypervisor bit, and the KVM signature at 0x4000_0000.
pub fn filter_cpuid(entries: &mut Vec<kvm_cpuid_entry2>, id: u8, vcpus: u8) {
    let id = id as u32;
    let n = vcpus.max(1) as u32;
    let core_bits = bits_for(n);
    let max_basic = entries.iter().find(|e| e.function == 0).map_or(0, |e| e.eax);
    let amd = entries
        .iter()
        .find(|e| e.function == 0)
        .is_some_and(|e| (e.ebx, e.edx, e.ecx) == (0x6874_7541, 0x6974_6e65, 0x444d_4163) // AuthenticAMD
            || (e.ebx, e.edx, e.ecx) == (0x6f67_7948, 0x6e65_476e, 0x656e_6975)); // HygonGenuine
    let had_1f = entries.iter().any(|e| e.function == 0x1f);

    // Extended topology: rebuilt from scratch below.
    entries.retain(|e| !matches!(e.function, 0xb | 0x1f | 0x8000_0026));

    for e in entries.iter_mut() {
        match e.function {
            1 => {
                e.ebx = (e.ebx & 0x0000_ffff) | (id << 24) | (n.min(255) << 16);
                e.ecx |= 1 << 31; // hypervisor present
                if n > 1 {
                    e.edx |= 1 << 28; // HTT: more than one logical processor per package
                } else {
                    e.edx &= !(1 << 28);
                }
            }
            4 => {
                let cache_type = e.eax & 0x1f;
                if cache_type != 0 {
                    let level = (e.eax >> 5) & 7;
                    let sharing = if level >= 3 { n - 1 } else { 0 };
                    e.eax = (e.eax & 0x3fff) | ((n - 1).min(63) << 26) | (sharing.min(0xfff) << 14);
                }
            }
            0x8000_0008 if amd => {
                e.ecx = (e.ecx & !0xf0ff) | (core_bits << 12) | (n - 1);
            }
            0x8000_001e if amd => {
                e.eax = id; // extended APIC id
                e.ebx = id & 0xff; // compute unit id; one thread per unit
                e.ecx = 0; // node 0, one node per package
                e.edx = 0;
            }
            HYPERVISOR_LEAF => {
                e.eax = e.eax.max(HYPERVISOR_LEAF + 1);
                e.ebx = u32::from_le_bytes(KVM_SIGNATURE[0..4].try_into().unwrap());
                e.ecx = u32::from_le_bytes(KVM_SIGNATURE[4..8].try_into().unwrap());
                e.edx = u32::from_le_bytes(KVM_SIGNATURE[8..12].try_into().unwrap());
            }
            _ => {}
        }
    }
    if !entries.iter().any(|e| e.function == HYPERVISOR_LEAF) {
        let s = |i: usize| u32::from_le_bytes(KVM_SIGNATURE[i..i + 4].try_into().unwrap());
        let mut e = leaf(HYPERVISOR_LEAF, 0, HYPERVISOR_LEAF + 1, s(0), s(4), s(8));
        e.flags = 0;
        entries.push(e);
    }
    if max_basic >= 0xb {
        let mut topo = |function: u32| {
            // Level 1: SMT, one thread per core. Level 2: cores, `n` per package. Then the
            // invalid level that ends the list.
            entries.push(leaf(function, 0, 0, 1, 1 << 8, id));
            entries.push(leaf(function, 1, core_bits, n, (2 << 8) | 1, id));
            entries.push(leaf(function, 2, 0, 0, 2, id));
        };
        topo(0xb);
        if had_1f && max_basic >= 0x1f {
            topo(0x1f);
        }
    }
}

fn kvm_err(id: u8, op: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> LinuxError {
    move |source| LinuxError::Kvm { id, op, source }
}

fn lapic_reg(regs: &[std::os::raw::c_char], off: usize) -> u32 {
    let b: Vec<u8> = regs[off..off + 4].iter().map(|&c| c as u8).collect();
    u32::from_le_bytes(b.try_into().unwrap())
}

fn set_lapic_reg(regs: &mut [std::os::raw::c_char], off: usize, v: u32) {
    for (d, s) in regs[off..off + 4].iter_mut().zip(v.to_le_bytes()) {
        *d = s as std::os::raw::c_char;
    }
}

fn with_delivery_mode(reg: u32, mode: u32) -> u32 {
    (reg & !0x700) | (mode << 8)
}

/// Sets up vCPU `id` of `vcpus` for Linux: CPUID, MSRs and LAPIC LINT0 = ExtINT,
/// LINT1 = NMI on every vCPU; with `boot` (the boot vCPU only) also the long-mode
/// entry state: segments from the boot GDT, CR0/CR3/CR4/EFER, `rip` = entry, `rsi` =
/// zero page, `rflags` = 2, and a clean FPU. The VM needs its in-kernel irqchip, and
/// vCPU `id` must have KVM vCPU id `id`.
pub fn setup_vcpu(kvm: &Kvm, vcpu: &VcpuFd, id: u8, vcpus: u8, boot: Option<&LinuxBoot>) -> Result<(), LinuxError> {
    if id >= vcpus {
        return Err(LinuxError::Vcpu { id, msg: format!("vCPU index out of range: the partition has {vcpus}") });
    }
    let supported = kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES).map_err(kvm_err(id, "KVM_GET_SUPPORTED_CPUID"))?;
    let mut entries = supported.as_slice().to_vec();
    filter_cpuid(&mut entries, id, vcpus);
    let cpuid = CpuId::from_entries(&entries)
        .map_err(|e| LinuxError::Vcpu { id, msg: format!("CPUID table of {} entries: {e:?}", entries.len()) })?;
    vcpu.set_cpuid2(&cpuid).map_err(kvm_err(id, "KVM_SET_CPUID2"))?;

    let msrs: Vec<kvm_msr_entry> =
        boot_msrs().into_iter().map(|(index, data)| kvm_msr_entry { index, data, ..Default::default() }).collect();
    let msrs = Msrs::from_entries(&msrs).map_err(|e| LinuxError::Vcpu { id, msg: format!("MSR list: {e:?}") })?;
    let written = vcpu.set_msrs(&msrs).map_err(kvm_err(id, "KVM_SET_MSRS"))?;
    if written != msrs.as_slice().len() {
        let failed = msrs.as_slice()[written].index;
        return Err(LinuxError::Vcpu { id, msg: format!("KVM refused to set MSR {failed:#x}") });
    }

    let mut lapic = vcpu.get_lapic().map_err(kvm_err(id, "KVM_GET_LAPIC (is the in-kernel irqchip created?)"))?;
    let lint0 = lapic_reg(&lapic.regs, APIC_LVT0);
    set_lapic_reg(&mut lapic.regs, APIC_LVT0, with_delivery_mode(lint0, APIC_MODE_EXTINT));
    let lint1 = lapic_reg(&lapic.regs, APIC_LVT1);
    set_lapic_reg(&mut lapic.regs, APIC_LVT1, with_delivery_mode(lint1, APIC_MODE_NMI));
    vcpu.set_lapic(&lapic).map_err(kvm_err(id, "KVM_SET_LAPIC"))?;

    let Some(boot) = boot else { return Ok(()) };

    let fpu = kvm_fpu { fcw: 0x37f, mxcsr: 0x1f80, ..Default::default() };
    vcpu.set_fpu(&fpu).map_err(kvm_err(id, "KVM_SET_FPU"))?;

    let mut sregs = vcpu.get_sregs().map_err(kvm_err(id, "KVM_GET_SREGS"))?;
    let gdt = gdt();
    let code = segment(BOOT_CS, gdt[(BOOT_CS >> 3) as usize]);
    let data = segment(BOOT_DS, gdt[(BOOT_DS >> 3) as usize]);
    let tss = segment(BOOT_TSS, gdt[(BOOT_TSS >> 3) as usize]);
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = tss;
    sregs.gdt.base = layout::GDT;
    sregs.gdt.limit = (GDT_ENTRIES * 8 - 1) as u16;
    sregs.idt.base = layout::IDT;
    sregs.idt.limit = 7;
    sregs.cr0 = CR0_PE | CR0_MP | CR0_ET | CR0_NE | CR0_PG;
    sregs.cr3 = layout::PML4;
    sregs.cr4 = CR4_PAE;
    sregs.efer = EFER_LME | EFER_LMA;
    vcpu.set_sregs(&sregs).map_err(kvm_err(id, "KVM_SET_SREGS"))?;

    let regs = kvm_regs {
        rflags: 2,
        rip: boot.entry,
        rsi: boot.boot_params,
        rsp: layout::BOOT_STACK,
        rbp: layout::BOOT_STACK,
        ..Default::default()
    };
    vcpu.set_regs(&regs).map_err(kvm_err(id, "KVM_SET_REGS"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gdt_segments_are_flat_long_mode() {
        let g = gdt();
        let cs = segment(BOOT_CS, g[2]);
        assert_eq!((cs.l, cs.db, cs.s, cs.present, cs.dpl, cs.type_), (1, 0, 1, 1, 0, 0xb));
        assert_eq!((cs.base, cs.limit, cs.g), (0, 0xffff_ffff, 1));
        let ds = segment(BOOT_DS, g[3]);
        assert_eq!((ds.l, ds.db, ds.s, ds.present, ds.type_), (0, 1, 1, 1, 3));
        assert_eq!(ds.limit, 0xffff_ffff);
        let tr = segment(BOOT_TSS, g[4]);
        assert_eq!((tr.s, tr.type_, tr.present), (0, 0xb, 1));
        assert_eq!(g[0], 0);
        assert_eq!(g[1], 0);
        // Raw encodings as documented in the SDM.
        assert_eq!(g[2], 0x00af_9b00_0000_ffff);
        assert_eq!(g[3], 0x00cf_9300_0000_ffff);
    }

    fn amd_table() -> Vec<kvm_cpuid_entry2> {
        let e = |f, i, a, b, c, d| kvm_cpuid_entry2 { function: f, index: i, eax: a, ebx: b, ecx: c, edx: d, ..Default::default() };
        vec![
            e(0, 0, 0x10, 0x6874_7541, 0x444d_4163, 0x6974_6e65),
            e(1, 0, 0x00a0_0f11, 0x0800_0800, 0x0000_0001, 0x0000_0001),
            e(0xb, 0, 1, 2, 0x100, 7),
            e(0xb, 1, 7, 64, 0x201, 7),
            e(0x8000_0000, 0, 0x8000_0021, 0, 0, 0),
            e(0x8000_0008, 0, 0x3030, 0, 0x703f, 0),
            e(0x8000_001e, 0, 9, 0x0109, 0x0103, 0),
        ]
    }

    fn find(t: &[kvm_cpuid_entry2], f: u32, i: u32) -> kvm_cpuid_entry2 {
        *t.iter().find(|e| e.function == f && e.index == i).unwrap_or_else(|| panic!("leaf {f:#x}.{i} missing"))
    }

    #[test]
    fn cpuid_topology_per_vcpu() {
        for (id, vcpus) in [(0u8, 1u8), (0, 4), (3, 4), (5, 6), (200, 255)] {
            let mut t = amd_table();
            filter_cpuid(&mut t, id, vcpus);
            let l1 = find(&t, 1, 0);
            assert_eq!(l1.ebx >> 24, id as u32, "leaf 1 APIC id");
            assert_eq!((l1.ebx >> 16) & 0xff, vcpus as u32, "leaf 1 logical count");
            assert_eq!(l1.ebx & 0xffff, 0x0800, "leaf 1 clflush size kept");
            assert_ne!(l1.ecx & (1 << 31), 0, "hypervisor bit");
            assert_eq!(l1.edx & (1 << 28) != 0, vcpus > 1, "HTT");
            let smt = find(&t, 0xb, 0);
            let core = find(&t, 0xb, 1);
            let end = find(&t, 0xb, 2);
            assert_eq!((smt.eax, smt.ebx, smt.ecx, smt.edx), (0, 1, 0x100, id as u32));
            assert_eq!((core.ebx, core.ecx, core.edx), (vcpus as u32, 0x201, id as u32));
            assert!(1u32 << core.eax >= vcpus as u32, "core shift covers all APIC ids");
            assert_eq!((end.ecx >> 8) & 0xff, 0, "level list terminated");
            assert_eq!(t.iter().filter(|e| e.function == 0xb).count(), 3);
            let nc = find(&t, 0x8000_0008, 0);
            assert_eq!(nc.ecx & 0xff, vcpus as u32 - 1);
            assert_eq!(nc.eax, 0x3030, "address sizes kept");
            assert_eq!(find(&t, 0x8000_001e, 0).eax, id as u32);
            let hv = find(&t, HYPERVISOR_LEAF, 0);
            let sig: Vec<u8> = [hv.ebx, hv.ecx, hv.edx].iter().flat_map(|r| r.to_le_bytes()).collect();
            assert_eq!(&sig, KVM_SIGNATURE);
            assert!(hv.eax > HYPERVISOR_LEAF);
        }
    }

    #[test]
    fn lapic_delivery_modes() {
        assert_eq!(with_delivery_mode(0x0001_0000, APIC_MODE_EXTINT), 0x0001_0700);
        assert_eq!(with_delivery_mode(0x0001_0700, APIC_MODE_NMI), 0x0001_0400);
    }

    /// Runs the whole vCPU setup against /dev/kvm and reads the state back.
    #[test]
    fn setup_vcpu_on_kvm() {
        let kvm = Kvm::new().expect("/dev/kvm is needed for this test");
        let vm = kvm.create_vm().unwrap();
        vm.create_irq_chip().unwrap();
        let bsp = vm.create_vcpu(0).unwrap();
        let ap = vm.create_vcpu(1).unwrap();
        let boot = LinuxBoot { entry: 0x10_0200, boot_params: layout::ZERO_PAGE, rsdp: layout::ACPI_RSDP };
        setup_vcpu(&kvm, &bsp, 0, 2, Some(&boot)).unwrap();
        setup_vcpu(&kvm, &ap, 1, 2, None).unwrap();
        assert!(matches!(setup_vcpu(&kvm, &ap, 2, 2, None), Err(LinuxError::Vcpu { id: 2, .. })));

        let regs = bsp.get_regs().unwrap();
        assert_eq!((regs.rip, regs.rsi, regs.rflags), (0x10_0200, layout::ZERO_PAGE, 2));
        let sregs = bsp.get_sregs().unwrap();
        assert_eq!(sregs.cr3, layout::PML4);
        assert_ne!(sregs.efer & EFER_LMA, 0);
        assert_ne!(sregs.cr0 & CR0_PG, 0);
        assert_ne!(sregs.cr4 & CR4_PAE, 0);
        assert_eq!((sregs.cs.selector, sregs.cs.l), (BOOT_CS, 1));
        assert_eq!(sregs.ds.selector, BOOT_DS);
        assert_eq!(sregs.gdt.base, layout::GDT);
        // KVM_GET_FPU on the nested host here reads MXCSR back as 0, so only FCW is checked.
        assert_eq!(bsp.get_fpu().unwrap().fcw, 0x37f);

        for (vcpu, id) in [(&bsp, 0u32), (&ap, 1)] {
            let lapic = vcpu.get_lapic().unwrap();
            assert_eq!((lapic_reg(&lapic.regs, APIC_LVT0) >> 8) & 7, APIC_MODE_EXTINT);
            assert_eq!((lapic_reg(&lapic.regs, APIC_LVT1) >> 8) & 7, APIC_MODE_NMI);
            let cpuid = vcpu.get_cpuid2(KVM_MAX_CPUID_ENTRIES).unwrap();
            let l1 = find(cpuid.as_slice(), 1, 0);
            assert_eq!(l1.ebx >> 24, id);
            assert_ne!(l1.ecx & (1 << 31), 0);
            let mut msrs = Msrs::from_entries(&[kvm_msr_entry { index: msr::IA32_MISC_ENABLE, ..Default::default() }]).unwrap();
            assert_eq!(vcpu.get_msrs(&mut msrs).unwrap(), 1);
            assert_ne!(msrs.as_slice()[0].data & msr::IA32_MISC_ENABLE_FAST_STRING, 0);
        }
        // The AP keeps its reset state: it starts through INIT/SIPI.
        assert_eq!(ap.get_regs().unwrap().rip, 0xfff0);
    }
}
