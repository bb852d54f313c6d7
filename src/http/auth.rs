//! Who may do what: subscriber tokens (`SSE_JWT_SECRET`) and the publish key
//! (`SSE_PUBLISH_KEY`).

use std::time::Duration;

use axum::{
    extract::{Request, State},
    http::{HeaderMap, header},
    middleware::Next,
    response::Response,
};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;
use subtle::ConstantTimeEq;

use super::{AppState, Error, Result};
use crate::config::Secret;

/// How far a token's `exp` may be behind this server's clock and still count: clocks
/// of the service that mints tokens and of this one are never quite the same.
pub const CLOCK_LEEWAY: Duration = Duration::from_secs(30);

/// The claims a subscriber token carries.
#[derive(Debug, Deserialize)]
pub struct Claims {
    /// The user the stream belongs to.
    pub sub: String,
    /// The session, if the token pins one.
    pub sid: Option<String>,
}

/// Checks an HS256 token: signature, algorithm (nothing but HS256, so no `none`), `exp`
/// (required), `nbf` (when present) and `sub` (required).
pub fn verify_token(secret: &Secret, token: &str) -> Result<Claims> {
    let mut validation = Validation::new(Algorithm::HS256);
    validation.leeway = CLOCK_LEEWAY.as_secs();
    validation.validate_nbf = true;
    validation.set_required_spec_claims(&["exp", "sub"]);
    let key = DecodingKey::from_secret(secret.expose().as_bytes());
    jsonwebtoken::decode::<Claims>(token, &key, &validation)
        .map(|data| data.claims)
        .map_err(|error| {
            tracing::debug!(%error, "subscriber token refused");
            Error::Unauthorized("the subscriber token is invalid or expired")
        })
}

/// With `SSE_PUBLISH_KEY` set, publishing and monitoring need `Authorization: Bearer <key>`.
pub async fn require_publish_key(
    State(state): State<AppState>,
    request: Request,
    next: Next,
) -> Result<Response> {
    if let Some(key) = &state.config.publish_key {
        let given = bearer_token(request.headers()).unwrap_or_default();
        // Constant time, so the response time does not tell how much of a key matched.
        if !bool::from(given.as_bytes().ct_eq(key.expose().as_bytes())) {
            return Err(Error::Unauthorized(
                "a valid Authorization: Bearer <SSE_PUBLISH_KEY> is required",
            ));
        }
    }
    Ok(next.run(request).await)
}

pub fn bearer_token(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then_some(token.trim())
}

/// A cookie's value from the `Cookie` headers.
pub fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find_map(|(key, value)| (key == name).then_some(value))
}

#[cfg(test)]
mod tests {
    use jsonwebtoken::{EncodingKey, Header, encode};
    use serde_json::json;

    use super::*;
    use crate::event::now_millis;

    fn secret() -> Secret {
        Secret::new("s3cret")
    }

    fn token(alg: Algorithm, key: &str, claims: serde_json::Value) -> String {
        encode(
            &Header::new(alg),
            &claims,
            &EncodingKey::from_secret(key.as_bytes()),
        )
        .unwrap()
    }

    fn in_a_minute() -> i64 {
        now_millis() / 1000 + 60
    }

    #[test]
    fn a_valid_token_names_its_user_and_session() {
        let t = token(
            Algorithm::HS256,
            "s3cret",
            json!({ "sub": "u1", "sid": "s1", "exp": in_a_minute() }),
        );
        let claims = verify_token(&secret(), &t).unwrap();
        assert_eq!(
            (claims.sub.as_str(), claims.sid.as_deref()),
            ("u1", Some("s1"))
        );
    }

    #[test]
    fn bad_signatures_algorithms_expiry_and_garbage_are_refused() {
        let exp = in_a_minute();
        let refused = [
            token(
                Algorithm::HS256,
                "other",
                json!({ "sub": "u1", "exp": exp }),
            ),
            token(
                Algorithm::HS384,
                "s3cret",
                json!({ "sub": "u1", "exp": exp }),
            ),
            token(
                Algorithm::HS256,
                "s3cret",
                json!({ "sub": "u1", "exp": exp - 60 - 3600 }),
            ),
            token(Algorithm::HS256, "s3cret", json!({ "sub": "u1" })),
            // Not valid before an hour from now.
            token(
                Algorithm::HS256,
                "s3cret",
                json!({ "sub": "u1", "exp": exp + 7200, "nbf": exp + 3600 }),
            ),
            token(Algorithm::HS256, "s3cret", json!({ "exp": exp })),
            // alg "none", unsigned.
            "eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0.eyJzdWIiOiJ1MSIsImV4cCI6OTk5OTk5OTk5OX0.".into(),
            "garbage".into(),
            String::new(),
        ];
        for t in refused {
            assert!(verify_token(&secret(), &t).is_err(), "{t}");
        }
    }

    #[test]
    fn an_expiry_within_the_leeway_still_counts() {
        let just_past = now_millis() / 1000 - 5;
        let t = token(
            Algorithm::HS256,
            "s3cret",
            json!({ "sub": "u1", "exp": just_past }),
        );
        assert!(verify_token(&secret(), &t).is_ok());
        let t = token(
            Algorithm::HS256,
            "s3cret",
            json!({ "sub": "u1", "exp": in_a_minute(), "nbf": now_millis() / 1000 + 5 }),
        );
        assert!(verify_token(&secret(), &t).is_ok());
    }

    proptest::proptest! {
        #[test]
        fn no_forged_token_is_accepted(raw in "[A-Za-z0-9_.=-]{0,200}") {
            proptest::prop_assert!(verify_token(&secret(), &raw).is_err());
        }

        #[test]
        fn a_token_with_one_changed_character_is_refused(at in 0usize..1000, with in "[A-Za-z0-9_-]") {
            let t = token(Algorithm::HS256, "s3cret", json!({ "sub": "u1", "exp": in_a_minute() }));
            let at = at % t.len();
            let mut forged = t.clone();
            forged.replace_range(at..at + 1, &with);
            if forged != t {
                proptest::prop_assert!(verify_token(&secret(), &forged).is_err(), "{}", forged);
            }
        }
    }
}
