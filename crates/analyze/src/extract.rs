//! One file → [`FileFacts`]: imports, module scope, classes, and per
//! function the lock acquisitions (with what is held), calls, container
//! operations and resource leaks.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use ruff_python_ast::visitor::{self, Visitor};
use ruff_python_ast::{self as ast, Expr, Stmt};
use ruff_text_size::Ranged;

use crate::facts::*;
use crate::leaks;
use crate::source::{LineIndex, SourceFile};

/// Methods that add to a container.
const ADD_METHODS: &[&str] = &[
    "append",
    "extend",
    "add",
    "update",
    "insert",
    "setdefault",
    "appendleft",
    "extendleft",
];
/// Methods that remove from (or reset) a container.
const REMOVE_METHODS: &[&str] = &[
    "pop",
    "popitem",
    "remove",
    "discard",
    "clear",
    "popleft",
    "difference_update",
    "intersection_update",
];

/// Parses `text` (the contents of `file`) and extracts its facts. Syntax
/// errors are recorded and the recovered tree is still analysed.
pub fn extract(file: &SourceFile, text: &str) -> FileFacts {
    let parsed =
        ruff_python_parser::parse_unchecked_source(text, ast::PySourceType::Python);
    let lines = LineIndex::new(text);
    let syntax_errors = parsed
        .errors()
        .iter()
        .take(20)
        .map(|e| SyntaxErrorFact {
            line: lines.line(e.location.start().to_u32()),
            message: e.error.to_string(),
        })
        .collect();
    let mut facts = FileFacts {
        rel: file.rel.clone(),
        module: file.module.clone(),
        is_package: file.is_package,
        lines: lines.count(text),
        syntax_errors,
        imports: Vec::new(),
        scope: ModuleScope::default(),
        classes: Vec::new(),
        functions: Vec::new(),
        container_ops: Vec::new(),
        leaks: Vec::new(),
    };
    let mut cx = FileCx {
        lines: &lines,
        facts: &mut facts,
    };
    cx.module_body(&parsed.syntax().body, false);
    facts
}

struct FileCx<'f> {
    lines: &'f LineIndex,
    facts: &'f mut FileFacts,
}

