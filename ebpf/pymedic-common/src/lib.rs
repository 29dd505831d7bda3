//! Types shared by pymedic's eBPF programs and its userspace.
//!
//! Everything here is `#[repr(C)]`, laid out without hidden padding (explicit
//! `_pad` fields), and documented, because the same bytes are written by the
//! kernel side and read by userspace. Map names are constants so the two sides
//! cannot drift.
#![no_std]

pub mod discovery;
pub mod errors;
pub mod profile;
pub mod pystack;
pub mod resource;
pub mod waits;
