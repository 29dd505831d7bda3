//! Who may call the API: a bearer token (`authorization: Bearer …`) when
//! one is configured, and the rules for which listen addresses need TLS or a
//! token.

use std::net::SocketAddr;

use tonic::{Request, Status};

/// Why a listen address is refused.
#[derive(Debug, thiserror::Error)]
pub enum ListenPolicyError {
    #[error(
        "refusing to serve the gRPC API on non-loopback address {addr} without TLS or a \
         token: set tls.cert/tls.key (--tls-cert/--tls-key), or auth.token_file \
         (--token-file), or pass --insecure to accept the risk"
    )]
    Unprotected { addr: SocketAddr },
}

/// Checks that a non-loopback address is protected (or explicitly insecure).
/// Returns a warning to log when the setup is allowed but weak.
pub fn check_listen(
    addr: SocketAddr,
    tls: bool,
    token: bool,
    insecure: bool,
) -> Result<Option<String>, ListenPolicyError> {
    if addr.ip().is_loopback() {
        return Ok(None);
    }
    match (tls, token, insecure) {
        (true, _, _) => Ok(None),
        (false, true, _) => Ok(Some(format!(
            "serving on {addr} with a token but without TLS: the token crosses the network in \
             clear text; configure tls.cert/tls.key"
        ))),
        (false, false, true) => Ok(Some(format!(
            "--insecure: serving findings and captures on {addr} to anyone who can connect \
             (no TLS, no token)"
        ))),
        (false, false, false) => Err(ListenPolicyError::Unprotected { addr }),
    }
}

/// Constant-time comparison (no early exit on the first differing byte).
fn same(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// A tonic interceptor requiring `authorization: Bearer <token>`.
#[derive(Clone)]
pub struct BearerAuth {
    token: Option<std::sync::Arc<str>>,
}

impl BearerAuth {
    pub fn new(token: Option<String>) -> BearerAuth {
        BearerAuth {
            token: token.map(Into::into),
        }
    }

    pub fn check<T>(&self, req: Request<T>) -> Result<Request<T>, Status> {
        let Some(token) = &self.token else {
            return Ok(req);
        };
        let Some(value) = req.metadata().get("authorization") else {
            return Err(Status::unauthenticated(
                "this agent requires a token: send `authorization: Bearer <token>`",
            ));
        };
        let ok = value
            .to_str()
            .ok()
            .and_then(|v| v.strip_prefix("Bearer "))
            .is_some_and(|given| same(given.trim().as_bytes(), token.as_bytes()));
        if ok {
            Ok(req)
        } else {
            Err(Status::unauthenticated("invalid token"))
        }
    }
}

impl tonic::service::Interceptor for BearerAuth {
    fn call(&mut self, req: Request<()>) -> Result<Request<()>, Status> {
        self.check(req)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listen_policy() {
        let lo: SocketAddr = "127.0.0.1:7070".parse().unwrap();
        let any: SocketAddr = "0.0.0.0:7070".parse().unwrap();
        assert!(check_listen(lo, false, false, false).unwrap().is_none());
        assert!(check_listen("[::1]:1".parse().unwrap(), false, false, false).is_ok());
        assert!(check_listen(any, false, false, false).is_err());
        assert!(check_listen(any, true, false, false).unwrap().is_none());
        assert!(check_listen(any, false, true, false).unwrap().is_some());
        assert!(check_listen(any, false, false, true).unwrap().is_some());
    }

    #[test]
    fn bearer_token() {
        let auth = BearerAuth::new(Some("s3cret".into()));
        let req = |v: Option<&str>| {
            let mut r = Request::new(());
            if let Some(v) = v {
                r.metadata_mut().insert("authorization", v.parse().unwrap());
            }
            r
        };
        assert!(auth.check(req(Some("Bearer s3cret"))).is_ok());
        let no = auth.check(req(None)).unwrap_err();
        assert_eq!(no.code(), tonic::Code::Unauthenticated);
        assert_eq!(
            auth.check(req(Some("Bearer nope"))).unwrap_err().code(),
            tonic::Code::Unauthenticated
        );
        assert_eq!(
            auth.check(req(Some("s3cret"))).unwrap_err().code(),
            tonic::Code::Unauthenticated
        );
        assert!(BearerAuth::new(None).check(req(None)).is_ok());
    }
}
