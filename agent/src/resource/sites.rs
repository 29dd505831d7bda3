//! Which line of a stack a person should look at.
//!
//! A descriptor opened by `socket.create_connection()` has its innermost
//! Python frame in the standard library (`socket.py`); the line to fix is
//! the application's call. [`app_frame`] picks the innermost frame outside
//! the interpreter's library directories and site-packages, and falls back
//! to the innermost frame when every frame is library code.

use pymedic_model::{Location, Related, Stack};

use crate::profile::model::Frame;

/// True for frames of the interpreter's own library, installed packages,
/// frozen modules and generated code.
pub fn is_library(file: &str) -> bool {
    if file.is_empty() || file.starts_with('<') {
        return true;
    }
    if file.contains("/site-packages/") || file.contains("/dist-packages/") {
        return true;
    }
    // `/usr/lib/python3.11/socket.py`, `.../versions/3.12.1/lib/python3.12/...`
    if let Some(i) = file.find("/lib/python3.") {
        let rest = &file[i + "/lib/python3.".len()..];
        let digits = rest.chars().take_while(char::is_ascii_digit).count();
        return digits > 0 && rest[digits..].starts_with('/');
    }
    false
}

/// Frames (as symbolized, outermost first) turned into locations,
/// innermost first, without pseudo-frames.
pub fn locations(frames: &[Frame]) -> Vec<Location> {
    frames
        .iter()
        .rev()
        .filter(|f| !f.file.is_empty())
        .map(|f| Location::new(f.file.clone(), f.function.clone(), f.line))
        .collect()
}

/// Index (into innermost-first `stack`) of the line to report: the
/// innermost application frame, else the innermost frame.
pub fn app_frame(stack: &[Location]) -> Option<usize> {
    if stack.is_empty() {
        return None;
    }
    Some(stack.iter().position(|l| !is_library(&l.file)).unwrap_or(0))
}

/// The reported location of a stack and, when it is not the innermost
/// frame, a related entry for the innermost one (`role`).
pub fn site(stack: &[Location], inner_role: &str) -> Option<(Location, Option<Related>)> {
    let i = app_frame(stack)?;
    let inner = (i > 0).then(|| Related::new(&stack[0], inner_role));
    Some((stack[i].clone(), inner))
}

/// A finding's stack entry.
pub fn stack(thread: impl Into<String>, tid: u32, frames: Vec<Location>) -> Stack {
    Stack {
        thread: thread.into(),
        tid,
        frames,
    }
}

/// Whether two function names denote the same function, one perhaps
/// qualified (`Loader.load` and `load`).
pub fn same_function(a: &str, b: &str) -> bool {
    a == b || a.ends_with(&format!(".{b}")) || b.ends_with(&format!(".{a}"))
}

/// `name (file:line)` for titles.
pub fn short(l: &Location) -> String {
    let file = l.file.rsplit('/').next().unwrap_or(&l.file);
    format!("{}:{} ({})", file, l.line, l.function)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn library_files() {
        assert!(is_library("/usr/lib/python3.11/socket.py"));
        assert!(is_library(
            "/root/.pyenv/versions/3.12.1/lib/python3.12/threading.py"
        ));
        assert!(is_library(
            "/app/venv/lib/python3.12/site-packages/requests/api.py"
        ));
        assert!(is_library("<frozen importlib._bootstrap>"));
        assert!(is_library(""));
        assert!(!is_library("/app/service/handlers.py"));
        assert!(!is_library("/srv/lib/python3-tools/app.py"));
        assert!(!is_library("app.py"));
    }

    #[test]
    fn reports_the_innermost_application_frame() {
        let frames = vec![
            Frame {
                function: "<module>".into(),
                file: "/app/main.py".into(),
                line: 40,
            },
            Frame {
                function: "connect".into(),
                file: "/app/main.py".into(),
                line: 12,
            },
            Frame {
                function: "create_connection".into(),
                file: "/usr/lib/python3.11/socket.py".into(),
                line: 836,
            },
            Frame::pseudo("<native>"),
        ];
        let stack = locations(&frames);
        assert_eq!(stack.len(), 3);
        assert_eq!(stack[0].function, "create_connection");
        let (loc, inner) = site(&stack, "opened inside").unwrap();
        assert_eq!((loc.function.as_str(), loc.line), ("connect", 12));
        assert_eq!(inner.unwrap().line, 836);
        // All library: the innermost frame itself, no related entry.
        let lib = locations(&frames[2..3]);
        let (loc, inner) = site(&lib, "x").unwrap();
        assert_eq!(loc.line, 836);
        assert!(inner.is_none());
        assert!(site(&[], "x").is_none());
    }
}

/// Every stack whose application frame is one line, summed: what one site
/// of a leak is (the same `open()` reached through two callers is one
/// place to fix).
#[derive(Clone, Debug, PartialEq)]
pub struct Aggregate {
    pub location: Location,
    /// The innermost frame when it is not the reported one.
    pub inner: Option<Related>,
    pub live: u64,
    pub opened: u64,
    pub closed: u64,
    /// Recent descriptors (or thread ids) made here, newest first.
    pub recent: Vec<u32>,
    /// The stack with the most live entries (innermost first).
    pub stack: Vec<Location>,
}

