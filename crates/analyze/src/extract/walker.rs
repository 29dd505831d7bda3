//! Walks one function body: lock acquisitions with what is held, calls,
//! container operations, `self.x = ...` attributes.

use ruff_python_ast::visitor::{self, Visitor};
use ruff_python_ast::{self as ast, Expr, Stmt};
use ruff_text_size::Ranged;

use super::env::*;
use super::{FileCx, adds_to_container, removes_from_container};
use crate::facts::*;
use crate::leaks::{Consumed, acquires_in, callee_last, maybe_acquires};

/// Walks one function body (not nested definitions, which get their own).
pub(super) struct FnWalker<'c, 'f, 'e> {
    pub(super) cx: &'c mut FileCx<'f>,
    pub(super) idx: usize,
    pub(super) env: &'e Env<'e>,
    /// Indices of acquisitions currently held.
    pub(super) held: Vec<u32>,
    pub(super) in_init: bool,
    pub(super) class: Option<usize>,
    pub(super) qualname: String,
    /// Names the body (nested definitions included) closes, stores,
    /// returns or hands on: the parameters' ownership, from this same walk.
    pub(super) consumed: Consumed,
    /// A call whose name may acquire a resource (`open`, `socket`, ...):
    /// only then does the leak analysis walk the body.
    pub(super) may_acquire: bool,
}

