//! Counting errors in a per-CPU array, indexed by [`ErrorCode`].

use aya_ebpf::maps::PerCpuArray;
use pymedic_common::errors::ErrorCode;

/// Adds one to `code`'s counter in `map` (a per-CPU array of
/// `ErrorCode::COUNT` `u64`s). Per-CPU, so no atomics are needed.
#[inline(always)]
pub fn count(map: &PerCpuArray<u64>, code: ErrorCode) {
    if let Some(slot) = map.get_ptr_mut(code as u32) {
        // SAFETY: `slot` points into this CPU's value of a per-CPU array
        // element; nothing else on this CPU runs concurrently with us.
        unsafe { *slot += 1 };
    }
}
