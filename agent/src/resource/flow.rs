//! Where the value stored by an insert was created, by a short data-flow
//! walk over the insert's source (ruff's parser).
//!
//! The runtime names the insert line exactly (the watchpoint on the
//! container's length); the objects it stores were usually made a few
//! lines or one call earlier: `resp = render(rid)` then `cache[rid] =
//! resp`, with `render` returning a dict literal. From the insert statement
//! (`X[k] = V`, `X.append(V)`, `X.add(V)`, `X.insert(i, V)`,
//! `X.setdefault(k, V)`, `X.appendleft(V)`) the walk follows `V`: a name to
//! its last assignment before the insert in the same function (or, bound
//! by `except T as name`, to the `raise T(...)` the `try` body reaches), a
//! call of a function of the same file into its `return`, up to three
//! calls deep,
//! and stops at the expression that makes a new object — a literal or
//! comprehension, a `lambda`, a class instantiation, a call into other
//! code. The caller checks the answer against the runtime type of the
//! newest entries ([`Creation::consistent_with`]).

use pymedic_repair::text::child_suites;
use ruff_python_ast::{Expr, ModModule, Stmt};
use ruff_text_size::Ranged;

/// What kind of object an expression creates.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Made {
    Dict,
    List,
    Set,
    Tuple,
    Str,
    Function,
    /// An instance of a class of this file.
    Instance(String),
    /// Whatever a call into other code returns.
    Call,
}

/// The creation of an inserted value.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Creation {
    pub line: u32,
    /// The function it is in (`Class.method` for methods).
    pub function: String,
    pub made: Made,
    /// The steps from the insert, e.g. `response <- render() <- body <- {...}`.
    pub path: String,
}

impl Creation {
    /// Whether the runtime type name of the newest entries agrees.
    pub fn consistent_with(&self, type_name: &str) -> bool {
        match &self.made {
            Made::Dict => type_name == "dict" || type_name.ends_with("Dict"),
            Made::List => type_name == "list",
            Made::Set => type_name == "set" || type_name == "frozenset",
            Made::Tuple => type_name == "tuple",
            Made::Str => type_name == "str" || type_name == "bytes",
            Made::Function => type_name == "function",
            Made::Instance(c) => type_name == c || type_name.ends_with(&format!(".{c}")),
            Made::Call => true,
        }
    }
}

struct Src<'a> {
    text: &'a str,
    line_starts: Vec<usize>,
}

impl Src<'_> {
    fn line(&self, node: &impl Ranged) -> u32 {
        let off = usize::from(node.range().start());
        self.line_starts.partition_point(|&s| s <= off) as u32
    }
    fn last_line(&self, node: &impl Ranged) -> u32 {
        let off = usize::from(node.range().end()).saturating_sub(1);
        self.line_starts.partition_point(|&s| s <= off) as u32
    }
    fn text(&self, node: &impl Ranged) -> String {
        let t = &self.text[node.range()];
        let one: String = t.split_whitespace().collect::<Vec<_>>().join(" ");
        if one.chars().count() > 40 {
            one.chars().take(37).collect::<String>() + "..."
        } else {
            one
        }
    }
}

/// A function of the file: qualified name, class (for methods) and body.
struct Func<'a> {
    qualname: String,
    class: Option<String>,
    name: String,
    first: u32,
    last: u32,
    body: &'a [Stmt],
}

fn collect<'a>(
    src: &Src<'_>,
    body: &'a [Stmt],
    prefix: &str,
    class: Option<&str>,
    out: &mut Vec<Func<'a>>,
    classes: &mut Vec<String>,
) {
    for s in body {
        match s {
            Stmt::FunctionDef(f) => {
                let q = format!("{prefix}{}", f.name.as_str());
                out.push(Func {
                    qualname: q.clone(),
                    class: class.map(str::to_string),
                    name: f.name.to_string(),
                    first: src.line(s),
                    last: src.last_line(s),
                    body: &f.body,
                });
                collect(src, &f.body, &format!("{q}.<locals>."), None, out, classes);
            }
            Stmt::ClassDef(c) => {
                classes.push(c.name.to_string());
                let q = format!("{prefix}{}.", c.name.as_str());
                collect(src, &c.body, &q, Some(c.name.as_str()), out, classes);
            }
            _ => {
                for b in child_suites(s) {
                    collect(src, b, prefix, class, out, classes);
                }
            }
        }
    }
}

