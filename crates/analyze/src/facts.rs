//! What one file says, reduced to facts the whole-program passes need. A
//! worker parses a file, extracts its facts and drops the syntax tree, so a
//! large tree is analysed in bounded memory.

pub use crate::name_map::NameMap;

/// An identifier as the parser interned it: short names inline, long ones
/// shared (and copied out of the parse arena when a file's facts are
/// detached from its tree: [`crate::detach`]).
pub use ruff_python_ast::name::Name;

/// A reference as written in the source, with locals substituted: `self._lock`,
/// `store.put` (where `store = Store()`), `threading.Lock`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PathRef {
    pub root: Root,
    pub attrs: Vec<Name>,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Root {
    /// A name looked up in the enclosing function's scope chain, then the module.
    Name(Name),
    /// The method's `self` (or `cls`).
    SelfObj,
    /// The value returned by calling the inner reference (`Foo()`), or a
    /// parameter annotated with it.
    Instance(Box<PathRef>),
    /// A function-local value we know nothing about (shadows module names).
    Local(Name),
}

impl PathRef {
    pub fn name(n: impl Into<Name>) -> PathRef {
        PathRef {
            root: Root::Name(n.into()),
            attrs: Vec::new(),
        }
    }

    /// The last segment: the attribute or the name.
    pub fn last(&self) -> &str {
        match (self.attrs.last(), &self.root) {
            (Some(a), _) => a,
            (None, Root::Name(n) | Root::Local(n)) => n,
            (None, Root::SelfObj) => "self",
            (None, Root::Instance(p)) => p.last(),
        }
    }

    /// Source-like text, for messages.
    pub fn text(&self) -> String {
        let mut s = match &self.root {
            Root::Name(n) | Root::Local(n) => n.to_string(),
            Root::SelfObj => "self".to_owned(),
            Root::Instance(p) => format!("{}()", p.text()),
        };
        for a in &self.attrs {
            s.push('.');
            s.push_str(a);
        }
        s
    }

    pub fn with_attr(&self, a: &str) -> PathRef {
        let mut attrs = Vec::with_capacity(self.attrs.len() + 1);
        attrs.extend_from_slice(&self.attrs);
        attrs.push(Name::new(a));
        PathRef {
            root: self.root.clone(),
            attrs,
        }
    }
}

/// What a name or attribute was assigned.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    /// `x = f(...)`: an instance of / result of `func`. `first_arg` is kept
    /// for `Condition(lock)`; `maxlen`-like bounds are in `bounded`.
    Call {
        func: PathRef,
        first_arg: Option<PathRef>,
        bounded: bool,
    },
    /// `x = other.path`
    Alias(PathRef),
    /// `x = {}` / `[]` / `set()` literal containers.
    Container(ContainerKind),
    Other,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ContainerKind {
    Dict,
    List,
    Set,
}

impl ContainerKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ContainerKind::Dict => "dict",
            ContainerKind::List => "list",
            ContainerKind::Set => "set",
        }
    }
}

/// One `import` / `from ... import` statement.
#[derive(Clone, Debug)]
pub struct ImportFact {
    /// Absolute dotted module the statement names (relative imports already
    /// resolved against the importing module's package).
    pub module: String,
    /// For `from M import a, b`: the imported names (a may be a submodule).
    pub names: Vec<String>,
    pub line: u32,
    /// Inside a function or `if TYPE_CHECKING:`: not run at import time.
    pub deferred: bool,
}

/// A name bound by an import at module level (or in a function).
#[derive(Clone, Debug, PartialEq)]
pub enum Binding {
    /// `import a.b as x` → x is module `a.b`; `import a.b` binds `a`.
    Module(String),
    /// `from m import n as x` → x is `m.n` (a member or a submodule).
    From { module: String, name: String },
}

/// A module-level (or class-level) assignment.
#[derive(Clone, Debug)]
pub struct Global {
    pub value: Value,
    pub line: u32,
}

#[derive(Clone, Debug, Default)]
pub struct ModuleScope {
    pub functions: NameMap<usize>,
    pub classes: NameMap<usize>,
    pub globals: NameMap<Global>,
    pub imports: NameMap<Binding>,
}

#[derive(Clone, Debug)]
pub struct ClassFacts {
    pub name: String,
    pub qualname: String,
    pub line: u32,
    pub bases: Vec<PathRef>,
    pub methods: NameMap<usize>,
    /// Class-body assignments and `self.x = ...` in methods (first wins).
    pub attrs: NameMap<Attr>,
}

#[derive(Clone, Debug)]
pub struct Attr {
    pub value: Value,
    pub line: u32,
    /// Assigned in the class body (shared by every instance) rather than on `self`.
    pub class_level: bool,
    /// Function where a `self.x = ...` assignment happened.
    pub in_function: Option<usize>,
}

/// How a lock-like object was taken.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AcquireVia {
    With,
    AsyncWith,
    Acquire,
}

