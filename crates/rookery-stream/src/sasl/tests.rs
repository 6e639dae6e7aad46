//! SCRAM and PLAIN checked against the independent client of the `sasl` crate.

use super::*;
use sasl::client::Mechanism as _;
use sasl::client::mechanisms::Scram as ScramClient;
use sasl::common::ChannelBinding;
use sasl::common::scram::{Sha1 as ClientSha1, Sha256 as ClientSha256};

fn exchange(
    hash: ScramHash,
    stored_password: &str,
    client_password: &str,
    user: &str,
) -> Result<(), SaslError> {
    let keys = ScramKeys::generate(hash, stored_password, 4096).unwrap();
    let mut client: Box<dyn sasl::client::Mechanism> = match hash {
        ScramHash::Sha1 => Box::new(
            ScramClient::<ClientSha1>::new(user, client_password, ChannelBinding::None).unwrap(),
        ),
        ScramHash::Sha256 => Box::new(
            ScramClient::<ClientSha256>::new(user, client_password, ChannelBinding::None).unwrap(),
        ),
    };
    let mut server = ScramServer::new(hash, decoy([7; 32]));
    let initial = client.initial();
    let step = server.handle_initial(&initial)?;
    assert_eq!(
        step,
        SaslStep::NeedKeys {
            username: user.to_owned(),
            authzid: None
        }
    );
    let known = (user == "alice").then_some(keys);
    let SaslStep::Challenge(challenge) = server.handle_keys(known)? else {
        panic!("no challenge")
    };
    let response = client
        .response(&challenge)
        .expect("client accepts our challenge");
    let SaslStep::Success(data) = server.handle_response(&response)? else {
        panic!("no success")
    };
    client
        .success(&data)
        .expect("client verifies the server signature");
    Ok(())
}

#[test]
fn scram_sha1_and_sha256_succeed_with_the_right_password() {
    exchange(ScramHash::Sha1, "pencil", "pencil", "alice").unwrap();
    exchange(ScramHash::Sha256, "pencil", "pencil", "alice").unwrap();
}

#[test]
fn scram_rejects_a_wrong_password_and_an_unknown_user() {
    assert_eq!(
        exchange(ScramHash::Sha256, "pencil", "pen", "alice"),
        Err(SaslError::NotAuthorized)
    );
    assert_eq!(
        exchange(ScramHash::Sha1, "pencil", "pencil", "mallory"),
        Err(SaslError::NotAuthorized)
    );
}

#[test]
fn scram_rejects_a_tampered_nonce() {
    let keys = ScramKeys::generate(ScramHash::Sha256, "pencil", 4096).unwrap();
    let mut client =
        ScramClient::<ClientSha256>::new("alice", "pencil", ChannelBinding::None).unwrap();
    let mut server = ScramServer::new(ScramHash::Sha256, decoy([1; 32]));
    server.handle_initial(&client.initial()).unwrap();
    let SaslStep::Challenge(challenge) = server.handle_keys(Some(keys)).unwrap() else {
        panic!()
    };
    let response = String::from_utf8(client.response(&challenge).unwrap()).unwrap();
    let tampered = response.replacen(",r=", ",r=x", 1);
    assert_eq!(
        server.handle_response(tampered.as_bytes()),
        Err(SaslError::NotAuthorized)
    );
}

#[test]
fn scram_parses_escaped_names_and_rejects_garbage() {
    let mut server = ScramServer::new(ScramHash::Sha1, decoy([0; 32]));
    assert_eq!(
        server.handle_initial(b"n,,n=a=2Cb=3Dc,r=abc"),
        Ok(SaslStep::NeedKeys {
            username: "a,b=c".into(),
            authzid: None
        })
    );
    for garbage in [
        &b""[..],
        b"n",
        b"n,,",
        b"x,,n=a,r=b",
        b"n,,r=b,n=a",
        b"n,,n=a=2,r=b",
        b"n,,n=,r=b",
        b"\xff,,n=a,r=b",
    ] {
        let mut server = ScramServer::new(ScramHash::Sha1, decoy([0; 32]));
        assert_eq!(
            server.handle_initial(garbage),
            Err(SaslError::Malformed),
            "{garbage:?}"
        );
    }
    let mut server = ScramServer::new(ScramHash::Sha1, decoy([0; 32]));
    assert_eq!(
        server.handle_initial(b"p=tls-unique,,n=a,r=b"),
        Err(SaslError::ChannelBinding)
    );
}

fn decoy(secret: [u8; 32]) -> Decoy {
    Decoy {
        secret,
        iterations: MIN_ITERATIONS,
    }
}

/// The challenge's `s=` and `i=` for `user`, known (with `keys`) or not.
fn salt_and_iterations(decoy: Decoy, user: &str, keys: Option<ScramKeys>) -> (String, String) {
    let mut server = ScramServer::new(ScramHash::Sha256, decoy);
    server
        .handle_initial(format!("n,,n={user},r=abc").as_bytes())
        .unwrap();
    let SaslStep::Challenge(c) = server.handle_keys(keys).unwrap() else {
        panic!()
    };
    let c = String::from_utf8(c).unwrap();
    let field = |prefix: &str| {
        c.split(',')
            .find(|p| p.starts_with(prefix))
            .unwrap()
            .to_owned()
    };
    (field("s="), field("i="))
}

