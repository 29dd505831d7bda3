//! A function's locals and the references expressions denote: `self`,
//! aliases (`lock = self._lock`), instances (`s = Store()`), annotations.

use rustc_hash::FxHashMap;
use std::collections::BTreeSet;

use ruff_python_ast::{self as ast, Expr, Stmt};

use crate::facts::*;

/// Local name → what it is bound to (see [`Env`]).
pub(crate) type VarTable = FxHashMap<Name, Option<PathRef>>;

/// A function's locals: `Some(path)` when the name is bound to something we
/// can name, `None` for an opaque local. `outer` is the enclosing function's.
#[derive(Default)]
pub(crate) struct Env<'o> {
    pub(super) vars: VarTable,
    pub(super) globals: BTreeSet<Name>,
    pub(super) self_name: Option<Name>,
    pub(super) outer: Option<&'o Env<'o>>,
}

impl Env<'_> {
    pub(super) fn lookup(&self, n: &str) -> Option<&Option<PathRef>> {
        if self.globals.contains(n) {
            return None;
        }
        self.vars
            .get(n)
            .or_else(|| self.outer.and_then(|o| o.lookup(n)))
    }

    pub(super) fn is_self(&self, n: &str) -> bool {
        self.self_name.as_ref().is_some_and(|s| s.as_str() == n)
            || self
                .outer
                .is_some_and(|o| !self.vars.contains_key(n) && o.is_self(n))
    }

    /// The reference an expression denotes, locals substituted.
    pub(super) fn path(&self, e: &Expr) -> Option<PathRef> {
        // The attribute chain's length, then its root: the attributes are
        // allocated once, at their exact size (most facts are kept to the
        // end of the run, so spare capacity would only cost memory).
        let (mut depth, mut root) = (0, e);
        while let Expr::Attribute(a) = root {
            depth += 1;
            root = &a.value;
        }
        let mut p = match root {
            Expr::Name(n) => self.name(&n.id),
            Expr::Call(c) => PathRef {
                root: Root::Instance(Box::new(self.path(&c.func)?)),
                attrs: Vec::new(),
            },
            _ => return None,
        };
        if depth > 0 {
            let end = p.attrs.len() + depth;
            p.attrs.reserve_exact(depth);
            p.attrs.resize(end, Name::empty());
            let (mut i, mut at) = (end, e);
            while let Expr::Attribute(a) = at {
                i -= 1;
                p.attrs[i] = a.attr.id.clone();
                at = &a.value;
            }
        }
        Some(p)
    }

    pub(super) fn name(&self, n: &Name) -> PathRef {
        if self.is_self(n) {
            return PathRef {
                root: Root::SelfObj,
                attrs: Vec::new(),
            };
        }
        match self.lookup(n) {
            Some(Some(p)) => p.clone(),
            Some(None) => PathRef {
                root: Root::Local(n.clone()),
                attrs: Vec::new(),
            },
            None => PathRef::name(n.clone()),
        }
    }

    pub(super) fn bind(&mut self, name: &Name, v: Option<PathRef>) {
        if self.globals.contains(name.as_str()) {
            return;
        }
        match self.vars.get(name.as_str()) {
            Some(old) if *old != v => {
                self.vars.insert(name.clone(), None);
            }
            Some(_) => {}
            None => {
                self.vars.insert(name.clone(), v);
            }
        }
    }
}

/// Collects a function's local bindings in source order (not descending
/// into nested functions or classes, whose names are bound opaquely).
pub(super) fn collect_locals(body: &[Stmt], env: &mut Env) {
    for stmt in body {
        match stmt {
            Stmt::Global(g) => {
                for n in &g.names {
                    env.globals.insert(n.id.clone());
                }
            }
            Stmt::Nonlocal(g) => {
                for n in &g.names {
                    env.vars.remove(n.id.as_str());
                }
            }
            Stmt::Assign(a) => {
                let v = bound_value(&a.value, env);
                for t in &a.targets {
                    bind_target(t, v.clone(), env);
                }
            }
            Stmt::AnnAssign(a) => {
                let v = annotation_path(&a.annotation)
                    .map(|t| PathRef {
                        root: Root::Instance(Box::new(t)),
                        attrs: Vec::new(),
                    })
                    .or_else(|| a.value.as_deref().and_then(|v| bound_value(v, env)));
                bind_target(&a.target, v, env);
            }
            Stmt::AugAssign(a) => bind_target(&a.target, None, env),
            Stmt::For(f) => {
                bind_target(&f.target, None, env);
                collect_locals(&f.body, env);
                collect_locals(&f.orelse, env);
            }
            Stmt::While(w) => {
                collect_locals(&w.body, env);
                collect_locals(&w.orelse, env);
            }
            Stmt::If(i) => {
                collect_locals(&i.body, env);
                for c in &i.elif_else_clauses {
                    collect_locals(&c.body, env);
                }
            }
            Stmt::With(w) => {
                for item in &w.items {
                    if let Some(v) = &item.optional_vars {
                        let bound = match &item.context_expr {
                            e @ Expr::Call(_) => env.path(e),
                            _ => None,
                        };
                        bind_target(v, bound, env);
                    }
                }
                collect_locals(&w.body, env);
            }
            Stmt::Try(t) => {
                collect_locals(&t.body, env);
                for h in &t.handlers {
                    let ast::ExceptHandler::ExceptHandler(h) = h;
                    if let Some(n) = &h.name {
                        env.bind(&n.id, None);
                    }
                    collect_locals(&h.body, env);
                }
                collect_locals(&t.orelse, env);
                collect_locals(&t.finalbody, env);
            }
            Stmt::Match(m) => {
                for c in &m.cases {
                    collect_locals(&c.body, env);
                }
            }
            Stmt::FunctionDef(f) => env.bind(&f.name.id, None),
            Stmt::ClassDef(c) => env.bind(&c.name.id, None),
            _ => {}
        }
    }
}

