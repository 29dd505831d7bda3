//! The module/import graph: edges between project modules (absolute and
//! relative imports, packages), import cycles among imports that run at
//! import time, and the impact of changing a module (who depends on it,
//! directly and transitively).

use rustc_hash::FxHashMap;
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::path::Path;

use pymedic_model::{Finding, Kind, Layer, Related, Severity};
use serde::Serialize;
use serde_json::json;

use crate::AnalyzeError;
use crate::report::finding;
use crate::symbols::Program;

#[derive(Clone, Debug, Serialize)]
pub struct ImportEdge {
    /// Importing file (index into the program's files).
    pub from: u32,
    pub to: u32,
    /// First import statement's line.
    pub line: u32,
    /// Every import of `to` in `from` is inside a function or `TYPE_CHECKING`.
    pub deferred: bool,
}

/// Modules and their imports.
#[derive(Clone, Debug, Default)]
pub struct ImportGraph {
    pub edges: Vec<ImportEdge>,
    /// External top-level packages → importing files.
    pub external: BTreeMap<String, BTreeSet<u32>>,
}

/// Builds the graph from every file's import statements.
pub fn graph(p: &Program) -> ImportGraph {
    let mut edges: BTreeMap<(u32, u32), ImportEdge> = BTreeMap::new();
    let mut external: BTreeMap<String, BTreeSet<u32>> = BTreeMap::new();
    for (fi, file) in p.files.iter().enumerate() {
        let from = fi as u32;
        for imp in &file.imports {
            let mut targets = Vec::new();
            if imp.names.is_empty() {
                // `import a.b.c`: the deepest project module named.
                let mut m = imp.module.as_str();
                loop {
                    if let Some(&t) = p.modules.get(m) {
                        targets.push(t);
                        break;
                    }
                    match m.rsplit_once('.') {
                        Some((head, _)) => m = head,
                        None => break,
                    }
                }
            } else {
                let mut to_pkg = false;
                for n in &imp.names {
                    match p.modules.get(&format!("{}.{n}", imp.module)) {
                        Some(&t) => targets.push(t),
                        None => to_pkg = true,
                    }
                }
                if to_pkg && let Some(&t) = p.modules.get(&imp.module) {
                    targets.push(t);
                }
            }
            if targets.is_empty() {
                let top = imp.module.split('.').next().unwrap_or_default();
                if !top.is_empty() && !p.modules.contains_key(top) {
                    external.entry(top.to_owned()).or_default().insert(from);
                }
            }
            for to in targets {
                if to == from {
                    continue;
                }
                let e = edges.entry((from, to)).or_insert(ImportEdge {
                    from,
                    to,
                    line: imp.line,
                    deferred: true,
                });
                if !imp.deferred && e.deferred {
                    e.deferred = false;
                    e.line = imp.line;
                }
            }
        }
    }
    ImportGraph {
        edges: edges.into_values().collect(),
        external,
    }
}

/// One module that depends on the changed one.
#[derive(Clone, Debug, Serialize)]
pub struct Dependent {
    pub module: String,
    pub file: String,
    /// 1 for a direct import.
    pub depth: u32,
    /// The import chain from this module to the changed one.
    pub via: Vec<String>,
    /// Line of this module's import of the next module in `via`.
    pub line: u32,
}

/// `pymedic analyze --impact X`.
#[derive(Clone, Debug, Serialize)]
pub struct Impact {
    pub module: String,
    pub file: String,
    pub direct: Vec<Dependent>,
    pub transitive: Vec<Dependent>,
}

impl ImportGraph {
    /// Resolves a dotted module name or a path (absolute, relative to the
    /// analysed root, or relative to the current directory).
    pub fn find_module(p: &Program, root: &Path, what: &str) -> Result<u32, AnalyzeError> {
        if let Some(&m) = p.modules.get(what) {
            return Ok(m);
        }
        let as_path = Path::new(what);
        let candidates = [
            as_path.to_path_buf(),
            std::env::current_dir()
                .map(|d| d.join(as_path))
                .unwrap_or_default(),
        ];
        let root_abs = root.canonicalize().ok();
        for c in candidates {
            if let (Ok(abs), Some(root_abs)) = (c.canonicalize(), &root_abs)
                && let Ok(rel) = abs.strip_prefix(root_abs)
            {
                let rel = rel.to_string_lossy();
                if let Some(i) = p.files.iter().position(|f| f.rel == rel) {
                    return Ok(i as u32);
                }
            }
        }
        let norm = what.trim_start_matches("./");
        if let Some(i) = p.files.iter().position(|f| f.rel == norm) {
            return Ok(i as u32);
        }
        Err(AnalyzeError::UnknownModule {
            what: what.to_owned(),
        })
    }

