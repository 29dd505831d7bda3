//! Long-lived containers that only grow: a module global, a class attribute
//! or an attribute set in `__init__` that functions add to (`x[k] = v`,
//! `append`, `add`, ...) and never remove from, clear, reassign or check
//! the size of. Each is a candidate `memory_leak`. So is a function cached
//! with `functools.cache` / `lru_cache(maxsize=None)`.

use std::collections::{BTreeMap, BTreeSet};

use pymedic_model::{Finding, Kind, Layer, Related, Severity};
use serde_json::json;

use rustc_hash::{FxHashMap, FxHashSet};

use crate::facts::{Binding, ContainerKind, Name, OpKind, Root, Value};
use crate::report::finding;
use crate::symbols::{ClassId, Ctx, FnId, Place, Program, Ty};

/// A container definition.
#[derive(Clone, Debug)]
pub struct Container {
    pub place: Place,
    pub kind: String,
    pub file: u32,
    pub line: u32,
    /// Per instance (set on `self` in a method) rather than module/class wide.
    pub per_instance: bool,
}

fn container_kind(p: &Program, ctx: Ctx, v: &Value) -> Option<String> {
    match v {
        Value::Container(k) => Some(k.as_str().to_owned()),
        Value::Call { func, bounded, .. } => {
            if *bounded {
                return None;
            }
            match p.resolve(ctx, func).ty {
                Ty::Ext(q) => match q.as_str() {
                    "dict" => Some(ContainerKind::Dict.as_str().to_owned()),
                    "list" => Some(ContainerKind::List.as_str().to_owned()),
                    "set" => Some(ContainerKind::Set.as_str().to_owned()),
                    "collections.defaultdict"
                    | "collections.OrderedDict"
                    | "collections.deque"
                    | "collections.Counter" => Some(q.rsplit('.').next().unwrap_or(&q).to_owned()),
                    _ => None,
                },
                _ => None,
            }
        }
        _ => None,
    }
}

/// The last names of the callables that make a container.
const CONTAINER_TYPES: &[&str] = &[
    "dict",
    "list",
    "set",
    "defaultdict",
    "OrderedDict",
    "deque",
    "Counter",
];

/// Every long-lived container in the program.
pub fn containers(p: &Program) -> BTreeMap<Place, Container> {
    containers_among(p, &alias_names(p))
}

/// [`containers`], given [`alias_names`]: a call is resolved only when its
/// callee's last name is a container type's or may stand for one.
fn containers_among(p: &Program, aliases: &FxHashSet<&str>) -> BTreeMap<Place, Container> {
    let maybe = |v: &Value| match v {
        Value::Call { func, .. } => {
            let last = func.last();
            CONTAINER_TYPES.contains(&last) || aliases.contains(last)
        }
        _ => true,
    };
    let mut out = BTreeMap::new();
    for (fi, file) in p.files.iter().enumerate() {
        let fi = fi as u32;
        let ctx = Ctx {
            file: fi,
            func: None,
            class: None,
        };
        for (name, g) in &file.scope.globals {
            if !maybe(&g.value) {
                continue;
            }
            if let Some(kind) = container_kind(p, ctx, &g.value) {
                let place = Place::Global(fi, name.to_string());
                out.insert(
                    place.clone(),
                    Container {
                        place,
                        kind,
                        file: fi,
                        line: g.line,
                        per_instance: false,
                    },
                );
            }
        }
        for (ci, class) in file.classes.iter().enumerate() {
            let cid = ClassId {
                file: fi,
                class: ci as u32,
            };
            for (name, attr) in &class.attrs {
                let ctx = Ctx {
                    file: fi,
                    func: attr.in_function.map(|f| f as u32),
                    class: Some(ci as u32),
                };
                // Only containers created once: in the class body or __init__.
                let in_init = attr
                    .in_function
                    .is_some_and(|f| file.functions[f].name == "__init__");
                if (!attr.class_level && !in_init) || !maybe(&attr.value) {
                    continue;
                }
                if let Some(kind) = container_kind(p, ctx, &attr.value) {
                    let place = Place::Attr(cid, name.to_string());
                    out.insert(
                        place.clone(),
                        Container {
                            place,
                            kind,
                            file: fi,
                            line: attr.line,
                            per_instance: !attr.class_level,
                        },
                    );
                }
            }
        }
    }
    out
}

