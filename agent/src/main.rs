//! The `pymedic` binary: parses the command line and hands over to
//! [`pymedic::cli`]. Errors are printed with their causes and a non-zero exit.

use std::process::ExitCode;

use clap::Parser;

/// mimalloc: `pymedic analyze` allocates and frees millions of small syntax
/// nodes across worker threads, where glibc's malloc costs a fifth of the run.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// `mi_option_purge_delay` in the bundled mimalloc v3's `mi_option_t`
/// (libmimalloc-sys's named constants follow v2's numbering).
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// For a one-shot batch command: never hand freed memory back to the
/// kernel. By default mimalloc purges free pages after a delay, and
/// `analyze` (parse a file, extract, drop the syntax tree, next file) then
/// faults the same pages in again, zeroed by the kernel: a third of its
/// run went to clearing pages. The process exits in seconds, so keeping
/// its peak (~100 MB on a standard library) costs nothing. Not for the
/// agent, which runs for months.
/// Left alone when the user set `MIMALLOC_PURGE_DELAY`.
fn keep_freed_memory() {
    // SAFETY: mi_option_get/mi_option_set only read and store an integer in
    // mimalloc's option table (documented as callable at any time, from any
    // thread); 15 is purge_delay in the bundled v3 header, -1 means "never".
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
