//! Lock order across the whole program.
//!
//! Each `with X:` / `X.acquire()` is resolved to a lock identity (a module
//! global, a class attribute or `self._x` of a class, through aliases and
//! `Condition(lock)`). A function that holds X and takes Y, directly or in
//! any project function it calls (transitively), adds the edge X → Y with
//! its outer and inner sites. A cycle in that graph is a
//! `lock_order_inversion`: two threads running the two orders can deadlock.
//! Locks always taken in one order, however many functions take them,
//! form no cycle and are not reported.

use rustc_hash::FxHashMap;
use std::collections::{BTreeMap, BTreeSet};

use pymedic_model::{Finding, Kind, Layer, Related, Severity};
use serde::Serialize;
use serde_json::json;

use crate::facts::{AcquireVia, CallFact, PathRef, Root, Value};
use crate::imports::sccs;
use crate::report::finding;
use crate::symbols::{Callee, FnId, LockFlavor, Place, Program, Ty, lock_flavor};

/// A resolved lock.
#[derive(Clone, Debug, PartialEq)]
pub struct Lock {
    pub name: String,
    pub flavor: LockFlavor,
    /// Identified by its name only (`self.lock` of unknown type).
    pub guessed: bool,
    /// A module global (one object for the whole process).
    pub global: bool,
}

/// Where a lock is taken (function and line).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Site {
    pub func: FnId,
    pub line: u32,
}

/// How an inner lock is reached from the outer one.
#[derive(Clone, Debug)]
pub struct EdgeSite {
    pub outer: Site,
    pub inner: Site,
    /// Call sites from the outer function down to the inner acquisition.
    pub via: Vec<Site>,
    /// The inner acquisition is a `with` nested directly in the outer one.
    pub direct: bool,
}

/// The lock-order graph.
#[derive(Default)]
pub struct LockGraph {
    pub locks: BTreeMap<String, Lock>,
    pub edges: BTreeMap<(String, String), Vec<EdgeSite>>,
    /// A lock taken again while held: by the same thread on the same
    /// object (self-deadlock of a non-reentrant lock), or two objects of
    /// the same lock attribute nested in an order set by the caller.
    pub reentries: Vec<Reentry>,
}

#[derive(Clone, Debug)]
pub struct Reentry {
    pub lock: String,
    pub site: EdgeSite,
    /// Two different objects (`a.lock`, `b.lock`) rather than the same one.
    pub two_objects: bool,
}

const MAX_SITES: usize = 16;
const MAX_VIA: usize = 8;
const MAX_LOCKS_PER_FN: usize = 64;

/// Resolves a `with`/`acquire` target to a lock, if it is one.
pub fn resolve_lock(
    p: &Program,
    id: FnId,
    path: &PathRef,
    via: AcquireVia,
    unique_attr: &mut LockAttrs<'_>,
) -> Option<Lock> {
    let r = p.resolve(p.ctx(id), path);
    let flavor = match &r.ty {
        Ty::ExtInstance(q) => lock_flavor(q),
        _ => None,
    };
    let func = p.function(id);
    let text = || path.text();
    let lockish = || {
        let l = path.last().to_ascii_lowercase();
        l.contains("lock") || l.contains("mutex")
    };
    match (flavor, r.place) {
        (Some(fl), Some(place)) => Some(Lock {
            name: p.place_name(&place),
            flavor: fl,
            guessed: false,
            global: matches!(place, Place::Global(..)),
        }),
        (Some(fl), None) => Some(Lock {
            name: format!(
                "{}:{}:{}",
                p.files[id.file as usize].module,
                func.qualname,
                text()
            ),
            flavor: fl,
            guessed: false,
            global: false,
        }),
        (None, place) => {
            if !matches!(r.ty, Ty::Unknown) && !matches!(r.ty, Ty::Ext(_)) {
                return None;
            }
            // An attribute of an object of unknown type: if exactly one
            // project class has a lock under that name, it is that one.
            if !path.attrs.is_empty()
                && matches!(path.root, Root::Local(_) | Root::Name(_))
                && let cands = unique_attr.named(path.last())
                && cands.len() == 1
            {
                return Some(Lock {
                    name: p.place_name(&cands[0].0),
                    flavor: cands[0].1,
                    guessed: true,
                    global: false,
                });
            }
            if !lockish() {
                return None;
            }
            let name = match place {
                Some(pl) => p.place_name(&pl),
                None => format!(
                    "{}:{}:{}",
                    p.files[id.file as usize].module,
                    func.qualname,
                    text()
                ),
            };
            Some(Lock {
                name,
                flavor: if via == AcquireVia::AsyncWith {
                    LockFlavor::Async
                } else {
                    LockFlavor::Plain
                },
                guessed: true,
                global: false,
            })
        }
    }
}