pub(super) fn bound_value(e: &Expr, env: &Env) -> Option<PathRef> {
    match e {
        Expr::Name(_) | Expr::Attribute(_) | Expr::Call(_) => env.path(e),
        _ => None,
    }
}

pub(super) fn bind_target(t: &Expr, v: Option<PathRef>, env: &mut Env) {
    match t {
        Expr::Name(n) => env.bind(&n.id, v),
        Expr::Tuple(tu) => {
            for e in &tu.elts {
                bind_target(e, None, env);
            }
        }
        Expr::List(l) => {
            for e in &l.elts {
                bind_target(e, None, env);
            }
        }
        Expr::Starred(s) => bind_target(&s.value, None, env),
        _ => {}
    }
}

/// A dotted path without any locals (`a.b.c`, `f().x`).
pub(crate) fn plain_path(e: &Expr) -> Option<PathRef> {
    Env::default().path(e)
}

/// The class named by an annotation: `T`, `mod.T`, `Optional[T]`,
/// `T | None`, `"T"`.
pub(super) fn annotation_path(e: &Expr) -> Option<PathRef> {
    match e {
        Expr::Name(_) | Expr::Attribute(_) => plain_path(e),
        Expr::Subscript(s) => {
            let outer = plain_path(&s.value)?;
            if outer.last() == "Optional" {
                annotation_path(&s.slice)
            } else {
                None
            }
        }
        Expr::BinOp(b) => {
            if matches!(&*b.right, Expr::NoneLiteral(_)) {
                annotation_path(&b.left)
            } else if matches!(&*b.left, Expr::NoneLiteral(_)) {
                annotation_path(&b.right)
            } else {
                None
            }
        }
        Expr::StringLiteral(s) => {
            // Not `to_str()`: on an implicitly concatenated literal it caches
            // the joined text in the tree, on the heap, and trees from the
            // parse arena are forgotten, not dropped.
            let text: std::borrow::Cow<str> = if s.value.is_implicit_concatenated() {
                s.value
                    .iter()
                    .map(|part| &*part.value)
                    .collect::<String>()
                    .into()
            } else {
                s.value.to_str().into()
            };
            let ok = !text.is_empty()
                && text
                    .split('.')
                    .all(|p| !p.is_empty() && p.chars().all(|c| c.is_alphanumeric() || c == '_'));
            ok.then(|| {
                let mut parts = text.split('.');
                let mut p = PathRef::name(parts.next().unwrap_or_default());
                p.attrs.extend(parts.map(Name::new));
                p
            })
        }
        _ => None,
    }
}

/// What an assignment's right-hand side is.
pub(super) fn value_of(e: &Expr, path: &dyn Fn(&Expr) -> Option<PathRef>) -> Value {
    match e {
        Expr::Dict(_) | Expr::DictComp(_) => Value::Container(ContainerKind::Dict),
        Expr::List(_) | Expr::ListComp(_) => Value::Container(ContainerKind::List),
        Expr::Set(_) | Expr::SetComp(_) => Value::Container(ContainerKind::Set),
        Expr::Call(c) => {
            let Some(func) = path(&c.func) else {
                return Value::Other;
            };
            if c.arguments.args.is_empty() && c.arguments.keywords.is_empty() {
                match (&func.root, func.attrs.as_slice()) {
                    (Root::Name(n), []) if n == "dict" => {
                        return Value::Container(ContainerKind::Dict);
                    }
                    (Root::Name(n), []) if n == "list" => {
                        return Value::Container(ContainerKind::List);
                    }
                    (Root::Name(n), []) if n == "set" => {
                        return Value::Container(ContainerKind::Set);
                    }
                    _ => {}
                }
            }
            let bounded = c.arguments.keywords.iter().any(|k| {
                k.arg
                    .as_ref()
                    .is_some_and(|a| matches!(a.id.as_str(), "maxlen" | "maxsize" | "capacity"))
                    && !matches!(k.value, Expr::NoneLiteral(_))
            }) || (func.last() == "deque" && c.arguments.args.len() >= 2);
            Value::Call {
                func,
                first_arg: c.arguments.args.first().and_then(path),
                bounded,
            }
        }
        Expr::Name(_) | Expr::Attribute(_) => path(e).map_or(Value::Other, Value::Alias),
        _ => Value::Other,
    }
}

/// `@functools.cache`, `@cache`, `@lru_cache(maxsize=None)`, `@lru_cache(None)`.
pub(super) fn unbounded_cache_decorator(e: &Expr) -> bool {
    match e {
        Expr::Name(_) | Expr::Attribute(_) => plain_path(e).is_some_and(|p| p.last() == "cache"),
        Expr::Call(c) => {
            let Some(p) = plain_path(&c.func) else {
                return false;
            };
            p.last() == "lru_cache"
                && (matches!(c.arguments.args.first(), Some(Expr::NoneLiteral(_)))
                    || c.arguments.keywords.iter().any(|k| {
                        k.arg.as_ref().is_some_and(|a| a.id.as_str() == "maxsize")
                            && matches!(k.value, Expr::NoneLiteral(_))
                    }))
        }
        _ => false,
    }
}

pub(super) fn is_constant(e: &Expr) -> bool {
    matches!(
        e,
        Expr::StringLiteral(_)
            | Expr::BytesLiteral(_)
            | Expr::NumberLiteral(_)
            | Expr::BooleanLiteral(_)
            | Expr::NoneLiteral(_)
            | Expr::EllipsisLiteral(_)
    )
}
