//! Evaluating a lock expression (`self._lock`, `module.lock`, `locks[i]`,
//! `self.pool.locks["db"]`) inside a frame of the target, from memory: names
//! through fast locals, cells and free variables, globals and builtins;
//! attributes through instance dicts and the class MRO; subscripts of
//! dicts, lists and tuples by constant or local index. Nothing is called.

use pymedic_python::{Frame, Interpreter, ProcessMemory};
use ruff_python_ast::{Expr, Number};

/// Depth limit for nested attribute/subscript chains.
const MAX_DEPTH: u32 = 8;

/// The object `expr` denotes in `frame`, or `None` when it cannot be told.
pub fn eval<M: ProcessMemory>(interp: &Interpreter<M>, frame: &Frame, expr: &Expr) -> Option<u64> {
    eval_depth(interp, frame, expr, MAX_DEPTH)
}

fn eval_depth<M: ProcessMemory>(
    interp: &Interpreter<M>,
    frame: &Frame,
    expr: &Expr,
    depth: u32,
) -> Option<u64> {
    if depth == 0 {
        return None;
    }
    match expr {
        Expr::Name(n) => interp.lookup_name(frame, n.id.as_str()).ok().flatten(),
        Expr::Attribute(a) => {
            let base = eval_depth(interp, frame, &a.value, depth - 1)?;
            interp.getattr(base, a.attr.as_str()).ok().flatten()
        }
        Expr::Subscript(s) => {
            let base = eval_depth(interp, frame, &s.value, depth - 1)?;
            let key = key_of(interp, frame, &s.slice, depth - 1)?;
            subscript(interp, base, &key)
        }
        _ => None,
    }
}

/// A subscript key.
enum Key {
    Int(i128),
    Str(String),
}

fn key_of<M: ProcessMemory>(
    interp: &Interpreter<M>,
    frame: &Frame,
    expr: &Expr,
    depth: u32,
) -> Option<Key> {
    match expr {
        Expr::NumberLiteral(n) => match &n.value {
            Number::Int(i) => i.as_i64().map(|v| Key::Int(v.into())),
            _ => None,
        },
        Expr::StringLiteral(s) => Some(Key::Str(s.value.to_str().to_owned())),
        Expr::UnaryOp(u) if matches!(u.op, ruff_python_ast::UnaryOp::USub) => {
            match key_of(interp, frame, &u.operand, depth)? {
                Key::Int(v) => Some(Key::Int(-v)),
                Key::Str(_) => None,
            }
        }
        _ => {
            let obj = eval_depth(interp, frame, expr, depth)?;
            match interp.type_name(obj).ok()?.as_str() {
                "int" => interp.read_int(obj).ok().flatten().map(Key::Int),
                "str" => interp.read_str(obj).ok().map(Key::Str),
                _ => None,
            }
        }
    }
}

fn subscript<M: ProcessMemory>(interp: &Interpreter<M>, base: u64, key: &Key) -> Option<u64> {
    let ty = interp.type_name(base).ok()?;
    match (ty.as_str(), key) {
        ("dict", Key::Str(k)) => interp.dict_get_str(base, k).ok().flatten(),
        ("dict", Key::Int(k)) => interp
            .dict_entries(base, pymedic_python::objects::MAX_ITEMS)
            .ok()?
            .into_iter()
            .find(|&(key, _)| {
                interp.type_name(key).is_ok_and(|t| t == "int")
                    && interp.read_int(key).ok().flatten() == Some(*k)
            })
            .map(|(_, v)| v),
        ("list" | "tuple", Key::Int(i)) => {
            let items = if ty == "list" {
                interp
                    .list_items(base, pymedic_python::objects::MAX_ITEMS)
                    .ok()?
            } else {
                interp
                    .tuple_items(base, pymedic_python::objects::MAX_ITEMS)
                    .ok()?
            };
            let n = items.len() as i128;
            let idx = if *i < 0 { n + i } else { *i };
            (0..n).contains(&idx).then(|| items[idx as usize])
        }
        _ => None,
    }
}
