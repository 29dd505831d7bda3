//! `blocked_event_loop`: an asyncio (or uvloop) event loop whose thread runs
//! one step longer than `threshold` (100 ms): nothing else on that loop can
//! run meanwhile. Names the blocking call site and the coroutine that made
//! the call, with loop-lag figures.
//!
//! Source: the shared waits sensor ([`crate::waits`]). Both asyncio's
//! selector and libuv wait for events in `epoll_wait`/`epoll_pwait`; the
//! time from one wait's return to the next wait's entry is a step. While a
//! step runs, the kernel keeps the stack of the longest time the thread
//! spent off CPU (a synchronous `time.sleep`, a blocking socket call) and,
//! once the step is long, on-CPU samples of its stack (a CPU loop inside a
//! coroutine). A check (every 200 ms) reads each loop thread's state:
//! overruns that finished since the previous check, and a step overrunning
//! right now (a loop stuck in a call). A thread is an event loop when the
//! blocking stack runs a coroutine (`async def` frames) or asyncio/uvloop
//! code.
//!
//! One finding per (loop thread, blocking site); it stays reported for
//! `hold` (60 s) after that site last blocked the loop.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use pymedic_model::{Finding, Kind, Layer, Location, Related, Severity, Stack};
use serde_json::json;

use super::sites::{self, Sum};
use super::{CheckContext, DetectError, Detector, Settings, Watch};
use crate::dump::wait::is_stdlib;
use crate::engine::targets::TargetInfo;
use crate::waits::{self, Frames, LoopThread, StackFrame, Subscription};

const NAME: &str = "blocked_event_loop";

#[derive(Clone, Copy, Debug)]
struct Params {
    threshold: Duration,
    hold: Duration,
}

pub struct BlockedEventLoop {
    params: Params,
}

/// `[detectors.blocked_event_loop]`: `interval` (200ms), `threshold`
/// (100ms; at least 50ms, the kernel's own cut), `hold` (60s).
pub fn new(s: &Settings) -> Result<Arc<dyn Detector>, DetectError> {
    s.only(&["threshold", "hold"])?;
    let threshold = s.duration("threshold", Duration::from_millis(100))?;
    if threshold < waits::KERNEL_STEP_THRESHOLD {
        return Err(DetectError::Setting {
            detector: NAME,
            key: "threshold".into(),
            message: format!(
                "{threshold:?} is below {:?}, the shortest step the sensor keeps stacks for",
                waits::KERNEL_STEP_THRESHOLD
            ),
        });
    }
    Ok(Arc::new(BlockedEventLoop {
        params: Params {
            threshold,
            hold: s.duration("hold", Duration::from_secs(60))?,
        },
    }))
}

impl Detector for BlockedEventLoop {
    fn name(&self) -> &'static str {
        NAME
    }
    fn layer(&self) -> Layer {
        Layer::Temporal
    }
    fn kinds(&self) -> Vec<Kind> {
        vec![Kind::BLOCKED_EVENT_LOOP]
    }
    fn interval(&self) -> Duration {
        Duration::from_millis(200)
    }
    fn backs_off_when_busy(&self) -> bool {
        false
    }
    fn watch(&self, target: &TargetInfo) -> Result<Option<Box<dyn Watch>>, DetectError> {
        let Some(sub) = super::subscribe_waits(NAME, target)? else {
            return Ok(None);
        };
        Ok(Some(Box::new(LoopWatch {
            sub,
            params: self.params,
            last_end: HashMap::new(),
            blocks: HashMap::new(),
            lag: HashMap::new(),
        })))
    }
}

/// Overruns at one site of one loop thread.
struct Block {
    sum: Sum,
    stack: Frames,
    last: Instant,
    /// The step still running, if it is one (its length so far).
    ongoing: Option<Duration>,
}

/// Lag figures of one loop thread.
#[derive(Clone, Copy, Default)]
struct Lag {
    steps: u64,
    overruns: u64,
    max_step: Duration,
}

struct LoopWatch {
    sub: Subscription,
    params: Params,
    /// Per thread: end time of the latest overrun already counted.
    last_end: HashMap<u32, u64>,
    blocks: HashMap<(u32, Location), Block>,
    lag: HashMap<u32, Lag>,
}

fn is_library(file: &str) -> bool {
    is_stdlib(file)
        || file.contains("/site-packages/")
        || file.contains("/dist-packages/")
        || file.starts_with('<')
}

/// Where the loop was blocked from: the line of the coroutine that made the
/// blocking call (stable while the call runs), else the innermost frame of
/// the program itself (a plain callback).
/// Only frames the loop called into count: those inside its innermost
/// asyncio/uvloop frame (the runner and `<module>` below it do not).
fn call_site(stack: &[StackFrame]) -> Option<Location> {
    let inner = &stack[..machinery(stack).unwrap_or(stack.len())];
    coroutine(inner)
        .or_else(|| inner.iter().find(|f| !is_library(&f.loc.file)))
        .map(|f| f.loc.clone())
}

