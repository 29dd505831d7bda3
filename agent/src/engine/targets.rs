//! Targets: the Python processes the agent watches.
//!
//! Identity is `(pid, start time)`, so a reused pid is a new target with
//! fresh detector state and its own findings. [`Selector`] decides which
//! discovered processes are watched (all, by pid, by executable or command
//! line regex, by container or pod); [`TargetInfo`] carries what detectors
//! and the API need to know about one.

use std::fmt;

use pymedic_python::PythonProcess;
use pymedic_python::inspect::{InspectError, Inspector};
use regex::Regex;

use super::config::TargetsConfig;
use crate::procinfo;

/// A process identity that survives pid reuse.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TargetId {
    pub pid: u32,
    /// Start time in clock ticks after boot (`/proc/PID/stat` field 22).
    pub start_ticks: u64,
}

impl fmt::Display for TargetId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}@{}", self.pid, self.start_ticks)
    }
}

/// What is known about a target.
#[derive(Clone, Debug)]
pub struct TargetInfo {
    pub id: TargetId,
    pub process: PythonProcess,
    pub cmdline: Vec<String>,
    pub container: Option<String>,
    pub pod: Option<String>,
}

impl TargetInfo {
    /// Builds the info for a process already recognised as Python.
    pub fn new(process: PythonProcess, start_ticks: u64) -> TargetInfo {
        let info = procinfo::read(process.pid).unwrap_or_default();
        TargetInfo {
            id: TargetId {
                pid: process.pid,
                start_ticks: if start_ticks != 0 {
                    start_ticks
                } else {
                    info.start_ticks
                },
            },
            cmdline: info.cmdline,
            container: info.cgroup.container,
            pod: info.cgroup.pod,
            process,
        }
    }

    /// Inspects `pid` (is it a supported Python?) and builds its info.
    pub fn inspect(pid: u32) -> Result<TargetInfo, InspectError> {
        let process = Inspector::new().inspect(pid)?;
        let start = procinfo::read(pid)
            .map(|i| i.start_ticks)
            .map_err(|_| InspectError::NoSuchProcess { pid })?;
        Ok(TargetInfo::new(process, start))
    }

    /// The target as findings carry it.
    pub fn model(&self) -> pymedic_model::Target {
        pymedic_model::Target {
            pid: self.id.pid,
            exe: self.process.exe.clone(),
            python: Some(self.process.version.to_string()),
            container: self.container.clone(),
            pod: self.pod.clone(),
            start_time_ticks: Some(self.id.start_ticks),
        }
    }

    /// True while this exact process (same start time) is alive.
    pub fn alive(&self) -> bool {
        alive(self.id)
    }
}

/// True while the process `id` exists with the same start time.
pub fn alive(id: TargetId) -> bool {
    procinfo::read(id.pid).is_ok_and(|i| i.start_ticks == id.start_ticks)
}

/// Which discovered processes are watched.
#[derive(Clone, Debug)]
pub struct Selector {
    all: bool,
    pids: Vec<u32>,
    exe: Option<Regex>,
    cmdline: Option<Regex>,
    containers: Vec<String>,
    pods: Vec<String>,
}

impl Selector {
    /// From `[targets]` (already validated by the config loader).
    pub fn from_config(c: &TargetsConfig) -> Result<Selector, regex::Error> {
        let re = |s: &str| -> Result<Option<Regex>, regex::Error> {
            if s.is_empty() {
                Ok(None)
            } else {
                Regex::new(s).map(Some)
            }
        };
        Ok(Selector {
            all: c.all,
            pids: c.pids.clone(),
            exe: re(&c.exe)?,
            cmdline: re(&c.cmdline)?,
            containers: c.containers.clone(),
            pods: c.pods.clone(),
        })
    }

    /// Exactly one process.
    pub fn pid(pid: u32) -> Selector {
        Selector {
            all: false,
            pids: vec![pid],
            exe: None,
            cmdline: None,
            containers: Vec::new(),
            pods: Vec::new(),
        }
    }

    fn has_filters(&self) -> bool {
        !self.pids.is_empty()
            || self.exe.is_some()
            || self.cmdline.is_some()
            || !self.containers.is_empty()
            || !self.pods.is_empty()
    }

    /// With filters: a process matching any of them. Without: every process
    /// when `all`, none otherwise.
    pub fn matches(&self, t: &TargetInfo) -> bool {
        if !self.has_filters() {
            return self.all;
        }
        self.pids.contains(&t.id.pid)
            || self
                .exe
                .as_ref()
                .is_some_and(|re| re.is_match(&t.process.exe))
            || self
                .cmdline
                .as_ref()
                .is_some_and(|re| re.is_match(&t.cmdline.join(" ")))
            || t.container
                .as_deref()
                .is_some_and(|c| self.containers.iter().any(|p| c.starts_with(p.as_str())))
            || t.pod
                .as_deref()
                .is_some_and(|p| self.pods.iter().any(|q| q == p))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pymedic_python::{Build, Version};

    fn info(
        pid: u32,
        exe: &str,
        cmd: &str,
        container: Option<&str>,
        pod: Option<&str>,
    ) -> TargetInfo {
        TargetInfo {
            id: TargetId {
                pid,
                start_ticks: 1,
            },
            process: PythonProcess {
                pid,
                exe: exe.into(),
                version: Version::new(3, 12, Some(1)),
                build: Build::Static,
                interpreter_file: exe.into(),
                load_bias: 0,
                runtime_addr: 0,
            },
            cmdline: cmd.split(' ').map(String::from).collect(),
            container: container.map(String::from),
            pod: pod.map(String::from),
        }
    }

    #[test]
    fn selection_rules() {
        let web = info(
            10,
            "/usr/bin/python3.12",
            "python3 -m gunicorn app:wsgi",
            Some("abcdef0123"),
            Some("pod-1"),
        );
        let job = info(11, "/opt/py/bin/python3.11", "python3 job.py", None, None);
        let all = Selector::from_config(&TargetsConfig::default()).unwrap();
        assert!(all.matches(&web) && all.matches(&job));
        let none = Selector::from_config(&TargetsConfig {
            all: false,
            ..Default::default()
        })
        .unwrap();
        assert!(!none.matches(&web));
        let by_cmd = Selector::from_config(&TargetsConfig {
            cmdline: "gunicorn".into(),
            ..Default::default()
        })
        .unwrap();
        assert!(by_cmd.matches(&web) && !by_cmd.matches(&job));
        let by_exe = Selector::from_config(&TargetsConfig {
            exe: r"^/opt/".into(),
            ..Default::default()
        })
        .unwrap();
        assert!(!by_exe.matches(&web) && by_exe.matches(&job));
        let by_container = Selector::from_config(&TargetsConfig {
            containers: vec!["abcdef".into()],
            ..Default::default()
        })
        .unwrap();
        assert!(by_container.matches(&web) && !by_container.matches(&job));
        let by_pod = Selector::from_config(&TargetsConfig {
            pods: vec!["pod-1".into()],
            ..Default::default()
        })
        .unwrap();
        assert!(by_pod.matches(&web) && !by_pod.matches(&job));
        assert!(Selector::pid(11).matches(&job) && !Selector::pid(11).matches(&web));
    }

    #[test]
    fn identity_includes_start_time() {
        let me = procinfo::read(std::process::id()).unwrap();
        let id = TargetId {
            pid: std::process::id(),
            start_ticks: me.start_ticks,
        };
        assert!(alive(id));
        assert!(!alive(TargetId {
            start_ticks: me.start_ticks + 1,
            ..id
        }));
    }
}
