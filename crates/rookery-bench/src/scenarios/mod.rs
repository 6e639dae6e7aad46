//! One module per scenario.

pub mod chat;
pub mod connections;
pub mod failover;
pub mod login_storm;
pub mod presence;
pub mod register;

use std::time::{Duration, Instant};

use rookery_bench::client::Sender;

/// Each sender sends what its `next` makes, `per_user` times a second for
/// `duration` seconds, the senders' ticks spread evenly over the interval;
/// gives the senders back when all are done. A late tick is caught up.
pub async fn send_paced<M>(
    senders: Vec<(Sender, M)>,
    per_user: f64,
    duration: u64,
) -> anyhow::Result<Vec<Sender>>
where
    M: FnMut() -> String + Send + 'static,
{
    let count = senders.len();
    let interval = Duration::from_secs_f64(1.0 / per_user);
    let tasks: Vec<_> = senders
        .into_iter()
        .enumerate()
        .map(|(index, (mut sender, mut next))| {
            tokio::spawn(async move {
                tokio::time::sleep(interval.mul_f64(index as f64 / count as f64)).await;
                let mut ticker = tokio::time::interval(interval);
                ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
                let end = Instant::now() + Duration::from_secs(duration);
                while Instant::now() < end {
                    ticker.tick().await;
                    if sender.send(&next()).await.is_err() {
                        break;
                    }
                }
                sender
            })
        })
        .collect();
    let mut senders = Vec::with_capacity(count);
    for task in tasks {
        senders.push(task.await?);
    }
    Ok(senders)
}
