//! tracefs: where tracepoints live. aya needs it mounted at
//! `/sys/kernel/tracing` (or the old `/sys/kernel/debug/tracing`); pymedic
//! mounts it when it is missing, and reads tracepoint record formats from it
//! so field offsets are never hard-coded.

use std::path::{Path, PathBuf};

/// Errors finding or mounting tracefs.
#[derive(Debug, thiserror::Error)]
pub enum TracefsError {
    #[error(
        "tracefs is not mounted and mounting it at /sys/kernel/tracing failed ({source}): \
         run as root, or mount it (`mount -t tracefs nodev /sys/kernel/tracing`), or in \
         Kubernetes mount the host's /sys/kernel/tracing into the pod"
    )]
    Mount { source: std::io::Error },
    #[error("tracepoint {category}:{name} does not exist on this kernel ({path})")]
    NoTracepoint {
        category: String,
        name: String,
        path: PathBuf,
    },
    #[error("tracepoint {category}:{name} has no field `{field}` in its format")]
    NoField {
        category: String,
        name: String,
        field: String,
    },
}

const PRIMARY: &str = "/sys/kernel/tracing";
const LEGACY: &str = "/sys/kernel/debug/tracing";

/// Returns the tracefs root, mounting it at `/sys/kernel/tracing` if no
/// tracefs is mounted.
pub fn ensure_mounted() -> Result<PathBuf, TracefsError> {
    for root in [PRIMARY, LEGACY] {
        if Path::new(root).join("events").is_dir() {
            return Ok(PathBuf::from(root));
        }
    }
    let target = std::ffi::CString::new(PRIMARY).expect("no NUL");
    let fstype = std::ffi::CString::new("tracefs").expect("no NUL");
    let source = std::ffi::CString::new("nodev").expect("no NUL");
    // SAFETY: all pointers are valid NUL-terminated strings that outlive the
    // call; `data` may be NULL for tracefs.
    let rc = unsafe {
        libc::mount(
            source.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        return Err(TracefsError::Mount {
            source: std::io::Error::last_os_error(),
        });
    }
    tracing::info!("mounted tracefs at {PRIMARY}");
    Ok(PathBuf::from(PRIMARY))
}

/// The byte offset of `field` in the record of tracepoint `category:name`.
pub fn field_offset(
    root: &Path,
    category: &str,
    name: &str,
    field: &str,
) -> Result<u32, TracefsError> {
    let path = root.join("events").join(category).join(name).join("format");
    let text = std::fs::read_to_string(&path).map_err(|_| TracefsError::NoTracepoint {
        category: category.into(),
        name: name.into(),
        path: path.clone(),
    })?;
    parse_field_offset(&text, field).ok_or_else(|| TracefsError::NoField {
        category: category.into(),
        name: name.into(),
        field: field.into(),
    })
}

/// Finds `offset:N` on the `field:` line declaring `field` in a format file.
pub fn parse_field_offset(format: &str, field: &str) -> Option<u32> {
    for line in format.lines() {
        let line = line.trim();
        let Some(decl) = line.strip_prefix("field:") else {
            continue;
        };
        let decl = decl.split(';').next()?;
        // "pid_t pid" / "char comm[16]" / "__data_loc char[] filename"
        let last = decl.split_whitespace().last()?;
        let ident = last.split('[').next()?;
        if ident != field {
            continue;
        }
        let off = line
            .split(';')
            .find_map(|p| p.trim().strip_prefix("offset:"))?;
        return off.trim().parse().ok();
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    const NEWTASK: &str = "name: task_newtask
ID: 134
format:
\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;
\tfield:int common_pid;\toffset:4;\tsize:4;\tsigned:1;

\tfield:pid_t pid;\toffset:8;\tsize:4;\tsigned:1;
\tfield:char comm[16];\toffset:12;\tsize:16;\tsigned:0;
\tfield:u64 clone_flags;\toffset:32;\tsize:8;\tsigned:0;
";

    #[test]
    fn offsets_from_format() {
        assert_eq!(parse_field_offset(NEWTASK, "pid"), Some(8));
        assert_eq!(parse_field_offset(NEWTASK, "comm"), Some(12));
        assert_eq!(parse_field_offset(NEWTASK, "clone_flags"), Some(32));
        assert_eq!(parse_field_offset(NEWTASK, "common_pid"), Some(4));
        assert_eq!(parse_field_offset(NEWTASK, "nope"), None);
    }
}
