//! Detaching a file's facts from its syntax tree before the tree's arena
//! is reused.
//!
//! A parser [`Name`] longer than 16 bytes is a shared, reference-counted
//! buffer, and cloning it into the facts shares the buffer, which lives in
//! the parse arena ([`crate::arena`]) with the rest of the tree. Each such
//! name is copied out here. Inline names and every `String` in the facts
//! are already independent of the tree.
//!
//! Every impl destructures its type without `..`: a field added to a fact
//! does not compile until it is handled here.

use crate::facts::*;

/// Copies every name of `self` that `shared` says lives in the arena.
pub(crate) trait Detach {
    fn detach(&mut self, shared: &impl Fn(&Name) -> bool);
}

impl Detach for Name {
    fn detach(&mut self, shared: &impl Fn(&Name) -> bool) {
        if shared(self) {
            *self = Name::new_heap(self.as_str());
        }
    }
}

impl<T: Detach> Detach for Vec<T> {
    fn detach(&mut self, shared: &impl Fn(&Name) -> bool) {
        self.iter_mut().for_each(|t| t.detach(shared));
    }
}

impl<T: Detach> Detach for Option<T> {
    fn detach(&mut self, shared: &impl Fn(&Name) -> bool) {
        if let Some(t) = self {
            t.detach(shared);
        }
    }
}

impl<T: Detach> Detach for Box<T> {
    fn detach(&mut self, shared: &impl Fn(&Name) -> bool) {
        (**self).detach(shared);
    }
}

impl<A: Detach, B> Detach for (A, B) {
    fn detach(&mut self, shared: &impl Fn(&Name) -> bool) {
        self.0.detach(shared);
    }
}

impl<V: Detach> Detach for NameMap<V> {
    fn detach(&mut self, shared: &impl Fn(&Name) -> bool) {
        self.for_each_mut(|k, v| {
            k.detach(shared);
            v.detach(shared);
        });
    }
}

/// Values without names.
macro_rules! nothing_to_detach {
    ($($t:ty),*) => {$(
        impl Detach for $t {
            fn detach(&mut self, _: &impl Fn(&Name) -> bool) {}
        }
    )*};
}
nothing_to_detach!(usize, Binding);

impl Detach for PathRef {
    fn detach(&mut self, shared: &impl Fn(&Name) -> bool) {
        let PathRef { root, attrs } = self;
        match root {
            Root::Name(n) | Root::Local(n) => n.detach(shared),
            Root::SelfObj => {}
            Root::Instance(p) => p.detach(shared),
        }
        attrs.detach(shared);
    }
}

impl Detach for Value {
    fn detach(&mut self, shared: &impl Fn(&Name) -> bool) {
        match self {
            Value::Call {
                func,
                first_arg,
                bounded: _,
            } => {
                func.detach(shared);
                first_arg.detach(shared);
            }
            Value::Alias(p) => p.detach(shared),
            Value::Container(_) | Value::Other => {}
        }
    }
}

impl Detach for Global {
    fn detach(&mut self, shared: &impl Fn(&Name) -> bool) {
        let Global { value, line: _ } = self;
        value.detach(shared);
    }
}

impl Detach for Attr {
    fn detach(&mut self, shared: &impl Fn(&Name) -> bool) {
        let Attr {
            value,
            line: _,
            class_level: _,
            in_function: _,
        } = self;
        value.detach(shared);
    }
}

impl Detach for AcquireFact {
    fn detach(&mut self, shared: &impl Fn(&Name) -> bool) {
        let AcquireFact {
            lock,
            line: _,
            via: _,
            held: _,
        } = self;
        lock.detach(shared);
    }
}

impl Detach for CallFact {
    fn detach(&mut self, shared: &impl Fn(&Name) -> bool) {
        let CallFact {
            callee,
            line: _,
            start: _,
            end: _,
            held: _,
            awaited: _,
        } = self;
        callee.detach(shared);
    }
}

impl Detach for ClassFacts {
    fn detach(&mut self, shared: &impl Fn(&Name) -> bool) {
        let ClassFacts {
            name: _,
            qualname: _,
            line: _,
            bases,
            methods,
            attrs,
        } = self;
        bases.detach(shared);
        methods.detach(shared);
        attrs.detach(shared);
    }
}

impl Detach for FunctionFacts {
    fn detach(&mut self, shared: &impl Fn(&Name) -> bool) {
        let FunctionFacts {
            name,
            qualname: _,
            class: _,
            parent: _,
            is_async: _,
            line: _,
            end_line: _,
            params,
            consumes: _,
            returns,
            decorators,
            local_defs,
            acquires,
            calls,
            unbounded_cache: _,
        } = self;
        name.detach(shared);
        params.detach(shared);
        returns.detach(shared);
        decorators.detach(shared);
        local_defs.detach(shared);
        acquires.detach(shared);
        calls.detach(shared);
    }
}

impl Detach for ContainerOp {
    fn detach(&mut self, shared: &impl Fn(&Name) -> bool) {
        let ContainerOp {
            target,
            op: _,
            line: _,
            function: _,
        } = self;
        target.detach(shared);
    }
}

impl Detach for LeakFact {
    fn detach(&mut self, shared: &impl Fn(&Name) -> bool) {
        let LeakFact {
            function: _,
            var: _,
            kind: _,
            acquired_by: _,
            line: _,
            exits: _,
            released_elsewhere: _,
            passed_to,
        } = self;
        passed_to.detach(shared);
    }
}

impl Detach for ModuleScope {
    fn detach(&mut self, shared: &impl Fn(&Name) -> bool) {
        let ModuleScope {
            functions,
            classes,
            globals,
            imports,
        } = self;
        functions.detach(shared);
        classes.detach(shared);
        globals.detach(shared);
        imports.detach(shared);
    }
}

impl Detach for FileFacts {
    fn detach(&mut self, shared: &impl Fn(&Name) -> bool) {
        let FileFacts {
            rel: _,
            module: _,
            is_package: _,
            lines: _,
            syntax_errors: _,
            imports: _,
            scope,
            classes,
            functions,
            container_ops,
            leaks,
        } = self;
        scope.detach(shared);
        classes.detach(shared);
        functions.detach(shared);
        container_ops.detach(shared);
        leaks.detach(shared);
    }
}