/// Index of the innermost event-loop frame.
fn machinery(stack: &[StackFrame]) -> Option<usize> {
    stack
        .iter()
        .position(|f| f.loc.file.contains("/asyncio/") || f.loc.file.contains("/uvloop/"))
}

/// The innermost frame of the program itself inside the call (a CPU loop
/// in a helper, the line calling `requests.get`).
fn blocking_code(stack: &[StackFrame]) -> Option<&StackFrame> {
    stack.iter().find(|f| !is_library(&f.loc.file))
}

/// The coroutine that made the call: the innermost `async def` frame.
fn coroutine(stack: &[StackFrame]) -> Option<&StackFrame> {
    stack.iter().find(|f| f.is_async())
}

/// A stack that runs an event loop's callback.
fn is_loop_stack(stack: &[StackFrame]) -> bool {
    stack.iter().any(|f| {
        f.is_async() || f.loc.file.contains("/asyncio/") || f.loc.file.contains("/uvloop/")
    })
}

/// The stack that explains a step: the longest off-CPU stretch when it
/// covers half the step, else the on-CPU sample, else whatever exists.
fn pick(step: Duration, block: Duration, block_stack: u64, cpu_stack: u64) -> Option<u64> {
    let ok = |id: u64| (id != 0).then_some(id);
    if block * 2 >= step {
        ok(block_stack).or(ok(cpu_stack))
    } else {
        ok(cpu_stack).or(ok(block_stack))
    }
}

impl LoopWatch {
    fn note(
        &mut self,
        tid: u32,
        stack: &Frames,
        step: Duration,
        ongoing: bool,
    ) -> Option<(u32, Location)> {
        if !is_loop_stack(stack) {
            return None;
        }
        let site = call_site(stack)?;
        let key = (tid, site);
        let b = self.blocks.entry(key.clone()).or_insert_with(|| Block {
            sum: Sum::default(),
            stack: stack.clone(),
            last: Instant::now(),
            ongoing: None,
        });
        b.last = Instant::now();
        b.stack = stack.clone();
        if ongoing {
            b.ongoing = Some(step);
            b.sum.max = b.sum.max.max(step);
        } else {
            b.ongoing = None;
            b.sum.add(1, step, step);
        }
        Some(key)
    }

    /// Ends the ongoing state of `tid`'s blocks except `keep`.
    fn settle(&mut self, tid: u32, keep: Option<&(u32, Location)>) {
        for (k, b) in self.blocks.iter_mut() {
            if k.0 == tid && Some(k) != keep {
                b.ongoing = None;
            }
        }
    }

    fn observe(&mut self, lt: &LoopThread) {
        let s = lt.raw;
        let frames = |id: u64| lt.stacks.get(&id).cloned();
        let lag = self.lag.entry(lt.tid).or_default();
        lag.steps = s.steps;
        lag.overruns = s.overruns;
        lag.max_step = Duration::from_nanos(s.max_step_ns);
        // An overrun that finished since the previous check.
        let last = Duration::from_nanos(s.last_overrun_ns);
        let prev_end = self.last_end.get(&lt.tid).copied().unwrap_or(0);
        if s.last_overrun_end_ns != 0 && s.last_overrun_end_ns != prev_end {
            self.last_end.insert(lt.tid, s.last_overrun_end_ns);
            self.settle(lt.tid, None);
            if last >= self.params.threshold
                && let Some(id) = pick(
                    last,
                    Duration::from_nanos(s.last_block_ns),
                    s.last_block_stack,
                    s.last_cpu_stack,
                )
                && let Some(stack) = frames(id)
            {
                self.note(lt.tid, &stack, last, false);
            }
        }
        // A step overrunning right now.
        let mut now_key = None;
        if let Some(age) = lt.step_age
            && age >= self.params.threshold
        {
            let id = if s.off_start_ns != 0 && s.off_stack != 0 {
                Some(s.off_stack)
            } else {
                pick(
                    age,
                    Duration::from_nanos(s.step_block_ns),
                    s.step_block_stack,
                    s.step_cpu_stack,
                )
            };
            if let Some(stack) = id.and_then(frames) {
                now_key = self.note(lt.tid, &stack, age, true);
            }
        }
        self.settle(lt.tid, now_key.as_ref());
    }
}

impl Watch for LoopWatch {
    fn check(&mut self, cx: &CheckContext<'_>) -> Result<Vec<Finding>, DetectError> {
        let v = self.sub.view().map_err(|e| DetectError::Check {
            detector: NAME,
            op: "read the waits sensor",
            message: e.to_string(),
        })?;
        for lt in &v.loops {
            self.observe(lt);
        }
        let hold = self.params.hold;
        // Sightings of a step that then ended under another site are not
        // overruns of their own.
        self.blocks
            .retain(|_, b| b.ongoing.is_some() || (b.sum.count > 0 && b.last.elapsed() < hold));
        if self.blocks.is_empty() {
            return Ok(Vec::new());
        }
        // Thread names cost a read of every thread: only for a finding.
        let names = self.sub.thread_names();
        let mut out = Vec::new();
        for ((tid, site), b) in &self.blocks {
            let mut f = self.finding(*tid, site, b, &names, cx);
            let extra = super::explain::related(&f, cx.target.id.pid);
            f.related.extend(extra.iter().cloned());
            out.push(f);
        }
        Ok(out)
    }
}

