//! The agent's configuration: one schema, three sources.
//!
//! Precedence: command-line flags > `PYMEDIC_*` environment variables > the
//! TOML file (`--config`) > defaults. Every key in [`KEYS`] has an
//! environment variable named `PYMEDIC_` + the key upper-cased with dots
//! replaced by underscores (`detect.cpu_budget` → `PYMEDIC_DETECT_CPU_BUDGET`);
//! list values are comma-separated there. Unknown keys and bad values are
//! rejected with the key (and its source) named. `deploy/pymedic.toml` is the
//! commented reference; `docs/agent.md` documents each key.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Deserializer};

use super::store::Retention;

/// A configuration problem, naming the key and where its value came from.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("read the config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path} is not valid TOML: {message}")]
    Syntax { path: PathBuf, message: String },
    #[error("config key `{key}` (from {source_name}): {message}")]
    Value {
        key: String,
        source_name: String,
        message: String,
    },
}

/// A duration written as "2s", "500ms", "5m", "7d".
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Dur(pub Duration);

impl<'de> Deserialize<'de> for Dur {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        parse_duration(&s)
            .map(Dur)
            .map_err(serde::de::Error::custom)
    }
}

/// Parses "30s", "1m30s", "500ms", "2h", "7d".
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s.trim()).map_err(|e| {
        format!("{s:?} is not a duration ({e}); write e.g. \"30s\", \"500ms\", \"5m\"")
    })
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// gRPC listen address.
    pub listen: String,
    /// Prometheus `/metrics`, `/healthz`, `/readyz`; empty = off.
    pub metrics_listen: String,
    pub data_dir: PathBuf,
    /// Allow a non-loopback `listen` with neither TLS nor a token.
    pub insecure: bool,
    pub auth: AuthConfig,
    pub tls: TlsConfig,
    pub targets: TargetsConfig,
    pub detect: DetectConfig,
    /// Per-detector settings: `[detectors.NAME]` with `enabled`,
    /// `interval` and the detector's own keys.
    pub detectors: BTreeMap<String, toml::Table>,
    pub store: StoreConfig,
    pub capture: CaptureConfig,
}

#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// Bearer token clients must send; prefer `token_file`.
    pub token: String,
    /// File whose first line is the token.
    pub token_file: PathBuf,
}

#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct TlsConfig {
    /// PEM certificate chain of the server.
    pub cert: PathBuf,
    /// PEM private key of the server.
    pub key: PathBuf,
    /// PEM CA bundle; when set, clients must present a certificate it signed.
    pub client_ca: PathBuf,
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct TargetsConfig {
    /// Watch every Python process (unless one of the filters below is set).
    pub all: bool,
    pub pids: Vec<u32>,
    /// Regex matched against the executable path.
    pub exe: String,
    /// Regex matched against the command line joined by spaces.
    pub cmdline: String,
    /// Container id prefixes.
    pub containers: Vec<String>,
    /// Kubernetes pod uids.
    pub pods: Vec<String>,
    /// At most this many targets are watched at once.
    pub max_targets: usize,
}