impl FileCx<'_> {
    fn line(&self, node: &impl Ranged) -> u32 {
        self.lines.line(node.start().to_u32())
    }

    /// The package relative imports start from.
    fn package(&self) -> String {
        if self.facts.is_package {
            self.facts.module.clone()
        } else {
            match self.facts.module.rsplit_once('.') {
                Some((p, _)) => p.to_owned(),
                None => String::new(),
            }
        }
    }

    fn absolute(&self, module: Option<&str>, level: u32) -> String {
        if level == 0 {
            return module.unwrap_or_default().to_owned();
        }
        let mut base: Vec<&str> = Vec::new();
        let pkg = self.package();
        if !pkg.is_empty() {
            base = pkg.split('.').collect();
        }
        for _ in 1..level {
            base.pop();
        }
        let mut s = base.join(".");
        if let Some(m) = module {
            if !s.is_empty() {
                s.push('.');
            }
            s.push_str(m);
        }
        s
    }

    fn import(&mut self, stmt: &Stmt, deferred: bool, bind: bool) {
        let line = self.line(stmt);
        match stmt {
            Stmt::Import(imp) => {
                for alias in &imp.names {
                    let full = alias.name.id.to_string();
                    self.facts.imports.push(ImportFact {
                        module: full.clone(),
                        names: Vec::new(),
                        line,
                        deferred,
                    });
                    if bind {
                        let (name, binding) = match &alias.asname {
                            Some(a) => (a.id.to_string(), Binding::Module(full)),
                            None => {
                                let top = full.split('.').next().unwrap_or_default().to_owned();
                                (top.clone(), Binding::Module(top))
                            }
                        };
                        self.facts.scope.imports.entry(name).or_insert(binding);
                    }
                }
            }
            Stmt::ImportFrom(imp) => {
                let module = self.absolute(imp.module.as_ref().map(|m| m.id.as_str()), imp.level);
                let names: Vec<String> = imp.names.iter().map(|a| a.name.id.to_string()).collect();
                self.facts.imports.push(ImportFact {
                    module: module.clone(),
                    names,
                    line,
                    deferred,
                });
                if bind {
                    for alias in &imp.names {
                        if alias.name.id.as_str() == "*" {
                            continue;
                        }
                        let local = alias.asname.as_ref().unwrap_or(&alias.name).id.to_string();
                        self.facts.scope.imports.entry(local).or_insert(Binding::From {
                            module: module.clone(),
                            name: alias.name.id.to_string(),
                        });
                    }
                }
            }
            _ => {}
        }
    }

    fn module_body(&mut self, body: &[Stmt], deferred: bool) {
        for stmt in body {
            match stmt {
                Stmt::Import(_) | Stmt::ImportFrom(_) => self.import(stmt, deferred, true),
                Stmt::FunctionDef(f) => {
                    let idx = self.function(f, None, None, "");
                    self.facts
                        .scope
                        .functions
                        .insert(f.name.id.to_string(), idx);
                }
                Stmt::ClassDef(c) => {
                    let idx = self.class(c, "");
                    self.facts.scope.classes.insert(c.name.id.to_string(), idx);
                }
                Stmt::Assign(a) => {
                    let value = self.module_value(&a.value);
                    for t in &a.targets {
                        if let Expr::Name(n) = t {
                            self.facts
                                .scope
                                .globals
                                .entry(n.id.to_string())
                                .or_insert(Global {
                                    value: value.clone(),
                                    line: self.lines.line(a.start().to_u32()),
                                });
                        }
                    }
                }
                Stmt::AnnAssign(a) => {
                    if let (Expr::Name(n), Some(v)) = (&*a.target, &a.value) {
                        let value = self.module_value(v);
                        let line = self.line(a);
                        self.facts
                            .scope
                            .globals
                            .entry(n.id.to_string())
                            .or_insert(Global { value, line });
                    }
                }
                Stmt::If(i) => {
                    let type_checking = matches!(&*i.test, Expr::Name(n) if n.id.as_str() == "TYPE_CHECKING")
                        || matches!(&*i.test, Expr::Attribute(a) if a.attr.id.as_str() == "TYPE_CHECKING");
                    self.module_body(&i.body, deferred || type_checking);
                    for clause in &i.elif_else_clauses {
                        self.module_body(&clause.body, deferred);
                    }
                }
                Stmt::Try(t) => {
                    self.module_body(&t.body, deferred);
                    for h in &t.handlers {
                        let ast::ExceptHandler::ExceptHandler(h) = h;
                        self.module_body(&h.body, deferred);
                    }
                    self.module_body(&t.orelse, deferred);
                    self.module_body(&t.finalbody, deferred);
                }
                Stmt::With(w) => self.module_body(&w.body, deferred),
                Stmt::For(f) => self.module_body(&f.body, deferred),
                Stmt::While(w) => self.module_body(&w.body, deferred),
                _ => {}
            }
        }
    }

    /// A module- or class-level value (no function locals to substitute).
    fn module_value(&self, e: &Expr) -> Value {
        value_of(e, &|e| plain_path(e))
    }

    fn class(&mut self, c: &ast::StmtClassDef, prefix: &str) -> usize {
        let qualname = format!("{prefix}{}", c.name.id);
        let idx = self.facts.classes.len();
        let bases = c
            .arguments
            .as_ref()
            .map(|a| a.args.iter().filter_map(plain_path).collect())
            .unwrap_or_default();
        self.facts.classes.push(ClassFacts {
            name: c.name.id.to_string(),
            qualname: qualname.clone(),
            line: self.line(c),
            bases,
            methods: BTreeMap::new(),
            attrs: BTreeMap::new(),
        });
        for stmt in &c.body {
            match stmt {
                Stmt::FunctionDef(f) => {
                    let fidx = self.function(f, Some(idx), None, &format!("{qualname}."));
                    self.facts.classes[idx]
                        .methods
                        .insert(f.name.id.to_string(), fidx);
                }
                Stmt::Assign(a) => {
                    let value = self.module_value(&a.value);
                    let line = self.line(a);
                    for t in &a.targets {
                        if let Expr::Name(n) = t {
                            self.facts.classes[idx]
                                .attrs
                                .entry(n.id.to_string())
                                .or_insert(Attr {
                                    value: value.clone(),
                                    line,
                                    class_level: true,
                                    in_function: None,
                                });
                        }
                    }
                }
                Stmt::AnnAssign(a) => {
                    if let (Expr::Name(n), Some(v)) = (&*a.target, &a.value) {
                        let value = self.module_value(v);
                        let line = self.line(a);
                        self.facts.classes[idx]
                            .attrs
                            .entry(n.id.to_string())
                            .or_insert(Attr {
                                value,
                                line,
                                class_level: true,
                                in_function: None,
                            });
                    }
                }
                _ => {}
            }
        }
        idx
    }

    fn function(
        &mut self,
        f: &ast::StmtFunctionDef,
        class: Option<usize>,
        parent: Option<(usize, &Env)>,
        prefix: &str,
    ) -> usize {
        let idx = self.facts.functions.len();
        let qualname = format!("{prefix}{}", f.name.id);
        let decorators: Vec<PathRef> = f
            .decorator_list
            .iter()
            .filter_map(|d| match &d.expression {
                Expr::Call(c) => plain_path(&c.func),
                e => plain_path(e),
            })
            .collect();
        let is_static = decorators.iter().any(|d| d.last() == "staticmethod");
        let params: Vec<&ast::Parameter> = f
            .parameters
            .posonlyargs
            .iter()
            .chain(&f.parameters.args)
            .map(|p| &p.parameter)
            .chain(f.parameters.vararg.as_deref())
            .chain(f.parameters.kwonlyargs.iter().map(|p| &p.parameter))
            .chain(f.parameters.kwarg.as_deref())
            .collect();
        let unbounded_cache = f.decorator_list.iter().find_map(|d| {
            unbounded_cache_decorator(&d.expression).then(|| self.line(d))
        });
        self.facts.functions.push(FunctionFacts {
            name: f.name.id.to_string(),
            qualname: qualname.clone(),
            class,
            parent: parent.map(|(p, _)| p),
            is_async: f.is_async,
            line: self.line(f),
            end_line: self.lines.line(f.end().to_u32().saturating_sub(1)),
            params: params.iter().map(|p| p.name.id.to_string()).collect(),
            consumes: Vec::new(),
            returns: f.returns.as_deref().and_then(annotation_path),
            decorators,
            local_defs: BTreeMap::new(),
            acquires: Vec::new(),
            calls: Vec::new(),
            unbounded_cache,
        });

        // Locals: parameters, then assignments in source order.
        let mut env = Env {
            outer: parent.map(|(_, e)| e),
            ..Env::default()
        };
        let self_name = if class.is_some() && !is_static {
            params.first().map(|p| p.name.id.to_string())
        } else {
            None
        };
        env.self_name = self_name.clone();
        for p in &params {
            let name = p.name.id.to_string();
            if Some(&name) == self_name.as_ref() {
                continue;
            }
            let v = p
                .annotation
                .as_deref()
                .and_then(annotation_path)
                .map(|t| PathRef {
                    root: Root::Instance(Box::new(t)),
                    attrs: Vec::new(),
                });
            env.vars.insert(name, v);
        }
        collect_locals(&f.body, &mut env);

        let mut walker = FnWalker {
            cx: self,
            idx,
            env: &env,
            held: Vec::new(),
            in_init: class.is_some() && f.name.id.as_str() == "__init__",
            class,
            qualname: qualname.clone(),
        };
        for stmt in &f.body {
            walker.visit_stmt(stmt);
        }

        let consumes = params
            .iter()
            .map(|p| leaks::consumes(&f.body, p.name.id.as_str()))
            .collect();
        self.facts.functions[idx].consumes = consumes;
        let qualify = |e: &Expr| self.qualify(e, &env);
        let path = |e: &Expr| env.path(e);
        let found = leaks::find(&f.body, idx, self.lines, &qualify, &path);
        self.facts.leaks.extend(found);
        idx
    }

    /// Qualified name of a callee in this file: imports expanded
    /// (`sp.Popen` → `subprocess.Popen`), builtins as their bare name.
    pub(crate) fn qualify(&self, e: &Expr, env: &Env) -> Option<String> {
        let p = plain_path(e)?;
        let Root::Name(n) = &p.root else { return None };
        if env.lookup(n).is_some() {
            return None;
        }
        let mut s = match self.facts.scope.imports.get(n) {
            Some(Binding::Module(m)) => m.clone(),
            Some(Binding::From { module, name }) => format!("{module}.{name}"),
            None => n.clone(),
        };
        for a in &p.attrs {
            s.push('.');
            s.push_str(a);
        }
        Some(s)
    }
}

