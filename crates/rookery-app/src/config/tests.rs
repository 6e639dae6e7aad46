//! Configuration loading: layering, error messages, and the example file.

use super::*;

fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn write(text: &str) -> tempfile::NamedTempFile {
    use std::io::Write;
    let mut file = tempfile::NamedTempFile::new().unwrap();
    file.write_all(text.as_bytes()).unwrap();
    file
}

#[test]
fn defaults_are_the_zero_setup_server() {
    let config = Config::load(None, []).unwrap();
    assert_eq!(config.server.domain, "localhost");
    assert_eq!(config.c2s.starttls_listen.unwrap().port(), 5222);
    assert_eq!(config.c2s.direct_tls_listen.unwrap().port(), 5223);
    assert_eq!(config.http.listen.unwrap().port(), 5280);
    assert!(
        config.c2s.require_tls && !config.c2s.allow_plaintext_auth && !config.accounts.registration
    );
    assert_eq!(config.c2s.max_stanza_size, 256 * 1024);
    assert_eq!(config.sqlite_path(), PathBuf::from("data/rookery.sqlite"));
}

#[test]
fn file_then_environment() {
    let file = write("[server]\ndomain = \"example.org\"\n[c2s]\nrequire_tls = false\n");
    let config = Config::load(
        Some(file.path()),
        env(&[
            ("ROOKERY_SERVER__DOMAIN", "chat.example.org"),
            ("ROOKERY_LIMITS__OFFLINE_MESSAGES", "5"),
            ("HOME", "/root"),
        ]),
    )
    .unwrap();
    assert_eq!(config.server.domain, "chat.example.org");
    assert!(
        !config.c2s.require_tls,
        "the file's value stays when no variable overrides it"
    );
    assert_eq!(config.limits.offline_messages, 5);
}

#[test]
fn errors_name_the_key_and_the_source() {
    let file = write("[server]\ndomian = \"x\"\n");
    let error = Config::load(Some(file.path()), []).unwrap_err().to_string();
    assert!(
        error.contains(&file.path().display().to_string()) && error.contains("domian"),
        "{error}"
    );

    let file = write("[c2s]\nmax_stanza_size = \"big\"\n");
    let error = Config::load(Some(file.path()), []).unwrap_err().to_string();
    assert!(
        error.contains("max_stanza_size") && error.contains("line 2"),
        "{error}"
    );

    let error = Config::load(None, env(&[("ROOKERY_C2S__IDLE_TIMEOUT", "soon")]))
        .unwrap_err()
        .to_string();
    assert!(error.contains("ROOKERY_C2S__IDLE_TIMEOUT"), "{error}");

    let error = Config::load(None, env(&[("ROOKERY_STORAGE__BACKEND", "mnesia")]))
        .unwrap_err()
        .to_string();
    assert!(error.contains("storage.backend"), "{error}");

    let error = Config::load(None, env(&[("ROOKERY_SERVER__DOMAIN", "not a domain@")]))
        .unwrap_err()
        .to_string();
    assert!(error.contains("server.domain"), "{error}");

    let error = Config::load(None, env(&[("ROOKERY_NOSECTION", "1")]))
        .unwrap_err()
        .to_string();
    assert!(error.contains("ROOKERY_NOSECTION"), "{error}");

    let error = Config::load(
        None,
        env(&[(
            "ROOKERY_DISCO__ABUSE_ADDRESSES",
            "[\"mailto:abuse@example.org\", \"call us\"]",
        )]),
    )
    .unwrap_err()
    .to_string();
    assert!(error.contains("disco.abuse_addresses[1]"), "{error}");

    let error = Config::load(None, env(&[("ROOKERY_ACCOUNTS__SCRAM_ITERATIONS", "10")]))
        .unwrap_err()
        .to_string();
    assert!(error.contains("accounts.scram_iterations"), "{error}");
}