#[test]
fn unknown_users_get_a_stable_decoy_salt_and_the_real_iteration_count() {
    let decoy = |secret| Decoy {
        secret,
        iterations: 6000,
    };
    let ghost = salt_and_iterations(decoy([3; 32]), "ghost", None);
    assert_eq!(ghost, salt_and_iterations(decoy([3; 32]), "ghost", None));
    assert_ne!(
        ghost.0,
        salt_and_iterations(decoy([4; 32]), "ghost", None).0
    );
    assert_ne!(
        ghost.0,
        salt_and_iterations(decoy([3; 32]), "other", None).0
    );
    // The same count as an account made with the configured iterations.
    let keys = ScramKeys::generate(ScramHash::Sha256, "pencil", 6000).unwrap();
    let alice = salt_and_iterations(decoy([3; 32]), "alice", Some(keys));
    assert_eq!(ghost.1, "i=6000");
    assert_eq!(alice.1, ghost.1);
}

#[test]
fn keys_never_contain_the_password_and_verify_plain() {
    let keys = ScramKeys::generate(ScramHash::Sha256, "correct horse", 4096).unwrap();
    assert!(keys.iterations >= MIN_ITERATIONS);
    assert_eq!(keys.salt.len(), 16);
    assert!(keys.verify_password("correct horse"));
    assert!(!keys.verify_password("correct horsE"));
    let other = ScramKeys::generate(ScramHash::Sha256, "correct horse", 4096).unwrap();
    assert_ne!(keys.salt, other.salt, "each derivation gets its own salt");
    assert_ne!(keys.stored_key, other.stored_key);
    // Iteration counts below the minimum are raised to it.
    assert_eq!(
        ScramKeys::derive(ScramHash::Sha1, "x", b"salt", 1)
            .unwrap()
            .iterations,
        MIN_ITERATIONS
    );
}

#[test]
fn plain_messages_parse_with_saslprep() {
    let creds = parse_plain(b"\0alice\0secret").unwrap();
    assert_eq!(
        (
            creds.authzid,
            creds.username.as_str(),
            creds.password.as_str()
        ),
        (None, "alice", "secret")
    );
    let creds = parse_plain(b"alice@localhost\0alice\0I\xC2\xADX").unwrap();
    assert_eq!(creds.authzid.as_deref(), Some("alice@localhost"));
    assert_eq!(creds.password, "IX", "soft hyphen is mapped to nothing");
    for garbage in [
        &b""[..],
        b"alice",
        b"\0alice",
        b"\0\0pw",
        b"\0alice\0",
        b"a\0b\0c\0d",
    ] {
        assert_eq!(
            parse_plain(garbage),
            Err(SaslError::Malformed),
            "{garbage:?}"
        );
    }
}

mod properties {
    //! SCRAM and PLAIN parsing over generated input.

    use proptest::prelude::*;

    use super::*;

    /// RFC 5802 saslname encoding: ',' as "=2C" and '=' as "=3D".
    fn encode_saslname(name: &str) -> String {
        name.replace('=', "=3D").replace(',', "=2C")
    }

    fn names() -> impl Strategy<Value = String> {
        prop::collection::vec(
            prop_oneof![
                Just('a'),
                Just('Z'),
                Just(','),
                Just('='),
                Just('é'),
                Just(' '),
                Just('\u{00A0}'),
                Just('\u{200B}'),
                Just('日'),
                Just('\u{0}'),
            ],
            0..10,
        )
        .prop_map(|chars| chars.into_iter().collect())
    }

    proptest! {
        #[test]
        fn any_user_name_survives_the_saslname_encoding(name in names(), nonce in "[a-zA-Z0-9+/]{1,24}") {
            let message = format!("n,,n={},r={nonce}", encode_saslname(&name));
            let mut server = ScramServer::new(ScramHash::Sha256, decoy([1; 32]));
            match server.handle_initial(message.as_bytes()) {
                Ok(SaslStep::NeedKeys { username, authzid }) => {
                    // What comes out is the SASLprepped name, and only when it has one.
                    let prepped = stringprep::saslprep(&name).unwrap();
                    prop_assert_eq!(username, prepped.into_owned());
                    prop_assert_eq!(authzid, None);
                }
                Err(SaslError::Malformed) => {
                    prop_assert!(stringprep::saslprep(&name).map_or(true, |p| p.is_empty()));
                }
                other => prop_assert!(false, "{:?}", other),
            }
        }

        #[test]
        fn any_client_messages_are_answered_and_never_succeed(
            first in prop::collection::vec(any::<u8>(), 0..80),
            last in prop::collection::vec(any::<u8>(), 0..160),
        ) {
            for keys in [None, Some(ScramKeys::derive(ScramHash::Sha1, "pw", b"salt", 4096).unwrap())] {
                let mut server = ScramServer::new(ScramHash::Sha1, decoy([2; 32]));
                if let Ok(SaslStep::NeedKeys { .. }) = server.handle_initial(&first) {
                    prop_assert!(matches!(server.handle_keys(keys), Ok(SaslStep::Challenge(_))));
                    prop_assert!(!matches!(server.handle_response(&last), Ok(SaslStep::Success(_))));
                }
            }
        }

        #[test]
        fn plain_messages_parse_to_their_parts_or_fail(
            authzid in names(),
            user in names(),
            password in names(),
        ) {
            let message = format!("{authzid}\0{user}\0{password}");
            match parse_plain(message.as_bytes()) {
                Ok(credentials) => {
                    prop_assert!(!authzid.contains('\0') && !user.contains('\0') && !password.contains('\0'));
                    prop_assert_eq!(credentials.authzid, (!authzid.is_empty()).then(|| authzid.clone()));
                    prop_assert_eq!(credentials.username, stringprep::saslprep(&user).unwrap().into_owned());
                    prop_assert!(!credentials.password.is_empty());
                }
                Err(error) => prop_assert_eq!(error, SaslError::Malformed),
            }
        }
    }
}
