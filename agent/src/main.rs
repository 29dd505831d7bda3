//! The `pymedic` binary: parses the command line and hands over to
//! [`pymedic::cli`]. Errors are printed with their causes and a non-zero exit.

use std::process::ExitCode;

use clap::Parser;

/// mimalloc: `pymedic analyze` allocates and frees millions of small syntax
/// nodes across worker threads, where glibc's malloc costs a fifth of the run.
/// Syntax trees themselves come from a bump arena and are thrown away whole
/// ([`pymedic_analyze::arena`]).
#[global_allocator]
static ALLOCATOR: pymedic_analyze::arena::ParseArena<Mimalloc> =
    pymedic_analyze::arena::ParseArena(Mimalloc);

/// mimalloc, through its plain entry points whenever they give the alignment
/// asked. The `mimalloc` crate always calls the `_aligned` ones, which take
/// a slow generic path for every block over 1 KiB: 209 instructions a call
/// on `analyze`'s 40 k such blocks of the standard library.
struct Mimalloc;

/// What `mi_malloc` guarantees: 16-byte alignment (`MI_MAX_ALIGN_SIZE`), or
/// the size's own for smaller blocks.
fn plain_alignment_suffices(layout: std::alloc::Layout) -> bool {
    layout.align() <= 16 && layout.align() <= layout.size()
}

// SAFETY: every block comes from mimalloc and goes back to it: `mi_malloc`
// and `mi_realloc` only when `plain_alignment_suffices`, which is what they
// align to; otherwise the `_aligned` calls with the layout's alignment.
// `mi_free` takes blocks from either.
unsafe impl std::alloc::GlobalAlloc for Mimalloc {
    unsafe fn alloc(&self, layout: std::alloc::Layout) -> *mut u8 {
        // SAFETY: as above; the caller's layout has a non-zero size.
        let p: *mut u8 = unsafe {
            if plain_alignment_suffices(layout) {
                libmimalloc_sys::mi_malloc(layout.size()).cast()
            } else {
                libmimalloc_sys::mi_malloc_aligned(layout.size(), layout.align()).cast()
            }
        };
        debug_assert!(
            (p as usize).is_multiple_of(layout.align()),
            "{layout:?} at {p:?}"
        );
        p
    }

    unsafe fn alloc_zeroed(&self, layout: std::alloc::Layout) -> *mut u8 {
        // SAFETY: as in `alloc`.
        unsafe {
            if plain_alignment_suffices(layout) {
                libmimalloc_sys::mi_zalloc(layout.size()).cast()
            } else {
                libmimalloc_sys::mi_zalloc_aligned(layout.size(), layout.align()).cast()
            }
        }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, _layout: std::alloc::Layout) {
        // SAFETY: `ptr` came from this allocator, so from mimalloc.
        unsafe { libmimalloc_sys::mi_free(ptr.cast()) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: std::alloc::Layout, new_size: usize) -> *mut u8 {
        // SAFETY: `ptr` came from mimalloc; the new layout keeps the
        // alignment, so the same test picks a call that honours it.
        unsafe {
            let new = std::alloc::Layout::from_size_align_unchecked(new_size, layout.align());
            if plain_alignment_suffices(new) {
                libmimalloc_sys::mi_realloc(ptr.cast(), new_size).cast()
            } else {
                libmimalloc_sys::mi_realloc_aligned(ptr.cast(), new_size, layout.align()).cast()
            }
        }
    }
}

/// `mi_option_purge_delay` in the bundled mimalloc v3's `mi_option_t`
/// (libmimalloc-sys's named constants follow v2's numbering).
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;
/// `mi_option_allow_thp` (same header).
const MI_OPTION_ALLOW_THP: libmimalloc_sys::mi_option_t = 43;

/// No transparent huge pages, for every command. mimalloc marks its arenas
/// `MADV_HUGEPAGE` (before `main`, so its own option comes too late), and:
/// - the agent's resident size grew by half: 89 MB with 45 MB of it in
///   huge pages, against 55–66 MB with 4 KiB pages (25 targets, every
///   detector; 55 MB when mimalloc never marks an arena, with
///   `MIMALLOC_ALLOW_THP=0`);
/// - with the kernel's usual `defrag=madvise`, a fault there compacts
///   memory synchronously when no free 2 MiB page is at hand: `analyze` of
///   a standard library ran 0.12 s and 0.45–0.64 s by turns, 0.5–0.7 s of
///   it kernel time, against a steady 0.13–0.17 s with 4 KiB pages.
///
/// `PR_SET_THP_DISABLE` is checked at each fault, so it covers the arenas
/// already mapped. Children inherit it: the one command pymedic runs for a
/// user (`repair apply --verify`) turns it back off for theirs.
fn disable_transparent_huge_pages() {
    // SAFETY: mi_option_set only stores an integer in mimalloc's option
    // table (callable at any time, from any thread); 43 is allow_thp in the
    // bundled v3 header. Off, mimalloc also purges in 64 KiB steps instead
    // of whole huge pages.
    unsafe {
        if std::env::var_os("MIMALLOC_ALLOW_THP").is_none() {
            libmimalloc_sys::mi_option_set(MI_OPTION_ALLOW_THP, 0);
        }
    }
    // SAFETY: prctl(PR_SET_THP_DISABLE, 1, 0, 0, 0) sets a flag on this
    // process's memory map and touches no memory of ours. Failure (a kernel
    // without THP) leaves the default, so the result is ignored.
    unsafe {
        libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0);
    }
}

