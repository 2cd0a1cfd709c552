//! The route table: which requests the data listener serves and how their replies look.
//!
//! | method | path                                                   | reply style  |
//! |--------|--------------------------------------------------------|--------------|
//! | POST   | `/mpc/{name}/end`                                      | problem+json |
//! | POST   | `/mpc/by-uuid/{uuid}/end`                              | problem+json |
//! | DELETE | `/v1/Account/{auth_id}/MultiPartyCall/name_{name}[/]`  | Plivo JSON   |
//! | DELETE | `/v1/Account/{auth_id}/MultiPartyCall/uuid_{uuid}[/]`  | Plivo JSON   |
//!
//! Segments are returned still percent-encoded; the name and uuid checks come later, after
//! authentication, so an anonymous caller learns nothing about them.

use http::{Method, Uri};

use crate::problem::Problem;

/// How replies are shaped: the gateway's own problem+json, or Plivo's error JSON so the
/// official SDKs raise their usual typed errors.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Flavor {
    #[default]
    Native,
    Plivo,
}

/// What a request asks to end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target<'a> {
    /// A friendly name, still percent-encoded.
    Name(&'a str),
    /// An MPC uuid, unchecked.
    Uuid(&'a str),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Route<'a> {
    pub flavor: Flavor,
    pub target: Target<'a>,
    /// `{auth_id}` of a Plivo-style path: must equal the Basic username.
    pub path_auth_id: Option<&'a str>,
    /// A Plivo-style path that came with a query. The SDKs put names on the wire
    /// unencoded, so `name_a?b/` arrives as name `a` with a query: the target is cut
    /// short and must be refused as invalid (after authentication, like every name
    /// check) rather than end a different MPC.
    pub target_cut_by_query: bool,
}

const PLIVO_PREFIX: &str = "/v1/Account/";
const PLIVO_MPC: &str = "/MultiPartyCall/";

/// The reply style for a path, known before routing so even a 404 under `/v1/` is Plivo JSON.
pub fn flavor_of(path: &str) -> Flavor {
    if path.starts_with(PLIVO_PREFIX) {
        Flavor::Plivo
    } else {
        Flavor::Native
    }
}

pub fn route<'a>(method: &Method, uri: &'a Uri) -> Result<Route<'a>, Problem> {
    let path = uri.path();
    if let Some(route) = native(path) {
        return only(method, Method::POST, route);
    }
    if let Some(route) = plivo(path) {
        let route = only(method, Method::DELETE, route)?;
        return Ok(Route {
            target_cut_by_query: uri.query().is_some(),
            ..route
        });
    }
    Err(Problem::NotFound)
}

fn only<'a>(method: &Method, allowed: Method, route: Route<'a>) -> Result<Route<'a>, Problem> {
    if *method == allowed {
        Ok(route)
    } else {
        Err(Problem::MethodNotAllowed {
            allow: if allowed == Method::POST {
                "POST"
            } else {
                "DELETE"
            },
        })
    }
}

/// `/mpc/{name}/end` and `/mpc/by-uuid/{uuid}/end`.
fn native(path: &str) -> Option<Route<'_>> {
    let inner = path.strip_prefix("/mpc/")?.strip_suffix("/end")?;
    let target = match inner.strip_prefix("by-uuid/") {
        Some(uuid) if !uuid.contains('/') => Target::Uuid(uuid),
        _ if !inner.contains('/') => Target::Name(inner),
        _ => return None,
    };
    Some(Route {
        flavor: Flavor::Native,
        target,
        path_auth_id: None,
        target_cut_by_query: false,
    })
}

