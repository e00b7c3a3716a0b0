//! TLS for the TCP listeners: rustls with TLS 1.2 and 1.3 only and ALPN
//! for h2 and http/1.1. Certificates come from `--tls-cert/--tls-key`, or
//! from a CA and leaf this module makes once in the state directory and
//! reuses afterwards, so that `curl --cacert STATE/ca.pem` keeps working.
//! The data listener asks no client for a certificate (its credential is
//! the ticket); the control listener (`--control-listen`) admits only a
//! client whose certificate chains to a CA of `--client-ca`, and fails the
//! handshake of any other. Both present one [`Certificate`], which SIGHUP
//! reloads from its files: new handshakes get the new one, running
//! connections keep theirs, and a reload that fails keeps the old one.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result};
use rcgen::{BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::danger::ClientCertVerifier;
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{RootCertStore, ServerConfig};

/// Files of the generated certificate set.
#[derive(Debug, Clone)]
pub struct GeneratedFiles {
    /// The CA certificate clients should trust.
    pub ca: PathBuf,
    /// The server certificate, signed by the CA.
    pub cert: PathBuf,
    /// The server key (mode 0600).
    pub key: PathBuf,
}

impl GeneratedFiles {
    /// The file names inside `state_dir`.
    pub fn in_dir(state_dir: &Path) -> GeneratedFiles {
        GeneratedFiles { ca: state_dir.join("ca.pem"), cert: state_dir.join("cert.pem"), key: state_dir.join("key.pem") }
    }
}

/// Makes a CA and a leaf certificate for localhost and this host in
/// `state_dir`, unless all three files are already there. The key is
/// mode 0600; the certificates 0640, so that the state directory's group
/// (the systemd unit's operators) can read the CA to trust.
pub fn ensure_self_signed(state_dir: &Path) -> Result<GeneratedFiles> {
    let files = GeneratedFiles::in_dir(state_dir);
    if files.ca.exists() && files.cert.exists() && files.key.exists() {
        // Earlier versions left the CA at 0600 (the server's umask).
        if fs::metadata(&files.ca).is_ok_and(|meta| meta.permissions().mode() & 0o777 == 0o600) {
            fs::set_permissions(&files.ca, fs::Permissions::from_mode(CERTIFICATE_MODE))
                .with_context(|| format!("chmod {}", files.ca.display()))?;
        }
        return Ok(files);
    }
    fs::create_dir_all(state_dir).with_context(|| format!("creating state directory {}", state_dir.display()))?;

    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params.distinguished_name.push(DnType::CommonName, "blockgate local CA");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    let ca_key = KeyPair::generate()?;
    let ca_cert = ca_params.self_signed(&ca_key)?;

    let mut names = vec!["localhost".to_string(), "127.0.0.1".to_string(), "::1".to_string()];
    if let Some(host) = hostname::get().ok().and_then(|h| h.into_string().ok()).filter(|h| !h.is_empty() && h != "localhost") {
        names.push(host);
    }
    let mut leaf_params = CertificateParams::new(names)?;
    leaf_params.distinguished_name.push(DnType::CommonName, "blockgate server");
    leaf_params.use_authority_key_identifier_extension = true;
    leaf_params.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
    leaf_params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let leaf_key = KeyPair::generate()?;
    let leaf_cert = leaf_params.signed_by(&leaf_key, &ca_cert, &ca_key)?;

    write_file(&files.key, leaf_key.serialize_pem().as_bytes(), 0o600)?;
    write_file(&files.cert, leaf_cert.pem().as_bytes(), CERTIFICATE_MODE)?;
    write_file(&files.ca, ca_cert.pem().as_bytes(), CERTIFICATE_MODE)?;
    Ok(files)
}

/// The generated certificates' mode: the group reads them.
const CERTIFICATE_MODE: u32 = 0o640;

/// Writes `path` through a temporary file with exactly `mode`, whatever
/// the umask.
fn write_file(path: &Path, contents: &[u8], mode: u32) -> Result<()> {
    let temporary = path.with_extension("tmp");
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&temporary)
        .with_context(|| format!("writing {}", temporary.display()))?;
    file.set_permissions(fs::Permissions::from_mode(mode))?;
    file.write_all(contents)?;
    file.sync_all()?;
    fs::rename(&temporary, path).with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

/// The server's certificate chain and key, read from PEM files, and read
/// again by [`Certificate::reload`].
#[derive(Debug)]
pub struct Certificate {
    cert: PathBuf,
    key: PathBuf,
    provider: Arc<CryptoProvider>,
    current: parking_lot::RwLock<Arc<CertifiedKey>>,
}

impl Certificate {
    /// Reads `cert` (the chain) and `key`, which must belong together.
    pub fn load(cert: &Path, key: &Path) -> Result<Arc<Certificate>> {
        let provider = provider();
        let current = parking_lot::RwLock::new(Arc::new(certified_key(cert, key, &provider)?));
        Ok(Arc::new(Certificate { cert: cert.to_path_buf(), key: key.to_path_buf(), provider, current }))
    }

    /// Reads the files again; on any failure the certificate in use stays.
    pub fn reload(&self) -> Result<()> {
        let fresh = certified_key(&self.cert, &self.key, &self.provider)?;
        *self.current.write() = Arc::new(fresh);
        Ok(())
    }
}

impl ResolvesServerCert for Certificate {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.read().clone())
    }
}

