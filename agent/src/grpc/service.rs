//! The `Diagnostics` service: thin. It reads the store (on blocking
//! threads), subscribes to the engine's events and asks the capture manager;
//! errors become `Status` here and nowhere else.

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use pymedic_proto::v1 as pb;
use pymedic_proto::v1::diagnostics_server::Diagnostics;
use tokio::sync::{broadcast, mpsc};
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use super::convert::*;
use crate::engine::Engine;
use crate::engine::capture::{CaptureError, Trigger};
use crate::engine::store::{CaptureRow, CursorError, Event, EventType, FindingFilter, StoreError};
use crate::engine::usage;

type Stream_<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

/// Artifact chunk size in `GetCapture`.
const CHUNK: usize = 64 * 1024;
/// Events read from the store per catch-up query.
const CATCH_UP_BATCH: usize = 512;

pub struct Service {
    engine: Arc<Engine>,
    cpu_sample: Mutex<(Instant, u64)>,
}

impl Service {
    pub fn new(engine: Arc<Engine>) -> Service {
        Service {
            engine,
            cpu_sample: Mutex::new((Instant::now(), usage::process_cpu_ns())),
        }
    }

    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&crate::engine::store::Store) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, Status> {
        let store = self.engine.store.clone();
        tokio::task::spawn_blocking(move || f(&store))
            .await
            .map_err(|e| Status::internal(format!("store task failed: {e}")))?
            .map_err(store_status)
    }
}

fn store_status(e: StoreError) -> Status {
    match e {
        StoreError::PageToken(_) => Status::invalid_argument(e.to_string()),
        other => Status::internal(other.to_string()),
    }
}

fn capture_status(e: CaptureError) -> Status {
    match e {
        CaptureError::UnknownKind { .. }
        | CaptureError::UnknownFormat { .. }
        | CaptureError::BadDuration { .. } => Status::invalid_argument(e.to_string()),
        CaptureError::NoTarget { .. } => Status::not_found(e.to_string()),
        other => Status::internal(other.to_string()),
    }
}

fn filter_from(layer: pb::Layer, kind: &str, severity: pb::Severity, pid: u32) -> FindingFilter {
    FindingFilter {
        layer: layer_from_pb(layer),
        kind: (!kind.is_empty()).then(|| kind.to_owned()),
        severity: severity_from_pb(severity),
        pid: (pid != 0).then_some(pid),
        since: None,
        status: None,
    }
}

fn event_to_pb(e: &Event) -> pb::FindingEvent {
    pb::FindingEvent {
        sequence: e.seq,
        r#type: match e.kind {
            EventType::Opened => pb::EventType::Opened,
            EventType::Updated => pb::EventType::Updated,
            EventType::Resolved => pb::EventType::Resolved,
        } as i32,
        at: Some(time_to_pb(e.at)),
        finding: Some(finding_to_pb(&e.finding)),
    }
}

pub fn capture_to_pb(c: &CaptureRow) -> pb::CaptureInfo {
    pb::CaptureInfo {
        id: c.id.clone(),
        kind: c.kind.clone(),
        pid: c.pid,
        status: match c.status.as_str() {
            "pending" => pb::CaptureStatus::Pending,
            "running" => pb::CaptureStatus::Running,
            "done" => pb::CaptureStatus::Done,
            _ => pb::CaptureStatus::Failed,
        } as i32,
        error: c.error.clone(),
        media_type: c.media_type.clone(),
        file_name: c.file_name.clone(),
        size_bytes: c.size_bytes,
        requested_at: Some(time_to_pb(c.requested_at)),
        finished_at: c.finished_at.map(time_to_pb),
        format: c.format.clone(),
    }
}

#[tonic::async_trait]
impl Diagnostics for Service {
    async fn list_targets(
        &self,
        req: Request<pb::ListTargetsRequest>,
    ) -> Result<Response<pb::ListTargetsResponse>, Status> {
        let include_unselected = req.into_inner().include_unselected;
        let known: Vec<_> = self
            .engine
            .known
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .filter(|k| include_unselected || k.selected)
            .cloned()
            .collect();
        let stats = self
            .engine
            .target_stats
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let active = self
            .blocking(|s| {
                s.list(
                    &FindingFilter {
                        status: Some(pymedic_model::Status::Active),
                        ..Default::default()
                    },
                    1000,
                    None,
                )
            })
            .await?
            .findings;
        let targets = known
            .into_iter()
            .map(|k| {
                let id = k.info.id;
                let facts = crate::procinfo::read(id.pid).unwrap_or_default();
                let st = stats.get(&id).cloned().unwrap_or_default();
                let model = k.info.model();
                pb::TargetInfo {
                    target: Some(target_to_pb(&model)),
                    build: k.info.process.build.label().into(),
                    threads: facts.threads,
                    rss_bytes: facts.rss_bytes,
                    uptime_seconds: facts.uptime_secs,
                    cmdline: k.info.cmdline.clone(),
                    selected: k.selected,
                    state: if !k.selected {
                        "excluded"
                    } else if st.backing_off {
                        "backing_off"
                    } else {
                        "watching"
                    }
                    .into(),
                    active_findings: active
                        .iter()
                        .filter(|f| f.target.as_ref() == Some(&model))
                        .count() as u64,
                    checks_cpu_seconds: st.cpu_ns as f64 / 1e9,
                }
            })
            .collect();
        Ok(Response::new(pb::ListTargetsResponse { targets }))
    }

