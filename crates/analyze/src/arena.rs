//! A bump arena for syntax trees: a file's tree is allocated by bumping a
//! pointer, read by the extraction, and then thrown away whole, without
//! dropping it node by node.
//!
//! On the standard library, dropping the trees took 3 % of `analyze`'s
//! instructions and allocating their nodes from the general allocator most
//! of its 8 %. [`ParseArena`] wraps the process's global allocator; while a
//! thread is inside [`in_arena`]'s parse step, its allocations come from a
//! slot of one reserved address range, and everything else is passed on.
//!
//! The rules that keep it sound:
//! * only the parse runs in arena mode; the reading step (which builds the
//!   facts that outlive the file) allocates normally, and the tree is
//!   forgotten before the slot is reused;
//! * what the reading step keeps must not share memory with the tree: the
//!   parser's long names are shared buffers, so the facts' copies are
//!   detached ([`crate::detach`]) before it returns;
//! * freeing an arena pointer is a no-op (the last allocation is rolled
//!   back), so a tree dropped by other means stays valid;
//! * a slot whose parse panicked is never reused (the panic's payload may
//!   live in it), a parse that outgrows its slot falls back to the general
//!   allocator and its tree is then dropped normally, and without
//!   [`ParseArena`] installed, or with every slot busy, trees are dropped
//!   as usual.

use std::alloc::{GlobalAlloc, Layout};
use std::cell::Cell;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};

/// At most this many slots, one per thread parsing at a time (a bit each
/// in [`FREE`]); [`reserve`] makes two per CPU.
const SLOTS: usize = 64;
/// Address space per slot: far more than the largest file's tree (the
/// standard library's largest needs ~20 MiB); a bigger one falls back.
const SLOT_BYTES: usize = 256 << 20;
/// Memory is made accessible in steps of this size as a slot fills.
const COMMIT_STEP: usize = 4 << 20;

/// Start of the reserved range; 0 before it is reserved, 1 if that failed.
static BASE: AtomicUsize = AtomicUsize::new(0);
/// Length of the reserved range (set before [`BASE`]).
static RESERVED: AtomicUsize = AtomicUsize::new(0);
/// Whether [`reserve`] succeeded, once it has run.
static RESERVATION: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
/// Trees thrown away whole so far (see [`trees_thrown_away`]).
static THROWN_AWAY: AtomicU64 = AtomicU64::new(0);
/// Cleared by [`set_enabled`]: every tree is then allocated and dropped
/// normally.
static ENABLED: AtomicBool = AtomicBool::new(true);
/// A set bit is a free slot.
static FREE: AtomicU64 = AtomicU64::new(u64::MAX);
/// Bytes of each slot already accessible (kept across uses).
static COMMITTED: [AtomicUsize; SLOTS] = [const { AtomicUsize::new(0) }; SLOTS];

thread_local! {
    /// Next free byte of this thread's slot; 0 when not in arena mode.
    static CURSOR: Cell<usize> = const { Cell::new(0) };
    /// End of the accessible part of the slot.
    static END: Cell<usize> = const { Cell::new(0) };
    /// The slot in use, while one is.
    static SLOT: Cell<usize> = const { Cell::new(0) };
    /// An allocation did not fit the slot and went to the general allocator.
    static OVERFLOWED: Cell<bool> = const { Cell::new(false) };
}

/// The global allocator wrapper: `#[global_allocator] static A:
/// ParseArena<MiMalloc> = ParseArena(MiMalloc);`.
pub struct ParseArena<A>(pub A);

fn slot_start(base: usize, slot: usize) -> usize {
    base + slot * SLOT_BYTES
}

#[inline]
fn in_range(ptr: *const u8) -> bool {
    let base = BASE.load(Ordering::Acquire);
    base > 1 && (ptr as usize).wrapping_sub(base) < RESERVED.load(Ordering::Relaxed)
}

/// Whether `ptr` points into a parse arena (memory a later parse reuses).
#[inline]
pub fn contains(ptr: *const u8) -> bool {
    in_range(ptr)
}

/// Turns the arena on or off for the parses that start from now on (off:
/// trees are allocated and dropped as usual). On by default.
pub fn set_enabled(on: bool) {
    ENABLED.store(on, Ordering::Relaxed);
}

