//! rookery-bench against a Rookery server: every scenario over XML streams
//! with STARTTLS and direct TLS and over WebSocket, each checked on what it
//! reports (everything sent arrives once, no login fails).

use std::net::SocketAddr;

use rookery_test_support::TestServer;
use serde_json::Value;

const USERS: usize = 24;

async fn server() -> TestServer {
    server_with(|_| {}).await
}

/// A server with registration on, adjusted by `configure`, and the bench's accounts.
async fn server_with(configure: impl FnOnce(&mut rookery_test_support::Config)) -> TestServer {
    let server = TestServer::start_with(|config| {
        config.accounts.registration = true;
        configure(config);
    })
    .await;
    let report = bench(
        server.starttls(),
        &["--tls", "starttls"],
        &["register", "--users", &USERS.to_string()],
    )
    .await;
    assert_eq!(report["failures"], 0, "{report}");
    server
}

/// Runs rookery-bench and returns the JSON it printed.
async fn bench(server: SocketAddr, transport: &[&str], scenario: &[&str]) -> Value {
    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_rookery-bench"))
        .args(["--server", &server.to_string(), "--source-ips", "4"])
        .args(transport)
        .args(scenario)
        .output()
        .await
        .expect("rookery-bench runs");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{scenario:?} failed: {stderr}");
    serde_json::from_slice(&output.stdout).unwrap_or_else(|e| panic!("{e}: {stderr}"))
}

