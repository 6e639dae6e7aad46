//! SASL server mechanisms (RFC 4422): SCRAM-SHA-1 and SCRAM-SHA-256 (RFC 5802, RFC 7677) and PLAIN (RFC 4616).
//!
//! Credentials are only ever held as salted SCRAM keys ([`ScramKeys`]): the
//! stored key and server key derived from the password, never the password
//! nor the salted password itself.

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use hmac::{KeyInit, Mac};
use subtle::ConstantTimeEq;

/// The hash function behind a SCRAM variant.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ScramHash {
    /// SCRAM-SHA-1 (RFC 5802).
    Sha1,
    /// SCRAM-SHA-256 (RFC 7677).
    Sha256,
}

impl ScramHash {
    /// The SASL mechanism name of this variant.
    pub fn mechanism(self) -> &'static str {
        match self {
            ScramHash::Sha1 => "SCRAM-SHA-1",
            ScramHash::Sha256 => "SCRAM-SHA-256",
        }
    }

    /// The short name used in storage and logs.
    pub fn name(self) -> &'static str {
        match self {
            ScramHash::Sha1 => "sha1",
            ScramHash::Sha256 => "sha256",
        }
    }

    /// HMAC with this hash.
    pub fn hmac(self, key: &[u8], data: &[u8]) -> Vec<u8> {
        match self {
            ScramHash::Sha1 => {
                let mut mac =
                    hmac::Hmac::<sha1::Sha1>::new_from_slice(key).expect("any key length");
                mac.update(data);
                mac.finalize().into_bytes().to_vec()
            }
            ScramHash::Sha256 => {
                let mut mac =
                    hmac::Hmac::<sha2::Sha256>::new_from_slice(key).expect("any key length");
                mac.update(data);
                mac.finalize().into_bytes().to_vec()
            }
        }
    }

    /// This hash of `data`.
    pub fn hash(self, data: &[u8]) -> Vec<u8> {
        use sha2::Digest;
        match self {
            ScramHash::Sha1 => sha1::Sha1::digest(data).to_vec(),
            ScramHash::Sha256 => sha2::Sha256::digest(data).to_vec(),
        }
    }

    /// `Hi(password, salt, iterations)` of RFC 5802 (PBKDF2).
    pub fn salted_password(self, password: &[u8], salt: &[u8], iterations: u32) -> Vec<u8> {
        match self {
            ScramHash::Sha1 => {
                let mut out = vec![0; 20];
                pbkdf2::pbkdf2_hmac::<sha1::Sha1>(password, salt, iterations, &mut out);
                out
            }
            ScramHash::Sha256 => {
                let mut out = vec![0; 32];
                pbkdf2::pbkdf2_hmac::<sha2::Sha256>(password, salt, iterations, &mut out);
                out
            }
        }
    }
}

/// The smallest iteration count accepted when deriving keys (RFC 7677 asks for at least 4096).
pub const MIN_ITERATIONS: u32 = 4096;

/// What a server stores for one SCRAM variant of one account.
#[derive(Clone, PartialEq, Eq)]
pub struct ScramKeys {
    /// Which hash these keys belong to.
    pub hash: ScramHash,
    /// Per-user random salt.
    pub salt: Vec<u8>,
    /// PBKDF2 iteration count.
    pub iterations: u32,
    /// `H(ClientKey)`: verifies a client proof.
    pub stored_key: Vec<u8>,
    /// `HMAC(SaltedPassword, "Server Key")`: proves the server to the client.
    pub server_key: Vec<u8>,
}

impl std::fmt::Debug for ScramKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ScramKeys")
            .field("hash", &self.hash)
            .field("iterations", &self.iterations)
            .finish_non_exhaustive()
    }
}

impl ScramKeys {
    /// Derives the keys for `password` with a fresh random salt.
    pub fn generate(hash: ScramHash, password: &str, iterations: u32) -> Result<Self, SaslError> {
        let salt: [u8; 16] = rand::random();
        Self::derive(hash, password, &salt, iterations)
    }

