//! The local cluster's PKI: one CA, the API server's and the nodes' serving certificates,
//! and the service-account signing key. Made fresh for every `testenv up`.

use std::path::{Path, PathBuf};

use anyhow::Result;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};

/// Paths of the files [`generate`] writes.
pub struct Pki {
    pub ca_cert: PathBuf,
    pub ca_key: PathBuf,
    pub apiserver_cert: PathBuf,
    pub apiserver_key: PathBuf,
    pub node_cert: PathBuf,
    pub node_key: PathBuf,
    pub sa_key: PathBuf,
    pub sa_pub: PathBuf,
}

/// Writes a file only its owner can read (keys, tokens, kubeconfigs).
pub fn write_private(path: &Path, contents: &str) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .mode(0o600)
        .open(path)?;
    file.write_all(contents.as_bytes())?;
    Ok(())
}

/// Writes a CA, serving certificates whose SANs cover `ips` and the in-cluster DNS names,
/// and an ECDSA service-account key pair into `dir`.
pub fn generate(dir: &Path, ips: &[String]) -> Result<Pki> {
    std::fs::create_dir_all(dir)?;
    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "stateward-testenv-ca");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca_key = KeyPair::generate()?;
    let ca_cert = ca_params.self_signed(&ca_key)?;
    let issuer = Issuer::new(ca_params, &ca_key);

    let serving = |common_name: &str, names: Vec<String>| -> Result<(String, String)> {
        let mut params = CertificateParams::new(names)?;
        params
            .distinguished_name
            .push(DnType::CommonName, common_name);
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &issuer)?;
        Ok((cert.pem(), key.serialize_pem()))
    };

    let mut apiserver_names: Vec<String> = vec![
        "localhost".into(),
        "kubernetes".into(),
        "kubernetes.default".into(),
        "kubernetes.default.svc".into(),
        "kubernetes.default.svc.cluster.local".into(),
        "127.0.0.1".into(),
        "10.96.0.1".into(),
    ];
    apiserver_names.extend(ips.iter().cloned());
    let (apiserver_cert, apiserver_key) = serving("kube-apiserver", apiserver_names)?;
    let mut node_names: Vec<String> = vec!["localhost".into(), "127.0.0.1".into()];
    node_names.extend(ips.iter().cloned());
    let (node_cert, node_key) = serving("stateward-local-node", node_names)?;

    let sa = KeyPair::generate()?;
    let pki = Pki {
        ca_cert: dir.join("ca.crt"),
        ca_key: dir.join("ca.key"),
        apiserver_cert: dir.join("apiserver.crt"),
        apiserver_key: dir.join("apiserver.key"),
        node_cert: dir.join("node.crt"),
        node_key: dir.join("node.key"),
        sa_key: dir.join("sa.key"),
        sa_pub: dir.join("sa.pub"),
    };
    std::fs::write(&pki.ca_cert, ca_cert.pem())?;
    write_private(&pki.ca_key, &ca_key.serialize_pem())?;
    std::fs::write(&pki.apiserver_cert, apiserver_cert)?;
    write_private(&pki.apiserver_key, &apiserver_key)?;
    std::fs::write(&pki.node_cert, node_cert)?;
    write_private(&pki.node_key, &node_key)?;
    write_private(&pki.sa_key, &sa.serialize_pem())?;
    std::fs::write(&pki.sa_pub, sa.public_key_pem())?;
    Ok(pki)
}