    async fn list_findings(
        &self,
        req: Request<pb::ListFindingsRequest>,
    ) -> Result<Response<pb::ListFindingsResponse>, Status> {
        let r = req.into_inner();
        let mut filter = filter_from(r.layer(), &r.kind, r.severity(), r.pid);
        filter.since = r.since.as_ref().map(time_from_pb);
        filter.status = status_from_pb(r.status());
        let limit = if r.page_size == 0 {
            100
        } else {
            r.page_size.min(1000)
        } as usize;
        let token = r.page_token;
        let page = self
            .blocking(move |s| s.list(&filter, limit, Some(&token)))
            .await?;
        Ok(Response::new(pb::ListFindingsResponse {
            findings: page.findings.iter().map(finding_to_pb).collect(),
            next_page_token: page.next.unwrap_or_default(),
        }))
    }

    async fn get_finding(
        &self,
        req: Request<pb::GetFindingRequest>,
    ) -> Result<Response<pb::Finding>, Status> {
        let id = req.into_inner().id;
        let lookup = id.clone();
        match self.blocking(move |s| s.get(&lookup)).await? {
            Some(f) => Ok(Response::new(finding_to_pb(&f))),
            None => Err(Status::not_found(format!(
                "no finding {id:?}: `pymedic findings list` shows the ids"
            ))),
        }
    }

    type WatchFindingsStream = Stream_<pb::FindingEvent>;

