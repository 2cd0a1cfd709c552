//! `upstream.base_url`: where Plivo is. Parsed and checked once, when the config is
//! loaded (and by the demo, for the simulator's URL), into a [`BaseUrl`] that holds every
//! form the upstream client needs, so nothing downstream parses it again or falls back
//! to a default when it could not.

use std::net::IpAddr;

use http::header::InvalidHeaderValue;
use http::uri::{Authority, InvalidUri, InvalidUriParts, Scheme};
use http::{HeaderValue, Uri};

/// Where Plivo is: `https://host[:port]`, or `http://` to a loopback host (the
/// simulator); never a path, a query or credentials.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BaseUrl {
    scheme: Scheme,
    authority: Authority,
    /// `scheme://authority/`, what a connector is given.
    origin: Uri,
    /// `Host` of an HTTP/1.1 request: the authority without the scheme's default port.
    host: HeaderValue,
}

/// Why `upstream.base_url` was refused.
#[derive(Debug, thiserror::Error)]
pub enum InvalidBaseUrl {
    #[error("not a valid URL: {0}")]
    NotAUrl(#[from] InvalidUri),
    #[error("expected an absolute URL like https://api.plivo.com")]
    NotAbsolute,
    #[error("must not contain credentials")]
    Credentials,
    #[error("invalid port {0:?}: expected 1-65535")]
    InvalidPort(String),
    #[error("expected scheme and host only, without a path, query or fragment")]
    PathOrQuery,
    #[error("must be https (plain http is allowed only to a loopback address)")]
    NotHttps,
    #[error("cannot be made into a connection address: {0}")]
    NoOrigin(#[from] InvalidUriParts),
    #[error("cannot be made into a Host header: {0}")]
    NoHostHeader(#[from] InvalidHeaderValue),
}

impl TryFrom<&str> for BaseUrl {
    type Error = InvalidBaseUrl;

    fn try_from(text: &str) -> Result<BaseUrl, InvalidBaseUrl> {
        let uri: Uri = text.parse()?;
        let (Some(scheme), Some(authority)) = (uri.scheme(), uri.authority()) else {
            return Err(InvalidBaseUrl::NotAbsolute);
        };
        check_authority(authority)?;
        // `http::Uri` drops a fragment without a word: refuse it like a path.
        if !matches!(uri.path(), "" | "/") || uri.query().is_some() || text.contains('#') {
            return Err(InvalidBaseUrl::PathOrQuery);
        }
        let plain_http_to_loopback = *scheme == Scheme::HTTP && is_loopback_host(authority.host());
        if *scheme != Scheme::HTTPS && !plain_http_to_loopback {
            return Err(InvalidBaseUrl::NotHttps);
        }
        BaseUrl::new(scheme.clone(), authority.clone())
    }
}

impl BaseUrl {
    /// Derives the origin and `Host` from a checked scheme and authority.
    fn new(scheme: Scheme, authority: Authority) -> Result<BaseUrl, InvalidBaseUrl> {
        let mut origin = http::uri::Parts::default();
        origin.scheme = Some(scheme.clone());
        origin.authority = Some(authority.clone());
        origin.path_and_query = Some(http::uri::PathAndQuery::from_static("/"));
        let origin = Uri::from_parts(origin)?;
        let host = host_header(&scheme, &authority)?;
        Ok(BaseUrl {
            scheme,
            authority,
            origin,
            host,
        })
    }

    pub fn scheme(&self) -> &Scheme {
        &self.scheme
    }

    pub fn authority(&self) -> &Authority {
        &self.authority
    }

    /// `scheme://authority/`: where connections go.
    pub fn origin(&self) -> &Uri {
        &self.origin
    }

    /// `Host` for HTTP/1.1 requests: with the port unless it is the scheme's default.
    pub fn host_header(&self) -> &HeaderValue {
        &self.host
    }
}

impl std::fmt::Display for BaseUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}://{}", self.scheme, self.authority)
    }
}

/// Refuses credentials, and a port that `http` parses as none at all: it accepts
/// `host:99999` or `host:` and then reports no port, which the connector would quietly
/// replace by the scheme's default.
fn check_authority(authority: &Authority) -> Result<(), InvalidBaseUrl> {
    if authority.as_str().contains('@') {
        return Err(InvalidBaseUrl::Credentials);
    }
    let port_text = authority
        .as_str()
        .strip_prefix(authority.host())
        .unwrap_or_default();
    if !port_text.is_empty() && authority.port_u16().is_none_or(|port| port == 0) {
        return Err(InvalidBaseUrl::InvalidPort(port_text.to_owned()));
    }
    Ok(())
}

fn is_loopback_host(host: &str) -> bool {
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    host.eq_ignore_ascii_case("localhost")
        || bare.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

fn host_header(scheme: &Scheme, authority: &Authority) -> Result<HeaderValue, InvalidHeaderValue> {
    let host = authority.host();
    let default_port = if *scheme == Scheme::HTTPS { 443 } else { 80 };
    match authority.port_u16() {
        Some(port) if port != default_port => HeaderValue::from_str(&format!("{host}:{port}")),
        _ => HeaderValue::from_str(host),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<BaseUrl, InvalidBaseUrl> {
        BaseUrl::try_from(text)
    }

    #[test]
    fn https_anywhere_and_plain_http_only_to_loopback() {
        assert!(parse("https://api.plivo.com").is_ok());
        assert!(parse("https://localhost:8443/").is_ok());
        assert!(parse("http://127.0.0.1:8000").is_ok());
        assert!(parse("http://[::1]:8000").is_ok());
        assert!(parse("http://localhost:8000").is_ok());
        assert!(parse("http://api.plivo.com").is_err());
        assert!(parse("https://api.plivo.com/v1").is_err());
        assert!(parse("https://u:p@api.plivo.com").is_err());
        assert!(parse("api.plivo.com").is_err());
        assert!(parse("ftp://api.plivo.com").is_err());
    }

    #[test]
    fn a_port_the_url_parser_cannot_read_is_refused() {
        // It must not silently become 443 or 80.
        assert!(parse("https://api.plivo.com:8443").is_ok());
        assert!(parse("http://[::1]").is_ok());
        for bad in [
            "https://api.plivo.com:99999",
            "https://api.plivo.com:",
            "http://127.0.0.1:80a0",
            "https://api.plivo.com:0",
        ] {
            let err = parse(bad).err().unwrap_or_else(|| panic!("{bad} accepted"));
            assert!(err.to_string().contains("invalid port"), "{bad}: {err}");
        }
    }

    #[test]
    fn origin_and_host_leave_out_nothing_but_the_default_port() {
        let forms = |text: &str| {
            let base = parse(text).expect("valid");
            let host = base.host_header().to_str().expect("ascii").to_owned();
            (base.origin().to_string(), host, base.to_string())
        };
        assert_eq!(
            forms("https://api.plivo.com"),
            (
                "https://api.plivo.com/".to_owned(),
                "api.plivo.com".to_owned(),
                "https://api.plivo.com".to_owned()
            )
        );
        assert_eq!(forms("https://api.plivo.com:443/").1, "api.plivo.com");
        assert_eq!(forms("https://127.0.0.1:8443").1, "127.0.0.1:8443");
        assert_eq!(forms("http://localhost:443").1, "localhost:443");
        assert_eq!(forms("http://[::1]:80").1, "[::1]");
        assert_eq!(
            forms("http://[::1]:8000").0,
            "http://[::1]:8000/",
            "the origin keeps the port"
        );
    }
}
