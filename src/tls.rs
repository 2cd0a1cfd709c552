//! TLS on the data listener (`listen_tls`): loading and checking the server certificate
//! and key, optional client-certificate verification against `client_ca_file`, and the
//! identity (SANs, fingerprint) of a verified client certificate.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::sign::CertifiedKey;
use sha2::{Digest, Sha256};
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};
use zeroize::Zeroizing;

use crate::auth::Fingerprint;
use crate::files::{read_limited, PEM_LIMIT};

/// Validated `listen_tls` settings with the rustls server config built from them.
#[derive(Clone)]
pub struct ListenTls {
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
    pub client_ca_file: Option<PathBuf>,
    pub require_client_cert: bool,
    pub server_config: Arc<rustls::ServerConfig>,
    /// When the served certificate expires, in Unix seconds (exported as a metric).
    pub expires_at: i64,
    /// Which client certificates a handshake accepts.
    pub client_trust: ClientTrust,
}

/// What decides which client certificates are accepted: the trusted CAs (by the
/// SHA-256 of their DER, in file order) and whether one is required. A reload that
/// changes it ends the connections authenticated under the old one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientTrust {
    pub cas: Option<[u8; 32]>,
    pub required: bool,
}

/// A `listen_tls` setting that cannot be used: which key (`cert_file`, `key_file`,
/// `client_ca_file`, `require_client_cert`) and why, naming the file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListenTlsError {
    pub key: &'static str,
    pub message: String,
}

impl std::fmt::Display for ListenTlsError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

/// Attaches the `listen_tls` key an error came from.
fn at(key: &'static str) -> impl FnOnce(String) -> ListenTlsError {
    move |message| ListenTlsError { key, message }
}

/// Builds the server TLS config from files; every error names its key, the file and the
/// problem.
pub fn load_listen_tls(
    cert_file: &Path,
    key_file: &Path,
    client_ca_file: Option<&Path>,
    require_client_cert: bool,
) -> Result<ListenTls, ListenTlsError> {
    let chain = read_certs(cert_file).map_err(at("cert_file"))?;
    let expires_at = chain_valid_until(cert_file, &chain).map_err(at("cert_file"))?;
    let key = read_key(key_file).map_err(at("key_file"))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let signing_key = provider
        .key_provider
        .load_private_key(key.clone_key())
        .map_err(|err| format!("{}: unusable private key: {err}", key_file.display()))
        .map_err(at("key_file"))?;
    CertifiedKey::new(chain.clone(), signing_key)
        .keys_match()
        .map_err(|err| {
            format!(
                "{} does not match the certificate in {}: {err}",
                key_file.display(),
                cert_file.display()
            )
        })
        .map_err(at("key_file"))?;
    let builder = rustls::ServerConfig::builder_with_provider(Arc::clone(&provider))
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|err| format!("TLS versions: {err}"))
        .map_err(at("cert_file"))?;
    let mut trusted_cas = None;
    let builder = match client_ca_file {
        Some(ca_file) => {
            let cas = read_certs(ca_file).map_err(at("client_ca_file"))?;
            trusted_cas = Some(digest_of(&cas));
            let verifier = client_verifier(ca_file, cas, require_client_cert, provider)
                .map_err(at("client_ca_file"))?;
            builder.with_client_cert_verifier(verifier)
        }
        None if require_client_cert => {
            return Err(at("require_client_cert")(
                "require_client_cert needs client_ca_file".to_owned(),
            ));
        }
        None => builder.with_no_client_auth(),
    };
    let mut config = builder
        .with_single_cert(chain, key)
        .map_err(|err| format!("{}: {err}", cert_file.display()))
        .map_err(at("cert_file"))?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    if client_ca_file.is_some() {
        without_resumption(&mut config);
    }
    Ok(ListenTls {
        cert_file: cert_file.to_owned(),
        key_file: key_file.to_owned(),
        client_ca_file: client_ca_file.map(Path::to_owned),
        require_client_cert,
        server_config: Arc::new(config),
        expires_at,
        client_trust: ClientTrust {
            cas: trusted_cas,
            required: require_client_cert,
        },
    })
}