/// The transports: (address, options).
fn transports(server: &TestServer) -> [(SocketAddr, Vec<&'static str>); 3] {
    [
        (server.starttls(), vec!["--tls", "starttls"]),
        (server.direct_tls(), vec!["--tls", "direct"]),
        (
            server.http(),
            vec!["--tls", "none", "--websocket", "/xmpp-websocket"],
        ),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_delivers_every_message_once_over_every_transport() {
    let server = server().await;
    for (address, transport) in transports(&server) {
        let report = bench(
            address,
            &transport,
            &["chat", "--users", "10", "--rate", "100", "--duration", "2"],
        )
        .await;
        let sent = report["sent"].as_u64().expect("sent");
        assert!(sent >= 150, "{transport:?}: {report}");
        assert_eq!(
            report["delivered"].as_u64(),
            Some(sent),
            "{transport:?}: {report}"
        );
        assert_eq!(report["lost"], 0, "{transport:?}: {report}");
        assert_eq!(report["duplicated"], 0, "{transport:?}: {report}");
        assert!(report["latency_ms_p99"].as_f64().expect("p99") > 0.0);
        // The server runs in this process: its CPU is measured too.
        assert!(report["server_cpu_seconds"].as_f64().expect("CPU") > 0.0);
        assert!(
            report["bench_cpu_us_per_message"]
                .as_f64()
                .expect("bench CPU")
                > 0.0
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_and_login_storms_over_every_transport() {
    let server = server().await;
    for (address, transport) in transports(&server) {
        let report = bench(
            address,
            &transport,
            &["connections", "--users", &USERS.to_string(), "--hold", "0"],
        )
        .await;
        assert_eq!(report["sessions"].as_u64(), Some(USERS as u64), "{report}");
        assert_eq!(report["failures"], 0, "{report}");
        assert!(report["server_kib_per_session"].is_number(), "{report}");
        // The clients all leave at once and the server lets go of their sockets.
        assert!(
            report["server_files_released_seconds"].is_number(),
            "{report}"
        );
        let report = bench(
            address,
            &transport,
            &[
                "login-storm",
                "--users",
                "10",
                "--logins",
                "40",
                "--concurrency",
                "5",
            ],
        )
        .await;
        assert_eq!(report["logins"], 40, "{transport:?}: {report}");
        assert_eq!(report["failures"], 0, "{transport:?}: {report}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_reaches_every_online_contact() {
    let server = server().await;
    // The first run subscribes the ring of contacts; the second finds it set up.
    for _ in 0..2 {
        let report = bench(
            server.starttls(),
            &["--tls", "starttls"],
            &[
                "presence",
                "--users",
                "24",
                "--contacts",
                "8",
                "--rate",
                "40",
                "--duration",
                "2",
            ],
        )
        .await;
        let expected = report["deliveries_expected"].as_u64().expect("expected");
        // 12 online users, each with 4 online contacts.
        assert!(expected >= 60 * 4, "{report}");
        assert_eq!(report["deliveries"].as_u64(), Some(expected), "{report}");
        assert_eq!(report["lost"], 0, "{report}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn find_max_reports_the_highest_passing_rate() {
    let server = server().await;
    let report = bench(
        server.starttls(),
        &["--tls", "starttls"],
        &[
            "chat",
            "--users",
            "10",
            "--rate",
            "50",
            "--duration",
            "1",
            "--find-max",
            "--step-factor",
            "2",
            "--max-steps",
            "3",
        ],
    )
    .await;
    let steps = report["steps"].as_array().expect("steps");
    // Three steps up at most, then up to three between the last pass and the
    // first failure.
    assert!(!steps.is_empty() && steps.len() <= 6, "{report}");
    let outcomes: Vec<(u64, bool)> = steps
        .iter()
        .map(|s| {
            let rate = s["target_rate"].as_u64().unwrap();
            let sustained = s["lost"] == 0
                && s["latency_ms_p99"].as_f64().unwrap() <= 100.0
                && s["achieved_rate"].as_f64().unwrap() >= 0.95 * rate as f64;
            (rate, sustained)
        })
        .collect();
    // The rate goes up from step to step until one fails; the highest
    // passing one is reported.
    let up = outcomes
        .iter()
        .position(|(_, s)| !s)
        .map_or(outcomes.len(), |f| f + 1);
    assert!(
        outcomes[..up].windows(2).all(|w| w[1].0 > w[0].0),
        "{outcomes:?}"
    );
    let best = outcomes.iter().filter(|(_, s)| *s).map(|(r, _)| *r).max();
    assert_eq!(report["max_sustained_rate"].as_u64(), best, "{report}");
    assert!(best.is_some(), "50 msg/s among 10 users passes: {report}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_floor_relays_every_frame_once_and_stops() {
    // No server: the relay is a process of its own, started and stopped by
    // the scenario (the address given is not used).
    let report = bench(
        "127.0.0.1:9".parse().expect("address"),
        &[],
        &[
            "floor",
            "--users",
            "20",
            // Enough frames for the relay's CPU to pass several of the
            // 10 ms ticks /proc counts in (400 frames could stay under one).
            "--rate",
            "2000",
            "--duration",
            "3",
            "--relay-cpus",
            "0",
        ],
    )
    .await;
    assert_eq!(report["relay_cpus"], "0", "{report}");
    let sent = report["sent"].as_u64().expect("sent");
    assert!(sent >= 3000, "{report}");
    assert_eq!(report["delivered"].as_u64(), Some(sent), "{report}");
    assert_eq!(report["lost"], 0, "{report}");
    assert_eq!(report["duplicated"], 0, "{report}");
    let p50 = report["latency_ms_p50"].as_f64().expect("p50");
    let p99 = report["latency_ms_p99"].as_f64().expect("p99");
    assert!(0.0 < p50 && p50 <= p99, "{report}");
    assert!(
        report["relay_cpu_us_per_message"]
            .as_f64()
            .expect("relay CPU")
            > 0.0,
        "{report}"
    );
    assert_eq!(report["relay_stopped"], true, "{report}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_short_soak_accounts_for_every_message_across_reconnections() {
    let server = server().await;
    let report = bench(
        server.starttls(),
        &["--tls", "starttls"],
        &[
            "soak",
            "--users",
            "12",
            "--rate",
            "60",
            "--presence-rate",
            "10",
            "--reconnect-rate",
            "3",
            "--duration",
            "6",
            "--sample",
            "1",
        ],
    )
    .await;
    let sent = report["sent"].as_u64().expect("sent");
    assert!(sent >= 250, "{report}");
    // Messages to a user that was reconnecting were stored and delivered at its login.
    assert_eq!(report["delivered"].as_u64(), Some(sent), "{report}");
    assert_eq!(report["lost"], 0, "{report}");
    assert!(
        report["reconnects"].as_u64().expect("reconnects") >= 10,
        "{report}"
    );
    assert!(
        report["presence_sent"].as_u64().expect("presence") >= 30,
        "{report}"
    );
    assert_eq!(report["errors"], 0, "{report}");
    let samples = report["samples"].as_array().expect("samples");
    assert!(samples.len() >= 5, "{report}");
    // The server runs in this process: its memory is sampled and the trend fitted.
    assert!(
        samples.iter().all(|s| s["rss_kib"].as_u64().is_some()),
        "{report}"
    );
    assert!(report["rss_slope_kib_per_hour"].is_number(), "{report}");
    assert!(report["rss_noise_kib"].is_number(), "{report}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abuse_ends_every_attack_and_loses_nothing_of_the_normal_chat() {
    let server = server_with(|config| {
        // The attackers come from loopback too: no address is exempt here.
        config.limits.connection_allowlist = Vec::new();
        config.c2s.max_stanza_size = 60_000;
        config.limits.c2s_rate = 200_000;
        config.limits.c2s_burst = 262_144;
        // A slow reader's queue fills from one throttled sender within the
        // run (past what the sockets on the way hold, about a megabyte).
        config.limits.session_queue_bytes = 262_144;
    })
    .await;
    let http = server.http().to_string();
    let report = bench(
        server.starttls(),
        &["--tls", "starttls"],
        &[
            "abuse",
            "--users",
            "10",
            "--rate",
            "50",
            "--duration",
            "3",
            "--attackers",
            "1",
            "--http",
            &http,
        ],
    )
    .await;
    for run in ["quiet", "under_attack"] {
        assert_eq!(report[run]["lost"], 0, "{run}: {report}");
        assert!(
            report[run]["sent"].as_u64().unwrap() >= 100,
            "{run}: {report}"
        );
    }
    let attacks = &report["attacks"];
    let ended =
        |kind: &str, condition: &str| attacks[kind]["ended"][condition].as_u64().unwrap_or(0);
    assert!(ended("endless-header", "policy-violation") >= 1, "{report}");
    assert!(ended("endless-tag", "policy-violation") >= 1, "{report}");
    // The reader that reads nothing is ended (with resource-constraint, or
    // dropped from inside a blocked write).
    let reader: u64 = attacks["slow-reader"]["ended"]
        .as_object()
        .map_or(0, |ended| ended.values().filter_map(|v| v.as_u64()).sum());
    assert!(reader >= 1, "{report}");
    // Floods are slowed to the input rate (200 kB/s after a 256 KiB burst,
    // over the 8 s or so the attack lasts here).
    for flood in ["flood", "websocket-flood"] {
        let rate = attacks[flood]["bytes_per_second_per_connection"]
            .as_f64()
            .unwrap();
        assert!(rate > 80_000.0 && rate < 300_000.0, "{flood}: {report}");
    }
    // 150 connections from one address: the 50 over the limit are refused.
    assert!(
        attacks["half-open"]["refused"].as_u64().unwrap() >= 50,
        "{report}"
    );
}