pub(crate) fn findings(p: &Program) -> Vec<Finding> {
    let aliases = alias_names(p);
    let defs = containers_among(p, &aliases);
    // Functions used as decorators run at import time: their adds register.
    let mut decorators: BTreeSet<FnId> = BTreeSet::new();
    // Unbounded caches are found in the same sweep of every function (each
    // sweep is a cache miss per function); reported last, as before.
    let mut cached: Vec<(FnId, u32)> = Vec::new();
    for (id, f) in p.functions() {
        if let Some(line) = f.unbounded_cache {
            cached.push((id, line));
        }
        if f.decorators.is_empty() {
            continue;
        }
        let ctx = Ctx {
            file: id.file,
            func: f.parent.map(|x| x as u32),
            class: None,
        };
        for d in &f.decorators {
            if let Ty::Function(g) = p.resolve(ctx, d).ty {
                // A decorator factory's inner functions run at decoration too.
                let mut stack = vec![g];
                while let Some(h) = stack.pop() {
                    if decorators.insert(h) {
                        stack.extend(p.function(h).local_defs.values().map(|&i| FnId {
                            file: h.file,
                            func: i as u32,
                        }));
                    }
                }
            }
        }
    }
    struct Uses {
        adds: Vec<(FnId, u32)>,
        removes: usize,
        bounds: usize,
    }
    let mut uses: BTreeMap<Place, Uses> = BTreeMap::new();
    // A reference ending in a name no container has, and that cannot
    // stand for another place, resolves to a place of that name: not one
    // of `defs`. It is not resolved at all.
    let def_names: FxHashSet<&str> = defs
        .keys()
        .map(|place| match place {
            Place::Global(_, n) | Place::Attr(_, n) | Place::Syntactic(n) => n.as_str(),
        })
        .collect();
    let reaching = |name: &str| aliases.contains(name) || def_names.contains(name);
    let mut on_self: FxHashMap<(u32, u32, &[Name]), Option<Place>> = FxHashMap::default();
    for (fi, file) in p.files.iter().enumerate() {
        for op in &file.container_ops {
            if !reaching(op.target.last()) {
                continue;
            }
            let id = FnId {
                file: fi as u32,
                func: op.function as u32,
            };
            let ctx = p.ctx(id);
            let place = match (&op.target.root, ctx.class) {
                // `self.x…` resolves the same from every method of a class.
                (Root::SelfObj, Some(class)) => on_self
                    .entry((ctx.file, class, op.target.attrs.as_slice()))
                    .or_insert_with(|| p.resolve(ctx, &op.target).place)
                    .clone(),
                _ => p.resolve(ctx, &op.target).place,
            };
            let Some(place) = place else {
                continue;
            };
            let Some(def) = defs.get(&place) else {
                continue;
            };
            let u = uses.entry(place).or_insert(Uses {
                adds: Vec::new(),
                removes: 0,
                bounds: 0,
            });
            match op.op {
                OpKind::Add => {
                    let func = p.function(id);
                    let init_of_owner = def.per_instance && func.name == "__init__";
                    if !decorators.contains(&id) && !init_of_owner {
                        u.adds.push((id, op.line));
                    }
                }
                OpKind::Remove => u.removes += 1,
                OpKind::Bound => u.bounds += 1,
            }
        }
    }
    let mut out = Vec::new();
    for (place, u) in uses {
        if u.adds.is_empty() || u.removes > 0 || u.bounds > 0 {
            continue;
        }
        let def = &defs[&place];
        let name = p.place_name(&place);
        let file = &p.files[def.file as usize].rel;
        let (first_fn, first_line) = u.adds[0];
        let scope = match (&place, def.per_instance) {
            (Place::Global(..), _) => "module-level",
            (_, false) => "class-level",
            (_, true) => "per-instance",
        };
        let mut related = vec![Related::new(
            &pymedic_model::Location::new(file.clone(), def_function(p, &place), def.line),
            format!("{scope} {} {name} defined here", def.kind),
        )];
        for (id, line) in u.adds.iter().take(8) {
            related.push(Related::new(
                &p.location(*id, *line),
                format!("adds to {name}; nothing ever removes"),
            ));
        }
        let (severity, confidence) = if def.per_instance {
            (Severity::Low, 0.45)
        } else {
            (Severity::Medium, 0.6)
        };
        let mut f = finding(
            Layer::Structural,
            Kind::MEMORY_LEAK,
            severity,
            confidence,
            format!(
                "{scope} {} {name} only grows: {} add site(s), no removal or size bound",
                def.kind,
                u.adds.len()
            ),
            p.location(first_fn, first_line),
            &name,
            format!("memory_leak|{file}|{name}"),
            json!({
                "container": name,
                "container_kind": def.kind,
                "scope": scope,
                "definition": {"file": file, "line": def.line},
                "adds": u.adds.len(),
                "removals": 0,
                "bounded": false,
            }),
        );
        f.related = related;
        out.push(f);
    }
    for (id, line) in cached {
        let f = p.function(id);
        let method = f.class.is_some();
        let file = &p.files[id.file as usize].rel;
        let mut fd = finding(
            Layer::Structural,
            Kind::MEMORY_LEAK,
            if method {
                Severity::Medium
            } else {
                Severity::Low
            },
            if method { 0.6 } else { 0.4 },
            format!(
                "{} is cached without a size bound: every distinct argument{} stays in memory",
                f.qualname,
                if method { " (and self)" } else { "" }
            ),
            p.location(id, line),
            "cache",
            format!("memory_leak|{file}|{}|cache", f.qualname),
            json!({"cache": "unbounded", "function": f.qualname, "decorator_line": line}),
        );
        fd.related = vec![Related::new(
            &p.location(id, f.line),
            "cached function".to_owned(),
        )];
        out.push(fd);
    }
    out
}

