//! The whole program: every file's facts plus name resolution across
//! modules. A [`PathRef`] seen in a function resolves to a [`Resolved`]:
//! where the value lives ([`Place`], the identity of a lock or a container)
//! and what it is ([`Ty`]: a module, class, function, instance of a project
//! class, or something external such as `threading.Lock` or `requests.get`).

use rustc_hash::FxHashMap;
use std::sync::OnceLock;

use pymedic_model::Location;

use crate::facts::*;

/// A function: file index and function index in that file.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FnId {
    pub file: u32,
    pub func: u32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ClassId {
    pub file: u32,
    pub class: u32,
}

/// Where a value lives: the identity of a lock or a long-lived container.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Place {
    /// A module global.
    Global(u32, String),
    /// A class attribute or an attribute every instance sets on `self`.
    Attr(ClassId, String),
    /// Only known by its text, scoped to a function (`func:text`).
    Syntactic(String),
}

#[derive(Clone, Debug, PartialEq)]
pub enum Ty {
    Module(u32),
    Class(ClassId),
    Function(FnId),
    Instance(ClassId),
    /// An external module, class or function by qualified name.
    Ext(String),
    /// An instance of an external class (`threading.Lock`).
    ExtInstance(String),
    Unknown,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Resolved {
    pub place: Option<Place>,
    pub ty: Ty,
}

impl Resolved {
    fn ty(ty: Ty) -> Resolved {
        Resolved { place: None, ty }
    }
    const UNKNOWN: Resolved = Resolved {
        place: None,
        ty: Ty::Unknown,
    };
}

const MAX_DEPTH: u32 = 12;
/// An MRO computed this close to the top of a resolution is complete (its
/// bases had `MAX_DEPTH - 3` levels to resolve in), so it is cached.
const MRO_CACHE_DEPTH: u32 = 3;

/// Where a reference is resolved from.
#[derive(Clone, Copy, Debug)]
pub struct Ctx {
    pub file: u32,
    pub func: Option<u32>,
    pub class: Option<u32>,
}

/// All files' facts and the module table.
pub struct Program {
    pub files: Vec<FileFacts>,
    pub modules: FxHashMap<String, u32>,
    /// Method name → the project methods of that name.
    methods: OnceLock<FxHashMap<Name, Vec<FnId>>>,
    /// Dense function numbering: file i's functions start at `fn_base[i]`.
    fn_base: Vec<u32>,
    /// Per dense function, per call site: what it calls (resolved on
    /// demand, once).
    callees: Vec<OnceLock<Vec<Callee>>>,
    /// Per class (file `i`'s classes from `class_base[i]`): its MRO within
    /// the project, computed on first use.
    class_base: Vec<u32>,
    mros: Vec<OnceLock<Vec<ClassId>>>,
    /// Per dense function, per acquisition: the lock, if it is one.
    pub(crate) acquires: OnceLock<Vec<Vec<Option<crate::locks::Lock>>>>,
}

impl Program {
    pub fn new(files: Vec<FileFacts>) -> Program {
        let mut modules = FxHashMap::default();
        let mut fn_base = Vec::with_capacity(files.len());
        let mut class_base = Vec::with_capacity(files.len());
        let (mut n, mut classes) = (0u32, 0u32);
        for (i, f) in files.iter().enumerate() {
            fn_base.push(n);
            n += f.functions.len() as u32;
            class_base.push(classes);
            classes += f.classes.len() as u32;
            modules.entry(f.module.clone()).or_insert(i as u32);
        }
        Program {
            files,
            modules,
            methods: OnceLock::new(),
            fn_base,
            callees: (0..n as usize).map(|_| OnceLock::new()).collect(),
            class_base,
            mros: (0..classes as usize).map(|_| OnceLock::new()).collect(),
            acquires: OnceLock::new(),
        }
    }

    /// Method name → the project methods of that name (built on first use).
    fn methods(&self) -> &FxHashMap<Name, Vec<FnId>> {
        self.methods.get_or_init(|| {
            let mut methods: FxHashMap<Name, Vec<FnId>> = FxHashMap::default();
            for (i, f) in self.files.iter().enumerate() {
                for c in &f.classes {
                    for (name, &m) in &c.methods {
                        methods.entry(name.clone()).or_default().push(FnId {
                            file: i as u32,
                            func: m as u32,
                        });
                    }
                }
            }
            methods
        })
    }

