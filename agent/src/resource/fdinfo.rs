//! What a process's descriptors point to, from `/proc`: the link of
//! `/proc/PID/fd/N` (a path, `socket:[INODE]`, `pipe:[INODE]`,
//! `anon_inode:[eventfd]`), socket endpoints by inode from the process's
//! own network namespace (`/proc/PID/net/{tcp,tcp6,udp,udp6,unix}`), and
//! the descriptor limit from `/proc/PID/limits`. Parsers are pure and unit
//! tested; the readers return `None` when the process or entry is gone.

use std::collections::HashMap;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};

/// The target of descriptor `fd` of `pid` (`readlink /proc/PID/fd/FD`).
pub fn target(pid: u32, fd: u32) -> Option<String> {
    std::fs::read_link(format!("/proc/{pid}/fd/{fd}"))
        .ok()
        .map(|p| p.to_string_lossy().into_owned())
}

/// Open descriptors of `pid` right now.
pub fn count(pid: u32) -> Option<u64> {
    Some(std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?.count() as u64)
}

/// `socket:[12345]` → 12345.
pub fn socket_inode(link: &str) -> Option<u64> {
    link.strip_prefix("socket:[")?
        .strip_suffix(']')?
        .parse()
        .ok()
}

/// The soft and hard limits of "Max open files" in a limits file
/// (`None` for "unlimited").
pub fn parse_nofile(limits: &str) -> Option<(Option<u64>, Option<u64>)> {
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    let mut it = line["Max open files".len()..].split_whitespace();
    let parse = |s: Option<&str>| -> Option<Option<u64>> {
        match s? {
            "unlimited" => Some(None),
            v => v.parse().ok().map(Some),
        }
    };
    Some((parse(it.next())?, parse(it.next())?))
}

/// The soft descriptor limit of `pid`.
pub fn nofile_limit(pid: u32) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/limits")).ok()?;
    parse_nofile(&text)?.0
}

/// A socket's endpoints.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SocketInfo {
    /// `tcp`, `tcp6`, `udp`, `udp6`, `unix`.
    pub proto: &'static str,
    pub local: String,
    /// Empty for listening or unconnected sockets.
    pub peer: String,
    /// TCP state name, or empty.
    pub state: &'static str,
}

impl SocketInfo {
    /// `tcp 127.0.0.1:5000 -> 127.0.0.1:41234 (ESTABLISHED)`.
    pub fn describe(&self) -> String {
        let mut s = format!("{} {}", self.proto, self.local);
        if !self.peer.is_empty() {
            s.push_str(&format!(" -> {}", self.peer));
        }
        if !self.state.is_empty() {
            s.push_str(&format!(" ({})", self.state));
        }
        s
    }
}

const TCP_STATES: [&str; 13] = [
    "",
    "ESTABLISHED",
    "SYN_SENT",
    "SYN_RECV",
    "FIN_WAIT1",
    "FIN_WAIT2",
    "TIME_WAIT",
    "CLOSE",
    "CLOSE_WAIT",
    "LAST_ACK",
    "LISTEN",
    "CLOSING",
    "NEW_SYN_RECV",
];

/// `0100007F:1388` (v4) or 32 hex digits + port (v6) as the kernel prints
/// them (little-endian 32-bit words).
fn parse_addr(s: &str) -> Option<SocketAddr> {
    let (ip, port) = s.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    match ip.len() {
        8 => {
            let v = u32::from_str_radix(ip, 16).ok()?;
            Some(SocketAddr::from((Ipv4Addr::from(v.swap_bytes()), port)))
        }
        32 => {
            let mut bytes = [0u8; 16];
            for w in 0..4 {
                let word = u32::from_str_radix(&ip[w * 8..w * 8 + 8], 16).ok()?;
                bytes[w * 4..w * 4 + 4].copy_from_slice(&word.to_le_bytes());
            }
            Some(SocketAddr::from((Ipv6Addr::from(bytes), port)))
        }
        _ => None,
    }
}

