//! Captures: artifacts a client asks the agent for (a stack dump, a CPU or
//! off-CPU profile, later memory), taken from one target and kept on disk.
//!
//! Each kind is a [`Capturer`] (one file per kind, one line in [`BUILTIN`]);
//! [`Captures`] validates requests, runs at most `max_concurrent` at a time
//! on worker threads, writes the artifact to `DATA_DIR/captures/ID.EXT`
//! (through a `.part` file, renamed when complete), records status in the
//! store so `GetCapture` works after a restart, and deletes the oldest
//! artifacts beyond `keep`.

pub mod dump;
pub mod profile;

use std::collections::BTreeMap;
use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::{Semaphore, watch};

use super::config::CaptureConfig;
use super::store::{CaptureRow, Store, StoreError};
use super::targets::TargetInfo;

/// An output format of a capture kind.
#[derive(Debug)]
pub struct Format {
    pub name: &'static str,
    pub media_type: &'static str,
    pub extension: &'static str,
}

/// A validated request handed to a [`Capturer`].
#[derive(Debug)]
pub struct CaptureRequest {
    pub duration: Duration,
    pub rate_hz: u32,
    pub format: &'static Format,
}

/// Why a capture could not be taken.
#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    #[error("unknown capture kind {kind:?}: this agent offers {available}")]
    UnknownKind { kind: String, available: String },
    #[error("capture kind {kind} has no format {format:?}: use one of {available}")]
    UnknownFormat {
        kind: String,
        format: String,
        available: String,
    },
    #[error("a {kind} capture needs a duration (e.g. 10s), at most {max:?}")]
    BadDuration { kind: String, max: Duration },
    #[error("process {pid} is not a Python process this agent can read: {reason}")]
    NoTarget { pid: u32, reason: String },
    #[error("{kind} capture of process {pid} failed: {message}")]
    Failed {
        kind: &'static str,
        pid: u32,
        message: String,
    },
    #[error("write the capture artifact {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// One kind of capture.
pub trait Capturer: Send + Sync + 'static {
    /// The `kind` clients ask for: "dump", "cpu", "off-cpu", "memory".
    fn kind(&self) -> &'static str;
    /// One line for `GetAgentStatus` and `--help`.
    fn description(&self) -> &'static str;
    /// Output formats, the default first.
    fn formats(&self) -> &'static [Format];
    /// Whether it records over a duration (profiles) or is instant (dump).
    fn timed(&self) -> bool;
    /// Takes the capture, writing the artifact to `out`. Blocking; checks
    /// `cancel` at least once a second when timed.
    fn capture(
        &self,
        target: &TargetInfo,
        req: &CaptureRequest,
        out: &mut dyn Write,
        cancel: &AtomicBool,
    ) -> Result<(), CaptureError>;
}

/// Builds one built-in capturer.
pub type Constructor = fn() -> Arc<dyn Capturer>;

/// The built-in capture kinds, one line each.
pub const BUILTIN: &[Constructor] = &[dump::new, profile::cpu, profile::off_cpu];

/// A capture request as clients make it.
#[derive(Clone, Debug, Default)]
pub struct Trigger {
    pub pid: u32,
    pub kind: String,
    pub duration: Duration,
    pub rate_hz: u32,
    pub format: String,
}

/// Runs captures and keeps their artifacts.
pub struct Captures {
    kinds: BTreeMap<&'static str, Arc<dyn Capturer>>,
    store: Arc<Store>,
    dir: PathBuf,
    slots: Arc<Semaphore>,
    config: CaptureConfig,
    counter: AtomicU64,
    /// Bumped whenever a capture finishes (waiters re-check).
    finished: watch::Sender<u64>,
    cancel: Arc<AtomicBool>,
}

impl Captures {
    pub fn new(
        capturers: Vec<Arc<dyn Capturer>>,
        store: Arc<Store>,
        dir: PathBuf,
        config: CaptureConfig,
    ) -> Captures {
        Captures {
            kinds: capturers.into_iter().map(|c| (c.kind(), c)).collect(),
            store,
            slots: Arc::new(Semaphore::new(config.max_concurrent)),
            dir,
            config,
            counter: AtomicU64::new(0),
            finished: watch::channel(0).0,
            cancel: Arc::new(AtomicBool::new(false)),
        }
    }

    /// The built-in capturers.
    pub fn builtin() -> Vec<Arc<dyn Capturer>> {
        BUILTIN.iter().map(|make| make()).collect()
    }

    /// Offered kinds with their descriptions.
    pub fn kinds(&self) -> Vec<(&'static str, &'static str)> {
        self.kinds
            .values()
            .map(|c| (c.kind(), c.description()))
            .collect()
    }