    /// Number of functions in the program.
    pub fn fn_count(&self) -> usize {
        self.fn_base.last().map_or(0, |&b| b as usize)
            + self.files.last().map_or(0, |f| f.functions.len())
    }

    /// Dense index of a function (0..fn_count).
    pub fn dense(&self, id: FnId) -> usize {
        (self.fn_base[id.file as usize] + id.func) as usize
    }

    /// The function with dense index `i`.
    pub fn fn_id(&self, i: usize) -> FnId {
        let i = i as u32;
        let file = self.fn_base.partition_point(|&b| b <= i) - 1;
        // Skip files without functions that share the same base.
        let file = (0..=file)
            .rev()
            .find(|&f| i - self.fn_base[f] < self.files[f].functions.len() as u32)
            .unwrap_or(file);
        FnId {
            file: file as u32,
            func: i - self.fn_base[file],
        }
    }

    /// What each call site of the function with dense index `i` calls,
    /// resolved on first use. Passes ask only for the functions they reach
    /// (from coroutines, from calls made while holding a lock), so most of a
    /// large tree's calls are never resolved.
    pub fn callees_of(&self, i: usize) -> &[Callee] {
        self.callees[i].get_or_init(|| {
            let id = self.fn_id(i);
            let ctx = self.ctx(id);
            let calls = &self.function(id).calls;
            // The same callee text (`len`, `self._send`) recurs within a
            // function: resolve it once.
            let mut memo: FxHashMap<&PathRef, Callee> = FxHashMap::default();
            calls
                .iter()
                .map(|c| {
                    memo.entry(&c.callee)
                        .or_insert_with(|| self.callee(ctx, &c.callee))
                        .clone()
                })
                .collect()
        })
    }

    /// Every function reachable from `roots` through project calls for
    /// which `follow(call)` holds (the roots included), as a mask
    /// by dense index.
    pub fn reachable(
        &self,
        roots: impl IntoIterator<Item = usize>,
        follow: impl Fn(&CallFact) -> bool,
    ) -> Vec<bool> {
        let mut seen = vec![false; self.fn_count()];
        let mut stack: Vec<usize> = Vec::new();
        for r in roots {
            if !std::mem::replace(&mut seen[r], true) {
                stack.push(r);
            }
        }
        while let Some(i) = stack.pop() {
            let id = self.fn_id(i);
            let calls = &self.function(id).calls;
            for (c, callee) in calls.iter().zip(self.callees_of(i)) {
                if let Callee::Project(g) = callee
                    && follow(c)
                {
                    let d = self.dense(*g);
                    if !std::mem::replace(&mut seen[d], true) {
                        stack.push(d);
                    }
                }
            }
        }
        seen
    }

    pub fn function(&self, id: FnId) -> &FunctionFacts {
        &self.files[id.file as usize].functions[id.func as usize]
    }

    pub fn class(&self, id: ClassId) -> &ClassFacts {
        &self.files[id.class_file()].classes[id.class as usize]
    }

    pub fn functions(&self) -> impl Iterator<Item = (FnId, &FunctionFacts)> {
        self.files.iter().enumerate().flat_map(|(fi, f)| {
            f.functions.iter().enumerate().map(move |(i, func)| {
                (
                    FnId {
                        file: fi as u32,
                        func: i as u32,
                    },
                    func,
                )
            })
        })
    }

    pub fn ctx(&self, id: FnId) -> Ctx {
        Ctx {
            file: id.file,
            func: Some(id.func),
            class: self.function(id).class.map(|c| c as u32),
        }
    }

    /// A location in a function.
    pub fn location(&self, id: FnId, line: u32) -> Location {
        Location::new(
            self.files[id.file as usize].rel.clone(),
            self.function(id).qualname.clone(),
            line,
        )
    }

    /// A location at module level of a file.
    pub fn module_location(&self, file: u32, line: u32) -> Location {
        Location::new(self.files[file as usize].rel.clone(), "<module>", line)
    }

