//! The client side of SASL SCRAM (RFC 5802, RFC 7677), caching the salted
//! password per salt and iteration count the way real clients do, so the load
//! generator spends its CPU on logins, not on PBKDF2.

use std::collections::HashMap;
use std::sync::{Mutex, OnceLock};

use anyhow::{Context as _, bail};
use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use rookery_stream::sasl::ScramHash;

type CacheKey = (ScramHash, String, Vec<u8>, u32);

fn cache() -> &'static Mutex<HashMap<CacheKey, Vec<u8>>> {
    static CACHE: OnceLock<Mutex<HashMap<CacheKey, Vec<u8>>>> = OnceLock::new();
    CACHE.get_or_init(Default::default)
}

/// One SCRAM exchange, without channel binding.
pub struct ScramClient {
    hash: ScramHash,
    password: String,
    client_first_bare: String,
    nonce: String,
    server_signature: Option<Vec<u8>>,
}

impl ScramClient {
    /// Starts an exchange for `user`.
    pub fn new(hash: ScramHash, user: &str, password: &str) -> ScramClient {
        let nonce: String = BASE64.encode(rand::random::<[u8; 18]>());
        let user = user.replace('=', "=3D").replace(',', "=2C");
        ScramClient {
            hash,
            password: password.to_owned(),
            client_first_bare: format!("n={user},r={nonce}"),
            nonce,
            server_signature: None,
        }
    }

    /// The client-first-message.
    pub fn initial(&self) -> Vec<u8> {
        format!("n,,{}", self.client_first_bare).into_bytes()
    }

    /// Answers the server-first-message with the client-final-message.
    pub fn respond(&mut self, server_first: &[u8]) -> anyhow::Result<Vec<u8>> {
        let server_first = std::str::from_utf8(server_first)?;
        let (mut nonce, mut salt, mut iterations) = (None, None, None);
        for attribute in server_first.split(',') {
            match attribute.split_once('=') {
                Some(("r", value)) => nonce = Some(value),
                Some(("s", value)) => salt = Some(BASE64.decode(value)?),
                Some(("i", value)) => iterations = Some(value.parse::<u32>()?),
                _ => {}
            }
        }
        let nonce = nonce.context("no nonce")?;
        if !nonce.starts_with(&self.nonce) {
            bail!("the server's nonce does not extend ours");
        }
        let (salt, iterations) = (salt.context("no salt")?, iterations.context("no count")?);
        let key = (self.hash, self.password.clone(), salt, iterations);
        let cached = cache().lock().expect("cache lock").get(&key).cloned();
        let salted = cached.unwrap_or_else(|| {
            let salted = self
                .hash
                .salted_password(self.password.as_bytes(), &key.2, iterations);
            cache()
                .lock()
                .expect("cache lock")
                .insert(key, salted.clone());
            salted
        });
        let without_proof = format!("c=biws,r={nonce}");
        let auth_message = format!("{},{server_first},{without_proof}", self.client_first_bare);
        let client_key = self.hash.hmac(&salted, b"Client Key");
        let stored_key = self.hash.hash(&client_key);
        let signature = self.hash.hmac(&stored_key, auth_message.as_bytes());
        let proof: Vec<u8> = client_key
            .iter()
            .zip(&signature)
            .map(|(a, b)| a ^ b)
            .collect();
        let server_key = self.hash.hmac(&salted, b"Server Key");
        self.server_signature = Some(self.hash.hmac(&server_key, auth_message.as_bytes()));
        Ok(format!("{without_proof},p={}", BASE64.encode(proof)).into_bytes())
    }

    /// Checks the server-final-message (`v=`): the server knew the keys.
    pub fn verify(&self, server_final: &[u8]) -> anyhow::Result<()> {
        let server_final = std::str::from_utf8(server_final)?;
        let verifier = server_final
            .strip_prefix("v=")
            .context("no server signature")?;
        if Some(BASE64.decode(verifier)?) != self.server_signature {
            bail!("wrong server signature");
        }
        Ok(())
    }
}
