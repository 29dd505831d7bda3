//! Who owns a resource: the calls and statements that close it, keep it
//! (store, return, hand to a thread or a wrapper) or only use it.

use ruff_python_ast::visitor::{self, Visitor};
use ruff_python_ast::{Expr, ExprCall, Stmt};

use super::syntax::*;
use crate::facts::{Name, PathRef, ResourceKind};

/// Call names that take ownership of an argument (store it, close it later,
/// or run it on another thread).
pub(super) fn takes_ownership(name: &str) -> bool {
    matches!(
        name,
        "append"
            | "appendleft"
            | "add"
            | "put"
            | "put_nowait"
            | "insert"
            | "extend"
            | "register"
            | "submit"
            | "setdefault"
            | "update"
            | "Thread"
            | "Process"
            | "Timer"
            | "start_new_thread"
            | "run_in_executor"
            | "create_task"
            | "ensure_future"
            | "spawn"
            | "apply_async"
            | "push"
            | "enter_context"
            | "callback"
            | "wrap_socket"
            | "TextIOWrapper"
            | "BufferedReader"
            | "BufferedWriter"
            | "BufferedRandom"
            | "fdopen"
            | "fromfd"
            | "closing"
            | "finalize"
            | "detach"
            | "makefile"
    )
}

/// Calls that use an argument without keeping it.
pub(super) const NON_RETAINING: &[&str] = &[
    "load",
    "loads",
    "dump",
    "dumps",
    "read",
    "readline",
    "readlines",
    "write",
    "fstat",
    "lseek",
    "fsync",
    "ftruncate",
    "fileno",
    "len",
    "isinstance",
    "str",
    "repr",
    "int",
    "bool",
    "hash",
    "id",
    "type",
    "getattr",
    "hasattr",
    "print",
    "select",
    "copyfileobj",
    "sendfile",
    "reader",
    "writer",
    "DictReader",
    "DictWriter",
    "iter",
    "enumerate",
    "next",
    "list",
    "sorted",
    "tuple",
    "zip",
    "flock",
    "lockf",
    "fcntl",
    "ioctl",
    "set_inheritable",
    "set_blocking",
    "get_inheritable",
    "recv",
    "send",
    "sendall",
    "format",
];

/// Whether `e` passes `name` to a call that may keep it (its result is kept
/// by the caller).
pub(super) fn kept_by_call(e: &Expr, name: &str) -> bool {
    struct K<'n>(&'n str, bool);
    impl<'a> Visitor<'a> for K<'_> {
        fn visit_expr(&mut self, expr: &'a Expr) {
            if self.1 {
                return;
            }
            if let Expr::Call(c) = expr {
                let last = callee_last(&c.func);
                let on_self = matches!(&*c.func, Expr::Attribute(a) if is_name(&a.value, self.0));
                let passes = c.arguments.args.iter().any(|a| is_name(a, self.0))
                    || c.arguments
                        .keywords
                        .iter()
                        .any(|k| is_name(&k.value, self.0));
                if passes && !on_self && !NON_RETAINING.contains(&last) {
                    self.1 = true;
                    return;
                }
            }
            if let Expr::Lambda(_) = expr {
                return;
            }
            visitor::walk_expr(self, expr);
        }
    }
    let mut k = K(name, false);
    k.visit_expr(e);
    k.1
}

pub(super) fn releases_method(kind: ResourceKind, m: &str) -> bool {
    match kind {
        ResourceKind::Lock => m == "release",
        ResourceKind::Process => matches!(
            m,
            "wait" | "communicate" | "kill" | "terminate" | "__exit__"
        ),
        ResourceKind::Pool => matches!(m, "close" | "terminate" | "shutdown" | "join" | "__exit__"),
        ResourceKind::RawFd => false,
        _ => matches!(m, "close" | "__exit__" | "detach"),
    }
}

pub(super) fn releases(stmt: &Stmt, key: &str, kind: ResourceKind) -> bool {
    struct R<'k> {
        key: &'k str,
        kind: ResourceKind,
        found: bool,
    }
    impl<'a> Visitor<'a> for R<'_> {
        fn visit_expr(&mut self, expr: &'a Expr) {
            if self.found {
                return;
            }
            if let Expr::Call(c) = expr {
                if let Expr::Attribute(a) = &*c.func
                    && expr_text(&a.value).as_deref() == Some(self.key)
                    && releases_method(self.kind, a.attr.id.as_str())
                {
                    self.found = true;
                    return;
                }
                if self.kind == ResourceKind::RawFd
                    && matches!(callee_last(&c.func), "close" | "closerange")
                    && c.arguments.args.iter().any(|a| is_name(a, self.key))
                {
                    self.found = true;
                    return;
                }
            }
            visitor::walk_expr(self, expr);
        }
        fn visit_stmt(&mut self, stmt: &'a Stmt) {
            header_walk(self, stmt);
        }
    }
    let mut r = R {
        key,
        kind,
        found: false,
    };
    r.visit_stmt(stmt);
    if r.found {
        return true;
    }
    if let Stmt::Delete(d) = stmt {
        return d.targets.iter().any(|t| is_name(t, key));
    }
    false
}

