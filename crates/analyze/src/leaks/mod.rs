//! Resources not released on every path, one function at a time.
//!
//! A forward walk over the function's statements keeps the set of resources
//! that are open (a local bound to `open()`, `socket.socket()`, `os.open()`,
//! `subprocess.Popen()`, ..., or a lock taken with `acquire()`). Every way
//! out of the function, loop iteration or variable binding is checked: an
//! early `return`, `break`/`continue`, `raise`, an exception propagating from
//! a call, falling off the end, or rebinding the variable. `try/finally`,
//! `with` and handlers that catch everything release what they close on the
//! paths that go through them. A resource that escapes (returned, stored in
//! an attribute or container, handed to a thread, closed by a wrapper) stops
//! being tracked on that path.

use std::collections::{BTreeMap, BTreeSet};

use ruff_python_ast::visitor::{self, Visitor};
use ruff_python_ast::{self as ast, Expr, Stmt};
use ruff_text_size::Ranged;

use crate::facts::*;
use crate::source::LineCursor;

mod ownership;
mod syntax;

pub use ownership::{Consumed, consumed_params};
use ownership::{Escape, escape, releases};
use syntax::*;
pub use syntax::{acquires_in, acquisition, callee_last, maybe_acquires, release_text};

struct Res {
    var: String,
    kind: ResourceKind,
    acquired_by: String,
    line: u32,
    released_somewhere: bool,
    exits: Vec<LeakExit>,
    passed_to: Vec<(PathRef, usize)>,
}

#[derive(Clone, Copy)]
struct Open {
    res: usize,
    via_break: Option<u32>,
}

/// Open resources by variable (or, for locks, by the lock's text).
#[derive(Clone, Default)]
struct State(BTreeMap<String, Open>);

impl State {
    fn union(a: Option<State>, b: Option<State>) -> Option<State> {
        match (a, b) {
            (None, x) | (x, None) => x,
            (Some(mut a), Some(b)) => {
                for (k, v) in b.0 {
                    a.0.entry(k).or_insert(v);
                }
                Some(a)
            }
        }
    }
}

enum Frame {
    Try {
        finally_releases: BTreeSet<String>,
        has_handlers: bool,
        catches_all: bool,
        exc: Option<State>,
    },
    With(BTreeSet<String>),
    Loop {
        first_res: usize,
        breaks: Option<State>,
    },
}

/// Finds resources in one function body that some path leaves open.
pub fn find(
    body: &[Stmt],
    function: usize,
    lines: &LineCursor,
    qualify: &dyn Fn(&Expr) -> Option<String>,
    path: &dyn Fn(&Expr) -> Option<PathRef>,
) -> Vec<LeakFact> {
    if !any_acquisition(body) {
        return Vec::new();
    }
    let mut w = Walker {
        lines,
        qualify,
        path,
        res: Vec::new(),
        frames: Vec::new(),
        released_locks: BTreeSet::new(),
    };
    released_locks(body, &mut w.released_locks);
    if let Some(state) = w.block(body, State::default()) {
        // Asked after the walk, where the line cursor already is.
        let end_line = body
            .last()
            .map(|s| lines.line(s.end().to_u32().saturating_sub(1)))
            .unwrap_or(0);
        for open in state.0.values() {
            w.leak(*open, ExitKind::End, end_line);
        }
    }
    w.res
        .into_iter()
        .filter(|r| !r.exits.is_empty())
        .filter(|r| r.kind != ResourceKind::Lock || r.released_somewhere)
        .map(|r| LeakFact {
            function,
            var: r.var,
            kind: r.kind,
            acquired_by: r.acquired_by,
            line: r.line,
            exits: r.exits,
            released_elsewhere: r.released_somewhere,
            passed_to: r.passed_to,
        })
        .collect()
}