#[test]
fn components_are_checked_entry_by_entry() {
    let file = write(
        "[[components]]\ndomain = \"echo.localhost\"\nsecret = \"s\"\n\
         [[components]]\ndomain = \"gw.localhost\"\nsecret = \"t\"\n",
    );
    let config = Config::load(Some(file.path()), []).unwrap();
    assert_eq!(config.components.len(), 2);
    assert_eq!(config.components[1].domain, "gw.localhost");
    for (entries, key, says) in [
        (
            "domain = \"echo.localhost\"\nsecret = \"\"",
            "components[1].secret",
            "empty",
        ),
        (
            "domain = \"localhost\"\nsecret = \"s\"",
            "components[1].domain",
            "own domain",
        ),
        (
            "domain = \"a@b\"\nsecret = \"s\"",
            "components[1].domain",
            "domain name",
        ),
        (
            "domain = \"gw.localhost\"\nsecret = \"s\"",
            "components[1].domain",
            "twice",
        ),
    ] {
        let file = write(&format!(
            "[[components]]\ndomain = \"gw.localhost\"\nsecret = \"t\"\n[[components]]\n{entries}\n"
        ));
        let error = Config::load(Some(file.path()), []).unwrap_err().to_string();
        assert!(
            error.contains(&file.path().display().to_string())
                && error.contains(key)
                && error.contains(says),
            "{error}"
        );
    }
    let file = write("[[components]]\ndomain = \"gw.localhost\"\n");
    let error = Config::load(Some(file.path()), []).unwrap_err().to_string();
    assert!(error.contains("secret"), "{error}");
}

#[test]
fn a_cluster_section_with_postgres() {
    let file = write(
        "[storage]\nbackend = \"postgres\"\npostgres_url = \"postgres://db/rookery\"\n[cluster]\nnode = \"node2\"\nnats = [\"nats://10.0.0.1:4222\", \"nats://10.0.0.2:4222\"]\n",
    );
    let config = Config::load(
        Some(file.path()),
        env(&[("ROOKERY_CLUSTER__FAILURE_TIMEOUT", "5.0")]),
    )
    .unwrap();
    let cluster = config.cluster.unwrap();
    assert_eq!(
        (
            cluster.node.as_str(),
            cluster.nats.len(),
            cluster.failure_timeout
        ),
        ("node2", 2, 5.0)
    );
    assert_eq!(cluster.heartbeat_interval, 1.0, "defaults fill the rest");
    assert!(
        Config::load(None, []).unwrap().cluster.is_none(),
        "no [cluster]: a single node"
    );
}

#[test]
fn missing_files_are_reported() {
    let error = Config::load(Some(Path::new("/nonexistent/rookery.toml")), [])
        .unwrap_err()
        .to_string();
    assert!(error.contains("/nonexistent/rookery.toml"), "{error}");
}

/// Every key of `value`, dotted.
fn keys(prefix: &str, value: &toml::Value, out: &mut Vec<String>) {
    if let toml::Value::Table(table) = value {
        for (key, value) in table {
            let path = if prefix.is_empty() {
                key.clone()
            } else {
                format!("{prefix}.{key}")
            };
            if value.is_table() {
                keys(&path, value, out);
            } else {
                out.push(path);
            }
        }
    }
}

#[test]
fn the_example_config_is_complete_and_current() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../config/rookery.example.toml");
    let text = std::fs::read_to_string(&path).unwrap();
    let example = Config::load(Some(&path), []).expect("the example parses");
    assert_eq!(example, Config::default(), "the example shows the defaults");
    let mut documented = Vec::new();
    keys(
        "",
        &toml::Value::Table(text.parse::<toml::Table>().unwrap()),
        &mut documented,
    );
    let mut known = Vec::new();
    keys(
        "",
        &toml::Value::try_from(Config::default()).unwrap(),
        &mut known,
    );
    documented.sort();
    known.sort();
    assert_eq!(
        documented, known,
        "config/rookery.example.toml lists every key with its default"
    );
    for optional in ["cert", "key"] {
        assert!(
            text.contains(&format!("# {optional} = ")),
            "optional key tls.{optional} is shown commented out"
        );
    }
}