impl FnWalker<'_, '_, '_> {
    fn func(&mut self) -> &mut FunctionFacts {
        &mut self.cx.facts.functions[self.idx]
    }

    fn op(&mut self, target: Option<PathRef>, op: OpKind, line: u32) {
        // A function-local container dies with the call: only what outlives
        // it (globals, attributes) can leak.
        if let Some(target) = target
            && !matches!(target.root, Root::Local(_))
        {
            self.cx.facts.container_ops.push(ContainerOp {
                target,
                op,
                line,
                function: self.idx,
            });
        }
    }

    fn acquire(&mut self, lock: PathRef, line: u32, via: AcquireVia) -> u32 {
        let held = self.held.clone();
        let f = self.func();
        let i = f.acquires.len() as u32;
        f.acquires.push(AcquireFact {
            lock,
            line,
            via,
            held,
        });
        self.held.push(i);
        i
    }

    fn release(&mut self, lock: &PathRef) {
        let f = &self.cx.facts.functions[self.idx];
        if let Some(pos) = self
            .held
            .iter()
            .rposition(|&i| f.acquires[i as usize].lock == *lock)
        {
            self.held.remove(pos);
        }
    }

    fn call(&mut self, c: &ast::ExprCall, awaited: bool) {
        self.consumed.call(c);
        self.may_acquire |= maybe_acquires(callee_last(&c.func));
        let line = self.cx.line(c);
        let callee = self.env.path(&c.func);
        // What the call does to its receiver or first argument, decided
        // before the callee moves into the call fact; applied after the
        // arguments, which run first.
        let effect = callee
            .as_ref()
            .map_or(CallEffect::None, |callee| self.effect(c, callee));
        if let Some(callee) = callee {
            let held = self.held.clone();
            let range = c.range();
            self.cx.calls.push(CallFact {
                callee,
                line,
                start: range.start().to_u32(),
                end: range.end().to_u32(),
                held,
                awaited,
            });
        }
        // Walk the callee expression and the arguments first: they run before the call.
        self.visit_expr(&c.func);
        for a in &c.arguments.args {
            self.visit_expr(a);
        }
        for k in &c.arguments.keywords {
            self.visit_expr(&k.value);
        }
        match effect {
            CallEffect::None => {}
            CallEffect::Acquire(recv) => {
                self.acquire(recv, line, AcquireVia::Acquire);
            }
            CallEffect::Release(recv) => self.release(&recv),
            CallEffect::Receiver(recv, op) => self.op(Some(recv), op, line),
            CallEffect::FirstArg(first, op) => self.op(first, op, line),
        }
    }

    /// What a call to `callee` does to a lock or container it names.
    fn effect(&self, c: &ast::ExprCall, callee: &PathRef) -> CallEffect {
        let method = callee.last();
        let interesting = matches!(method, "acquire" | "release")
            || adds_to_container(method)
            || removes_from_container(method);
        if interesting && let Some(recv) = receiver(callee) {
            return match method {
                "acquire" => CallEffect::Acquire(recv),
                "release" => CallEffect::Release(recv),
                m if adds_to_container(m) => {
                    let constant_key =
                        m == "setdefault" && c.arguments.args.first().is_some_and(is_constant);
                    if constant_key {
                        CallEffect::None
                    } else {
                        CallEffect::Receiver(recv, OpKind::Add)
                    }
                }
                _ => CallEffect::Receiver(recv, OpKind::Remove),
            };
        }
        let op = match method {
            "heappush" | "insort" | "insort_right" | "insort_left" => Some(OpKind::Add),
            "heappop" | "heappushpop" | "heapreplace" => Some(OpKind::Remove),
            _ => None,
        };
        if let Some(op) = op
            && matches!(
                callee.text().as_str(),
                "heapq.heappush"
                    | "bisect.insort"
                    | "bisect.insort_right"
                    | "bisect.insort_left"
                    | "heapq.heappop"
                    | "heapq.heappushpop"
                    | "heapq.heapreplace"
            )
        {
            let first = c.arguments.args.first().and_then(|a| self.env.path(a));
            return CallEffect::FirstArg(first, op);
        }
        CallEffect::None
    }

    fn store(&mut self, target: &Expr, value: Option<&Expr>, line: u32) {
        match target {
            Expr::Subscript(s) => {
                let container = self.env.path(&s.value);
                let op = if matches!(&*s.slice, Expr::Slice(_)) {
                    OpKind::Remove
                } else if is_constant(&s.slice) {
                    return;
                } else {
                    OpKind::Add
                };
                self.op(container, op, line);
            }
            Expr::Name(n) if self.env.globals.contains(n.id.as_str()) => {
                self.op(Some(PathRef::name(n.id.as_str())), OpKind::Remove, line);
            }
            Expr::Attribute(a) => {
                let Some(obj) = self.env.path(&a.value) else {
                    return;
                };
                if obj.root == Root::SelfObj && obj.attrs.is_empty() {
                    if let (Some(class), Some(v)) = (self.class, value) {
                        let env = self.env;
                        let value = value_of(v, &|e| env.path(e));
                        let attrs = &mut self.cx.facts.classes[class].attrs;
                        attrs.or_insert_with(&a.attr.id, || Attr {
                            value,
                            line,
                            class_level: false,
                            in_function: Some(self.idx),
                        });
                    }
                    if self.in_init {
                        return;
                    }
                }
                self.op(
                    Some(obj.with_attr(a.attr.id.as_str())),
                    OpKind::Remove,
                    line,
                );
            }
            Expr::Tuple(t) => {
                for e in &t.elts {
                    self.store(e, None, line);
                }
            }
            _ => {}
        }
    }
}

/// `x.y.m` → `x.y` (the object a method is called on).
/// What a call does to the lock or container it names.
enum CallEffect {
    None,
    Acquire(PathRef),
    Release(PathRef),
    /// `recv.append(x)`, `recv.pop()`...
    Receiver(PathRef, OpKind),
    /// `heapq.heappush(first, x)`...
    FirstArg(Option<PathRef>, OpKind),
}

pub(super) fn receiver(callee: &PathRef) -> Option<PathRef> {
    let mut p = callee.clone();
    p.attrs.pop()?;
    Some(p)
}

