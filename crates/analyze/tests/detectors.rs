//! Positive and negative suites for every static detector: small Python
//! projects written to a temporary directory, analysed, and the findings
//! checked for kind, exact sites and absence where the code is correct.

use std::path::{Path, PathBuf};

use pymedic_analyze::{Analysis, Options, analyze};
use pymedic_model::{Finding, Layer};

struct Tree(PathBuf);

impl Tree {
    fn new(files: &[(&str, &str)]) -> Tree {
        static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "pymedic-detectors-{}-{}",
            std::process::id(),
            N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        for (name, text) in files {
            let p = dir.join(name);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, unindent(text)).unwrap();
        }
        Tree(dir)
    }

    fn analyze(&self) -> Analysis {
        analyze(&self.0, &Options::default()).unwrap()
    }
}

impl Drop for Tree {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn unindent(s: &str) -> String {
    let s = s.strip_prefix('\n').unwrap_or(s);
    let n = s
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| l.len() - l.trim_start().len())
        .min()
        .unwrap_or(0);
    s.lines()
        .map(|l| {
            if l.len() >= n {
                &l[n..]
            } else {
                l.trim_start()
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
        + "\n"
}

fn of_kind<'a>(a: &'a Analysis, kind: &str) -> Vec<&'a Finding> {
    a.findings
        .iter()
        .filter(|f| f.kind.as_str() == kind)
        .collect()
}

fn related_lines(f: &Finding) -> Vec<u32> {
    f.related.iter().map(|r| r.line).collect()
}

fn _root(t: &Tree) -> &Path {
    &t.0
}

// ---------------------------------------------------------------- lock order

#[test]
fn lock_order_inversion_between_two_functions() {
    let t = Tree::new(&[(
        "bank.py",
        r#"
        import threading
        accounts_lock = threading.Lock()
        audit_lock = threading.Lock()

        def transfer():
            with accounts_lock:
                with audit_lock:
                    pass

        def report():
            with audit_lock:
                with accounts_lock:
                    pass
        "#,
    )]);
    let a = t.analyze();
    let inv = of_kind(&a, "lock_order_inversion");
    assert_eq!(inv.len(), 1, "{:#?}", a.findings);
    let f = inv[0];
    assert_eq!(f.layer, Layer::Structural);
    assert!(f.target.is_none());
    // Every edge's outer and inner site.
    let mut lines = related_lines(f);
    lines.sort();
    assert_eq!(lines, [6, 7, 11, 12], "{:#?}", f.related);
    assert!(f.title.contains("bank.accounts_lock") && f.title.contains("bank.audit_lock"));
}

#[test]
fn lock_order_inversion_through_calls_and_self_attributes() {
    let t = Tree::new(&[
        (
            "svc/store.py",
            r#"
            import threading

            class Store:
                def __init__(self):
                    self._lock = threading.Lock()
                    self.items = {}

                def put(self, k, v):
                    with self._lock:
                        self.items[k] = v
                        self.items.pop(k, None)
            "#,
        ),
        ("svc/__init__.py", ""),
        (
            "svc/cache.py",
            r#"
            import threading
            from .store import Store

            class Cache:
                def __init__(self, store: Store):
                    self.store = store
                    self._mutex = threading.RLock()
                    self.audit = self._mutex

                def refresh(self):
                    with self._mutex:
                        self.store.put(1, 2)

                def flush_from_store(self):
                    lock = self.store._lock
                    with lock:
                        self._take()

                def _take(self):
                    with self.audit:
                        return 1
            "#,
        ),
    ]);
    let a = t.analyze();
    let inv = of_kind(&a, "lock_order_inversion");
    assert_eq!(inv.len(), 1, "{:#?}", a.findings);
    let f = inv[0];
    assert!(
        f.title.contains("svc.store.Store._lock") && f.title.contains("svc.cache.Cache._mutex"),
        "{}",
        f.title
    );
    let roles: Vec<&str> = f.related.iter().map(|r| r.role.as_str()).collect();
    assert!(
        roles.iter().any(|r| r.contains("via call at line")),
        "{roles:?}"
    );
    // Inner site of Cache._mutex → Store._lock is in Store.put (store.py:9).
    assert!(
        f.related
            .iter()
            .any(|r| r.file == "svc/store.py" && r.line == 9 && r.function == "Store.put"),
        "{:#?}",
        f.related
    );
}

#[test]
fn consistent_lock_order_across_many_functions_is_not_flagged() {
    let t = Tree::new(&[(
        "ok.py",
        r#"
        import threading
        A = threading.Lock()
        B = threading.Lock()
        C = threading.RLock()

        def one():
            with A:
                with B:
                    pass

        def two():
            with A:
                helper()

        def helper():
            with B:
                with C:
                    pass

        def three():
            A.acquire()
            try:
                with C:
                    pass
            finally:
                A.release()

        def four():
            with B, C:
                pass

        def reentrant():
            with C:
                with C:
                    pass

        class K:
            def __init__(self):
                self.lock = threading.Lock()
            def m(self):
                with A:
                    with self.lock:
                        pass
            def n(self):
                with B:
                    with self.lock:
                        pass
        "#,
    )]);
    let a = t.analyze();
    assert!(
        of_kind(&a, "lock_order_inversion").is_empty(),
        "{:#?}",
        a.findings
    );
}

#[test]
fn self_deadlock_and_argument_ordered_instances() {
    let t = Tree::new(&[(
        "acct.py",
        r#"
        import threading
        REGISTRY_LOCK = threading.Lock()

        class Account:
            def __init__(self):
                self.lock = threading.Lock()
                self._state = threading.RLock()
                self.balance = 0

            def deposit(self, n):
                with self.lock:
                    self._audit(n)

            def _audit(self, n):
                with self.lock:
                    self.balance += n

            def safe(self):
                with self._state:
                    self._again()

            def _again(self):
                with self._state:
                    return 1

        def transfer(src, dst, n):
            with src.lock:
                with dst.lock:
                    src.balance -= n
                    dst.balance += n

        def register():
            with REGISTRY_LOCK:
                helper()

        def helper():
            with REGISTRY_LOCK:
                pass
        "#,
    )]);
    let a = t.analyze();
    let dl = of_kind(&a, "deadlock");
    let mut sites: Vec<(String, u32)> = dl
        .iter()
        .map(|f| (f.location.function.clone(), f.location.line))
        .collect();
    sites.sort();
    assert_eq!(
        sites,
        [("Account._audit".to_owned(), 15), ("helper".to_owned(), 37)],
        "{dl:#?}"
    );
    let inv = of_kind(&a, "lock_order_inversion");
    assert_eq!(inv.len(), 1, "{inv:#?}");
    assert_eq!(inv[0].location.line, 28);
    assert_eq!(inv[0].evidence["instances"], true);
}

// ------------------------------------------------------------ resource leaks

#[test]
fn file_not_closed_on_early_return() {
    let t = Tree::new(&[(
        "io_.py",
        r#"
        def read_config(path, strict):
            f = open(path)
            header = f.readline()
            if not header and strict:
                return None
            data = f.read()
            f.close()
            return header + data
        "#,
    )]);
    let a = t.analyze();
    let leaks = of_kind(&a, "fd_leak");
    assert_eq!(leaks.len(), 1, "{:#?}", a.findings);
    let f = leaks[0];
    assert_eq!(f.location.line, 2, "acquisition line");
    assert_eq!(f.location.function, "read_config");
    let exit = f
        .related
        .iter()
        .find(|r| r.line == 5)
        .expect("the early return");
    assert!(
        exit.role
            .contains("exit path at line 5 (return) skips f.close()"),
        "{}",
        exit.role
    );
    assert_eq!(f.severity, pymedic_model::Severity::High);
}

#[test]
fn raw_fd_lock_and_socket_leaks() {
    let t = Tree::new(&[(
        "raw.py",
        r#"
        import os, socket, threading
        lock = threading.Lock()

        def write_pid(path, pid):
            fd = os.open(path, os.O_WRONLY | os.O_CREAT)
            if pid < 0:
                raise ValueError("bad pid")
            os.write(fd, str(pid).encode())
            os.close(fd)

        def critical(x):
            lock.acquire()
            if x is None:
                return
            lock.release()

        def ping(host):
            for port in (80, 443):
                s = socket.create_connection((host, port))
                if s.send(b"x") == 0:
                    break
                s.close()
        "#,
    )]);
    let a = t.analyze();
    let fd = of_kind(&a, "fd_leak");
    let raw = fd
        .iter()
        .find(|f| f.location.function == "write_pid")
        .expect("raw fd leak");
    assert_eq!(raw.location.line, 5);
    assert!(
        raw.related
            .iter()
            .any(|r| r.line == 7 && r.role.contains("raise")),
        "{:#?}",
        raw.related
    );
    let lock = of_kind(&a, "resource_leak");
    let lock = lock
        .iter()
        .find(|f| f.location.function == "critical")
        .expect("lock leak");
    assert_eq!(lock.location.line, 12);
    assert!(
        lock.related
            .iter()
            .any(|r| r.line == 14 && r.role.contains("lock.release()"))
    );
    let sock = fd
        .iter()
        .find(|f| f.location.function == "ping")
        .expect("socket leak on break");
    assert_eq!(sock.location.line, 19);
    assert!(
        sock.related
            .iter()
            .any(|r| r.role.contains("after the break at line 21")),
        "{:#?}",
        sock.related
    );
}

#[test]
fn released_resources_are_not_flagged() {
    let t = Tree::new(&[(
        "good.py",
        r#"
        import os, socket, threading, sqlite3

        class Server:
            def __init__(self):
                self.conns = []
                self.lock = threading.Lock()

            def accept(self, srv):
                conn, addr = srv.accept()
                self.conns.append(conn)

            def handle_in_thread(self, srv):
                conn, _ = srv.accept()
                threading.Thread(target=self.serve, args=(conn,)).start()

            def serve(self, conn):
                conn.close()

            def locked(self, x):
                self.lock.acquire()
                try:
                    if x:
                        return 1
                finally:
                    self.lock.release()

        def with_block(p):
            with open(p) as f:
                return f.read()

        def try_finally(p):
            fd = os.open(p, os.O_RDONLY)
            try:
                return os.read(fd, 10)
            finally:
                os.close(fd)

        def maybe(p):
            f = None
            try:
                f = open(p)
                return f.read()
            finally:
                if f is not None:
                    f.close()

        def factory(host):
            s = socket.socket()
            s.connect((host, 1))
            return s

        def wrapped(p):
            raw = open(p, "rb")
            return Reader(raw)

        def all_branches(p, x):
            f = open(p)
            if x:
                f.close()
                return 1
            else:
                f.close()
                return 2

        def handed_over(srv, pool):
            conn, _ = srv.accept()
            pool.submit(work, conn)

        def db(path):
            c = sqlite3.connect(path)
            try:
                return c.execute("select 1").fetchall()
            finally:
                c.close()

        class Reader:
            def __init__(self, f):
                self.f = f

        def work(c):
            c.close()
        "#,
    )]);
    let a = t.analyze();
    let bad: Vec<_> = a
        .findings
        .iter()
        .filter(|f| {
            matches!(f.kind.as_str(), "fd_leak" | "resource_leak")
                && f.severity >= pymedic_model::Severity::Medium
        })
        .collect();
    assert!(bad.is_empty(), "{bad:#?}");
}

// ------------------------------------------------------- blocked event loop

#[test]
fn blocking_calls_in_coroutines() {
    let t = Tree::new(&[(
        "svc.py",
        r#"
        import asyncio, subprocess
        import time as t
        import requests
        from time import sleep

        def slow_helper():
            open("/etc/hostname").read()
            t.sleep(0.5)

        def indirect():
            return slow_helper()

        async def handler(url):
            t.sleep(1)
            r = requests.get(url, timeout=5)
            sleep(2)
            subprocess.run(["true"])
            indirect()
            s = requests.Session()
            s.post(url)
            return r

        async def fine(url):
            await asyncio.sleep(1)
            await asyncio.to_thread(t.sleep, 1)
            loop = asyncio.get_running_loop()
            await loop.run_in_executor(None, slow_helper)
            await loop.run_in_executor(None, lambda: t.sleep(1))

        def sync_only():
            t.sleep(1)
            requests.get("x")
        "#,
    )]);
    let a = t.analyze();
    let b = of_kind(&a, "blocked_event_loop");
    let lines: std::collections::BTreeSet<u32> = b.iter().map(|f| f.location.line).collect();
    assert_eq!(
        lines,
        [14, 15, 16, 17, 18, 20].into_iter().collect(),
        "{:#?}",
        b.iter()
            .map(|f| (&f.location, &f.title))
            .collect::<Vec<_>>()
    );
    assert!(b.iter().all(|f| f.location.function == "handler"));
    // Named by the helper's most severe blocking call (the sleep, not the
    // open before it); the coroutine's call to the helper moves to a thread.
    let transitive = b.iter().find(|f| f.location.line == 18).unwrap();
    assert!(
        transitive
            .related
            .iter()
            .any(|r| r.line == 8 && r.role.contains("time.sleep")),
        "{:#?}",
        transitive.related
    );
    assert_eq!(transitive.evidence["fix"], "asyncio.to_thread");
    let direct = b.iter().find(|f| f.location.line == 14).unwrap();
    assert_eq!(direct.evidence["fix"], "asyncio.sleep");
    assert_eq!(direct.evidence["blocking"], "time.sleep");
}

#[test]
fn thread_lock_in_coroutine() {
    let t = Tree::new(&[(
        "l.py",
        r#"
        import asyncio, threading
        state_lock = threading.Lock()
        alock = asyncio.Lock()

        async def bad():
            with state_lock:
                return 1

        async def good():
            async with alock:
                return 1
        "#,
    )]);
    let a = t.analyze();
    let b = of_kind(&a, "blocked_event_loop");
    assert_eq!(b.len(), 1, "{:#?}", a.findings);
    assert_eq!(b[0].location.line, 6);
    assert_eq!(b[0].evidence["fix"], "review");
}

// --------------------------------------------------- unbounded containers

#[test]
fn containers_that_only_grow() {
    let t = Tree::new(&[(
        "cache.py",
        r#"
        import collections, functools
        _results = {}
        _seen = set()
        _bounded = {}
        _evicted = {}
        _history = collections.deque(maxlen=100)
        HANDLERS = {}
        _CONST = {}

        def register(name):
            def deco(fn):
                HANDLERS[name] = fn
                return fn
            return deco

        def compute(key):
            if key in _results:
                return _results[key]
            v = key * 2
            _results[key] = v
            _seen.add(key)
            _history.append(key)
            _CONST["version"] = 1
            return v

        def bounded(key):
            if len(_bounded) > 1000:
                _bounded.clear()
            _bounded[key] = 1

        def evicted(key):
            _evicted[key] = 1
            _evicted.pop(next(iter(_evicted)))

        class Service:
            sessions = []

            def __init__(self):
                self.cache = {}

            def login(self, user):
                self.sessions.append(user)
                self.cache[user] = True

            @functools.lru_cache(maxsize=None)
            def lookup(self, x):
                return x

        @functools.lru_cache(maxsize=128)
        def fine(x):
            return x

        @register("ping")
        def ping():
            return "pong"
        "#,
    )]);
    let a = t.analyze();
    let m = of_kind(&a, "memory_leak");
    let names: std::collections::BTreeSet<String> = m
        .iter()
        .map(|f| {
            f.evidence
                .get("container")
                .or_else(|| f.evidence.get("function"))
                .and_then(|v| v.as_str())
                .unwrap()
                .to_owned()
        })
        .collect();
    let want: std::collections::BTreeSet<String> = [
        "cache._results",
        "cache._seen",
        "cache.Service.sessions",
        "cache.Service.cache",
        "Service.lookup",
    ]
    .into_iter()
    .map(str::to_owned)
    .collect();
    assert_eq!(names, want, "{m:#?}");
    let results = m
        .iter()
        .find(|f| f.evidence["container"] == "cache._results")
        .unwrap();
    assert_eq!(results.location.line, 20);
    assert!(
        results
            .related
            .iter()
            .any(|r| r.line == 2 && r.role.contains("defined here"))
    );
}

// ------------------------------------------------------ imports and syntax

#[test]
fn import_graph_cycles_and_impact() {
    let t = Tree::new(&[
        ("app/__init__.py", "from . import config\n"),
        ("app/config.py", "import os\nSETTINGS = {}\n"),
        (
            "app/models.py",
            "from .db import connect\nfrom app import config\n",
        ),
        (
            "app/db.py",
            "from . import models\nimport app.config as cfg\n\ndef connect():\n    from .views import render\n",
        ),
        (
            "app/views.py",
            "from .models import connect\nfrom ..app import nothing\n",
        ),
        ("main.py", "import app.views\nimport requests\n"),
    ]);
    let a = t.analyze();
    let cycles = of_kind(&a, "import_cycle");
    assert_eq!(cycles.len(), 1, "{cycles:#?}");
    let c = cycles[0];
    assert!(
        c.title.contains("app.db") && c.title.contains("app.models"),
        "{}",
        c.title
    );
    // The deferred import in connect() does not make views part of the cycle.
    assert!(!c.evidence["component"].to_string().contains("app.views"));
    let p = &a.program;
    let config = pymedic_analyze::ImportGraph::find_module(p, &t.0, "app.config").unwrap();
    let imp = a.graph.impact(p, config);
    let direct: Vec<&str> = imp.direct.iter().map(|d| d.module.as_str()).collect();
    assert_eq!(direct, ["app", "app.db", "app.models"]);
    let transitive: Vec<&str> = imp.transitive.iter().map(|d| d.module.as_str()).collect();
    assert_eq!(transitive, ["app.views", "main"]);
    // By file path too.
    let by_path = pymedic_analyze::ImportGraph::find_module(p, &t.0, "app/config.py").unwrap();
    assert_eq!(by_path, config);
    let json = a.graph.to_json(p);
    assert_eq!(json["external"]["requests"][0], "main");
    assert!(
        a.graph
            .to_dot(p)
            .contains("\"app.db\" -> \"app.views\" [style=dashed]")
    );
}

#[test]
fn syntax_errors_are_surface_findings_and_analysis_continues() {
    let t = Tree::new(&[
        ("broken.py", "def f(:\n    return 1\n"),
        (
            "fine.py",
            "import time\nasync def g():\n    time.sleep(1)\n",
        ),
    ]);
    let a = t.analyze();
    let s = of_kind(&a, "syntax_error");
    assert!(!s.is_empty());
    assert_eq!(s[0].layer, Layer::Surface);
    assert_eq!(s[0].location.file, "broken.py");
    assert_eq!(s[0].location.line, 1);
    assert_eq!(of_kind(&a, "blocked_event_loop").len(), 1);
}

#[test]
fn ids_are_stable_across_runs() {
    let t = Tree::new(&[("a.py", "import time\nasync def g():\n    time.sleep(1)\n")]);
    let x = t.analyze();
    let y = t.analyze();
    assert_eq!(x.findings[0].id, y.findings[0].id);
}

// ------------------------------------------------------------- enrichment

#[test]
fn enrich_explains_runtime_deadlock_and_blocked_loop() {
    let t = Tree::new(&[(
        "svc.py",
        r#"
        import threading, time
        a = threading.Lock()
        b = threading.Lock()

        def one():
            with a:
                with b:
                    pass

        def two():
            with b:
                with a:
                    pass

        def slow():
            time.sleep(1)

        async def handler():
            slow()
        "#,
    )]);
    let file = t.0.join("svc.py").to_string_lossy().into_owned();
    let enricher = pymedic_analyze::Enricher::new();
    // A deadlock seen at runtime: thread 1 waits at line 12 holding b.
    let mut dl = Finding::new(
        Layer::Temporal,
        pymedic_model::Kind::DEADLOCK,
        pymedic_model::Severity::Critical,
        0.97,
        "2 threads deadlocked",
        None,
        pymedic_model::Location::new(file.clone(), "two", 12),
    );
    dl.related.push(pymedic_model::Related::new(
        &pymedic_model::Location::new(file.clone(), "one", 7),
        "waits for b",
    ));
    let rel = enricher.explain(&dl, Path::new("/")).unwrap();
    assert!(
        rel.iter()
            .any(|r| r.role.starts_with("static: locks taken in opposite orders")),
        "{rel:#?}"
    );
    assert!(rel.iter().all(|r| r.file == file));
    // A blocked loop seen at runtime, deepest frame in slow().
    let mut bl = Finding::new(
        Layer::Temporal,
        pymedic_model::Kind::BLOCKED_EVENT_LOOP,
        pymedic_model::Severity::High,
        0.9,
        "event loop blocked for 1s",
        None,
        pymedic_model::Location::new(file.clone(), "slow", 16),
    );
    bl.stacks.push(pymedic_model::Stack {
        thread: "MainThread".into(),
        tid: 1,
        frames: vec![
            pymedic_model::Location::new(file.clone(), "slow", 16),
            pymedic_model::Location::new(file.clone(), "handler", 19),
        ],
    });
    let rel = enricher.explain(&bl, Path::new("/")).unwrap();
    assert!(
        rel.iter()
            .any(|r| r.line == 16 && r.role.contains("blocking call time.sleep")),
        "{rel:#?}"
    );
    // Kinds the static layer cannot explain get nothing.
    let mut cpu = bl.clone();
    cpu.kind = pymedic_model::Kind::CPU_HOTSPOT;
    assert!(enricher.explain(&cpu, Path::new("/")).unwrap().is_empty());
}

#[test]
fn parameter_ownership_from_the_extraction_walk_matches_a_whole_body_walk() {
    // The extraction learns which parameters a function consumes from the
    // walk that also collects its calls; `consumed_params` walks the body on
    // its own. Both must agree, through nested functions, lambdas, classes,
    // `yield`, `with` and attribute stores.
    let src = r#"
        import threading

        def closes(f, g, unused):
            f.close()
            return g

        def nested(a, b, c, d):
            def inner(x=registry.register(d)):
                a.close()
            cb = lambda: b.shutdown()
            class Holder:
                slot = c
            return inner, cb

        def gen(s, t):
            yield s
            with t:
                pass

        def stores(self, conn, other):
            self.conn = conn
            threading.Thread(target=other).start()

        async def coro(r, w):
            await w.wait()
            q.put(r)
    "#;
    let t = Tree::new(&[("m.py", src)]);
    let a = t.analyze();
    let text = unindent(src);
    let parsed =
        ruff_python_parser::parse_unchecked_source(&text, ruff_python_ast::PySourceType::Python);
    let mut checked = 0;
    for stmt in &parsed.syntax().body {
        let ruff_python_ast::Stmt::FunctionDef(f) = stmt else {
            continue;
        };
        let names: Vec<&str> = f
            .parameters
            .iter_non_variadic_params()
            .map(|p| p.parameter.name.id.as_str())
            .collect();
        let want = pymedic_analyze::leaks::consumed_params(&f.body, &names);
        let facts = a.program.files[0]
            .functions
            .iter()
            .find(|x| x.qualname == f.name.id.as_str())
            .unwrap();
        assert_eq!(facts.consumes, want, "{}", f.name.id);
        checked += 1;
    }
    assert_eq!(checked, 5);
    let by = |q: &str| {
        a.program.files[0]
            .functions
            .iter()
            .find(|x| x.qualname == q)
            .unwrap()
            .consumes
            .clone()
    };
    assert_eq!(by("closes"), [true, true, false]);
    assert_eq!(by("nested"), [true, true, false, true]);
    assert_eq!(by("gen"), [true, true]);
    assert_eq!(by("stores"), [false, true, true]);
    assert_eq!(by("coro"), [true, true]);
}