    async fn watch_findings(
        &self,
        req: Request<pb::WatchFindingsRequest>,
    ) -> Result<Response<Self::WatchFindingsStream>, Status> {
        let r = req.into_inner();
        let filter = filter_from(r.layer(), &r.kind, r.severity(), r.pid);
        // Subscribe before reading the cursor so nothing falls in between.
        let live = self.engine.subscribe();
        let cursor = match r.after_sequence {
            Some(c) => {
                let last = self.blocking(|s| s.last_seq()).await?;
                if c > last {
                    return Err(Status::out_of_range(format!(
                        "after_sequence {c} is beyond the newest event {last}: was the data \
                         directory replaced? Watch from 0 or without a cursor"
                    )));
                }
                c
            }
            None => self.blocking(|s| s.last_seq()).await?,
        };
        let (tx, rx) = mpsc::channel(256);
        tokio::spawn(stream_events(self.engine.clone(), live, cursor, filter, tx));
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn trigger_capture(
        &self,
        req: Request<pb::TriggerCaptureRequest>,
    ) -> Result<Response<pb::TriggerCaptureResponse>, Status> {
        let r = req.into_inner();
        let duration = match r.duration {
            Some(d) if d.seconds < 0 || d.nanos < 0 => {
                return Err(Status::invalid_argument("duration must not be negative"));
            }
            Some(d) => Duration::new(d.seconds as u64, d.nanos as u32),
            None => Duration::ZERO,
        };
        let row = self
            .engine
            .captures
            .trigger(Trigger {
                pid: r.pid,
                kind: r.kind,
                duration,
                rate_hz: r.rate_hz,
                format: r.format,
            })
            .await
            .map_err(capture_status)?;
        Ok(Response::new(pb::TriggerCaptureResponse {
            capture_id: row.id.clone(),
            capture: Some(capture_to_pb(&row)),
        }))
    }

    type GetCaptureStream = Stream_<pb::CaptureChunk>;

    async fn get_capture(
        &self,
        req: Request<pb::GetCaptureRequest>,
    ) -> Result<Response<Self::GetCaptureStream>, Status> {
        let r = req.into_inner();
        let captures = &self.engine.captures;
        let row = if r.wait {
            captures.wait(&r.capture_id).await
        } else {
            captures.get(&r.capture_id).await
        }
        .map_err(store_status)?
        .ok_or_else(|| Status::not_found(format!("no capture {:?}", r.capture_id)))?;
        let (tx, rx) = mpsc::channel(8);
        tokio::spawn(async move {
            let info = pb::CaptureChunk {
                chunk: Some(pb::capture_chunk::Chunk::Info(capture_to_pb(&row))),
            };
            if tx.send(Ok(info)).await.is_err() || row.status != "done" {
                return;
            }
            use tokio::io::AsyncReadExt as _;
            let mut file = match tokio::fs::File::open(&row.path).await {
                Ok(f) => f,
                Err(e) => {
                    let _ = tx
                        .send(Err(Status::data_loss(format!(
                            "the artifact of capture {} is gone ({e}): trigger it again",
                            row.id
                        ))))
                        .await;
                    return;
                }
            };
            let mut buf = vec![0u8; CHUNK];
            loop {
                match file.read(&mut buf).await {
                    Ok(0) => return,
                    Ok(n) => {
                        let chunk = pb::CaptureChunk {
                            chunk: Some(pb::capture_chunk::Chunk::Data(buf[..n].to_vec())),
                        };
                        if tx.send(Ok(chunk)).await.is_err() {
                            return;
                        }
                    }
                    Err(e) => {
                        let _ = tx
                            .send(Err(Status::internal(format!("read the artifact: {e}"))))
                            .await;
                        return;
                    }
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn get_agent_status(
        &self,
        _req: Request<pb::GetAgentStatusRequest>,
    ) -> Result<Response<pb::AgentStatus>, Status> {
        let e = &self.engine;
        let ((active, total), last_seq) =
            self.blocking(|s| Ok((s.counts()?, s.last_seq()?))).await?;
        let (targets, selected) = {
            let known = e.known.read().unwrap_or_else(|e| e.into_inner());
            (known.len(), known.values().filter(|k| k.selected).count())
        };
        let cpu_percent = {
            let mut s = self.cpu_sample.lock().unwrap_or_else(|e| e.into_inner());
            let now = (Instant::now(), usage::process_cpu_ns());
            let wall = now.0.duration_since(s.0).as_secs_f64();
            let pct = if wall > 0.0 {
                (now.1.saturating_sub(s.1)) as f64 / 1e9 / wall * 100.0
            } else {
                0.0
            };
            *s = now;
            pct
        };
        use std::sync::atomic::Ordering::Relaxed;
        Ok(Response::new(pb::AgentStatus {
            version: env!("CARGO_PKG_VERSION").into(),
            started_at: Some(time_to_pb(e.started_at)),
            targets: targets as u32,
            selected_targets: selected as u32,
            active_findings: active.iter().map(|(_, _, n)| n).sum(),
            total_findings: total,
            last_sequence: last_seq,
            detectors: e
                .registry
                .entries()
                .iter()
                .map(|d| pb::DetectorStatus {
                    name: d.detector.name().into(),
                    layer: layer_to_pb(d.detector.layer()) as i32,
                    kinds: d.detector.kinds().iter().map(|k| k.to_string()).collect(),
                    interval: Some(prost_types::Duration {
                        seconds: d.interval.as_secs() as i64,
                        nanos: d.interval.subsec_nanos() as i32,
                    }),
                    checks: d.stats.checks.load(Relaxed),
                    errors: d.stats.errors.load(Relaxed),
                    last_error: d.stats.last_error(),
                })
                .collect(),
            capture_kinds: e
                .captures
                .kinds()
                .iter()
                .map(|(k, _)| (*k).into())
                .collect(),
            data_dir: e.config.data_dir.display().to_string(),
            cpu_percent,
            rss_bytes: usage::self_rss_bytes(),
            lost_events: e.counters.lost_events.load(Relaxed) + usage::lost_events(),
            ebpf_errors: e.counters.ebpf_errors.load(Relaxed),
        }))
    }
}

/// Streams events after `cursor`: first what the store has (catch-up), then
/// live events; whenever the live feed lags or skips a sequence number it
/// goes back to the store, so the client sees every event exactly once, in
/// order.
async fn stream_events(
    engine: Arc<Engine>,
    mut live: broadcast::Receiver<Arc<Event>>,
    mut cursor: u64,
    filter: FindingFilter,
    tx: mpsc::Sender<Result<pb::FindingEvent, Status>>,
) {
    loop {
        // Catch up from the store.
        loop {
            let store = engine.store.clone();
            let after = cursor;
            let status = match tokio::task::spawn_blocking(move || {
                store.events_after(after, CATCH_UP_BATCH)
            })
            .await
            {
                Ok(Ok(batch)) => Ok(batch),
                Ok(Err(e @ CursorError::Pruned { .. })) => Err(Status::out_of_range(e.to_string())),
                Ok(Err(e)) => Err(Status::internal(e.to_string())),
                Err(e) => Err(Status::internal(format!("store task failed: {e}"))),
            };
            let batch = match status {
                Ok(b) => b,
                Err(status) => {
                    let _ = tx.send(Err(status)).await;
                    return;
                }
            };
            let n = batch.len();
            for e in batch {
                cursor = e.seq;
                if filter.matches(&e.finding) && tx.send(Ok(event_to_pb(&e))).await.is_err() {
                    return;
                }
            }
            if n < CATCH_UP_BATCH {
                break;
            }
        }
        // Live.
        loop {
            tokio::select! {
                ev = live.recv() => match ev {
                    Ok(e) if e.seq <= cursor => continue,
                    Ok(e) if e.seq == cursor + 1 => {
                        cursor = e.seq;
                        if filter.matches(&e.finding) && tx.send(Ok(event_to_pb(&e))).await.is_err() {
                            return;
                        }
                    }
                    // A gap (lagged or reordered): re-read from the store.
                    Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => break,
                    Err(broadcast::error::RecvError::Closed) => return,
                },
                _ = tx.closed() => return,
            }
        }
    }
}
