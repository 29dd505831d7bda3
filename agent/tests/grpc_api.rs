//! The gRPC layer in-process, over real loopback sockets: an engine with a
//! scripted detector and capturer (the detectors themselves are tested in
//! `tests/tests/agent*.rs` against real Python processes).

use std::io::Write;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use pymedic::engine::capture::{CaptureError, CaptureRequest, Capturer, Format};
use pymedic::engine::config::Config;
use pymedic::engine::detect::{CheckContext, DetectError, Detector, Registry, Watch};
use pymedic::engine::targets::{TargetId, TargetInfo};
use pymedic::engine::{Discover, Engine};
use pymedic_model::{Finding, Kind, Layer, Location, Severity};
use pymedic_proto::v1 as pb;
use pymedic_proto::v1::diagnostics_client::DiagnosticsClient;
use tonic::transport::Channel;

/// Reports whatever lines the test puts in `lines`.
struct Scripted {
    lines: Arc<Mutex<Vec<u32>>>,
}

struct ScriptedWatch {
    lines: Arc<Mutex<Vec<u32>>>,
}

impl Detector for Scripted {
    fn name(&self) -> &'static str {
        "scripted"
    }
    fn layer(&self) -> Layer {
        Layer::Temporal
    }
    fn kinds(&self) -> Vec<Kind> {
        vec![Kind::DEADLOCK]
    }
    fn interval(&self) -> Duration {
        Duration::from_millis(20)
    }
    fn watch(&self, _: &TargetInfo) -> Result<Option<Box<dyn Watch>>, DetectError> {
        Ok(Some(Box::new(ScriptedWatch {
            lines: self.lines.clone(),
        })))
    }
}

impl Watch for ScriptedWatch {
    fn check(&mut self, cx: &CheckContext<'_>) -> Result<Vec<Finding>, DetectError> {
        let lines = self.lines.lock().unwrap().clone();
        Ok(lines
            .into_iter()
            .map(|l| {
                Finding::new(
                    Layer::Temporal,
                    Kind::DEADLOCK,
                    Severity::Critical,
                    0.9,
                    format!("scripted at line {l}"),
                    Some(cx.target.model()),
                    Location::new("app.py", "work", l),
                )
            })
            .collect())
    }
}

/// Writes `size` bytes of a known pattern.
struct Bytes;

static BYTES_FORMATS: [Format; 1] = [Format {
    name: "raw",
    media_type: "application/octet-stream",
    extension: "bin",
}];

impl Capturer for Bytes {
    fn kind(&self) -> &'static str {
        "bytes"
    }
    fn description(&self) -> &'static str {
        "test pattern"
    }
    fn formats(&self) -> &'static [Format] {
        &BYTES_FORMATS
    }
    fn timed(&self) -> bool {
        true
    }
    fn capture(
        &self,
        _: &TargetInfo,
        req: &CaptureRequest,
        out: &mut dyn Write,
        _: &AtomicBool,
    ) -> Result<(), CaptureError> {
        let n = req.duration.as_millis() as usize * 1000;
        let data: Vec<u8> = (0..n).map(|i| (i % 251) as u8).collect();
        out.write_all(&data).map_err(|e| CaptureError::Failed {
            kind: "bytes",
            pid: 0,
            message: e.to_string(),
        })
    }
}

fn me() -> TargetInfo {
    let pid = std::process::id();
    let start = pymedic::procinfo::read(pid).unwrap().start_ticks;
    TargetInfo {
        id: TargetId {
            pid,
            start_ticks: start,
        },
        process: pymedic_python::PythonProcess {
            pid,
            exe: "/proc/self/exe".into(),
            version: pymedic_python::Version::new(3, 12, Some(0)),
            build: pymedic_python::Build::Static,
            interpreter_file: String::new(),
            load_bias: 0,
            runtime_addr: 0,
        },
        cmdline: vec!["test".into()],
        container: None,
        pod: None,
    }
}

struct Agent {
    engine: Arc<Engine>,
    addr: std::net::SocketAddr,
    lines: Arc<Mutex<Vec<u32>>>,
    _dir: tempfile::TempDir,
}