/// Class attributes that hold locks, looked up by attribute name when an
/// acquisition needs one (`obj.lock` on an object of unknown type):
/// resolving every attribute of every class up front cost more than the
/// rest of the lock pass.
pub struct LockAttrs<'p> {
    p: &'p Program,
    /// Attribute name → the classes that set it (no resolution yet).
    classes: FxHashMap<&'p str, Vec<crate::symbols::ClassId>>,
    found: FxHashMap<&'p str, Vec<(Place, LockFlavor)>>,
}

impl<'p> LockAttrs<'p> {
    pub fn new(p: &'p Program) -> LockAttrs<'p> {
        let mut classes: FxHashMap<&str, Vec<crate::symbols::ClassId>> = FxHashMap::default();
        for (fi, file) in p.files.iter().enumerate() {
            for (ci, class) in file.classes.iter().enumerate() {
                for (name, attr) in &class.attrs {
                    // A literal or an opaque value is never a lock.
                    if !matches!(attr.value, Value::Container(_) | Value::Other) {
                        classes
                            .entry(name)
                            .or_default()
                            .push(crate::symbols::ClassId {
                                file: fi as u32,
                                class: ci as u32,
                            });
                    }
                }
            }
        }
        LockAttrs {
            p,
            classes,
            found: FxHashMap::default(),
        }
    }

    /// The locks held in a class attribute named `name`, by place.
    pub fn named(&mut self, name: &str) -> &[(Place, LockFlavor)] {
        let Some((&key, cids)) = self.classes.get_key_value(name) else {
            return &[];
        };
        let p = self.p;
        self.found.entry(key).or_insert_with(|| {
            let mut out = Vec::new();
            for &cid in cids {
                let path = PathRef {
                    root: Root::SelfObj,
                    attrs: vec![crate::facts::Name::new(name)],
                };
                let ctx = crate::symbols::Ctx {
                    file: cid.file,
                    func: None,
                    class: Some(cid.class),
                };
                let r = p.resolve(ctx, &path);
                if let Ty::ExtInstance(q) = &r.ty
                    && let Some(fl) = lock_flavor(q)
                {
                    let place = r.place.unwrap_or(Place::Attr(cid, name.to_owned()));
                    out.push((place, fl));
                }
            }
            out.sort_by(|a, b| a.0.cmp(&b.0));
            out.dedup_by(|a, b| a.0 == b.0);
            out
        })
    }
}

/// Per function (dense index), its acquisitions resolved to locks (None:
/// not a lock). Computed once per program.
pub fn resolved_acquires(p: &Program) -> &Vec<Vec<Option<Lock>>> {
    p.acquires.get_or_init(|| {
        let mut attrs = LockAttrs::new(p);
        p.functions()
            .map(|(id, f)| {
                f.acquires
                    .iter()
                    .map(|a| resolve_lock(p, id, &a.lock, a.via, &mut attrs))
                    .collect()
            })
            .collect()
    })
}

#[derive(Clone)]
struct Trace {
    site: Site,
    via: Vec<Site>,
}

/// Builds the lock-order graph.
pub fn graph(p: &Program) -> LockGraph {
    let acquires = resolved_acquires(p);
    let n = p.fn_count();
    let ids: Vec<FnId> = p.functions().map(|(id, _)| id).collect();
    let mut g = LockGraph::default();
    // Only what is called while a lock is held can add an edge: the
    // functions reached from those calls are the only ones whose calls are
    // resolved and whose takes are propagated.
    let holding =
        |i: usize, c: &CallFact| c.held.iter().any(|&h| acquires[i][h as usize].is_some());
    // (A function that takes nothing holds nothing: its calls, most of the
    // program's, are not even looked at.)
    let roots: Vec<usize> = (0..n)
        .filter(|&i| !acquires[i].is_empty())
        .filter(|&i| p.function(ids[i]).calls.iter().any(|c| holding(i, c)))
        .collect();
    let held_callees = roots.iter().flat_map(|&i| {
        (p.function(ids[i]).calls.iter().zip(p.callees_of(i))).filter_map(move |(c, callee)| {
            match callee {
                Callee::Project(t) if holding(i, c) => Some(p.dense(*t)),
                _ => None,
            }
        })
    });
    let reached = p.reachable(held_callees, |_| true);
    // Calls to project functions, per function: (callee dense, line, held).
    let project_calls = |i: usize| -> Vec<(usize, u32, &[u32])> {
        let id = ids[i];
        p.function(id)
            .calls
            .iter()
            .zip(p.callees_of(i))
            .filter_map(|(c, callee)| match callee {
                Callee::Project(t) if *t != id => Some((p.dense(*t), c.line, c.held.as_slice())),
                _ => None,
            })
            .collect()
    };
    let calls: Vec<Vec<(usize, u32, &[u32])>> = (0..n)
        .map(|i| {
            if reached[i] || roots.binary_search(&i).is_ok() {
                project_calls(i)
            } else {
                Vec::new()
            }
        })
        .collect();
    // What each function takes, itself or through its callees.
    let mut takes: Vec<BTreeMap<String, Trace>> = vec![BTreeMap::new(); n];
    for (i, &id) in ids.iter().enumerate() {
        // Most functions take nothing: their facts are not even read (one
        // cache miss each, over every function of the program).
        if acquires[i].is_empty() {
            continue;
        }
        let f = p.function(id);
        for (a, lock) in f.acquires.iter().zip(&acquires[i]) {
            if let Some(lock) = lock {
                g.locks
                    .entry(lock.name.clone())
                    .or_insert_with(|| lock.clone());
                takes[i].entry(lock.name.clone()).or_insert(Trace {
                    site: Site {
                        func: id,
                        line: a.line,
                    },
                    via: Vec::new(),
                });
            }
        }
    }
    // Only functions that can reach a lock matter for propagation.
    for _round in 0..32 {
        let mut changed = false;
        for i in 0..n {
            for &(callee, line, _) in &calls[i] {
                if takes[callee].is_empty() || callee == i {
                    continue;
                }
                let add: Vec<(String, Trace)> = takes[callee]
                    .iter()
                    .filter(|(k, t)| !takes[i].contains_key(*k) && t.via.len() < MAX_VIA)
                    .map(|(k, t)| {
                        let mut via = vec![Site { func: ids[i], line }];
                        via.extend(t.via.iter().copied());
                        (k.clone(), Trace { site: t.site, via })
                    })
                    .collect();
                for (k, t) in add {
                    if takes[i].len() >= MAX_LOCKS_PER_FN {
                        break;
                    }
                    takes[i].insert(k, t);
                    changed = true;
                }
            }
        }
        if !changed {
            break;
        }
    }
    // Edges: from what a function takes and what it calls while holding
    // (a function that takes nothing holds nothing at its calls either).
    for (i, &id) in ids.iter().enumerate() {
        if acquires[i].is_empty() {
            continue;
        }
        let f = p.function(id);
        let locks = &acquires[i];
        for (j, a) in f.acquires.iter().enumerate() {
            let Some(inner) = &locks[j] else { continue };
            for &h in &a.held {
                let Some(outer) = &locks[h as usize] else {
                    continue;
                };
                let outer_line = f.acquires[h as usize].line;
                let direct = a.via != AcquireVia::Acquire
                    && f.acquires[h as usize].via != AcquireVia::Acquire;
                if outer.name == inner.name {
                    let same_object = f.acquires[h as usize].lock == a.lock;
                    // `x.acquire()` on a held lock is also the hand-off idiom
                    // (another thread releases it): only `with` nesting counts.
                    let deadlocks = same_object
                        && direct
                        && inner.flavor == LockFlavor::Plain
                        && !inner.guessed;
                    let two = !same_object && inner.flavor != LockFlavor::Async;
                    if (deadlocks || two) && g.reentries.len() < 256 {
                        g.reentries.push(Reentry {
                            lock: inner.name.clone(),
                            site: EdgeSite {
                                outer: Site {
                                    func: id,
                                    line: outer_line,
                                },
                                inner: Site {
                                    func: id,
                                    line: a.line,
                                },
                                via: Vec::new(),
                                direct: true,
                            },
                            two_objects: two,
                        });
                    }
                    continue;
                }
                add_edge(
                    &mut g,
                    &outer.name,
                    &inner.name,
                    EdgeSite {
                        outer: Site {
                            func: id,
                            line: outer_line,
                        },
                        inner: Site {
                            func: id,
                            line: a.line,
                        },
                        via: Vec::new(),
                        direct,
                    },
                );
            }
        }
        for &(callee, line, held) in &calls[i] {
            for &h in held {
                let Some(outer) = &locks[h as usize] else {
                    continue;
                };
                for (inner, t) in &takes[callee] {
                    if *inner == outer.name {
                        // Re-acquired through a call: a self-deadlock when it is
                        // surely the same object (a module global, or `self.x`
                        // reached through `self.method()`).
                        let same_object = outer.global
                            || (self_call(p, id, line)
                                && t.via.is_empty()
                                && t.site.func.file == ids[callee].file
                                && acquires_self_attr(p, t.site));
                        let with_both = f.acquires[h as usize].via != AcquireVia::Acquire
                            && taken_with(p, t.site);
                        if outer.flavor == LockFlavor::Plain
                            && !outer.guessed
                            && same_object
                            && with_both
                            && g.reentries.len() < 256
                        {
                            let mut via = vec![Site { func: id, line }];
                            via.extend(t.via.iter().copied());
                            g.reentries.push(Reentry {
                                lock: outer.name.clone(),
                                site: EdgeSite {
                                    outer: Site {
                                        func: id,
                                        line: f.acquires[h as usize].line,
                                    },
                                    inner: t.site,
                                    via,
                                    direct: false,
                                },
                                two_objects: false,
                            });
                        }
                        continue;
                    }
                    let mut via = vec![Site { func: id, line }];
                    via.extend(t.via.iter().copied());
                    add_edge(
                        &mut g,
                        &outer.name,
                        inner,
                        EdgeSite {
                            outer: Site {
                                func: id,
                                line: f.acquires[h as usize].line,
                            },
                            inner: t.site,
                            via,
                            direct: false,
                        },
                    );
                }
            }
        }
    }
    g
}

/// Whether the call at `line` in `id` is `self.m(...)`.
fn self_call(p: &Program, id: FnId, line: u32) -> bool {
    p.function(id)
        .calls
        .iter()
        .any(|c| c.line == line && c.callee.root == Root::SelfObj && c.callee.attrs.len() == 1)
}

/// Whether the acquisition at `site` is a `with` statement.
fn taken_with(p: &Program, site: Site) -> bool {
    p.function(site.func)
        .acquires
        .iter()
        .any(|a| a.line == site.line && a.via != AcquireVia::Acquire)
}

/// Whether the acquisition at `site` is of `self.<attr>`.
fn acquires_self_attr(p: &Program, site: Site) -> bool {
    p.function(site.func)
        .acquires
        .iter()
        .any(|a| a.line == site.line && a.lock.root == Root::SelfObj && a.lock.attrs.len() == 1)
}

fn add_edge(g: &mut LockGraph, from: &str, to: &str, site: EdgeSite) {
    let sites = g.edges.entry((from.to_owned(), to.to_owned())).or_default();
    let dup = sites
        .iter()
        .any(|s| s.outer == site.outer && s.inner == site.inner);
    if !dup && sites.len() < MAX_SITES {
        sites.push(site);
    }
}

/// Elementary cycles of the lock graph (bounded: length ≤ 6, 32 per
/// component), each as its list of locks.
pub fn cycles(g: &LockGraph) -> Vec<Vec<String>> {
    let names: Vec<&String> = g.locks.keys().collect();
    let index: FxHashMap<&str, u32> = names
        .iter()
        .enumerate()
        .map(|(i, n)| (n.as_str(), i as u32))
        .collect();
    let mut adj = vec![Vec::new(); names.len()];
    for (a, b) in g.edges.keys() {
        if let (Some(&x), Some(&y)) = (index.get(a.as_str()), index.get(b.as_str())) {
            adj[x as usize].push(y);
        }
    }
    let mut out = Vec::new();
    for comp in sccs(names.len(), &adj) {
        if comp.len() < 2 {
            continue;
        }
        let members: BTreeSet<u32> = comp.iter().copied().collect();
        let mut found = Vec::new();
        for &s in &comp {
            let mut path = vec![s];
            dfs_cycles(s, s, &members, &adj, &mut path, &mut found);
            if found.len() >= 32 {
                break;
            }
        }
        for c in found {
            out.push(c.iter().map(|&i| names[i as usize].clone()).collect());
        }
    }
    out
}

fn dfs_cycles(
    start: u32,
    v: u32,
    members: &BTreeSet<u32>,
    adj: &[Vec<u32>],
    path: &mut Vec<u32>,
    out: &mut Vec<Vec<u32>>,
) {
    if out.len() >= 32 {
        return;
    }
    for &w in &adj[v as usize] {
        if w == start && path.len() >= 2 {
            out.push(path.clone());
        } else if w > start && members.contains(&w) && !path.contains(&w) && path.len() < 6 {
            path.push(w);
            dfs_cycles(start, w, members, adj, path, out);
            path.pop();
        }
    }
}

#[derive(Serialize)]
struct EdgeJson {
    from: String,
    to: String,
    sites: usize,
    outer: String,
    inner: String,
    via: Vec<String>,
    direct: bool,
}

pub(crate) fn findings(p: &Program) -> Vec<Finding> {
    let g = graph(p);
    let mut out = reentry_findings(p, &g);
    let at = |s: &Site| {
        let l = p.location(s.func, s.line);
        format!("{}:{}:{}", l.file, l.function, l.line)
    };
    for cycle in cycles(&g) {
        let mut related = Vec::new();
        let mut edges = Vec::new();
        let mut guessed = false;
        // The edge with the fewest sites is the likely mistake.
        let mut minority: Option<(usize, Site)> = None;
        for (i, from) in cycle.iter().enumerate() {
            let to = &cycle[(i + 1) % cycle.len()];
            let sites = &g.edges[&(from.clone(), to.clone())];
            let s = &sites[0];
            guessed |= g.locks[from].guessed || g.locks[to].guessed;
            related.push(Related::new(
                &p.location(s.outer.func, s.outer.line),
                format!("holds {from}"),
            ));
            let via = if s.via.is_empty() {
                String::new()
            } else {
                format!(
                    " via {}",
                    s.via
                        .iter()
                        .map(|v| format!(
                            "call at line {} in {}",
                            v.line,
                            p.function(v.func).qualname
                        ))
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            };
            related.push(Related::new(
                &p.location(s.inner.func, s.inner.line),
                format!("takes {to} while holding {from}{via}"),
            ));
            if minority.is_none_or(|(n, _)| sites.len() < n) {
                minority = Some((sites.len(), s.inner));
            }
            edges.push(EdgeJson {
                from: from.clone(),
                to: to.clone(),
                sites: sites.len(),
                outer: at(&s.outer),
                inner: at(&s.inner),
                via: s.via.iter().map(at).collect(),
                direct: s.direct,
            });
        }
        let Some((_, primary)) = minority else {
            continue;
        };
        let mut sorted = cycle.clone();
        sorted.sort();
        let order = edges
            .iter()
            .map(|e| format!("{} → {} ({})", e.from, e.to, e.inner))
            .collect::<Vec<_>>()
            .join("; ");
        let mut f = finding(
            Layer::Structural,
            Kind::LOCK_ORDER_INVERSION,
            Severity::High,
            if guessed { 0.6 } else { 0.85 },
            format!("locks taken in opposite orders: {order}"),
            p.location(primary.func, primary.line),
            &sorted.join(","),
            format!("lock_order_inversion|{}", sorted.join(",")),
            json!({
                "locks": cycle,
                "edges": edges,
                "flavors": cycle.iter().map(|l| format!("{:?}", g.locks[l].flavor).to_lowercase()).collect::<Vec<_>>(),
            }),
        );
        f.related = related;
        out.push(f);
    }
    out
}

fn reentry_findings(p: &Program, g: &LockGraph) -> Vec<Finding> {
    let mut out = Vec::new();
    let mut seen = std::collections::BTreeSet::new();
    for r in &g.reentries {
        let f = p.function(r.site.outer.func);
        let file = &p.files[r.site.outer.func.file as usize].rel;
        if !seen.insert((r.site.outer, r.lock.clone(), r.two_objects)) {
            continue;
        }
        let via: Vec<String> = r
            .site
            .via
            .iter()
            .map(|v| format!("call at line {} in {}", v.line, p.function(v.func).qualname))
            .collect();
        let related = vec![
            Related::new(
                &p.location(r.site.outer.func, r.site.outer.line),
                format!("holds {}", r.lock),
            ),
            Related::new(
                &p.location(r.site.inner.func, r.site.inner.line),
                if via.is_empty() {
                    format!("takes {} again", r.lock)
                } else {
                    format!("takes {} again via {}", r.lock, via.join(", "))
                },
            ),
        ];
        let evidence = json!({
            "locks": [r.lock],
            "instances": r.two_objects,
            "via": via,
        });
        let finding = if r.two_objects {
            finding(
                Layer::Structural,
                Kind::LOCK_ORDER_INVERSION,
                Severity::High,
                0.6,
                format!(
                    "two {} objects are locked one inside the other in the order the caller passes them (line {} then {}): two threads passing them swapped deadlock",
                    r.lock, r.site.outer.line, r.site.inner.line
                ),
                p.location(r.site.inner.func, r.site.inner.line),
                &format!("{}|instances", r.lock),
                format!(
                    "lock_order_inversion|{file}|{}|{}|instances",
                    f.qualname, r.lock
                ),
                evidence,
            )
        } else {
            finding(
                Layer::Structural,
                Kind::DEADLOCK,
                Severity::Critical,
                if r.site.direct { 0.9 } else { 0.75 },
                format!(
                    "non-reentrant lock {} is taken again while held (line {} then line {}): the thread waits for itself forever",
                    r.lock, r.site.outer.line, r.site.inner.line
                ),
                p.location(r.site.inner.func, r.site.inner.line),
                &r.lock,
                format!("deadlock|{file}|{}|{}", f.qualname, r.lock),
                evidence,
            )
        };
        let mut finding = finding;
        finding.related = related;
        out.push(finding);
    }
    out
}