    /// What depends on module `target`, directly and transitively (every
    /// import, deferred ones included).
    pub fn impact(&self, p: &Program, target: u32) -> Impact {
        let mut rev: FxHashMap<u32, Vec<&ImportEdge>> = FxHashMap::default();
        for e in &self.edges {
            rev.entry(e.to).or_default().push(e);
        }
        let mut seen: FxHashMap<u32, (u32, u32, u32)> = FxHashMap::default(); // node → (depth, next, line)
        let mut queue = VecDeque::from([target]);
        seen.insert(target, (0, target, 0));
        while let Some(n) = queue.pop_front() {
            let depth = seen[&n].0;
            for e in rev.get(&n).into_iter().flatten() {
                if let std::collections::hash_map::Entry::Vacant(v) = seen.entry(e.from) {
                    v.insert((depth + 1, n, e.line));
                    queue.push_back(e.from);
                }
            }
        }
        let mut direct = Vec::new();
        let mut transitive = Vec::new();
        let mut nodes: Vec<_> = seen.iter().filter(|(n, _)| **n != target).collect();
        nodes.sort_by_key(|(n, (d, _, _))| (*d, p.files[**n as usize].module.clone()));
        for (&n, &(depth, _, line)) in nodes {
            let mut via = Vec::new();
            let mut cur = n;
            while cur != target {
                let next = seen[&cur].1;
                via.push(p.files[next as usize].module.clone());
                cur = next;
            }
            let d = Dependent {
                module: p.files[n as usize].module.clone(),
                file: p.files[n as usize].rel.clone(),
                depth,
                via,
                line,
            };
            if depth == 1 {
                direct.push(d);
            } else {
                transitive.push(d);
            }
        }
        Impact {
            module: p.files[target as usize].module.clone(),
            file: p.files[target as usize].rel.clone(),
            direct,
            transitive,
        }
    }

    /// Graphviz.
    pub fn to_dot(&self, p: &Program) -> String {
        let mut s = String::from("digraph imports {\n  rankdir=LR;\n  node [shape=box];\n");
        for f in &p.files {
            s.push_str(&format!("  \"{}\";\n", f.module));
        }
        for e in &self.edges {
            s.push_str(&format!(
                "  \"{}\" -> \"{}\"{};\n",
                p.files[e.from as usize].module,
                p.files[e.to as usize].module,
                if e.deferred { " [style=dashed]" } else { "" }
            ));
        }
        s.push_str("}\n");
        s
    }

    pub fn to_json(&self, p: &Program) -> serde_json::Value {
        json!({
            "modules": p.files.iter().map(|f| json!({
                "module": f.module, "file": f.rel, "package": f.is_package, "lines": f.lines
            })).collect::<Vec<_>>(),
            "edges": self.edges.iter().map(|e| json!({
                "from": p.files[e.from as usize].module,
                "to": p.files[e.to as usize].module,
                "line": e.line,
                "deferred": e.deferred,
            })).collect::<Vec<_>>(),
            "external": self.external.iter().map(|(k, v)| (k.clone(), json!(
                v.iter().map(|i| p.files[*i as usize].module.clone()).collect::<Vec<_>>()
            ))).collect::<serde_json::Map<_, _>>(),
        })
    }
}

