//! Test PKI: a self-signed CA made with rcgen that issues server and client certificates,
//! for the simulator's TLS, the demo and the tests.

use std::fmt;
use std::net::IpAddr;

use rustls::pki_types::CertificateDer;

use super::SimTls;

/// Failure to make a test certificate.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    /// rcgen refused the parameters (e.g. a SAN that is not IA5) or failed to sign.
    #[error("test certificate generation failed: {0}")]
    Rcgen(#[from] rcgen::Error),
    /// The CA certificate could not be added to a root store.
    #[error("test CA certificate rejected: {0}")]
    Rustls(#[from] rustls::Error),
}

/// What a leaf certificate is for and how long it is valid.
#[derive(Clone, Debug)]
pub struct LeafSpec {
    /// Subject common name.
    pub common_name: String,
    /// Subject alternative names: `scheme://…` becomes a URI SAN, an IP address an IP SAN,
    /// anything else a DNS SAN.
    pub sans: Vec<String>,
    /// Add the `serverAuth` extended key usage.
    pub server_auth: bool,
    /// Add the `clientAuth` extended key usage.
    pub client_auth: bool,
    /// Start of validity.
    pub not_before: time::OffsetDateTime,
    /// End of validity.
    pub not_after: time::OffsetDateTime,
}

impl LeafSpec {
    /// Valid from a day ago for a year.
    fn current(common_name: &str, sans: &[&str], server_auth: bool, client_auth: bool) -> Self {
        let now = time::OffsetDateTime::now_utc();
        LeafSpec {
            common_name: common_name.to_owned(),
            sans: sans.iter().map(|s| (*s).to_owned()).collect(),
            server_auth,
            client_auth,
            not_before: now - time::Duration::days(1),
            not_after: now + time::Duration::days(365),
        }
    }

    /// A server certificate for `hosts`, valid now.
    pub fn server(hosts: &[&str]) -> Self {
        Self::current(
            hosts.first().copied().unwrap_or("server"),
            hosts,
            true,
            false,
        )
    }

    /// A client certificate with these SANs (e.g. `spiffe://prod/ns/billing/sa/api`).
    pub fn client(sans: &[&str]) -> Self {
        Self::current(sans.first().copied().unwrap_or("client"), sans, false, true)
    }

    /// Make it expired: valid from 30 days ago until yesterday.
    pub fn expired(mut self) -> Self {
        let now = time::OffsetDateTime::now_utc();
        self.not_before = now - time::Duration::days(30);
        self.not_after = now - time::Duration::days(1);
        self
    }
}

/// A certificate issued by a [`TestPki`] CA, with its private key.
#[derive(Clone)]
pub struct IssuedCert {
    /// The certificate (PEM).
    pub cert_pem: String,
    /// Its private key (PKCS#8 PEM).
    pub key_pem: String,
}

impl IssuedCert {
    /// The certificate and key as simulator TLS settings.
    pub fn sim_tls(&self) -> SimTls {
        SimTls {
            cert_chain_pem: self.cert_pem.clone(),
            key_pem: self.key_pem.clone(),
        }
    }
}

impl fmt::Debug for IssuedCert {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IssuedCert")
            .field("cert_pem", &self.cert_pem)
            .field("key_pem", &"<redacted>")
            .finish()
    }
}

/// A self-signed test CA and a server certificate signed by it.
pub struct TestPki {
    /// The CA certificate (PEM): what clients trust.
    pub ca_cert_pem: String,
    /// The server certificate (PEM) for the hosts given to [`generate_pki`].
    pub server_cert_pem: String,
    /// The server certificate's private key (PKCS#8 PEM).
    pub server_key_pem: String,
    ca_cert: rcgen::Certificate,
    ca_key: rcgen::KeyPair,
}

/// Alias kept for callers that name the PKI type `Pki`.
pub type Pki = TestPki;

impl fmt::Debug for TestPki {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TestPki")
            .field("ca_cert_pem", &self.ca_cert_pem)
            .field("server_cert_pem", &self.server_cert_pem)
            .field("server_key_pem", &"<redacted>")
            .finish_non_exhaustive()
    }
}

