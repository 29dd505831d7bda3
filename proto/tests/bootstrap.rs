//! Regenerates `src/generated/` from `pymedic/v1/*.proto` and fails when the
//! result differs from what is committed (the files are rewritten, so after a
//! failure `git diff` shows the change and committing it fixes the test).
//! Needs `protoc` and the well-known protos (Debian `protobuf-compiler`,
//! `libprotobuf-dev`); users of the crate need neither.

use std::path::{Path, PathBuf};

const PROTOS: &[&str] = &[
    "pymedic/v1/finding.proto",
    "pymedic/v1/capture.proto",
    "pymedic/v1/diagnostics.proto",
];

fn snapshot(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .map(|e| e.path())
                .filter(|p| p.is_file())
                .map(|p| {
                    let bytes = std::fs::read(&p).unwrap();
                    (p, bytes)
                })
                .collect()
        })
        .unwrap_or_default();
    files.sort();
    files
}

#[test]
fn generated_code_is_up_to_date() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = root.join("src/generated");
    let before = snapshot(&out);
    std::fs::create_dir_all(&out).unwrap();
    let protos: Vec<PathBuf> = PROTOS.iter().map(|p| root.join(p)).collect();
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .build_transport(false)
        .emit_rerun_if_changed(false)
        .out_dir(&out)
        .file_descriptor_set_path(out.join("pymedic_v1_descriptor.bin"))
        .compile_protos(&protos, &[root.to_path_buf()])
        .expect(
            "protoc failed: install Debian's protobuf-compiler and libprotobuf-dev \
             (`cargo xtask setup`)",
        );
    let after = snapshot(&out);
    let changed: Vec<String> = after
        .iter()
        .filter(|(p, bytes)| !before.iter().any(|(q, b)| q == p && b == bytes))
        .map(|(p, _)| p.display().to_string())
        .collect();
    assert!(
        changed.is_empty(),
        "generated code was out of date and has been regenerated: {changed:?}; \
         review and commit proto/src/generated"
    );
}
