//! The route table on arbitrary request targets (origin-form, absolute-form, `*`,
//! authority-form, anything `http::Uri` accepts) and methods. Besides "never panics":
//! - a native route is `POST /mpc/{x}/end` with `{x}` free of `/`;
//! - a Plivo route is `DELETE /v1/Account/{auth_id}/MultiPartyCall/{name_|uuid_}…`
//!   without a query, with a non-empty `{auth_id}` free of `/`;
//! - the reply flavor agrees with `flavor_of`;
//! - 405 only where the other method would have routed;
//! - every routed segment is a slice of the path (nothing is invented).
//!
//! Each routed name or uuid is also fed to the name and uuid checks, as the gateway does.
#![no_main]

use http::{Method, Uri};
use libfuzzer_sys::fuzz_target;
use mpc_gateway::mpc_name::{MpcName, MpcUuid};
use mpc_gateway::problem::Problem;
use mpc_gateway::routes::{flavor_of, route, Flavor, Target};

fn slice_of(part: &str, whole: &str) -> bool {
    let (p, w) = (part.as_ptr() as usize, whole.as_ptr() as usize);
    p >= w && p + part.len() <= w + whole.len()
}

fn method_from(tag: u8) -> Method {
    match tag % 6 {
        0 => Method::POST,
        1 => Method::DELETE,
        2 => Method::GET,
        3 => Method::PUT,
        4 => Method::OPTIONS,
        _ => Method::from_bytes(b"post").unwrap_or(Method::PATCH),
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&tag, target)) = data.split_first() else {
        return;
    };
    let Ok(uri) = Uri::try_from(target) else {
        return;
    };
    let method = method_from(tag);
    let path = uri.path();
    match route(&method, &uri) {
        Ok(r) => {
            assert_eq!(r.flavor, flavor_of(path), "{uri}");
            let segment = match r.target {
                Target::Name(s) | Target::Uuid(s) => s,
            };
            assert!(slice_of(segment, path), "{uri}: segment not from the path");
            match r.flavor {
                Flavor::Native => {
                    assert_eq!(method, Method::POST, "{uri}");
                    assert!(path.starts_with("/mpc/") && path.ends_with("/end"), "{uri}");
                    assert!(!segment.contains('/'), "{uri}");
                    assert!(r.path_auth_id.is_none(), "{uri}");
                }
                Flavor::Plivo => {
                    assert_eq!(method, Method::DELETE, "{uri}");
                    assert!(uri.query().is_none(), "{uri}: query on a Plivo route");
                    let id = r.path_auth_id.expect("Plivo route without auth id");
                    assert!(!id.is_empty() && !id.contains('/'), "{uri}");
                    assert!(slice_of(id, path), "{uri}");
                    assert!(path.starts_with("/v1/Account/"), "{uri}");
                    assert!(
                        path.contains("/MultiPartyCall/name_")
                            || path.contains("/MultiPartyCall/uuid_"),
                        "{uri}"
                    );
                }
            }
            match r.target {
                Target::Name(n) => {
                    let _ = MpcName::from_path_segment(n).map(|n| n.upstream_encoded().to_string());
                }
                Target::Uuid(u) => {
                    let _ = MpcUuid::parse(u);
                }
            }
        }
        Err(Problem::MethodNotAllowed { allow }) => {
            let other = if allow == "POST" {
                Method::POST
            } else {
                Method::DELETE
            };
            assert_ne!(method, other, "{uri}: 405 for the allowed method");
            match route(&other, &uri) {
                Ok(_) | Err(Problem::InvalidMpcName(_)) => {}
                Err(e) => panic!("{uri}: 405 allowing {allow}, but {allow} gets {e:?}"),
            }
        }
        Err(Problem::InvalidMpcName(_)) => {
            assert!(uri.query().is_some(), "{uri}");
            assert_eq!(flavor_of(path), Flavor::Plivo, "{uri}");
        }
        Err(Problem::NotFound) => {
            for m in [Method::POST, Method::DELETE] {
                assert!(
                    matches!(route(&m, &uri), Err(Problem::NotFound)),
                    "{uri}: 404 for {method} but not for {m}"
                );
            }
        }
        Err(e) => panic!("{uri}: unexpected {e:?}"),
    }
});