/// [`disable_transparent_huge_pages`] before anything allocates: an ELF
/// constructor runs before Rust's runtime, whose first allocations (the
/// main thread's info, then the argument and logging tables) otherwise
/// fault in whole 2 MiB pages of mimalloc's first arena, zeroed by the
/// kernel: three per `analyze` run here, on the serial start-up path.
// SAFETY: `.init_array` holds plain `extern "C" fn()` pointers that the
// dynamic loader calls once, single-threaded, before `main`; the function
// only stores an option in mimalloc and calls prctl (see its own SAFETY
// notes), both valid before Rust's runtime is set up.
#[used]
#[unsafe(link_section = ".init_array")]
static DISABLE_THP_BEFORE_MAIN: extern "C" fn() = {
    extern "C" fn run() {
        disable_transparent_huge_pages();
    }
    run
};

/// For a one-shot batch command (`analyze`, `repair`); not for the agent,
/// which runs for months: never hand freed memory back to the kernel. By
/// default mimalloc purges free pages after a delay, and `analyze` (parse a
/// file, extract, drop the syntax tree, next file) then faults the same
/// pages in again, zeroed by the kernel: a third of its run went to
/// clearing pages. The process exits in seconds, so keeping its peak
/// (~50 MB on a standard library) costs nothing. Left alone when the user
/// set `MIMALLOC_PURGE_DELAY`.
fn keep_freed_memory() {
    // SAFETY: mi_option_set only stores an integer in mimalloc's option
    // table (documented as callable at any time, from any thread); 15 is
    // purge_delay in the bundled v3 header, -1 means "never".
    unsafe {
        if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
            libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, -1);
        }
    }
}

fn main() -> ExitCode {
    let cli = pymedic::cli::Cli::parse();
    pymedic::cli::init_logging(cli.verbose);
    if matches!(
        cli.command,
        pymedic::cli::Command::Analyze(_) | pymedic::cli::Command::Repair(_)
    ) {
        keep_freed_memory();
    }
    if !matches!(cli.command, pymedic::cli::Command::Agent(_)) {
        pymedic::cli::die_quietly_on_closed_stdout();
    }
    match pymedic::cli::run(cli) {
        Ok(code) => code,
        Err(err) => {
            eprintln!("pymedic: error: {err:#}");
            ExitCode::from(pymedic::cli::exit_code(&err))
        }
    }
}
