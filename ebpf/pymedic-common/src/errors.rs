//! Error codes the eBPF programs count in per-CPU arrays instead of failing
//! silently. Userspace sums them and exposes them as metrics
//! (`pymedic_ebpf_errors_total{program, code}`).

/// Index into a program's `*_ERRORS` per-CPU array.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorCode {
    /// A ring buffer was full and an event was dropped.
    RingBufFull = 0,
    /// A `bpf_probe_read_*` helper failed.
    ProbeRead = 1,
    /// A bounded map was full and an insert failed.
    MapFull = 2,
    /// A tracepoint argument could not be read.
    TracepointArg = 3,
    /// The Python stack walker found no thread state for the thread.
    NoThreadState = 4,
    /// A per-CPU scratch buffer was unavailable.
    Scratch = 5,
}

impl ErrorCode {
    /// Number of distinct codes: the size of every `*_ERRORS` array.
    pub const COUNT: u32 = 6;

    /// All codes, in index order.
    pub const ALL: [ErrorCode; Self::COUNT as usize] = [
        ErrorCode::RingBufFull,
        ErrorCode::ProbeRead,
        ErrorCode::MapFull,
        ErrorCode::TracepointArg,
        ErrorCode::NoThreadState,
        ErrorCode::Scratch,
    ];

    /// Stable label used in metrics and logs.
    pub const fn label(self) -> &'static str {
        match self {
            ErrorCode::RingBufFull => "ringbuf_full",
            ErrorCode::ProbeRead => "probe_read",
            ErrorCode::MapFull => "map_full",
            ErrorCode::TracepointArg => "tracepoint_arg",
            ErrorCode::NoThreadState => "no_thread_state",
            ErrorCode::Scratch => "scratch",
        }
    }
}
