//! Who is calling: a verified client certificate and/or a Bearer token on the native
//! routes; HTTP Basic (`sdk_auth_id` : token) on the Plivo-compatible route. Records the
//! tenant and the fingerprint of what authenticated it on the trail.

use std::sync::Arc;

use base64::Engine as _;
use http::header::AUTHORIZATION;
use http::HeaderMap;

use crate::auth::{bearer_token, Fingerprint, Identity};
use crate::problem::Problem;
use crate::routes::{Flavor, Route};
use crate::tls::ClientCertificate;

use super::runtime::{Runtime, TenantPolicy};
use super::trail::Trail;

pub(super) fn authenticate(
    runtime: &Runtime,
    headers: &HeaderMap,
    certificate: Option<&ClientCertificate>,
    route: &Route<'_>,
    trail: &mut Trail,
) -> Result<Arc<TenantPolicy>, Problem> {
    let Authenticated {
        tenant,
        fingerprint,
    } = match route.flavor {
        Flavor::Native => by_certificate_or_bearer(runtime, headers, certificate),
        Flavor::Plivo => confirmed_by_certificate(
            runtime,
            certificate,
            by_basic(runtime, headers, route.path_auth_id),
        ),
    };
    // With no credential of its own, a caller is still known by its verified certificate
    // (DESIGN §7), so ops can find a client whose SANs no tenant lists.
    trail.token_fp = fingerprint
        .or_else(|| certificate.map(|cert| cert.fingerprint.clone()))
        .map(Arc::from);
    let tenant = tenant.ok_or(Problem::Unauthenticated)?;
    trail.tenant = Some(Arc::clone(&tenant.name));
    Ok(tenant)
}

/// Who a credential names, if anyone, and the fingerprint of what was presented (the
/// audit log's `token_fp`), which a refused credential has too.
struct Authenticated {
    tenant: Option<Arc<TenantPolicy>>,
    fingerprint: Option<Fingerprint>,
}

impl Authenticated {
    fn tenant(tenant: Arc<TenantPolicy>, fingerprint: Option<Fingerprint>) -> Self {
        Authenticated {
            tenant: Some(tenant),
            fingerprint,
        }
    }

    fn nobody(fingerprint: Option<Fingerprint>) -> Self {
        Authenticated {
            tenant: None,
            fingerprint,
        }
    }
}

/// A certificate that names a tenant decides (its fingerprint is recorded); a token sent
/// as well must name the same tenant. Without such a certificate the token decides.
fn by_certificate_or_bearer(
    runtime: &Runtime,
    headers: &HeaderMap,
    certificate: Option<&ClientCertificate>,
) -> Authenticated {
    let Ok(authorization) = authorization(headers) else {
        // Several credentials: the caller is not authenticated, not even by its
        // certificate, whose "a token sent as well" could not be checked.
        return Authenticated::nobody(None);
    };
    let token = match authorization.and_then(bearer_token) {
        Some(token) => runtime.tokens.identify(token),
        None => Identity::Anonymous,
    };
    let by_certificate = certificate.and_then(|cert| tenant_of_certificate(runtime, cert));
    match (by_certificate, &token) {
        (Some((tenant, cert_fp)), Identity::Anonymous) => {
            Authenticated::tenant(tenant, Some(cert_fp))
        }
        (Some((tenant, cert_fp)), Identity::Tenant { tenant: other, .. })
            if Arc::ptr_eq(other, &tenant) =>
        {
            Authenticated::tenant(tenant, Some(cert_fp))
        }
        (Some((_, cert_fp)), _) => Authenticated::nobody(Some(cert_fp)),
        (
            None,
            Identity::Tenant {
                tenant,
                fingerprint,
            },
        ) => Authenticated::tenant(Arc::clone(tenant), Some(fingerprint.clone())),
        (None, identity) => Authenticated::nobody(identity.fingerprint().cloned()),
    }
}

