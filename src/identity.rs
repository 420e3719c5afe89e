//! Who is calling: a key from the key store, or the principal of a validated OAuth access token.
//! Decisions, identity headers and the audit trail see the caller through this one type, so a
//! token is judged exactly as a key with the same principal and scopes would be.

use std::sync::Arc;

use crate::keys::Key;
use crate::policy::grant::Grant;
use crate::policy::Principal;

/// A validated token's caller: its principal (from the policy) and its effective grants (the
/// principal's, narrowed by the token's grant-shaped scopes).
#[derive(Debug)]
pub struct TokenCaller {
    /// The policy principal the token names.
    pub principal: Arc<Principal>,
    /// What the token may do.
    pub grants: Arc<[Grant]>,
    /// Whether grant-shaped scopes narrowed it.
    pub scoped: bool,
    /// The token's issuer (`iss`).
    pub issuer: Arc<str>,
    /// The client the token was issued to (`azp` or `client_id`), if it says.
    pub client_id: Option<Arc<str>>,
}

/// A caller, borrowed for one decision.
#[derive(Debug, Clone, Copy)]
pub enum Caller<'s> {
    /// A key from the key store.
    Key(Key<'s>),
    /// An OAuth access token.
    Token(&'s TokenCaller),
}

impl<'s> Caller<'s> {
    /// The principal acting.
    pub fn principal(&self) -> &'s Arc<Principal> {
        match self {
            Caller::Key(k) => k.principal(),
            Caller::Token(t) => &t.principal,
        }
    }

    /// Everything the caller may do.
    pub fn grants(&self) -> &'s [Grant] {
        match self {
            Caller::Key(k) => k.grants(),
            Caller::Token(t) => &t.grants,
        }
    }

    /// The key, when the caller presented one.
    pub fn key(&self) -> Option<Key<'s>> {
        match self {
            Caller::Key(k) => Some(*k),
            Caller::Token(_) => None,
        }
    }

    /// `key` or `oauth`, as the backend header and the audit trail name it.
    pub fn credential(&self) -> &'static str {
        match self {
            Caller::Key(_) => "key",
            Caller::Token(_) => "oauth",
        }
    }
}
