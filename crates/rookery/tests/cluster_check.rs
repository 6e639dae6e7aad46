//! The fault checker's short schedule (`rookery-bench check`): a cluster of
//! its own on loopback, chat with stream management across the nodes, and a
//! round of every fault (a node killed, stopped, frozen and cut off from
//! NATS; NATS restarted with and without its store; PostgreSQL restarted as
//! after a crash). Nothing the server acknowledged may be lost, no dead node
//! may be cleaned up twice, and no message sent and delivered away from the
//! faults may overtake an earlier one. The seed is printed; set
//! `ROOKERY_CHECK_SEED` to replay a schedule.
//!
//! A round on one NATS server and a round on three (JetStream replicas 3).
//! On a lone server, what it held when it lost its store is counted apart
//! (`lost_with_nats_store`); on three, nothing is excused. The rounds run one
//! after the other: each starts a cluster of its own, and two at once would
//! starve each other on a 2-core machine (a failure timeout is 2 s).

use std::path::Path;
use std::time::Duration;

use rookery_bench::check::{CheckSettings, FaultKind, run};

fn settings(nats: usize) -> CheckSettings {
    let seed = std::env::var("ROOKERY_CHECK_SEED")
        .ok()
        .and_then(|seed| seed.parse().ok())
        .unwrap_or_else(rand_seed);
    println!("check: seed {seed} ({nats} NATS)");
    let folder = tempfile::Builder::new()
        .prefix("rookery-check")
        .tempdir()
        .expect("a folder")
        .keep();
    CheckSettings {
        rookery: Path::new(env!("CARGO_BIN_EXE_rookery")).to_owned(),
        folder,
        // Removed below when the round is clean; a failing one keeps its
        // node logs and stores for a look afterwards.
        keep: true,
        seed,
        nodes: 3,
        nats,
        users: 30,
        rate: 30.0,
        // One round: every kind once.
        duration: Duration::from_secs(1),
        faults: FaultKind::ALL.to_vec(),
        failure_timeout: 2.0,
        shutdown_grace: 5,
        settle: Duration::from_secs(90),
    }
}

/// A seed of its own for every run, printed (the schedule is what varies).
fn rand_seed() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(1, |since| since.as_nanos() as u64)
}

async fn check(nats: usize) {
    let settings = settings(nats);
    let report = run(&settings).await.expect("the checker runs");
    println!("{report:#?}");
    let clean = report.chat.lost == report.lost_with_nats_store
        && report.repeated_cleanups.is_empty()
        && report.problems.is_empty()
        && report.inversions_away_from_faults == 0;
    if clean {
        let _ = std::fs::remove_dir_all(&settings.folder);
    } else {
        println!(
            "check: the run's folder (node logs, stores) is kept in {}",
            settings.folder.display()
        );
    }
    assert_eq!(report.faults.len(), FaultKind::ALL.len(), "one round");
    assert!(report.chat.sent > 0, "nothing was sent");
    assert_eq!(
        report.chat.lost, report.lost_with_nats_store,
        "acknowledged messages were lost (seed {}): {}",
        settings.seed, report.chat
    );
    assert!(
        report.repeated_cleanups.is_empty(),
        "seed {}: {:?}",
        settings.seed,
        report.repeated_cleanups
    );
    assert!(
        report.problems.is_empty(),
        "seed {}: {:?}",
        settings.seed,
        report.problems
    );
    assert_eq!(
        report.inversions_away_from_faults, 0,
        "seed {}: messages reordered away from any fault",
        settings.seed
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_round_of_every_fault_loses_nothing_on_one_then_three_nats_servers() {
    check(1).await;
    check(3).await;
}
