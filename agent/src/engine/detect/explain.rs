//! Static explanations of runtime findings, off the check path.
//!
//! [`related`] returns the `static: ...` entries `pymedic_analyze`'s
//! [`Enricher`](pymedic_analyze::Enricher) derives from the target's source
//! (read through `/proc/PID/root`). Analysing a project can take seconds
//! (the standard library, when a finding's first site is in it), which must
//! not delay a verdict, so the analysis runs on one background thread: the
//! first call for a finding queues it and returns nothing; later checks get
//! the result once it is ready. Results are cached per (process, finding
//! id), bounded.

use std::collections::HashMap;
use std::sync::mpsc::{Receiver, SyncSender, TrySendError, sync_channel};
use std::sync::{Arc, LazyLock, Mutex};

use pymedic_model::{Finding, Related};

/// Findings whose explanation is kept (all are forgotten beyond this).
const MAX_CACHED: usize = 4096;
/// Findings waiting for the analysis thread (more are explained later).
const MAX_QUEUED: usize = 64;

type Key = (u32, String);

enum State {
    Queued,
    Done(Arc<Vec<Related>>),
}

struct Explainer {
    cache: Mutex<HashMap<Key, State>>,
    queue: SyncSender<(Key, Finding)>,
}

static EXPLAINER: LazyLock<Option<Explainer>> = LazyLock::new(|| {
    let (queue, jobs) = sync_channel(MAX_QUEUED);
    match std::thread::Builder::new()
        .name("explain".into())
        .spawn(move || work(jobs))
    {
        Ok(_) => Some(Explainer {
            cache: Mutex::new(HashMap::new()),
            queue,
        }),
        Err(e) => {
            tracing::warn!("cannot start the static-explanation thread: {e}; findings go without");
            None
        }
    }
});

fn work(jobs: Receiver<(Key, Finding)>) {
    let enricher = pymedic_analyze::Enricher::new();
    for ((pid, id), f) in jobs {
        let root = std::path::PathBuf::from(format!("/proc/{pid}/root"));
        let related = enricher.explain(&f, &root).unwrap_or_else(|e| {
            tracing::debug!(pid, kind = %f.kind, "no static explanation: {e}");
            Vec::new()
        });
        if let Some(x) = EXPLAINER.as_ref() {
            let mut cache = x.cache.lock().unwrap_or_else(|e| e.into_inner());
            cache.insert((pid, id), State::Done(Arc::new(related)));
        }
    }
}

/// The static explanation of `f` (a finding about process `pid`) if it is
/// ready; otherwise queues it and returns nothing.
pub fn related(f: &Finding, pid: u32) -> Arc<Vec<Related>> {
    let Some(x) = EXPLAINER.as_ref() else {
        return Arc::default();
    };
    let key = (pid, f.id.0.clone());
    let mut cache = x.cache.lock().unwrap_or_else(|e| e.into_inner());
    match cache.get(&key) {
        Some(State::Done(r)) => return r.clone(),
        Some(State::Queued) => return Arc::default(),
        None => {}
    }
    if cache.len() >= MAX_CACHED {
        cache.retain(|_, s| matches!(s, State::Queued));
    }
    match x.queue.try_send((key.clone(), f.clone())) {
        Ok(()) => {
            cache.insert(key, State::Queued);
        }
        Err(TrySendError::Full(_)) => {} // asked again at the next check
        Err(TrySendError::Disconnected(_)) => {
            cache.insert(key, State::Done(Arc::default()));
        }
    }
    Arc::default()
}