/// One kernel site: its frames (outermost first) and counters.
pub struct SiteCounts<'a> {
    pub frames: &'a [Frame],
    pub opened: u64,
    pub closed: u64,
    /// Ring of recent handles and the index of the next slot.
    pub recent: &'a [u32],
    pub next: u32,
}

/// Groups sites by their application frame (sites with no Python frame
/// are left out); `inner_role` names the innermost frame when it differs.
pub fn aggregate(sites: &[SiteCounts<'_>], inner_role: &str) -> Vec<Aggregate> {
    let mut out: Vec<Aggregate> = Vec::new();
    let mut best: Vec<u64> = Vec::new();
    for s in sites {
        let stack = locations(s.frames);
        let Some((location, inner)) = site(&stack, inner_role) else {
            continue;
        };
        let live = s.opened.saturating_sub(s.closed);
        let n = s.recent.len() as u32;
        let recent: Vec<u32> = (1..=s.next.min(n))
            .map(|k| s.recent[((s.next - k) % n.max(1)) as usize])
            .collect();
        match out.iter().position(|a| a.location == location) {
            Some(i) => {
                let a = &mut out[i];
                a.live += live;
                a.opened += s.opened;
                a.closed += s.closed;
                if live > best[i] {
                    best[i] = live;
                    a.stack = stack;
                    a.inner = inner;
                    a.recent.splice(0..0, recent);
                } else {
                    a.recent.extend(recent);
                }
            }
            None => {
                best.push(live);
                out.push(Aggregate {
                    location,
                    inner,
                    live,
                    opened: s.opened,
                    closed: s.closed,
                    recent,
                    stack,
                });
            }
        }
    }
    out
}

/// Settings of a per-site leak detector (`fd_leak`, `thread_leak`):
/// `window`, `min_growth` (net rise over the window), `min_z` (trend
/// strength), `max_findings`.
#[derive(Clone, Copy, Debug)]
pub struct Growth {
    pub window: std::time::Duration,
    pub min_growth: u64,
    pub min_z: f64,
    pub max_findings: usize,
}

impl Growth {
    fn rule(&self) -> super::trend::Rule {
        super::trend::Rule {
            min_points: 5,
            min_span: 8.0,
            min_z: self.min_z,
            min_net: self.min_growth as f64,
            min_late_share: 0.25,
        }
    }
}

/// Live counts per site over time, and which sites are leaking.
pub struct SiteTracker {
    series: std::collections::HashMap<Location, super::trend::Series>,
    /// Reported sites and the live count when they were first reported.
    reported: std::collections::HashMap<Location, f64>,
}

/// A leaking site: its aggregate, trend and recent points.
pub struct Leak {
    pub site: Aggregate,
    pub trend: super::trend::Trend,
    pub points: Vec<(f64, f64)>,
}

impl Default for SiteTracker {
    fn default() -> Self {
        Self::new()
    }
}

impl SiteTracker {
    pub fn new() -> SiteTracker {
        SiteTracker {
            series: std::collections::HashMap::new(),
            reported: std::collections::HashMap::new(),
        }
    }

    /// Records the live count of every site at `t` seconds; sites gone
    /// from the kernel's books count as zero.
    pub fn observe(&mut self, t: f64, sites: &[Aggregate]) {
        for a in sites {
            self.series
                .entry(a.location.clone())
                .or_insert_with(|| super::trend::Series::new(128))
                .push(t, a.live as f64);
        }
        for (loc, s) in self.series.iter_mut() {
            if !sites.iter().any(|a| &a.location == loc) {
                s.push(t, 0.0);
            }
        }
        // Forget sites idle at zero for a full series.
        self.series
            .retain(|_, s| s.points().any(|(_, v)| v > 0.0) || s.len() < 128);
    }

    /// One check of a per-site leak detector: the session's counters of
    /// `kind` for `pid` (polled first) aggregated per program site
    /// (`inner_role` names the frames inside it), recorded at `t` seconds,
    /// and the leaking sites, most live first, at most `g.max_findings`.
    pub fn check(
        &mut self,
        session: &std::sync::Mutex<super::session::Session>,
        pid: u32,
        kind: u32,
        inner_role: &str,
        t: f64,
        g: &Growth,
    ) -> Result<Vec<Leak>, super::ResourceError> {
        let aggregates = {
            let mut s = session.lock().unwrap_or_else(|e| e.into_inner());
            s.poll()?;
            let counts: Vec<SiteCounts<'_>> = s
                .sites(pid, kind)
                .iter()
                .map(|v| SiteCounts {
                    frames: &v.frames,
                    opened: v.value.opened,
                    closed: v.value.closed,
                    recent: &v.value.recent,
                    next: v.value.next,
                })
                .collect();
            aggregate(&counts, inner_role)
        };
        self.observe(t, &aggregates);
        let mut leaks = self.leaks(&aggregates, &g.rule(), g.window.as_secs_f64());
        leaks.sort_by_key(|l| std::cmp::Reverse(l.site.live));
        leaks.truncate(g.max_findings);
        Ok(leaks)
    }

    /// Sites whose live count grows steadily over the last `window`
    /// seconds, plus sites already reported whose descriptors are still
    /// open (live above the level where the growth was first seen).
    pub fn leaks(
        &mut self,
        sites: &[Aggregate],
        rule: &super::trend::Rule,
        window: f64,
    ) -> Vec<Leak> {
        let mut out = Vec::new();
        for a in sites {
            let Some(s) = self.series.get(&a.location) else {
                continue;
            };
            let points = s.window(window);
            let Some(trend) = super::trend::analyze(&points) else {
                continue;
            };
            let growing = rule.steady(&trend);
            let still = self
                .reported
                .get(&a.location)
                .is_some_and(|&base| a.live as f64 >= base.max(rule.min_net / 2.0));
            if growing || still {
                if growing {
                    let first = points.first().map(|p| p.1).unwrap_or(0.0);
                    self.reported.entry(a.location.clone()).or_insert(first);
                }
                out.push(Leak {
                    site: a.clone(),
                    trend,
                    points,
                });
            } else {
                self.reported.remove(&a.location);
            }
        }
        out
    }
}

#[cfg(test)]
mod aggregate_tests {
    use super::*;
    use crate::resource::trend::Rule;

    fn f(function: &str, file: &str, line: u32) -> Frame {
        Frame {
            function: function.into(),
            file: file.into(),
            line,
        }
    }

    #[test]
    fn sites_with_one_application_line_are_one_site() {
        let via_a = vec![
            f("main", "/app/m.py", 1),
            f("a", "/app/m.py", 5),
            f("load", "/app/m.py", 20),
        ];
        let via_b = vec![
            f("main", "/app/m.py", 1),
            f("b", "/app/m.py", 9),
            f("load", "/app/m.py", 20),
        ];
        let sock = vec![
            f("main", "/app/m.py", 1),
            f("__init__", "/usr/lib/python3.11/socket.py", 232),
        ];
        let sites = [
            SiteCounts {
                frames: &via_a,
                opened: 10,
                closed: 4,
                recent: &[3, 4, 5, 6],
                next: 6,
            },
            SiteCounts {
                frames: &via_b,
                opened: 30,
                closed: 10,
                recent: &[7, 8, 0, 0],
                next: 2,
            },
            SiteCounts {
                frames: &sock,
                opened: 3,
                closed: 0,
                recent: &[11, 12, 13, 0],
                next: 3,
            },
            SiteCounts {
                frames: &[],
                opened: 99,
                closed: 0,
                recent: &[0; 4],
                next: 0,
            },
        ];
        let agg = aggregate(&sites, "opened inside");
        assert_eq!(agg.len(), 2);
        let load = &agg[0];
        assert_eq!(load.location.line, 20);
        assert_eq!((load.live, load.opened, load.closed), (26, 40, 14));
        // The stack with the most live entries (via b) represents it; its
        // recent descriptors first, newest first.
        assert_eq!(load.stack[1].function, "b");
        assert_eq!(&load.recent[..2], &[8, 7]);
        assert_eq!(load.recent.len(), 6);
        let s = &agg[1];
        assert_eq!(s.location.function, "main");
        assert_eq!(s.inner.as_ref().unwrap().line, 232);
        assert_eq!(s.recent, vec![13, 12, 11]);
    }

    #[test]
    fn tracker_reports_growth_and_keeps_unclosed_leaks() {
        let rule = Rule {
            min_points: 5,
            min_span: 8.0,
            min_z: 3.0,
            min_net: 20.0,
            min_late_share: 0.25,
        };
        let mut t = SiteTracker::new();
        let mut agg = Aggregate {
            location: Location::new("/app/m.py", "load", 20),
            inner: None,
            live: 0,
            opened: 0,
            closed: 0,
            recent: vec![],
            stack: vec![],
        };
        let mut found = 0;
        for i in 0..10 {
            agg.live = 10 * i;
            t.observe(2.0 * i as f64, std::slice::from_ref(&agg));
            found = t.leaks(std::slice::from_ref(&agg), &rule, 60.0).len();
        }
        assert_eq!(found, 1);
        // Growth stops but nothing is closed: still a leak.
        for i in 10..40 {
            t.observe(2.0 * i as f64, std::slice::from_ref(&agg));
        }
        assert_eq!(t.leaks(std::slice::from_ref(&agg), &rule, 20.0).len(), 1);
        // All closed: resolved.
        agg.live = 0;
        t.observe(100.0, std::slice::from_ref(&agg));
        assert!(t.leaks(std::slice::from_ref(&agg), &rule, 20.0).is_empty());
    }
}