/// Turns TLS session resumption off: no TLS 1.2 session cache and no TLS 1.3 tickets
/// (the ticketer is rustls' default, which never makes stateless tickets). A resumed
/// session skips the client-certificate check and carries the first handshake's
/// certificate along, even past its expiry or to a client that never held it; without
/// resumption every connection's certificate is verified, validity included.
fn without_resumption(config: &mut rustls::ServerConfig) {
    config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
}

/// SHA-256 over the certificates' DER, each preceded by its length.
fn digest_of(certs: &[CertificateDer<'_>]) -> [u8; 32] {
    let mut hasher = Sha256::new();
    for cert in certs {
        hasher.update((cert.len() as u64).to_be_bytes());
        hasher.update(cert.as_ref());
    }
    hasher.finalize().into()
}

/// Verifies client certificates against `cas` (read from `ca_file`); without
/// `require_client_cert`, a client may also present none.
fn client_verifier(
    ca_file: &Path,
    cas: Vec<CertificateDer<'static>>,
    require_client_cert: bool,
    provider: Arc<rustls::crypto::CryptoProvider>,
) -> Result<Arc<dyn rustls::server::danger::ClientCertVerifier>, String> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in cas {
        roots
            .add(cert)
            .map_err(|err| format!("{}: {err}", ca_file.display()))?;
    }
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider);
    let verifier = if require_client_cert {
        verifier
    } else {
        verifier.allow_unauthenticated()
    };
    verifier
        .build()
        .map_err(|err| format!("{}: {err}", ca_file.display()))
}

/// Every certificate in a PEM file; at least one.
pub(crate) fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let pem = read_limited(path, PEM_LIMIT)
        .map_err(|err| format!("cannot read {}: {err}", path.display()))?;
    let certs = rustls_pemfile::certs(&mut pem.as_slice())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|err| format!("{} is not valid PEM: {err}", path.display()))?;
    if certs.is_empty() {
        return Err(format!("{} holds no certificate", path.display()));
    }
    Ok(certs)
}

fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, String> {
    // The key's PEM is wiped once parsed.
    let pem = Zeroizing::new(
        read_limited(path, PEM_LIMIT)
            .map_err(|err| format!("cannot read {}: {err}", path.display()))?,
    );
    rustls_pemfile::private_key(&mut pem.as_slice())
        .map_err(|err| format!("{} is not valid PEM: {err}", path.display()))?
        .ok_or_else(|| format!("{} holds no private key", path.display()))
}

/// An expired or not-yet-valid certificate in the served chain (the server's own or an
/// intermediate: clients reject either) is a config error, not a surprise for every
/// client. Returns when the chain stops being valid, its earliest expiry, in Unix seconds.
fn chain_valid_until(path: &Path, chain: &[CertificateDer<'_>]) -> Result<i64, String> {
    chain
        .iter()
        .enumerate()
        .try_fold(i64::MAX, |earliest, (position, cert)| {
            Ok(earliest.min(valid_until(path, position, cert)?))
        })
}

/// One certificate of the chain, `position` 0 being the server's own.
fn valid_until(path: &Path, position: usize, cert: &CertificateDer<'_>) -> Result<i64, String> {
    let which = match position {
        0 => "the certificate".to_owned(),
        n => format!("certificate {} of the chain (an intermediate)", n + 1),
    };
    let (_, parsed) = X509Certificate::from_der(cert.as_ref())
        .map_err(|err| format!("{}: cannot parse {which}: {err}", path.display()))?;
    let validity = parsed.validity();
    if !validity.is_valid() {
        return Err(format!(
            "{}: {which} is valid only from {} to {}",
            path.display(),
            validity.not_before,
            validity.not_after
        ));
    }
    Ok(validity.not_after.timestamp())
}

/// A subject alternative name as `client_cert_sans` and a client certificate are
/// matched: a URI exactly (a SPIFFE ID is case-sensitive), a DNS name in ASCII lower
/// case, since DNS names do not depend on case (RFC 4343). The kinds never match each
/// other.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum CertSan {
    Uri(String),
    Dns(String),
}

