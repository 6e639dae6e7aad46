//! Interop with slixmpp (Python, from PyPI): runs `interop/slixmpp/interop.py`
//! (clients) against a test server, and `interop/slixmpp/component.py`
//! (slixmpp's ComponentXMPP, XEP-0114) against one node and across two, and
//! compares the results with the committed baselines (`baseline.json`,
//! `component_baseline.json`), where every known failure has its reason.
//!
//! The test installs slixmpp (pinned in `requirements.txt`) into a virtual
//! environment under `target/interop/` the first time it runs.

use std::path::{Path, PathBuf};
use std::process::Command;

use rookery_app::Config;
use rookery_app::config::ComponentEntry;
use rookery_test_support::{TestCluster, TestServer};

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .unwrap()
}

/// The virtual environment's Python, created and filled on first use.
fn python() -> PathBuf {
    let root = workspace();
    let requirements = root.join("interop/slixmpp/requirements.txt");
    let venv = root.join("target/interop/slixmpp-venv");
    let python = venv.join("bin/python");
    let marker = venv.join("installed-requirements.txt");
    let wanted = std::fs::read_to_string(&requirements).unwrap();
    if std::fs::read_to_string(&marker).ok().as_deref() != Some(wanted.as_str()) {
        let status = Command::new("python3")
            .args(["-m", "venv"])
            .arg(&venv)
            .status()
            .expect("python3 is installed");
        assert!(status.success(), "python3 -m venv failed");
        let status = Command::new(&python)
            .args(["-m", "pip", "install", "--quiet", "-r"])
            .arg(&requirements)
            .status()
            .expect("pip runs");
        assert!(
            status.success(),
            "pip install -r {} failed",
            requirements.display()
        );
        std::fs::write(&marker, wanted).unwrap();
    }
    python
}

#[tokio::test]
async fn slixmpp_scenarios_match_the_baseline() {
    let server = TestServer::start_with(|c| c.accounts.registration = true).await;
    let ports = [
        ("--port", server.starttls().port()),
        ("--direct-port", server.direct_tls().port()),
    ];
    run_and_compare("interop.py", &ports, "baseline.json").await;
}

const SECRET: &str = "s3cret-for-slixmpp";

fn with_echo(config: &mut Config) {
    config.components = vec![ComponentEntry {
        domain: "echo.localhost".into(),
        secret: SECRET.into(),
    }];
}

#[tokio::test]
async fn slixmpp_s_component_on_one_node_matches_the_baseline() {
    let server = TestServer::start_with(with_echo).await;
    server.create_user("alice", "secret").await;
    server.create_user("bob", "secret").await;
    let ports = [
        ("--component-port", server.component().port()),
        ("--client-port", server.starttls().port()),
    ];
    run_and_compare("component.py", &ports, "component_baseline.json").await;
}

#[tokio::test]
async fn slixmpp_s_component_on_one_node_of_two_matches_the_baseline() {
    let cluster = TestCluster::start_with(2, |_, config| with_echo(config)).await;
    cluster.create_user("alice", "secret").await;
    cluster.create_user("bob", "secret").await;
    // The component connects to node 0, the users to node 1.
    let ports = [
        ("--component-port", cluster.node(0).component().port()),
        ("--client-port", cluster.node(1).starttls().port()),
    ];
    run_and_compare("component.py", &ports, "component_baseline.json").await;
}

/// Runs `interop/slixmpp/<script>` with the test CA and `ports`, and
/// compares its results with `interop/slixmpp/<baseline>`: a scenario that
/// passes there must pass; a known failure carries its reason and must
/// still fail.
async fn run_and_compare(script: &str, ports: &[(&str, u16)], baseline: &str) {
    let python = tokio::task::spawn_blocking(python).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca.pem");
    std::fs::write(&ca, &rookery_test_support::certs::pki().ca_pem).unwrap();
    let out = dir.path().join("results.json");
    let mut command = tokio::process::Command::new(&python);
    command.arg(workspace().join("interop/slixmpp").join(script));
    for (flag, port) in ports {
        command.args([*flag, &port.to_string()]);
    }
    command
        .arg("--ca")
        .arg(&ca)
        .arg("--out")
        .arg(&out)
        .kill_on_drop(true);
    let output = tokio::time::timeout(std::time::Duration::from_secs(300), command.output())
        .await
        .expect("the slixmpp scenarios finish in time")
        .expect("the script runs");
    let log = format!(
        "{}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    let results: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(&out).unwrap_or_else(|_| panic!("no results; output:\n{log}")),
    )
    .unwrap();
    let baseline: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(workspace().join("interop/slixmpp").join(baseline)).unwrap(),
    )
    .unwrap();
    let results = results.as_object().unwrap();
    let baseline = baseline.as_object().unwrap();
    assert_eq!(
        results.keys().collect::<Vec<_>>(),
        baseline.keys().collect::<Vec<_>>(),
        "every scenario has a baseline entry"
    );
    for (scenario, expected) in baseline {
        let got = &results[scenario]["result"];
        match expected["result"].as_str().unwrap() {
            "pass" => assert_eq!(
                got, "pass",
                "{scenario} regressed: {}\n{log}",
                results[scenario]
            ),
            "fail" => {
                assert!(
                    expected["reason"].is_string(),
                    "known failure {scenario} needs a reason"
                );
                assert_eq!(got, "fail", "{scenario} passes now: update the baseline");
            }
            other => panic!("unknown baseline result {other}"),
        }
    }
}