    /// Human name of a place: `pkg.mod.NAME`, `pkg.mod.Class.attr`.
    pub fn place_name(&self, p: &Place) -> String {
        match p {
            Place::Global(f, n) => format!("{}.{n}", self.files[*f as usize].module),
            Place::Attr(c, a) => format!(
                "{}.{}.{a}",
                self.files[c.class_file()].module,
                self.class(*c).qualname
            ),
            Place::Syntactic(s) => s.clone(),
        }
    }

    /// Resolves `path` as seen from `ctx`.
    pub fn resolve(&self, ctx: Ctx, path: &PathRef) -> Resolved {
        self.resolve_depth(ctx, path, 0)
    }

    fn resolve_depth(&self, ctx: Ctx, path: &PathRef, depth: u32) -> Resolved {
        if depth > MAX_DEPTH {
            return Resolved::UNKNOWN;
        }
        let mut r = match &path.root {
            Root::Name(n) => self.resolve_name(ctx, n, depth),
            Root::SelfObj => match ctx.class {
                Some(c) => Resolved::ty(Ty::Instance(ClassId {
                    file: ctx.file,
                    class: c,
                })),
                None => Resolved::UNKNOWN,
            },
            Root::Instance(p) => {
                let inner = self.resolve_depth(ctx, p, depth + 1);
                Resolved::ty(self.instance_of(&inner.ty, depth))
            }
            Root::Local(_) => Resolved::UNKNOWN,
        };
        for a in &path.attrs {
            r = self.step(&r, a, depth + 1);
        }
        r
    }

    fn resolve_name(&self, ctx: Ctx, n: &str, depth: u32) -> Resolved {
        let file = &self.files[ctx.file as usize];
        let mut func = ctx.func;
        while let Some(fi) = func {
            let f = &file.functions[fi as usize];
            if let Some(&d) = f.local_defs.get(n) {
                return Resolved::ty(Ty::Function(FnId {
                    file: ctx.file,
                    func: d as u32,
                }));
            }
            func = f.parent.map(|p| p as u32);
        }
        self.lookup(ctx.file, n, depth)
            .unwrap_or_else(|| Resolved::ty(Ty::Ext(n.to_owned())))
    }

    /// A name in a module's global scope.
    pub fn lookup(&self, file: u32, n: &str, depth: u32) -> Option<Resolved> {
        if depth > MAX_DEPTH {
            return None;
        }
        let facts = &self.files[file as usize];
        let scope = &facts.scope;
        if let Some(&f) = scope.functions.get(n) {
            return Some(Resolved::ty(Ty::Function(FnId {
                file,
                func: f as u32,
            })));
        }
        if let Some(&c) = scope.classes.get(n) {
            return Some(Resolved::ty(Ty::Class(ClassId {
                file,
                class: c as u32,
            })));
        }
        if let Some(g) = scope.globals.get(n) {
            let ctx = Ctx {
                file,
                func: None,
                class: None,
            };
            let mut r = self.value(ctx, &g.value, depth + 1);
            if r.place.is_none() {
                r.place = Some(Place::Global(file, n.to_owned()));
            }
            return Some(r);
        }
        if let Some(b) = scope.imports.get(n) {
            return Some(self.binding(b, depth + 1));
        }
        if facts.is_package
            && let Some(&m) = self.modules.get(&format!("{}.{n}", facts.module))
        {
            return Some(Resolved::ty(Ty::Module(m)));
        }
        None
    }

    fn binding(&self, b: &Binding, depth: u32) -> Resolved {
        match b {
            Binding::Module(m) => match self.modules.get(m) {
                Some(&i) => Resolved::ty(Ty::Module(i)),
                None => Resolved::ty(Ty::Ext(m.clone())),
            },
            Binding::From { module, name } => {
                let full = format!("{module}.{name}");
                if let Some(&i) = self.modules.get(&full) {
                    return Resolved::ty(Ty::Module(i));
                }
                match self.modules.get(module) {
                    Some(&m) => self.lookup(m, name, depth + 1).unwrap_or(Resolved::UNKNOWN),
                    None => Resolved::ty(Ty::Ext(full)),
                }
            }
        }
    }

