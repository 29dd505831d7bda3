//! deploy/: the Kubernetes manifests validate offline against the API
//! schemas (kubernetes-validate, strict), carry what the agent needs on a
//! node, and embed a configuration the agent accepts.

use std::process::Command;

use pymedic_integration::{pymedic_bin, repo_root};

fn validate(files: &[std::path::PathBuf]) -> std::process::Output {
    Command::new("kubernetes-validate")
        .arg("--strict")
        .args(files)
        .output()
        .expect("run kubernetes-validate (cargo xtask setup installs it into target/venv)")
}

#[test]
fn agent_manifests_validate_and_config_is_accepted() {
    let k8s = repo_root().join("deploy/kubernetes");
    let files: Vec<_> = [
        "namespace.yaml",
        "configmap.yaml",
        "daemonset.yaml",
        "service.yaml",
    ]
    .iter()
    .map(|f| k8s.join(f))
    .collect();
    let out = validate(&files);
    assert!(
        out.status.success(),
        "manifests invalid:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // The validator does catch mistakes (a negative control).
    let dir = tempfile::tempdir().unwrap();
    let broken = dir.path().join("broken.yaml");
    let text = std::fs::read_to_string(k8s.join("daemonset.yaml")).unwrap();
    std::fs::write(&broken, text.replace("hostPID: true", "hostPid: true")).unwrap();
    assert!(
        !validate(&[broken]).status.success(),
        "a misspelt field passed validation"
    );

    let toml = dir.path().join("pymedic.toml");
    let out = Command::new("python3")
        .arg(repo_root().join("tests/scripts/check_deploy.py"))
        .arg(repo_root().join("deploy"))
        .arg(&toml)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let token = dir.path().join("token");
    std::fs::write(&token, "t0ken\n").unwrap();
    let out = Command::new(pymedic_bin())
        .args(["agent", "--check-config", "--config"])
        .arg(&toml)
        .env("PYMEDIC_AUTH_TOKEN_FILE", &token)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The reference config too.
    let out = Command::new(pymedic_bin())
        .args(["agent", "--check-config", "--config"])
        .arg(repo_root().join("deploy/pymedic.toml"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