impl Default for TargetsConfig {
    fn default() -> Self {
        TargetsConfig {
            all: true,
            pids: Vec::new(),
            exe: String::new(),
            cmdline: String::new(),
            containers: Vec::new(),
            pods: Vec::new(),
            max_targets: 256,
        }
    }
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct DetectConfig {
    /// Share of one core the agent may spend checking one target (0.005 =
    /// 0.5 %); checks that cost more are spaced out.
    pub cpu_budget: f64,
    /// A target using more than this many cores is busy: its checks back off.
    pub busy_threshold: f64,
    /// The longest a check is postponed by back-off.
    pub max_backoff: Dur,
    /// Checks running at once across all targets.
    pub workers: usize,
    /// Findings waiting to be stored before detectors are slowed down.
    pub queue: usize,
}

impl Default for DetectConfig {
    fn default() -> Self {
        DetectConfig {
            cpu_budget: 0.005,
            busy_threshold: 0.9,
            max_backoff: Dur(Duration::from_secs(60)),
            workers: 2,
            queue: 1024,
        }
    }
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct StoreConfig {
    /// Resolved findings not seen for this long are deleted.
    pub retention: Dur,
    pub max_findings: u64,
    /// Watch events are kept this long (the longest a client may be away).
    pub event_retention: Dur,
    pub max_events: u64,
}

impl Default for StoreConfig {
    fn default() -> Self {
        let r = Retention::default();
        StoreConfig {
            retention: Dur(r.resolved_for),
            max_findings: r.max_findings,
            event_retention: Dur(r.events_for),
            max_events: r.max_events,
        }
    }
}

impl StoreConfig {
    pub fn retention(&self) -> Retention {
        Retention {
            resolved_for: self.retention.0,
            max_findings: self.max_findings,
            events_for: self.event_retention.0,
            max_events: self.max_events,
        }
    }
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct CaptureConfig {
    /// The longest capture a client may ask for.
    pub max_duration: Dur,
    /// Captures running at once.
    pub max_concurrent: usize,
    /// Artifacts kept on disk (oldest deleted first).
    pub keep: usize,
}

impl Default for CaptureConfig {
    fn default() -> Self {
        CaptureConfig {
            max_duration: Dur(Duration::from_secs(300)),
            max_concurrent: 2,
            keep: 50,
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: "127.0.0.1:7070".into(),
            metrics_listen: String::new(),
            data_dir: PathBuf::from("/var/lib/pymedic"),
            insecure: false,
            auth: AuthConfig::default(),
            tls: TlsConfig::default(),
            targets: TargetsConfig::default(),
            detect: DetectConfig::default(),
            detectors: BTreeMap::new(),
            store: StoreConfig::default(),
            capture: CaptureConfig::default(),
        }
    }
}

/// Value types of the keys settable from the environment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeyType {
    Str,
    Bool,
    Int,
    Float,
    StrList,
    IntList,
}

/// Every fixed key, with its type: the documented schema. Per-detector keys
/// (`detectors.NAME.enabled`, `detectors.NAME.interval`) come on top.
pub const KEYS: &[(&str, KeyType)] = &[
    ("listen", KeyType::Str),
    ("metrics_listen", KeyType::Str),
    ("data_dir", KeyType::Str),
    ("insecure", KeyType::Bool),
    ("auth.token", KeyType::Str),
    ("auth.token_file", KeyType::Str),
    ("tls.cert", KeyType::Str),
    ("tls.key", KeyType::Str),
    ("tls.client_ca", KeyType::Str),
    ("targets.all", KeyType::Bool),
    ("targets.pids", KeyType::IntList),
    ("targets.exe", KeyType::Str),
    ("targets.cmdline", KeyType::Str),
    ("targets.containers", KeyType::StrList),
    ("targets.pods", KeyType::StrList),
    ("targets.max_targets", KeyType::Int),
    ("detect.cpu_budget", KeyType::Float),
    ("detect.busy_threshold", KeyType::Float),
    ("detect.max_backoff", KeyType::Str),
    ("detect.workers", KeyType::Int),
    ("detect.queue", KeyType::Int),
    ("store.retention", KeyType::Str),
    ("store.max_findings", KeyType::Int),
    ("store.event_retention", KeyType::Str),
    ("store.max_events", KeyType::Int),
    ("capture.max_duration", KeyType::Str),
    ("capture.max_concurrent", KeyType::Int),
    ("capture.keep", KeyType::Int),
];

/// The environment variable for a key.
pub fn env_name(key: &str) -> String {
    format!(
        "PYMEDIC_{}",
        key.replace(['.', '-'], "_").to_ascii_uppercase()
    )
}

/// Parses a string (from the environment or a flag) as a value of `ty`.
pub fn parse_value(ty: KeyType, raw: &str) -> Result<toml::Value, String> {
    let list = || raw.split(',').map(str::trim).filter(|s| !s.is_empty());
    Ok(match ty {
        KeyType::Str => toml::Value::String(raw.to_owned()),
        KeyType::Bool => match raw.trim().to_ascii_lowercase().as_str() {
            "1" | "true" | "yes" | "on" => toml::Value::Boolean(true),
            "0" | "false" | "no" | "off" | "" => toml::Value::Boolean(false),
            _ => return Err(format!("{raw:?} is not a boolean (true/false)")),
        },
        KeyType::Int => toml::Value::Integer(
            raw.trim()
                .parse()
                .map_err(|_| format!("{raw:?} is not an integer"))?,
        ),
        KeyType::Float => toml::Value::Float(
            raw.trim()
                .parse()
                .map_err(|_| format!("{raw:?} is not a number"))?,
        ),
        KeyType::StrList => {
            toml::Value::Array(list().map(|s| toml::Value::String(s.to_owned())).collect())
        }
        KeyType::IntList => toml::Value::Array(
            list()
                .map(|s| {
                    s.parse()
                        .map(toml::Value::Integer)
                        .map_err(|_| format!("{s:?} in {raw:?} is not an integer"))
                })
                .collect::<Result<_, _>>()?,
        ),
    })
}

fn set(table: &mut toml::Table, key: &str, value: toml::Value) {
    let mut parts: Vec<&str> = key.split('.').collect();
    let last = parts.pop().unwrap_or(key);
    let mut t = table;
    for p in parts {
        let entry = t
            .entry(p.to_owned())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        if !entry.is_table() {
            *entry = toml::Value::Table(toml::Table::new());
        }
        t = entry.as_table_mut().expect("just made a table");
    }
    t.insert(last.to_owned(), value);
}

/// Where a value came from, for error messages.
fn source_of(
    key: &str,
    overrides: &[(String, toml::Value, String)],
    file: Option<&Path>,
) -> String {
    for (k, _, src) in overrides.iter().rev() {
        if key == k || key.starts_with(&format!("{k}.")) || key.starts_with(&format!("{k}[")) {
            return src.clone();
        }
    }
    match file {
        Some(p) => format!("config file {}", p.display()),
        None => "defaults".into(),
    }
}

impl Config {
    /// Loads the configuration: `file` (if any), then the `PYMEDIC_*`
    /// variables from `env`, then `flags` (`(key, value)` pairs already
    /// typed), validated. `detector_names` adds `detectors.NAME.enabled`
    /// and `.interval` to the environment keys.
    pub fn load(
        file: Option<&Path>,
        env: impl Fn(&str) -> Option<String>,
        flags: &[(&str, toml::Value)],
        detector_names: &[&str],
    ) -> Result<Config, ConfigError> {
        let mut table = match file {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                    path: path.to_owned(),
                    source,
                })?;
                text.parse::<toml::Table>()
                    .map_err(|e| ConfigError::Syntax {
                        path: path.to_owned(),
                        message: e.to_string(),
                    })?
            }
            None => toml::Table::new(),
        };
        let mut overrides: Vec<(String, toml::Value, String)> = Vec::new();
        let detector_keys: Vec<(String, KeyType)> = detector_names
            .iter()
            .flat_map(|n| {
                [
                    (format!("detectors.{n}.enabled"), KeyType::Bool),
                    (format!("detectors.{n}.interval"), KeyType::Str),
                ]
            })
            .collect();
        let keys = KEYS
            .iter()
            .map(|(k, t)| ((*k).to_owned(), *t))
            .chain(detector_keys);
        for (key, ty) in keys {
            let var = env_name(&key);
            if let Some(raw) = env(&var) {
                let value = parse_value(ty, &raw).map_err(|message| ConfigError::Value {
                    key: key.clone(),
                    source_name: format!("environment variable {var}"),
                    message,
                })?;
                overrides.push((key, value, format!("environment variable {var}")));
            }
        }
        for (key, value) in flags {
            let flag = format!("--{}", key.replace(['.', '_'], "-"));
            overrides.push(((*key).to_owned(), value.clone(), format!("flag {flag}")));
        }
        for (key, value, _) in &overrides {
            set(&mut table, key, value.clone());
        }
        let config: Config =
            serde_path_to_error::deserialize(toml::Value::Table(table)).map_err(|e| {
                let key = e.path().to_string();
                ConfigError::Value {
                    source_name: source_of(&key, &overrides, file),
                    message: e.into_inner().to_string(),
                    key,
                }
            })?;
        config.validate(|key| source_of(key, &overrides, file))?;
        Ok(config)
    }

    fn validate(&self, source: impl Fn(&str) -> String) -> Result<(), ConfigError> {
        let bad = |key: &str, message: String| ConfigError::Value {
            key: key.to_owned(),
            source_name: source(key),
            message,
        };
        self.listen_addr().map_err(|m| bad("listen", m))?;
        if !self.metrics_listen.is_empty() {
            self.metrics_listen.parse::<SocketAddr>().map_err(|e| {
                bad(
                    "metrics_listen",
                    format!(
                        "{:?}: {e}; write e.g. \"0.0.0.0:9464\"",
                        self.metrics_listen
                    ),
                )
            })?;
        }
        for (key, re) in [
            ("targets.exe", &self.targets.exe),
            ("targets.cmdline", &self.targets.cmdline),
        ] {
            if !re.is_empty() {
                regex::Regex::new(re).map_err(|e| bad(key, format!("not a valid regex: {e}")))?;
            }
        }
        let d = &self.detect;
        if !(d.cpu_budget > 0.0 && d.cpu_budget <= 1.0) {
            return Err(bad(
                "detect.cpu_budget",
                format!("{} is not in (0, 1] (a share of one core)", d.cpu_budget),
            ));
        }
        if d.busy_threshold <= 0.0 {
            return Err(bad(
                "detect.busy_threshold",
                format!("{} must be > 0 (cores)", d.busy_threshold),
            ));
        }
        if d.workers == 0 || d.workers > 64 {
            return Err(bad(
                "detect.workers",
                format!("{} is not in 1..=64", d.workers),
            ));
        }
        if d.queue == 0 {
            return Err(bad("detect.queue", "must be at least 1".into()));
        }
        if self.targets.max_targets == 0 {
            return Err(bad("targets.max_targets", "must be at least 1".into()));
        }
        if self.capture.max_concurrent == 0 {
            return Err(bad("capture.max_concurrent", "must be at least 1".into()));
        }
        let tls = &self.tls;
        if tls.cert.as_os_str().is_empty() != tls.key.as_os_str().is_empty() {
            return Err(bad(
                "tls.cert",
                "tls.cert and tls.key go together: set both or neither".into(),
            ));
        }
        if !tls.client_ca.as_os_str().is_empty() && tls.cert.as_os_str().is_empty() {
            return Err(bad(
                "tls.client_ca",
                "client certificates (mTLS) need tls.cert and tls.key too".into(),
            ));
        }
        if !self.auth.token.is_empty() && !self.auth.token_file.as_os_str().is_empty() {
            return Err(bad(
                "auth.token",
                "set auth.token or auth.token_file, not both".into(),
            ));
        }
        for (name, table) in &self.detectors {
            for (k, v) in table {
                let key = format!("detectors.{name}.{k}");
                match k.as_str() {
                    "enabled" if !v.is_bool() => {
                        return Err(bad(&key, "must be true or false".into()));
                    }
                    "interval" => {
                        let s = v.as_str().ok_or_else(|| {
                            bad(&key, "must be a duration string such as \"2s\"".into())
                        })?;
                        parse_duration(s).map_err(|m| bad(&key, m))?;
                    }
                    _ => {}
                }
            }
        }
        Ok(())
    }

    /// The gRPC listen address.
    pub fn listen_addr(&self) -> Result<SocketAddr, String> {
        self.listen
            .parse()
            .map_err(|e| format!("{:?}: {e}; write e.g. \"127.0.0.1:7070\"", self.listen))
    }

    /// `[detectors.NAME]`, empty when absent.
    pub fn detector(&self, name: &str) -> toml::Table {
        self.detectors.get(name).cloned().unwrap_or_default()
    }

    /// Whether a detector is enabled (default yes).
    pub fn detector_enabled(&self, name: &str) -> bool {
        self.detectors
            .get(name)
            .and_then(|t| t.get("enabled"))
            .and_then(toml::Value::as_bool)
            .unwrap_or(true)
    }

    /// A detector's interval override.
    pub fn detector_interval(&self, name: &str) -> Option<Duration> {
        let s = self.detectors.get(name)?.get("interval")?.as_str()?;
        parse_duration(s).ok()
    }

    /// The bearer token, read from `auth.token_file` when set.
    pub fn token(&self) -> Result<Option<String>, ConfigError> {
        if !self.auth.token.is_empty() {
            return Ok(Some(self.auth.token.clone()));
        }
        if self.auth.token_file.as_os_str().is_empty() {
            return Ok(None);
        }
        let text =
            std::fs::read_to_string(&self.auth.token_file).map_err(|source| ConfigError::Read {
                path: self.auth.token_file.clone(),
                source,
            })?;
        let token = text.lines().next().unwrap_or("").trim().to_owned();
        if token.is_empty() {
            return Err(ConfigError::Value {
                key: "auth.token_file".into(),
                source_name: self.auth.token_file.display().to_string(),
                message: "the token file is empty".into(),
            });
        }
        Ok(Some(token))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn no_env(_: &str) -> Option<String> {
        None
    }

    fn load_str(text: &str, env: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pymedic.toml");
        std::fs::write(&path, text).unwrap();
        let env: Vec<(String, String)> = env
            .iter()
            .map(|(k, v)| ((*k).into(), (*v).into()))
            .collect();
        Config::load(
            Some(&path),
            |k| env.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone()),
            &[],
            &["deadlock"],
        )
    }

    #[test]
    fn defaults_are_valid() {
        let c = Config::load(None, no_env, &[], &[]).unwrap();
        assert_eq!(c, Config::default());
        assert!(c.listen_addr().unwrap().ip().is_loopback());
    }

    #[test]
    fn reference_config_parses() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/pymedic.toml");
        let c = Config::load(Some(&path), no_env, &[], &[]).unwrap();
        assert_eq!(c.data_dir, PathBuf::from("/var/lib/pymedic"));
    }

    #[test]
    fn file_env_and_flags_layer_in_order() {
        let c = load_str(
            "listen = \"127.0.0.1:9000\"\n[detect]\ncpu_budget = 0.01\n[targets]\nexe = \"python\"\n",
            &[("PYMEDIC_DETECT_CPU_BUDGET", "0.02"), ("PYMEDIC_TARGETS_PIDS", "1, 2"), ("PYMEDIC_DETECTORS_DEADLOCK_INTERVAL", "3s")],
        )
        .unwrap();
        assert_eq!(c.listen, "127.0.0.1:9000");
        assert_eq!(c.detect.cpu_budget, 0.02);
        assert_eq!(c.targets.pids, vec![1, 2]);
        assert_eq!(
            c.detector_interval("deadlock"),
            Some(Duration::from_secs(3))
        );
        let flags = [("listen", toml::Value::String("127.0.0.1:1".into()))];
        let c = Config::load(
            None,
            |k| (k == "PYMEDIC_LISTEN").then(|| "127.0.0.1:2".into()),
            &flags,
            &[],
        )
        .unwrap();
        assert_eq!(c.listen, "127.0.0.1:1");
    }

    #[test]
    fn bad_values_name_the_key_and_source() {
        let msg = |r: Result<Config, ConfigError>| r.unwrap_err().to_string();
        let m = msg(load_str("[detect]\ncpu_budget = \"lots\"\n", &[]));
        assert!(
            m.contains("detect.cpu_budget") && m.contains("config file"),
            "{m}"
        );
        let m = msg(load_str("[detect]\ncpu_budget = 3.0\n", &[]));
        assert!(
            m.contains("detect.cpu_budget") && m.contains("(0, 1]"),
            "{m}"
        );
        let m = msg(load_str("[store]\nretention = \"forever\"\n", &[]));
        assert!(
            m.contains("store.retention") && m.contains("duration"),
            "{m}"
        );
        let m = msg(load_str("[targets]\nexe = \"(\"\n", &[]));
        assert!(m.contains("targets.exe") && m.contains("regex"), "{m}");
        let m = msg(load_str("[detect]\nfrobnicate = 1\n", &[]));
        assert!(m.contains("frobnicate"), "{m}");
        let m = msg(load_str("", &[("PYMEDIC_INSECURE", "perhaps")]));
        assert!(
            m.contains("insecure") && m.contains("PYMEDIC_INSECURE"),
            "{m}"
        );
        let m = msg(load_str("", &[("PYMEDIC_LISTEN", "nowhere")]));
        assert!(
            m.contains("`listen`") && m.contains("PYMEDIC_LISTEN"),
            "{m}"
        );
        let m = msg(load_str("[tls]\ncert = \"/x.pem\"\n", &[]));
        assert!(m.contains("tls.key"), "{m}");
        let m = msg(load_str(
            "[detectors.deadlock]\ninterval = \"often\"\n",
            &[],
        ));
        assert!(m.contains("detectors.deadlock.interval"), "{m}");
        let m = msg(load_str("listen = [", &[]));
        assert!(m.contains("not valid TOML"), "{m}");
    }
}