/// The names that may stand for another place or callable: an alias
/// (`x = other.y`), a name imported under another name, and a call that
/// [`Program`] resolves to its first argument: a `Condition(lock)`. Any
/// other name resolves to something of its own name.
///
/// A call stands for its first argument only when its callee resolves to a
/// `Condition` class, so its callee's last name is `Condition` or itself a
/// name that may stand for another (an alias, `from threading import
/// Condition as C`, or another such call): found by iterating to a fixpoint.
fn alias_names(p: &Program) -> FxHashSet<&str> {
    let mut out: FxHashSet<&str> = FxHashSet::default();
    // (name, its callee's last name) of each call with a first argument.
    let mut calls: Vec<(&str, &str)> = Vec::new();
    for file in &p.files {
        let values = file
            .scope
            .globals
            .iter()
            .map(|(n, g)| (n.as_str(), &g.value))
            .chain(
                file.classes
                    .iter()
                    .flat_map(|c| c.attrs.iter().map(|(n, a)| (n.as_str(), &a.value))),
            );
        for (name, v) in values {
            match v {
                Value::Alias(_) => {
                    out.insert(name);
                }
                Value::Call {
                    func,
                    first_arg: Some(_),
                    ..
                } => calls.push((name, func.last())),
                _ => {}
            }
        }
        for (local, b) in &file.scope.imports {
            if matches!(b, Binding::From { name, .. } if name != local) {
                out.insert(local);
            }
        }
    }
    loop {
        let before = out.len();
        calls.retain(|&(name, callee)| {
            let condition = callee == "Condition" || out.contains(callee);
            if condition {
                out.insert(name);
            }
            !condition
        });
        if out.len() == before {
            return out;
        }
    }
}

fn def_function(p: &Program, place: &Place) -> String {
    match place {
        Place::Global(..) => "<module>".to_owned(),
        Place::Attr(c, _) => p.class(*c).qualname.clone(),
        Place::Syntactic(_) => String::new(),
    }
}
