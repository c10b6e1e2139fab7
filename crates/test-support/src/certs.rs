//! Throw-away certificates for TLS tests: a CA, a server certificate for
//! `127.0.0.1`/`localhost` and a client certificate, both signed by that CA,
//! written as PEM files (generated with rcgen; nothing leaves the test's
//! directory).

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};

/// The files [`write_test_pki`] wrote.
#[derive(Debug, Clone)]
pub struct Pki {
    /// The CA certificate: what servers and clients trust.
    pub ca: PathBuf,
    /// Server certificate for `127.0.0.1` and `localhost`, and its key.
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    /// Client certificate (common name `jetsource-client`), and its key.
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
}

fn write(dir: &Path, name: &str, pem: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, pem).unwrap();
    path
}

/// A fresh CA and a server and a client certificate signed by it, written to
/// `dir` (`ca.pem`, `server.pem`, `server-key.pem`, `client.pem`,
/// `client-key.pem`).
pub fn write_test_pki(dir: &Path) -> Pki {
    std::fs::create_dir_all(dir).unwrap();

    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "jetsource test CA");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca_key = KeyPair::generate().unwrap();
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca_params, ca_key);

    let leaf = |names: Vec<String>, cn: &str, usage: ExtendedKeyUsagePurpose| {
        let mut params = CertificateParams::new(names).unwrap();
        params.distinguished_name.push(DnType::CommonName, cn);
        params.use_authority_key_identifier_extension = true;
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![usage];
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &issuer).unwrap();
        (cert.pem(), key.serialize_pem())
    };
    let (server_cert, server_key) = leaf(
        vec!["127.0.0.1".into(), "localhost".into()],
        "localhost",
        ExtendedKeyUsagePurpose::ServerAuth,
    );
    let (client_cert, client_key) = leaf(
        vec!["jetsource-client".into()],
        "jetsource-client",
        ExtendedKeyUsagePurpose::ClientAuth,
    );

    Pki {
        ca: write(dir, "ca.pem", &ca_cert.pem()),
        server_cert: write(dir, "server.pem", &server_cert),
        server_key: write(dir, "server-key.pem", &server_key),
        client_cert: write(dir, "client.pem", &client_cert),
        client_key: write(dir, "client-key.pem", &client_key),
    }
}

/// The `tls { ... }` block of a nats-server configuration serving `pki`'s
/// server certificate; with `verify`, clients must present a certificate
/// signed by the CA.
pub fn nats_tls_block(pki: &Pki, verify: bool) -> String {
    format!(
        "tls {{\n  cert_file: {:?}\n  key_file: {:?}\n  ca_file: {:?}\n  verify: {verify}\n  timeout: 5\n}}\n",
        pki.server_cert, pki.server_key, pki.ca
    )
}

/// redis-server arguments serving TLS only, on `port`, with `pki`'s server
/// certificate; `auth_clients`: `"no"`, `"optional"` or `"yes"`.
pub fn redis_tls_args(pki: &Pki, port: u16, auth_clients: &str) -> Vec<String> {
    let path = |p: &Path| p.to_string_lossy().into_owned();
    vec![
        "--port".into(),
        "0".into(),
        "--tls-port".into(),
        port.to_string(),
        "--tls-cert-file".into(),
        path(&pki.server_cert),
        "--tls-key-file".into(),
        path(&pki.server_key),
        "--tls-ca-cert-file".into(),
        path(&pki.ca),
        "--tls-auth-clients".into(),
        auth_clients.into(),
    ]
}