/// `/v1/Account/{auth_id}/MultiPartyCall/{name_…|uuid_…}` with an optional trailing slash.
/// Everything after `name_` is the name, slashes included, so `name_a/b/` reaches the name
/// check (and is refused there) instead of quietly routing elsewhere.
fn plivo(path: &str) -> Option<Route<'_>> {
    let rest = path.strip_prefix(PLIVO_PREFIX)?;
    let (auth_id, mpc) = rest.split_once(PLIVO_MPC)?;
    if auth_id.is_empty() || auth_id.contains('/') {
        return None;
    }
    let mpc = mpc.strip_suffix('/').unwrap_or(mpc);
    let target = if let Some(name) = mpc.strip_prefix("name_") {
        Target::Name(name)
    } else if let Some(uuid) = mpc.strip_prefix("uuid_") {
        Target::Uuid(uuid)
    } else {
        return None;
    };
    Some(Route {
        flavor: Flavor::Plivo,
        target,
        path_auth_id: Some(auth_id),
        target_cut_by_query: false,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn routed(
        method: Method,
        target: &str,
    ) -> Result<(Flavor, Target<'static>, Option<&'static str>), Problem> {
        let uri: &'static Uri = Box::leak(Box::new(target.parse().expect("uri")));
        route(&method, uri).map(|r| (r.flavor, r.target, r.path_auth_id))
    }

    #[test]
    fn native_routes() {
        use Target::*;
        assert_eq!(
            routed(Method::POST, "/mpc/abc/end"),
            Ok((Flavor::Native, Name("abc"), None))
        );
        assert_eq!(
            routed(Method::POST, "/mpc//end"),
            Ok((Flavor::Native, Name(""), None))
        );
        assert_eq!(
            routed(Method::POST, "/mpc/a%2Fb/end?x=1"),
            Ok((Flavor::Native, Name("a%2Fb"), None))
        );
        assert_eq!(
            routed(Method::POST, "/mpc/by-uuid/1234/end"),
            Ok((Flavor::Native, Uuid("1234"), None))
        );
        assert_eq!(
            routed(Method::POST, "/mpc/by-uuid/end"),
            Ok((Flavor::Native, Name("by-uuid"), None))
        );
        assert_eq!(
            routed(Method::GET, "/mpc/abc/end"),
            Err(Problem::MethodNotAllowed { allow: "POST" })
        );
        assert_eq!(routed(Method::POST, "/mpc/a/b/end"), Err(Problem::NotFound));
        assert_eq!(
            routed(Method::POST, "/mpc/abc/end/"),
            Err(Problem::NotFound)
        );
        assert_eq!(routed(Method::POST, "/mpc/abc"), Err(Problem::NotFound));
        assert_eq!(routed(Method::DELETE, "/"), Err(Problem::NotFound));
    }

    #[test]
    fn plivo_routes() {
        use Target::*;
        let id = Some("MAXXXXXXXXXXXXXXXXXX");
        let base = "/v1/Account/MAXXXXXXXXXXXXXXXXXX/MultiPartyCall";
        assert_eq!(
            routed(Method::DELETE, &format!("{base}/name_a%20b/")),
            Ok((Flavor::Plivo, Name("a%20b"), id))
        );
        assert_eq!(
            routed(Method::DELETE, &format!("{base}/name_a")),
            Ok((Flavor::Plivo, Name("a"), id))
        );
        assert_eq!(
            routed(Method::DELETE, &format!("{base}/name_a/b/")),
            Ok((Flavor::Plivo, Name("a/b"), id))
        );
        assert_eq!(
            routed(
                Method::DELETE,
                &format!("{base}/uuid_12345678-90ab-cdef-1234-567890abcdef/")
            ),
            Ok((
                Flavor::Plivo,
                Uuid("12345678-90ab-cdef-1234-567890abcdef"),
                id
            ))
        );
        // Routed, marked, and refused later (after authentication) by the name check.
        let cut = |target: String| {
            let uri: Uri = target.parse().expect("uri");
            route(&Method::DELETE, &uri).map(|r| r.target_cut_by_query)
        };
        assert_eq!(cut(format!("{base}/name_a?b/")), Ok(true));
        assert_eq!(cut(format!("{base}/uuid_a?b/")), Ok(true));
        assert_eq!(cut(format!("{base}/name_a/")), Ok(false));
        assert_eq!(
            routed(Method::DELETE, &format!("{base}/name_a?b/")),
            Ok((Flavor::Plivo, Name("a"), id))
        );
        assert_eq!(
            routed(Method::POST, &format!("{base}/name_a/")),
            Err(Problem::MethodNotAllowed { allow: "DELETE" })
        );
        assert_eq!(
            routed(Method::DELETE, &format!("{base}/other_a/")),
            Err(Problem::NotFound)
        );
        assert_eq!(
            routed(Method::DELETE, "/v1/Account//MultiPartyCall/name_a/"),
            Err(Problem::NotFound)
        );
        assert_eq!(flavor_of("/v1/Account/x"), Flavor::Plivo);
        assert_eq!(flavor_of("/mpc/x/end"), Flavor::Native);
    }
}
