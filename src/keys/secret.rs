//! Key strings: generation, hashing and the display prefix.
//!
//! A key is `pcs_` + an 8-character id + 32 random characters (base62, ~190 bits). The id inside
//! the key makes the display prefix (`pcs_` + the id's first 6 characters) recognisable.

use rand::distributions::Alphanumeric;
use rand::Rng;
use sha2::{Digest, Sha256};

/// The fixed start of every key this tool makes.
pub const KEY_PREFIX: &str = "pcs_";
/// How many characters of the key are kept for display.
pub const DISPLAY_PREFIX_LEN: usize = 10;

/// A freshly made key: the secret (shown once) and what the keys file keeps.
pub struct NewKey {
    /// The plaintext key; print it once, store it nowhere.
    pub secret: String,
    /// The public id.
    pub id: String,
    /// The first 10 characters.
    pub prefix: String,
    /// `sha256:<hex>`.
    pub hash: String,
}

/// What a store keeps of a new key: everything but the secret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyMaterial {
    /// The public id.
    pub id: String,
    /// The first 10 characters.
    pub prefix: String,
    /// `sha256:<hex>`.
    pub hash: String,
}

impl NewKey {
    /// The parts a store keeps (never the secret).
    pub fn material(&self) -> KeyMaterial {
        KeyMaterial {
            id: self.id.clone(),
            prefix: self.prefix.clone(),
            hash: self.hash.clone(),
        }
    }
}

/// Makes a new random key with the OS's random source.
pub fn generate() -> NewKey {
    let mut rng = rand::rngs::OsRng;
    let id: String = (&mut rng)
        .sample_iter(&Alphanumeric)
        .take(8)
        .map(char::from)
        .collect();
    let secret_part: String = (&mut rng)
        .sample_iter(&Alphanumeric)
        .take(32)
        .map(char::from)
        .collect();
    let secret = format!("{KEY_PREFIX}{id}{secret_part}");
    NewKey {
        prefix: secret[..DISPLAY_PREFIX_LEN].to_string(),
        hash: hash_text(&secret),
        id,
        secret,
    }
}

/// SHA-256 of a key.
#[inline]
pub fn digest(key: &str) -> [u8; 32] {
    Sha256::digest(key.as_bytes()).into()
}

/// `sha256:<hex>` as stored in the keys file.
pub fn hash_text(key: &str) -> String {
    format!("sha256:{}", hex::encode(digest(key)))
}

/// Parses `sha256:<64 hex>`.
pub fn parse_hash(text: &str) -> Option<[u8; 32]> {
    let hex_part = text.strip_prefix("sha256:")?;
    if hex_part.len() != 64 {
        return None;
    }
    let bytes = hex_part.as_bytes();
    let mut out = [0u8; 32];
    for (i, pair) in bytes.chunks_exact(2).enumerate() {
        out[i] = (nibble(pair[0])? << 4) | nibble(pair[1])?;
    }
    Some(out)
}

/// One hex digit by table lookup: a million keys are decoded at every load.
#[inline]
fn nibble(c: u8) -> Option<u8> {
    let v = HEX_VALUES[usize::from(c)];
    (v != 0xff).then_some(v)
}

const HEX_VALUES: [u8; 256] = {
    let mut table = [0xffu8; 256];
    let mut i = 0;
    while i < 10 {
        table[b'0' as usize + i] = i as u8;
        i += 1;
    }
    let mut i = 0;
    while i < 6 {
        table[b'a' as usize + i] = 10 + i as u8;
        table[b'A' as usize + i] = 10 + i as u8;
        i += 1;
    }
    table
};

/// Whether `text` looks like a whole key rather than an id, so it must never be echoed.
pub fn looks_like_key(text: &str) -> bool {
    text.starts_with(KEY_PREFIX) && text.len() > 4 + 8
}

/// An id argument as messages may show it: quoted, or a placeholder when it is a whole key.
pub fn shown_id(text: &str) -> String {
    if looks_like_key(text) {
        format!(
            "{}*** (that is a whole key, not its id: the id is the 8 characters after \"{KEY_PREFIX}\")",
            &text[..DISPLAY_PREFIX_LEN.min(text.len())]
        )
    } else {
        let short: String = text.chars().take(64).collect();
        format!("{short:?}")
    }
}

/// `path` with every segment that looks like a whole key cut to its display prefix, for the
/// audit trail and logs: a client that pastes its key into a URL must not leave it there.
pub fn mask_in_path(path: &str) -> std::borrow::Cow<'_, str> {
    if !path.contains(KEY_PREFIX) {
        return std::borrow::Cow::Borrowed(path);
    }
    let masked: Vec<String> = path
        .split('/')
        .map(|segment| match segment.find(KEY_PREFIX) {
            Some(at) if looks_like_key(&segment[at..]) => {
                let end = (at + DISPLAY_PREFIX_LEN).min(segment.len());
                format!("{}***", &segment[..end])
            }
            _ => segment.to_string(),
        })
        .collect();
    std::borrow::Cow::Owned(masked.join("/"))
}

/// The prefix as shown to people: `pcs_k7Hq2m***`.
pub fn masked(prefix: &str) -> String {
    format!("{prefix}***")
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn generated_keys_have_the_documented_shape() {
        let a = generate();
        let b = generate();
        assert_ne!(a.secret, b.secret);
        assert_eq!(a.secret.len(), 44);
        assert!(a.secret.starts_with("pcs_"));
        assert_eq!(&a.secret[4..12], a.id);
        assert_eq!(a.prefix, &a.secret[..10]);
        assert_eq!(parse_hash(&a.hash), Some(digest(&a.secret)));
    }

    #[test]
    fn a_whole_key_is_never_shown_back() {
        let key = generate();
        let shown = shown_id(&key.secret);
        assert!(
            !shown.contains(&key.secret[DISPLAY_PREFIX_LEN..]),
            "{shown}"
        );
        assert!(shown.starts_with(&key.prefix));
        assert_eq!(shown_id(&key.id), format!("{:?}", key.id));
        let path = format!("/_portcullis/v1/keys/{}/rotate", key.secret);
        let masked = mask_in_path(&path);
        assert_eq!(
            masked,
            format!("/_portcullis/v1/keys/{}***/rotate", key.prefix)
        );
        assert_eq!(mask_in_path("/v1/datasets/ds_1"), "/v1/datasets/ds_1");
    }

    #[test]
    fn hash_parsing_is_strict() {
        assert!(parse_hash("sha256:abc").is_none());
        assert!(parse_hash(&format!("md5:{}", "0".repeat(64))).is_none());
        assert!(parse_hash(&format!("sha256:{}", "g".repeat(64))).is_none());
        assert!(parse_hash(&format!("sha256:{}", "A".repeat(64))).is_some());
    }
}