    /// What an assigned value resolves to. A `Condition(lock)` is its lock.
    fn value(&self, ctx: Ctx, v: &Value, depth: u32) -> Resolved {
        match v {
            Value::Alias(p) => self.resolve_depth(ctx, p, depth + 1),
            Value::Call {
                func, first_arg, ..
            } => {
                let f = self.resolve_depth(ctx, func, depth + 1);
                if let (Ty::Ext(q), Some(arg)) = (&f.ty, first_arg)
                    && matches!(
                        q.as_str(),
                        "threading.Condition" | "asyncio.Condition" | "multiprocessing.Condition"
                    )
                {
                    let lock = self.resolve_depth(ctx, arg, depth + 1);
                    if lock.place.is_some() {
                        return lock;
                    }
                }
                Resolved::ty(self.instance_of(&f.ty, depth))
            }
            Value::Container(_) | Value::Other => Resolved::UNKNOWN,
        }
    }

    fn instance_of(&self, ty: &Ty, depth: u32) -> Ty {
        match ty {
            Ty::Class(c) => Ty::Instance(*c),
            Ty::Ext(q) => Ty::ExtInstance(q.clone()),
            Ty::Function(f) => {
                let func = self.function(*f);
                match &func.returns {
                    Some(ret) if depth < MAX_DEPTH => {
                        let ctx = Ctx {
                            file: f.file,
                            func: None,
                            class: None,
                        };
                        let r = self.resolve_depth(ctx, ret, depth + 1);
                        match r.ty {
                            Ty::Class(c) => Ty::Instance(c),
                            Ty::Ext(q) => Ty::ExtInstance(q),
                            _ => Ty::Unknown,
                        }
                    }
                    _ => Ty::Unknown,
                }
            }
            _ => Ty::Unknown,
        }
    }

    fn step(&self, r: &Resolved, a: &str, depth: u32) -> Resolved {
        if depth > MAX_DEPTH {
            return Resolved::UNKNOWN;
        }
        match &r.ty {
            Ty::Module(m) => {
                if let Some(x) = self.lookup(*m, a, depth + 1) {
                    return x;
                }
                let sub = format!("{}.{a}", self.files[*m as usize].module);
                match self.modules.get(&sub) {
                    Some(&i) => Resolved::ty(Ty::Module(i)),
                    None => Resolved {
                        place: Some(Place::Global(*m, a.to_owned())),
                        ty: Ty::Unknown,
                    },
                }
            }
            Ty::Class(c) | Ty::Instance(c) => {
                if let Some(f) = self.method(*c, a, depth) {
                    return Resolved::ty(Ty::Function(f));
                }
                match self.attr(*c, a, depth) {
                    Some((owner, attr)) => {
                        let ctx = Ctx {
                            file: owner.file,
                            func: attr.in_function.map(|f| f as u32),
                            class: Some(owner.class),
                        };
                        let mut v = self.value(ctx, &attr.value, depth + 1);
                        if v.place.is_none() {
                            v.place = Some(Place::Attr(owner, a.to_owned()));
                        }
                        v
                    }
                    None => Resolved {
                        place: Some(Place::Attr(*c, a.to_owned())),
                        ty: Ty::Unknown,
                    },
                }
            }
            Ty::Ext(q) | Ty::ExtInstance(q) => Resolved::ty(Ty::Ext(format!("{q}.{a}"))),
            Ty::Function(_) | Ty::Unknown => Resolved::UNKNOWN,
        }
    }

    /// Method `a` of class `c` or its project bases.
    pub fn method(&self, c: ClassId, a: &str, depth: u32) -> Option<FnId> {
        let class = self.class(c);
        if let Some(&f) = class.methods.get(a) {
            return Some(FnId {
                file: c.file,
                func: f as u32,
            });
        }
        if class.bases.is_empty() {
            return None;
        }
        self.mro(c, depth).iter().find_map(|&k| {
            self.class(k).methods.get(a).map(|&f| FnId {
                file: k.file,
                func: f as u32,
            })
        })
    }

    fn attr(&self, c: ClassId, a: &str, depth: u32) -> Option<(ClassId, &Attr)> {
        let class = self.class(c);
        if let Some(x) = class.attrs.get(a) {
            return Some((c, x));
        }
        if class.bases.is_empty() {
            return None;
        }
        self.mro(c, depth)
            .iter()
            .find_map(|&k| self.class(k).attrs.get(a).map(|x| (k, x)))
    }

