//! virtio-blk requests: from an untrusted descriptor chain to a validated [`Request`], and
//! its execution against the disk file.
//!
//! A request is a byte stream split over descriptors (virtio 1.x: the framing does not
//! depend on descriptor boundaries):
//!
//! ```text
//! device-readable:  le32 type | le32 reserved | le64 sector | data (OUT) or segments (DISCARD, WRITE_ZEROES)
//! device-writable:  data (IN, GET_ID) | u8 status
//! ```
//!
//! The walk over the chain checks every descriptor against guest memory and the
//! readable-before-writable order, and bounds the number of descriptors. The status byte
//! is the last byte of the last device-writable descriptor; when there is none (or it is
//! outside guest memory) the chain is returned with used length 0 and no status.

use std::fs::File;
use std::io;
use std::os::unix::io::AsRawFd;

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_FLUSH,
    VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_WRITE_ZEROES,
    VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
};
use virtio_queue::DescriptorChain;
use vm_memory::bitmap::BitmapSlice;
use vm_memory::{
    Bytes, GuestAddress, GuestMemoryBackend, ReadVolatile, VolatileMemoryError, VolatileSlice, WriteVolatile,
};

use super::device::Disk;
use super::metrics::BlockMetrics;
use super::{
    ID_BYTES, MAX_CHAIN_DESCRIPTORS, MAX_DISCARD_SECTORS, MAX_DISCARD_SEG, MAX_REQUEST_BYTES,
    MAX_WRITE_ZEROES_SECTORS, MAX_WRITE_ZEROES_SEG, SECTOR_SHIFT, SECTOR_SIZE,
};
use crate::devices::virtio::guest_caused_warning;
use crate::GuestMemory;

/// Size of the request header (type, reserved, sector).
pub(super) const HEADER_SIZE: u64 = 16;
/// Size of one DISCARD / WRITE_ZEROES segment (sector, num_sectors, flags).
pub(super) const SEGMENT_DESC_SIZE: u64 = 16;

/// A piece of guest memory named by one descriptor, checked to lie inside guest memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Segment {
    pub addr: GuestAddress,
    pub len: u64,
}

/// A byte stream over several segments of guest memory.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(super) struct Segments {
    segs: Vec<Segment>,
    len: u64,
}

impl Segments {
    fn push(&mut self, addr: GuestAddress, len: u64) {
        if len > 0 {
            self.segs.push(Segment { addr, len });
            self.len += len;
        }
    }

    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn iter(&self) -> impl Iterator<Item = &Segment> {
        self.segs.iter()
    }

    /// Bytes `[start, start + len)` of the stream (clipped to its end).
    fn slice(&self, start: u64, len: u64) -> Segments {
        let mut out = Segments::default();
        let (mut skip, mut want) = (start, len);
        for s in &self.segs {
            if want == 0 {
                break;
            }
            if skip >= s.len {
                skip -= s.len;
                continue;
            }
            let n = (s.len - skip).min(want);
            // In range: the segment was checked inside guest memory, skip < s.len.
            out.push(GuestAddress(s.addr.0 + skip), n);
            want -= n;
            skip = 0;
        }
        out
    }

    /// Fill `buf` from the start of the stream.
    fn read(&self, mem: &GuestMemory, buf: &mut [u8]) -> Result<(), vm_memory::GuestMemoryError> {
        let mut done = 0usize;
        for s in &self.segs {
            if done == buf.len() {
                break;
            }
            let n = (buf.len() - done).min(s.len as usize);
            mem.read_slice(&mut buf[done..done + n], s.addr)?;
            done += n;
        }
        Ok(())
    }

    /// Write `data` at the start of the stream.
    fn write(&self, mem: &GuestMemory, data: &[u8]) -> Result<(), vm_memory::GuestMemoryError> {
        let mut done = 0usize;
        for s in &self.segs {
            if done == data.len() {
                break;
            }
            let n = (data.len() - done).min(s.len as usize);
            mem.write_slice(&data[done..done + n], s.addr)?;
            done += n;
        }
        Ok(())
    }
}

