//! What the pool needs from userfaultfd beyond the `userfaultfd` crate: the MOVE feature
//! (Linux 6.8+) that detaches a resident page from guest memory atomically.

use std::os::fd::AsRawFd;

use userfaultfd::{FeatureFlags, Uffd, UffdBuilder};

/// `UFFD_FEATURE_MOVE` (include/uapi/linux/userfaultfd.h).
const UFFD_FEATURE_MOVE: u64 = 1 << 10;

/// `struct uffdio_move`.
#[repr(C)]
struct UffdioMove {
    dst: u64,
    src: u64,
    len: u64,
    mode: u64,
    moved: i64,
}

const UFFDIO_MOVE_MODE_DONTWAKE: u64 = 1;
/// `_IOWR(0xAA, 0x05, struct uffdio_move)`.
const UFFDIO_MOVE: libc::c_ulong = (3 << 30) | ((std::mem::size_of::<UffdioMove>() as libc::c_ulong) << 16) | (0xAA << 8) | 0x05;

/// Create a userfaultfd for guest memory: faults from kernel mode too (KVM touches guest
/// memory on behalf of the vCPU), non-blocking reads, MOVE enabled; `remove_events`
/// asks for an event when guest memory is discarded (balloon, MADV_DONTNEED).
pub fn create(remove_events: bool) -> Result<Uffd, userfaultfd::Error> {
    let mut features = UFFD_FEATURE_MOVE;
    if remove_events {
        features |= FeatureFlags::EVENT_REMOVE.bits();
    }
    UffdBuilder::new()
        .close_on_exec(true)
        .non_blocking(true)
        .user_mode_only(false)
        .require_features(FeatureFlags::from_bits_retain(features))
        .create()
}

/// Move one page from `src` to `dst` (which must lie in a range registered with `uffd`),
/// without waking anyone. Ok(()) when moved; the errno otherwise (ENOENT: nothing
/// mapped at `src`; EBUSY: the page cannot be moved now, e.g. pinned).
pub fn move_page(uffd: &Uffd, dst: u64, src: u64) -> Result<(), i32> {
    move_range(uffd, dst, src, 4096).map(|_| ()).map_err(|(_, e)| e)
}

/// Move `len` bytes of whole pages from `src` to `dst` with one ioctl (one TLB flush for
/// the range instead of one per page). Ok(len) when all moved; otherwise the bytes moved
/// before the first page that could not be, and its errno.
pub fn move_range(uffd: &Uffd, dst: u64, src: u64, len: u64) -> Result<u64, (u64, i32)> {
    let mut m = UffdioMove { dst, src, len, mode: UFFDIO_MOVE_MODE_DONTWAKE, moved: 0 };
    // SAFETY: UFFDIO_MOVE reads and writes only the struct we pass, which lives for the
    // call; the kernel validates both address ranges against this process's mappings.
    let rc = unsafe { libc::ioctl(uffd.as_raw_fd(), UFFDIO_MOVE, &mut m as *mut UffdioMove) };
    if rc == 0 {
        Ok(len)
    } else {
        let errno = std::io::Error::last_os_error().raw_os_error().unwrap_or(libc::EIO);
        Err((m.moved.max(0) as u64, errno))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use userfaultfd::RegisterMode;

    #[test]
    fn move_detaches_a_page_atomically() {
        let map = |n: usize| {
            // SAFETY: a fresh anonymous private mapping; unmapped at the end of the test.
            let p = unsafe {
                libc::mmap(std::ptr::null_mut(), n, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, -1, 0)
            };
            assert_ne!(p, libc::MAP_FAILED);
            p as *mut u8
        };
        let src = map(8192);
        let dst = map(8192);
        let uffd = create(false).unwrap();
        uffd.register_with_mode(dst.cast(), 8192, RegisterMode::MISSING).unwrap();
        // SAFETY: src is a live mapping of 8 KiB.
        unsafe { src.write_bytes(0x5a, 4096) };
        move_page(&uffd, dst as u64, src as u64).unwrap();
        let mut vec = [0u8; 2];
        // SAFETY: mincore over the live 8 KiB mapping with one byte per page.
        unsafe { libc::mincore(src.cast(), 8192, vec.as_mut_ptr()) };
        assert_eq!(vec[0] & 1, 0, "the source page is gone");
        // SAFETY: the page was just moved to dst, so reading it does not fault.
        assert!(unsafe { std::slice::from_raw_parts(dst, 4096) }.iter().all(|&b| b == 0x5a));
        // Nothing mapped at the second source page.
        assert_eq!(move_page(&uffd, dst as u64 + 4096, src as u64 + 4096), Err(libc::ENOENT));
        // SAFETY: unmapping the mappings made above.
        unsafe {
            libc::munmap(src.cast(), 8192);
            libc::munmap(dst.cast(), 8192);
        }
    }
}
