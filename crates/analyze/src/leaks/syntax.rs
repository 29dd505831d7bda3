//! Syntactic helpers of the leak walker: which calls acquire what, name
//! and call searches, header-only visits.

use std::collections::BTreeSet;

use ruff_python_ast::visitor::{self, Visitor};
use ruff_python_ast::{Expr, Stmt};

use crate::facts::ResourceKind;

/// What acquires a resource, by qualified callee.
pub fn acquisition(q: &str) -> Option<ResourceKind> {
    use ResourceKind::*;
    Some(match q {
        "open"
        | "io.open"
        | "codecs.open"
        | "gzip.open"
        | "bz2.open"
        | "lzma.open"
        | "tarfile.open"
        | "zipfile.ZipFile"
        | "tempfile.TemporaryFile"
        | "tempfile.NamedTemporaryFile"
        | "tempfile.SpooledTemporaryFile"
        | "io.FileIO"
        | "gzip.GzipFile"
        | "os.fdopen"
        | "select.epoll"
        | "select.kqueue"
        | "selectors.DefaultSelector"
        | "selectors.EpollSelector"
        | "selectors.SelectSelector"
        | "selectors.PollSelector" => File,
        "socket.socket"
        | "socket.create_connection"
        | "socket.create_server"
        | "socket.fromfd"
        | "ssl.wrap_socket" => Socket,
        "os.open" | "os.dup" | "os.eventfd" | "os.memfd_create" | "os.pidfd_open" | "os.pipe"
        | "os.pipe2" | "os.openpty" => RawFd,
        "sqlite3.connect"
        | "psycopg2.connect"
        | "psycopg.connect"
        | "pymysql.connect"
        | "http.client.HTTPConnection"
        | "http.client.HTTPSConnection"
        | "urllib.request.urlopen"
        | "ftplib.FTP"
        | "smtplib.SMTP"
        | "smtplib.SMTP_SSL"
        | "telnetlib.Telnet"
        | "imaplib.IMAP4"
        | "poplib.POP3" => Connection,
        "subprocess.Popen" => Process,
        "multiprocessing.Pool"
        | "multiprocessing.pool.Pool"
        | "multiprocessing.pool.ThreadPool"
        | "concurrent.futures.ThreadPoolExecutor"
        | "concurrent.futures.ProcessPoolExecutor" => Pool,
        "mmap.mmap" => Other,
        _ => return None,
    })
}

/// How the resource is released, for messages and repairs.
pub fn release_text(kind: ResourceKind, var: &str) -> String {
    match kind {
        ResourceKind::RawFd => format!("os.close({var})"),
        ResourceKind::Lock => format!("{var}.release()"),
        ResourceKind::Process => format!("{var}.wait()"),
        ResourceKind::Pool => format!("{var}.shutdown()/close()"),
        _ => format!("{var}.close()"),
    }
}

/// Last segments of every acquiring callee: a cheap syntactic pre-check
/// that lets most functions skip the path walk.
pub fn maybe_acquires(last: &str) -> bool {
    matches!(
        last,
        "open"
            | "TemporaryFile"
            | "NamedTemporaryFile"
            | "SpooledTemporaryFile"
            | "FileIO"
            | "GzipFile"
            | "fdopen"
            | "epoll"
            | "kqueue"
            | "DefaultSelector"
            | "EpollSelector"
            | "SelectSelector"
            | "PollSelector"
            | "ZipFile"
            | "socket"
            | "create_connection"
            | "create_server"
            | "fromfd"
            | "wrap_socket"
            | "dup"
            | "eventfd"
            | "memfd_create"
            | "pidfd_open"
            | "pipe"
            | "pipe2"
            | "openpty"
            | "connect"
            | "HTTPConnection"
            | "HTTPSConnection"
            | "urlopen"
            | "FTP"
            | "SMTP"
            | "SMTP_SSL"
            | "Telnet"
            | "IMAP4"
            | "POP3"
            | "Popen"
            | "Pool"
            | "ThreadPool"
            | "ThreadPoolExecutor"
            | "ProcessPoolExecutor"
            | "mmap"
            | "accept"
            | "acquire"
    )
}

pub(super) fn any_acquisition(body: &[Stmt]) -> bool {
    let mut a = AcquiringCall(false);
    for s in body {
        a.visit_stmt(s);
    }
    a.0
}

