//! Code shared by pymedic's eBPF objects (one binary per concern under
//! `src/bin/`). Nothing here may panic: every fallible step returns a
//! `Result` and the program entry points count errors instead.
#![no_std]

pub mod errors;
pub mod pystack;