impl CertSan {
    pub fn uri(uri: &str) -> CertSan {
        CertSan::Uri(uri.to_owned())
    }

    pub fn dns(name: &str) -> CertSan {
        CertSan::Dns(name.to_ascii_lowercase())
    }

    /// A `client_cert_sans` entry: a URI when it starts with a scheme (`spiffe:`), else
    /// a DNS name (which has no `:`).
    pub fn from_config(entry: &str) -> CertSan {
        if has_uri_scheme(entry) {
            CertSan::uri(entry)
        } else {
            CertSan::dns(entry)
        }
    }

    /// The name as matched (a DNS name lower-cased).
    pub fn as_str(&self) -> &str {
        match self {
            CertSan::Uri(text) | CertSan::Dns(text) => text,
        }
    }
}

/// Whether `text` begins with a URI scheme and its `:` (RFC 3986 §3.1: a letter, then
/// letters, digits, `+`, `-` or `.`).
fn has_uri_scheme(text: &str) -> bool {
    let Some((scheme, _)) = text.split_once(':') else {
        return false;
    };
    let mut chars = scheme.chars();
    chars
        .next()
        .is_some_and(|first| first.is_ascii_alphabetic())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'))
}

/// A client certificate the TLS handshake verified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientCertificate {
    /// URI and DNS subject alternative names.
    pub sans: Vec<CertSan>,
    /// The certificate's fingerprint (the first 12 hex digits of its SHA-256): made once
    /// per connection, cloned per request.
    pub fingerprint: Fingerprint,
}

impl ClientCertificate {
    /// Reads the end-entity certificate of a verified peer chain.
    pub fn from_peer(chain: Option<&[CertificateDer<'_>]>) -> Option<ClientCertificate> {
        let leaf = chain?.first()?;
        let fingerprint = Fingerprint::of_sha256(&Sha256::digest(leaf.as_ref()).into());
        let (_, parsed) = X509Certificate::from_der(leaf.as_ref()).ok()?;
        let sans = parsed
            .subject_alternative_name()
            .ok()
            .flatten()
            .map(|ext| {
                ext.value
                    .general_names
                    .iter()
                    .filter_map(|name| match name {
                        GeneralName::URI(uri) => Some(CertSan::uri(uri)),
                        GeneralName::DNSName(dns) => Some(CertSan::dns(dns)),
                        _ => None,
                    })
                    .collect()
            })
            .unwrap_or_default();
        Some(ClientCertificate { sans, fingerprint })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::simulator::generate_pki;

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, text).expect("write");
        path
    }

