//! The parse arena changes nothing but speed: the same facts and findings
//! with it as without it. Test builds fill a slot with a poison pattern as
//! soon as its tree is thrown away, so a fact still sharing memory with a
//! tree (a long name) reads garbage and the comparison fails.

use std::path::Path;

use pymedic_analyze::arena::{self, ParseArena};

#[global_allocator]
static ALLOCATOR: ParseArena<std::alloc::System> = ParseArena(std::alloc::System);

/// Long names (shared, heap-allocated by the parser) in every position the
/// facts keep one: imports, classes, bases, methods, attributes, locks,
/// calls, decorators, parameters, containers, leaks.
const LONG_NAMES: &str = r#"
import threading_helpers_with_a_long_module_name as helpers_module_alias_long
from collections_with_a_long_name import defaultdict_factory_with_long_name

registry_of_every_long_lived_connection = {}
global_lock_protecting_the_registry_state = threading.Lock()

def decorator_with_a_really_long_name(function_being_decorated_here):
    return function_being_decorated_here

class ConnectionPoolWithAVeryLongName(BaseConnectionPoolWithLongName):
    class_level_cache_of_connections_by_key = {}

    def __init__(self, maximum_number_of_connections):
        self.lock_guarding_the_connection_pool = threading.Lock()
        self.second_lock_guarding_the_statistics = threading.RLock()
        self.connections_waiting_to_be_reused = []

    @decorator_with_a_really_long_name
    def acquire_connection_from_the_pool(self, connection_key_argument):
        with self.lock_guarding_the_connection_pool:
            with self.second_lock_guarding_the_statistics:
                self.connections_waiting_to_be_reused.append(connection_key_argument)
                registry_of_every_long_lived_connection[connection_key_argument] = 1
                return helpers_module_alias_long.create_connection_now(connection_key_argument)

    def release_statistics_then_the_pool_lock(self):
        with self.second_lock_guarding_the_statistics:
            with self.lock_guarding_the_connection_pool:
                ConnectionPoolWithAVeryLongName.class_level_cache_of_connections_by_key[1] = 2

def function_that_leaks_a_file_descriptor(path_of_the_file_to_read):
    file_object_that_is_never_closed = open(path_of_the_file_to_read)
    if file_object_that_is_never_closed.readable():
        return None
    file_object_that_is_never_closed.close()

async def coroutine_that_blocks_the_event_loop():
    time.sleep(1)
"#;

fn analysis_text(root: &Path) -> String {
    let a = pymedic_analyze::analyze(root, &Default::default()).expect("analyze");
    let findings = serde_json::to_value(&a.findings).expect("findings as JSON");
    let findings: Vec<_> = findings
        .as_array()
        .expect("an array")
        .iter()
        .map(|f| {
            let mut f = f.clone();
            f.as_object_mut().map(|o| {
                o.remove("first_seen");
                o.remove("last_seen")
            });
            f
        })
        .collect();
    format!("{:#?}\n{findings:#?}", a.program.files)
}

#[test]
fn facts_and_findings_are_the_same_with_and_without_the_parse_arena() {
    let dir = std::env::temp_dir().join(format!("pymedic-arena-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("long_names_everywhere.py"), LONG_NAMES).unwrap();
    // The project's own test programs, and a standard library when there
    // is one: thousands of long names in every kind of statement.
    let tests = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/scripts");
    let stdlib = Path::new("/usr/lib/python3.11");
    let mut roots = vec![dir.clone(), tests];
    if stdlib.is_dir() {
        roots.push(stdlib.to_path_buf());
    }
    for root in roots {
        arena::set_enabled(false);
        let before = arena::trees_thrown_away();
        let normal = analysis_text(&root);
        assert_eq!(arena::trees_thrown_away(), before, "arena off, yet used");
        arena::set_enabled(true);
        let in_arena = analysis_text(&root);
        assert!(
            arena::trees_thrown_away() > before,
            "{}: no tree came from the arena",
            root.display()
        );
        if normal != in_arena {
            let line = normal
                .lines()
                .zip(in_arena.lines())
                .position(|(a, b)| a != b)
                .unwrap_or(0);
            panic!(
                "{}: the analysis differs with the arena, from line {line}:\n{}\nvs\n{}",
                root.display(),
                normal
                    .lines()
                    .skip(line)
                    .take(5)
                    .collect::<Vec<_>>()
                    .join("\n"),
                in_arena
                    .lines()
                    .skip(line)
                    .take(5)
                    .collect::<Vec<_>>()
                    .join("\n"),
            );
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}
