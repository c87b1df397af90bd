//! Guest RAM: anonymous, private, MAP_NORESERVE mappings through vm-memory, so memory
//! the guest never touches costs the host nothing.

use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use crate::{Error, GuestMemory, Result};

/// Create guest RAM of `bytes` bytes at guest-physical 0 (one region; partitions are
/// limited to `amsvm_abi::layout::MAX_RAM`, below the device window). `huge_pages`: ask
/// the host for transparent huge pages (`MADV_HUGEPAGE`), else for none
/// (`MADV_NOHUGEPAGE`, whatever the host's default), so that memory is counted exactly.
pub fn create(bytes: u64, huge_pages: bool) -> Result<GuestMemory> {
    if bytes == 0 || bytes > amsvm_abi::layout::MAX_RAM || !bytes.is_multiple_of(4096) {
        return Err(Error::Other(format!(
            "guest memory of {bytes} bytes is not a non-zero multiple of 4 KiB below {} MiB",
            amsvm_abi::layout::MAX_RAM >> 20
        )));
    }
    // from_ranges maps anonymous memory with MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE.
    let mem = GuestMemory::from_ranges(&[(GuestAddress(0), bytes as usize)])
        .map_err(|source| Error::GuestMemory { mib: bytes >> 20, source })?;
    let advice = if huge_pages { libc::MADV_HUGEPAGE } else { libc::MADV_NOHUGEPAGE };
    for (addr, len) in host_ranges(&mem) {
        // SAFETY: advice on a mapping `mem` owns; it changes how the kernel backs it, not
        // its contents. A kernel without transparent huge pages refuses (EINVAL): the
        // memory then simply has 4 KiB pages.
        unsafe { libc::madvise(addr as *mut _, len as usize, advice) };
    }
    Ok(mem)
}

/// Host virtual address ranges of guest RAM: `(host address, length)` per region.
pub fn host_ranges(mem: &GuestMemory) -> Vec<(u64, u64)> {
    mem.iter()
        .map(|r| (r.as_ptr() as u64, r.len()))
        .collect()
}