/// A function's locals: `Some(path)` when the name is bound to something we
/// can name, `None` for an opaque local. `outer` is the enclosing function's.
#[derive(Default)]
pub(crate) struct Env<'o> {
    vars: HashMap<String, Option<PathRef>>,
    globals: BTreeSet<String>,
    self_name: Option<String>,
    outer: Option<&'o Env<'o>>,
}

impl Env<'_> {
    fn lookup(&self, n: &str) -> Option<&Option<PathRef>> {
        if self.globals.contains(n) {
            return None;
        }
        self.vars
            .get(n)
            .or_else(|| self.outer.and_then(|o| o.lookup(n)))
    }

    fn is_self(&self, n: &str) -> bool {
        self.self_name.as_deref() == Some(n)
            || (!self.vars.contains_key(n) && self.outer.is_some_and(|o| o.is_self(n)))
    }

    /// The reference an expression denotes, locals substituted.
    fn path(&self, e: &Expr) -> Option<PathRef> {
        match e {
            Expr::Name(n) => Some(self.name(n.id.as_str())),
            Expr::Attribute(a) => {
                let mut p = self.path(&a.value)?;
                p.attrs.push(a.attr.id.to_string());
                Some(p)
            }
            Expr::Call(c) => Some(PathRef {
                root: Root::Instance(Box::new(self.path(&c.func)?)),
                attrs: Vec::new(),
            }),
            _ => None,
        }
    }

    fn name(&self, n: &str) -> PathRef {
        if self.is_self(n) {
            return PathRef {
                root: Root::SelfObj,
                attrs: Vec::new(),
            };
        }
        match self.lookup(n) {
            Some(Some(p)) => p.clone(),
            Some(None) => PathRef {
                root: Root::Local(n.to_owned()),
                attrs: Vec::new(),
            },
            None => PathRef::name(n),
        }
    }

    fn bind(&mut self, name: &str, v: Option<PathRef>) {
        if self.globals.contains(name) {
            return;
        }
        match self.vars.get(name) {
            Some(old) if *old != v => {
                self.vars.insert(name.to_owned(), None);
            }
            Some(_) => {}
            None => {
                self.vars.insert(name.to_owned(), v);
            }
        }
    }
}

