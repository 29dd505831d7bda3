//! CPython versions.

use std::fmt;

use serde::{Deserialize, Serialize};

/// A CPython version such as `3.12.1` or `3.13.0rc2`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Version {
    pub major: u8,
    pub minor: u8,
    /// `None` when only `major.minor` could be established.
    pub patch: Option<u8>,
    /// Pre-release suffix (`a1`, `b2`, `rc1`), empty for a final release.
    pub suffix: String,
}

/// Oldest and newest `(major, minor)` pymedic reads.
pub const OLDEST_SUPPORTED: (u8, u8) = (3, 8);
pub const NEWEST_SUPPORTED: (u8, u8) = (3, 13);

impl Version {
    pub fn new(major: u8, minor: u8, patch: Option<u8>) -> Version {
        Version {
            major,
            minor,
            patch,
            suffix: String::new(),
        }
    }

    /// Decodes `PY_VERSION_HEX` (the `Py_Version` constant of 3.11+):
    /// `0xMMmmppLS` with L the release level (0xA alpha, 0xB beta, 0xC
    /// candidate, 0xF final) and S the serial.
    pub fn from_hex(hex: u32) -> Version {
        let level = (hex >> 4) & 0xf;
        let serial = hex & 0xf;
        let suffix = match level {
            0xa => format!("a{serial}"),
            0xb => format!("b{serial}"),
            0xc => format!("rc{serial}"),
            _ => String::new(),
        };
        Version {
            major: (hex >> 24) as u8,
            minor: (hex >> 16) as u8,
            patch: Some((hex >> 8) as u8),
            suffix,
        }
    }

    /// Parses `3.12`, `3.12.1`, `3.13.0rc2` (a trailing `+` is dropped).
    pub fn parse(s: &str) -> Option<Version> {
        let s = s.trim().trim_end_matches('+');
        let mut parts = s.splitn(3, '.');
        let major = parts.next()?.parse().ok()?;
        let minor = parts.next()?.parse().ok()?;
        let (patch, suffix) = match parts.next() {
            None => (None, String::new()),
            Some(rest) => {
                let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
                if digits == 0 {
                    return None;
                }
                let suffix = &rest[digits..];
                let ok_suffix = suffix.is_empty()
                    || ["a", "b", "rc"].iter().any(|p| {
                        suffix
                            .strip_prefix(p)
                            .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
                    });
                if !ok_suffix {
                    return None;
                }
                (Some(rest[..digits].parse().ok()?), suffix.to_owned())
            }
        };
        Some(Version {
            major,
            minor,
            patch,
            suffix,
        })
    }

    pub fn major_minor(&self) -> (u8, u8) {
        (self.major, self.minor)
    }

    pub fn is_supported(&self) -> bool {
        let mm = self.major_minor();
        mm >= OLDEST_SUPPORTED && mm <= NEWEST_SUPPORTED
    }
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.major, self.minor)?;
        if let Some(p) = self.patch {
            write!(f, ".{p}")?;
        }
        f.write_str(&self.suffix)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_round_trip() {
        assert_eq!(Version::from_hex(0x030c01f0).to_string(), "3.12.1");
        assert_eq!(Version::from_hex(0x030d00c2).to_string(), "3.13.0rc2");
        assert_eq!(Version::from_hex(0x030b02f0).to_string(), "3.11.2");
    }

    #[test]
    fn parse_forms() {
        assert_eq!(
            Version::parse("3.9.18").unwrap(),
            Version::new(3, 9, Some(18))
        );
        assert_eq!(Version::parse("3.10").unwrap(), Version::new(3, 10, None));
        assert_eq!(Version::parse("3.13.0rc2").unwrap().suffix, "rc2");
        assert_eq!(
            Version::parse("3.11.4+").unwrap(),
            Version::new(3, 11, Some(4))
        );
        assert!(Version::parse("3.x").is_none());
        assert!(Version::parse("3.9.1zz").is_none());
    }

    #[test]
    fn support_window() {
        assert!(!Version::new(3, 7, Some(16)).is_supported());
        assert!(Version::new(3, 8, Some(0)).is_supported());
        assert!(Version::new(3, 13, Some(0)).is_supported());
        assert!(!Version::new(3, 14, Some(0)).is_supported());
        assert!(!Version::new(2, 7, Some(18)).is_supported());
    }
}
