//! Interop with slixmpp (Python, from PyPI): runs `interop/slixmpp/interop.py`
//! against a test server and compares its results with the committed baseline
//! `interop/slixmpp/baseline.json`, where every known failure has its reason.
//!
//! The test installs slixmpp (pinned in `requirements.txt`) into a virtual
//! environment under `target/interop/` the first time it runs.

use std::path::{Path, PathBuf};
use std::process::Command;

use rookery_test_support::TestServer;

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
    let python = tokio::task::spawn_blocking(python).await.unwrap();
    let server = TestServer::start_with(|c| c.accounts.registration = true).await;
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca.pem");
    std::fs::write(&ca, &rookery_test_support::certs::pki().ca_pem).unwrap();
    let out = dir.path().join("results.json");
    let script = workspace().join("interop/slixmpp/interop.py");
    let mut command = tokio::process::Command::new(&python);
    command
        .arg(&script)
        .args(["--port", &server.starttls().port().to_string()])
        .args(["--direct-port", &server.direct_tls().port().to_string()])
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
        &std::fs::read_to_string(workspace().join("interop/slixmpp/baseline.json")).unwrap(),
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
