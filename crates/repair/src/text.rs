//! Editing Python source without a formatter: byte-range replacements,
//! whole-line re-indentation, finding functions and statements by line, and
//! adding an import. Every edit is checked by re-parsing the result.

use std::collections::BTreeSet;

use ruff_python_ast::{self as ast, Expr, ModModule, Stmt};
use ruff_python_parser::Parsed;
use ruff_text_size::Ranged;

use pymedic_analyze::source::LineIndex;

/// A parsed file with its line index.
pub struct Source {
    pub text: String,
    pub parsed: Parsed<ModModule>,
    pub lines: LineIndex,
}

impl Source {
    pub fn new(text: String) -> Source {
        let parsed = ruff_python_parser::parse_unchecked_source(&text, ast::PySourceType::Python);
        let lines = LineIndex::new(&text);
        Source {
            text,
            parsed,
            lines,
        }
    }

    pub fn body(&self) -> &[Stmt] {
        &self.parsed.syntax().body
    }

    pub fn line(&self, n: &impl Ranged) -> u32 {
        self.lines.line(n.start().to_u32())
    }

    pub fn end_line(&self, n: &impl Ranged) -> u32 {
        self.lines.line(n.end().to_u32().saturating_sub(1))
    }

    pub fn slice(&self, n: &impl Ranged) -> &str {
        &self.text[n.start().to_usize()..n.end().to_usize()]
    }

    /// Leading whitespace of 1-based `line`.
    pub fn indent_of(&self, line: u32) -> &str {
        let start = self.lines.line_start(line) as usize;
        let rest = &self.text[start.min(self.text.len())..];
        let n = rest.len() - rest.trim_start_matches([' ', '\t']).len();
        &rest[..n]
    }

    /// Byte range of whole lines `first..=last`, including the final newline.
    pub fn lines_range(&self, first: u32, last: u32) -> (usize, usize) {
        let start = self.lines.line_start(first) as usize;
        let end = match self.lines.line_start(last + 1) {
            u32::MAX => self.text.len(),
            e => e as usize,
        };
        (start.min(self.text.len()), end.min(self.text.len()))
    }

    /// Lines that continue a multi-line token (triple-quoted strings):
    /// re-indenting them would change the string.
    pub fn string_continuation_lines(&self) -> BTreeSet<u32> {
        let mut out = BTreeSet::new();
        for t in self.parsed.tokens().iter() {
            let (a, b) = (self.line(t), self.end_line(t));
            if b > a {
                out.extend(a + 1..=b);
            }
        }
        out
    }

    /// The indentation unit the file uses (the first indented line's
    /// indentation), four spaces by default.
    pub fn indent_unit(&self) -> String {
        for line in self.text.lines() {
            let t = line.trim_start_matches([' ', '\t']);
            if !t.is_empty() && !t.starts_with('#') && t.len() < line.len() {
                return line[..line.len() - t.len()].to_owned();
            }
        }
        "    ".to_owned()
    }

    /// Whether the statement starts its line (nothing but indentation before it).
    pub fn starts_line(&self, s: &impl Ranged) -> bool {
        let start = s.start().to_usize();
        let line_start = self.lines.line_start(self.line(s)) as usize;
        self.text[line_start..start].trim().is_empty()
    }

    /// Whether the statement ends its line (only a comment may follow).
    pub fn ends_line(&self, s: &impl Ranged) -> bool {
        let end = s.end().to_usize();
        let rest = &self.text[end..];
        let eol = rest.find('\n').unwrap_or(rest.len());
        let tail = rest[..eol].trim();
        tail.is_empty() || tail.starts_with('#')
    }
}

/// Edits by byte range, applied back to front.
#[derive(Default)]
pub struct Edits(Vec<(usize, usize, String)>);

impl Edits {
    pub fn replace(&mut self, start: usize, end: usize, with: impl Into<String>) {
        self.0.push((start, end, with.into()));
    }

