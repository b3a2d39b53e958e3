//! `[admin.auth]`: checking a request's `Authorization` header, and the client's header.

use base64::Engine as _;
use subtle::ConstantTimeEq;

use crate::config::AdminCredentials;

/// Paths served without credentials: liveness and readiness probes (systemd, a load balancer,
/// Kubernetes) carry none, and they tell nothing beyond "ok", "stalled" or "starting".
pub const OPEN_PATHS: [&str; 2] = ["/healthz", "/readyz"];

/// Whether `header` (the request's `Authorization` value) carries `expected`. Secrets are
/// compared in constant time, so the time an answer takes does not tell how much of one matched.
pub fn allows(expected: &AdminCredentials, header: Option<&str>) -> bool {
    let Some(header) = header else {
        return false;
    };
    let (scheme, value) = header.trim().split_once(' ').unwrap_or((header, ""));
    let value = value.trim();
    match expected {
        AdminCredentials::Bearer(token) => {
            scheme.eq_ignore_ascii_case("bearer") && same(value.as_bytes(), token.0.as_bytes())
        }
        AdminCredentials::Basic { username, password } => {
            if !scheme.eq_ignore_ascii_case("basic") {
                return false;
            }
            let Ok(decoded) = base64::engine::general_purpose::STANDARD.decode(value) else {
                return false;
            };
            let Some(colon) = decoded.iter().position(|&b| b == b':') else {
                return false;
            };
            let (user, pass) = (&decoded[..colon], &decoded[colon + 1..]);
            // Both compared, whichever differs: the time tells neither which nor where.
            let user_ok = digest(user).ct_eq(&digest(username.as_bytes()));
            let pass_ok = digest(pass).ct_eq(&digest(password.0.as_bytes()));
            bool::from(user_ok & pass_ok)
        }
    }
}

/// Compared as SHA-256 digests: equal lengths, so not even the secret's length shows in the time.
fn same(given: &[u8], expected: &[u8]) -> bool {
    bool::from(digest(given).ct_eq(&digest(expected)))
}

fn digest(bytes: &[u8]) -> [u8; 32] {
    let mut out = [0u8; 32];
    out.copy_from_slice(ring::digest::digest(&ring::digest::SHA256, bytes).as_ref());
    out
}

/// The `WWW-Authenticate` value of a 401 answer.
pub fn challenge(expected: &AdminCredentials) -> &'static str {
    match expected {
        AdminCredentials::Bearer(_) => "Bearer realm=\"edgegate\"",
        AdminCredentials::Basic { .. } => "Basic realm=\"edgegate\", charset=\"UTF-8\"",
    }
}

/// The `Authorization` value a client sends.
pub fn header(credentials: &AdminCredentials) -> String {
    match credentials {
        AdminCredentials::Bearer(token) => format!("Bearer {}", token.0),
        AdminCredentials::Basic { username, password } => {
            let pair = format!("{username}:{}", password.0);
            let encoded = base64::engine::general_purpose::STANDARD.encode(pair);
            format!("Basic {encoded}")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Secret;

    #[test]
    fn only_the_right_secret_in_the_right_scheme_passes() {
        let bearer = AdminCredentials::Bearer(Secret("s3cret".into()));
        assert!(allows(&bearer, Some("Bearer s3cret")));
        assert!(allows(&bearer, Some("bearer s3cret")));
        assert!(allows(&bearer, Some(&header(&bearer))));
        for wrong in [
            "Bearer s3cre",
            "Bearer s3cret2",
            "Basic s3cret",
            "s3cret",
            "",
        ] {
            assert!(!allows(&bearer, Some(wrong)), "{wrong:?}");
        }
        assert!(!allows(&bearer, None));
        let basic = AdminCredentials::Basic {
            username: "tech".into(),
            password: Secret("pa:ss".into()),
        };
        assert!(allows(&basic, Some(&header(&basic))));
        let wrong_user = AdminCredentials::Basic {
            username: "root".into(),
            password: Secret("pa:ss".into()),
        };
        assert!(!allows(&basic, Some(&header(&wrong_user))));
        assert!(!allows(&basic, Some("Basic !!!")));
        assert!(!allows(&basic, Some("Bearer pa:ss")));
    }
}
