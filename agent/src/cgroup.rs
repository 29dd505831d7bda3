//! Container id and Kubernetes pod uid from a process's cgroup path.
//!
//! cgroup v2 puts a process in one path (`0::/...`). Container runtimes name
//! their scopes predictably:
//!
//! | runtime (driver)        | path shape |
//! |-------------------------|------------|
//! | containerd (systemd)    | `/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod<uid_with_underscores>.slice/cri-containerd-<id>.scope` |
//! | containerd (cgroupfs)   | `/kubepods/burstable/pod<uid>/<id>` |
//! | CRI-O (systemd)         | `/kubepods.slice/kubepods-pod<uid>.slice/crio-<id>.scope` |
//! | Docker (systemd)        | `/system.slice/docker-<id>.scope` |
//! | Docker (cgroupfs)       | `/docker/<id>` |
//!
//! The container id is the 64-hex-digit segment; the pod uid is the UUID after
//! `pod` (systemd escapes its dashes as underscores; we restore them).

/// What a cgroup path says about where a process runs.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CgroupInfo {
    pub container: Option<String>,
    pub pod: Option<String>,
}

/// Parses the contents of `/proc/PID/cgroup` (v2 line preferred; v1 lines are
/// scanned too, so hybrid hosts work).
pub fn parse(text: &str) -> CgroupInfo {
    let mut lines: Vec<&str> = text.lines().collect();
    // The unified (v2) hierarchy line is "0::/path"; try it first.
    lines.sort_by_key(|l| !l.starts_with("0::"));
    for line in lines {
        let path = line.splitn(3, ':').nth(2).unwrap_or("");
        let info = parse_path(path);
        if info.container.is_some() || info.pod.is_some() {
            return info;
        }
    }
    CgroupInfo::default()
}

/// Parses one cgroup path.
pub fn parse_path(path: &str) -> CgroupInfo {
    let mut info = CgroupInfo::default();
    for seg in path.split('/') {
        if let Some(uid) = pod_uid(seg) {
            info.pod = Some(uid);
        }
        if let Some(id) = container_id(seg) {
            info.container = Some(id);
        }
    }
    info
}

fn is_hex64(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

fn container_id(seg: &str) -> Option<String> {
    let s = seg.strip_suffix(".scope").unwrap_or(seg);
    // "crio-conmon-<id>" is CRI-O's monitor process, not the container.
    if s.starts_with("crio-conmon-") {
        return None;
    }
    let id = s.rsplit(['-', ':']).next().unwrap_or(s);
    is_hex64(id).then(|| id.to_ascii_lowercase())
}

fn pod_uid(seg: &str) -> Option<String> {
    let s = seg.strip_suffix(".slice").unwrap_or(seg);
    let idx = s.rfind("pod")?;
    let uid = s[idx + 3..].replace('_', "-");
    let ok = uid.len() == 36
        && uid.bytes().enumerate().all(|(i, b)| match i {
            8 | 13 | 18 | 23 => b == b'-',
            _ => b.is_ascii_hexdigit(),
        });
    ok.then(|| uid.to_ascii_lowercase())
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "3f1c9e2d6a7b8c9d0e1f2a3b4c5d6e7f8091a2b3c4d5e6f708192a3b4c5d6e7f";
    const UID: &str = "0b2c5e7a-1d3f-4a6b-9c8d-7e6f5a4b3c2d";

    #[test]
    fn containerd_systemd() {
        let text = format!(
            "0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{}.slice/cri-containerd-{ID}.scope\n",
            UID.replace('-', "_")
        );
        let info = parse(&text);
        assert_eq!(info.container.as_deref(), Some(ID));
        assert_eq!(info.pod.as_deref(), Some(UID));
    }

    #[test]
    fn containerd_cgroupfs() {
        let info = parse(&format!("0::/kubepods/besteffort/pod{UID}/{ID}\n"));
        assert_eq!(info.container.as_deref(), Some(ID));
        assert_eq!(info.pod.as_deref(), Some(UID));
    }

    #[test]
    fn crio_and_its_conmon() {
        let base = format!(
            "0::/kubepods.slice/kubepods-pod{}.slice",
            UID.replace('-', "_")
        );
        let info = parse(&format!("{base}/crio-{ID}.scope\n"));
        assert_eq!(info.container.as_deref(), Some(ID));
        assert_eq!(info.pod.as_deref(), Some(UID));
        let conmon = parse(&format!("{base}/crio-conmon-{ID}.scope\n"));
        assert_eq!(conmon.container, None);
        assert_eq!(conmon.pod.as_deref(), Some(UID));
    }

    #[test]
    fn docker_both_drivers() {
        let a = parse(&format!("0::/system.slice/docker-{ID}.scope\n"));
        assert_eq!((a.container.as_deref(), a.pod), (Some(ID), None));
        let b = parse(&format!("0::/docker/{ID}\n"));
        assert_eq!(b.container.as_deref(), Some(ID));
    }

    #[test]
    fn hybrid_v1_lines() {
        let text = format!("12:pids:/docker/{ID}\n11:memory:/docker/{ID}\n0::/\n");
        assert_eq!(parse(&text).container.as_deref(), Some(ID));
    }

    #[test]
    fn host_processes_have_neither() {
        assert_eq!(
            parse("0::/user.slice/user-0.slice/session-3.scope\n"),
            CgroupInfo::default()
        );
        assert_eq!(parse("0::/init.scope\n"), CgroupInfo::default());
        assert_eq!(parse(""), CgroupInfo::default());
        // A pod-looking word that is not a UUID.
        assert_eq!(
            parse("0::/system.slice/podman.service\n"),
            CgroupInfo::default()
        );
    }
}
