//! `register`: create the bench accounts by in-band registration (XEP-0077),
//! on any server that allows it.

use std::sync::Arc;
use std::time::Instant;

use rookery_bench::client::Connection;
use serde::Serialize;
use tokio::sync::Semaphore;

use crate::{Cli, emit, target};

/// What registration did.
#[derive(Debug, Serialize)]
pub struct RegisterReport {
    scenario: &'static str,
    users: usize,
    created: usize,
    existed: usize,
    failures: usize,
    seconds: f64,
}

/// Registers accounts 1 ..= `users`; accounts that exist already count as done.
pub async fn register(cli: &Cli, users: usize, concurrency: usize) -> anyhow::Result<()> {
    let semaphore = Arc::new(Semaphore::new(concurrency));
    let started = Instant::now();
    let tasks: Vec<_> = (1..=users)
        .map(|n| {
            let (target, semaphore) = (target(cli, n), semaphore.clone());
            let user = format!("{}{n}", cli.user_prefix);
            let password = cli.password.clone();
            tokio::spawn(async move {
                let _permit = semaphore.acquire().await.expect("open");
                Connection::register(&target, n, &user, &password).await
            })
        })
        .collect();
    let (mut created, mut existed, mut failures) = (0, 0, 0);
    for task in tasks {
        match task.await? {
            Ok(true) => created += 1,
            Ok(false) => existed += 1,
            Err(error) => {
                if failures < 5 {
                    eprintln!("registration failed: {error:#}");
                }
                failures += 1;
            }
        }
    }
    let report = RegisterReport {
        scenario: "register",
        users,
        created,
        existed,
        failures,
        seconds: started.elapsed().as_secs_f64(),
    };
    eprintln!(
        "{created} accounts created, {existed} existed, {failures} failed in {:.1} s",
        report.seconds
    );
    emit(cli, &report)?;
    anyhow::ensure!(failures == 0, "{failures} registrations failed");
    Ok(())
}