/// Why a chain was rejected as malformed. Each reason has a counter.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Malformed {
    OutOfMemory,
    WrongDirection,
    TooShort,
    TooLarge,
    BadLength,
    OutOfRange,
    BrokenChain,
}

impl Malformed {
    fn count(self, m: &BlockMetrics) {
        BlockMetrics::inc(&m.rejected_chains);
        BlockMetrics::inc(match self {
            Malformed::OutOfMemory => &m.rejected_out_of_memory,
            Malformed::WrongDirection => &m.rejected_wrong_direction,
            Malformed::TooShort => &m.rejected_too_short,
            Malformed::TooLarge => &m.rejected_too_large,
            Malformed::BadLength => &m.rejected_bad_length,
            Malformed::OutOfRange => &m.rejected_out_of_range,
            Malformed::BrokenChain => &m.rejected_broken_chain,
        });
    }
}

/// The chain, split into its readable and writable streams.
#[derive(Debug, Default)]
pub(super) struct Walk {
    pub readable: Segments,
    /// Writable stream without the status byte.
    pub writable: Segments,
    pub status: Option<GuestAddress>,
    pub error: Option<Malformed>,
}

impl Walk {
    pub fn of(chain: DescriptorChain<&GuestMemory>, mem: &GuestMemory) -> Walk {
        let mut w = Walk::default();
        let mut writable = Segments::default();
        let mut seen_writable = false;
        let mut count = 0usize;
        let mut last_has_next = false;
        for (n, desc) in chain.enumerate() {
            count = n + 1;
            last_has_next = desc.has_next();
            if n >= MAX_CHAIN_DESCRIPTORS {
                // Stop walking: where the status byte is stays unknown.
                w.error = Some(Malformed::TooLarge);
                w.status = None;
                return w;
            }
            let (addr, len) = (desc.addr(), u64::from(desc.len()));
            let in_mem = addr.0.checked_add(len).is_some() && mem.check_range(addr, len as usize);
            if desc.is_write_only() {
                seen_writable = true;
                if len > 0 {
                    // The last byte of the last writable descriptor is the status.
                    w.status = in_mem.then(|| GuestAddress(addr.0 + len - 1));
                }
                if in_mem {
                    writable.push(addr, len);
                } else {
                    w.error.get_or_insert(Malformed::OutOfMemory);
                }
            } else {
                if seen_writable {
                    w.error.get_or_insert(Malformed::WrongDirection);
                }
                if in_mem {
                    w.readable.push(addr, len);
                } else {
                    w.error.get_or_insert(Malformed::OutOfMemory);
                }
            }
        }
        if count == 0 || last_has_next {
            // The iterator stopped on an error it does not report: the chain is cut
            // short and its real last descriptor (the status) is unknown.
            w.error.get_or_insert(Malformed::BrokenChain);
            w.status = None;
        }
        w.writable = writable.slice(0, writable.len().saturating_sub(1));
        w
    }
}

/// One DISCARD or WRITE_ZEROES segment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Range {
    pub sector: u64,
    pub num_sectors: u32,
    pub unmap: bool,
}

/// A validated request.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Request {
    In { sector: u64, data: Segments },
    Out { sector: u64, data: Segments },
    Flush,
    GetId { data: Segments },
    Discard(Vec<Range>),
    WriteZeroes(Vec<Range>),
}

/// Why a well-formed or malformed chain is not executed.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Refusal {
    Malformed(Malformed),
    /// A write to a read-only device: IOERR.
    ReadOnly,
    /// Unknown request type or flags: UNSUPP.
    Unsupported,
}

impl From<Malformed> for Refusal {
    fn from(m: Malformed) -> Self {
        Refusal::Malformed(m)
    }
}