/// Every statement of a scope, nested blocks included, in source order.
fn statements<'a>(body: &'a [Stmt], out: &mut Vec<&'a Stmt>) {
    for s in body {
        out.push(s);
        for b in child_suites(s) {
            statements(b, out);
        }
    }
}

/// The value an insert statement stores.
fn inserted(s: &Stmt) -> Option<&Expr> {
    match s {
        Stmt::Assign(a) if a.targets.iter().any(|t| matches!(t, Expr::Subscript(_))) => {
            Some(&a.value)
        }
        Stmt::Expr(e) => match &*e.value {
            Expr::Call(c) => {
                let Expr::Attribute(attr) = &*c.func else {
                    return None;
                };
                let args = &c.arguments.args;
                match attr.attr.as_str() {
                    "append" | "add" | "appendleft" | "put" | "put_nowait" => args.first(),
                    "insert" | "setdefault" => args.get(1),
                    _ => None,
                }
            }
            _ => None,
        },
        _ => None,
    }
}

struct Walk<'a, 'b> {
    src: &'b Src<'a>,
    funcs: &'b [Func<'a>],
    classes: &'b [String],
    path: Vec<String>,
}

impl Walk<'_, '_> {
    fn made_here(&mut self, e: &Expr, func: &Func<'_>, made: Made) -> Option<Creation> {
        self.path.push(self.src.text(e));
        Some(Creation {
            line: self.src.line(e),
            function: func.qualname.clone(),
            made,
            path: self.path.join(" <- "),
        })
    }

    /// Follows `e` (used at `line` in `func`) to the expression that
    /// creates its value.
    fn resolve(&mut self, e: &Expr, func: &Func<'_>, line: u32, depth: u32) -> Option<Creation> {
        match e {
            Expr::Dict(_) | Expr::DictComp(_) => self.made_here(e, func, Made::Dict),
            Expr::List(_) | Expr::ListComp(_) => self.made_here(e, func, Made::List),
            Expr::Set(_) | Expr::SetComp(_) => self.made_here(e, func, Made::Set),
            Expr::Tuple(_) => self.made_here(e, func, Made::Tuple),
            Expr::FString(_) | Expr::BinOp(_) => self.made_here(e, func, Made::Str),
            Expr::Lambda(_) => self.made_here(e, func, Made::Function),
            Expr::Name(n) => {
                let name = n.id.as_str();
                let mut stmts = Vec::new();
                statements(func.body, &mut stmts);
                let assign = stmts
                    .into_iter()
                    .filter(|s| self.src.line(*s) < line)
                    .filter_map(|s| match s {
                        Stmt::Assign(a)
                            if a.targets.iter().any(|t| matches!(t, Expr::Name(t) if t.id.as_str() == name)) =>
                        {
                            Some((self.src.line(s), &*a.value))
                        }
                        Stmt::AnnAssign(a) if matches!(&*a.target, Expr::Name(t) if t.id.as_str() == name) => {
                            a.value.as_deref().map(|v| (self.src.line(s), v))
                        }
                        _ => None,
                    })
                    .last();
                let Some(assign) = assign else {
                    return self.caught(name, func, line, depth);
                };
                self.path.push(name.to_string());
                self.resolve(assign.1, func, assign.0, depth)
            }
            Expr::Call(c) => {
                let callee = match &*c.func {
                    Expr::Name(n) => Some((n.id.to_string(), None)),
                    Expr::Attribute(a) => match &*a.value {
                        Expr::Name(obj)
                            if obj.id.as_str() == "self" || obj.id.as_str() == "cls" =>
                        {
                            Some((a.attr.to_string(), func.class.clone()))
                        }
                        _ => None,
                    },
                    _ => None,
                };
                if let Some((name, _)) = &callee
                    && self.classes.iter().any(|c| c == name)
                {
                    return self.made_here(e, func, Made::Instance(name.clone()));
                }
                let target = callee.and_then(|(name, class)| {
                    self.funcs
                        .iter()
                        .find(|f| f.name == name && (class.is_none() || f.class == class))
                });
                if let Some(f) = target
                    && depth < 3
                {
                    let mut stmts = Vec::new();
                    statements(f.body, &mut stmts);
                    let ret = stmts.into_iter().rev().find_map(|s| match s {
                        Stmt::Return(r) => r.value.as_deref().map(|v| (self.src.line(s), v)),
                        _ => None,
                    });
                    if let Some((l, v)) = ret {
                        let mark = self.path.len();
                        self.path.push(format!("{}()", f.name));
                        if let Some(found) = self.resolve(v, f, l + 1, depth + 1) {
                            return Some(found);
                        }
                        self.path.truncate(mark);
                    }
                }
                self.made_here(e, func, Made::Call)
            }
            _ => None,
        }
    }
}

