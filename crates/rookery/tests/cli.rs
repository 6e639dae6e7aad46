//! The `rookery` binary as an operator uses it: configuration checks, account
//! administration, serving, and SIGTERM.

use std::net::TcpListener;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use rookery_test_support::{TestClient, free_port};

fn rookery(dir: &Path, args: &[&str]) -> Command {
    let mut command = rookery_bench::harness::rookery(Path::new(env!("CARGO_BIN_EXE_rookery")));
    command.current_dir(dir).args(args).env("RUST_LOG", "");
    command
}

fn run(dir: &Path, args: &[&str]) -> Output {
    rookery(dir, args).output().expect("run rookery")
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// A config on free loopback ports with the test certificate.
fn write_config(dir: &Path) -> (u16, u16, u16) {
    let (starttls, direct, http) = (free_port(), free_port(), free_port());
    let pki = rookery_test_support::certs::pki();
    let config = format!(
        "[server]\ndata_dir = \"data\"\n[c2s]\nstarttls_listen = \"127.0.0.1:{starttls}\"\ndirect_tls_listen = \"127.0.0.1:{direct}\"\n[http]\nlisten = \"127.0.0.1:{http}\"\n[tls]\ncert = \"{}\"\nkey = \"{}\"\n",
        pki.cert_path.display(),
        pki.key_path.display()
    );
    std::fs::write(dir.join("rookery.toml"), config).unwrap();
    (starttls, direct, http)
}

#[test]
fn config_check_names_the_bad_key_and_the_file() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("good.toml"),
        "[server]\ndomain = \"example.org\"\n",
    )
    .unwrap();
    let ok = run(dir.path(), &["config", "check", "good.toml"]);
    assert!(ok.status.success(), "{}", stderr(&ok));
    assert!(String::from_utf8_lossy(&ok.stdout).contains("valid"));

    std::fs::write(
        dir.path().join("bad.toml"),
        "[server]\ndomain = \"example.org\"\n[c2s]\nrequire_tsl = true\n",
    )
    .unwrap();
    let bad = run(dir.path(), &["config", "check", "bad.toml"]);
    assert_eq!(bad.status.code(), Some(64));
    let message = stderr(&bad);
    assert!(
        message.contains("bad.toml") && message.contains("require_tsl"),
        "{message}"
    );

    let env = rookery(dir.path(), &["config", "check", "good.toml"])
        .env("ROOKERY_C2S__MAX_STANZA_SIZE", "huge")
        .output()
        .unwrap();
    assert_eq!(env.status.code(), Some(64));
    assert!(
        stderr(&env).contains("ROOKERY_C2S__MAX_STANZA_SIZE"),
        "{}",
        stderr(&env)
    );
}

#[test]
fn a_bad_config_stops_serve_before_any_port_is_bound() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    std::fs::write(
        dir.path().join("rookery.toml"),
        format!("[c2s]\nstarttls_listen = \"127.0.0.1:{port}\"\nmax_stanza_size = 5\n"),
    )
    .unwrap();
    let started = Instant::now();
    let output = run(dir.path(), &["serve"]);
    assert_eq!(output.status.code(), Some(64));
    assert!(
        stderr(&output).contains("c2s.max_stanza_size"),
        "{}",
        stderr(&output)
    );
    assert!(started.elapsed() < Duration::from_secs(10));
    assert!(
        TcpListener::bind(("127.0.0.1", port)).is_ok(),
        "the port was never taken"
    );
    assert!(!dir.path().join("data").exists(), "nothing was created");
}

#[test]
fn a_cluster_node_refuses_sqlite_before_any_port_is_bound() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    std::fs::write(
        dir.path().join("node.toml"),
        format!("[c2s]\nstarttls_listen = \"127.0.0.1:{port}\"\n[cluster]\nnode = \"node1\"\nnats = [\"nats://127.0.0.1:4222\"]\n"),
    )
    .unwrap();
    let output = run(dir.path(), &["--config", "node.toml", "serve"]);
    assert_eq!(output.status.code(), Some(64));
    let message = stderr(&output);
    assert!(
        message.contains("node.toml")
            && message.contains("storage.backend")
            && message.contains("postgres"),
        "{message}"
    );
    assert!(TcpListener::bind(("127.0.0.1", port)).is_ok());
    // The shipped three-node example is valid as it stands.
    for node in 1..=3 {
        let file = format!("../../config/cluster/node{node}.toml");
        let file = Path::new(env!("CARGO_MANIFEST_DIR")).join(file);
        let check = run(dir.path(), &["config", "check", file.to_str().unwrap()]);
        assert!(check.status.success(), "{}", stderr(&check));
    }
}

