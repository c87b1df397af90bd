//! Guest RAM: anonymous, private, MAP_NORESERVE mappings through vm-memory, so memory
//! the guest never touches costs the host nothing.

use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use crate::{Error, GuestMemory, Result};

/// Create guest RAM of `bytes` bytes at guest-physical 0 (one region; partitions are
/// limited to `amsvm_abi::layout::MAX_RAM`, below the device window).
pub fn create(bytes: u64) -> Result<GuestMemory> {
    if bytes == 0 || bytes > amsvm_abi::layout::MAX_RAM || !bytes.is_multiple_of(4096) {
        return Err(Error::Other(format!(
            "guest memory of {bytes} bytes is not a non-zero multiple of 4 KiB below {} MiB",
            amsvm_abi::layout::MAX_RAM >> 20
        )));
    }
    // from_ranges maps anonymous memory with MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE.
    GuestMemory::from_ranges(&[(GuestAddress(0), bytes as usize)])
        .map_err(|source| Error::GuestMemory { mib: bytes >> 20, source })
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
mod tests {
    use super::*;
    use vm_memory::Bytes;

    #[test]
    fn untouched_memory_costs_nothing_and_bad_sizes_fail() {
        let mem = create(64 << 20).unwrap();
        mem.write_obj(0xabcdu32, GuestAddress(0x1000)).unwrap();
        assert_eq!(mem.read_obj::<u32>(GuestAddress(0x1000)).unwrap(), 0xabcd);
        let (addr, len) = host_ranges(&mem)[0];
        // mincore: only the page we wrote is resident.
        let pages = (len / 4096) as usize;
        let mut vec = vec![0u8; pages];
        // SAFETY: addr/len describe a live mapping; vec has one byte per page.
        let rc = unsafe { libc::mincore(addr as *mut _, len as usize, vec.as_mut_ptr()) };
        assert_eq!(rc, 0);
        let resident = vec.iter().filter(|b| **b & 1 != 0).count();
        assert_eq!(resident, 1, "only the touched page is resident");
        assert!(create(0).is_err());
        assert!(create(4095).is_err());
        assert!(create(amsvm_abi::layout::MAX_RAM + 4096).is_err());
    }
}