/// Collects a function's local bindings in source order (not descending
/// into nested functions or classes, whose names are bound opaquely).
fn collect_locals(body: &[Stmt], env: &mut Env) {
    for stmt in body {
        match stmt {
            Stmt::Global(g) => {
                for n in &g.names {
                    env.globals.insert(n.id.to_string());
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
                        env.bind(n.id.as_str(), None);
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
            Stmt::FunctionDef(f) => env.bind(f.name.id.as_str(), None),
            Stmt::ClassDef(c) => env.bind(c.name.id.as_str(), None),
            _ => {}
        }
    }
}

fn bound_value(e: &Expr, env: &Env) -> Option<PathRef> {
    match e {
        Expr::Name(_) | Expr::Attribute(_) | Expr::Call(_) => env.path(e),
        _ => None,
    }
}

fn bind_target(t: &Expr, v: Option<PathRef>, env: &mut Env) {
    match t {
        Expr::Name(n) => env.bind(n.id.as_str(), v),
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
fn annotation_path(e: &Expr) -> Option<PathRef> {
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
            let text = s.value.to_str();
            let ok = !text.is_empty()
                && text
                    .split('.')
                    .all(|p| !p.is_empty() && p.chars().all(|c| c.is_alphanumeric() || c == '_'));
            ok.then(|| {
                let mut parts = text.split('.');
                let mut p = PathRef::name(parts.next().unwrap_or_default());
                p.attrs.extend(parts.map(str::to_owned));
                p
            })
        }
        _ => None,
    }
}

/// What an assignment's right-hand side is.
fn value_of(e: &Expr, path: &dyn Fn(&Expr) -> Option<PathRef>) -> Value {
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
fn unbounded_cache_decorator(e: &Expr) -> bool {
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

fn is_constant(e: &Expr) -> bool {
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

/// Walks one function body (not nested definitions, which get their own).
struct FnWalker<'c, 'f, 'e> {
    cx: &'c mut FileCx<'f>,
    idx: usize,
    env: &'e Env<'e>,
    /// Indices of acquisitions currently held.
    held: Vec<u32>,
    in_init: bool,
    class: Option<usize>,
    qualname: String,
}

impl FnWalker<'_, '_, '_> {
    fn func(&mut self) -> &mut FunctionFacts {
        &mut self.cx.facts.functions[self.idx]
    }

    fn op(&mut self, target: Option<PathRef>, op: OpKind, line: u32) {
        if let Some(target) = target {
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
        let line = self.cx.line(c);
        let callee = self.env.path(&c.func);
        if let Some(callee) = callee.clone() {
            let held = self.held.clone();
            let range = c.range();
            self.func().calls.push(CallFact {
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
        let Some(callee) = callee else { return };
        if let Some(recv) = receiver(&callee) {
            let method = callee.last().to_owned();
            match method.as_str() {
                "acquire" => {
                    self.acquire(recv, line, AcquireVia::Acquire);
                }
                "release" => self.release(&recv),
                m if ADD_METHODS.contains(&m) => {
                    let constant_key = m == "setdefault"
                        && c.arguments.args.first().is_some_and(is_constant);
                    if !constant_key {
                        self.op(Some(recv), OpKind::Add, line);
                    }
                }
                m if REMOVE_METHODS.contains(&m) => self.op(Some(recv), OpKind::Remove, line),
                _ => {}
            }
        }
        let first = c.arguments.args.first().and_then(|a| self.env.path(a));
        match callee.text().as_str() {
            "heapq.heappush" | "bisect.insort" | "bisect.insort_right" | "bisect.insort_left" => {
                self.op(first, OpKind::Add, line)
            }
            "heapq.heappop" | "heapq.heappushpop" | "heapq.heapreplace" => {
                self.op(first, OpKind::Remove, line)
            }
            _ => {}
        }
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
                let Some(obj) = self.env.path(&a.value) else { return };
                if obj.root == Root::SelfObj && obj.attrs.is_empty() {
                    if let (Some(class), Some(v)) = (self.class, value) {
                        let env = self.env;
                        let value = value_of(v, &|e| env.path(e));
                        let attrs = &mut self.cx.facts.classes[class].attrs;
                        attrs.entry(a.attr.id.to_string()).or_insert(Attr {
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
                self.op(Some(obj.with_attr(a.attr.id.as_str())), OpKind::Remove, line);
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
fn receiver(callee: &PathRef) -> Option<PathRef> {
    let mut p = callee.clone();
    p.attrs.pop()?;
    Some(p)
}

impl<'a> Visitor<'a> for FnWalker<'_, '_, '_> {
    fn visit_stmt(&mut self, stmt: &'a Stmt) {
        let line = self.cx.line(stmt);
        match stmt {
            Stmt::FunctionDef(f) => {
                let prefix = format!("{}.<locals>.", self.qualname);
                let env = self.env;
                let child = self
                    .cx
                    .function(f, self.class, Some((self.idx, env)), &prefix);
                self.func().local_defs.insert(f.name.id.to_string(), child);
            }
            Stmt::ClassDef(_) => {}
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
            Stmt::Assign(a) => {
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
                    self.visit_expr(v);
                    self.store(&a.target, Some(v), line);
                }
            }
            Stmt::AugAssign(a) => {
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
            Expr::Lambda(_) => {}
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