pub(super) fn escape(stmt: &Stmt, name: &str, path: &dyn Fn(&Expr) -> Option<PathRef>) -> Escape {
    // Handed to a call whose result is kept: the result (a transport,
    // a wrapper, a connection object) now owns it.
    let kept = match stmt {
        Stmt::Assign(a) => Some(&*a.value),
        Stmt::AnnAssign(a) => a.value.as_deref(),
        Stmt::AugAssign(a) => Some(&*a.value),
        Stmt::Return(r) => r.value.as_deref(),
        _ => None,
    };
    if kept.is_some_and(|v| kept_by_call(v, name)) {
        return Escape::Yes;
    }
    match stmt {
        Stmt::Return(r) if r.value.as_deref().is_some_and(|v| mentions(v, name)) => {
            return Escape::Yes;
        }
        Stmt::Assign(a) if is_name(&a.value, name) || value_holds(&a.value, name) => {
            return Escape::Yes;
        }
        Stmt::AnnAssign(a) if a.value.as_deref().is_some_and(|v| is_name(v, name)) => {
            return Escape::Yes;
        }
        Stmt::FunctionDef(_) | Stmt::ClassDef(_) if stmt_mentions(stmt, name) => {
            return Escape::Yes;
        }
        _ => {}
    }
    // Calls in the statement: ownership-taking ones, yields, closures.
    struct E<'n, 'p> {
        name: &'n str,
        path: &'p dyn Fn(&Expr) -> Option<PathRef>,
        yes: bool,
        passed: Vec<(PathRef, usize)>,
    }
    impl<'a> Visitor<'a> for E<'_, '_> {
        fn visit_expr(&mut self, expr: &'a Expr) {
            if self.yes {
                return;
            }
            match expr {
                Expr::Lambda(l) => {
                    if mentions(&l.body, self.name) {
                        self.yes = true;
                    }
                    return;
                }
                Expr::Yield(y) if y.value.as_deref().is_some_and(|v| mentions(v, self.name)) => {
                    self.yes = true;
                    return;
                }
                Expr::Call(c) => {
                    let last = callee_last(&c.func);
                    for (i, a) in c.arguments.args.iter().enumerate() {
                        let bound_method =
                            matches!(a, Expr::Attribute(at) if is_name(&at.value, self.name));
                        if bound_method || (value_holds(a, self.name) && !is_name(a, self.name)) {
                            self.yes = true;
                            return;
                        }
                        if is_name(a, self.name) {
                            if takes_ownership(last) {
                                self.yes = true;
                                return;
                            }
                            if let Some(p) = (self.path)(&c.func) {
                                self.passed.push((p, i));
                            }
                        }
                    }
                    for k in &c.arguments.keywords {
                        if mentions(&k.value, self.name)
                            && (takes_ownership(last)
                                || k.arg.as_ref().is_some_and(|a| {
                                    matches!(a.id.as_str(), "args" | "kwargs" | "fileno" | "sock")
                                }))
                        {
                            self.yes = true;
                            return;
                        }
                    }
                }
                _ => {}
            }
            visitor::walk_expr(self, expr);
        }
        fn visit_stmt(&mut self, stmt: &'a Stmt) {
            header_walk(self, stmt);
        }
    }
    let mut e = E {
        name,
        path,
        yes: false,
        passed: Vec::new(),
    };
    e.visit_stmt(stmt);
    if e.yes {
        Escape::Yes
    } else if e.passed.is_empty() {
        Escape::No
    } else {
        Escape::Passed(e.passed)
    }
}

/// Which of `params` the function closes, stores, returns or hands on (one
/// pass over the body). The extraction gets the same answer from its own
/// walk through [`Consumed`]; this whole-body form is the reference.
pub fn consumed_params(body: &[Stmt], params: &[&str]) -> Vec<bool> {
    let mut c = Consumed::default();
    for s in body {
        c.visit_stmt(s);
    }
    c.of(params)
}