impl LoopWatch {
    fn finding(
        &self,
        tid: u32,
        site: &Location,
        b: &Block,
        names: &HashMap<u32, String>,
        cx: &CheckContext<'_>,
    ) -> Finding {
        let coro = coroutine(&b.stack);
        let worst = b.sum.max.max(b.ongoing.unwrap_or_default());
        let what = match b.ongoing {
            Some(d) => format!("has been blocked for {:.0} ms", sites::ms(d)),
            None => format!(
                "was blocked {} times (longest {:.0} ms)",
                b.sum.count,
                sites::ms(worst)
            ),
        };
        let title = match coro {
            Some(c) => format!(
                "Event loop {what} by a call at {}:{} in coroutine {}",
                site.file, site.line, c.loc.function
            ),
            None => format!("Event loop {what} by a call at {}:{}", site.file, site.line),
        };
        let severity = if worst >= Duration::from_secs(1) {
            Severity::High
        } else {
            Severity::Medium
        };
        let mut f = Finding::new(
            Layer::Temporal,
            Kind::BLOCKED_EVENT_LOOP,
            severity,
            0.9,
            title,
            Some(cx.target.model()),
            site.clone(),
        )
        .with_discriminator(&tid.to_string());
        if let Some(c) = coro {
            f.related
                .push(Related::new(&c.loc, "coroutine that made the call"));
        }
        if let Some(code) = blocking_code(&b.stack)
            && &code.loc != site
        {
            f.related
                .push(Related::new(&code.loc, "blocking code runs here"));
        }
        if let Some(inner) = b.stack.first()
            && Some(&inner.loc) != blocking_code(&b.stack).map(|c| &c.loc)
            && &inner.loc != site
        {
            f.related.push(Related::new(&inner.loc, "innermost call"));
        }
        let thread = names
            .get(&tid)
            .cloned()
            .unwrap_or_else(|| format!("tid {tid}"));
        f.stacks.push(Stack {
            thread: thread.clone(),
            tid,
            frames: waits::locations(&b.stack),
        });
        let lag = self.lag.get(&tid).copied().unwrap_or_default();
        f.evidence = json!({
            "loop_thread": {"tid": tid, "name": thread},
            "threshold_ms": sites::ms(self.params.threshold),
            "overruns_here": b.sum.count,
            "blocked_ms_here": sites::ms(b.sum.total),
            "longest_step_here_ms": sites::ms(worst),
            "ongoing_step_ms": b.ongoing.map(sites::ms),
            "loop_steps": lag.steps,
            "loop_overruns": lag.overruns,
            "loop_max_step_ms": sites::ms(lag.max_step),
            "coroutine": coro.map(|c| sites::loc_json(&c.loc)),
        });
        f
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fr(file: &str, func: &str, line: u32, flags: u32) -> StackFrame {
        StackFrame {
            loc: Location::new(file, func, line),
            flags,
        }
    }

    #[test]
    fn call_site_and_coroutine() {
        let stack = vec![
            fr("/usr/lib/python3.11/socket.py", "recv_into", 700, 0),
            fr(
                "/venv/lib/python3.11/site-packages/requests/api.py",
                "get",
                73,
                0,
            ),
            fr("/srv/app.py", "fetch", 12, 0x80),
            fr("/usr/lib/python3.11/asyncio/events.py", "_run", 80, 0),
        ];
        assert_eq!(call_site(&stack).unwrap().line, 12);
        let helper = vec![
            fr("/srv/app.py", "digest", 40, 0),
            fr("/srv/app.py", "handler", 12, 0x80),
        ];
        assert_eq!(call_site(&helper).unwrap().line, 12);
        assert_eq!(blocking_code(&helper).unwrap().loc.line, 40);
        assert_eq!(coroutine(&stack).unwrap().loc.function, "fetch");
        assert!(is_loop_stack(&stack));
        assert!(!is_loop_stack(&[fr("/srv/app.py", "main", 3, 0)]));
        // The loop itself was slow: nothing of the program to blame.
        let machinery_only = vec![
            fr("/usr/lib/python3.11/selectors.py", "select", 468, 0),
            fr(
                "/usr/lib/python3.11/asyncio/base_events.py",
                "_run_once",
                1900,
                0,
            ),
            fr("/usr/lib/python3.11/asyncio/runners.py", "run", 118, 0),
            fr("/srv/app.py", "<module>", 35, 0),
        ];
        assert_eq!(call_site(&machinery_only), None);
    }

    #[test]
    fn picks_the_stack_that_explains_the_step() {
        let ms = Duration::from_millis;
        // Blocked off CPU for most of the step: the blocking stack.
        assert_eq!(pick(ms(300), ms(290), 7, 9), Some(7));
        // On CPU most of the step: the sample.
        assert_eq!(pick(ms(300), ms(5), 7, 9), Some(9));
        assert_eq!(pick(ms(300), ms(5), 7, 0), Some(7));
        assert_eq!(pick(ms(300), ms(0), 0, 0), None);
    }
}
