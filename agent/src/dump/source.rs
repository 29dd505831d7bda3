//! The target's Python source, parsed (ruff's parser), to find which locks a
//! frame is holding or acquiring at its current line: the `with` blocks
//! around it (`with a, b:`, nested, multi-line headers) and the
//! `X.acquire()` calls before it in the same function without a matching
//! `X.release()`.
//!
//! Files are read through `/proc/PID/root` (so containers work), relative
//! `co_filename`s through `/proc/PID/cwd`; each is parsed once per
//! [`SourceCache`].

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use ruff_python_ast::visitor::{self, Visitor};
use ruff_python_ast::{Expr, ModModule, Stmt};
use ruff_text_size::Ranged;

/// How a lock is (being) taken at a site.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum How {
    /// `with X:`
    With,
    /// `X.acquire()` (or `X.__enter__()`)
    Acquire,
}

/// A lock expression at a source line.
#[derive(Clone, Debug)]
pub struct Site {
    /// The lock expression (`self._lock`, `locks[i]`).
    pub expr: Expr,
    /// Its source text.
    pub text: String,
    /// Line of the `with` / `acquire` statement (1-based).
    pub line: u32,
    pub how: How,
}

/// A parsed source file.
pub struct SourceFile {
    text: String,
    line_starts: Vec<usize>,
    module: ModModule,
    /// `held_at` answers by line: deep stacks repeat the same lines.
    held: Mutex<HashMap<u32, Arc<Vec<Site>>>>,
}

impl SourceFile {
    /// Parses `text`; `None` when it is not valid Python 3.
    pub fn parse(text: String) -> Option<SourceFile> {
        let module = ruff_python_parser::parse_module(&text).ok()?.into_syntax();
        let mut line_starts = vec![0];
        line_starts.extend(text.match_indices('\n').map(|(i, _)| i + 1));
        Some(SourceFile {
            text,
            line_starts,
            module,
            held: Mutex::new(HashMap::new()),
        })
    }

    fn line_of(&self, offset: usize) -> u32 {
        self.line_starts.partition_point(|&s| s <= offset) as u32
    }

    fn lines(&self, node: &impl Ranged) -> (u32, u32) {
        let r = node.range();
        let end = usize::from(r.end())
            .saturating_sub(1)
            .max(usize::from(r.start()));
        (self.line_of(r.start().into()), self.line_of(end))
    }

    fn text_of(&self, node: &impl Ranged) -> String {
        self.text[node.range()].to_owned()
    }

    /// The statements from the innermost function (or module) body down to
    /// the innermost statement containing `line`, each with the block it
    /// sits in and its index there.
    fn path(&self, line: u32) -> Vec<(&[Stmt], usize)> {
        let mut path: Vec<(&[Stmt], usize)> = Vec::new();
        let mut block: &[Stmt] = &self.module.body;
        let contains = |s: &Stmt| {
            let (a, b) = self.lines(s);
            (a..=b).contains(&line)
        };
        while let Some(i) = block.iter().position(contains) {
            let stmt = &block[i];
            if matches!(stmt, Stmt::FunctionDef(_) | Stmt::ClassDef(_)) {
                // A new scope: what came before belongs to another frame.
                path.clear();
            } else {
                path.push((block, i));
            }
            match child_blocks(stmt)
                .into_iter()
                .find(|child| child.iter().any(contains))
            {
                Some(child) => block = child,
                None => break,
            }
        }
        path
    }

    /// Locks held at `line`: `with` items whose body contains the line, and
    /// `X.acquire()` calls earlier in the same function (in statements
    /// before the path, or in an `if`/`while` test the line is under) not
    /// followed by `X.release()`.
    pub fn held_at(&self, line: u32) -> Arc<Vec<Site>> {
        let mut cache = self.held.lock().unwrap_or_else(|e| e.into_inner());
        cache
            .entry(line)
            .or_insert_with(|| Arc::new(self.compute_held_at(line)))
            .clone()
    }

    fn compute_held_at(&self, line: u32) -> Vec<Site> {
        let mut held: Vec<Site> = Vec::new();
        for (block, i) in self.path(line) {
            for earlier in &block[..i] {
                if is_compound(earlier) {
                    continue;
                }
                for (call, expr) in lock_calls(earlier) {
                    self.apply(&mut held, call, expr, earlier);
                }
            }
            let stmt = &block[i];
            match stmt {
                Stmt::With(w) => {
                    let body_start = w.body.first().map_or(u32::MAX, |s| self.lines(s).0);
                    if line >= body_start {
                        for item in &w.items {
                            held.push(Site {
                                expr: item.context_expr.clone(),
                                text: self.text_of(&item.context_expr),
                                line: self.lines(stmt).0,
                                how: How::With,
                            });
                        }
                    }
                }
                Stmt::If(s) => self.apply_test(&mut held, &s.test, stmt, line),
                Stmt::While(s) => self.apply_test(&mut held, &s.test, stmt, line),
                _ => {}
            }
        }
        held
    }