/// Bumps the cursor for `layout`, making more of the slot accessible when
/// needed; None outside arena mode or when the slot is full.
#[inline]
fn bump(layout: Layout) -> Option<*mut u8> {
    let cursor = CURSOR.get();
    if cursor == 0 {
        return None;
    }
    let start = cursor.checked_add(layout.align() - 1)? & !(layout.align() - 1);
    let end = start.checked_add(layout.size())?;
    if end > END.get() && !commit(end) {
        OVERFLOWED.set(true);
        return None;
    }
    CURSOR.set(end);
    Some(start as *mut u8)
}

/// Makes the slot accessible up to at least `end`.
fn commit(end: usize) -> bool {
    let slot = SLOT.get();
    let start = slot_start(BASE.load(Ordering::Relaxed), slot);
    if end - start > SLOT_BYTES {
        return false;
    }
    let from = END.get();
    let to = (start + (end - start).div_ceil(COMMIT_STEP) * COMMIT_STEP).min(start + SLOT_BYTES);
    // SAFETY: [from, to) lies inside this thread's slot of the range mapped
    // in `reserve` (checked above), which nothing else uses while the slot
    // is taken; mprotect changes only its access.
    let ok = unsafe {
        libc::mprotect(
            from as *mut libc::c_void,
            to - from,
            libc::PROT_READ | libc::PROT_WRITE,
        )
    } == 0;
    if ok {
        END.set(to);
        COMMITTED[slot].store(to - start, Ordering::Relaxed);
    }
    ok
}

// SAFETY: every allocation is either the inner allocator's (and handed
// back to it) or a range of a slot that only this thread bumps, aligned as
// asked and not handed out again until the tree in it is forgotten.
unsafe impl<A: GlobalAlloc> GlobalAlloc for ParseArena<A> {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        match bump(layout) {
            Some(p) => p,
            // SAFETY: the caller's contract for `layout` is passed on.
            None => unsafe { self.0.alloc(layout) },
        }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        if in_range(ptr) {
            // The last allocation is given back; others wait for the reset.
            if CURSOR.get() == ptr as usize + layout.size() {
                CURSOR.set(ptr as usize);
            }
            return;
        }
        // SAFETY: not an arena pointer, so the inner allocator made it.
        unsafe { self.0.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if !in_range(ptr) {
            // SAFETY: the inner allocator made `ptr` (a heap block stays a
            // heap block, whatever mode this thread is in).
            return unsafe { self.0.realloc(ptr, layout, new_size) };
        }
        let end = ptr as usize + layout.size();
        if new_size <= layout.size() && CURSOR.get() != end {
            // Shrinking a block that is not the last: it stays as it is.
            return ptr;
        }
        // The last allocation grows or shrinks in place when it fits.
        if CURSOR.get() == end {
            let new_end = ptr as usize + new_size;
            if new_end <= END.get() || commit(new_end) {
                CURSOR.set(new_end);
                return ptr;
            }
        }
        // SAFETY: `layout.align()` is a power of two and the caller
        // guarantees `new_size` rounded up to it does not overflow.
        let new_layout = unsafe { Layout::from_size_align_unchecked(new_size, layout.align()) };
        // SAFETY: as in `alloc`.
        let new = unsafe { self.alloc(new_layout) };
        if !new.is_null() {
            // SAFETY: both blocks are at least min(old, new) bytes and
            // distinct (the new one was not handed out before).
            unsafe { std::ptr::copy_nonoverlapping(ptr, new, layout.size().min(new_size)) };
        }
        new
    }
}

/// Reserves the address range (inaccessible until committed), two slots
/// per CPU (512 MiB of addresses per CPU, no memory); false if the kernel
/// refused, e.g. under an address-space limit.
fn reserve() -> bool {
    *RESERVATION.get_or_init(|| {
        let slots = std::thread::available_parallelism()
            .map_or(2, |n| n.get() * 2)
            .clamp(2, SLOTS);
        let len = slots * SLOT_BYTES;
        // SAFETY: an anonymous PROT_NONE reservation touches nothing of
        // ours; it uses no memory until parts are made accessible.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_NONE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            BASE.store(1, Ordering::Release);
            return false;
        }
        let mask = if slots == SLOTS {
            u64::MAX
        } else {
            (1u64 << slots) - 1
        };
        FREE.store(mask, Ordering::Release);
        RESERVED.store(len, Ordering::Relaxed);
        BASE.store(p as usize, Ordering::Release);
        true
    })
}

/// Takes a free slot, if any.
fn take_slot() -> Option<usize> {
    let mut free = FREE.load(Ordering::Relaxed);
    while free != 0 {
        let slot = free.trailing_zeros() as usize;
        match FREE.compare_exchange_weak(
            free,
            free & !(1 << slot),
            Ordering::Acquire,
            Ordering::Relaxed,
        ) {
            Ok(_) => return Some(slot),
            Err(now) => free = now,
        }
    }
    None
}

