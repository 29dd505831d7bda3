//! Support for pymedic's integration tests: finding the `pymedic` binary and
//! the Python interpreters on this machine, starting Python scenario
//! programs from `tests/scripts/` under a guard that kills them on drop, and
//! the root check that skips (or, under `CI=true`, fails) privileged tests.

pub mod agent;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// The repository root.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .canonicalize()
        .expect("repo root")
}

/// A scenario script under `tests/scripts/`.
pub fn script(name: &str) -> PathBuf {
    let p = repo_root().join("tests/scripts").join(name);
    assert!(p.exists(), "no scenario script {}", p.display());
    p
}

/// The `pymedic` binary under test: `$PYMEDIC_BIN`, else the one cargo
/// built next to this test executable (`cargo xtask test` builds it first).
pub fn pymedic_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("PYMEDIC_BIN") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().expect("current exe");
    // target/<profile>/deps/<test> → target/<profile>/pymedic
    let candidate = exe
        .parent()
        .and_then(Path::parent)
        .map(|d| d.join("pymedic"))
        .expect("target dir");
    assert!(
        candidate.exists(),
        "{} does not exist: build it first (`cargo build -p pymedic`) or run `cargo xtask test`",
        candidate.display()
    );
    candidate
}

/// Runs `pymedic ARGS` to completion.
pub fn pymedic(args: &[&str]) -> Output {
    Command::new(pymedic_bin())
        .args(args)
        .output()
        .expect("run pymedic")
}

/// True when running under CI (`CI=true`), where skips are failures.
pub fn under_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}

/// Privileged tests call this first. Returns false (after printing why) when
/// not root; under `CI=true` not being root is a test failure instead.
pub fn require_root(test: &str) -> bool {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    if euid == 0 {
        return true;
    }
    let why =
        format!("{test}: skipped: needs root (eBPF, reading other processes' memory); euid={euid}");
    if under_ci() {
        panic!("{why} (CI=true: a skipped privileged test is a failure)");
    }
    eprintln!("{why}");
    false
}

/// A Python interpreter available for tests.
#[derive(Clone, Debug)]
pub struct Python {
    /// e.g. "3.12" or "3.11-debian".
    pub label: String,
    pub path: PathBuf,
    pub minor: u8,
}

/// Every supported interpreter on this machine: pyenv's 3.8–3.13 (shared
/// builds) and Debian's `/usr/bin/python3.11` (static). `PYMEDIC_TEST_PYTHONS`
/// (comma-separated paths) overrides the list.
pub fn pythons() -> Vec<Python> {
    let minor_of = |p: &Path| -> Option<u8> {
        let out = Command::new(p)
            .args(["-c", "import sys; print(sys.version_info[1])"])
            .output()
            .ok()?;
        String::from_utf8_lossy(&out.stdout).trim().parse().ok()
    };
    if let Ok(list) = std::env::var("PYMEDIC_TEST_PYTHONS") {
        return list
            .split(',')
            .filter(|s| !s.is_empty())
            .filter_map(|s| {
                let path = PathBuf::from(s);
                let minor = minor_of(&path)?;
                Some(Python {
                    label: s.to_owned(),
                    path,
                    minor,
                })
            })
            .collect();
    }
    let mut out = Vec::new();
    let pyenv = std::env::var_os("PYENV_ROOT")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/root/.pyenv"))
        .join("versions");
    if let Ok(entries) = std::fs::read_dir(&pyenv) {
        let mut dirs: Vec<_> = entries.filter_map(|e| e.ok()).map(|e| e.path()).collect();
        dirs.sort();
        for dir in dirs {
            let name = dir.file_name().unwrap().to_string_lossy().into_owned();
            let mut parts = name.split('.');
            let (Some("3"), Some(minor)) = (parts.next(), parts.next()) else {
                continue;
            };
            let Ok(minor) = minor.parse::<u8>() else {
                continue;
            };
            if !(8..=13).contains(&minor) {
                continue;
            }
            let path = dir.join("bin").join(format!("python3.{minor}"));
            if path.exists() {
                out.push(Python {
                    label: format!("3.{minor}"),
                    path,
                    minor,
                });
            }
        }
    }
    let debian = PathBuf::from("/usr/bin/python3.11");
    if debian.exists() {
        out.push(Python {
            label: "3.11-debian".into(),
            path: debian,
            minor: 11,
        });
    }
    assert!(!out.is_empty(), "no supported Python interpreter found");
    out
}

/// A running Python scenario program; killed (and reaped) on drop.
pub struct PyProc {
    child: Child,
    lines: mpsc::Receiver<String>,
    pub python: Python,
    /// The script it runs (as given to [`PyProc::start`]).
    pub script: String,
    /// The `READY...` line the script printed (scripts may report values
    /// on it).
    pub ready: String,
}