    #[test]
    fn loads_a_matching_pair_and_refuses_mismatches_and_expired_certs() {
        let dir = tempfile::tempdir().expect("tempdir");
        let pki = generate_pki(&["localhost"]).expect("pki");
        let other = generate_pki(&["localhost"]).expect("pki");
        let cert = write(dir.path(), "cert.pem", &pki.server_cert_pem);
        let key = write(dir.path(), "key.pem", &pki.server_key_pem);
        let other_key = write(dir.path(), "other.pem", &other.server_key_pem);
        let ca = write(dir.path(), "ca.pem", &pki.ca_cert_pem);
        assert!(load_listen_tls(&cert, &key, None, false).is_ok());
        assert!(load_listen_tls(&cert, &key, Some(&ca), true).is_ok());
        let mismatch = load_listen_tls(&cert, &other_key, None, false)
            .err()
            .expect("mismatch");
        assert_eq!(mismatch.key, "key_file");
        assert!(mismatch.message.contains("does not match"), "{mismatch}");
        let expired = pki
            .issue_expired_server_cert(&["localhost"])
            .expect("expired");
        let expired_cert = write(dir.path(), "expired.pem", &expired.cert_pem);
        let expired_key = write(dir.path(), "expired-key.pem", &expired.key_pem);
        let err = load_listen_tls(&expired_cert, &expired_key, None, false)
            .err()
            .expect("expired");
        assert_eq!(err.key, "cert_file");
        assert!(err.message.contains("valid only from"), "{err}");
        let err = load_listen_tls(&cert, &key, None, true)
            .err()
            .expect("needs CA");
        assert_eq!(err.key, "require_client_cert");
        assert!(err.message.contains("client_ca_file"), "{err}");
        let missing = load_listen_tls(&dir.path().join("nope.pem"), &key, None, false)
            .err()
            .expect("missing certificate");
        assert_eq!(missing.key, "cert_file");
        assert!(missing.message.contains("cannot read"), "{missing}");
        let missing = load_listen_tls(&cert, &dir.path().join("nope.pem"), None, false)
            .err()
            .expect("missing key");
        assert_eq!(missing.key, "key_file");
        let not_pem = write(dir.path(), "not-pem.pem", "no certificates here\n");
        let err = load_listen_tls(&cert, &key, Some(&not_pem), false)
            .err()
            .expect("a CA file without certificates");
        assert_eq!(err.key, "client_ca_file");
    }

    /// Every certificate of the served chain is held to its validity, and the chain
    /// expires with its earliest certificate, an intermediate's too.
    #[test]
    fn an_intermediate_counts_for_validity_and_expiry() {
        use crate::simulator::LeafSpec;
        let dir = tempfile::tempdir().expect("tempdir");
        let pki = generate_pki(&["localhost"]).expect("pki");
        let key = write(dir.path(), "key.pem", &pki.server_key_pem);
        let load = |extra: &str| {
            let chain = format!("{}{extra}", pki.server_cert_pem);
            let cert = write(dir.path(), "chain.pem", &chain);
            load_listen_tls(&cert, &key, None, false)
        };
        let leaf_only = load("").expect("valid").expires_at;

        let expired = pki
            .issue_expired_server_cert(&["intermediate"])
            .expect("expired");
        let err = load(&expired.cert_pem)
            .err()
            .expect("an expired intermediate");
        assert_eq!(err.key, "cert_file");
        assert!(
            err.message
                .contains("certificate 2 of the chain (an intermediate) is valid only from"),
            "{err}"
        );

        let mut spec = LeafSpec::server(&["intermediate"]);
        spec.not_after = time::OffsetDateTime::now_utc() + time::Duration::days(10);
        let soon = pki.issue(&spec).expect("short-lived");
        let expires_at = load(&soon.cert_pem).expect("valid").expires_at;
        assert_eq!(expires_at, spec.not_after.unix_timestamp());
        assert!(expires_at < leaf_only);
        let later = load(&pki.ca_cert_pem).expect("valid").expires_at;
        assert_eq!(
            later, leaf_only,
            "a longer-lived CA leaves the leaf's expiry"
        );
    }

    #[test]
    fn client_trust_changes_with_the_cas_and_the_requirement_only() {
        let dir = tempfile::tempdir().expect("tempdir");
        let pki = generate_pki(&["localhost"]).expect("pki");
        let other = generate_pki(&["localhost"]).expect("pki");
        let cert = write(dir.path(), "cert.pem", &pki.server_cert_pem);
        let key = write(dir.path(), "key.pem", &pki.server_key_pem);
        let ca = write(dir.path(), "ca.pem", &pki.ca_cert_pem);
        let trust = |ca: Option<&Path>, required| {
            load_listen_tls(&cert, &key, ca, required)
                .expect("valid")
                .client_trust
        };
        let first = trust(Some(&ca), false);
        assert_eq!(trust(Some(&ca), false), first, "the same CAs, read again");
        assert_ne!(trust(Some(&ca), true), first, "now required");
        assert_ne!(trust(None, false), first, "no client CAs");
        write(dir.path(), "ca.pem", &other.ca_cert_pem);
        assert_ne!(trust(Some(&ca), false), first, "another CA in the file");
    }