/// Leaves arena mode on drop; gives the slot back unless a panic is
/// unwinding through the parse.
struct Mode {
    slot: usize,
}

impl Drop for Mode {
    fn drop(&mut self) {
        CURSOR.set(0);
        if !std::thread::panicking() {
            FREE.fetch_or(1 << self.slot, Ordering::Release);
        }
    }
}

/// Runs `parse` in arena mode (when [`ParseArena`] is the global allocator
/// and a slot is free), then `read` on its result in normal mode, then
/// forgets the result and frees the slot for the next file. What `read`
/// returns must not share memory with the tree (see [`contains`]); it gets
/// the tree by reference, and allocates normally.
pub fn in_arena<T, R>(parse: impl FnOnce() -> T, read: impl FnOnce(&T) -> R) -> R {
    let on = ENABLED.load(Ordering::Relaxed);
    let slot = match (on && reserve()).then(take_slot).flatten() {
        Some(slot) => slot,
        None => return read(&parse()),
    };
    let base = BASE.load(Ordering::Relaxed);
    let start = slot_start(base, slot);
    CURSOR.set(start);
    END.set(start + COMMITTED[slot].load(Ordering::Relaxed));
    SLOT.set(slot);
    OVERFLOWED.set(false);
    let mode = Mode { slot };
    let tree = parse();
    let used = CURSOR.get() != start;
    CURSOR.set(0);
    let result = read(&tree);
    if used && !OVERFLOWED.get() {
        if cfg!(debug_assertions) {
            // Debug builds: anything left pointing into the slot reads
            // garbage from here on, so tests notice.
            // SAFETY: the slot's accessible part, which only this thread
            // uses until `mode` gives the slot back.
            unsafe { std::ptr::write_bytes(start as *mut u8, 0xA5, END.get() - start) };
        }
        std::mem::forget(tree);
        THROWN_AWAY.fetch_add(1, Ordering::Relaxed);
    } else {
        // Not installed (nothing came from the slot) or overflowed (part
        // of the tree is on the heap): a normal drop, arena parts no-ops.
        drop(tree);
    }
    drop(mode);
    result
}

/// Parses `text` as a Python module in the arena and runs `read` on the
/// tree (see [`in_arena`]): what the extraction, the parser-only floor and
/// the timing example all do.
pub fn parse_python<R>(
    text: &str,
    read: impl FnOnce(&ruff_python_parser::Parsed<ruff_python_ast::ModModule>) -> R,
) -> R {
    in_arena(
        || ruff_python_parser::parse_unchecked_source(text, ruff_python_ast::PySourceType::Python),
        read,
    )
}

/// How many trees were thrown away whole since the process started (the
/// others were dropped node by node).
pub fn trees_thrown_away() -> u64 {
    THROWN_AWAY.load(Ordering::Relaxed)
}

/// Gives the memory of every idle slot back to the kernel (the addresses
/// stay reserved and accessible; a later parse faults pages in again). A
/// long-lived process (the agent) keeps no tree's memory between analyses.
pub fn trim() {
    let base = BASE.load(Ordering::Acquire);
    if base <= 1 {
        return;
    }
    for (slot, committed) in COMMITTED.iter().enumerate() {
        let bit = 1u64 << slot;
        if FREE.fetch_and(!bit, Ordering::Acquire) & bit == 0 {
            continue; // in use (or lost to a panic)
        }
        let len = committed.load(Ordering::Relaxed);
        if len > 0 {
            // SAFETY: an idle slot we now hold: no tree lives in it, and
            // MADV_DONTNEED on private anonymous memory only drops its pages.
            unsafe {
                libc::madvise(
                    slot_start(base, slot) as *mut libc::c_void,
                    len,
                    libc::MADV_DONTNEED,
                )
            };
        }
        FREE.fetch_or(bit, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn without_the_allocator_installed_trees_are_dropped_normally() {
        // The test binary's allocator is the system's: nothing comes from a
        // slot, so the tree must be dropped (a forget would leak it).
        struct Counted<'a>(&'a Cell<u32>);
        impl Drop for Counted<'_> {
            fn drop(&mut self) {
                self.0.set(self.0.get() + 1);
            }
        }
        let drops = Cell::new(0);
        let n = in_arena(|| (Counted(&drops), vec![1u8; 100]), |t| t.1.len());
        assert_eq!(n, 100);
        assert_eq!(drops.get(), 1);
    }
}
