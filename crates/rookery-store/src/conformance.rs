//! The storage conformance suite: the same checks run against every backend.
//!
//! A backend's test file calls [`store_conformance_tests!`](crate::store_conformance_tests)
//! with an expression that builds a fresh, empty store; the macro expands to
//! one `#[tokio::test]` per check.

use jid::{BareJid, Jid};
use rookery_stream::{ScramHash, ScramKeys};

use crate::{
    DocumentKind, LastActivity, OfflineMessage, Quota, RosterItem, Store, StoreError,
    StoredOffline, Subscription,
};

fn items(items: usize) -> Quota {
    Quota {
        items,
        bytes: usize::MAX,
    }
}

fn jid(s: &str) -> BareJid {
    BareJid::new(s).expect("valid test JID")
}

fn keys(password: &str) -> Vec<ScramKeys> {
    [ScramHash::Sha1, ScramHash::Sha256]
        .into_iter()
        .map(|hash| ScramKeys::generate(hash, password, 4096).expect("derivable"))
        .collect()
}

/// Accounts are created once, listed per domain, and keep one key set per hash.
pub async fn accounts(store: &dyn Store) {
    let alice = jid("alice@localhost");
    assert!(!store.account_exists(&alice).await.unwrap());
    store.create_account(&alice, &keys("secret")).await.unwrap();
    assert!(store.account_exists(&alice).await.unwrap());
    assert!(matches!(
        store.create_account(&alice, &keys("other")).await,
        Err(StoreError::AlreadyExists)
    ));
    store
        .create_account(&jid("bob@localhost"), &keys("b"))
        .await
        .unwrap();
    store
        .create_account(&jid("carol@example.org"), &keys("c"))
        .await
        .unwrap();
    assert_eq!(
        store.list_accounts("localhost").await.unwrap(),
        vec![alice.clone(), jid("bob@localhost")]
    );

    let sha256 = store
        .keys(&alice, ScramHash::Sha256)
        .await
        .unwrap()
        .expect("sha256 keys");
    assert_eq!(sha256.hash, ScramHash::Sha256);
    assert!(sha256.verify_password("secret"));
    let sha1 = store
        .keys(&alice, ScramHash::Sha1)
        .await
        .unwrap()
        .expect("sha1 keys");
    assert!(sha1.verify_password("secret"));
    assert_ne!(sha1.salt, sha256.salt);
    assert!(
        store
            .keys(&jid("nobody@localhost"), ScramHash::Sha1)
            .await
            .unwrap()
            .is_none()
    );
}

/// Password changes replace the keys; unknown accounts are refused.
pub async fn password_change(store: &dyn Store) {
    let alice = jid("alice@localhost");
    store.create_account(&alice, &keys("old")).await.unwrap();
    store.set_keys(&alice, &keys("new")).await.unwrap();
    let stored = store
        .keys(&alice, ScramHash::Sha256)
        .await
        .unwrap()
        .unwrap();
    assert!(stored.verify_password("new") && !stored.verify_password("old"));
    assert!(matches!(
        store.set_keys(&jid("ghost@localhost"), &keys("x")).await,
        Err(StoreError::NoSuchAccount)
    ));
}