    fn apply_test(&self, held: &mut Vec<Site>, test: &Expr, stmt: &Stmt, line: u32) {
        if self.lines(test).1 >= line {
            return; // the line is in the test itself
        }
        let mut v = LockCalls::default();
        v.visit_expr(test);
        for (call, expr) in v.found {
            self.apply(held, call, expr, stmt);
        }
    }

    /// Every `X.method(...)` call in the innermost statement at `line`, as
    /// (method, receiver, receiver text): what a blocked frame may be
    /// waiting in when the callee is C code (`SimpleQueue.get`).
    pub fn method_calls_at(&self, line: u32) -> Vec<(String, Expr, String)> {
        let path = self.path(line);
        let Some(&(block, i)) = path.last() else {
            return Vec::new();
        };
        let mut v = LockCalls {
            all: true,
            ..LockCalls::default()
        };
        match &block[i] {
            Stmt::If(s) => v.visit_expr(&s.test),
            Stmt::While(s) => v.visit_expr(&s.test),
            Stmt::With(w) => w.items.iter().for_each(|it| v.visit_expr(&it.context_expr)),
            s if !is_compound(s) => v.visit_stmt(s),
            _ => {}
        }
        v.found
            .into_iter()
            .map(|(m, e)| (m.to_owned(), e.clone(), self.text_of(e)))
            .collect()
    }

    fn apply(&self, held: &mut Vec<Site>, call: &str, expr: &Expr, stmt: &Stmt) {
        let text = self.text_of(expr);
        match call {
            "release" => {
                if let Some(pos) = held.iter().rposition(|s| s.text == text) {
                    held.remove(pos);
                }
            }
            _ => held.push(Site {
                expr: expr.clone(),
                text,
                line: self.lines(stmt).0,
                how: How::Acquire,
            }),
        }
    }

    /// Locks being acquired by the statement at `line` (a blocked thread's
    /// innermost frame): the items of a `with` whose header contains the
    /// line, or the receivers of `.acquire()` / `.__enter__()` calls in the
    /// innermost simple statement there.
    pub fn acquiring_at(&self, line: u32) -> Vec<Site> {
        let path = self.path(line);
        let Some(&(block, i)) = path.last() else {
            return Vec::new();
        };
        let stmt = &block[i];
        let start = self.lines(stmt).0;
        match stmt {
            Stmt::With(w) => {
                let body_start = w.body.first().map_or(u32::MAX, |s| self.lines(s).0);
                if line >= body_start {
                    return Vec::new();
                }
                w.items
                    .iter()
                    .map(|item| Site {
                        expr: item.context_expr.clone(),
                        text: self.text_of(&item.context_expr),
                        line: start,
                        how: How::With,
                    })
                    .collect()
            }
            _ => {
                let mut v = LockCalls::default();
                match stmt {
                    Stmt::If(s) => v.visit_expr(&s.test),
                    Stmt::While(s) => v.visit_expr(&s.test),
                    s if !is_compound(s) => v.visit_stmt(s),
                    _ => {}
                }
                v.found
                    .into_iter()
                    .filter(|(call, _)| *call != "release")
                    .map(|(_, expr)| Site {
                        expr: expr.clone(),
                        text: self.text_of(expr),
                        line: start,
                        how: How::Acquire,
                    })
                    .collect()
            }
        }
    }
}

fn is_compound(s: &Stmt) -> bool {
    matches!(
        s,
        Stmt::With(_)
            | Stmt::If(_)
            | Stmt::While(_)
            | Stmt::For(_)
            | Stmt::Try(_)
            | Stmt::Match(_)
            | Stmt::FunctionDef(_)
            | Stmt::ClassDef(_)
    )
}

/// The statement blocks nested directly in `s`: function and class bodies
/// too.
fn child_blocks(s: &Stmt) -> Vec<&[Stmt]> {
    match s {
        Stmt::FunctionDef(f) => vec![&f.body],
        Stmt::ClassDef(c) => vec![&c.body],
        _ => pymedic_repair::text::child_suites(s),
    }
}

/// `X.acquire(...)`, `X.release()` and `X.__enter__()` calls in a node
/// (with `all`: every `X.method(...)` call, as `(method, X)`).
#[derive(Default)]
struct LockCalls<'a> {
    found: Vec<(&'a str, &'a Expr)>,
    all: bool,
}