/// Strongly connected components (Tarjan, iterative) of a graph on `0..n`.
pub(crate) fn sccs(n: usize, adj: &[Vec<u32>]) -> Vec<Vec<u32>> {
    let mut index = vec![u32::MAX; n];
    let mut low = vec![0u32; n];
    let mut on_stack = vec![false; n];
    let mut stack = Vec::new();
    let mut out = Vec::new();
    let mut next = 0u32;
    for start in 0..n {
        if index[start] != u32::MAX {
            continue;
        }
        let mut work: Vec<(u32, usize)> = vec![(start as u32, 0)];
        index[start] = next;
        low[start] = next;
        next += 1;
        stack.push(start as u32);
        on_stack[start] = true;
        while let Some(&mut (v, ref mut i)) = work.last_mut() {
            let vu = v as usize;
            if *i < adj[vu].len() {
                let w = adj[vu][*i];
                *i += 1;
                let wu = w as usize;
                if index[wu] == u32::MAX {
                    index[wu] = next;
                    low[wu] = next;
                    next += 1;
                    stack.push(w);
                    on_stack[wu] = true;
                    work.push((w, 0));
                } else if on_stack[wu] {
                    low[vu] = low[vu].min(index[wu]);
                }
            } else {
                work.pop();
                if let Some(&(parent, _)) = work.last() {
                    low[parent as usize] = low[parent as usize].min(low[vu]);
                }
                if low[vu] == index[vu] {
                    let mut comp = Vec::new();
                    while let Some(w) = stack.pop() {
                        on_stack[w as usize] = false;
                        comp.push(w);
                        if w == v {
                            break;
                        }
                    }
                    comp.sort_unstable();
                    out.push(comp);
                }
            }
        }
    }
    out
}

/// The shortest cycle through `start` inside `members` (BFS).
pub(crate) fn shortest_cycle(start: u32, members: &BTreeSet<u32>, adj: &[Vec<u32>]) -> Vec<u32> {
    let mut prev: FxHashMap<u32, u32> = FxHashMap::default();
    let mut queue = VecDeque::from([start]);
    while let Some(v) = queue.pop_front() {
        for &w in &adj[v as usize] {
            if !members.contains(&w) {
                continue;
            }
            if w == start {
                let mut path = vec![v];
                let mut cur = v;
                while cur != start {
                    cur = prev[&cur];
                    path.push(cur);
                }
                path.reverse();
                return path;
            }
            if let std::collections::hash_map::Entry::Vacant(e) = prev.entry(w) {
                e.insert(v);
                queue.push_back(w);
            }
        }
    }
    vec![start]
}

/// One `import_cycle` finding per strongly connected component of the
/// import-time graph, naming its shortest cycle and every member.
pub(crate) fn cycle_findings(p: &Program, g: &ImportGraph) -> Vec<Finding> {
    let n = p.files.len();
    let mut adj = vec![Vec::new(); n];
    let mut site: FxHashMap<(u32, u32), u32> = FxHashMap::default();
    for e in g.edges.iter().filter(|e| !e.deferred) {
        adj[e.from as usize].push(e.to);
        site.insert((e.from, e.to), e.line);
    }
    let mut out = Vec::new();
    for comp in sccs(n, &adj) {
        if comp.len() < 2 {
            continue;
        }
        let members: BTreeSet<u32> = comp.iter().copied().collect();
        let start = *comp
            .iter()
            .min_by_key(|&&m| &p.files[m as usize].module)
            .unwrap_or(&comp[0]);
        let cycle = shortest_cycle(start, &members, &adj);
        let names: Vec<&str> = cycle
            .iter()
            .map(|&m| p.files[m as usize].module.as_str())
            .collect();
        let mut related = Vec::new();
        for (i, &from) in cycle.iter().enumerate() {
            let to = cycle[(i + 1) % cycle.len()];
            let line = site.get(&(from, to)).copied().unwrap_or(0);
            related.push(Related::new(
                &p.module_location(from, line),
                format!("imports {} at import time", p.files[to as usize].module),
            ));
        }
        let first_line = site
            .get(&(cycle[0], cycle[1 % cycle.len()]))
            .copied()
            .unwrap_or(0);
        let mut sorted: Vec<&str> = names.clone();
        sorted.sort_unstable();
        let title = format!("import cycle: {} → {}", names.join(" → "), names[0]);
        let mut f = finding(
            Layer::Structural,
            Kind::IMPORT_CYCLE,
            Severity::Medium,
            0.9,
            title,
            p.module_location(cycle[0], first_line),
            &sorted.join(","),
            format!("import_cycle|{}", sorted.join(",")),
            json!({
                "cycle": names,
                "component": comp.iter().map(|&m| p.files[m as usize].module.clone()).collect::<Vec<_>>(),
            }),
        );
        f.related = related;
        out.push(f);
    }
    out
}
