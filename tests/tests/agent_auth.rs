//! The agent's API protection with the real binary over real sockets:
//! tokens, TLS (and mTLS), and the refusal to serve a non-loopback address
//! unprotected.

use pymedic_integration::agent::{AgentProc, Certs, free_port};
use pymedic_integration::{pymedic, require_root};

fn stderr(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn agent_token_no_token_and_wrong_token_are_unauthenticated() {
    if !require_root("agent_token_no_token_and_wrong_token_are_unauthenticated") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("token");
    std::fs::write(&token, "correct-horse\n").unwrap();
    let a = AgentProc::start(
        &dir.path().join("data"),
        &["--token-file", token.to_str().unwrap()],
    );
    for args in [
        vec!["findings", "list"],
        vec!["targets"],
        vec!["capture", "--pid", "1", "--kind", "dump"],
        vec!["findings", "watch", "--after", "0", "--count", "1"],
    ] {
        let none = a.client(&args);
        assert!(!none.status.success(), "{args:?} without a token succeeded");
        assert!(
            stderr(&none).contains("Unauthenticated"),
            "{args:?}: {}",
            stderr(&none)
        );
        assert!(
            none.stdout.is_empty(),
            "{args:?} printed data without a token"
        );
        let mut with_wrong = args.clone();
        with_wrong.extend(["--token", "wrong"]);
        let wrong = a.client(&with_wrong);
        assert!(!wrong.status.success());
        assert!(
            stderr(&wrong).contains("invalid token"),
            "{}",
            stderr(&wrong)
        );
    }
    let ok = a.client(&[
        "findings",
        "list",
        "--json",
        "--token-file",
        token.to_str().unwrap(),
    ]);
    assert!(ok.status.success(), "{}", stderr(&ok));
    let ok = a.client(&["targets", "--token", "correct-horse"]);
    assert!(ok.status.success(), "{}", stderr(&ok));
}

#[test]
fn agent_tls_refuses_plaintext_and_mtls_requires_a_client_certificate() {
    if !require_root("agent_tls_refuses_plaintext_and_mtls_requires_a_client_certificate") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let certs = Certs::make(&dir.path().join("certs"));
    let a = AgentProc::start(
        &dir.path().join("data"),
        &[
            "--tls-cert",
            &certs.path("server.pem"),
            "--tls-key",
            &certs.path("server.key"),
        ],
    );
    // Plaintext client to the TLS port.
    let plain = a.client(&["findings", "list"]);
    assert!(!plain.status.success(), "plaintext to a TLS port succeeded");
    assert!(plain.stdout.is_empty());
    // TLS without trusting the CA.
    let untrusted = a.client(&[
        "findings",
        "list",
        "--agent",
        &format!("https://localhost:{}", a.grpc.port()),
    ]);
    assert!(!untrusted.status.success());
    // TLS trusting the CA.
    let ok = a.client(&[
        "findings",
        "list",
        "--tls-ca",
        &certs.path("ca.pem"),
        "--tls-domain",
        "localhost",
    ]);
    assert!(ok.status.success(), "{}", stderr(&ok));
    drop(a);

    let m = AgentProc::start(
        &dir.path().join("data-mtls"),
        &[
            "--tls-cert",
            &certs.path("server.pem"),
            "--tls-key",
            &certs.path("server.key"),
            "--tls-client-ca",
            &certs.path("ca.pem"),
        ],
    );
    let tls = [
        "--tls-ca",
        &certs.path("ca.pem"),
        "--tls-domain",
        "localhost",
    ];
    let mut no_cert = vec!["findings", "list"];
    no_cert.extend(tls);
    let r = m.client(&no_cert);
    assert!(
        !r.status.success(),
        "mTLS agent accepted a client without a certificate"
    );
    assert!(r.stdout.is_empty());
    let mut with_cert = no_cert.clone();
    let (c, k) = (certs.path("client.pem"), certs.path("client.key"));
    with_cert.extend(["--tls-cert", &c, "--tls-key", &k]);
    let r = m.client(&with_cert);
    assert!(r.status.success(), "{}", stderr(&r));
}

#[test]
fn agent_refuses_non_loopback_without_tls_or_token() {
    if !require_root("agent_refuses_non_loopback_without_tls_or_token") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let listen = format!("0.0.0.0:{}", free_port());
    let out = pymedic(&[
        "agent",
        "--listen",
        &listen,
        "--data-dir",
        data.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    let msg = stderr(&out);
    assert!(
        msg.contains("non-loopback") && msg.contains("--insecure") && msg.contains("tls"),
        "{msg}"
    );
    // The same through the environment.
    let out = std::process::Command::new(pymedic_integration::pymedic_bin())
        .args([
            "agent",
            "--check-config",
            "--data-dir",
            data.to_str().unwrap(),
        ])
        .env("PYMEDIC_LISTEN", &listen)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    // --insecure: starts, warns, and serves (checked over loopback).
    let a = AgentProc::start_on(&data, free_port(), &["--insecure"]);
    drop(a);
    let port = free_port();
    let mut a = AgentProc::start_on(&dir.path().join("data2"), port, &[]);
    a.stop();
    let insecure_listen = format!("0.0.0.0:{}", free_port());
    let mut child = std::process::Command::new(pymedic_integration::pymedic_bin())
        .args([
            "agent",
            "--insecure",
            "--listen",
            &insecure_listen,
            "--data-dir",
        ])
        .arg(dir.path().join("data3"))
        .env("RUST_LOG", "pymedic=info")
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_secs(2));
    let _ = child.kill();
    let out = child.wait_with_output().unwrap();
    let log = stderr(&out);
    assert!(
        log.contains("--insecure") && log.contains("anyone who can connect"),
        "{log}"
    );
}

#[test]
fn agent_config_errors_name_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("bad.toml");
    std::fs::write(&cfg, "[detect]\ncpu_budget = 7\n").unwrap();
    let out = pymedic(&["agent", "--config", cfg.to_str().unwrap(), "--check-config"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("detect.cpu_budget"),
        "{}",
        stderr(&out)
    );
    let out = std::process::Command::new(pymedic_integration::pymedic_bin())
        .args(["agent", "--check-config"])
        .env("PYMEDIC_STORE_RETENTION", "a while")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let msg = stderr(&out);
    assert!(
        msg.contains("store.retention") && msg.contains("PYMEDIC_STORE_RETENTION"),
        "{msg}"
    );
}