/// `with X:` or `X.acquire()`: a possible lock acquisition (whether X is a
/// lock is decided when the whole program is known).
#[derive(Clone, Debug)]
pub struct AcquireFact {
    pub lock: PathRef,
    pub line: u32,
    pub via: AcquireVia,
    /// Indices (into the function's `acquires`) held at this point.
    pub held: Vec<u32>,
}

/// A call site.
#[derive(Clone, Debug)]
pub struct CallFact {
    pub callee: PathRef,
    pub line: u32,
    /// Byte range of the whole call expression (for repairs).
    pub start: u32,
    pub end: u32,
    pub held: Vec<u32>,
    pub awaited: bool,
}

#[derive(Clone, Debug)]
pub struct FunctionFacts {
    pub name: Name,
    /// `Class.method`, `outer.<locals>.inner`.
    pub qualname: String,
    pub class: Option<usize>,
    /// Enclosing function for nested definitions.
    pub parent: Option<usize>,
    pub is_async: bool,
    pub line: u32,
    pub end_line: u32,
    pub params: Vec<Name>,
    /// Per parameter: the function closes, stores, returns or hands it on.
    pub consumes: Vec<bool>,
    pub returns: Option<Box<PathRef>>,
    pub decorators: Vec<PathRef>,
    /// Nested `def`s by name.
    pub local_defs: NameMap<usize>,
    pub acquires: Vec<AcquireFact>,
    pub calls: Vec<CallFact>,
    /// Decorated with `functools.cache` / `lru_cache(maxsize=None)`.
    pub unbounded_cache: Option<u32>,
}

/// Something done to a long-lived container inside a function.
#[derive(Clone, Debug)]
pub struct ContainerOp {
    pub target: PathRef,
    pub op: OpKind,
    pub line: u32,
    pub function: usize,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OpKind {
    /// `x[k] = v` with a computed key, `append`, `add`, `setdefault`, ...
    Add,
    /// `del x[k]`, `pop`, `remove`, `discard`, `clear`, reassignment.
    Remove,
    /// `len(x)` compared with something: a size check.
    Bound,
}

/// A local resource not released on every path (computed per function, see
/// `leaks`).
#[derive(Clone, Debug)]
pub struct LeakFact {
    pub function: usize,
    pub var: String,
    pub kind: ResourceKind,
    /// Qualified acquiring call (`open`, `socket.socket`, `os.open`, `lock.acquire`).
    pub acquired_by: String,
    pub line: u32,
    pub exits: Vec<LeakExit>,
    /// The function releases it on some other path.
    pub released_elsewhere: bool,
    /// Calls the resource was handed to; the leak is dropped if one of them
    /// is a project function that consumes that parameter.
    pub passed_to: Vec<(PathRef, usize)>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LeakExit {
    pub kind: ExitKind,
    pub line: u32,
    /// A `break` the path went through before leaving.
    pub via_break: Option<u32>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum ExitKind {
    Return,
    Raise,
    Break,
    Continue,
    /// The loop body ends and the next iteration rebinds the variable.
    NextIteration,
    /// The variable is rebound while the resource is open.
    Overwritten,
    /// Falls off the end of the function.
    End,
    /// An exception from a call propagates out of the function.
    Exception,
}

impl ExitKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ExitKind::Return => "return",
            ExitKind::Raise => "raise",
            ExitKind::Break => "break",
            ExitKind::Continue => "continue",
            ExitKind::NextIteration => "next loop iteration",
            ExitKind::Overwritten => "rebinding",
            ExitKind::End => "end of function",
            ExitKind::Exception => "exception",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum ResourceKind {
    File,
    Socket,
    RawFd,
    Lock,
    Process,
    Connection,
    Pool,
    Other,
}

impl ResourceKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ResourceKind::File => "file",
            ResourceKind::Socket => "socket",
            ResourceKind::RawFd => "file descriptor",
            ResourceKind::Lock => "lock",
            ResourceKind::Process => "process",
            ResourceKind::Connection => "connection",
            ResourceKind::Pool => "pool",
            ResourceKind::Other => "resource",
        }
    }

    /// Whether leaking it leaks a file descriptor.
    pub fn is_fd(self) -> bool {
        matches!(
            self,
            ResourceKind::File
                | ResourceKind::Socket
                | ResourceKind::RawFd
                | ResourceKind::Connection
        )
    }
}

#[derive(Clone, Debug)]
pub struct SyntaxErrorFact {
    pub line: u32,
    pub message: String,
}

/// Everything the whole-program passes need from one file.
#[derive(Clone, Debug)]
pub struct FileFacts {
    pub rel: String,
    pub module: String,
    pub is_package: bool,
    pub lines: u32,
    pub syntax_errors: Vec<SyntaxErrorFact>,
    pub imports: Vec<ImportFact>,
    pub scope: ModuleScope,
    pub classes: Vec<ClassFacts>,
    pub functions: Vec<FunctionFacts>,
    pub container_ops: Vec<ContainerOp>,
    pub leaks: Vec<LeakFact>,
}