/// Check that `len` bytes starting at `sector` lie within `capacity` sectors.
fn check_range(sector: u64, len: u64, capacity: u64) -> Result<(), Malformed> {
    let end = sector.checked_add(len >> SECTOR_SHIFT).ok_or(Malformed::OutOfRange)?;
    if end > capacity {
        return Err(Malformed::OutOfRange);
    }
    Ok(())
}

fn check_data_len(len: u64) -> Result<(), Malformed> {
    if !len.is_multiple_of(SECTOR_SIZE) {
        return Err(Malformed::BadLength);
    }
    if len > MAX_REQUEST_BYTES {
        return Err(Malformed::TooLarge);
    }
    Ok(())
}

impl Request {
    fn kind(&self) -> &'static str {
        match self {
            Request::In { .. } => "read",
            Request::Out { .. } => "write",
            Request::Flush => "flush",
            Request::GetId { .. } => "get-id",
            Request::Discard(_) => "discard",
            Request::WriteZeroes(_) => "write-zeroes",
        }
    }

    /// Validate the walked chain against the disk geometry.
    pub fn parse(walk: &Walk, mem: &GuestMemory, capacity: u64, read_only: bool) -> Result<Request, Refusal> {
        if let Some(e) = walk.error {
            return Err(e.into());
        }
        if walk.readable.len() < HEADER_SIZE {
            return Err(Malformed::TooShort.into());
        }
        let mut header = [0u8; HEADER_SIZE as usize];
        walk.readable.read(mem, &mut header).map_err(|_| Malformed::OutOfMemory)?;
        let req_type = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
        let mut s = [0u8; 8];
        s.copy_from_slice(&header[8..16]);
        let sector = u64::from_le_bytes(s);
        let data_in = walk.readable.slice(HEADER_SIZE, walk.readable.len() - HEADER_SIZE);
        let data_out = &walk.writable;

        match req_type {
            VIRTIO_BLK_T_IN => {
                if !data_in.is_empty() {
                    return Err(Malformed::WrongDirection.into());
                }
                check_data_len(data_out.len())?;
                check_range(sector, data_out.len(), capacity)?;
                Ok(Request::In { sector, data: data_out.clone() })
            }
            VIRTIO_BLK_T_OUT => {
                if !data_out.is_empty() {
                    return Err(Malformed::WrongDirection.into());
                }
                check_data_len(data_in.len())?;
                check_range(sector, data_in.len(), capacity)?;
                if read_only {
                    return Err(Refusal::ReadOnly);
                }
                Ok(Request::Out { sector, data: data_in })
            }
            VIRTIO_BLK_T_FLUSH => {
                if !data_in.is_empty() || !data_out.is_empty() {
                    return Err(Malformed::BadLength.into());
                }
                Ok(Request::Flush)
            }
            VIRTIO_BLK_T_GET_ID => {
                if !data_in.is_empty() {
                    return Err(Malformed::WrongDirection.into());
                }
                if data_out.len() < ID_BYTES as u64 {
                    return Err(Malformed::TooShort.into());
                }
                Ok(Request::GetId { data: data_out.clone() })
            }
            VIRTIO_BLK_T_DISCARD | VIRTIO_BLK_T_WRITE_ZEROES => {
                let discard = req_type == VIRTIO_BLK_T_DISCARD;
                if !data_out.is_empty() {
                    return Err(Malformed::WrongDirection.into());
                }
                let len = data_in.len();
                if len == 0 || !len.is_multiple_of(SEGMENT_DESC_SIZE) {
                    return Err(Malformed::BadLength.into());
                }
                let (max_seg, max_sectors) = if discard {
                    (MAX_DISCARD_SEG, MAX_DISCARD_SECTORS)
                } else {
                    (MAX_WRITE_ZEROES_SEG, MAX_WRITE_ZEROES_SECTORS)
                };
                if len / SEGMENT_DESC_SIZE > u64::from(max_seg) {
                    return Err(Malformed::TooLarge.into());
                }
                // At most max_seg * 16 bytes: a small bounded buffer.
                let mut raw = vec![0u8; len as usize];
                data_in.read(mem, &mut raw).map_err(|_| Malformed::OutOfMemory)?;
                let mut ranges = Vec::with_capacity(raw.len() / SEGMENT_DESC_SIZE as usize);
                for seg in raw.chunks_exact(SEGMENT_DESC_SIZE as usize) {
                    let mut s = [0u8; 8];
                    s.copy_from_slice(&seg[0..8]);
                    let r_sector = u64::from_le_bytes(s);
                    let num_sectors = u32::from_le_bytes([seg[8], seg[9], seg[10], seg[11]]);
                    let flags = u32::from_le_bytes([seg[12], seg[13], seg[14], seg[15]]);
                    // The unmap flag only exists for WRITE_ZEROES; unknown flags: UNSUPP
                    // (virtio 1.2, 5.2.6.2).
                    let known = if discard { 0 } else { VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP };
                    if flags & !known != 0 {
                        return Err(Refusal::Unsupported);
                    }
                    if num_sectors > max_sectors {
                        return Err(Malformed::TooLarge.into());
                    }
                    check_range(r_sector, u64::from(num_sectors) << SECTOR_SHIFT, capacity)?;
                    ranges.push(Range {
                        sector: r_sector,
                        num_sectors,
                        unmap: flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0,
                    });
                }
                if read_only {
                    return Err(Refusal::ReadOnly);
                }
                Ok(if discard { Request::Discard(ranges) } else { Request::WriteZeroes(ranges) })
            }
            _ => Err(Refusal::Unsupported),
        }
    }

    /// Execute the request. Returns the number of bytes written into guest memory
    /// (excluding the status byte).
    pub fn execute(
        &self,
        disk: &Disk,
        mem: &GuestMemory,
        m: &BlockMetrics,
        writethrough: bool,
    ) -> io::Result<u32> {
        match self {
            Request::In { sector, data } => {
                let mut at = FileAt { file: &disk.file, offset: sector << SECTOR_SHIFT };
                for s in data.iter() {
                    mem.read_exact_volatile_from(s.addr, &mut at, s.len as usize).map_err(mem_err)?;
                }
                BlockMetrics::inc(&m.reads);
                BlockMetrics::add(&m.read_bytes, data.len());
                // data.len() <= MAX_REQUEST_BYTES, far below u32::MAX.
                Ok(data.len() as u32)
            }
            Request::Out { sector, data } => {
                let mut at = FileAt { file: &disk.file, offset: sector << SECTOR_SHIFT };
                for s in data.iter() {
                    mem.write_all_volatile_to(s.addr, &mut at, s.len as usize).map_err(mem_err)?;
                }
                if writethrough {
                    disk.file.sync_data()?;
                }
                BlockMetrics::inc(&m.writes);
                BlockMetrics::add(&m.write_bytes, data.len());
                Ok(0)
            }
            Request::Flush => {
                disk.file.sync_data()?;
                BlockMetrics::inc(&m.flushes);
                Ok(0)
            }
            Request::GetId { data } => {
                data.write(mem, &disk.id).map_err(mem_err)?;
                BlockMetrics::inc(&m.get_ids);
                Ok(ID_BYTES as u32)
            }
            Request::Discard(ranges) => {
                for r in ranges {
                    let (off, len) = (r.sector << SECTOR_SHIFT, u64::from(r.num_sectors) << SECTOR_SHIFT);
                    match fallocate(
                        &disk.file,
                        libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                        off,
                        len,
                    ) {
                        Ok(()) => BlockMetrics::add(&m.discard_bytes, len),
                        // Discard is a hint: a host that cannot punch holes keeps the data.
                        Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => {
                            BlockMetrics::inc(&m.discard_unsupported_by_host)
                        }
                        Err(e) => return Err(e),
                    }
                }
                BlockMetrics::inc(&m.discards);
                Ok(0)
            }
            Request::WriteZeroes(ranges) => {
                for r in ranges {
                    let (off, len) = (r.sector << SECTOR_SHIFT, u64::from(r.num_sectors) << SECTOR_SHIFT);
                    zero_range(&disk.file, off, len, r.unmap)?;
                    BlockMetrics::add(&m.zeroed_bytes, len);
                }
                if writethrough {
                    disk.file.sync_data()?;
                }
                BlockMetrics::inc(&m.write_zeroes);
                Ok(0)
            }
        }
    }
}

