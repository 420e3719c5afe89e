//! Reading the presented key from a request's headers.
//!
//! Sources: `Authorization: Bearer <key>`, `X-API-Key: <key>`, and HTTP Basic with the key as the
//! password. Two different keys in one request are refused outright rather than picking one, so
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

/// The presented key, if any.
pub fn extract(headers: &HeaderMap) -> Result<Option<Cow<'_, str>>, CredentialError> {
    let mut found: Option<Cow<'_, str>> = None;
    for value in headers.get_all(AUTHORIZATION) {
        let text = value.to_str().map_err(|_| CredentialError::Malformed)?;
        if let Some(token) = strip_scheme(text, "bearer") {
            offer(&mut found, Cow::Borrowed(token))?;
        } else if let Some(encoded) = strip_scheme(text, "basic") {
            offer(&mut found, Cow::Owned(basic_password(encoded)?))?;
        }
    }
    for value in headers.get_all(&X_API_KEY) {
        let text = value.to_str().map_err(|_| CredentialError::Malformed)?;
        offer(&mut found, Cow::Borrowed(text.trim()))?;
    }
    Ok(found)
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

fn basic_password(encoded: &str) -> Result<String, CredentialError> {
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(encoded)
        .map_err(|_| CredentialError::Malformed)?;
    let text = String::from_utf8(bytes).map_err(|_| CredentialError::Malformed)?;
    let (_, password) = text.split_once(':').ok_or(CredentialError::Malformed)?;
    Ok(password.to_string())
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
