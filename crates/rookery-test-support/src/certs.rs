//! A test certificate authority and a `localhost` certificate it signed, made
//! once per test process, and a TLS client configuration trusting it.

use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};

/// The files of the test PKI.
#[derive(Debug)]
pub struct TestPki {
    /// The CA certificate (PEM).
    pub ca_pem: String,
    /// The server certificate chain file.
    pub cert_path: PathBuf,
    /// The server key file.
    pub key_path: PathBuf,
    _dir: tempfile::TempDir,
}

/// The process-wide test PKI.
pub fn pki() -> &'static TestPki {
    static PKI: OnceLock<TestPki> = OnceLock::new();
    PKI.get_or_init(|| {
        let mut ca = CertificateParams::new(Vec::<String>::new()).expect("CA parameters");
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.distinguished_name
            .push(rcgen::DnType::CommonName, "Rookery test CA");
        let ca_key = KeyPair::generate().expect("CA key");
        let ca_cert = ca.self_signed(&ca_key).expect("CA certificate");
        let issuer = Issuer::new(ca, ca_key);
        let leaf = CertificateParams::new(vec!["localhost".to_owned()]).expect("leaf parameters");
        let leaf_key = KeyPair::generate().expect("leaf key");
        let leaf_cert = leaf
            .signed_by(&leaf_key, &issuer)
            .expect("leaf certificate");
        let dir = tempfile::tempdir().expect("temporary directory");
        let cert_path = dir.path().join("cert.pem");
        let key_path = dir.path().join("key.pem");
        std::fs::write(&cert_path, leaf_cert.pem()).expect("write certificate");
        std::fs::write(&key_path, leaf_key.serialize_pem()).expect("write key");
        TestPki {
            ca_pem: ca_cert.pem(),
            cert_path,
            key_path,
            _dir: dir,
        }
    })
}

/// A rustls client configuration that trusts only the test CA.
pub fn client_config() -> Arc<rustls::ClientConfig> {
    static CONFIG: OnceLock<Arc<rustls::ClientConfig>> = OnceLock::new();
    CONFIG
        .get_or_init(|| {
            let mut roots = rustls::RootCertStore::empty();
            let pem = pki().ca_pem.clone();
            let der =
                rustls::pki_types::pem::PemObject::from_pem_slice(pem.as_bytes()).expect("CA PEM");
            roots.add(der).expect("CA certificate");
            let provider = Arc::new(rustls::crypto::ring::default_provider());
            let config = rustls::ClientConfig::builder_with_provider(provider)
                .with_safe_default_protocol_versions()
                .expect("TLS versions")
                .with_root_certificates(roots)
                .with_no_client_auth();
            Arc::new(config)
        })
        .clone()
}
