//! Reading another process's memory.
//!
//! [`ProcessMemory`] is the one seam between CPython decoding and the
//! outside world: [`LiveMemory`] reads a running process with
//! `process_vm_readv(2)` (the target is never stopped; reads may observe a
//! structure mid-update, which callers treat as a retryable
//! inconsistency), and [`FakeMemory`] serves bytes from a map so every
//! decoder is unit-tested without root, from structures built with the
//! layout offsets ([`crate::fake`]) or recorded from a live process
//! ([`RecordingMemory`]).

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::io;

/// Why a read failed.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// The address is not mapped (EFAULT), or only part of it is: usually a
    /// pointer read while the target was changing it.
    #[error("address {addr:#x} ({len} bytes) is not mapped in the target")]
    Unmapped { addr: u64, len: usize },
    #[error("process {pid} exited while being read")]
    Exited { pid: u32 },
    #[error(
        "reading the memory of process {pid} was denied: run as root or grant CAP_SYS_PTRACE \
         (and check /proc/sys/kernel/yama/ptrace_scope)"
    )]
    PermissionDenied { pid: u32 },
    #[error("process_vm_readv({pid}, {addr:#x}, {len}): {source}")]
    Io {
        pid: u32,
        addr: u64,
        len: usize,
        source: io::Error,
    },
}

impl MemoryError {
    /// True when the error means the read raced with the target (retrying a
    /// whole snapshot may succeed), as opposed to the process being gone or
    /// unreadable.
    pub fn is_transient(&self) -> bool {
        matches!(self, MemoryError::Unmapped { .. })
    }
}

/// A source of another process's memory.
pub trait ProcessMemory {
    /// Fills `buf` from `addr`; fails unless every byte could be read.
    fn read(&self, addr: u64, buf: &mut [u8]) -> Result<(), MemoryError>;

    /// `len` bytes at `addr`.
    fn read_vec(&self, addr: u64, len: usize) -> Result<Vec<u8>, MemoryError> {
        let mut v = vec![0; len];
        self.read(addr, &mut v)?;
        Ok(v)
    }

    fn read_u64(&self, addr: u64) -> Result<u64, MemoryError> {
        let mut b = [0; 8];
        self.read(addr, &mut b)?;
        Ok(u64::from_le_bytes(b))
    }

    fn read_u32(&self, addr: u64) -> Result<u32, MemoryError> {
        let mut b = [0; 4];
        self.read(addr, &mut b)?;
        Ok(u32::from_le_bytes(b))
    }

    fn read_i32(&self, addr: u64) -> Result<i32, MemoryError> {
        Ok(self.read_u32(addr)? as i32)
    }

    fn read_u8(&self, addr: u64) -> Result<u8, MemoryError> {
        let mut b = [0; 1];
        self.read(addr, &mut b)?;
        Ok(b[0])
    }
}

impl<M: ProcessMemory + ?Sized> ProcessMemory for &M {
    fn read(&self, addr: u64, buf: &mut [u8]) -> Result<(), MemoryError> {
        (**self).read(addr, buf)
    }
}

/// Little-endian field access into a structure read in one go.
pub trait Bytes {
    fn u64_at(&self, off: u32) -> u64;
    fn u32_at(&self, off: u32) -> u32;
    fn i32_at(&self, off: u32) -> i32 {
        self.u32_at(off) as i32
    }
    fn i64_at(&self, off: u32) -> i64 {
        self.u64_at(off) as i64
    }
    fn u8_at(&self, off: u32) -> u8;
}

impl Bytes for [u8] {
    fn u64_at(&self, off: u32) -> u64 {
        let o = off as usize;
        self.get(o..o + 8)
            .map(|b| u64::from_le_bytes(b.try_into().unwrap_or_default()))
            .unwrap_or(0)
    }
    fn u32_at(&self, off: u32) -> u32 {
        let o = off as usize;
        self.get(o..o + 4)
            .map(|b| u32::from_le_bytes(b.try_into().unwrap_or_default()))
            .unwrap_or(0)
    }
    fn u8_at(&self, off: u32) -> u8 {
        self.get(off as usize).copied().unwrap_or(0)
    }
}

