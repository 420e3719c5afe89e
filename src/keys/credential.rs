//! Reading the presented key from a request's headers.
//!
//! Sources: `Authorization: Bearer <key>`, `X-API-Key: <key>`, and HTTP Basic with the key as the
//! password (or as the user name with an empty password). A Bearer value that is not a key
//! (does not start with `pcs_`) is an OAuth access token. Two different keys in one request are refused outright rather than picking one, so
//! a client can never get the more powerful of two keys by accident or by trick.

use std::borrow::Cow;

use base64::Engine;
use http::header::{HeaderMap, HeaderName, AUTHORIZATION};

/// The `X-API-Key` header.
pub static X_API_KEY: HeaderName = HeaderName::from_static("x-api-key");

/// Why the credential headers could not be read as one key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum CredentialError {
    /// More than one different key.
    #[error("two different credentials in one request")]
    Ambiguous,
    /// A credential header that is not valid text or valid Basic.
    #[error("malformed credential")]
    Malformed,
}

/// The presented credential, if any.
pub fn extract(headers: &HeaderMap) -> Result<Option<Cow<'_, str>>, CredentialError> {
    Ok(presented(headers)?.map(|p| p.value))
}

/// A credential and how it came: only a `Bearer` value can be an OAuth access token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Presented<'h> {
    /// The key or token.
    pub value: Cow<'h, str>,
    /// Every header that carried it was `Authorization: Bearer`.
    pub bearer: bool,
}

/// The presented credential and whether it came as a Bearer value.
pub fn presented(headers: &HeaderMap) -> Result<Option<Presented<'_>>, CredentialError> {
    let mut found: Option<Cow<'_, str>> = None;
    let mut bearer = true;
    for value in headers.get_all(AUTHORIZATION) {
        let text = value.to_str().map_err(|_| CredentialError::Malformed)?;
        if let Some(token) = strip_scheme(text, "bearer") {
            offer(&mut found, Cow::Borrowed(token))?;
        } else if let Some(encoded) = strip_scheme(text, "basic") {
            offer(&mut found, Cow::Owned(basic_key(encoded)?))?;
            bearer = false;
        }
    }
    for value in headers.get_all(&X_API_KEY) {
        let text = value.to_str().map_err(|_| CredentialError::Malformed)?;
        offer(&mut found, Cow::Borrowed(text.trim()))?;
        bearer = false;
    }
    Ok(found.map(|value| Presented { value, bearer }))
}

/// Whether a header carries a credential that `extract` reads (and forwarding must remove).
pub fn is_credential_authorization(value: &http::HeaderValue) -> bool {
    value.to_str().is_ok_and(|text| {
        strip_scheme(text, "bearer").is_some() || strip_scheme(text, "basic").is_some()
    })
}

fn offer<'a>(found: &mut Option<Cow<'a, str>>, key: Cow<'a, str>) -> Result<(), CredentialError> {
    if key.is_empty() {
        return Err(CredentialError::Malformed);
    }
    match found {
        Some(existing) if *existing != key => Err(CredentialError::Ambiguous),
        Some(_) => Ok(()),
        None => {
            *found = Some(key);
            Ok(())
        }
    }
}

fn strip_scheme<'a>(text: &'a str, scheme: &str) -> Option<&'a str> {
    let text = text.trim();
    let (given, rest) = text.split_once([' ', '\t'])?;
    given.eq_ignore_ascii_case(scheme).then(|| rest.trim())
}

/// The key in HTTP Basic: the password, or, when the password is empty, the user name
/// (`curl -u KEY:`, as several well-known APIs take their keys).
fn basic_key(encoded: &str) -> Result<String, CredentialError> {
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(encoded)
        .map_err(|_| CredentialError::Malformed)?;
    let text = String::from_utf8(bytes).map_err(|_| CredentialError::Malformed)?;
    let (user, password) = text.split_once(':').ok_or(CredentialError::Malformed)?;
    Ok(if password.is_empty() { user } else { password }.to_string())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use http::HeaderValue;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (k, v) in pairs {
            map.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        map
    }

    #[test]
    fn reads_each_source() {
        let h = headers(&[("authorization", "Bearer pcs_abc")]);
        assert_eq!(extract(&h).unwrap().as_deref(), Some("pcs_abc"));
        let h = headers(&[("authorization", "bearer   pcs_abc ")]);
        assert_eq!(extract(&h).unwrap().as_deref(), Some("pcs_abc"));
        let h = headers(&[("x-api-key", "pcs_abc")]);
        assert_eq!(extract(&h).unwrap().as_deref(), Some("pcs_abc"));
        let basic = base64::engine::general_purpose::STANDARD.encode("anyone:pcs_abc");
        let h = headers(&[("authorization", &format!("Basic {basic}"))]);
        assert_eq!(extract(&h).unwrap().as_deref(), Some("pcs_abc"));
        let user_only = base64::engine::general_purpose::STANDARD.encode("pcs_abc:");
        let h = headers(&[("authorization", &format!("Basic {user_only}"))]);
        assert_eq!(
            extract(&h).unwrap().as_deref(),
            Some("pcs_abc"),
            "curl -u KEY:"
        );
        let h = headers(&[("authorization", "Bearer tok")]);
        assert!(presented(&h).unwrap().unwrap().bearer);
        let h = headers(&[("authorization", "Bearer tok"), ("x-api-key", "tok")]);
        assert!(!presented(&h).unwrap().unwrap().bearer);
        let h = headers(&[("authorization", "Digest x=y")]);
        assert_eq!(extract(&h).unwrap(), None);
        assert_eq!(extract(&HeaderMap::new()).unwrap(), None);
    }

    #[test]
    fn two_different_keys_are_refused_the_same_key_twice_is_fine() {
        let h = headers(&[("authorization", "Bearer a"), ("x-api-key", "b")]);
        assert_eq!(extract(&h), Err(CredentialError::Ambiguous));
        let h = headers(&[("x-api-key", "a"), ("x-api-key", "b")]);
        assert_eq!(extract(&h), Err(CredentialError::Ambiguous));
        let h = headers(&[("authorization", "Bearer a"), ("x-api-key", "a")]);
        assert_eq!(extract(&h).unwrap().as_deref(), Some("a"));
    }

    #[test]
    fn malformed_credentials_are_errors() {
        let h = headers(&[("authorization", "Basic !!!")]);
        assert_eq!(extract(&h), Err(CredentialError::Malformed));
        let nocolon = base64::engine::general_purpose::STANDARD.encode("nocolon");
        let h = headers(&[("authorization", &format!("Basic {nocolon}"))]);
        assert_eq!(extract(&h), Err(CredentialError::Malformed));
        let h = headers(&[("x-api-key", "")]);
        assert_eq!(extract(&h), Err(CredentialError::Malformed));
    }
}