/// Whether an expression (a lambda, say) calls something that may acquire
/// a resource: [`any_acquisition`] for one expression.
pub fn acquires_in(e: &Expr) -> bool {
    let mut a = AcquiringCall(false);
    a.visit_expr(e);
    a.0
}

/// Finds a call that [`maybe_acquires`], outside nested definitions.
struct AcquiringCall(bool);

impl<'a> Visitor<'a> for AcquiringCall {
    fn visit_stmt(&mut self, stmt: &'a Stmt) {
        if self.0 || matches!(stmt, Stmt::FunctionDef(_) | Stmt::ClassDef(_)) {
            return;
        }
        visitor::walk_stmt(self, stmt);
    }
    fn visit_expr(&mut self, expr: &'a Expr) {
        if self.0 {
            return;
        }
        if let Expr::Call(c) = expr
            && maybe_acquires(callee_last(&c.func))
        {
            self.0 = true;
            return;
        }
        visitor::walk_expr(self, expr);
    }
}

pub(super) fn is_name(e: &Expr, name: &str) -> bool {
    matches!(e, Expr::Name(n) if n.id.as_str() == name)
}

pub fn callee_last(e: &Expr) -> &str {
    match e {
        Expr::Name(n) => n.id.as_str(),
        Expr::Attribute(a) => a.attr.id.as_str(),
        _ => "",
    }
}

/// Finds a load of one name, stopping at the first.
struct Mentions<'n> {
    name: &'n str,
    found: bool,
}

impl<'a> Visitor<'a> for Mentions<'_> {
    fn visit_expr(&mut self, expr: &'a Expr) {
        if self.found {
            return;
        }
        if is_name(expr, self.name) {
            self.found = true;
            return;
        }
        visitor::walk_expr(self, expr);
    }
}

/// Whether `name` occurs (as a load of that name) anywhere in `e`.
pub(crate) fn mentions(e: &Expr, name: &str) -> bool {
    let mut m = Mentions { name, found: false };
    m.visit_expr(e);
    m.found
}

/// Whether `name` occurs (as a load of that name) anywhere in `s`.
pub(super) fn stmt_mentions(s: &Stmt, name: &str) -> bool {
    let mut m = Mentions { name, found: false };
    m.visit_stmt(s);
    m.found
}

/// Whether an expression (not descending into lambdas) contains a call.
pub(super) fn has_call(e: &Expr) -> bool {
    struct H(bool);
    impl<'a> Visitor<'a> for H {
        fn visit_expr(&mut self, expr: &'a Expr) {
            if self.0 {
                return;
            }
            match expr {
                Expr::Call(_) => self.0 = true,
                Expr::Lambda(_) => {}
                _ => visitor::walk_expr(self, expr),
            }
        }
    }
    let mut h = H(false);
    h.visit_expr(e);
    h.0
}

/// Texts of locks released (`X.release()`) anywhere in the body.
pub(super) fn released_locks(body: &[Stmt], out: &mut BTreeSet<String>) {
    struct R<'o>(&'o mut BTreeSet<String>);
    impl<'a> Visitor<'a> for R<'_> {
        fn visit_expr(&mut self, expr: &'a Expr) {
            if let Expr::Call(c) = expr
                && let Expr::Attribute(a) = &*c.func
                && a.attr.id.as_str() == "release"
                && let Some(t) = expr_text(&a.value)
            {
                self.0.insert(t);
            }
            visitor::walk_expr(self, expr);
        }
    }
    let mut r = R(out);
    for s in body {
        r.visit_stmt(s);
    }
}

/// `a.b.c` as text, for lock keys.
pub(super) fn expr_text(e: &Expr) -> Option<String> {
    match e {
        Expr::Name(n) => Some(n.id.as_str().to_owned()),
        Expr::Attribute(a) => Some(format!("{}.{}", expr_text(&a.value)?, a.attr.id)),
        _ => None,
    }
}

/// Visits a statement, but for compound statements only their header
/// expressions: nested blocks are walked by the path walker itself.
pub(super) fn header_walk<'a, V: Visitor<'a>>(v: &mut V, stmt: &'a Stmt) {
    match stmt {
        Stmt::If(i) => v.visit_expr(&i.test),
        Stmt::While(w) => v.visit_expr(&w.test),
        Stmt::For(f) => v.visit_expr(&f.iter),
        Stmt::With(w) => {
            for it in &w.items {
                v.visit_expr(&it.context_expr);
            }
        }
        Stmt::Try(_) | Stmt::Match(_) => {}
        _ => visitor::walk_stmt(v, stmt),
    }
}