/// Make a self-signed CA and a server certificate signed by it for `hosts` (DNS names or
/// IP addresses, e.g. `["localhost", "127.0.0.1"]`).
pub fn generate_pki(hosts: &[&str]) -> Result<TestPki, PkiError> {
    let now = time::OffsetDateTime::now_utc();
    let mut params = rcgen::CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "mpc-gateway test CA");
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::CrlSign,
        rcgen::KeyUsagePurpose::DigitalSignature,
    ];
    params.not_before = now - time::Duration::days(1);
    params.not_after = now + time::Duration::days(3650);
    let ca_key = rcgen::KeyPair::generate()?;
    let ca_cert = params.self_signed(&ca_key)?;
    let mut pki = TestPki {
        ca_cert_pem: ca_cert.pem(),
        server_cert_pem: String::new(),
        server_key_pem: String::new(),
        ca_cert,
        ca_key,
    };
    let server = pki.issue(&LeafSpec::server(hosts))?;
    pki.server_cert_pem = server.cert_pem;
    pki.server_key_pem = server.key_pem;
    Ok(pki)
}

impl TestPki {
    /// Same as [`generate_pki`].
    pub fn generate(hosts: &[&str]) -> Result<TestPki, PkiError> {
        generate_pki(hosts)
    }

    /// The server certificate and key as simulator TLS settings.
    pub fn server_tls(&self) -> SimTls {
        SimTls {
            cert_chain_pem: self.server_cert_pem.clone(),
            key_pem: self.server_key_pem.clone(),
        }
    }

    /// The CA certificate (DER).
    pub fn ca_cert_der(&self) -> CertificateDer<'static> {
        self.ca_cert.der().clone()
    }

    /// A root store that trusts only this CA.
    pub fn root_store(&self) -> Result<rustls::RootCertStore, PkiError> {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.ca_cert_der())?;
        Ok(roots)
    }

    /// Issue a leaf certificate signed by this CA.
    pub fn issue(&self, spec: &LeafSpec) -> Result<IssuedCert, PkiError> {
        let mut params = rcgen::CertificateParams::default();
        params.distinguished_name = rcgen::DistinguishedName::new();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, spec.common_name.as_str());
        params.subject_alt_names = spec
            .sans
            .iter()
            .map(|san| san_type(san))
            .collect::<Result<_, _>>()?;
        params.is_ca = rcgen::IsCa::ExplicitNoCa;
        params.key_usages = vec![rcgen::KeyUsagePurpose::DigitalSignature];
        if spec.server_auth {
            params
                .extended_key_usages
                .push(rcgen::ExtendedKeyUsagePurpose::ServerAuth);
        }
        if spec.client_auth {
            params
                .extended_key_usages
                .push(rcgen::ExtendedKeyUsagePurpose::ClientAuth);
        }
        params.use_authority_key_identifier_extension = true;
        params.not_before = spec.not_before;
        params.not_after = spec.not_after;
        let key = rcgen::KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.ca_cert, &self.ca_key)?;
        Ok(IssuedCert {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }

    /// A server certificate for other hosts (e.g. the wrong one), valid now.
    pub fn issue_server_cert(&self, hosts: &[&str]) -> Result<IssuedCert, PkiError> {
        self.issue(&LeafSpec::server(hosts))
    }

    /// A client certificate with these SANs (`spiffe://…` URIs, DNS names), valid now.
    pub fn issue_client_cert(&self, sans: &[&str]) -> Result<IssuedCert, PkiError> {
        self.issue(&LeafSpec::client(sans))
    }

    /// A server certificate for `hosts` whose `not_after` is in the past.
    pub fn issue_expired_server_cert(&self, hosts: &[&str]) -> Result<IssuedCert, PkiError> {
        self.issue(&LeafSpec::server(hosts).expired())
    }

    /// A client certificate with these SANs whose `not_after` is in the past.
    pub fn issue_expired_client_cert(&self, sans: &[&str]) -> Result<IssuedCert, PkiError> {
        self.issue(&LeafSpec::client(sans).expired())
    }
}

fn san_type(san: &str) -> Result<rcgen::SanType, rcgen::Error> {
    if san.contains("://") {
        Ok(rcgen::SanType::URI(rcgen::Ia5String::try_from(san)?))
    } else if let Ok(ip) = san.parse::<IpAddr>() {
        Ok(rcgen::SanType::IpAddress(ip))
    } else {
        Ok(rcgen::SanType::DnsName(rcgen::Ia5String::try_from(san)?))
    }
}