    /// Validates `t`, records it as pending and starts it. Returns at once.
    pub async fn trigger(self: &Arc<Self>, t: Trigger) -> Result<CaptureRow, CaptureError> {
        let capturer =
            self.kinds
                .get(t.kind.as_str())
                .cloned()
                .ok_or_else(|| CaptureError::UnknownKind {
                    kind: t.kind.clone(),
                    available: if self.kinds.is_empty() {
                        "no capture kinds (none is built into this pymedic)".into()
                    } else {
                        self.kinds.keys().copied().collect::<Vec<_>>().join(", ")
                    },
                })?;
        let formats = capturer.formats();
        let format = if t.format.is_empty() {
            &formats[0]
        } else {
            formats.iter().find(|f| f.name == t.format).ok_or_else(|| {
                CaptureError::UnknownFormat {
                    kind: t.kind.clone(),
                    format: t.format.clone(),
                    available: formats
                        .iter()
                        .map(|f| f.name)
                        .collect::<Vec<_>>()
                        .join(", "),
                }
            })?
        };
        if capturer.timed() && (t.duration.is_zero() || t.duration > self.config.max_duration.0) {
            return Err(CaptureError::BadDuration {
                kind: t.kind.clone(),
                max: self.config.max_duration.0,
            });
        }
        let target = {
            let pid = t.pid;
            tokio::task::spawn_blocking(move || TargetInfo::inspect(pid))
                .await
                .map_err(|e| CaptureError::NoTarget {
                    pid,
                    reason: e.to_string(),
                })?
                .map_err(|e| CaptureError::NoTarget {
                    pid,
                    reason: e.to_string(),
                })?
        };
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        let requested_at = pymedic_model::now();
        let id = format!(
            "{}-{:x}{:04x}",
            capturer.kind(),
            requested_at.unix_timestamp_nanos() / 1000,
            n & 0xffff
        );
        let row = CaptureRow {
            path: self.dir.join(format!("{id}.{}", format.extension)),
            id,
            kind: capturer.kind().into(),
            pid: t.pid,
            format: format.name.into(),
            status: "pending".into(),
            error: String::new(),
            media_type: format.media_type.into(),
            file_name: format!("{}-{}.{}", capturer.kind(), t.pid, format.extension),
            size_bytes: 0,
            requested_at,
            finished_at: None,
        };
        self.put(row.clone()).await?;
        let req = CaptureRequest {
            duration: t.duration,
            rate_hz: t.rate_hz,
            format,
        };
        let me = self.clone();
        let started = row.clone();
        tokio::spawn(async move { me.run(capturer, target, req, started).await });
        Ok(row)
    }

    async fn put(&self, row: CaptureRow) -> Result<(), StoreError> {
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || store.put_capture(&row))
            .await
            .unwrap_or_else(|e| panic!("capture store task panicked: {e}"))
    }

    async fn run(
        self: Arc<Self>,
        capturer: Arc<dyn Capturer>,
        target: TargetInfo,
        req: CaptureRequest,
        mut row: CaptureRow,
    ) {
        let Ok(_permit) = self.slots.clone().acquire_owned().await else {
            return;
        };
        row.status = "running".into();
        if let Err(e) = self.put(row.clone()).await {
            tracing::warn!("record capture {}: {e}", row.id);
        }
        let path = row.path.clone();
        let dir = self.dir.clone();
        let cancel = self.cancel.clone();
        let result = tokio::task::spawn_blocking(move || -> Result<u64, CaptureError> {
            std::fs::create_dir_all(&dir).map_err(|source| CaptureError::Io {
                path: dir.clone(),
                source,
            })?;
            let part = path.with_extension("part");
            let io = |source| CaptureError::Io {
                path: part.clone(),
                source,
            };
            let file = std::fs::File::create(&part).map_err(io)?;
            let mut out = std::io::BufWriter::new(file);
            let r = capturer.capture(&target, &req, &mut out, &cancel);
            if let Err(e) = r {
                let _ = std::fs::remove_file(&part);
                return Err(e);
            }
            let file = out.into_inner().map_err(|e| io(e.into_error()))?;
            file.sync_all().map_err(io)?;
            let size = file.metadata().map_err(io)?.len();
            std::fs::rename(&part, &path).map_err(|source| CaptureError::Io {
                path: path.clone(),
                source,
            })?;
            Ok(size)
        })
        .await
        .unwrap_or_else(|e| {
            Err(CaptureError::Failed {
                kind: "capture",
                pid: row.pid,
                message: format!("the capture worker panicked: {e}"),
            })
        });
        row.finished_at = Some(pymedic_model::now());
        match result {
            Ok(size) => {
                row.status = "done".into();
                row.size_bytes = size;
            }
            Err(e) => {
                row.status = "failed".into();
                row.error = e.to_string();
            }
        }
        if let Err(e) = self.put(row.clone()).await {
            tracing::warn!("record capture {}: {e}", row.id);
        }
        self.finished.send_modify(|n| *n += 1);
        self.enforce_keep().await;
    }

    async fn enforce_keep(&self) {
        let store = self.store.clone();
        let keep = self.config.keep;
        let _ = tokio::task::spawn_blocking(move || -> Result<(), StoreError> {
            let all = store.captures()?;
            let finished: Vec<_> = all
                .iter()
                .filter(|c| c.status == "done" || c.status == "failed")
                .collect();
            for c in finished.iter().take(finished.len().saturating_sub(keep)) {
                let _ = std::fs::remove_file(&c.path);
                store.delete_capture(&c.id)?;
            }
            Ok(())
        })
        .await;
    }

    /// A capture's record.
    pub async fn get(&self, id: &str) -> Result<Option<CaptureRow>, StoreError> {
        let store = self.store.clone();
        let id = id.to_owned();
        tokio::task::spawn_blocking(move || store.get_capture(&id))
            .await
            .unwrap_or_else(|e| panic!("capture store task panicked: {e}"))
    }

    /// Waits until capture `id` is done or failed.
    pub async fn wait(&self, id: &str) -> Result<Option<CaptureRow>, StoreError> {
        let mut rx = self.finished.subscribe();
        loop {
            let row = self.get(id).await?;
            match &row {
                Some(r) if r.status == "pending" || r.status == "running" => {}
                _ => return Ok(row),
            }
            // Re-check at least every second in case a bump was missed.
            let _ = tokio::time::timeout(Duration::from_secs(1), rx.changed()).await;
        }
    }

    /// Asks running captures to stop (agent shutdown).
    pub fn cancel_all(&self) {
        self.cancel.store(true, Ordering::Relaxed);
    }
}