/// Parses `/proc/net/{tcp,tcp6,udp,udp6}` into inode → endpoints.
pub fn parse_inet(text: &str, proto: &'static str) -> HashMap<u64, SocketInfo> {
    let mut out = HashMap::new();
    for line in text.lines().skip(1) {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() < 10 {
            continue;
        }
        let (Some(local), Some(remote), Ok(state), Ok(inode)) = (
            parse_addr(f[1]),
            parse_addr(f[2]),
            u8::from_str_radix(f[3], 16),
            f[9].parse::<u64>(),
        ) else {
            continue;
        };
        let peer = if remote.port() == 0 {
            String::new()
        } else {
            remote.to_string()
        };
        let state = if proto.starts_with("tcp") {
            TCP_STATES.get(state as usize).copied().unwrap_or("")
        } else {
            ""
        };
        out.insert(
            inode,
            SocketInfo {
                proto,
                local: local.to_string(),
                peer,
                state,
            },
        );
    }
    out
}

/// Parses `/proc/net/unix` into inode → endpoints (the bound path, if any).
pub fn parse_unix(text: &str) -> HashMap<u64, SocketInfo> {
    let mut out = HashMap::new();
    for line in text.lines().skip(1) {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() < 7 {
            continue;
        }
        let Ok(inode) = f[6].parse::<u64>() else {
            continue;
        };
        let path = f.get(7).map(|s| s.to_string()).unwrap_or_default();
        out.insert(
            inode,
            SocketInfo {
                proto: "unix",
                local: if path.is_empty() {
                    "(unnamed)".into()
                } else {
                    path
                },
                peer: String::new(),
                state: "",
            },
        );
    }
    out
}

/// Every socket visible in `pid`'s network namespace, by inode.
pub fn sockets(pid: u32) -> HashMap<u64, SocketInfo> {
    let mut out = HashMap::new();
    for proto in ["tcp", "tcp6", "udp", "udp6"] {
        if let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/net/{proto}")) {
            out.extend(parse_inet(&text, proto));
        }
    }
    if let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/net/unix")) {
        out.extend(parse_unix(&text));
    }
    out
}

/// A descriptor's target in words: a path, or a socket's endpoints.
pub fn describe(link: &str, sockets: &HashMap<u64, SocketInfo>) -> String {
    match socket_inode(link).and_then(|i| sockets.get(&i)) {
        Some(s) => s.describe(),
        None => link.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits() {
        let text = "Limit                     Soft Limit           Hard Limit           Units     \n\
                    Max cpu time              unlimited            unlimited            seconds   \n\
                    Max open files            1024                 524288               files     \n";
        assert_eq!(parse_nofile(text), Some((Some(1024), Some(524288))));
        let unl = "Max open files            unlimited            unlimited            files\n";
        assert_eq!(parse_nofile(unl), Some((None, None)));
        assert_eq!(parse_nofile("nothing"), None);
    }

    #[test]
    fn inet_tables() {
        let tcp = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n\
   0: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 11111 1 0000000000000000 100 0 0 10 0\n\
   1: 0100007F:A1B2 0100007F:1F90 01 00000000:00000000 00:00000000 00000000     0        0 22222 1 0000000000000000 20 4 30 10 -1\n";
        let m = parse_inet(tcp, "tcp");
        assert_eq!(m[&11111].describe(), "tcp 127.0.0.1:8080 (LISTEN)");
        assert_eq!(
            m[&22222].describe(),
            "tcp 127.0.0.1:41394 -> 127.0.0.1:8080 (ESTABLISHED)"
        );
        let tcp6 = "header\n   0: 00000000000000000000000001000000:1F90 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 33333 1\n";
        let m6 = parse_inet(tcp6, "tcp6");
        assert_eq!(m6[&33333].local, "[::1]:8080");
    }

    #[test]
    fn unix_and_links() {
        let unix = "Num       RefCount Protocol Flags    Type St Inode Path\n\
                    0000000000000000: 00000002 00000000 00010000 0001 01 44444 /run/app.sock\n\
                    0000000000000000: 00000003 00000000 00000000 0001 03 55555\n";
        let m = parse_unix(unix);
        assert_eq!(m[&44444].local, "/run/app.sock");
        assert_eq!(m[&55555].local, "(unnamed)");
        assert_eq!(socket_inode("socket:[44444]"), Some(44444));
        assert_eq!(socket_inode("/tmp/x"), None);
        assert_eq!(describe("socket:[44444]", &m), "unix /run/app.sock");
        assert_eq!(describe("/var/log/app.log", &m), "/var/log/app.log");
    }
}