struct Walker<'l, 'q> {
    lines: &'l LineCursor<'l>,
    qualify: &'q dyn Fn(&Expr) -> Option<String>,
    path: &'q dyn Fn(&Expr) -> Option<PathRef>,
    res: Vec<Res>,
    frames: Vec<Frame>,
    released_locks: BTreeSet<String>,
}

impl Walker<'_, '_> {
    fn line(&self, n: &impl Ranged) -> u32 {
        self.lines.line(n.start().to_u32())
    }

    fn leak(&mut self, open: Open, kind: ExitKind, line: u32) {
        let exit = LeakExit {
            kind,
            line,
            via_break: open.via_break,
        };
        let r = &mut self.res[open.res];
        if !r.exits.contains(&exit) && r.exits.len() < 16 {
            r.exits.push(exit);
        }
    }

    /// Walks a block; `None` when it never falls through.
    fn block(&mut self, body: &[Stmt], mut state: State) -> Option<State> {
        for stmt in body {
            state = self.stmt(stmt, state)?;
        }
        Some(state)
    }

    /// An exception raised at `line` with `state` open.
    fn exception(&mut self, mut state: State, line: u32, explicit: bool) {
        if state.0.is_empty() {
            return;
        }
        for frame in self.frames.iter_mut().rev() {
            match frame {
                Frame::Try {
                    finally_releases,
                    has_handlers,
                    catches_all,
                    exc,
                } => {
                    if *has_handlers {
                        *exc = State::union(exc.take(), Some(state.clone()));
                        if *catches_all {
                            return;
                        }
                    }
                    state.0.retain(|k, _| !finally_releases.contains(k));
                }
                Frame::With(rel) => state.0.retain(|k, _| !rel.contains(k)),
                Frame::Loop { .. } => {}
            }
        }
        let kind = if explicit {
            ExitKind::Raise
        } else {
            ExitKind::Exception
        };
        for open in state.0.into_values() {
            self.leak(open, kind, line);
        }
    }

    fn exit_function(&mut self, mut state: State, kind: ExitKind, line: u32) {
        for frame in self.frames.iter().rev() {
            match frame {
                Frame::Try {
                    finally_releases, ..
                } => state.0.retain(|k, _| !finally_releases.contains(k)),
                Frame::With(rel) => state.0.retain(|k, _| !rel.contains(k)),
                Frame::Loop { .. } => {}
            }
        }
        for open in state.0.into_values() {
            self.leak(open, kind, line);
        }
    }

    fn loop_exit(&mut self, mut state: State, brk: bool, line: u32) {
        let mut target = None;
        for (i, frame) in self.frames.iter().enumerate().rev() {
            match frame {
                Frame::Try {
                    finally_releases, ..
                } => state.0.retain(|k, _| !finally_releases.contains(k)),
                Frame::With(rel) => state.0.retain(|k, _| !rel.contains(k)),
                Frame::Loop { .. } => {
                    target = Some(i);
                    break;
                }
            }
        }
        let Some(i) = target else { return };
        let Frame::Loop { first_res, .. } = self.frames[i] else {
            return;
        };
        if brk {
            for open in state.0.values_mut() {
                open.via_break.get_or_insert(line);
            }
            if let Frame::Loop { breaks, .. } = &mut self.frames[i] {
                *breaks = State::union(breaks.take(), Some(state));
            }
        } else {
            for open in state.0.into_values() {
                if open.res >= first_res {
                    self.leak(open, ExitKind::Continue, line);
                }
            }
        }
    }

    /// Releases and escapes in one simple statement.
    fn effects(&mut self, stmt: &Stmt, state: &mut State) {
        let keys: Vec<(String, Open)> = state.0.iter().map(|(k, v)| (k.clone(), *v)).collect();
        for (key, open) in keys {
            let kind = self.res[open.res].kind;
            if releases(stmt, &key, kind) {
                self.res[open.res].released_somewhere = true;
                state.0.remove(&key);
                continue;
            }
            if kind == ResourceKind::Lock {
                continue;
            }
            match escape(stmt, &key, self.path) {
                Escape::Yes => {
                    state.0.remove(&key);
                }
                Escape::Passed(p) => {
                    let r = &mut self.res[open.res];
                    for x in p {
                        if !r.passed_to.contains(&x) {
                            r.passed_to.push(x);
                        }
                    }
                }
                Escape::No => {}
            }
        }
    }