    pub fn insert(&mut self, at: usize, text: impl Into<String>) {
        self.0.push((at, at, text.into()));
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Applies the edits; overlapping edits are an error (a bug in a fix).
    pub fn apply(mut self, text: &str) -> Result<String, String> {
        self.0.sort_by(|a, b| b.0.cmp(&a.0).then(b.1.cmp(&a.1)));
        let mut out = text.to_owned();
        let mut limit = usize::MAX;
        for (s, e, w) in self.0 {
            if e > limit {
                return Err("overlapping edits".into());
            }
            out.replace_range(s..e, &w);
            limit = s;
        }
        Ok(out)
    }
}

/// Re-indents whole lines: `delta` > 0 adds that many units to every
/// non-blank line, < 0 removes them (failing if a line is not indented enough).
pub fn reindent(block: &str, delta: i32, unit: &str) -> Result<String, String> {
    let mut out = String::with_capacity(block.len() + 64);
    for line in block.split_inclusive('\n') {
        let content = line.trim_end_matches(['\n', '\r']);
        if content.trim().is_empty() {
            out.push_str(line);
            continue;
        }
        if delta >= 0 {
            for _ in 0..delta {
                out.push_str(unit);
            }
            out.push_str(line);
        } else {
            let mut rest = line;
            for _ in 0..(-delta) {
                rest = rest
                    .strip_prefix(unit)
                    .ok_or_else(|| format!("line {content:?} is not indented by {unit:?}"))?;
            }
            out.push_str(rest);
        }
    }
    Ok(out)
}

/// Finds a function by its qualified name (`Class.method`,
/// `outer.<locals>.inner`).
pub fn find_function<'a>(body: &'a [Stmt], qualname: &str) -> Option<&'a ast::StmtFunctionDef> {
    let parts: Vec<&str> = qualname.split('.').filter(|p| *p != "<locals>").collect();
    let mut suite = body;
    for (i, part) in parts.iter().enumerate() {
        let last = i + 1 == parts.len();
        let mut next = None;
        for s in suite {
            match s {
                Stmt::FunctionDef(f) if f.name.id.as_str() == *part => {
                    if last {
                        return Some(f);
                    }
                    next = Some(&f.body[..]);
                }
                Stmt::ClassDef(c) if c.name.id.as_str() == *part && !last => {
                    next = Some(&c.body[..]);
                }
                _ => {}
            }
        }
        suite = next?;
    }
    None
}

/// The suites (statement lists) nested in a statement.
pub fn child_suites(s: &Stmt) -> Vec<&[Stmt]> {
    match s {
        Stmt::If(i) => {
            let mut v: Vec<&[Stmt]> = vec![&i.body];
            v.extend(i.elif_else_clauses.iter().map(|c| &c.body[..]));
            v
        }
        Stmt::For(f) => vec![&f.body, &f.orelse],
        Stmt::While(w) => vec![&w.body, &w.orelse],
        Stmt::With(w) => vec![&w.body],
        Stmt::Try(t) => {
            let mut v: Vec<&[Stmt]> = vec![&t.body];
            v.extend(t.handlers.iter().map(|h| {
                let ast::ExceptHandler::ExceptHandler(h) = h;
                &h.body[..]
            }));
            v.push(&t.orelse);
            v.push(&t.finalbody);
            v
        }
        Stmt::Match(m) => m.cases.iter().map(|c| &c.body[..]).collect(),
        _ => Vec::new(),
    }
}

/// The suite and index of the first statement (not in nested functions)
/// for which `pred` holds.
pub fn find_stmt<'a>(
    suite: &'a [Stmt],
    pred: &dyn Fn(&Stmt) -> bool,
) -> Option<(&'a [Stmt], usize)> {
    for (i, s) in suite.iter().enumerate() {
        if pred(s) {
            return Some((suite, i));
        }
        if matches!(s, Stmt::FunctionDef(_) | Stmt::ClassDef(_)) {
            continue;
        }
        for child in child_suites(s) {
            if let Some(hit) = find_stmt(child, pred) {
                return Some(hit);
            }
        }
    }
    None
}

/// Every statement (not in nested functions) for which `pred` holds.
pub fn find_all<'a>(suite: &'a [Stmt], pred: &dyn Fn(&Stmt) -> bool, out: &mut Vec<&'a Stmt>) {
    for s in suite {
        if pred(s) {
            out.push(s);
        }
        if matches!(s, Stmt::FunctionDef(_) | Stmt::ClassDef(_)) {
            continue;
        }
        for child in child_suites(s) {
            find_all(child, pred, out);
        }
    }
}

/// Every statement anywhere in the module, nested functions and classes
/// included, for which `pred` holds.
pub fn find_all_deep<'a>(suite: &'a [Stmt], pred: &dyn Fn(&Stmt) -> bool, out: &mut Vec<&'a Stmt>) {
    for s in suite {
        if pred(s) {
            out.push(s);
        }
        match s {
            Stmt::FunctionDef(f) => find_all_deep(&f.body, pred, out),
            Stmt::ClassDef(c) => find_all_deep(&c.body, pred, out),
            _ => {
                for child in child_suites(s) {
                    find_all_deep(child, pred, out);
                }
            }
        }
    }
}

/// Whether `name` is mentioned (loaded or stored) in a statement.
pub fn mentions(s: &Stmt, name: &str) -> bool {
    use ruff_python_ast::visitor::{self, Visitor};
    struct M<'n>(&'n str, bool);
    impl<'a> Visitor<'a> for M<'_> {
        fn visit_expr(&mut self, e: &'a Expr) {
            if self.1 {
                return;
            }
            if let Expr::Name(n) = e
                && n.id.as_str() == self.0
            {
                self.1 = true;
                return;
            }
            visitor::walk_expr(self, e);
        }
    }
    let mut m = M(name, false);
    m.visit_stmt(s);
    m.1
}