/// The error the fault campaign injects into this request's host I/O, if any (paging
/// devices only; see [`crate::faults`]).
fn injected(disk: &Disk, req: &Request) -> Option<io::Error> {
    if !disk.paging {
        return None;
    }
    let io = match req {
        Request::In { .. } => crate::faults::PagingIo::Read,
        Request::Out { .. } | Request::WriteZeroes(_) => crate::faults::PagingIo::Write,
        Request::Flush | Request::GetId { .. } | Request::Discard(_) => return None,
    };
    crate::faults::get().paging_io(io)
}

fn mem_err(e: vm_memory::GuestMemoryError) -> io::Error {
    match e {
        vm_memory::GuestMemoryError::IOError(e) => e,
        other => io::Error::other(other),
    }
}

/// Handle one chain: validate, execute, write the status. Returns the used length (bytes
/// written into the chain, status included; 0 when no status could be written).
pub(super) fn process_chain(
    disk: &Disk,
    mem: &GuestMemory,
    chain: DescriptorChain<&GuestMemory>,
    m: &BlockMetrics,
    writethrough: bool,
) -> u32 {
    let walk = Walk::of(chain, mem);
    let Some(status_addr) = walk.status else {
        // Nowhere to report: count it, return the chain untouched.
        walk.error.unwrap_or(Malformed::TooShort).count(m);
        BlockMetrics::inc(&m.no_status_chains);
        return 0;
    };
    let (status, written) = match Request::parse(&walk, mem, disk.capacity, disk.read_only) {
        Ok(req) => match injected(disk, &req).map_or_else(|| req.execute(disk, mem, m, writethrough), Err) {
            Ok(n) => (VIRTIO_BLK_S_OK, n),
            Err(e) => {
                let n = m.io_errors.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                guest_caused_warning(
                    n,
                    format_args!("virtio-blk {}: {} failed: {e}", disk.path.display(), req.kind()),
                );
                (VIRTIO_BLK_S_IOERR, 0)
            }
        },
        Err(Refusal::Malformed(e)) => {
            e.count(m);
            tracing::debug!("virtio-blk {}: rejected malformed chain: {e:?}", disk.path.display());
            (VIRTIO_BLK_S_IOERR, 0)
        }
        Err(Refusal::ReadOnly) => {
            BlockMetrics::inc(&m.read_only_rejections);
            (VIRTIO_BLK_S_IOERR, 0)
        }
        Err(Refusal::Unsupported) => {
            BlockMetrics::inc(&m.unsupported);
            (VIRTIO_BLK_S_UNSUPP, 0)
        }
    };
    // The status address was checked inside guest memory during the walk.
    if mem.write_obj(status as u8, status_addr).is_err() {
        BlockMetrics::inc(&m.no_status_chains);
        return 0;
    }
    written + 1
}

