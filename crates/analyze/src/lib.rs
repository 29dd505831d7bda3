//! The structural layer (work in progress).

/// Parses `source` and returns the number of top-level statements and errors.
pub fn parse_counts(source: &str) -> (usize, usize) {
    let parsed = ruff_python_parser::parse_unchecked_source(
        source,
        ruff_python_ast::PySourceType::Python,
    );
    (parsed.syntax().body.len(), parsed.errors().len())
}