/// A chain and its key from PEM files, checked to belong together.
fn certified_key(cert: &Path, key: &Path, provider: &CryptoProvider) -> Result<CertifiedKey> {
    let chain = read_certificates(cert)?;
    let key_der: PrivateKeyDer<'static> =
        rustls_pemfile::private_key(&mut fs::read(key).with_context(|| format!("reading {}", key.display()))?.as_slice())
            .with_context(|| format!("parsing {}", key.display()))?
            .with_context(|| format!("no private key in {}", key.display()))?;
    CertifiedKey::from_der(chain, key_der, provider)
        .with_context(|| format!("{} and {} are not a certificate and its key", cert.display(), key.display()))
}

/// A rustls server configuration: TLS 1.2+, ALPN h2 and http/1.1, no
/// client certificate asked for.
pub fn server_config(certificate: Arc<Certificate>) -> Result<Arc<ServerConfig>> {
    config(certificate, WebPkiClientVerifier::no_client_auth())
}

/// The same, for the control API over TCP: the client must present a
/// certificate that chains to one of the CA certificates in the PEM file
/// `client_ca`; without one, or with one of another CA, the handshake
/// fails and no request is read.
pub fn client_certificate_config(certificate: Arc<Certificate>, client_ca: &Path) -> Result<Arc<ServerConfig>> {
    let mut roots = RootCertStore::empty();
    for certificate in read_certificates(client_ca)? {
        roots.add(certificate).with_context(|| format!("--client-ca {}: a certificate is not a usable CA", client_ca.display()))?;
    }
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), certificate.provider.clone())
        .build()
        .with_context(|| format!("--client-ca {}", client_ca.display()))?;
    config(certificate, verifier)
}

/// The certificates of a PEM file; an error when it holds none.
fn read_certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>> {
    let certificates = rustls_pemfile::certs(&mut fs::read(path).with_context(|| format!("reading {}", path.display()))?.as_slice())
        .collect::<Result<Vec<CertificateDer<'static>>, _>>()
        .with_context(|| format!("parsing certificates in {}", path.display()))?;
    anyhow::ensure!(!certificates.is_empty(), "no certificate in {}", path.display());
    Ok(certificates)
}

/// ring, with AES-128-GCM first: as safe for this use and a third cheaper
/// than AES-256 per byte, which matters when TLS is most of a transfer's
/// CPU.
fn provider() -> Arc<CryptoProvider> {
    let mut provider = rustls::crypto::ring::default_provider();
    provider.cipher_suites.sort_by_key(|suite| match suite.suite() {
        rustls::CipherSuite::TLS13_AES_128_GCM_SHA256 => 0,
        rustls::CipherSuite::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256 | rustls::CipherSuite::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256 => 1,
        _ => 2,
    });
    Arc::new(provider)
}

fn config(certificate: Arc<Certificate>, clients: Arc<dyn ClientCertVerifier>) -> Result<Arc<ServerConfig>> {
    let mut config = ServerConfig::builder_with_provider(certificate.provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .with_client_cert_verifier(clients)
        .with_cert_resolver(certificate);
    config.ignore_client_order = true;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_key_is_private_and_the_certificates_readable_by_the_group() {
        let dir = tempfile::tempdir().unwrap();
        let mode = |path: &Path| fs::metadata(path).unwrap().permissions().mode() & 0o777;
        // (The server itself runs with umask 077, which the modes ignore:
        // tests/docker-rootfs checks them in the files the server makes.)
        let files = ensure_self_signed(dir.path()).unwrap();
        assert_eq!((mode(&files.key), mode(&files.cert), mode(&files.ca)), (0o600, 0o640, 0o640));
        // A CA left at 0600 by an earlier version is opened to the group;
        // another mode an operator chose is kept.
        fs::set_permissions(&files.ca, fs::Permissions::from_mode(0o600)).unwrap();
        ensure_self_signed(dir.path()).unwrap();
        assert_eq!(mode(&files.ca), 0o640);
        fs::set_permissions(&files.ca, fs::Permissions::from_mode(0o644)).unwrap();
        ensure_self_signed(dir.path()).unwrap();
        assert_eq!((mode(&files.key), mode(&files.ca)), (0o600, 0o644));
    }

    #[test]
    fn a_client_ca_file_must_hold_a_certificate() {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let dir = tempfile::tempdir().unwrap();
        let files = ensure_self_signed(dir.path()).unwrap();
        let certificate = Certificate::load(&files.cert, &files.key).unwrap();
        assert!(client_certificate_config(certificate.clone(), &files.ca).is_ok());
        let error = format!("{:#}", client_certificate_config(certificate.clone(), &files.key).unwrap_err());
        assert!(error.contains("no certificate in") && error.contains("key.pem"), "{error}");
        let missing = dir.path().join("missing.pem");
        let error = format!("{:#}", client_certificate_config(certificate, &missing).unwrap_err());
        assert!(error.contains("missing.pem"), "{error}");
    }

    #[test]
    fn a_certificate_and_a_key_that_do_not_belong_together_are_refused_and_a_reload_keeps_the_old() {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let (first, second) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let (a, b) = (ensure_self_signed(first.path()).unwrap(), ensure_self_signed(second.path()).unwrap());
        let error = format!("{:#}", Certificate::load(&a.cert, &b.key).unwrap_err());
        assert!(error.contains("are not a certificate and its key"), "{error}");
        let certificate = Certificate::load(&a.cert, &a.key).unwrap();
        let before = certificate.current.read().cert.clone();
        std::fs::write(&a.key, b.key.to_str().unwrap()).unwrap();
        assert!(certificate.reload().is_err());
        assert_eq!(certificate.current.read().cert, before, "a failed reload keeps the certificate in use");
    }
}