/// Deleting an account deletes everything stored for it, and nothing of others.
pub async fn account_deletion_cascades(store: &dyn Store) {
    let alice = jid("alice@localhost");
    let bob = jid("bob@localhost");
    for user in [&alice, &bob] {
        store.create_account(user, &keys("pw")).await.unwrap();
        store
            .put_roster_item(user, &RosterItem::new(jid("x@localhost")))
            .await
            .unwrap();
        store
            .put_subscription_request(user, &jid("y@localhost"), "<presence/>")
            .await
            .unwrap();
        store
            .push_offline(
                user,
                &OfflineMessage {
                    stored_at: 1,
                    stanza: "<message/>".into(),
                },
                items(10),
            )
            .await
            .unwrap();
        store
            .put_document(
                user,
                DocumentKind::VCARD,
                "",
                "<vCard xmlns='vcard-temp'/>",
                Quota::UNLIMITED,
            )
            .await
            .unwrap();
        store
            .block(user, &[Jid::new("spam@example.org").unwrap()])
            .await
            .unwrap();
        store
            .set_last_activity(
                user,
                &LastActivity {
                    at: 5,
                    status: None,
                },
            )
            .await
            .unwrap();
    }
    assert!(store.delete_account(&alice).await.unwrap());
    assert!(!store.delete_account(&alice).await.unwrap());
    assert!(!store.account_exists(&alice).await.unwrap());
    assert!(store.roster(&alice).await.unwrap().items.is_empty());
    assert!(
        store
            .subscription_requests(&alice)
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(store.count_offline(&alice).await.unwrap(), 0);
    assert!(
        store
            .document(&alice, DocumentKind::VCARD, "")
            .await
            .unwrap()
            .is_none()
    );
    assert!(store.blocklist(&alice).await.unwrap().is_empty());
    assert!(store.last_activity(&alice).await.unwrap().is_none());
    // Bob keeps everything.
    assert_eq!(store.roster(&bob).await.unwrap().items.len(), 1);
    assert_eq!(store.count_offline(&bob).await.unwrap(), 1);
    assert_eq!(store.blocklist(&bob).await.unwrap().len(), 1);
}

/// Roster items round-trip with every field, and each change bumps the version.
pub async fn roster_items_and_versions(store: &dyn Store) {
    let alice = jid("alice@localhost");
    let empty = store.roster(&alice).await.unwrap();
    assert!(empty.items.is_empty());
    let mut bob = RosterItem::new(jid("bob@localhost"));
    bob.name = Some("Bob 'the builder' <b>".into());
    bob.subscription = Subscription::To;
    bob.ask = true;
    bob.groups = vec!["Friends".into(), "Work & Play".into()];
    let v1 = store.put_roster_item(&alice, &bob).await.unwrap();
    assert!(v1 > empty.version);
    let mut carol = RosterItem::new(jid("carol@example.org"));
    carol.approved = true;
    let v2 = store.put_roster_item(&alice, &carol).await.unwrap();
    assert!(v2 > v1);
    let roster = store.roster(&alice).await.unwrap();
    assert_eq!(roster.version, v2);
    assert_eq!(roster.items, vec![bob.clone(), carol.clone()]);
    assert_eq!(
        store.roster_item(&alice, &bob.jid).await.unwrap(),
        Some(bob.clone())
    );

    bob.groups = vec![];
    bob.subscription = Subscription::Both;
    bob.ask = false;
    let v3 = store.put_roster_item(&alice, &bob).await.unwrap();
    assert!(v3 > v2);
    assert_eq!(
        store.roster_item(&alice, &bob.jid).await.unwrap(),
        Some(bob.clone())
    );

    let v4 = store
        .remove_roster_item(&alice, &carol.jid)
        .await
        .unwrap()
        .expect("removed");
    assert!(v4 > v3);
    assert_eq!(
        store.remove_roster_item(&alice, &carol.jid).await.unwrap(),
        None
    );
    assert_eq!(
        store.roster(&alice).await.unwrap(),
        crate::Roster {
            version: v4,
            items: vec![bob]
        }
    );
    // Other users' rosters are separate.
    assert!(
        store
            .roster(&jid("bob@localhost"))
            .await
            .unwrap()
            .items
            .is_empty()
    );
}

/// Inbound subscription requests are kept (once per contact) until answered.
pub async fn subscription_requests(store: &dyn Store) {
    let alice = jid("alice@localhost");
    store
        .put_subscription_request(
            &alice,
            &jid("bob@localhost"),
            "<presence type='subscribe'/>",
        )
        .await
        .unwrap();
    store
        .put_subscription_request(
            &alice,
            &jid("carol@localhost"),
            "<presence type='subscribe'>c</presence>",
        )
        .await
        .unwrap();
    store
        .put_subscription_request(
            &alice,
            &jid("bob@localhost"),
            "<presence type='subscribe'>again</presence>",
        )
        .await
        .unwrap();
    let requests = store.subscription_requests(&alice).await.unwrap();
    assert_eq!(requests.len(), 2);
    assert!(requests.contains(&(
        jid("bob@localhost"),
        "<presence type='subscribe'>again</presence>".into()
    )));
    assert!(
        store
            .remove_subscription_request(&alice, &jid("bob@localhost"))
            .await
            .unwrap()
    );
    assert!(
        !store
            .remove_subscription_request(&alice, &jid("bob@localhost"))
            .await
            .unwrap()
    );
    assert_eq!(store.subscription_requests(&alice).await.unwrap().len(), 1);
}

/// Offline messages come back in order and respect the quota; reading does
/// not remove them, removing does, once, and only the user's own.
pub async fn offline_messages(store: &dyn Store) {
    let alice = jid("alice@localhost");
    let bob = jid("bob@localhost");
    for n in 0..3 {
        let message = OfflineMessage {
            stored_at: 1000 + n,
            stanza: format!("<message id='{n}'/>"),
        };
        store
            .push_offline(&alice, &message, items(3))
            .await
            .unwrap();
    }
    let overflow = OfflineMessage {
        stored_at: 2000,
        stanza: "<message id='x'/>".into(),
    };
    assert!(matches!(
        store.push_offline(&alice, &overflow, items(3)).await,
        Err(StoreError::QuotaExceeded)
    ));
    assert_eq!(store.count_offline(&alice).await.unwrap(), 3);
    let read = store
        .read_offline(&alice, 0, Quota::UNLIMITED)
        .await
        .unwrap();
    assert_eq!(
        read.iter()
            .map(|m| m.message.stanza.as_str())
            .collect::<Vec<_>>(),
        [
            "<message id='0'/>",
            "<message id='1'/>",
            "<message id='2'/>"
        ]
    );
    assert_eq!(read[0].message.stored_at, 1000);
    assert!(read.windows(2).all(|pair| pair[0].id < pair[1].id));
    // Read again: still there. After the first id: the other two.
    assert_eq!(
        store
            .read_offline(&alice, 0, Quota::UNLIMITED)
            .await
            .unwrap(),
        read
    );
    assert_eq!(
        store
            .read_offline(&alice, read[0].id, Quota::UNLIMITED)
            .await
            .unwrap(),
        read[1..]
    );
    // Another user's ids remove nothing of alice's.
    let ids: Vec<i64> = read.iter().map(|m| m.id).collect();
    assert_eq!(store.remove_offline(&bob, &ids).await.unwrap(), 0);
    assert_eq!(store.remove_offline(&alice, &ids[..2]).await.unwrap(), 2);
    assert_eq!(store.remove_offline(&alice, &ids[..2]).await.unwrap(), 0);
    assert_eq!(store.remove_offline(&alice, &[]).await.unwrap(), 0);
    assert_eq!(
        store
            .read_offline(&alice, 0, Quota::UNLIMITED)
            .await
            .unwrap(),
        read[2..]
    );
    assert_eq!(store.remove_offline(&alice, &ids).await.unwrap(), 1);
    assert!(
        store
            .read_offline(&alice, 0, Quota::UNLIMITED)
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(store.count_offline(&alice).await.unwrap(), 0);
}

/// The byte quota counts every stored message; pages come oldest first
/// within their item and byte bounds, the oldest message even when alone
/// over the byte bound.
pub async fn offline_messages_in_bytes_and_pages(store: &dyn Store) {
    let alice = jid("alice@localhost");
    let quota = Quota {
        items: 100,
        bytes: 1000,
    };
    let message = |n: usize, size: usize| OfflineMessage {
        stored_at: n as i64,
        stanza: format!("<message id='{n}'>{}</message>", "x".repeat(size - 26)),
    };
    for n in 0..3 {
        store
            .push_offline(&alice, &message(n, 300), quota)
            .await
            .unwrap();
    }
    assert_eq!(message(0, 300).stanza.len(), 300);
    // 900 stored: 101 more bytes do not fit, 100 do.
    assert!(matches!(
        store.push_offline(&alice, &message(9, 101), quota).await,
        Err(StoreError::QuotaExceeded)
    ));
    store
        .push_offline(&alice, &message(3, 100), quota)
        .await
        .unwrap();
    assert_eq!(store.count_offline(&alice).await.unwrap(), 4);
    // Pages read one after the other, each after the last id of the one before.
    let stamps =
        |page: &[StoredOffline]| -> Vec<i64> { page.iter().map(|m| m.message.stored_at).collect() };
    let page = Quota {
        items: 10,
        bytes: 650,
    };
    let first = store.read_offline(&alice, 0, page).await.unwrap();
    assert_eq!(stamps(&first), [0, 1]);
    let one = Quota {
        items: 1,
        bytes: usize::MAX,
    };
    let second = store.read_offline(&alice, first[1].id, one).await.unwrap();
    assert_eq!(stamps(&second), [2]);
    let tiny = Quota {
        items: 10,
        bytes: 10,
    };
    let third = store
        .read_offline(&alice, second[0].id, tiny)
        .await
        .unwrap();
    assert_eq!(stamps(&third), [3]);
    assert!(
        store
            .read_offline(&alice, third[0].id, tiny)
            .await
            .unwrap()
            .is_empty()
    );
    // Read messages still count against the quota; removed ones no longer.
    assert!(matches!(
        store.push_offline(&alice, &message(4, 1000), quota).await,
        Err(StoreError::QuotaExceeded)
    ));
    let all: Vec<i64> = store
        .read_offline(&alice, 0, Quota::UNLIMITED)
        .await
        .unwrap()
        .iter()
        .map(|m| m.id)
        .collect();
    assert_eq!(store.remove_offline(&alice, &all).await.unwrap(), 4);
    store
        .push_offline(&alice, &message(4, 1000), quota)
        .await
        .unwrap();
}

/// Documents of one kind are limited in number and bytes; replacing one
/// counts its new size, not both.
pub async fn documents_within_quota(store: &dyn Store) {
    let alice = jid("alice@localhost");
    let quota = Quota {
        items: 2,
        bytes: 100,
    };
    let doc = |size: usize| "d".repeat(size);
    store
        .put_document(&alice, DocumentKind::PRIVATE, "urn:a", &doc(60), quota)
        .await
        .unwrap();
    assert!(matches!(
        store
            .put_document(&alice, DocumentKind::PRIVATE, "urn:b", &doc(41), quota)
            .await,
        Err(StoreError::QuotaExceeded)
    ));
    store
        .put_document(&alice, DocumentKind::PRIVATE, "urn:b", &doc(40), quota)
        .await
        .unwrap();
    // Replacing urn:a with 60 bytes fits (40 + 60), with 61 does not.
    store
        .put_document(&alice, DocumentKind::PRIVATE, "urn:a", &doc(60), quota)
        .await
        .unwrap();
    assert!(matches!(
        store
            .put_document(&alice, DocumentKind::PRIVATE, "urn:a", &doc(61), quota)
            .await,
        Err(StoreError::QuotaExceeded)
    ));
    assert_eq!(
        store
            .document(&alice, DocumentKind::PRIVATE, "urn:a")
            .await
            .unwrap(),
        Some(doc(60)),
        "a refused write leaves the document"
    );
    // A third document is one too many; another kind has its own quota.
    assert!(matches!(
        store
            .put_document(&alice, DocumentKind::PRIVATE, "urn:c", "c", quota)
            .await,
        Err(StoreError::QuotaExceeded)
    ));
    store
        .put_document(&alice, DocumentKind::VCARD, "", &doc(100), quota)
        .await
        .unwrap();
}

/// A server secret is made once and then always the same.
pub async fn server_secrets(store: &dyn Store) {
    let first = store.server_secret("decoy").await.unwrap();
    assert_eq!(store.server_secret("decoy").await.unwrap(), first);
    assert_ne!(store.server_secret("other").await.unwrap(), first);
    assert_ne!(first, [0; 32]);
}

/// Concurrent writers never lose an offline message.
/// A conditional replace writes only over what the caller read.
pub async fn roster_item_replaced_only_if_unchanged(store: &dyn Store) {
    let alice = jid("alice@localhost");
    let mut bob = RosterItem::new(jid("bob@localhost"));
    bob.ask = true;
    let v1 = store
        .replace_roster_item(&alice, None, &bob)
        .await
        .unwrap()
        .expect("written over nothing");
    // Someone else created it first.
    assert_eq!(
        store.replace_roster_item(&alice, None, &bob).await.unwrap(),
        None
    );
    let mut both = bob.clone();
    both.subscription = Subscription::Both;
    both.ask = false;
    let stale = RosterItem::new(bob.jid.clone());
    assert_eq!(
        store
            .replace_roster_item(&alice, Some(&stale), &both)
            .await
            .unwrap(),
        None
    );
    let unchanged = store.roster(&alice).await.unwrap();
    assert_eq!(unchanged.version, v1, "a refused write leaves the version");
    assert_eq!(unchanged.items, vec![bob.clone()]);
    let v2 = store
        .replace_roster_item(&alice, Some(&bob), &both)
        .await
        .unwrap()
        .expect("written over what was read");
    assert!(v2 > v1);
    assert_eq!(
        store.roster_item(&alice, &bob.jid).await.unwrap(),
        Some(both)
    );
}

/// Concurrent read-modify-write cycles that retry on a refused replace lose
/// no change: each adds a group, and every group is there at the end.
pub async fn roster_item_changes_under_concurrency(store: &dyn Store) {
    let alice = jid("alice@localhost");
    let bob = jid("bob@localhost");
    let changes = (0..12).map(|n| {
        let (alice, bob) = (alice.clone(), bob.clone());
        async move {
            loop {
                let current = store.roster_item(&alice, &bob).await.unwrap();
                let mut item = current
                    .clone()
                    .unwrap_or_else(|| RosterItem::new(bob.clone()));
                item.groups.push(format!("g{n}"));
                if store
                    .replace_roster_item(&alice, current.as_ref(), &item)
                    .await
                    .unwrap()
                    .is_some()
                {
                    break;
                }
            }
        }
    });
    futures_join_all(changes).await;
    let mut groups = store
        .roster_item(&alice, &bob)
        .await
        .unwrap()
        .expect("item")
        .groups;
    groups.sort();
    let mut expected: Vec<String> = (0..12).map(|n| format!("g{n}")).collect();
    expected.sort();
    assert_eq!(groups, expected);
}

pub async fn offline_messages_under_concurrency(store: &dyn Store) {
    let alice = jid("alice@localhost");
    let pushes = (0..20).map(|n| {
        let alice = alice.clone();
        async move {
            let message = OfflineMessage {
                stored_at: n,
                stanza: format!("<message id='{n}'/>"),
            };
            store
                .push_offline(&alice, &message, items(1000))
                .await
                .unwrap();
        }
    });
    futures_join_all(pushes).await;
    let mut ids: Vec<String> = store
        .read_offline(&alice, 0, Quota::UNLIMITED)
        .await
        .unwrap()
        .into_iter()
        .map(|m| m.message.stanza)
        .collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 20);
}

async fn futures_join_all<F: std::future::Future<Output = ()>>(
    futures: impl IntoIterator<Item = F>,
) {
    // A tiny join_all: poll all futures to completion concurrently.
    let mut futures: Vec<std::pin::Pin<Box<F>>> = futures.into_iter().map(Box::pin).collect();
    std::future::poll_fn(move |cx| {
        futures.retain_mut(|future| future.as_mut().poll(cx).is_pending());
        if futures.is_empty() {
            std::task::Poll::Ready(())
        } else {
            std::task::Poll::Pending
        }
    })
    .await
}

/// Private XML and vCards are stored per user and key; empty deletes.
pub async fn documents(store: &dyn Store) {
    let alice = jid("alice@localhost");
    assert!(
        store
            .document(&alice, DocumentKind::PRIVATE, "urn:a")
            .await
            .unwrap()
            .is_none()
    );
    store
        .put_document(
            &alice,
            DocumentKind::PRIVATE,
            "urn:a",
            "<a xmlns='urn:a'>1</a>",
            Quota::UNLIMITED,
        )
        .await
        .unwrap();
    store
        .put_document(
            &alice,
            DocumentKind::PRIVATE,
            "urn:b",
            "<b xmlns='urn:b'/>",
            Quota::UNLIMITED,
        )
        .await
        .unwrap();
    store
        .put_document(
            &alice,
            DocumentKind::PRIVATE,
            "urn:a",
            "<a xmlns='urn:a'>2</a>",
            Quota::UNLIMITED,
        )
        .await
        .unwrap();
    store
        .put_document(
            &alice,
            DocumentKind::VCARD,
            "",
            "<vCard xmlns='vcard-temp'><FN>A</FN></vCard>",
            Quota::UNLIMITED,
        )
        .await
        .unwrap();
    assert_eq!(
        store
            .document(&alice, DocumentKind::PRIVATE, "urn:a")
            .await
            .unwrap()
            .as_deref(),
        Some("<a xmlns='urn:a'>2</a>")
    );
    assert_eq!(
        store
            .document(&alice, DocumentKind::PRIVATE, "urn:b")
            .await
            .unwrap()
            .as_deref(),
        Some("<b xmlns='urn:b'/>")
    );
    assert!(
        store
            .document(&alice, DocumentKind::VCARD, "")
            .await
            .unwrap()
            .unwrap()
            .contains("<FN>A</FN>")
    );
    assert!(
        store
            .document(&jid("bob@localhost"), DocumentKind::VCARD, "")
            .await
            .unwrap()
            .is_none()
    );
    store
        .put_document(&alice, DocumentKind::PRIVATE, "urn:a", "", Quota::UNLIMITED)
        .await
        .unwrap();
    assert!(
        store
            .document(&alice, DocumentKind::PRIVATE, "urn:a")
            .await
            .unwrap()
            .is_none()
    );
    // A module's own kind needs nothing of the backend: same key, apart
    // from the other kinds, with a quota of its own.
    const BOOKMARKS: DocumentKind = DocumentKind::new("test-bookmarks");
    let one = Quota {
        items: 1,
        bytes: 1000,
    };
    store
        .put_document(&alice, BOOKMARKS, "urn:b", "<x/>", one)
        .await
        .unwrap();
    assert_eq!(
        store
            .document(&alice, BOOKMARKS, "urn:b")
            .await
            .unwrap()
            .as_deref(),
        Some("<x/>")
    );
    assert_eq!(
        store
            .document(&alice, DocumentKind::PRIVATE, "urn:b")
            .await
            .unwrap()
            .as_deref(),
        Some("<b xmlns='urn:b'/>")
    );
    assert!(matches!(
        store
            .put_document(&alice, BOOKMARKS, "urn:c", "<y/>", one)
            .await,
        Err(StoreError::QuotaExceeded)
    ));
}

/// Block lists add and remove JIDs of any form, reporting what changed.
pub async fn blocking(store: &dyn Store) {
    let alice = jid("alice@localhost");
    let spam = Jid::new("spam@example.org").unwrap();
    let domain = Jid::new("evil.example").unwrap();
    let full = Jid::new("bob@localhost/phone").unwrap();
    assert_eq!(
        store
            .block(&alice, &[spam.clone(), domain.clone()])
            .await
            .unwrap()
            .len(),
        2
    );
    assert_eq!(
        store
            .block(&alice, &[spam.clone(), full.clone()])
            .await
            .unwrap(),
        vec![full.clone()]
    );
    let mut list = store.blocklist(&alice).await.unwrap();
    list.sort_by(|a, b| a.as_str().cmp(b.as_str()));
    assert_eq!(list, vec![full.clone(), domain.clone(), spam.clone()]);
    assert_eq!(
        store
            .unblock(&alice, &[spam.clone(), Jid::new("never@blocked").unwrap()])
            .await
            .unwrap(),
        vec![spam]
    );
    let mut removed = store.unblock(&alice, &[]).await.unwrap();
    removed.sort_by(|a, b| a.as_str().cmp(b.as_str()));
    assert_eq!(removed, vec![full, domain]);
    assert!(store.blocklist(&alice).await.unwrap().is_empty());
}

/// Last activity is kept per account and replaced on update.
pub async fn last_activity(store: &dyn Store) {
    let alice = jid("alice@localhost");
    assert!(store.last_activity(&alice).await.unwrap().is_none());
    store
        .set_last_activity(
            &alice,
            &LastActivity {
                at: 100,
                status: Some("gone".into()),
            },
        )
        .await
        .unwrap();
    store
        .set_last_activity(
            &alice,
            &LastActivity {
                at: 200,
                status: None,
            },
        )
        .await
        .unwrap();
    assert_eq!(
        store.last_activity(&alice).await.unwrap(),
        Some(LastActivity {
            at: 200,
            status: None
        })
    );
}

/// Expands to one `#[tokio::test]` per conformance check.
///
/// `$make` is an async expression evaluating to something that derefs to a
/// `dyn Store` (for example `Arc<dyn Store>` or a guard owning a temporary database).
#[macro_export]
macro_rules! store_conformance_tests {
    ($make:expr) => {
        $crate::store_conformance_tests!(@each $make;
            accounts, password_change, account_deletion_cascades, roster_items_and_versions,
            roster_item_replaced_only_if_unchanged, roster_item_changes_under_concurrency,
            subscription_requests, offline_messages, offline_messages_under_concurrency,
            documents, blocking, last_activity, offline_messages_in_bytes_and_pages,
            documents_within_quota, server_secrets);
    };
    (@each $make:expr; $($check:ident),*) => {
        $(
            #[tokio::test]
            async fn $check() {
                let store = $make.await;
                $crate::conformance::$check(&*store).await;
            }
        )*
    };
}