/// The names a function closes, stores, returns or hands on: `return x`,
/// `self.a = x`, `with x`, `yield x`, a lambda's body (every name in
/// them), `x.close()` (and `release`, `wait`, ...), `close(x)` and calls
/// that take ownership (`q.put(x)`, `Thread(target=x)`).
///
/// A walker that already visits every statement and expression calls
/// [`Consumed::stmt`] and [`Consumed::call`] at each; the [`Visitor`] impl
/// does the whole walk itself (for a lambda or a nested class, or the
/// whole body in [`consumed_params`]).
#[derive(Default)]
pub struct Consumed(pub Vec<Name>);

impl Consumed {
    fn mark(&mut self, n: &Name) {
        self.0.push(n.clone());
    }

    /// Every name in `e`.
    fn names(&mut self, e: &Expr) {
        struct N<'c>(&'c mut Consumed);
        impl<'a> Visitor<'a> for N<'_> {
            fn visit_expr(&mut self, e: &'a Expr) {
                if let Expr::Name(n) = e {
                    self.0.mark(&n.id);
                }
                visitor::walk_expr(self, e);
            }
        }
        N(self).visit_expr(e);
    }

    /// The statement's own rule (its children are visited separately).
    pub fn stmt(&mut self, stmt: &Stmt) {
        match stmt {
            Stmt::Return(r) => {
                if let Some(v) = &r.value {
                    self.names(v);
                }
            }
            Stmt::Assign(a) if a.targets.iter().any(|t| !matches!(t, Expr::Name(_))) => {
                self.names(&a.value);
            }
            Stmt::With(w) => {
                for i in &w.items {
                    self.names(&i.context_expr);
                }
            }
            _ => {}
        }
    }

    /// A call's own rule (its callee and arguments are visited separately).
    pub fn call(&mut self, c: &ExprCall) {
        if let Expr::Attribute(a) = &*c.func
            && let Expr::Name(n) = &*a.value
            && matches!(
                a.attr.id.as_str(),
                "close" | "release" | "wait" | "communicate" | "shutdown" | "detach"
            )
        {
            self.mark(&n.id);
        }
        let last = callee_last(&c.func);
        if last == "close" || takes_ownership(last) {
            for a in c
                .arguments
                .args
                .iter()
                .chain(c.arguments.keywords.iter().map(|k| &k.value))
            {
                if let Expr::Name(n) = a {
                    self.mark(&n.id);
                }
            }
        }
    }

    /// An expression's own rule, calls aside: `yield x`, a lambda's body.
    pub fn expr(&mut self, expr: &Expr) {
        match expr {
            Expr::Yield(y) => {
                if let Some(v) = &y.value {
                    self.names(v);
                }
            }
            Expr::Lambda(l) => self.names(&l.body),
            _ => {}
        }
    }

    /// Per parameter: whether it is consumed.
    pub fn of(&self, params: &[&str]) -> Vec<bool> {
        params
            .iter()
            .map(|p| self.0.iter().any(|n| n.as_str() == *p))
            .collect()
    }
}

impl<'a> Visitor<'a> for Consumed {
    fn visit_stmt(&mut self, stmt: &'a Stmt) {
        self.stmt(stmt);
        visitor::walk_stmt(self, stmt);
    }
    fn visit_expr(&mut self, expr: &'a Expr) {
        match expr {
            Expr::Call(c) => self.call(c),
            e => self.expr(e),
        }
        visitor::walk_expr(self, expr);
    }
}

pub(super) enum Escape {
    Yes,
    No,
    Passed(Vec<(PathRef, usize)>),
}

/// A container or tuple literal holding the name: `(f, x)`, `[f]`, `{k: f}`.
pub(super) fn value_holds(e: &Expr, name: &str) -> bool {
    match e {
        Expr::Tuple(t) => t
            .elts
            .iter()
            .any(|x| is_name(x, name) || value_holds(x, name)),
        Expr::List(l) => l
            .elts
            .iter()
            .any(|x| is_name(x, name) || value_holds(x, name)),
        Expr::Set(s) => s.elts.iter().any(|x| is_name(x, name)),
        Expr::Dict(d) => d.items.iter().any(|i| is_name(&i.value, name)),
        Expr::If(i) => is_name(&i.body, name) || is_name(&i.orelse, name),
        Expr::BoolOp(b) => b.values.iter().any(|x| is_name(x, name)),
        _ => false,
    }
}