    /// Derives the keys for `password` (SASLprep is applied first) with the given salt.
    pub fn derive(
        hash: ScramHash,
        password: &str,
        salt: &[u8],
        iterations: u32,
    ) -> Result<Self, SaslError> {
        let password = stringprep::saslprep(password).map_err(|_| SaslError::Malformed)?;
        let iterations = iterations.max(MIN_ITERATIONS);
        let salted = hash.salted_password(password.as_bytes(), salt, iterations);
        let client_key = hash.hmac(&salted, b"Client Key");
        Ok(ScramKeys {
            hash,
            salt: salt.to_vec(),
            iterations,
            stored_key: hash.hash(&client_key),
            server_key: hash.hmac(&salted, b"Server Key"),
        })
    }

    /// Checks a plaintext password against these keys in constant time.
    pub fn verify_password(&self, password: &str) -> bool {
        match Self::derive(self.hash, password, &self.salt, self.iterations) {
            Ok(derived) => bool::from(derived.stored_key.ct_eq(&self.stored_key)),
            Err(_) => false,
        }
    }
}

/// Why a SASL exchange failed, mapped to RFC 6120 section 6.5 conditions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SaslError {
    /// The client's message could not be decoded (`malformed-request` / `incorrect-encoding`).
    #[error("malformed SASL message")]
    Malformed,
    /// Wrong password or unknown user (`not-authorized`).
    #[error("not authorized")]
    NotAuthorized,
    /// An authorization identity other than the authenticated one was requested (`invalid-authzid`).
    #[error("invalid authorization identity")]
    InvalidAuthzid,
    /// The client asked for channel binding, which the offered mechanisms do not support (`not-authorized`).
    #[error("channel binding not supported")]
    ChannelBinding,
}

impl SaslError {
    /// The `<failure/>` child element name for this error.
    pub fn condition(self) -> &'static str {
        match self {
            SaslError::Malformed => "malformed-request",
            SaslError::NotAuthorized | SaslError::ChannelBinding => "not-authorized",
            SaslError::InvalidAuthzid => "invalid-authzid",
        }
    }
}

/// Decodes a SCRAM `saslname` (`=2C` is `,` and `=3D` is `=`).
fn decode_saslname(raw: &str) -> Result<String, SaslError> {
    let mut out = String::with_capacity(raw.len());
    let mut rest = raw;
    while let Some(pos) = rest.find('=') {
        out.push_str(&rest[..pos]);
        match rest.get(pos + 1..pos + 3) {
            Some("2C") => out.push(','),
            Some("3D") => out.push('='),
            _ => return Err(SaslError::Malformed),
        }
        rest = &rest[pos + 3..];
    }
    out.push_str(rest);
    Ok(out)
}

/// Applies SASLprep to a user name; an empty or unpreparable name is malformed.
fn prep_username(raw: &str) -> Result<String, SaslError> {
    let name = stringprep::saslprep(raw).map_err(|_| SaslError::Malformed)?;
    if name.is_empty() {
        return Err(SaslError::Malformed);
    }
    Ok(name.into_owned())
}

/// Parses a SCRAM attribute list into `(name, value)` pairs.
fn attributes(message: &str) -> impl Iterator<Item = Result<(char, &str), SaslError>> {
    message.split(',').map(|part| {
        let mut chars = part.chars();
        match (chars.next(), chars.next()) {
            (Some(name), Some('=')) if name.is_ascii_alphabetic() => Ok((name, &part[2..])),
            _ => Err(SaslError::Malformed),
        }
    })
}

/// The parsed first message of a SCRAM exchange.
#[derive(Debug)]
struct ClientFirst {
    gs2_header: String,
    bare: String,
    username: String,
    nonce: String,
    authzid: Option<String>,
}

fn parse_client_first(message: &[u8]) -> Result<ClientFirst, SaslError> {
    let message = std::str::from_utf8(message).map_err(|_| SaslError::Malformed)?;
    // gs2-header: cbind-flag "," [authzid] ","
    let mut parts = message.splitn(3, ',');
    let cbind = parts.next().ok_or(SaslError::Malformed)?;
    let authzid = parts.next().ok_or(SaslError::Malformed)?;
    let bare = parts.next().ok_or(SaslError::Malformed)?;
    match cbind {
        "n" | "y" => {}
        flag if flag.starts_with("p=") => return Err(SaslError::ChannelBinding),
        _ => return Err(SaslError::Malformed),
    }
    let authzid = match authzid {
        "" => None,
        a if a.starts_with("a=") => Some(decode_saslname(&a[2..])?),
        _ => return Err(SaslError::Malformed),
    };
    let gs2_header = message[..message.len() - bare.len()].to_owned();
    let mut username = None;
    let mut nonce = None;
    for (index, attribute) in attributes(bare).enumerate() {
        let (name, value) = attribute?;
        match (index, name) {
            (0, 'm') => return Err(SaslError::Malformed),
            (0, 'n') => username = Some(prep_username(&decode_saslname(value)?)?),
            (1, 'r')
                if !value.is_empty()
                    && value
                        .bytes()
                        .all(|b| (0x21..0x7f).contains(&b) && b != b',') =>
            {
                nonce = Some(value.to_owned())
            }
            (0 | 1, _) => return Err(SaslError::Malformed),
            _ => {}
        }
    }
    Ok(ClientFirst {
        gs2_header,
        bare: bare.to_owned(),
        username: username.ok_or(SaslError::Malformed)?,
        nonce: nonce.ok_or(SaslError::Malformed)?,
        authzid,
    })
}