/// The SDKs always send Basic credentials, so on their route a certificate that names a
/// tenant confirms rather than replaces them: it must name the same tenant (else nobody
/// is authenticated), and its fingerprint is recorded, as on the native routes.
fn confirmed_by_certificate(
    runtime: &Runtime,
    certificate: Option<&ClientCertificate>,
    by_basic: Authenticated,
) -> Authenticated {
    match certificate.and_then(|cert| tenant_of_certificate(runtime, cert)) {
        None => by_basic,
        Some((by_certificate, cert_fp))
            if by_basic
                .tenant
                .as_ref()
                .is_some_and(|tenant| Arc::ptr_eq(tenant, &by_certificate)) =>
        {
            Authenticated::tenant(by_certificate, Some(cert_fp))
        }
        Some((_, cert_fp)) => Authenticated::nobody(Some(cert_fp)),
    }
}

/// `Authorization: Basic base64(sdk_auth_id:token)`; the username must be the tenant's
/// `sdk_auth_id` and equal `{auth_id}` in the path.
fn by_basic(runtime: &Runtime, headers: &HeaderMap, path_auth_id: Option<&str>) -> Authenticated {
    let basic = authorization(headers)
        .ok()
        .flatten()
        .and_then(basic_credentials);
    let Some((username, password)) = basic else {
        return Authenticated::nobody(None);
    };
    let identity = runtime.tokens.identify(password.as_bytes());
    let fingerprint = identity.fingerprint().cloned();
    let Identity::Tenant { tenant, .. } = identity else {
        return Authenticated::nobody(fingerprint);
    };
    let sdk_auth_id = tenant.sdk_auth_id.as_deref();
    if sdk_auth_id == Some(username.as_str()) && path_auth_id == Some(username.as_str()) {
        Authenticated::tenant(tenant, fingerprint)
    } else {
        Authenticated::nobody(fingerprint)
    }
}

/// Several `Authorization` headers: ambiguous, so nobody is authenticated.
struct SeveralAuthorizations;

/// The `Authorization` header, if there is exactly one.
fn authorization(headers: &HeaderMap) -> Result<Option<&[u8]>, SeveralAuthorizations> {
    let mut values = headers.get_all(AUTHORIZATION).iter();
    match (values.next(), values.next()) {
        (_, Some(_)) => Err(SeveralAuthorizations),
        (first, None) => Ok(first.map(|value| value.as_bytes())),
    }
}

fn basic_credentials(header: &[u8]) -> Option<(String, String)> {
    let text = std::str::from_utf8(header).ok()?;
    let (scheme, encoded) = text.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(encoded.trim())
        .ok()?;
    let decoded = String::from_utf8(decoded).ok()?;
    let (username, password) = decoded.split_once(':')?;
    Some((username.to_owned(), password.to_owned()))
}

/// The one tenant whose `client_cert_sans` lists a SAN of the certificate; a certificate
/// naming several tenants authenticates none.
fn tenant_of_certificate(
    runtime: &Runtime,
    certificate: &ClientCertificate,
) -> Option<(Arc<TenantPolicy>, Fingerprint)> {
    let mut found: Option<&Arc<TenantPolicy>> = None;
    for san in &certificate.sans {
        match (runtime.sans.get(san), found) {
            (Some(tenant), Some(previous)) if !Arc::ptr_eq(tenant, previous) => return None,
            (Some(tenant), _) => found = Some(tenant),
            (None, _) => {}
        }
    }
    found.map(|tenant| (Arc::clone(tenant), certificate.fingerprint.clone()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn basic_credentials_parse() {
        let header = format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode("MAX:tok:with:colons")
        );
        assert_eq!(
            basic_credentials(header.as_bytes()),
            Some(("MAX".to_owned(), "tok:with:colons".to_owned()))
        );
        assert_eq!(basic_credentials(b"Bearer abc"), None);
        assert_eq!(basic_credentials(b"Basic !!!"), None);
        let no_colon = format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode("x")
        );
        assert_eq!(basic_credentials(no_colon.as_bytes()), None);
    }
}