/// Adds `import_line` (e.g. `import asyncio`) after the module's last
/// top-level import (or its docstring) unless `already` says it is there.
pub fn ensure_import(src: &Source, edits: &mut Edits, import_line: &str, already: bool) {
    if already {
        return;
    }
    let body = src.body();
    let mut after = None;
    for (i, s) in body.iter().enumerate() {
        match s {
            Stmt::Import(_) | Stmt::ImportFrom(_) => after = Some(s.end()),
            Stmt::Expr(e) if i == 0 && matches!(&*e.value, Expr::StringLiteral(_)) => {
                after = after.or(Some(s.end()));
            }
            _ => {
                if after.is_some() || i > 0 {
                    break;
                }
            }
        }
    }
    match after {
        Some(end) => {
            let line = src.lines.line(end.to_u32().saturating_sub(1));
            let (_, at) = src.lines_range(line, line);
            let nl = if src.text[..at].ends_with('\n') {
                ""
            } else {
                "\n"
            };
            edits.insert(at, format!("{nl}{import_line}\n"));
        }
        None => edits.insert(0, format!("{import_line}\n")),
    }
}

/// Whether the module imports `module` at top level as itself (`import asyncio`).
pub fn imports_module(src: &Source, module: &str) -> bool {
    src.body().iter().any(|s| match s {
        Stmt::Import(i) => i
            .names
            .iter()
            .any(|a| a.name.id.as_str() == module && a.asname.is_none()),
        _ => false,
    })
}

/// Whether the module binds `name` from `module` (`from functools import lru_cache`).
pub fn imports_from(src: &Source, module: &str, name: &str) -> bool {
    src.body().iter().any(|s| match s {
        Stmt::ImportFrom(i) => {
            i.level == 0
                && i.module.as_ref().is_some_and(|m| m.id.as_str() == module)
                && i.names
                    .iter()
                    .any(|a| a.name.id.as_str() == name && a.asname.is_none())
        }
        _ => false,
    })
}

/// Parses `text` and returns the first syntax error, if any.
pub fn parse_error(text: &str) -> Option<String> {
    let parsed = ruff_python_parser::parse_unchecked_source(text, ast::PySourceType::Python);
    parsed.errors().first().map(|e| {
        let line = LineIndex::new(text).line(e.location.start().to_u32());
        format!("line {line}: {}", e.error)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reindent_adds_and_removes_units_and_keeps_blank_lines() {
        let block = "a = 1\n\n    b = 2\n";
        assert_eq!(
            reindent(block, 1, "    ").unwrap(),
            "    a = 1\n\n        b = 2\n"
        );
        assert_eq!(
            reindent("    x\n        y\n", -1, "    ").unwrap(),
            "x\n    y\n"
        );
        assert!(reindent("x\n", -1, "    ").is_err());
    }

    #[test]
    fn edits_apply_back_to_front_and_refuse_overlaps() {
        let mut e = Edits::default();
        e.replace(0, 1, "A");
        e.insert(3, "!");
        assert_eq!(e.apply("abcd").unwrap(), "Abc!d");
        let mut e = Edits::default();
        e.replace(0, 3, "x");
        e.replace(2, 4, "y");
        assert!(e.apply("abcd").is_err());
    }

    #[test]
    fn finds_functions_statements_and_adds_imports() {
        let src = Source::new(
            "\"\"\"doc\"\"\"\nimport os\n\nclass A:\n    def m(self):\n        def inner():\n            x = 1\n        return 2\n"
                .to_owned(),
        );
        let f = find_function(src.body(), "A.m.<locals>.inner").unwrap();
        assert_eq!(src.line(f), 6);
        let m = find_function(src.body(), "A.m").unwrap();
        let (suite, i) = find_stmt(&m.body, &|s| matches!(s, Stmt::Return(_))).unwrap();
        assert_eq!(src.line(&suite[i]), 8);
        assert_eq!(src.indent_unit(), "    ");
        assert!(imports_module(&src, "os") && !imports_module(&src, "asyncio"));
        let mut e = Edits::default();
        ensure_import(&src, &mut e, "import asyncio", false);
        let out = e.apply(&src.text).unwrap();
        assert!(
            out.starts_with("\"\"\"doc\"\"\"\nimport os\nimport asyncio\n"),
            "{out}"
        );
        assert!(parse_error(&out).is_none());
        assert!(parse_error("def f(:\n").is_some());
    }

    #[test]
    fn multi_line_strings_are_protected() {
        let src = Source::new("def f():\n    s = \"\"\"a\nb\n\"\"\"\n    return s\n".to_owned());
        let lines = src.string_continuation_lines();
        assert!(
            lines.contains(&3) && lines.contains(&4) && !lines.contains(&5),
            "{lines:?}"
        );
    }
}