impl<'a> Visitor<'a> for LockCalls<'a> {
    fn visit_expr(&mut self, expr: &'a Expr) {
        if let Expr::Call(call) = expr
            && let Expr::Attribute(attr) = call.func.as_ref()
        {
            let verb = match attr.attr.as_str() {
                "acquire" => Some("acquire"),
                "__enter__" => Some("acquire"),
                "release" => Some("release"),
                other if self.all => Some(other),
                _ => None,
            };
            if let Some(verb) = verb {
                self.found.push((verb, &attr.value));
            }
        }
        if !matches!(expr, Expr::Lambda(_)) {
            visitor::walk_expr(self, expr);
        }
    }
}

fn lock_calls(s: &Stmt) -> Vec<(&str, &Expr)> {
    let mut v = LockCalls::default();
    v.visit_stmt(s);
    v.found
}

/// Parsed files by path, as the target sees them.
#[derive(Default)]
pub struct SourceCache {
    files: HashMap<String, Option<Arc<SourceFile>>>,
}

impl SourceCache {
    pub fn new() -> SourceCache {
        SourceCache::default()
    }

    /// The parsed `co_filename` of process `pid` (`None` for `<string>`,
    /// missing files, non-Python-3 text).
    pub fn get(&mut self, pid: u32, filename: &str) -> Option<Arc<SourceFile>> {
        if let Some(hit) = self.files.get(filename) {
            return hit.clone();
        }
        let parsed = read_source(pid, filename)
            .and_then(SourceFile::parse)
            .map(Arc::new);
        self.files.insert(filename.to_owned(), parsed.clone());
        parsed
    }
}

fn read_source(pid: u32, filename: &str) -> Option<String> {
    if filename.starts_with('<') || filename.is_empty() {
        return None;
    }
    let path = if filename.starts_with('/') {
        format!("/proc/{pid}/root{filename}")
    } else {
        format!("/proc/{pid}/cwd/{filename}")
    };
    let meta = std::fs::metadata(&path).ok()?;
    if meta.len() > 8 << 20 {
        return None;
    }
    std::fs::read_to_string(path).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    const SRC: &str = r#"
import threading
lock_a = threading.Lock()

class Account:
    def transfer(self, other, amount):
        with self._lock, \
             other._lock:
            self.balance -= amount
            other.deposit(amount)

def explicit(locks, i):
    locks[i].acquire()
    try:
        helper()
        locks[i].release()
        after()
    finally:
        pass

def nested():
    with lock_a:
        with (
            lock_b
        ):
            work()
        done()
    if cond.acquire(timeout=1):
        inside()

def inner_scope():
    lock_a.acquire()
    def cb():
        run()
"#;

    fn texts(sites: &[Site]) -> Vec<(String, u32)> {
        sites.iter().map(|s| (s.text.clone(), s.line)).collect()
    }

    #[test]
    fn with_items_and_multi_line_headers() {
        let f = SourceFile::parse(SRC.into()).unwrap();
        let held = f.held_at(10);
        assert_eq!(
            texts(&held),
            [("self._lock".into(), 7), ("other._lock".into(), 7)]
        );
        // On the header: being acquired, not held.
        assert!(f.held_at(8).is_empty());
        assert_eq!(texts(&f.acquiring_at(8)).len(), 2);
        assert_eq!(texts(&f.acquiring_at(7))[1].0, "other._lock");
    }

    #[test]
    fn explicit_acquire_until_release() {
        let f = SourceFile::parse(SRC.into()).unwrap();
        assert_eq!(texts(&f.held_at(15)), [("locks[i]".into(), 13)]);
        assert!(f.held_at(17).is_empty(), "released on line 16");
        assert_eq!(texts(&f.acquiring_at(13)), [("locks[i]".into(), 13)]);
    }

    #[test]
    fn nested_withs_and_if_acquire() {
        let f = SourceFile::parse(SRC.into()).unwrap();
        assert_eq!(
            texts(&f.held_at(26)),
            [("lock_a".into(), 22), ("lock_b".into(), 23)]
        );
        assert_eq!(texts(&f.held_at(27)), [("lock_a".into(), 22)]);
        assert_eq!(texts(&f.held_at(29)), [("cond".into(), 28)]);
        assert!(f.held_at(28).is_empty());
    }

    #[test]
    fn scopes_do_not_leak() {
        let f = SourceFile::parse(SRC.into()).unwrap();
        // Inside cb(): the enclosing function's acquire is another frame's.
        assert!(f.held_at(34).is_empty());
        assert!(SourceFile::parse("def f(:\n".into()).is_none());
    }
}