impl Walk<'_, '_> {
    /// `name` bound by an `except T as name:` around `line`: the `raise`
    /// of a `T` in the `try` body, or in a function of this file it calls
    /// (up to three calls deep).
    fn caught(&mut self, name: &str, func: &Func<'_>, line: u32, depth: u32) -> Option<Creation> {
        let mut stmts = Vec::new();
        statements(func.body, &mut stmts);
        let (try_body, ty) = stmts.into_iter().find_map(|s| {
            let Stmt::Try(t) = s else { return None };
            t.handlers.iter().find_map(|h| {
                let ruff_python_ast::ExceptHandler::ExceptHandler(h) = h;
                let bound = h.name.as_ref().is_some_and(|n| n.as_str() == name);
                let around = h.body.first().is_some_and(|b| self.src.line(b) <= line)
                    && h.body
                        .last()
                        .is_some_and(|b| line <= self.src.last_line(b) + 1);
                (bound && around).then(|| {
                    let ty = match h.type_.as_deref() {
                        Some(Expr::Name(n)) => Some(n.id.to_string()),
                        Some(Expr::Attribute(a)) => Some(a.attr.to_string()),
                        _ => None,
                    };
                    (&t.body[..], ty)
                })
            })
        })?;
        self.path.push(format!("{name} (caught)"));
        self.raised(try_body, func, ty.as_deref(), depth)
    }

    /// The first `raise T(...)` (any class when `ty` is `None`) in `body`
    /// or in the functions of this file it calls.
    fn raised(
        &mut self,
        body: &[Stmt],
        func: &Func<'_>,
        ty: Option<&str>,
        depth: u32,
    ) -> Option<Creation> {
        let mut stmts = Vec::new();
        statements(body, &mut stmts);
        for s in &stmts {
            if let Stmt::Raise(r) = s
                && let Some(Expr::Call(c)) = r.exc.as_deref()
                && let Expr::Name(n) = &*c.func
                && ty.is_none_or(|t| t == n.id.as_str())
            {
                let made = Made::Instance(n.id.to_string());
                return self.made_here(r.exc.as_deref().expect("matched"), func, made);
            }
        }
        if depth >= 3 {
            return None;
        }
        for s in &stmts {
            let mut calls = Vec::new();
            calls_in(s, &mut calls);
            for callee in calls {
                let Some(f) = self.funcs.iter().find(|f| f.name == callee) else {
                    continue;
                };
                let mark = self.path.len();
                self.path.push(format!("{}()", f.name));
                if let Some(found) = self.raised(f.body, f, ty, depth + 1) {
                    return Some(found);
                }
                self.path.truncate(mark);
            }
        }
        None
    }
}

/// Names of the plain functions a simple statement calls (`f(...)`).
fn calls_in(s: &Stmt, out: &mut Vec<String>) {
    let exprs: Vec<&Expr> = match s {
        Stmt::Expr(e) => vec![&e.value],
        Stmt::Assign(a) => vec![&a.value],
        Stmt::AnnAssign(a) => a.value.as_deref().into_iter().collect(),
        Stmt::AugAssign(a) => vec![&a.value],
        Stmt::Return(r) => r.value.as_deref().into_iter().collect(),
        _ => Vec::new(),
    };
    for e in exprs {
        if let Expr::Call(c) = e
            && let Expr::Name(n) = &*c.func
        {
            out.push(n.id.to_string());
        }
    }
}

