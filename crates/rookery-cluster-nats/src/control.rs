//! Requests between nodes: take a session over for a resuming client, close
//! a session.

use super::*;

/// Answers take-over and close requests from other nodes.
pub(crate) async fn serve_control(bus: Arc<NatsBus>) {
    loop {
        let mut requests = match bus.client.subscribe(subjects::control(bus.node)).await {
            Ok(subscriber) => subscriber,
            Err(error) => {
                tracing::warn!(%error, "Control requests cannot be received; retrying.");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        while let Some(request) = requests.next().await {
            let Ok(control) = serde_json::from_slice::<Control>(&request.payload) else {
                continue;
            };
            match control {
                Control::TakeOver { jid, session } => {
                    let answer = take_over_here(&bus, &jid, SessionId(session)).await;
                    if let Some(reply) = request.reply {
                        let payload = answer
                            .and_then(|snapshot| serde_json::to_vec(&snapshot).ok())
                            .unwrap_or_default();
                        let _ = bus.client.publish(reply, payload.into()).await;
                    }
                }
                Control::Close {
                    jid,
                    session,
                    condition,
                    content,
                } => {
                    let Ok(jid) = FullJid::new(&jid) else {
                        continue;
                    };
                    let local = bus.local.read().expect("local lock").get(&jid).cloned();
                    if let Some((own, mailbox)) = local
                        && own == SessionId(session)
                    {
                        let _ = mailbox.send(Mail::Close(codec::stream_error(&condition, content)));
                    }
                }
            }
        }
    }
}

/// Takes a local session over for a node that resumes it, with what waited in its inbox.
pub(crate) async fn take_over_here(
    bus: &NatsBus,
    jid: &str,
    session: SessionId,
) -> Option<WireSnapshot> {
    let jid = FullJid::new(jid).ok()?;
    let (own, mailbox) = bus.local.read().expect("local lock").get(&jid).cloned()?;
    if own != session {
        return None;
    }
    let mut snapshot = rookery_cluster::take_over_local(&mailbox).await?;
    bus.local.write().expect("local lock").remove(&jid);
    if let Some(mut inbox) = snapshot.inbox.take() {
        inbox.close();
        while let Some(mail) = inbox.try_recv() {
            if let Mail::Stanza { stanza, receipt } = mail {
                snapshot.sm.sent(*stanza);
                if let Some(receipt) = receipt {
                    snapshot.receipts.push((snapshot.sm.sent_count(), receipt));
                }
            }
        }
    }
    // The node taking the session over holds its deliveries from now on.
    for (_, receipt) in &snapshot.receipts {
        bus.release(receipt);
    }
    Some(WireSnapshot::from_snapshot(&snapshot, bus.node))
}