/// Register every region of `mem` with the VM as a memory slot (`dirty_log`: with KVM
/// dirty-page logging).
pub fn register(vm: &kvm_ioctls::VmFd, mem: &GuestMemory, dirty_log: bool) -> Result<()> {
    for (slot, region) in mem.iter().enumerate() {
        let r = kvm_bindings::kvm_userspace_memory_region {
            slot: slot as u32,
            flags: if dirty_log { kvm_bindings::KVM_MEM_LOG_DIRTY_PAGES } else { 0 },
            guest_phys_addr: region.start_addr().0,
            memory_size: region.len(),
            userspace_addr: region.as_ptr() as u64,
        };
        // SAFETY: the region is a live mapping owned by `mem`, which the partition keeps
        // alive for as long as the VM exists (the VM fd is dropped first).
        unsafe { vm.set_user_memory_region(r) }.map_err(Error::kvm("KVM_SET_USER_MEMORY_REGION"))?;
    }
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use vm_memory::Bytes;

    /// Resident pages of each 2 MiB range of `mem`'s region (mincore).
    fn resident_per_range(mem: &GuestMemory) -> Vec<usize> {
        let (addr, len) = host_ranges(mem)[0];
        let mut vec = vec![0u8; (len / 4096) as usize];
        // SAFETY: addr/len describe a live mapping; vec has one byte per page.
        let rc = unsafe { libc::mincore(addr as *mut _, len as usize, vec.as_mut_ptr()) };
        assert_eq!(rc, 0);
        vec.chunks(512).map(|c| c.iter().filter(|b| **b & 1 != 0).count()).collect()
    }

    /// AnonHugePages (kB) of the mapping that holds `addr`, from /proc/self/smaps. The
    /// kernel may have merged it with a neighbouring mapping of the same kind (tests run
    /// in parallel), so this is an upper bound for our own.
    pub(crate) fn anon_huge_kb(addr: u64) -> u64 {
        let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
        let mut inside = false;
        for line in smaps.lines() {
            let range = line.split_once(' ').map(|(r, _)| r).and_then(|r| r.split_once('-'));
            if let Some((lo, hi)) = range.and_then(|(lo, hi)| Some((u64::from_str_radix(lo, 16).ok()?, u64::from_str_radix(hi, 16).ok()?))) {
                inside = (lo..hi).contains(&addr);
            } else if let Some(v) = line.strip_prefix("AnonHugePages:").filter(|_| inside) {
                return v.trim().trim_end_matches("kB").trim().parse().unwrap();
            }
        }
        panic!("no mapping holds {addr:#x}")
    }

    #[test]
    fn untouched_memory_costs_nothing_and_bad_sizes_fail() {
        let mem = create(64 << 20, false).unwrap();
        mem.write_obj(0xabcdu32, GuestAddress(0x1000)).unwrap();
        assert_eq!(mem.read_obj::<u32>(GuestAddress(0x1000)).unwrap(), 0xabcd);
        // mincore: only the page we wrote is resident, whatever the host's THP mode.
        assert_eq!(resident_per_range(&mem).iter().sum::<usize>(), 1, "only the touched page is resident");
        // NOHUGEPAGE mappings merge only with their kind, which has no huge pages either.
        assert_eq!(anon_huge_kb(host_ranges(&mem)[0].0), 0);
        assert!(create(0, false).is_err());
        assert!(create(4095, true).is_err());
        assert!(create(amsvm_abi::layout::MAX_RAM + 4096, true).is_err());
    }

    #[test]
    fn with_huge_pages_a_touch_costs_at_most_its_2_mib_range() {
        let mem = create(64 << 20, true).unwrap();
        let (addr, _) = host_ranges(&mem)[0];
        // Touch one page in ranges 0 and 5; the others stay untouched.
        mem.write_obj(0xabcdu32, GuestAddress(0x1000)).unwrap();
        mem.write_obj(0x1234u32, GuestAddress((5 << 21) + 0x3000)).unwrap();
        assert_eq!(mem.read_obj::<u32>(GuestAddress(0x1000)).unwrap(), 0xabcd);
        assert_eq!(mem.read_obj::<u32>(GuestAddress((5 << 21) + 0x3000)).unwrap(), 0x1234);
        assert_eq!(mem.read_obj::<u32>(GuestAddress(0x2000)).unwrap(), 0, "the rest of a huge page reads as zeros");
        let r = resident_per_range(&mem);
        assert!(r[0] >= 1 && r[5] >= 1, "{r:?}");
        // The kernel aligns a mapping of whole 2 MiB to 2 MiB when it does huge pages;
        // if it did not, a huge page may reach into the next range of ours.
        let aligned = addr.is_multiple_of(2 << 20);
        let near = |i: usize, t: usize| i == t || (!aligned && i.abs_diff(t) == 1);
        assert!(r.iter().enumerate().all(|(i, &n)| n == 0 || near(i, 0) || near(i, 5)), "untouched ranges cost nothing: {r:?}");
        let thp = std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled").is_ok_and(|s| !s.contains("[never]"));
        if thp && aligned {
            // One touch made 512 pages resident: a huge page (anonymous faults do not
            // map neighbours in).
            assert_eq!((r[0], r[5]), (512, 512), "each touched range is one huge page");
            assert!(anon_huge_kb(addr) >= 4096, "{} kB", anon_huge_kb(addr));
        } else if !thp {
            eprintln!("transparent huge pages are off on this host: a touch costs its own page only");
            assert_eq!((r[0], r[5]), (1, 1));
        } else {
            // Huge pages then straddle our 2 MiB ranges: only the bound above holds.
            eprintln!("guest memory is not 2 MiB-aligned here: only untouched ranges were checked");
        }
    }
}