/// A position in the disk file, usable as source and sink of vm-memory volatile copies:
/// pread/pwrite go straight between the file and guest memory.
struct FileAt<'a> {
    file: &'a File,
    offset: u64,
}

fn off_t(offset: u64) -> Result<libc::off_t, VolatileMemoryError> {
    libc::off_t::try_from(offset)
        .map_err(|_| VolatileMemoryError::IOError(io::Error::from_raw_os_error(libc::EOVERFLOW)))
}

impl ReadVolatile for FileAt<'_> {
    /// Fill `buf` from the file (looping over short reads); fewer bytes only at EOF.
    fn read_volatile<B: BitmapSlice>(
        &mut self,
        buf: &mut VolatileSlice<B>,
    ) -> Result<usize, VolatileMemoryError> {
        let guard = buf.ptr_guard_mut();
        let base = guard.as_ptr();
        let len = buf.len();
        let mut done = 0usize;
        while done < len {
            let off = off_t(self.offset)?;
            // SAFETY: `base..base + len` is the host mapping of guest memory described by
            // `buf`, kept mapped by `guard` for the whole call; `done < len`, so the
            // destination `base + done` with `len - done` bytes stays inside it. The fd
            // is valid: it belongs to the borrowed `File`.
            let n = unsafe {
                libc::pread(self.file.as_raw_fd(), base.add(done).cast::<libc::c_void>(), len - done, off)
            };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                buf.bitmap().mark_dirty(0, len);
                return Err(VolatileMemoryError::IOError(e));
            }
            if n == 0 {
                break;
            }
            // 0 < n <= len - done.
            done += n as usize;
            self.offset += n as u64;
        }
        buf.bitmap().mark_dirty(0, done);
        Ok(done)
    }
}

