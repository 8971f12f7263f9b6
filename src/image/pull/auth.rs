//! Registry credentials as the CRI AuthConfig carries them, and the OAuth2
//! refresh-token exchange that the registry client does not do.

use oci_client::secrets::RegistryAuth;
use serde::Deserialize;

/// Credentials as the CRI AuthConfig carries them.
#[derive(Debug, Clone, Default)]
pub struct Credentials {
    pub username: String,
    pub password: String,
    pub auth: String,
    pub identity_token: String,
    pub registry_token: String,
}

/// How a pull authenticates.
pub(super) enum Auth {
    Registry(RegistryAuth),
    /// An OAuth2 refresh token, exchanged per registry for an access token.
    Identity(String),
}

pub(super) fn registry_auth(c: &Credentials) -> Result<Auth, String> {
    if !c.registry_token.is_empty() {
        return Ok(Auth::Registry(RegistryAuth::Bearer(
            c.registry_token.clone(),
        )));
    }
    if !c.identity_token.is_empty() {
        return Ok(Auth::Identity(c.identity_token.clone()));
    }
    if !c.username.is_empty() {
        return Ok(Auth::Registry(RegistryAuth::Basic(
            c.username.clone(),
            c.password.clone(),
        )));
    }
    if !c.auth.is_empty() {
        use base64::Engine;
        let raw = base64::engine::general_purpose::STANDARD
            .decode(c.auth.trim())
            .map_err(|e| format!("auth is not base64: {e}"))?;
        let s = String::from_utf8(raw).map_err(|_| "auth is not UTF-8".to_string())?;
        let (u, p) = s
            .split_once(':')
            .ok_or_else(|| "auth is not base64 of user:password".to_string())?;
        return Ok(Auth::Registry(RegistryAuth::Basic(
            u.to_string(),
            p.to_string(),
        )));
    }
    Ok(Auth::Registry(RegistryAuth::Anonymous))
}

/// `Bearer realm="...",service="..."` -> (realm, service).
pub(super) fn parse_bearer_challenge(h: &str) -> Option<(String, Option<String>)> {
    let rest = h
        .trim()
        .strip_prefix("Bearer ")
        .or_else(|| h.trim().strip_prefix("bearer "))?;
    let mut realm = None;
    let mut service = None;
    // Values are quoted and may contain commas (scopes), so split on `",`.
    for part in rest.split("\",") {
        let (k, v) = part.split_once('=')?;
        let v = v.trim().trim_matches('"').to_string();
        match k.trim().trim_start_matches(',').trim() {
            "realm" => realm = Some(v),
            "service" => service = Some(v),
            _ => {}
        }
    }
    Some((realm?, service))
}

/// Why an identity token could not be exchanged.
pub(super) enum ExchangeError {
    /// The registry or its token realm could not be reached.
    Unreachable(String),
    /// The registry has no token realm, or the realm refused the token.
    Refused(String),
}

/// Trades an identity token (an OAuth2 refresh token) for an access token at
/// the token realm `base` (`scheme://host`) advertises, as docker and
/// containerd do. oci-client only speaks the GET form of the token protocol.
pub(super) async fn exchange_identity_token(
    http: &reqwest::Client,
    base: &str,
    repository: &str,
    refresh_token: &str,
) -> Result<String, ExchangeError> {
    use ExchangeError::{Refused, Unreachable};
    let ping = http
        .get(format!("{base}/v2/"))
        .send()
        .await
        .map_err(|e| Unreachable(format!("{base}: {e}")))?;
    let (realm, service) = ping
        .headers()
        .get(reqwest::header::WWW_AUTHENTICATE)
        .and_then(|v| v.to_str().ok())
        .and_then(parse_bearer_challenge)
        .ok_or_else(|| {
            Refused(format!(
                "{base} does not offer token authentication, so an identity token cannot be used"
            ))
        })?;
    let scope = format!("repository:{repository}:pull");
    let mut form = vec![
        ("grant_type", "refresh_token"),
        ("refresh_token", refresh_token),
        ("client_id", "berth"),
        ("scope", scope.as_str()),
    ];
    if let Some(s) = &service {
        form.push(("service", s.as_str()));
    }
    let resp = http
        .post(&realm)
        .form(&form)
        .send()
        .await
        .map_err(|e| Unreachable(format!("token realm {realm}: {e}")))?;
    if !resp.status().is_success() {
        return Err(Refused(format!(
            "token realm {realm} refused the identity token: HTTP {}",
            resp.status()
        )));
    }
    #[derive(Deserialize)]
    struct TokenResponse {
        #[serde(default)]
        access_token: String,
        #[serde(default)]
        token: String,
    }
    let body: TokenResponse = resp
        .json()
        .await
        .map_err(|e| Refused(format!("token realm {realm}: bad answer: {e}")))?;
    let token = if body.access_token.is_empty() {
        body.token
    } else {
        body.access_token
    };
    if token.is_empty() {
        return Err(Refused(format!(
            "token realm {realm} returned no access token"
        )));
    }
    Ok(token)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auth_forms() {
        use base64::Engine;
        let enc = base64::engine::general_purpose::STANDARD.encode("u:p:w");
        let a = registry_auth(&Credentials {
            auth: enc,
            ..Default::default()
        })
        .unwrap();
        assert!(matches!(a, Auth::Registry(RegistryAuth::Basic(u, p)) if u == "u" && p == "p:w"));
        assert!(registry_auth(&Credentials {
            auth: "!!".into(),
            ..Default::default()
        })
        .is_err());
        assert!(matches!(
            registry_auth(&Credentials::default()).unwrap(),
            Auth::Registry(RegistryAuth::Anonymous)
        ));
        assert!(matches!(
            registry_auth(&Credentials {
                registry_token: "t".into(),
                ..Default::default()
            })
            .unwrap(),
            Auth::Registry(RegistryAuth::Bearer(t)) if t == "t"
        ));
        assert!(matches!(
            registry_auth(&Credentials {
                identity_token: "r".into(),
                username: "u".into(),
                ..Default::default()
            })
            .unwrap(),
            Auth::Identity(t) if t == "r"
        ));
    }

    #[test]
    fn bearer_challenges() {
        assert_eq!(
            parse_bearer_challenge(
                r#"Bearer realm="https://auth.example/token",service="reg",scope="repository:a:pull,push""#
            ),
            Some(("https://auth.example/token".into(), Some("reg".into())))
        );
        assert_eq!(
            parse_bearer_challenge(r#"Bearer realm="http://x/t""#),
            Some(("http://x/t".into(), None))
        );
        assert_eq!(parse_bearer_challenge(r#"Basic realm="x""#), None);
    }
}