/// What a mechanism wants next from the stream.
#[derive(Debug, PartialEq, Eq)]
pub enum SaslStep {
    /// Look up the keys of this user and call `handle_keys`.
    NeedKeys {
        /// The SASLprepped user name (the JID localpart before nodeprep).
        username: String,
        /// The requested authorization identity, if any.
        authzid: Option<String>,
    },
    /// Send this challenge and wait for the client's response.
    Challenge(Vec<u8>),
    /// Authentication succeeded; send `<success/>` with this additional data.
    Success(Vec<u8>),
}

enum ScramState {
    Start,
    AwaitKeys(ClientFirst),
    AwaitFinal {
        first: ClientFirst,
        server_first: String,
        nonce: String,
        /// The account's keys, or stand-in keys when `known` is false.
        keys: ScramKeys,
        known: bool,
    },
    Done,
}

/// Stand-in credentials for user names that have no account, so that an
/// attacker cannot tell an unknown user from a wrong password: the same
/// iteration count as real accounts, a salt that is stable for each name
/// (derived from a server secret kept in storage, so the same on every node
/// and across restarts), and the same work to refuse the attempt.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Decoy {
    /// The server secret the stand-in keys are derived from.
    pub secret: [u8; 32],
    /// The iteration count new accounts get (`accounts.scram_iterations`).
    pub iterations: u32,
}

impl std::fmt::Debug for Decoy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Decoy")
            .field("iterations", &self.iterations)
            .finish_non_exhaustive()
    }
}

impl Decoy {
    /// A decoy with a fresh random secret (tests, and tools without storage).
    pub fn random() -> Self {
        Decoy {
            secret: rand::random(),
            iterations: MIN_ITERATIONS,
        }
    }

    /// Stand-in keys for `username`: no password matches them.
    pub fn keys(&self, hash: ScramHash, username: &str) -> ScramKeys {
        let derive = |label: &str| {
            let data = format!("{label}\0{}\0{username}", hash.name());
            hash.hmac(&self.secret, data.as_bytes())
        };
        ScramKeys {
            hash,
            salt: derive("salt")[..16].to_vec(),
            iterations: self.iterations.max(MIN_ITERATIONS),
            stored_key: derive("stored key"),
            server_key: derive("server key"),
        }
    }
}

/// The server side of one SCRAM exchange.
pub struct ScramServer {
    hash: ScramHash,
    state: ScramState,
    /// Answers for user names without an account.
    decoy: Decoy,
}

impl ScramServer {
    /// Starts an exchange for the given variant.
    pub fn new(hash: ScramHash, decoy: Decoy) -> Self {
        ScramServer {
            hash,
            state: ScramState::Start,
            decoy,
        }
    }

    /// The hash of this exchange.
    pub fn hash(&self) -> ScramHash {
        self.hash
    }

    /// Handles the client's initial message.
    pub fn handle_initial(&mut self, message: &[u8]) -> Result<SaslStep, SaslError> {
        let ScramState::Start = self.state else {
            return Err(SaslError::Malformed);
        };
        let first = parse_client_first(message)?;
        let step = SaslStep::NeedKeys {
            username: first.username.clone(),
            authzid: first.authzid.clone(),
        };
        self.state = ScramState::AwaitKeys(first);
        Ok(step)
    }

