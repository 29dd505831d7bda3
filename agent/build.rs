//! Builds pymedic's eBPF objects (ebpf/pymedic-ebpf, one binary per concern)
//! with nightly + `build-std=core` + bpf-linker through aya-build, so a plain
//! `cargo build` produces a binary that embeds them. `cargo xtask setup`
//! installs what this needs; the error below says so when it is missing.

use std::path::Path;

fn main() -> anyhow::Result<()> {
    let manifest = std::env::var("CARGO_MANIFEST_DIR")?;
    let root = Path::new(&manifest).join("..");
    let ebpf = root.join("ebpf/pymedic-ebpf");
    let common = root.join("ebpf/pymedic-common");
    println!("cargo:rerun-if-changed={}", common.display());
    let ebpf_dir = ebpf.to_string_lossy().into_owned();
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "pymedic-ebpf",
            root_dir: &ebpf_dir,
            ..Default::default()
        }],
        aya_build::Toolchain::default(),
    )
    .map_err(|e| {
        anyhow::anyhow!(
            "building the eBPF programs failed: {e:#}\n\
             They need the nightly toolchain with rust-src and bpf-linker built against the nightly's LLVM: \
             run `cargo xtask setup` once (it installs both)."
        )
    })
}