/// A live process, read with `process_vm_readv(2)`: needs the same
/// permission as ptrace-attaching (root, or CAP_SYS_PTRACE) but never
/// stops the target.
#[derive(Clone, Debug)]
pub struct LiveMemory {
    pid: u32,
}

impl LiveMemory {
    pub fn new(pid: u32) -> LiveMemory {
        LiveMemory { pid }
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }
}

impl ProcessMemory for LiveMemory {
    fn read(&self, addr: u64, buf: &mut [u8]) -> Result<(), MemoryError> {
        if buf.is_empty() {
            return Ok(());
        }
        let local = libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        };
        let remote = libc::iovec {
            iov_base: addr as *mut libc::c_void,
            iov_len: buf.len(),
        };
        // SAFETY: `local` describes `buf`, which we own mutably for the
        // whole call and whose length is `iov_len`; the kernel validates
        // `remote` against the target's address space and never touches
        // ours beyond `local`.
        let n =
            unsafe { libc::process_vm_readv(self.pid as libc::pid_t, &local, 1, &remote, 1, 0) };
        if n == buf.len() as isize {
            return Ok(());
        }
        if n >= 0 {
            return Err(MemoryError::Unmapped {
                addr,
                len: buf.len(),
            });
        }
        let e = io::Error::last_os_error();
        Err(match e.raw_os_error() {
            Some(libc::EFAULT) | Some(libc::EINVAL) | Some(libc::EIO) => MemoryError::Unmapped {
                addr,
                len: buf.len(),
            },
            Some(libc::ESRCH) => MemoryError::Exited { pid: self.pid },
            Some(libc::EPERM) | Some(libc::EACCES) => {
                MemoryError::PermissionDenied { pid: self.pid }
            }
            _ => MemoryError::Io {
                pid: self.pid,
                addr,
                len: buf.len(),
                source: e,
            },
        })
    }
}

/// Memory served from a map of regions: built by [`crate::fake`] or
/// replayed from [`RecordingMemory`]. Reads spanning unknown bytes fail as
/// unmapped.
#[derive(Clone, Debug, Default)]
pub struct FakeMemory {
    regions: BTreeMap<u64, Vec<u8>>,
}

impl FakeMemory {
    pub fn new() -> FakeMemory {
        FakeMemory::default()
    }

    /// Adds (or overwrites) bytes at `addr`. Regions must not overlap.
    pub fn insert(&mut self, addr: u64, bytes: Vec<u8>) {
        self.regions.insert(addr, bytes);
    }

    /// Mutable access to the region starting exactly at `addr`.
    pub fn region_mut(&mut self, addr: u64) -> Option<&mut Vec<u8>> {
        self.regions.get_mut(&addr)
    }

    /// Serialises the regions (`addr u64, len u32, bytes` repeated, little
    /// endian): the fixture format of recorded snapshots.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        for (addr, bytes) in &self.regions {
            out.extend_from_slice(&addr.to_le_bytes());
            out.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
            out.extend_from_slice(bytes);
        }
        out
    }

    /// Parses [`FakeMemory::to_bytes`] output.
    pub fn from_bytes(mut data: &[u8]) -> Option<FakeMemory> {
        let mut m = FakeMemory::new();
        while !data.is_empty() {
            let addr = u64::from_le_bytes(data.get(..8)?.try_into().ok()?);
            let len = u32::from_le_bytes(data.get(8..12)?.try_into().ok()?) as usize;
            let bytes = data.get(12..12 + len)?.to_vec();
            m.insert(addr, bytes);
            data = &data[12 + len..];
        }
        Some(m)
    }
}