/// Where the value inserted at `insert_line` of `source` was created, if
/// the walk can tell. `qualified`: name methods `Class.method` (3.11+
/// code objects do) rather than `method`.
pub fn creation(source: &str, insert_line: u32, qualified: bool) -> Option<Creation> {
    let module: ModModule = ruff_python_parser::parse_module(source).ok()?.into_syntax();
    let mut line_starts = vec![0];
    line_starts.extend(source.match_indices('\n').map(|(i, _)| i + 1));
    let src = Src {
        text: source,
        line_starts,
    };
    let mut funcs = Vec::new();
    let mut classes = Vec::new();
    collect(&src, &module.body, "", None, &mut funcs, &mut classes);
    // The innermost function around the insert.
    let func = funcs
        .iter()
        .filter(|f| f.first <= insert_line && insert_line <= f.last)
        .max_by_key(|f| f.first)?;
    let mut stmts = Vec::new();
    statements(func.body, &mut stmts);
    let stmt = stmts.into_iter().find(|s| {
        src.line(*s) <= insert_line && insert_line <= src.last_line(*s) && inserted(s).is_some()
    })?;
    let value = inserted(stmt)?;
    let mut w = Walk {
        src: &src,
        funcs: &funcs,
        classes: &classes,
        path: Vec::new(),
    };
    let mut found = w.resolve(value, func, insert_line + 1, 0)?;
    if !qualified {
        found.function = found
            .function
            .rsplit('.')
            .next()
            .unwrap_or(&found.function)
            .to_string();
    }
    Some(found)
}

/// The text of `co_filename` as process `pid` sees it (through
/// `/proc/PID/root`, relative names through `/proc/PID/cwd`); `None` for
/// `<string>`, missing or huge files.
pub fn read_source(pid: u32, filename: &str) -> Option<String> {
    if filename.starts_with('<') || filename.is_empty() {
        return None;
    }
    let path = if filename.starts_with('/') {
        format!("/proc/{pid}/root{filename}")
    } else {
        format!("/proc/{pid}/cwd/{filename}")
    };
    if std::fs::metadata(&path).ok()?.len() > 8 << 20 {
        return None;
    }
    std::fs::read_to_string(path).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    const SRC: &str = r#"
import json

_cache = {}
seen = []

class Event:
    def __init__(self, who):
        self.who = who

def render(rid):
    body = {"id": rid, "items": [1, 2, 3]}
    return body

def handle(rid):
    response = render(rid)
    _cache[rid] = response
    return json.dumps(response)

class Session:
    history = []

    def make(self, who):
        return Event(who)

    def record(self, who):
        event = self.make(who)
        self.history.append(event)

def register(msg):
    payload = msg * 50
    seen.append(lambda: len(payload))

def parse(text):
    seen.append(json.loads(text))

def alias(x):
    seen.append(x)

def load(path):
    text = open(path).read()
    if not text:
        raise ValueError(path + " is empty")
    return text

def serve(path):
    try:
        load(path)
    except ValueError as e:
        seen.append(e)
"#;

    fn line(marker: &str) -> u32 {
        SRC.lines().position(|l| l.contains(marker)).unwrap() as u32 + 1
    }

    #[test]
    fn follows_a_name_into_a_callee_to_its_literal() {
        let c = creation(SRC, line("_cache[rid] = response"), true).unwrap();
        assert_eq!(c.line, line("body = {"));
        assert_eq!(c.function, "render");
        assert_eq!(c.made, Made::Dict);
        assert!(
            c.path.starts_with("response <- render() <- body <- {"),
            "{}",
            c.path
        );
        assert!(c.consistent_with("dict") && !c.consistent_with("list"));
    }

    #[test]
    fn methods_constructors_lambdas_and_calls() {
        let c = creation(SRC, line("self.history.append(event)"), true).unwrap();
        assert_eq!(
            (c.line, c.made.clone()),
            (line("return Event(who)"), Made::Instance("Event".into()))
        );
        assert_eq!(c.function, "Session.make");
        assert!(c.consistent_with("Event"));
        let c = creation(SRC, line("self.history.append(event)"), false).unwrap();
        assert_eq!(c.function, "make");
        let l = creation(SRC, line("seen.append(lambda"), true).unwrap();
        assert_eq!(
            (l.line, l.made),
            (line("seen.append(lambda"), Made::Function)
        );
        let j = creation(SRC, line("seen.append(json.loads"), true).unwrap();
        assert_eq!(j.made, Made::Call);
        // A parameter is not created here: unknown.
        assert!(creation(SRC, line("seen.append(x)"), true).is_none());
        // Not an insert.
        assert!(creation(SRC, line("return json.dumps"), true).is_none());
    }

    #[test]
    fn a_caught_exception_was_made_by_its_raise() {
        let c = creation(SRC, line("seen.append(e)"), true).unwrap();
        assert_eq!(c.line, line("raise ValueError"));
        assert_eq!(c.function, "load");
        assert!(c.consistent_with("ValueError"), "{c:?}");
        assert!(
            c.path.starts_with("e (caught) <- load() <- ValueError("),
            "{}",
            c.path
        );
    }
}