#[test]
fn user_administration() {
    let dir = tempfile::tempdir().unwrap();
    write_config(dir.path());
    let add = rookery(dir.path(), &["user", "add", "alice"])
        .stdin(Stdio::piped())
        .spawn()
        .and_then(|mut child| {
            use std::io::Write;
            child.stdin.take().unwrap().write_all(b"from stdin\n")?;
            child.wait_with_output()
        });
    let add = add.unwrap();
    assert!(add.status.success(), "{}", stderr(&add));
    // Piped in, the password needs no prompt (it would end up mid-line).
    assert!(!stderr(&add).contains("Password:"), "{}", stderr(&add));
    assert!(
        run(
            dir.path(),
            &["user", "add", "bob@localhost", "--password", "pw"]
        )
        .status
        .success()
    );
    let duplicate = run(dir.path(), &["user", "add", "bob", "--password", "pw"]);
    assert!(
        !duplicate.status.success() && stderr(&duplicate).contains("already exists"),
        "{}",
        stderr(&duplicate)
    );
    let foreign = run(
        dir.path(),
        &["user", "add", "eve@elsewhere.example", "--password", "pw"],
    );
    assert!(!foreign.status.success());
    let list = run(dir.path(), &["user", "list"]);
    assert_eq!(
        String::from_utf8_lossy(&list.stdout),
        "alice@localhost\nbob@localhost\n"
    );
    assert!(
        run(dir.path(), &["user", "passwd", "bob", "--password", "new"])
            .status
            .success()
    );
    assert!(run(dir.path(), &["user", "remove", "bob"]).status.success());
    assert!(!run(dir.path(), &["user", "remove", "bob"]).status.success());
    assert_eq!(
        String::from_utf8_lossy(&run(dir.path(), &["user", "list"]).stdout),
        "alice@localhost\n"
    );
    // Only salted keys are stored: the password appears nowhere in the database.
    let database = std::fs::read(dir.path().join("data/rookery.sqlite")).unwrap();
    let wal = std::fs::read(dir.path().join("data/rookery.sqlite-wal")).unwrap_or_default();
    for haystack in [database, wal] {
        assert!(
            !haystack.windows(10).any(|w| w == b"from stdin"),
            "plaintext password stored"
        );
    }
}

#[tokio::test]
async fn serve_logs_in_clients_and_stops_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let (starttls, _, http) = write_config(dir.path());
    assert!(
        run(
            dir.path(),
            &["user", "add", "alice", "--password", "secret"]
        )
        .status
        .success()
    );
    let server = rookery(dir.path(), &["serve"])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let address = std::net::SocketAddr::from(([127, 0, 0, 1], starttls));
    let deadline = Instant::now() + Duration::from_secs(20);
    while tokio::net::TcpStream::connect(address).await.is_err() {
        assert!(Instant::now() < deadline, "the server did not start");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut alice = TestClient::online(address, "alice", "secret", "cli").await;
    let live = tokio::net::TcpStream::connect(("127.0.0.1", http)).await;
    assert!(live.is_ok());
    // SIGTERM: the stream ends with system-shutdown and the process exits 0.
    let pid = server.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    assert_eq!(alice.expect_stream_error().await, "system-shutdown");
    let status = tokio::task::spawn_blocking(move || server.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    assert!(status.status.success(), "exit status {:?}", status.status);
    let log = String::from_utf8_lossy(&status.stderr);
    assert!(
        !log.contains('\u{1b}'),
        "colour codes in a log that is not a terminal"
    );
    assert!(
        log.contains("Rookery starting.") && log.contains("version"),
        "the first line names the version: {log}"
    );
    assert!(
        log.contains("SIGTERM received.") && log.contains("Stopped."),
        "{log}"
    );
}

#[test]
fn the_generated_certificate_is_named_after_the_domain() {
    use base64::Engine;
    let dir = tempfile::tempdir().unwrap();
    let (starttls, direct, http) = (free_port(), free_port(), free_port());
    let config = format!(
        "[server]\ndomain = \"chat.example\"\ndata_dir = \"data\"\n[c2s]\nstarttls_listen = \"127.0.0.1:{starttls}\"\ndirect_tls_listen = \"127.0.0.1:{direct}\"\n[http]\nlisten = \"127.0.0.1:{http}\"\n"
    );
    std::fs::write(dir.path().join("rookery.toml"), config).unwrap();
    let mut server = rookery(dir.path(), &["serve"])
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let cert = dir.path().join("data/tls/cert.pem");
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", starttls)).is_err() {
        assert!(Instant::now() < deadline, "the server did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    server.kill().unwrap();
    server.wait().unwrap();
    let pem = std::fs::read_to_string(cert).unwrap();
    let body: String = pem
        .lines()
        .filter(|line| !line.starts_with("-----"))
        .collect();
    let der = base64::engine::general_purpose::STANDARD
        .decode(body)
        .unwrap();
    let contains = |text: &[u8]| der.windows(text.len()).any(|window| window == text);
    // Subject and issuer name the domain, not the generator.
    assert!(contains(b"chat.example"));
    assert!(contains(b"Rookery (self-signed)"));
    assert!(!contains(b"rcgen"));
    // Valid for ten years from the start of this one (UTCTime YYMMDDhhmmssZ).
    let year = 1970
        + std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs()
            / 31_556_952;
    for year in [year, year + 10] {
        let time = format!("{:02}0101000000Z", year % 100);
        assert!(contains(time.as_bytes()), "no validity bound {time}");
    }
}