impl WriteVolatile for FileAt<'_> {
    /// Write all of `buf` to the file (looping over short writes).
    fn write_volatile<B: BitmapSlice>(
        &mut self,
        buf: &VolatileSlice<B>,
    ) -> Result<usize, VolatileMemoryError> {
        let guard = buf.ptr_guard();
        let base = guard.as_ptr();
        let len = buf.len();
        let mut done = 0usize;
        while done < len {
            let off = off_t(self.offset)?;
            // SAFETY: `base..base + len` is the host mapping of guest memory described by
            // `buf`, kept mapped by `guard`; `done < len`, so the source `base + done` with
            // `len - done` bytes stays inside it. The fd belongs to the borrowed `File`.
            let n = unsafe {
                libc::pwrite(self.file.as_raw_fd(), base.add(done).cast::<libc::c_void>(), len - done, off)
            };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(VolatileMemoryError::IOError(e));
            }
            if n == 0 {
                return Err(VolatileMemoryError::IOError(io::ErrorKind::WriteZero.into()));
            }
            done += n as usize;
            self.offset += n as u64;
        }
        Ok(done)
    }
}

fn fallocate(file: &File, mode: libc::c_int, offset: u64, len: u64) -> io::Result<()> {
    if len == 0 {
        return Ok(());
    }
    let off = libc::off_t::try_from(offset).map_err(|_| io::Error::from_raw_os_error(libc::EOVERFLOW))?;
    let len = libc::off_t::try_from(len).map_err(|_| io::Error::from_raw_os_error(libc::EOVERFLOW))?;
    loop {
        // SAFETY: plain syscall on a valid fd owned by `file`; no memory is passed.
        let rc = unsafe { libc::fallocate(file.as_raw_fd(), mode, off, len) };
        if rc == 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// Make `[offset, offset + len)` of the file read as zeros: in place if the host can
/// (punching a hole when `unmap` allows deallocation), else by writing zeros.
fn zero_range(file: &File, offset: u64, len: u64, unmap: bool) -> io::Result<()> {
    let keep = libc::FALLOC_FL_KEEP_SIZE;
    if unmap && fallocate(file, libc::FALLOC_FL_PUNCH_HOLE | keep, offset, len).is_ok() {
        return Ok(());
    }
    match fallocate(file, libc::FALLOC_FL_ZERO_RANGE | keep, offset, len) {
        Ok(()) => return Ok(()),
        Err(e) if matches!(e.raw_os_error(), Some(libc::EOPNOTSUPP) | Some(libc::EINVAL)) => {}
        Err(e) => return Err(e),
    }
    // Fallback: write zeros. len <= MAX_WRITE_ZEROES_SECTORS sectors (MAX_REQUEST_BYTES).
    use std::os::unix::fs::FileExt;
    const CHUNK: usize = 64 * 1024;
    let zeros = vec![0u8; CHUNK];
    let mut done = 0u64;
    while done < len {
        let n = (len - done).min(CHUNK as u64) as usize;
        file.write_all_at(&zeros[..n], offset + done)?;
        done += n as u64;
    }
    Ok(())
}
