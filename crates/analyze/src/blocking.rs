//! Blocking calls inside `async def`: a call that blocks the thread
//! (`time.sleep`, `requests.get`, `subprocess.run`, socket and file I/O,
//! slow key derivation such as `hashlib.pbkdf2_hmac`,
//! thread locks) made from a coroutine stops every other task on its event
//! loop. Found directly in the coroutine, or through any chain of
//! synchronous project functions it calls.

use pymedic_model::{Finding, Kind, Layer, Related, Severity};
use rustc_hash::FxHashMap;
use serde_json::json;

use crate::facts::{AcquireVia, CallFact};
use crate::locks::resolved_acquires;
use crate::report::finding;
use crate::symbols::{Callee, FnId, LockFlavor, Program};

/// How a blocking call is moved off the loop.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fix {
    /// `time.sleep(x)` → `await asyncio.sleep(x)`.
    AsyncSleep,
    /// `f(args)` → `await asyncio.to_thread(f, args)`.
    ToThread,
    /// A thread lock taken in a coroutine: needs a redesign.
    Review,
}

impl Fix {
    pub fn as_str(self) -> &'static str {
        match self {
            Fix::AsyncSleep => "asyncio.sleep",
            Fix::ToThread => "asyncio.to_thread",
            Fix::Review => "review",
        }
    }
}

/// Whether a qualified external callee blocks, and how badly.
pub fn blocking_call(q: &str) -> Option<(Severity, Fix)> {
    use Severity::*;
    let (head, method) = q.rsplit_once('.').unwrap_or(("", q));
    let net = |m: &str| {
        matches!(
            m,
            "get" | "post" | "put" | "patch" | "delete" | "head" | "options" | "request" | "send"
        )
    };
    Some(match q {
        "time.sleep" => (High, Fix::AsyncSleep),
        "urllib.request.urlopen"
        | "socket.create_connection"
        | "socket.getaddrinfo"
        | "socket.gethostbyname"
        | "socket.gethostbyaddr"
        | "subprocess.run"
        | "subprocess.call"
        | "subprocess.check_call"
        | "subprocess.check_output"
        | "subprocess.getoutput"
        | "subprocess.getstatusoutput"
        | "os.system"
        | "os.wait"
        | "os.waitpid"
        | "select.select"
        | "input"
        | "psycopg2.connect"
        | "pymysql.connect"
        | "sqlite3.connect"
        | "smtplib.SMTP"
        | "ftplib.FTP" => (High, Fix::ToThread),
        "open" | "io.open" | "shutil.copy" | "shutil.copy2" | "shutil.copyfile"
        | "shutil.copytree" | "shutil.rmtree" | "shutil.move" => (Medium, Fix::ToThread),
        // Deliberately slow key derivation: tens to hundreds of ms of CPU.
        "hashlib.pbkdf2_hmac"
        | "hashlib.scrypt"
        | "bcrypt.hashpw"
        | "bcrypt.checkpw"
        | "bcrypt.kdf" => (Medium, Fix::ToThread),
        _ => match head {
            "requests" | "requests.api" | "httpx" if net(method) => (High, Fix::ToThread),
            "requests.Session" | "requests.sessions.Session" | "httpx.Client" if net(method) => {
                (High, Fix::ToThread)
            }
            "socket.socket"
                if matches!(
                    method,
                    "connect"
                        | "recv"
                        | "recv_into"
                        | "recvfrom"
                        | "send"
                        | "sendall"
                        | "sendto"
                        | "accept"
                ) =>
            {
                (High, Fix::ToThread)
            }
            "subprocess.Popen" if matches!(method, "wait" | "communicate") => (High, Fix::ToThread),
            "sqlite3.Connection" | "sqlite3.Cursor"
                if matches!(method, "execute" | "executemany" | "commit" | "fetchall") =>
            {
                (Medium, Fix::ToThread)
            }
            "threading.Event" | "threading.Condition" | "threading.Barrier" if method == "wait" => {
                (High, Fix::ToThread)
            }
            "threading.Thread" if method == "join" => (High, Fix::ToThread),
            "threading.Lock"
            | "threading.RLock"
            | "threading.Semaphore"
            | "threading.BoundedSemaphore"
                if method == "acquire" =>
            {
                (High, Fix::Review)
            }
            "queue.Queue" | "queue.LifoQueue" | "queue.PriorityQueue" | "queue.SimpleQueue"
                if matches!(method, "get" | "put" | "join") =>
            {
                (High, Fix::ToThread)
            }
            "concurrent.futures.Future" if method == "result" => (High, Fix::ToThread),
            "pathlib.Path"
                if matches!(
                    method,
                    "read_text" | "read_bytes" | "write_text" | "write_bytes"
                ) =>
            {
                (Medium, Fix::ToThread)
            }
            _ => return None,
        },
    })
}

#[derive(Clone)]
struct Block {
    what: String,
    severity: Severity,
    fix: Fix,
    /// (function, line) from the first call down to the blocking call.
    chain: Vec<(FnId, u32)>,
}