    /// Acquisitions made by an assignment: (variable, kind, qualified callee).
    fn acquisitions(&self, stmt: &Stmt) -> Vec<(String, ResourceKind, String)> {
        let (targets, value): (Vec<&Expr>, &Expr) = match stmt {
            Stmt::Assign(a) => (a.targets.iter().collect(), &a.value),
            Stmt::AnnAssign(a) => match &a.value {
                Some(v) => (vec![&*a.target], v),
                None => return Vec::new(),
            },
            _ => return Vec::new(),
        };
        let Expr::Call(call) = value else {
            return Vec::new();
        };
        let q = (self.qualify)(&call.func);
        let is_accept = callee_last(&call.func) == "accept" && call.arguments.args.is_empty();
        let kind = match q.as_deref().and_then(acquisition) {
            Some(k) => k,
            None if is_accept => ResourceKind::Socket,
            None => return Vec::new(),
        };
        let by = q.unwrap_or_else(|| "accept".to_owned());
        let tuple_result =
            is_accept || matches!(by.as_str(), "os.pipe" | "os.pipe2" | "os.openpty");
        let mut out = Vec::new();
        for t in targets {
            match t {
                Expr::Name(n) if !tuple_result => {
                    out.push((n.id.as_str().to_owned(), kind, by.clone()))
                }
                Expr::Tuple(tu) if tuple_result => {
                    let names: Vec<_> = tu.elts.iter().collect();
                    let take = if is_accept { 1 } else { names.len() };
                    for e in names.into_iter().take(take) {
                        if let Expr::Name(n) = e {
                            out.push((n.id.as_str().to_owned(), kind, by.clone()));
                        }
                    }
                }
                _ => {}
            }
        }
        out
    }

    fn open(&mut self, state: &mut State, var: String, kind: ResourceKind, by: String, line: u32) {
        if let Some(old) = state.0.get(&var).copied() {
            self.leak(old, ExitKind::Overwritten, line);
        }
        let res = self.res.len();
        self.res.push(Res {
            var: var.clone(),
            kind,
            acquired_by: by,
            line,
            released_somewhere: false,
            exits: Vec::new(),
            passed_to: Vec::new(),
        });
        state.0.insert(
            var,
            Open {
                res,
                via_break: None,
            },
        );
    }

    /// `X.acquire()` in an expression statement or an `if` test.
    fn lock_acquire(&self, e: &Expr) -> Option<(String, bool)> {
        let (call, negated) = match e {
            Expr::Call(c) => (c, false),
            Expr::UnaryOp(u) if u.op == ast::UnaryOp::Not => match &*u.operand {
                Expr::Call(c) => (c, true),
                _ => return None,
            },
            _ => return None,
        };
        let Expr::Attribute(a) = &*call.func else {
            return None;
        };
        if a.attr.id.as_str() != "acquire" {
            return None;
        }
        let key = expr_text(&a.value)?;
        self.released_locks.contains(&key).then_some((key, negated))
    }

