//! A process's memory mappings, parsed from `/proc/PID/maps`.

use std::path::{Path, PathBuf};

/// One line of `/proc/PID/maps`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mapping {
    pub start: u64,
    pub end: u64,
    /// `r`, `w`, `x`, `p`/`s` as printed.
    pub perms: String,
    pub offset: u64,
    pub inode: u64,
    /// The backing file as the target sees it (its mount namespace), or a
    /// pseudo name like `[heap]`; `None` for anonymous memory.
    pub path: Option<String>,
}

impl Mapping {
    pub fn is_exec(&self) -> bool {
        self.perms.as_bytes().get(2) == Some(&b'x')
    }

    pub fn contains(&self, addr: u64) -> bool {
        (self.start..self.end).contains(&addr)
    }

    /// The file name part of `path`.
    pub fn file_name(&self) -> Option<&str> {
        let p = self.path.as_deref()?;
        if p.starts_with('[') {
            return None;
        }
        Some(p.rsplit('/').next().unwrap_or(p))
    }
}

/// Parses the text of a maps file. Malformed lines are skipped.
pub fn parse(text: &str) -> Vec<Mapping> {
    text.lines().filter_map(parse_line).collect()
}

fn parse_line(line: &str) -> Option<Mapping> {
    let mut it = line.splitn(6, ' ');
    let range = it.next()?;
    let perms = it.next()?;
    let offset = it.next()?;
    let _dev = it.next()?;
    let inode = it.next()?;
    let path = it.next().map(str::trim).filter(|p| !p.is_empty());
    let (start, end) = range.split_once('-')?;
    Some(Mapping {
        start: u64::from_str_radix(start, 16).ok()?,
        end: u64::from_str_radix(end, 16).ok()?,
        perms: perms.to_owned(),
        offset: u64::from_str_radix(offset, 16).ok()?,
        inode: inode.parse().ok()?,
        path: path.map(|p| p.trim_end_matches(" (deleted)").to_owned()),
    })
}

/// Reads and parses `/proc/PID/maps`.
pub fn read(pid: u32) -> std::io::Result<Vec<Mapping>> {
    Ok(parse(&std::fs::read_to_string(format!(
        "/proc/{pid}/maps"
    ))?))
}

/// The path through which this process's view of `path` can be opened from
/// here, crossing mount namespaces (containers): `/proc/PID/root/<path>`.
pub fn host_path(pid: u32, path: &str) -> PathBuf {
    Path::new(&format!("/proc/{pid}/root")).join(path.trim_start_matches('/'))
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "\
00400000-00420000 r--p 00000000 fe:00 1234                               /usr/bin/python3.11
00420000-006b0000 r-xp 00020000 fe:00 1234                               /usr/bin/python3.11
01a2c000-01b4d000 rw-p 00000000 00:00 0                                  [heap]
7f1c2a000000-7f1c2a021000 rw-p 00000000 00:00 0 
7f1c2b600000-7f1c2b700000 r--p 00000000 fe:00 99 /root/.pyenv/versions/3.12.1/lib/libpython3.12.so.1.0
7f1c2c000000-7f1c2c001000 r--p 00000000 fe:00 77 /tmp/gone.so (deleted)
";

    #[test]
    fn parses_all_shapes() {
        let maps = parse(SAMPLE);
        assert_eq!(maps.len(), 6);
        assert_eq!(maps[0].start, 0x400000);
        assert_eq!(maps[1].offset, 0x20000);
        assert!(maps[1].is_exec() && !maps[0].is_exec());
        assert_eq!(maps[2].path.as_deref(), Some("[heap]"));
        assert_eq!(maps[2].file_name(), None);
        assert_eq!(maps[3].path, None);
        assert_eq!(maps[4].file_name(), Some("libpython3.12.so.1.0"));
        assert_eq!(maps[5].path.as_deref(), Some("/tmp/gone.so"));
    }

    #[test]
    fn host_path_crosses_root() {
        assert_eq!(
            host_path(7, "/usr/lib/x.so"),
            PathBuf::from("/proc/7/root/usr/lib/x.so")
        );
    }
}