    /// A client certificate with these SANs from a fresh test CA, and the identity the
    /// listener reads from it.
    fn client_identity(sans: &[&str]) -> (Vec<CertificateDer<'static>>, ClientCertificate) {
        let pki = generate_pki(&["localhost"]).expect("pki");
        let client = pki.issue_client_cert(sans).expect("client cert");
        let der = rustls_pemfile::certs(&mut client.cert_pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .expect("pem");
        let identity = ClientCertificate::from_peer(Some(&der)).expect("identity");
        (der, identity)
    }

    #[test]
    fn reads_uri_and_dns_sans_and_fingerprints() {
        let (der, identity) =
            client_identity(&["spiffe://prod/ns/billing/sa/api", "billing.internal"]);
        assert_eq!(
            identity.sans,
            vec![
                CertSan::Uri("spiffe://prod/ns/billing/sa/api".to_owned()),
                CertSan::Dns("billing.internal".to_owned())
            ]
        );
        assert_eq!(
            identity.fingerprint.as_str(),
            hex::encode(&Sha256::digest(der[0].as_ref())[..6])
        );
        assert_eq!(ClientCertificate::from_peer(None), None);
    }

    #[test]
    fn dns_sans_are_lower_cased_and_uri_sans_kept_exactly() {
        let (_, identity) = client_identity(&["spiffe://Prod/ns/Billing", "Billing.INTERNAL"]);
        assert_eq!(
            identity.sans,
            [
                CertSan::uri("spiffe://Prod/ns/Billing"),
                CertSan::Dns("billing.internal".to_owned())
            ]
        );
    }

    #[test]
    fn a_config_entry_with_a_scheme_is_a_uri_and_any_other_a_dns_name() {
        let cases = [
            (
                "spiffe://Prod/x",
                CertSan::Uri("spiffe://Prod/x".to_owned()),
            ),
            ("urn:Example:A", CertSan::Uri("urn:Example:A".to_owned())),
            ("OPS.Internal", CertSan::Dns("ops.internal".to_owned())),
            ("ops.internal", CertSan::Dns("ops.internal".to_owned())),
            ("1x:y", CertSan::Dns("1x:y".to_owned())),
            (":a", CertSan::Dns(":a".to_owned())),
        ];
        for (entry, expected) in cases {
            assert_eq!(CertSan::from_config(entry), expected, "{entry}");
        }
        assert_ne!(
            CertSan::from_config("spiffe://x"),
            CertSan::dns("spiffe://x"),
            "a DNS SAN never matches a URI entry"
        );
    }

    #[test]
    fn resumption_is_off_only_when_client_certificates_are_verified() {
        let dir = tempfile::tempdir().expect("tempdir");
        let pki = generate_pki(&["localhost"]).expect("pki");
        let cert = write(dir.path(), "cert.pem", &pki.server_cert_pem);
        let key = write(dir.path(), "key.pem", &pki.server_key_pem);
        let ca = write(dir.path(), "ca.pem", &pki.ca_cert_pem);
        for required in [false, true] {
            let tls = load_listen_tls(&cert, &key, Some(&ca), required).expect("valid");
            let config = &tls.server_config;
            assert!(!config.session_storage.can_cache(), "no session cache");
            assert_eq!(config.send_tls13_tickets, 0, "no TLS 1.3 tickets");
            assert!(!config.ticketer.enabled(), "no stateless tickets");
        }
        let plain = load_listen_tls(&cert, &key, None, false).expect("valid");
        assert!(
            plain.server_config.session_storage.can_cache(),
            "without client certificates resumption stays"
        );
    }
}