impl ProcessMemory for FakeMemory {
    fn read(&self, addr: u64, buf: &mut [u8]) -> Result<(), MemoryError> {
        let unmapped = MemoryError::Unmapped {
            addr,
            len: buf.len(),
        };
        let Some((start, bytes)) = self.regions.range(..=addr).next_back() else {
            return Err(unmapped);
        };
        let off = (addr - start) as usize;
        match bytes.get(off..off + buf.len()) {
            Some(src) => {
                buf.copy_from_slice(src);
                Ok(())
            }
            None => Err(unmapped),
        }
    }
}

/// Wraps a memory source and remembers every successful read, so a live
/// snapshot can be saved as a fixture and replayed by [`FakeMemory`].
pub struct RecordingMemory<M> {
    inner: M,
    seen: RefCell<FakeMemory>,
}

impl<M: ProcessMemory> RecordingMemory<M> {
    pub fn new(inner: M) -> Self {
        RecordingMemory {
            inner,
            seen: RefCell::new(FakeMemory::new()),
        }
    }

    /// Everything read so far. Overlapping reads are merged into regions.
    pub fn recorded(&self) -> FakeMemory {
        let seen = self.seen.borrow();
        let mut merged: Vec<(u64, Vec<u8>)> = Vec::new();
        for (&addr, bytes) in &seen.regions {
            if let Some((start, buf)) = merged.last_mut() {
                let end = *start + buf.len() as u64;
                if addr <= end {
                    let skip = (end - addr) as usize;
                    if skip < bytes.len() {
                        buf.extend_from_slice(&bytes[skip..]);
                    }
                    continue;
                }
            }
            merged.push((addr, bytes.clone()));
        }
        let mut out = FakeMemory::new();
        for (a, b) in merged {
            out.insert(a, b);
        }
        out
    }
}

impl<M: ProcessMemory> ProcessMemory for RecordingMemory<M> {
    fn read(&self, addr: u64, buf: &mut [u8]) -> Result<(), MemoryError> {
        self.inner.read(addr, buf)?;
        let mut seen = self.seen.borrow_mut();
        let longer = seen
            .regions
            .get(&addr)
            .is_some_and(|b| b.len() >= buf.len());
        if !longer {
            seen.insert(addr, buf.to_vec());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fake_reads_inside_regions_only() {
        let mut m = FakeMemory::new();
        m.insert(0x1000, (0u8..16).collect());
        assert_eq!(
            m.read_u32(0x1004).unwrap(),
            u32::from_le_bytes([4, 5, 6, 7])
        );
        assert!(m.read_u64(0x100c).is_err());
        assert!(m.read_u8(0xfff).is_err());
        let back = FakeMemory::from_bytes(&m.to_bytes()).unwrap();
        assert_eq!(back.read_u8(0x100f).unwrap(), 15);
    }

    #[test]
    fn live_reads_own_memory_and_names_failures() {
        let value: u64 = 0xdead_beef_cafe;
        let mem = LiveMemory::new(std::process::id());
        assert_eq!(mem.read_u64(&value as *const u64 as u64).unwrap(), value);
        let err = mem.read_u64(8).unwrap_err();
        assert!(err.is_transient(), "{err}");
        let gone = LiveMemory::new(u32::MAX - 7).read_u64(0x1000).unwrap_err();
        assert!(matches!(gone, MemoryError::Exited { .. }), "{gone}");
    }

    #[test]
    fn recording_replays() {
        let data: [u8; 32] = std::array::from_fn(|i| i as u8);
        let rec = RecordingMemory::new(LiveMemory::new(std::process::id()));
        let base = data.as_ptr() as u64;
        rec.read_vec(base, 8).unwrap();
        rec.read_vec(base + 4, 8).unwrap();
        let fake = rec.recorded();
        assert_eq!(fake.read_vec(base, 12).unwrap(), data[..12].to_vec());
    }
}