pub(crate) fn findings(p: &Program) -> Vec<Finding> {
    let acquires = resolved_acquires(p);
    let n = p.fn_count();
    // Only the synchronous functions coroutines reach (through calls they
    // do not await) can block an event loop: resolve and propagate over
    // those alone.
    let coroutines: Vec<usize> = (p.functions().enumerate())
        .filter_map(|(i, (_, f))| f.is_async.then_some(i))
        .collect();
    let mut reached = p.reachable(coroutines.iter().copied(), |c: &CallFact| !c.awaited);
    for &i in &coroutines {
        reached[i] = false;
    }
    // Direct blocking in every reached function, by dense function index
    // (maps over the few reached: arrays over every function were fresh
    // memory, faulted in page by page).
    let reached: Vec<(usize, FnId)> = (0..n)
        .filter(|&i| reached[i])
        .map(|i| (i, p.fn_id(i)))
        .collect();
    let mut blocks: FxHashMap<usize, Block> = FxHashMap::default();
    let mut project_calls: FxHashMap<usize, Vec<(FnId, u32)>> = FxHashMap::default();
    for &(i, id) in &reached {
        for (c, callee) in p.function(id).calls.iter().zip(p.callees_of(i)) {
            match callee {
                Callee::External(q) if !c.awaited => {
                    // The most severe blocking call of the function names it
                    // (`time.sleep` over the `open` before it).
                    if let Some((severity, fix)) = blocking_call(q)
                        && blocks.get(&i).is_none_or(|b| severity > b.severity)
                    {
                        blocks.insert(
                            i,
                            Block {
                                what: q.to_string(),
                                severity,
                                fix,
                                chain: vec![(id, c.line)],
                            },
                        );
                    }
                }
                Callee::Project(g) if !c.awaited && *g != id => {
                    project_calls.entry(i).or_default().push((*g, c.line));
                }
                _ => {}
            }
        }
    }
    // Through synchronous project callees, in index order (a block found
    // in a round is seen by the functions after it in the same round).
    for _ in 0..16 {
        let mut changed = false;
        for &(i, id) in &reached {
            if blocks.contains_key(&i) {
                continue;
            }
            let found = project_calls
                .get(&i)
                .into_iter()
                .flatten()
                .find_map(|(g, line)| {
                    let b = blocks.get(&p.dense(*g))?;
                    (!p.function(*g).is_async && b.chain.len() < 8).then(|| {
                        let mut chain = vec![(id, *line)];
                        chain.extend(b.chain.iter().copied());
                        Block { chain, ..b.clone() }
                    })
                });
            if let Some(b) = found {
                blocks.insert(i, b);
                changed = true;
            }
        }
        if !changed {
            break;
        }
    }
    let mut out = Vec::new();
    // The coroutines again, by their list: a sweep of every function's
    // facts for `is_async` is a cache miss per function.
    for &i in &coroutines {
        let id = p.fn_id(i);
        let f = p.function(id);
        for (c, callee) in f.calls.iter().zip(p.callees_of(i)) {
            if c.awaited {
                continue;
            }
            let block = match callee {
                Callee::External(q) => blocking_call(q).map(|(severity, fix)| Block {
                    what: q.to_string(),
                    severity,
                    fix,
                    chain: Vec::new(),
                }),
                Callee::Project(g) if !p.function(*g).is_async => blocks.get(&p.dense(*g)).cloned(),
                _ => None,
            };
            if let Some(b) = block {
                out.push(report(p, id, c.line, &c.callee.text(), c.start, c.end, b));
            }
        }
        for (a, lock) in f.acquires.iter().zip(&acquires[i]) {
            let Some(lock) = lock else { continue };
            if a.via == AcquireVia::AsyncWith || lock.flavor == LockFlavor::Async || lock.guessed {
                continue;
            }
            let b = Block {
                what: format!("thread lock {}", lock.name),
                severity: Severity::High,
                fix: Fix::Review,
                chain: Vec::new(),
            };
            out.push(report(p, id, a.line, &a.lock.text(), 0, 0, b));
        }
    }
    out
}

fn report(
    p: &Program,
    coroutine: FnId,
    line: u32,
    callee_text: &str,
    start: u32,
    end: u32,
    b: Block,
) -> Finding {
    let f = p.function(coroutine);
    let file = &p.files[coroutine.file as usize].rel;
    let mut related = vec![Related::new(
        &p.location(coroutine, f.line),
        format!("coroutine {} runs on the event loop", f.qualname),
    )];
    for (i, (fid, l)) in b.chain.iter().enumerate() {
        let role = if i + 1 == b.chain.len() {
            format!("blocking call {}", b.what)
        } else {
            format!("calls {}", p.function(b.chain[i + 1].0).qualname)
        };
        related.push(Related::new(&p.location(*fid, *l), role));
    }
    if b.chain.is_empty() {
        related.push(Related::new(
            &p.location(coroutine, line),
            format!("blocking call {}", b.what),
        ));
    }
    let transitive = !b.chain.is_empty();
    // The coroutine calls a synchronous project function that sleeps: that
    // call moves to a thread (only a direct `time.sleep` becomes
    // `asyncio.sleep`).
    let fix = if transitive && b.fix == Fix::AsyncSleep {
        Fix::ToThread
    } else {
        b.fix
    };
    let title = if transitive {
        format!(
            "coroutine {} calls {} which blocks the event loop in {}",
            f.qualname, callee_text, b.what
        )
    } else {
        format!("blocking call {} inside coroutine {}", b.what, f.qualname)
    };
    let mut finding = finding(
        Layer::Structural,
        Kind::BLOCKED_EVENT_LOOP,
        b.severity,
        if transitive { 0.7 } else { 0.9 },
        title,
        p.location(coroutine, line),
        &format!("{callee_text}@{line}"),
        format!(
            "blocked_event_loop|{file}|{}|{callee_text}|{}",
            f.qualname, b.what
        ),
        json!({
            "coroutine": f.qualname,
            "call": callee_text,
            "blocking": b.what,
            "fix": fix.as_str(),
            "transitive": transitive,
            "call_range": [start, end],
            "chain": b.chain.iter().map(|(fid, l)| {
                let loc = p.location(*fid, *l);
                format!("{}:{}:{}", loc.file, loc.function, loc.line)
            }).collect::<Vec<_>>(),
        }),
    );
    finding.related = related;
    finding
}
