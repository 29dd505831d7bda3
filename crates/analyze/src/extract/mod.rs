//! One file → [`FileFacts`]: imports, module scope, classes, and per
//! function the lock acquisitions (with what is held), calls, container
//! operations and resource leaks.

use ruff_python_ast::visitor::Visitor;
use ruff_python_ast::{self as ast, Expr, Stmt};
use ruff_text_size::Ranged;

use crate::detach::Detach;
use crate::facts::*;
use crate::leaks::{self, Consumed};

mod env;
mod walker;

use crate::source::{self, LineCursor, SourceFile};
pub(crate) use env::Env;
use env::*;
use walker::FnWalker;

/// Methods that add to a container.
pub(super) fn adds_to_container(name: &str) -> bool {
    matches!(
        name,
        "append"
            | "extend"
            | "add"
            | "update"
            | "insert"
            | "setdefault"
            | "appendleft"
            | "extendleft"
    )
}
/// Methods that remove from (or reset) a container.
pub(super) fn removes_from_container(name: &str) -> bool {
    matches!(
        name,
        "pop"
            | "popitem"
            | "remove"
            | "discard"
            | "clear"
            | "popleft"
            | "difference_update"
            | "intersection_update"
    )
}

/// Parses `text` (the contents of `file`) and extracts its facts. Syntax
/// errors are recorded and the recovered tree is still analysed.
pub fn extract(file: &SourceFile, text: &str) -> FileFacts {
    crate::arena::parse_python(text, |parsed| {
        let mut facts = extract_parsed(file, text, parsed);
        facts.detach(&|n: &Name| crate::arena::contains(n.as_str().as_ptr()));
        facts
    })
}

/// [`extract`] from the parsed tree.
fn extract_parsed(
    file: &SourceFile,
    text: &str,
    parsed: &ruff_python_parser::Parsed<ast::ModModule>,
) -> FileFacts {
    let lines = LineCursor::new(text);
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
        lines: source::count_lines(text),
        syntax_errors,
        imports: Vec::new(),
        scope: ModuleScope::default(),
        classes: Vec::new(),
        functions: Vec::new(),
        container_ops: Vec::new(),
        leaks: Vec::new(),
    };
    // Sized up front: growing these one push at a time moved every
    // function's facts again at each doubling.
    let defs = memchr::memmem::find_iter(text.as_bytes(), b"def ").count();
    facts.functions.reserve(defs);
    let mut cx = FileCx {
        lines: &lines,
        facts: &mut facts,
        calls: Vec::new(),
        spare_vars: Vec::new(),
    };
    cx.module_body(&parsed.syntax().body, false);
    facts
}

pub(super) struct FileCx<'f> {
    pub(super) lines: &'f LineCursor<'f>,
    pub(super) facts: &'f mut FileFacts,
    /// Call sites of the functions being walked, innermost last: a nested
    /// function's calls are pushed after its parent's so far and split off
    /// when it ends, so each function's list is allocated once, at its size.
    pub(super) calls: Vec<CallFact>,
    /// Emptied local tables of the functions walked so far, reused by the
    /// next ones (one table per nesting level is live at a time).
    pub(super) spare_vars: Vec<VarTable>,
}