    fn stmt(&mut self, stmt: &Stmt, mut state: State) -> Option<State> {
        let line = self.line(stmt);
        match stmt {
            Stmt::Return(r) => {
                if r.value.as_deref().is_some_and(has_call) {
                    self.exception(state.clone(), line, false);
                }
                self.effects(stmt, &mut state);
                self.exit_function(state, ExitKind::Return, line);
                None
            }
            Stmt::Raise(_) => {
                self.effects(stmt, &mut state);
                self.exception(state, line, true);
                None
            }
            Stmt::Break(_) => {
                self.loop_exit(state, true, line);
                None
            }
            Stmt::Continue(_) => {
                self.loop_exit(state, false, line);
                None
            }
            Stmt::If(i) => {
                if has_call(&i.test) {
                    self.exception(state.clone(), line, false);
                }
                self.effects(stmt, &mut state);
                let mut then_state = state.clone();
                let mut else_state = state.clone();
                if let Some((key, negated)) = self.lock_acquire(&i.test) {
                    let target = if negated {
                        &mut else_state
                    } else {
                        &mut then_state
                    };
                    self.open(
                        target,
                        key.clone(),
                        ResourceKind::Lock,
                        format!("{key}.acquire"),
                        line,
                    );
                }
                refine(&i.test, &mut then_state, &mut else_state);
                let mut out = self.block(&i.body, then_state);
                let mut has_else = false;
                let mut rest = else_state;
                for clause in &i.elif_else_clauses {
                    match &clause.test {
                        Some(test) => {
                            let mut t = rest.clone();
                            let mut e = rest.clone();
                            refine(test, &mut t, &mut e);
                            out = State::union(out, self.block(&clause.body, t));
                            rest = e;
                        }
                        None => {
                            has_else = true;
                            out = State::union(out, self.block(&clause.body, rest.clone()));
                        }
                    }
                }
                if !has_else {
                    out = State::union(out, Some(rest));
                }
                out
            }
            Stmt::While(w) => {
                if has_call(&w.test) {
                    self.exception(state.clone(), line, false);
                }
                let infinite = matches!(&*w.test, Expr::BooleanLiteral(b) if b.value)
                    || matches!(&*w.test, Expr::NumberLiteral(_));
                self.looping(stmt, &w.body, &w.orelse, state, infinite)
            }
            Stmt::For(f) => {
                if has_call(&f.iter) {
                    self.exception(state.clone(), line, false);
                }
                self.effects(stmt, &mut state);
                self.looping(stmt, &f.body, &f.orelse, state, false)
            }
            Stmt::With(w) => {
                let mut rel = BTreeSet::new();
                for item in &w.items {
                    let e = &item.context_expr;
                    if has_call(e) {
                        self.exception(state.clone(), line, false);
                    }
                    for key in state.0.keys() {
                        let closes = is_name(e, key)
                            || matches!(e, Expr::Call(c) if callee_last(&c.func) == "closing"
                                && c.arguments.args.first().is_some_and(|a| is_name(a, key)));
                        if closes {
                            rel.insert(key.clone());
                        }
                    }
                }
                for k in &rel {
                    if let Some(o) = state.0.get(k) {
                        self.res[o.res].released_somewhere = true;
                    }
                }
                self.frames.push(Frame::With(rel.clone()));
                let out = self.block(&w.body, state);
                self.frames.pop();
                out.map(|mut s| {
                    s.0.retain(|k, _| !rel.contains(k));
                    s
                })
            }
            Stmt::Try(t) => self.try_stmt(t, state),
            Stmt::Match(m) => {
                let mut out = None;
                let mut exhaustive = false;
                for case in &m.cases {
                    if case.pattern.is_wildcard() && case.guard.is_none() {
                        exhaustive = true;
                    }
                    out = State::union(out, self.block(&case.body, state.clone()));
                }
                if !exhaustive {
                    out = State::union(out, Some(state));
                }
                out
            }
            Stmt::FunctionDef(_) | Stmt::ClassDef(_) => {
                self.effects(stmt, &mut state);
                Some(state)
            }
            _ => {
                let raises = match stmt {
                    Stmt::Expr(e) => has_call(&e.value),
                    Stmt::Assign(a) => has_call(&a.value),
                    Stmt::AugAssign(a) => has_call(&a.value),
                    Stmt::AnnAssign(a) => a.value.as_deref().is_some_and(has_call),
                    Stmt::Assert(_) => true,
                    _ => false,
                };
                let acquired = self.acquisitions(stmt);
                let lock = match stmt {
                    Stmt::Expr(e) => self.lock_acquire(&e.value).filter(|(_, neg)| !neg),
                    _ => None,
                };
                let mut pre = state.clone();
                self.effects(stmt, &mut state);
                if raises {
                    // An exception from this statement leaves what was open
                    // before it (minus what it released) open.
                    pre.0.retain(|k, _| state.0.contains_key(k));
                    self.exception(pre, line, false);
                }
                // Rebinding a tracked variable to something else.
                for t in assigned_names(stmt) {
                    if acquired.iter().any(|(v, _, _)| *v == t) {
                        continue;
                    }
                    if let Some(old) = state.0.remove(&t) {
                        let none = matches!(stmt, Stmt::Assign(a) if matches!(&*a.value, Expr::NoneLiteral(_)));
                        if none && self.res[old.res].kind != ResourceKind::RawFd {
                            // `x = None` drops the last reference: CPython closes it.
                            continue;
                        }
                        self.leak(old, ExitKind::Overwritten, line);
                    }
                }
                for (var, kind, by) in acquired {
                    self.open(&mut state, var, kind, by, line);
                }
                if let Some((key, _)) = lock {
                    self.open(
                        &mut state,
                        key.clone(),
                        ResourceKind::Lock,
                        format!("{key}.acquire"),
                        line,
                    );
                }
                Some(state)
            }
        }
    }