    /// Handles the looked-up keys (`None`: unknown user) and returns the server-first challenge.
    pub fn handle_keys(&mut self, keys: Option<ScramKeys>) -> Result<SaslStep, SaslError> {
        let ScramState::AwaitKeys(first) = std::mem::replace(&mut self.state, ScramState::Done)
        else {
            return Err(SaslError::Malformed);
        };
        // An unknown user goes through every step a known one does, with stand-in keys.
        let (known, keys) = match keys.filter(|keys| keys.hash == self.hash) {
            Some(keys) => (true, keys),
            None => (false, self.decoy.keys(self.hash, &first.username)),
        };
        let server_nonce: [u8; 18] = rand::random();
        let nonce = format!("{}{}", first.nonce, BASE64.encode(server_nonce));
        let server_first = format!(
            "r={nonce},s={},i={}",
            BASE64.encode(&keys.salt),
            keys.iterations
        );
        let challenge = server_first.clone().into_bytes();
        self.state = ScramState::AwaitFinal {
            first,
            server_first,
            nonce,
            keys,
            known,
        };
        Ok(SaslStep::Challenge(challenge))
    }

    /// Handles the client-final message, verifying the proof.
    pub fn handle_response(&mut self, message: &[u8]) -> Result<SaslStep, SaslError> {
        let ScramState::AwaitFinal {
            first,
            server_first,
            nonce,
            keys,
            known,
        } = std::mem::replace(&mut self.state, ScramState::Done)
        else {
            return Err(SaslError::Malformed);
        };
        let message = std::str::from_utf8(message).map_err(|_| SaslError::Malformed)?;
        let proof_at = message.rfind(",p=").ok_or(SaslError::Malformed)?;
        let without_proof = &message[..proof_at];
        let proof = BASE64
            .decode(&message[proof_at + 3..])
            .map_err(|_| SaslError::Malformed)?;
        let mut binding = None;
        let mut client_nonce = None;
        for (index, attribute) in attributes(without_proof).enumerate() {
            match (index, attribute?) {
                (0, ('c', value)) => binding = Some(value),
                (1, ('r', value)) => client_nonce = Some(value),
                (0 | 1, _) => return Err(SaslError::Malformed),
                _ => {}
            }
        }
        let binding = BASE64
            .decode(binding.ok_or(SaslError::Malformed)?)
            .map_err(|_| SaslError::Malformed)?;
        if binding != first.gs2_header.as_bytes() || client_nonce != Some(nonce.as_str()) {
            return Err(SaslError::NotAuthorized);
        }
        let auth_message = format!("{},{server_first},{without_proof}", first.bare);
        let signature = self.hash.hmac(&keys.stored_key, auth_message.as_bytes());
        if proof.len() != signature.len() {
            return Err(SaslError::NotAuthorized);
        }
        let client_key: Vec<u8> = proof.iter().zip(&signature).map(|(a, b)| a ^ b).collect();
        if !bool::from(self.hash.hash(&client_key).ct_eq(&keys.stored_key)) || !known {
            return Err(SaslError::NotAuthorized);
        }
        let server_signature = self.hash.hmac(&keys.server_key, auth_message.as_bytes());
        Ok(SaslStep::Success(
            format!("v={}", BASE64.encode(server_signature)).into_bytes(),
        ))
    }
}

/// A parsed SASL PLAIN message (RFC 4616).
#[derive(PartialEq, Eq)]
pub struct PlainCredentials {
    /// Requested authorization identity, if any.
    pub authzid: Option<String>,
    /// SASLprepped authentication identity (the user name).
    pub username: String,
    /// SASLprepped password.
    pub password: String,
}

impl std::fmt::Debug for PlainCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PlainCredentials")
            .field("authzid", &self.authzid)
            .field("username", &self.username)
            .finish_non_exhaustive()
    }
}

/// Parses `[authzid] NUL authcid NUL passwd`.
pub fn parse_plain(message: &[u8]) -> Result<PlainCredentials, SaslError> {
    let message = std::str::from_utf8(message).map_err(|_| SaslError::Malformed)?;
    let mut parts = message.split('\0');
    let (Some(authzid), Some(username), Some(password), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(SaslError::Malformed);
    };
    let password = stringprep::saslprep(password).map_err(|_| SaslError::Malformed)?;
    if password.is_empty() {
        return Err(SaslError::Malformed);
    }
    Ok(PlainCredentials {
        authzid: (!authzid.is_empty()).then(|| authzid.to_owned()),
        username: prep_username(username)?,
        password: password.into_owned(),
    })
}

#[cfg(test)]
mod tests;
