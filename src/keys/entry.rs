//! A key's record as files and stores hold it, and the rules every stored string obeys.
//!
//! Text a caller sends (a purpose, a scope's instance, a principal name) ends up in a YAML file
//! or a database row that every replica reads back. So every field is checked here once, for
//! every writer (key API, CLI, import): printable, no control or bidirectional-override
//! characters, bounded length. A writer can then never produce a file its reader refuses.

use serde::{Deserialize, Serialize};

/// Longest `purpose`, in characters.
pub const MAX_PURPOSE_CHARS: usize = 256;
/// Most scopes on one key.
pub const MAX_SCOPES: usize = 32;
/// Longest scope, in characters.
pub const MAX_SCOPE_CHARS: usize = 256;
/// Longest principal name or key id, in bytes.
pub const MAX_NAME_BYTES: usize = 128;

/// The whole keys file.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeysFile {
    /// Format version; only `1` exists.
    pub version: u32,
    /// Every key, in file order.
    #[serde(default)]
    pub keys: Vec<KeyEntry>,
}

/// One key's record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyEntry {
    /// Public identifier, unique.
    pub id: String,
    /// The key's first 10 characters, for display.
    pub prefix: String,
    /// `sha256:<64 hex>` of the whole key.
    pub hash: String,
    /// Owner.
    pub principal: String,
    /// Optional narrowing grants.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scopes: Option<Vec<String>>,
    /// What the key is for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub purpose: Option<String>,
    /// Inactive keys answer 401.
    #[serde(default = "default_active")]
    pub active: bool,
    /// RFC 3339.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created: Option<String>,
    /// RFC 3339; past it the key answers 401.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires: Option<String>,
}

impl KeyEntry {
    /// The entry for a freshly made key.
    pub fn for_new_key(
        new: &super::secret::KeyMaterial,
        principal: &str,
        scopes: Option<Vec<String>>,
        purpose: Option<String>,
        created: String,
        expires: Option<String>,
    ) -> KeyEntry {
        KeyEntry {
            id: new.id.clone(),
            prefix: new.prefix.clone(),
            hash: new.hash.clone(),
            principal: principal.to_string(),
            scopes,
            purpose,
            active: true,
            created: Some(created),
            expires,
        }
    }

    /// Rotation: this entry's successor for `new` (same owner, scopes, purpose and expiry),
    /// while this entry now expires at `old_expiry`, or earlier if it already would: an overlap
    /// never revives or extends the old key.
    pub fn rotate_to(
        &mut self,
        new: &super::secret::KeyMaterial,
        created: String,
        old_expiry: String,
    ) -> KeyEntry {
        let successor = KeyEntry::for_new_key(
            new,
            &self.principal,
            self.scopes.clone(),
            self.purpose.clone(),
            created,
            self.expires.clone(),
        );
        let keeps_earlier = self.expires.as_deref().is_some_and(|current| {
            match (super::parse_time(current), super::parse_time(&old_expiry)) {
                (Ok(current), Ok(proposed)) => current < proposed,
                _ => false,
            }
        });
        if !keeps_earlier {
            self.expires = Some(old_expiry);
        }
        successor
    }
}

fn default_active() -> bool {
    true
}

/// One change to a set of keys, as a store's change feed delivers it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// The entry was added, or replaced the entry with its id.
    Upsert(KeyEntry),
    /// The key with this id was removed (revoked).
    Remove(String),
}

/// Why a field cannot be stored.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {problem}")]
pub struct BadField {
    /// The field at fault.
    pub field: &'static str,
    /// What is wrong, in plain words.
    pub problem: String,
}

/// Characters refused in stored text: controls (C0, DEL, C1), which YAML forbids or turns into
/// line breaks, the byte-order mark, noncharacters, and bidirectional overrides, which make a
/// listing show something other than what is stored.
pub fn forbidden_char(c: char) -> bool {
    c.is_control()
        || matches!(c, '\u{FEFF}' | '\u{FFFE}' | '\u{FFFF}')
        || matches!(c, '\u{202A}'..='\u{202E}' | '\u{2066}'..='\u{2069}' | '\u{200E}' | '\u{200F}')
        || matches!(c, '\u{2028}' | '\u{2029}')
}

/// Checks free text: printable and at most `max` characters.
pub fn check_text(field: &'static str, text: &str, max: usize) -> Result<(), BadField> {
    let bad = |problem: String| Err(BadField { field, problem });
    if let Some(c) = text.chars().find(|c| forbidden_char(*c)) {
        return bad(format!(
            "U+{:04X} is not allowed (control, byte-order or direction character)",
            u32::from(c)
        ));
    }
    let n = text.chars().count();
    if n > max {
        return bad(format!("{n} characters, at most {max} are allowed"));
    }
    Ok(())
}

/// Checks a name that travels in a header: 1 to 128 visible ASCII characters.
pub fn check_name(field: &'static str, name: &str) -> Result<(), BadField> {
    if name.is_empty() || name.len() > MAX_NAME_BYTES || !name.bytes().all(|b| b.is_ascii_graphic())
    {
        return Err(BadField {
            field,
            problem: format!("must be 1 to {MAX_NAME_BYTES} visible ASCII characters"),
        });
    }
    Ok(())
}

/// Checks a scope list: at most 32, each printable and at most 256 characters.
pub fn check_scopes(scopes: &[String]) -> Result<(), BadField> {
    if scopes.len() > MAX_SCOPES {
        return Err(BadField {
            field: "scopes",
            problem: format!("{} scopes, at most {MAX_SCOPES} are allowed", scopes.len()),
        });
    }
    scopes
        .iter()
        .try_for_each(|s| check_text("scopes", s, MAX_SCOPE_CHARS))
}

impl KeyEntry {
    /// Checks every field a writer stores.
    pub fn check(&self) -> Result<(), BadField> {
        check_name("id", &self.id)?;
        check_name("principal", &self.principal)?;
        check_name("prefix", &self.prefix)?;
        check_name("hash", &self.hash)?;
        if let Some(p) = &self.purpose {
            check_text("purpose", p, MAX_PURPOSE_CHARS)?;
        }
        if let Some(s) = &self.scopes {
            check_scopes(s)?;
        }
        for (field, t) in [("created", &self.created), ("expires", &self.expires)] {
            if let Some(t) = t {
                check_text(field, t, 64)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn hostile_text_is_refused_plain_text_is_kept() {
        for bad in [
            "a\u{7f}b",
            "a\u{85}b",
            "a\u{9f}",
            "a\nb",
            "\u{202e}gnp.exe",
            "\u{feff}x",
            "a\u{2028}b",
            "tab\t",
        ] {
            assert!(check_text("purpose", bad, 256).is_err(), "{bad:?}");
        }
        for good in [
            "analytics dashboard",
            "Café – 数据 📊",
            "a \"quoted\" \\ thing",
        ] {
            assert!(check_text("purpose", good, 256).is_ok(), "{good:?}");
        }
        assert!(check_text("purpose", &"x".repeat(257), 256).is_err());
        assert!(check_text("purpose", &"é".repeat(256), 256).is_ok());
        assert!(check_name("principal", "etl-bot").is_ok());
        assert!(check_name("principal", "").is_err());
        assert!(check_name("principal", "a b").is_err());
        assert!(check_scopes(&vec!["datasets:read".to_string(); 33]).is_err());
        assert!(check_scopes(&["datasets/a\u{7f}:read".to_string()]).is_err());
    }
}