    fn looping(
        &mut self,
        stmt: &Stmt,
        body: &[Stmt],
        orelse: &[Stmt],
        state: State,
        infinite: bool,
    ) -> Option<State> {
        let first_res = self.res.len();
        self.frames.push(Frame::Loop {
            first_res,
            breaks: None,
        });
        let end = self.block(body, state.clone());
        let Some(Frame::Loop { breaks, .. }) = self.frames.pop() else {
            return None;
        };
        let last_line = body
            .last()
            .map(|s| self.lines.line(s.end().to_u32().saturating_sub(1)))
            .unwrap_or_else(|| self.line(stmt));
        let end = end.map(|mut s| {
            let local: Vec<String> =
                s.0.iter()
                    .filter(|(_, o)| o.res >= first_res)
                    .map(|(k, _)| k.clone())
                    .collect();
            for k in local {
                if let Some(o) = s.0.remove(&k) {
                    self.leak(o, ExitKind::NextIteration, last_line);
                }
            }
            s
        });
        if infinite {
            return breaks;
        }
        let normal = State::union(Some(state), end);
        let after_else = match normal {
            Some(s) if !orelse.is_empty() => self.block(orelse, s),
            s => s,
        };
        State::union(after_else, breaks)
    }

    fn try_stmt(&mut self, t: &ast::StmtTry, state: State) -> Option<State> {
        let mut finally_releases = BTreeSet::new();
        for s in &t.finalbody {
            for key in state.0.keys().cloned().chain(self.names_opened_in(&t.body)) {
                if self.stmt_releases_any(s, &key) {
                    finally_releases.insert(key);
                }
            }
        }
        let catches_all = t.handlers.iter().any(|h| {
            let ast::ExceptHandler::ExceptHandler(h) = h;
            match h.type_.as_deref() {
                None => true,
                Some(Expr::Name(n)) => matches!(n.id.as_str(), "Exception" | "BaseException"),
                _ => false,
            }
        });
        self.frames.push(Frame::Try {
            finally_releases: finally_releases.clone(),
            has_handlers: !t.handlers.is_empty(),
            catches_all,
            exc: None,
        });
        let body_out = self.block(&t.body, state.clone());
        let Some(Frame::Try { exc, .. }) = self.frames.pop() else {
            return None;
        };
        let else_out = match body_out {
            Some(s) if !t.orelse.is_empty() => self.block(&t.orelse, s),
            s => s,
        };
        self.frames.push(Frame::Try {
            finally_releases,
            has_handlers: false,
            catches_all: false,
            exc: None,
        });
        let mut out = else_out;
        let entry = exc.unwrap_or(state);
        for h in &t.handlers {
            let ast::ExceptHandler::ExceptHandler(h) = h;
            out = State::union(out, self.block(&h.body, entry.clone()));
        }
        self.frames.pop();
        if t.finalbody.is_empty() {
            return out;
        }
        match out {
            Some(s) => self.block(&t.finalbody, s),
            None => {
                // The finally body still runs on the way out; walk it for
                // its own statements, then nothing falls through.
                let _ = self.block(&t.finalbody, State::default());
                None
            }
        }
    }

