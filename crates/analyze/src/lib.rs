//! The structural layer: static understanding of a Python source tree.
//!
//! [`analyze`] parses every `.py` file under a root in parallel
//! (`ruff_python_parser`, tolerating syntax errors), reduces each to
//! [`facts`], then runs whole-program passes over them:
//!
//! * [`imports`]: the module/import graph, import cycles, impact of a change;
//! * [`locks`]: lock order across calls (`lock_order_inversion`);
//! * [`leaks`]: resources not released on every path (`fd_leak`, `resource_leak`);
//! * [`blocking`]: blocking calls inside `async def` (`blocked_event_loop`);
//! * [`containers`]: long-lived containers that only grow (`memory_leak`).
//!
//! Every result is a [`pymedic_model::Finding`] with layer `structural`
//! (syntax errors: `surface`), `target: None`, and exact sites in `related`.
//! [`enrich`] explains a runtime finding from the same analysis.

pub mod arena;
pub mod blocking;
pub mod containers;
mod detach;
mod driver;
pub mod enrich;
mod error;
mod extract;
pub mod facts;
pub mod imports;
pub mod leaks;
pub mod locks;
mod name_map;
mod report;
pub mod source;
pub mod symbols;

pub use driver::{Analysis, Options, ParseOnly, analyze, analyze_files, parse_only};
pub use enrich::{Enricher, enrich};
pub use error::AnalyzeError;
pub use imports::{Impact, ImportGraph};
pub use report::fingerprint;