async fn agent(token: Option<&str>) -> Agent {
    let dir = tempfile::tempdir().unwrap();
    let config = Config {
        data_dir: dir.path().to_owned(),
        ..Config::default()
    };
    let lines = Arc::new(Mutex::new(Vec::new()));
    let mut registry = Registry::default();
    registry.register(
        Arc::new(Scripted {
            lines: lines.clone(),
        }),
        None,
    );
    let (engine, _tasks) =
        Engine::start_with(config, registry, vec![Arc::new(Bytes)], Discover::Manual).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let router = pymedic::grpc::router(engine.clone(), token.map(String::from), None)
        .await
        .unwrap();
    tokio::spawn(
        router.serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    engine.watch(me()).await;
    Agent {
        engine,
        addr,
        lines,
        _dir: dir,
    }
}

async fn client(addr: std::net::SocketAddr) -> DiagnosticsClient<Channel> {
    let ch = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    DiagnosticsClient::new(ch)
}

async fn next_event(s: &mut tonic::Streaming<pb::FindingEvent>) -> pb::FindingEvent {
    tokio::time::timeout(Duration::from_secs(10), s.message())
        .await
        .expect("an event within 10 s")
        .unwrap()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn findings_flow_list_get_and_watch_resumes_without_gaps() {
    let a = agent(None).await;
    let mut c = client(a.addr).await;
    let mut watch = c
        .watch_findings(pb::WatchFindingsRequest {
            after_sequence: Some(0),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    *a.lines.lock().unwrap() = vec![10, 20];
    let e1 = next_event(&mut watch).await;
    let e2 = next_event(&mut watch).await;
    assert_eq!(e1.r#type(), pb::EventType::Opened);
    assert_eq!(e2.sequence, e1.sequence + 1);
    let f = e1.finding.clone().unwrap();
    assert_eq!(f.kind, "deadlock");
    assert_eq!(f.target.as_ref().unwrap().pid, std::process::id());

    // List, filter, paginate, get.
    let all = c
        .list_findings(pb::ListFindingsRequest {
            page_size: 1,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(all.findings.len(), 1);
    assert!(!all.next_page_token.is_empty());
    let page2 = c
        .list_findings(pb::ListFindingsRequest {
            page_size: 1,
            page_token: all.next_page_token.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(page2.findings.len(), 1);
    assert_ne!(page2.findings[0].id, all.findings[0].id);
    let none = c
        .list_findings(pb::ListFindingsRequest {
            kind: "fd_leak".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(none.findings.is_empty());
    let got = c
        .get_finding(pb::GetFindingRequest { id: f.id.clone() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.id, f.id);
    assert!(got.count >= 1);
    let missing = c
        .get_finding(pb::GetFindingRequest { id: "nope".into() })
        .await
        .unwrap_err();
    assert_eq!(missing.code(), tonic::Code::NotFound);

    // The condition clears for line 10: resolved.
    *a.lines.lock().unwrap() = vec![20];
    let e3 = next_event(&mut watch).await;
    assert_eq!(e3.r#type(), pb::EventType::Resolved);
    assert_eq!(e3.sequence, e2.sequence + 1);
    drop(watch);

    // Events happen while the client is away; it resumes from its cursor.
    *a.lines.lock().unwrap() = vec![20, 30, 40];
    tokio::time::sleep(Duration::from_millis(300)).await;
    *a.lines.lock().unwrap() = vec![];
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut watch = c
        .watch_findings(pb::WatchFindingsRequest {
            after_sequence: Some(e3.sequence),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mut seqs = vec![e3.sequence];
    for _ in 0..5 {
        seqs.push(next_event(&mut watch).await.sequence);
    }
    assert!(seqs.windows(2).all(|w| w[1] == w[0] + 1), "gap in {seqs:?}");

    // A cursor from the future is refused.
    let far = c
        .watch_findings(pb::WatchFindingsRequest {
            after_sequence: Some(1 << 40),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(far.code(), tonic::Code::OutOfRange);

    // Targets and status.
    let targets = c
        .list_targets(pb::ListTargetsRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(targets.targets.len(), 1);
    // The target is this test process: on a loaded machine its own CPU use
    // can pass the busy threshold, and a busy target backs off.
    assert!(
        ["watching", "backing_off"].contains(&targets.targets[0].state.as_str()),
        "{}",
        targets.targets[0].state
    );
    let status = c
        .get_agent_status(pb::GetAgentStatusRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(status.detectors[0].name, "scripted");
    assert!(status.detectors[0].checks > 0);
    assert_eq!(status.capture_kinds, vec!["bytes".to_string()]);
    assert!(status.last_sequence >= seqs[5]);
    assert!(status.rss_bytes > 0);

    // Metrics render the same state.
    let text = pymedic::metrics::render(&a.engine).unwrap();
    assert!(
        text.contains("pymedic_detector_checks_total{detector=\"scripted\"}"),
        "{text}"
    );
    assert!(
        text.contains("pymedic_targets{state=\"watched\"} 1"),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_watchers_each_see_every_event_in_order() {
    let a = agent(None).await;
    let mut streams = Vec::new();
    for _ in 0..20 {
        let mut c = client(a.addr).await;
        streams.push(
            c.watch_findings(pb::WatchFindingsRequest::default())
                .await
                .unwrap()
                .into_inner(),
        );
    }
    for round in 0..5u32 {
        *a.lines.lock().unwrap() = (0..10).map(|i| round * 100 + i).collect();
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    *a.lines.lock().unwrap() = vec![];
    // 5 rounds × 10 opened, 4 × 10 resolved in between, 10 resolved at the end.
    for s in &mut streams {
        let mut prev = None;
        for _ in 0..100 {
            let e = next_event(s).await;
            if let Some(p) = prev {
                assert_eq!(e.sequence, p + 1);
            }
            prev = Some(e.sequence);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn captures_stream_in_chunks_and_bad_requests_are_refused() {
    let a = agent(None).await;
    let mut c = client(a.addr).await;
    let pid = std::process::id();
    // 200 ms → 200 000 bytes: several 64 KiB chunks.
    let resp = c
        .trigger_capture(pb::TriggerCaptureRequest {
            pid,
            kind: "bytes".into(),
            duration: Some(prost_types::Duration {
                seconds: 0,
                nanos: 200_000_000,
            }),
            ..Default::default()
        })
        .await
        .unwrap_err();
    // This test process is not Python: refused before anything runs.
    assert_eq!(resp.code(), tonic::Code::NotFound, "{resp:?}");
    let unknown = c
        .trigger_capture(pb::TriggerCaptureRequest {
            pid,
            kind: "telepathy".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), tonic::Code::InvalidArgument);
    assert!(unknown.message().contains("bytes"), "{}", unknown.message());
    let no_duration = c
        .trigger_capture(pb::TriggerCaptureRequest {
            pid,
            kind: "bytes".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(no_duration.code(), tonic::Code::InvalidArgument);

    // A real Python process as the capture target.
    let python = pymedic_integration_python();
    let mut child = std::process::Command::new(python)
        .args([
            "-c",
            "import time; print('READY', flush=True); time.sleep(60)",
        ])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    {
        use std::io::BufRead;
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.as_mut().unwrap())
            .read_line(&mut line)
            .unwrap();
    }
    // Give ld.so time to map libpython so inspection recognises it.
    let resp = c
        .trigger_capture(pb::TriggerCaptureRequest {
            pid: child.id(),
            kind: "bytes".into(),
            duration: Some(prost_types::Duration {
                seconds: 0,
                nanos: 200_000_000,
            }),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mut s = c
        .get_capture(pb::GetCaptureRequest {
            capture_id: resp.capture_id.clone(),
            wait: true,
        })
        .await
        .unwrap()
        .into_inner();
    let mut info = None;
    let mut data = Vec::new();
    let mut chunks = 0;
    while let Some(chunk) = s.message().await.unwrap() {
        match chunk.chunk.unwrap() {
            pb::capture_chunk::Chunk::Info(i) => info = Some(i),
            pb::capture_chunk::Chunk::Data(d) => {
                chunks += 1;
                data.extend(d);
            }
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    let info = info.unwrap();
    assert_eq!(info.status(), pb::CaptureStatus::Done, "{}", info.error);
    assert_eq!(info.size_bytes, 200_000);
    assert_eq!(data.len(), 200_000);
    assert!(chunks >= 4);
    assert!(data.iter().enumerate().all(|(i, b)| *b == (i % 251) as u8));
    let missing = c
        .get_capture(pb::GetCaptureRequest {
            capture_id: "nope".into(),
            wait: false,
        })
        .await
        .unwrap_err();
    assert_eq!(missing.code(), tonic::Code::NotFound);
}

fn pymedic_integration_python() -> std::path::PathBuf {
    for p in ["/usr/bin/python3.11", "/usr/bin/python3"] {
        if std::path::Path::new(p).exists() {
            return p.into();
        }
    }
    panic!("no python3 to start");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_is_required_and_never_leaks_data() {
    let a = agent(Some("s3cret")).await;
    *a.lines.lock().unwrap() = vec![1];
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut c = client(a.addr).await;
    let no = c
        .list_findings(pb::ListFindingsRequest::default())
        .await
        .unwrap_err();
    assert_eq!(no.code(), tonic::Code::Unauthenticated);
    let mut req = tonic::Request::new(pb::ListFindingsRequest::default());
    req.metadata_mut()
        .insert("authorization", "Bearer wrong".parse().unwrap());
    let wrong = c.list_findings(req).await.unwrap_err();
    assert_eq!(wrong.code(), tonic::Code::Unauthenticated);
    let mut req = tonic::Request::new(pb::TriggerCaptureRequest {
        pid: 1,
        kind: "bytes".into(),
        ..Default::default()
    });
    req.metadata_mut()
        .insert("authorization", "Bearer wrong".parse().unwrap());
    assert_eq!(
        c.trigger_capture(req).await.unwrap_err().code(),
        tonic::Code::Unauthenticated
    );
    let watch = c
        .watch_findings(pb::WatchFindingsRequest {
            after_sequence: Some(0),
            ..Default::default()
        })
        .await;
    assert_eq!(watch.unwrap_err().code(), tonic::Code::Unauthenticated);
    let mut req = tonic::Request::new(pb::ListFindingsRequest::default());
    req.metadata_mut()
        .insert("authorization", "Bearer s3cret".parse().unwrap());
    let ok = c.list_findings(req).await.unwrap().into_inner();
    assert_eq!(ok.findings.len(), 1);
    // Health answers without a token (probes), and holds no data.
    let ch = tonic::transport::Endpoint::from_shared(format!("http://{}", a.addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut health = tonic_health::pb::health_client::HealthClient::new(ch);
    let h = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: "pymedic.v1.Diagnostics".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        h.status(),
        tonic_health::pb::health_check_response::ServingStatus::Serving
    );
}