    fn names_opened_in(&self, body: &[Stmt]) -> Vec<String> {
        let mut out = Vec::new();
        struct A<'w, 'l, 'q, 'o>(&'w Walker<'l, 'q>, &'o mut Vec<String>);
        impl<'a> Visitor<'a> for A<'_, '_, '_, '_> {
            fn visit_stmt(&mut self, stmt: &'a Stmt) {
                for (v, _, _) in self.0.acquisitions(stmt) {
                    self.1.push(v);
                }
                if let Stmt::Expr(e) = stmt
                    && let Some((k, _)) = self.0.lock_acquire(&e.value)
                {
                    self.1.push(k);
                }
                if let Stmt::If(i) = stmt
                    && let Some((k, _)) = self.0.lock_acquire(&i.test)
                {
                    self.1.push(k);
                }
                match stmt {
                    Stmt::FunctionDef(_) | Stmt::ClassDef(_) => {}
                    _ => visitor::walk_stmt(self, stmt),
                }
            }
        }
        let mut a = A(self, &mut out);
        for s in body {
            a.visit_stmt(s);
        }
        out
    }

    /// Whether `s` (searched deeply) releases `key` of any kind.
    fn stmt_releases_any(&self, s: &Stmt, key: &str) -> bool {
        [
            ResourceKind::File,
            ResourceKind::RawFd,
            ResourceKind::Lock,
            ResourceKind::Process,
            ResourceKind::Pool,
        ]
        .into_iter()
        .any(|k| releases(s, key, k))
            || matches!(s, Stmt::With(w) if w.items.iter().any(|i| is_name(&i.context_expr, key)))
    }
}

fn assigned_names(stmt: &Stmt) -> Vec<String> {
    let mut out = Vec::new();
    let mut push = |t: &Expr| {
        if let Expr::Name(n) = t {
            out.push(n.id.as_str().to_owned());
        }
    };
    match stmt {
        Stmt::Assign(a) => {
            for t in &a.targets {
                match t {
                    Expr::Tuple(tu) => tu.elts.iter().for_each(&mut push),
                    t => push(t),
                }
            }
        }
        Stmt::AnnAssign(a) if a.value.is_some() => push(&a.target),
        _ => {}
    }
    out
}

/// Narrows on `if x:`, `if x is None:`, `if not x:`, `if x is not None:`.
fn refine(test: &Expr, then_state: &mut State, else_state: &mut State) {
    match test {
        Expr::Name(n) => {
            else_state.0.remove(n.id.as_str());
        }
        Expr::UnaryOp(u) if u.op == ast::UnaryOp::Not => {
            if let Expr::Name(n) = &*u.operand {
                then_state.0.remove(n.id.as_str());
            }
        }
        Expr::Compare(c)
            if c.ops.len() == 1 && matches!(c.comparators[0], Expr::NoneLiteral(_)) =>
        {
            if let Expr::Name(n) = &*c.left {
                match c.ops[0] {
                    ast::CmpOp::Is | ast::CmpOp::Eq => {
                        then_state.0.remove(n.id.as_str());
                    }
                    ast::CmpOp::IsNot | ast::CmpOp::NotEq => {
                        else_state.0.remove(n.id.as_str());
                    }
                    _ => {}
                }
            }
        }
        _ => {}
    }
}