impl<'a> Visitor<'a> for FnWalker<'_, '_, '_> {
    fn visit_stmt(&mut self, stmt: &'a Stmt) {
        self.consumed.stmt(stmt);
        match stmt {
            Stmt::FunctionDef(f) => {
                let prefix = format!("{}.<locals>.", self.qualname);
                let env = self.env;
                let (child, consumed) =
                    self.cx
                        .function(f, self.class, Some((self.idx, env)), &prefix);
                self.func().local_defs.insert(&f.name.id, child);
                // What the nested body consumes, the enclosing one does too
                // (a closure that closes a parameter); so does its header.
                self.consumed.0.extend(consumed.0);
                for d in &f.decorator_list {
                    self.consumed.visit_decorator(d);
                }
                self.consumed.visit_parameters(&f.parameters);
                if let Some(r) = &f.returns {
                    self.consumed.visit_annotation(r);
                }
            }
            // Its own scope, but what it consumes counts.
            Stmt::ClassDef(_) => self.consumed.visit_stmt(stmt),
            Stmt::Import(_) | Stmt::ImportFrom(_) => self.cx.import(stmt, true, true),
            Stmt::With(w) => {
                let before = self.held.len();
                for item in &w.items {
                    self.visit_expr(&item.context_expr);
                    if matches!(item.context_expr, Expr::Name(_) | Expr::Attribute(_))
                        && let Some(lock) = self.env.path(&item.context_expr)
                    {
                        let via = if w.is_async {
                            AcquireVia::AsyncWith
                        } else {
                            AcquireVia::With
                        };
                        let line = self.cx.line(&item.context_expr);
                        self.acquire(lock, line, via);
                    }
                }
                self.visit_body(&w.body);
                // Only the `with` acquisitions end here; explicit acquire()
                // inside stays held until its release().
                let pushed: Vec<u32> = self.held.drain(before.min(self.held.len())..).collect();
                let f = &self.cx.facts.functions[self.idx];
                self.held.extend(
                    pushed
                        .into_iter()
                        .filter(|&i| f.acquires[i as usize].via == AcquireVia::Acquire),
                );
            }
            // Only the stores need the statement's line.
            Stmt::Assign(a) => {
                let line = self.cx.line(stmt);
                self.visit_expr(&a.value);
                for t in &a.targets {
                    self.store(t, Some(&a.value), line);
                    if !matches!(t, Expr::Name(_)) {
                        self.visit_expr(t);
                    }
                }
            }
            Stmt::AnnAssign(a) => {
                if let Some(v) = &a.value {
                    let line = self.cx.line(stmt);
                    self.visit_expr(v);
                    self.store(&a.target, Some(v), line);
                }
            }
            Stmt::AugAssign(a) => {
                let line = self.cx.line(stmt);
                self.visit_expr(&a.value);
                let target = self.env.path(&a.target);
                let op = match a.op {
                    ast::Operator::Sub => OpKind::Remove,
                    _ => OpKind::Add,
                };
                if !matches!(&*a.target, Expr::Name(n) if !self.env.globals.contains(n.id.as_str()))
                {
                    self.op(target, op, line);
                }
            }
            Stmt::Delete(d) => {
                let line = self.cx.line(stmt);
                for t in &d.targets {
                    if let Expr::Subscript(s) = t {
                        let c = self.env.path(&s.value);
                        self.op(c, OpKind::Remove, line);
                    }
                    self.visit_expr(t);
                }
            }
            _ => visitor::walk_stmt(self, stmt),
        }
    }

    fn visit_expr(&mut self, expr: &'a Expr) {
        match expr {
            // Runs later, if at all: only what it consumes or acquires counts.
            Expr::Lambda(_) => {
                self.consumed.visit_expr(expr);
                self.may_acquire |= acquires_in(expr);
            }
            Expr::Yield(_) => {
                self.consumed.expr(expr);
                visitor::walk_expr(self, expr);
            }
            Expr::Await(a) => match &*a.value {
                Expr::Call(c) => self.call(c, true),
                other => self.visit_expr(other),
            },
            Expr::Call(c) => self.call(c, false),
            Expr::Compare(c) => {
                let line = self.cx.line(c);
                for operand in std::iter::once(&*c.left).chain(c.comparators.iter()) {
                    if let Expr::Call(call) = operand
                        && matches!(&*call.func, Expr::Name(n) if n.id.as_str() == "len")
                        && let Some(arg) = call.arguments.args.first()
                    {
                        let target = self.env.path(arg);
                        self.op(target, OpKind::Bound, line);
                    }
                }
                visitor::walk_expr(self, expr);
            }
            _ => visitor::walk_expr(self, expr),
        }
    }
}