    /// The class and its project base classes, depth first.
    pub fn mro(&self, c: ClassId, depth: u32) -> std::borrow::Cow<'_, [ClassId]> {
        let cell = &self.mros[(self.class_base[c.file as usize] + c.class) as usize];
        if let Some(mro) = cell.get() {
            return std::borrow::Cow::Borrowed(mro);
        }
        let mro = self.mro_uncached(c, depth);
        // Kept only when the depth bound cannot have cut the bases short
        // (a lookup nested that deep is not the class's MRO). Not
        // `get_or_init`: resolving the bases may ask for other classes'
        // MROs, or, in a cycle, for this one.
        if depth <= MRO_CACHE_DEPTH {
            let _ = cell.set(mro.clone());
        }
        std::borrow::Cow::Owned(mro)
    }

    fn mro_uncached(&self, c: ClassId, depth: u32) -> Vec<ClassId> {
        let mut out = vec![c];
        let mut i = 0;
        while i < out.len() && out.len() < 16 && depth < MAX_DEPTH {
            let k = out[i];
            let ctx = Ctx {
                file: k.file,
                func: None,
                class: None,
            };
            for b in &self.class(k).bases {
                if let Ty::Class(bc) = self.resolve_depth(ctx, b, depth + 1).ty
                    && !out.contains(&bc)
                {
                    out.push(bc);
                }
            }
            i += 1;
        }
        out
    }

    /// The function a call reaches: a function, a method, or a class's
    /// `__init__`.
    pub fn callee(&self, ctx: Ctx, callee: &PathRef) -> Callee {
        let r = self.resolve(ctx, callee);
        match r.ty {
            Ty::Function(f) => Callee::Project(f),
            Ty::Class(c) => match self.method(c, "__init__", 0) {
                Some(f) => Callee::Project(f),
                None => Callee::Unknown,
            },
            Ty::Ext(q) => Callee::External(q.into()),
            Ty::Unknown => self.unique_method(callee),
            _ => Callee::Unknown,
        }
    }

    /// `obj.m()` on an object of unknown type (an unannotated parameter):
    /// the project method `m` when exactly one project class defines it.
    fn unique_method(&self, callee: &PathRef) -> Callee {
        let name = callee.last();
        if callee.attrs.is_empty() || name.starts_with("__") {
            return Callee::Unknown;
        }
        if !matches!(callee.root, Root::Local(_) | Root::SelfObj) {
            return Callee::Unknown;
        }
        match self.methods().get(name).map(Vec::as_slice) {
            Some([only]) => Callee::Project(*only),
            _ => Callee::Unknown,
        }
    }
}

impl ClassId {
    fn class_file(&self) -> usize {
        self.file as usize
    }
}

/// What a call site calls.
#[derive(Clone, Debug, PartialEq)]
pub enum Callee {
    Project(FnId),
    /// A qualified name outside the project (shared: the same name recurs).
    External(std::sync::Arc<str>),
    Unknown,
}

/// The kind of synchronisation object a type is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LockFlavor {
    /// `threading.Lock`, semaphores: not reentrant.
    Plain,
    /// `threading.RLock`, `Condition()` (RLock by default).
    Reentrant,
    /// `asyncio.Lock` and friends: only block the coroutine.
    Async,
}

/// Lock types by qualified name.
pub fn lock_flavor(q: &str) -> Option<LockFlavor> {
    Some(match q {
        "threading.Lock"
        | "threading.Semaphore"
        | "threading.BoundedSemaphore"
        | "_thread.allocate_lock"
        | "_thread.LockType"
        | "thread.allocate_lock"
        | "multiprocessing.Lock"
        | "multiprocessing.Semaphore"
        | "multiprocessing.BoundedSemaphore"
        | "multiprocessing.synchronize.Lock" => LockFlavor::Plain,
        "threading.RLock"
        | "threading.Condition"
        | "_thread.RLock"
        | "multiprocessing.RLock"
        | "multiprocessing.Condition"
        | "multiprocessing.synchronize.RLock" => LockFlavor::Reentrant,
        "asyncio.Lock" | "asyncio.Semaphore" | "asyncio.BoundedSemaphore" | "asyncio.Condition" => {
            LockFlavor::Async
        }
        _ => return None,
    })
}
