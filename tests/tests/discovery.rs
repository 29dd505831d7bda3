//! eBPF process discovery: `pymedic ps --watch --json` reports a Python
//! process within 1 s of its start and its exit within 1 s.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use pymedic_integration::{PyProc, pymedic_bin, pythons, require_root};

struct Watcher {
    child: std::process::Child,
    lines: mpsc::Receiver<serde_json::Value>,
}

impl Watcher {
    fn start() -> Watcher {
        let mut child = Command::new(pymedic_bin())
            .args(["ps", "--watch", "--json"])
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start pymedic ps --watch");
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Ok(v) = serde_json::from_str(&line)
                    && tx.send(v).is_err()
                {
                    break;
                }
            }
        });
        Watcher { child, lines: rx }
    }

    /// Waits for an event about `pid`; returns it and when it arrived.
    fn wait_for(&self, event: &str, pid: u32, timeout: Duration) -> (serde_json::Value, Instant) {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(v) if v["event"] == event && v["pid"] == pid => return (v, Instant::now()),
                Ok(_) => continue,
                Err(_) => panic!("no {event} event for pid {pid} within {timeout:?}"),
            }
        }
    }
}

impl Drop for Watcher {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn start_and_exit_reported_within_one_second() {
    if !require_root("start_and_exit_reported_within_one_second") {
        return;
    }
    let watcher = Watcher::start();
    // Let the watcher attach (its initial scan reports existing processes).
    std::thread::sleep(Duration::from_millis(1500));
    for py in pythons() {
        let spawned = Instant::now();
        let mut proc = PyProc::start(&py, "idle.py", &[]);
        let (ev, seen) = watcher.wait_for("started", proc.pid(), Duration::from_secs(5));
        let latency = seen - spawned;
        assert!(
            latency < Duration::from_secs(1),
            "{}: start seen after {latency:?}",
            py.label
        );
        assert_eq!(ev["via"], "exec", "{}: {ev}", py.label);
        let version = ev["process"]["python"].as_str().unwrap_or_default();
        assert!(
            version.starts_with(&format!("3.{}", py.minor)),
            "{}: {ev}",
            py.label
        );

        let killed = Instant::now();
        let pid = proc.pid();
        proc.kill();
        let (_, seen) = watcher.wait_for("exited", pid, Duration::from_secs(5));
        let latency = seen - killed;
        assert!(
            latency < Duration::from_secs(1),
            "{}: exit seen after {latency:?}",
            py.label
        );
    }
}

#[test]
fn forked_python_children_are_discovered() {
    if !require_root("forked_python_children_are_discovered") {
        return;
    }
    let watcher = Watcher::start();
    std::thread::sleep(Duration::from_millis(1500));
    let py = &pythons()[0];
    let mut parent = PyProc::start(py, "forker.py", &[]);
    watcher.wait_for("started", parent.pid(), Duration::from_secs(5));
    parent.wait_for_line("FORK", Duration::from_secs(5));
    let line = parent.wait_for_line("CHILD", Duration::from_secs(5));
    let child: u32 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
    let (ev, _) = watcher.wait_for("started", child, Duration::from_secs(2));
    assert_eq!(ev["via"], "fork", "{ev}");
    watcher.wait_for("exited", child, Duration::from_secs(5));
}