impl PyProc {
    /// Starts `python script args...` and waits for the script to print a
    /// line starting with `READY` on stdout.
    ///
    /// A program that has not started within 45 s is killed and started once
    /// more (up to 60 s), after its kernel state is printed: on CI a program
    /// has twice sat that long in interpreter start-up, before any of its own
    /// code or pymedic was involved, while the same script on the other
    /// interpreters started at once. A script that never gets ready still
    /// fails, on the second attempt.
    pub fn start(python: &Python, script_name: &str, args: &[&str]) -> PyProc {
        let mut p = PyProc::spawn(python, script_name, args);
        match p.try_wait_for_line("READY", Duration::from_secs(45)) {
            Ok(line) => p.ready = line,
            Err(why) => {
                eprintln!("{why}\nkilling it and starting {script_name} once more");
                p.kill();
                p = PyProc::spawn(python, script_name, args);
                p.ready = p.wait_for_line("READY", Duration::from_secs(60));
            }
        }
        p
    }

    fn spawn(python: &Python, script_name: &str, args: &[&str]) -> PyProc {
        let mut child = Command::new(&python.path)
            .arg("-u")
            .arg(script(script_name))
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| panic!("start {} {script_name}: {e}", python.path.display()));
        let stdout: ChildStdout = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        PyProc {
            child,
            lines: rx,
            python: python.clone(),
            script: script_name.to_owned(),
            ready: String::new(),
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits for a stdout line starting with `prefix`; returns it.
    pub fn wait_for_line(&mut self, prefix: &str, timeout: Duration) -> String {
        self.try_wait_for_line(prefix, timeout)
            .unwrap_or_else(|why| panic!("{why}"))
    }

    /// Waits for a stdout line starting with `prefix`; on timeout, says
    /// what the process was doing.
    fn try_wait_for_line(&mut self, prefix: &str, timeout: Duration) -> Result<String, String> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) if line.starts_with(prefix) => return Ok(line),
                Ok(_) => continue,
                Err(_) => {
                    let status = self.child.try_wait().ok().flatten();
                    return Err(format!(
                        "{} {} (pid {}) did not print {prefix:?} within {timeout:?} (exit status: {status:?})\n{}",
                        self.python.label,
                        self.script,
                        self.child.id(),
                        kernel_view(self.child.id())
                    ));
                }
            }
        }
    }

    /// Kills the process and waits for it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What the kernel says each thread of `pid` is doing (state, CPU time and
/// major faults so far, wait channel, current system call and the file it
/// reads, kernel stack): printed when a program does not answer.
fn kernel_view(pid: u32) -> String {
    let mut out = String::new();
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return format!("/proc/{pid} is gone");
    };
    for t in tasks.flatten() {
        let dir = t.path();
        let read = |f: &str| std::fs::read_to_string(dir.join(f)).unwrap_or_default();
        let stat = read("stat");
        // Fields after the command's closing parenthesis: state is field 3.
        let fields: Vec<&str> = stat
            .rsplit(')')
            .next()
            .unwrap_or("")
            .split_whitespace()
            .collect();
        let field = |n: usize| fields.get(n - 3).copied().unwrap_or("?");
        let syscall = read("syscall");
        let mut args = syscall.split_whitespace();
        let nr = args.next().unwrap_or("?").to_owned();
        // read, pread64, readv: name the file being read.
        let file = match (nr.as_str(), args.next()) {
            ("0" | "17" | "19", Some(fd)) => i64::from_str_radix(fd.trim_start_matches("0x"), 16)
                .ok()
                .and_then(|fd| std::fs::read_link(format!("/proc/{pid}/fd/{fd}")).ok())
                .map(|p| format!(" reading {}", p.display()))
                .unwrap_or_default(),
            _ => String::new(),
        };
        out.push_str(&format!(
            "  tid {} state {} utime {} stime {} majflt {} wchan {} syscall {nr}{file} comm {}{}\n",
            t.file_name().to_string_lossy(),
            field(3),
            field(14),
            field(15),
            field(12),
            read("wchan"),
            read("comm").trim_end(),
            read("stack")
                .lines()
                .take(8)
                .map(|l| format!("\n      {l}"))
                .collect::<String>()
        ));
    }
    out
}

impl Drop for PyProc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Parses stdout of a `--json` command, with the command's stderr in the
/// panic message when it is not JSON.
pub fn json_stdout(out: &Output) -> serde_json::Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "not JSON ({e}); status {:?}\nstdout: {}\nstderr: {}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    })
}
