//! Users in a ring who ask their neighbours for subscriptions all at once and
//! approve each other's requests while their own are in flight: every roster
//! item is changed by both of its users' sessions at the same moment.

use std::net::SocketAddr;

use crate::TestClient;

const ROSTER: &str = "jabber:iq:roster";

/// `users` users `{prefix}0`, `{prefix}1`, ... (password `secret`, existing
/// already), user `n` logged in at `address(n)`, each asking its `half`
/// neighbours on either side. Returns the users whose roster does not end
/// with one `both` item, without `ask`, per neighbour, with what it holds.
pub async fn ask_each_other_in_a_ring(
    prefix: &str,
    users: usize,
    half: usize,
    address: impl Fn(usize) -> SocketAddr,
) -> Vec<String> {
    let contacts = |n: usize| -> Vec<String> {
        (1..=half)
            .flat_map(|k| [(n + k) % users, (n + users - k) % users])
            .map(|c| format!("{prefix}{c}@localhost"))
            .collect()
    };
    let mut clients = Vec::new();
    for n in 0..users {
        let name = format!("{prefix}{n}");
        clients.push(TestClient::online(address(n), &name, "secret", "r").await);
    }
    let tasks: Vec<_> = clients
        .into_iter()
        .enumerate()
        .map(|(n, mut client)| {
            let contacts = contacts(n);
            tokio::spawn(async move {
                let requests: String = contacts
                    .iter()
                    .map(|c| format!("<presence type='subscribe' to='{c}'/>"))
                    .collect();
                client.send(&requests).await;
                let (mut approved, mut answered) = (0, 0);
                while approved < contacts.len() || answered < contacts.len() {
                    let element = client.recv().await;
                    let from = element.attr("from").unwrap_or_default().to_owned();
                    match (element.name(), element.attr("type")) {
                        ("presence", Some("subscribe")) => {
                            client
                                .send(&format!("<presence type='subscribed' to='{from}'/>"))
                                .await;
                            answered += 1;
                        }
                        ("presence", Some("subscribed")) => approved += 1,
                        _ => {}
                    }
                }
                client
            })
        })
        .collect();
    let mut clients = Vec::new();
    for task in tasks {
        clients.push(task.await.expect("client task"));
    }
    // Every change has been applied once the answers to these arrive.
    tokio::time::sleep(std::time::Duration::from_millis(400)).await;
    let mut wrong = Vec::new();
    for (n, client) in clients.iter_mut().enumerate() {
        let roster = client
            .iq(&format!("<iq type='get'><query xmlns='{ROSTER}'/></iq>"))
            .await;
        let query = roster.get_child("query", ROSTER).expect("roster");
        let items: Vec<String> = query.children().map(String::from).collect();
        let mutual = query
            .children()
            .all(|item| (item.attr("subscription"), item.attr("ask")) == (Some("both"), None));
        if items.len() != 2 * half || !mutual {
            wrong.push(format!("{prefix}{n}: {items:?}"));
        }
    }
    wrong
}