impl FileCx<'_> {
    pub(super) fn line(&self, node: &impl Ranged) -> u32 {
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

    pub(super) fn import(&mut self, stmt: &Stmt, deferred: bool, bind: bool) {
        let line = self.line(stmt);
        match stmt {
            Stmt::Import(imp) => {
                for alias in &imp.names {
                    let full = alias.name.id.as_str().to_owned();
                    self.facts.imports.push(ImportFact {
                        module: full.clone(),
                        names: Vec::new(),
                        line,
                        deferred,
                    });
                    if bind {
                        let (name, binding) = match &alias.asname {
                            Some(a) => (a.id.clone(), Binding::Module(full)),
                            None => {
                                let top = full.split('.').next().unwrap_or_default().to_owned();
                                (Name::new(&top), Binding::Module(top))
                            }
                        };
                        self.facts.scope.imports.or_insert_with(&name, || binding);
                    }
                }
            }
            Stmt::ImportFrom(imp) => {
                let module = self.absolute(imp.module.as_ref().map(|m| m.id.as_str()), imp.level);
                let names: Vec<String> = imp
                    .names
                    .iter()
                    .map(|a| a.name.id.as_str().to_owned())
                    .collect();
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
                        let local = &alias.asname.as_ref().unwrap_or(&alias.name).id;
                        self.facts
                            .scope
                            .imports
                            .or_insert_with(local, || Binding::From {
                                module: module.clone(),
                                name: alias.name.id.as_str().to_owned(),
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
                    let (idx, _) = self.function(f, None, None, "");
                    self.facts.scope.functions.insert(&f.name.id, idx);
                }
                Stmt::ClassDef(c) => {
                    let idx = self.class(c, "");
                    self.facts.scope.classes.insert(&c.name.id, idx);
                }
                Stmt::Assign(a) => {
                    let value = self.module_value(&a.value);
                    for t in &a.targets {
                        if let Expr::Name(n) = t {
                            let line = self.lines.line(a.start().to_u32());
                            self.facts.scope.globals.or_insert_with(&n.id, || Global {
                                value: value.clone(),
                                line,
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
                            .or_insert_with(&n.id, || Global { value, line });
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
        let qualname = [prefix, c.name.id.as_str()].concat();
        let method_prefix = [qualname.as_str(), "."].concat();
        let idx = self.facts.classes.len();
        let bases = c
            .arguments
            .as_ref()
            .map(|a| a.args.iter().filter_map(plain_path).collect())
            .unwrap_or_default();
        self.facts.classes.push(ClassFacts {
            name: c.name.id.as_str().to_owned(),
            qualname: qualname.clone(),
            line: self.line(c),
            bases,
            methods: NameMap::new(),
            attrs: NameMap::new(),
        });
        for stmt in &c.body {
            match stmt {
                Stmt::FunctionDef(f) => {
                    let (fidx, _) = self.function(f, Some(idx), None, &method_prefix);
                    self.facts.classes[idx].methods.insert(&f.name.id, fidx);
                }
                Stmt::Assign(a) => {
                    let value = self.module_value(&a.value);
                    let line = self.line(a);
                    for t in &a.targets {
                        if let Expr::Name(n) = t {
                            self.facts.classes[idx]
                                .attrs
                                .or_insert_with(&n.id, || Attr {
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
                            .or_insert_with(&n.id, || Attr {
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

    pub(super) fn function(
        &mut self,
        f: &ast::StmtFunctionDef,
        class: Option<usize>,
        parent: Option<(usize, &Env)>,
        prefix: &str,
    ) -> (usize, Consumed) {
        let idx = self.facts.functions.len();
        let qualname = [prefix, f.name.id.as_str()].concat();
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
        let unbounded_cache = f
            .decorator_list
            .iter()
            .find_map(|d| unbounded_cache_decorator(&d.expression).then(|| self.line(d)));
        self.facts.functions.push(FunctionFacts {
            name: f.name.id.clone(),
            qualname: qualname.clone(),
            class,
            parent: parent.map(|(p, _)| p),
            is_async: f.is_async,
            line: self.line(f),
            end_line: 0, // below, once the walk has reached the end
            params: params.iter().map(|p| p.name.id.clone()).collect(),
            consumes: Vec::new(),
            returns: f.returns.as_deref().and_then(annotation_path).map(Box::new),
            decorators,
            local_defs: NameMap::new(),
            acquires: Vec::new(),
            calls: Vec::new(),
            unbounded_cache,
        });

        // Locals: parameters, then assignments in source order.
        let mut env = Env {
            vars: self.spare_vars.pop().unwrap_or_default(),
            outer: parent.map(|(_, e)| e),
            ..Env::default()
        };
        let self_name = if class.is_some() && !is_static {
            params.first().map(|p| p.name.id.clone())
        } else {
            None
        };
        env.self_name = self_name.clone();
        for p in &params {
            let name = p.name.id.clone();
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

        let calls_from = self.calls.len();
        let mut walker = FnWalker {
            cx: self,
            idx,
            env: &env,
            held: Vec::new(),
            in_init: class.is_some() && f.name.id.as_str() == "__init__",
            class,
            qualname: qualname.clone(),
            consumed: Consumed::default(),
            may_acquire: false,
        };
        for stmt in &f.body {
            walker.visit_stmt(stmt);
        }
        let (consumed, may_acquire) = (walker.consumed, walker.may_acquire);
        // The line cursor is near the end now: asking before the walk
        // moved it there and back (a third of the newline counting).
        self.facts.functions[idx].end_line = self.lines.line(f.end().to_u32().saturating_sub(1));
        let calls = self.calls.split_off(calls_from);
        self.facts.functions[idx].calls = calls;

        let names: Vec<&str> = params.iter().map(|p| p.name.id.as_str()).collect();
        self.facts.functions[idx].consumes = consumed.of(&names);
        if may_acquire {
            let qualify = |e: &Expr| self.qualify(e, &env);
            let path = |e: &Expr| env.path(e);
            let found = leaks::find(&f.body, idx, self.lines, &qualify, &path);
            self.facts.leaks.extend(found);
        }
        let mut vars = env.vars;
        vars.clear();
        self.spare_vars.push(vars);
        (idx, consumed)
    }

    /// Qualified name of a callee in this file: imports expanded
    /// (`sp.Popen` → `subprocess.Popen`), builtins as their bare name.
    pub(crate) fn qualify(&self, e: &Expr, env: &Env) -> Option<String> {
        let p = plain_path(e)?;
        let Root::Name(n) = &p.root else { return None };
        if env.lookup(n).is_some() {
            return None;
        }
        let mut s = match self.facts.scope.imports.get(n.as_str()) {
            Some(Binding::Module(m)) => m.clone(),
            Some(Binding::From { module, name }) => format!("{module}.{name}"),
            None => n.to_string(),
        };
        for a in &p.attrs {
            s.push('.');
            s.push_str(a);
        }
        Some(s)
    }
}
