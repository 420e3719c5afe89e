//! The self-service key API, served on the main listener under a reserved prefix and never
//! forwarded. Callers authenticate with their own key; `authz` decides what they may do; every
//! change is one [`Edit`] applied by the store (file or PostgreSQL), after which the live state
//! catches up with the store, so a new key works on the very next request.

pub mod authz;

use std::sync::Arc;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;

use crate::cli::format_time;
use crate::keys::entry::{self, KeyEntry};
use crate::keys::{secret, Key};
use crate::policy::grant::Access;
use crate::proxy::ProxyBody;
use crate::reload::Loader;
use crate::state::Snapshot;
use crate::store::{Edit, Listed, StoreError};
use authz::Refused;

/// Largest request body accepted.
const MAX_BODY: usize = 64 * 1024;

/// One audited key-management action.
#[derive(Debug, Clone)]
pub struct KeyAction {
    /// `key_create`, `key_rotate`, `key_activate`, `key_deactivate`, `key_revoke`.
    pub action: &'static str,
    /// Acting key id.
    pub key_id: String,
    /// Acting principal.
    pub principal: String,
    /// Key acted on (the new key for create).
    pub target_key_id: String,
    /// Principal whose key it is.
    pub target_principal: String,
    /// `ok` or the reason for refusal.
    pub result: String,
}

/// The key API.
pub struct KeyApi {
    prefix: String,
    loader: Arc<Loader>,
    on_action: Box<dyn Fn(KeyAction) + Send + Sync>,
    max_keys_per_principal: usize,
}

/// An answer, and whether it was a refusal for lack of permission.
pub struct Handled {
    /// The HTTP answer.
    pub response: Response<ProxyBody>,
    /// Whether the request was refused for lack of permission.
    pub forbidden: bool,
}

enum ApiError {
    Problem(StatusCode, &'static str, String),
    Refused(Refused),
}

impl From<Refused> for ApiError {
    fn from(r: Refused) -> Self {
        ApiError::Refused(r)
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::NotFound(_) => not_found(),
            StoreError::Quota { .. } => {
                ApiError::Problem(StatusCode::CONFLICT, "Conflict", e.to_string())
            }
            StoreError::Invalid(detail) => bad_request(detail),
            StoreError::Unavailable(cause) => {
                tracing::warn!(error = %cause, "key API: key store unavailable");
                ApiError::Problem(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "Service unavailable",
                    "The key store cannot be reached; nothing was changed. Try again shortly."
                        .into(),
                )
            }
            StoreError::Failed(cause) => internal(cause),
        }
    }
}

fn bad_request(detail: impl Into<String>) -> ApiError {
    ApiError::Problem(StatusCode::BAD_REQUEST, "Bad request", detail.into())
}

fn not_found() -> ApiError {
    ApiError::Problem(StatusCode::NOT_FOUND, "Not found", "No such key.".into())
}

fn not_yet_loaded() -> ApiError {
    ApiError::Problem(
        StatusCode::CONFLICT,
        "Conflict",
        "This key is not loaded yet; try again in a moment.".into(),
    )
}

/// A failure the caller cannot fix: the cause goes to the log, the caller learns that nothing
/// was changed (true: every store edit is all or nothing).
fn internal(cause: impl std::fmt::Display) -> ApiError {
    tracing::error!(error = %cause, "key API: the key store could not be changed");
    ApiError::Problem(
        StatusCode::INTERNAL_SERVER_ERROR,
        "Internal error",
        "The key store could not be changed; nothing was changed.".into(),
    )
}

type Answer = Result<(StatusCode, serde_json::Value), ApiError>;

impl KeyApi {
    /// A key API under `prefix`; changes go to the loader's store.
    pub fn new(
        prefix: String,
        loader: Arc<Loader>,
        on_action: Box<dyn Fn(KeyAction) + Send + Sync>,
        max_keys_per_principal: usize,
    ) -> Self {
        KeyApi {
            prefix: prefix.trim_end_matches('/').to_string(),
            loader,
            on_action,
            max_keys_per_principal,
        }
    }

    /// Whether a normalised path belongs to the API (segment-aware: `/keysx` does not).
    pub fn owns(&self, path: &str) -> bool {
        path == self.prefix
            || path
                .strip_prefix(&self.prefix)
                .is_some_and(|rest| rest.starts_with('/'))
    }

    /// Answers one authenticated request.
    pub async fn handle(
        self: Arc<Self>,
        request: Request<Incoming>,
        path: &str,
        snapshot: Arc<Snapshot>,
        caller: u32,
        request_id: &str,
    ) -> Handled {
        let rest = path[self.prefix.len()..].trim_matches('/').to_string();
        let method = request.method().clone();
        let query = request.uri().query().unwrap_or("").to_string();
        let body = match Limited::new(request.into_body(), MAX_BODY).collect().await {
            Ok(b) => b.to_bytes(),
            Err(e) => {
                let (status, title, detail) = if e
                    .downcast_ref::<http_body_util::LengthLimitError>()
                    .is_some()
                {
                    (
                        StatusCode::PAYLOAD_TOO_LARGE,
                        "Payload too large",
                        "The request body is larger than 64 KiB.",
                    )
                } else {
                    (
                        StatusCode::BAD_REQUEST,
                        "Bad request",
                        "The request body could not be read.",
                    )
                };
                return Handled {
                    response: problem(status, title, detail, request_id),
                    forbidden: false,
                };
            }
        };
        let result = match snapshot.keys.get(caller) {
            Some(caller) => {
                self.route(&method, &rest, &query, &body, &snapshot, caller)
                    .await
            }
            None => Err(not_found()),
        };
        match result {
            Ok((status, json)) => Handled {
                response: json_response(status, json),
                forbidden: false,
            },
            Err(ApiError::Refused(r)) => Handled {
                response: problem(
                    StatusCode::FORBIDDEN,
                    "Forbidden",
                    &r.to_string(),
                    request_id,
                ),
                forbidden: true,
            },
            Err(ApiError::Problem(status, title, detail)) => Handled {
                response: problem(status, title, &detail, request_id),
                forbidden: false,
            },
        }
    }

    async fn route(
        &self,
        method: &Method,
        rest: &str,
        query: &str,
        body: &[u8],
        snapshot: &Snapshot,
        caller: Key<'_>,
    ) -> Answer {
        let parts: Vec<&str> = if rest.is_empty() {
            Vec::new()
        } else {
            rest.split('/').collect()
        };
        match (method, parts.as_slice()) {
            (&Method::POST, []) => self.create(body, snapshot, caller).await,
            (&Method::GET, []) => self.list(query, snapshot, caller).await,
            (&Method::GET, [id]) => self.get(id, snapshot, caller).await,
            (&Method::POST, [id, "activate"]) => self.set_active(id, true, snapshot, caller).await,
            (&Method::POST, [id, "deactivate"]) => {
                self.set_active(id, false, snapshot, caller).await
            }
            (&Method::POST, [id, "rotate"]) => self.rotate(id, body, snapshot, caller).await,
            (&Method::DELETE, [id]) => self.revoke(id, snapshot, caller).await,
            _ => Err(ApiError::Problem(
                StatusCode::NOT_FOUND,
                "Not found",
                "No such key API operation.".into(),
            )),
        }
    }

    fn audit(&self, action: &'static str, caller: Key<'_>, target: (&str, &str), result: &Answer) {
        let result = match result {
            Ok(_) => "ok".to_string(),
            Err(ApiError::Refused(r)) => r.to_string(),
            Err(ApiError::Problem(_, _, detail)) => detail.clone(),
        };
        (self.on_action)(KeyAction {
            action,
            key_id: caller.id().to_string(),
            principal: caller.principal().name.to_string(),
            target_key_id: secret::mask_in_path(target.0).into_owned(),
            target_principal: target.1.to_string(),
            result,
        });
    }

    async fn create(&self, body: &[u8], snapshot: &Snapshot, caller: Key<'_>) -> Answer {
        #[derive(serde::Deserialize)]
        #[serde(deny_unknown_fields)]
        struct CreateBody {
            principal: Option<String>,
            scopes: Option<Vec<String>>,
            purpose: Option<String>,
            expires: Option<String>,
        }
        let own = caller.principal().name.to_string();
        let req: CreateBody = match parse_body(body) {
            Ok(req) => req,
            Err(e) => {
                let refused = Err(e);
                self.audit("key_create", caller, ("", &own), &refused);
                return refused;
            }
        };
        let target = req.principal.clone().unwrap_or(own);
        let result = self
            .create_inner(
                req.scopes,
                req.purpose,
                req.expires,
                &target,
                snapshot,
                caller,
            )
            .await;
        let new_id = result
            .as_ref()
            .ok()
            .and_then(|(_, j)| j["id"].as_str().map(str::to_string));
        self.audit(
            "key_create",
            caller,
            (new_id.as_deref().unwrap_or(""), &target),
            &result,
        );
        result
    }

    async fn create_inner(
        &self,
        scopes: Option<Vec<String>>,
        purpose: Option<String>,
        expires: Option<String>,
        target: &str,
        snapshot: &Snapshot,
        caller: Key<'_>,
    ) -> Answer {
        let policy = &snapshot.policy;
        authz::may(policy, caller, target, Access::Write)?;
        let principal = policy
            .principal(target)
            .ok_or_else(|| bad_request(format!("unknown principal {target:?}")))?
            .clone();
        if let Some(p) = &purpose {
            entry::check_text("purpose", p, entry::MAX_PURPOSE_CHARS)
                .map_err(|e| bad_request(e.to_string()))?;
        }
        if let Some(s) = &scopes {
            entry::check_scopes(s).map_err(|e| bad_request(e.to_string()))?;
        }
        let now = time::OffsetDateTime::now_utc();
        let expires = expires
            .map(|e| crate::cli::keys::future_expiry(&e, now))
            .transpose()
            .map_err(bad_request)?;
        let created = format_time(now).map_err(internal)?;
        let store = self.loader.store();
        let caller_scopes = store
            .entry(caller.id())
            .await?
            .and_then(|listed| listed.entry.scopes);
        let scopes = authz::scopes_for_new_key(
            policy,
            caller,
            caller_scopes.as_deref(),
            &principal,
            scopes.as_deref(),
        )?;
        let new = secret::generate();
        let entry =
            KeyEntry::for_new_key(&new.material(), target, scopes, purpose, created, expires);
        store
            .apply(Edit::Create {
                entry: entry.clone(),
                max_per_principal: Some(self.max_keys_per_principal),
            })
            .await?;
        self.catch_up().await;
        let mut json = self.key_object(&unmetered(entry));
        json["key"] = serde_json::Value::from(new.secret);
        Ok((StatusCode::CREATED, json))
    }

    /// Makes the live state follow the store before the caller hears back.
    async fn catch_up(&self) {
        if let crate::reload::ReloadOutcome::Rejected { problems, .. } =
            self.loader.catch_up().await
        {
            tracing::warn!(%problems, "key API: the change is stored but not yet live");
        }
    }

    async fn list(&self, query: &str, snapshot: &Snapshot, caller: Key<'_>) -> Answer {
        let policy = &snapshot.policy;
        let filter = query
            .split('&')
            .find_map(|kv| kv.strip_prefix("principal="))
            .map(str::to_string);
        let filter = match filter {
            Some(p) => {
                authz::may(policy, caller, &p, Access::Read)?;
                Some(p)
            }
            None if authz::may_list_all(policy, caller) => None,
            None => {
                let own = caller.principal().name.to_string();
                authz::may(policy, caller, &own, Access::Read)?;
                Some(own)
            }
        };
        let listed = self.loader.store().entries(filter.as_deref()).await?;
        let keys: Vec<serde_json::Value> = listed.iter().map(|l| self.key_object(l)).collect();
        Ok((StatusCode::OK, serde_json::json!({ "keys": keys })))
    }

    /// Finds an entry the caller may see, or 404 (never revealing that it exists).
    async fn visible(
        &self,
        id: &str,
        snapshot: &Snapshot,
        caller: Key<'_>,
    ) -> Result<Listed, ApiError> {
        let listed = self.loader.store().entry(id).await?.ok_or_else(not_found)?;
        authz::may(
            &snapshot.policy,
            caller,
            &listed.entry.principal,
            Access::Read,
        )
        .map_err(|_| not_found())?;
        Ok(listed)
    }

    async fn get(&self, id: &str, snapshot: &Snapshot, caller: Key<'_>) -> Answer {
        let listed = self.visible(id, snapshot, caller).await?;
        Ok((StatusCode::OK, self.key_object(&listed)))
    }

    /// The entry `id` if the caller may change it.
    async fn writable(
        &self,
        id: &str,
        snapshot: &Snapshot,
        caller: Key<'_>,
    ) -> Result<Listed, ApiError> {
        let listed = self.visible(id, snapshot, caller).await?;
        authz::may(
            &snapshot.policy,
            caller,
            &listed.entry.principal,
            Access::Write,
        )?;
        Ok(listed)
    }

    async fn set_active(
        &self,
        id: &str,
        active: bool,
        snapshot: &Snapshot,
        caller: Key<'_>,
    ) -> Answer {
        let result = async {
            let listed = self.writable(id, snapshot, caller).await?;
            // Turning a key back on gives its access back: only to a caller who holds it all.
            if active && !listed.entry.active {
                let old = snapshot.keys.by_id(id).ok_or_else(not_yet_loaded)?;
                authz::within_caller(&snapshot.policy, caller, old.grants())?;
            }
            let applied = self
                .loader
                .store()
                .apply(Edit::SetActive {
                    id: id.to_string(),
                    active,
                })
                .await?;
            self.catch_up().await;
            let entry = applied.after.unwrap_or(listed.entry);
            Ok((StatusCode::OK, self.key_object(&Listed { entry, ..listed })))
        }
        .await;
        let action = if active {
            "key_activate"
        } else {
            "key_deactivate"
        };
        self.audit_target(action, caller, id, snapshot, &result);
        result
    }

    async fn revoke(&self, id: &str, snapshot: &Snapshot, caller: Key<'_>) -> Answer {
        let result = async {
            self.writable(id, snapshot, caller).await?;
            self.loader
                .store()
                .apply(Edit::Revoke { id: id.to_string() })
                .await?;
            self.catch_up().await;
            Ok((StatusCode::NO_CONTENT, serde_json::Value::Null))
        }
        .await;
        self.audit_target("key_revoke", caller, id, snapshot, &result);
        result
    }

    async fn rotate(&self, id: &str, body: &[u8], snapshot: &Snapshot, caller: Key<'_>) -> Answer {
        #[derive(serde::Deserialize, Default)]
        #[serde(deny_unknown_fields)]
        struct RotateBody {
            overlap: Option<String>,
        }
        let result = async {
            let req: RotateBody = if body.is_empty() {
                RotateBody::default()
            } else {
                parse_body(body)?
            };
            let overlap = crate::cli::parse_overlap(req.overlap.as_deref()).map_err(bad_request)?;
            let now = time::OffsetDateTime::now_utc();
            let old_expiry = crate::cli::later(now, overlap)
                .and_then(format_time)
                .map_err(bad_request)?;
            let created = format_time(now).map_err(internal)?;
            self.writable(id, snapshot, caller).await?;
            // The successor has the old key's access, so the caller must hold all of it. A key
            // the live state does not know yet (just written elsewhere) cannot be checked.
            let old = snapshot.keys.by_id(id).ok_or_else(not_yet_loaded)?;
            authz::within_caller(&snapshot.policy, caller, old.grants())?;
            let new = secret::generate();
            let applied = self
                .loader
                .store()
                .apply(Edit::Rotate {
                    id: id.to_string(),
                    new: new.material(),
                    created,
                    old_expiry,
                })
                .await?;
            self.catch_up().await;
            let entry = applied
                .after
                .ok_or_else(|| internal("rotation produced no key"))?;
            let mut json = self.key_object(&unmetered(entry));
            json["key"] = serde_json::Value::from(new.secret);
            json["replaces"] = serde_json::Value::from(id);
            Ok((StatusCode::CREATED, json))
        }
        .await;
        self.audit_target("key_rotate", caller, id, snapshot, &result);
        result
    }

    fn audit_target(
        &self,
        action: &'static str,
        caller: Key<'_>,
        id: &str,
        snapshot: &Snapshot,
        result: &Answer,
    ) {
        let principal = snapshot
            .keys
            .by_id(id)
            .map_or(String::new(), |k| k.principal().name.to_string());
        self.audit(action, caller, (id, &principal), result);
    }

    /// The key object: never the key or its hash. Usage is the store's fleet-wide total plus
    /// what this proxy has not flushed yet, or this proxy's own count for a keys file.
    fn key_object(&self, listed: &Listed) -> serde_json::Value {
        let state = self.loader.state().load_full();
        let live = state.keys.by_id(&listed.entry.id);
        let local_calls = live.map_or(0, |k| {
            if listed.calls.is_some() {
                k.usage().unflushed()
            } else {
                k.usage().calls()
            }
        });
        let last_used = [listed.last_used, live.and_then(|k| k.usage().last_used())]
            .into_iter()
            .flatten()
            .max()
            .and_then(|t| time::OffsetDateTime::from_unix_timestamp(t).ok())
            .and_then(|t| format_time(t).ok());
        let e = &listed.entry;
        serde_json::json!({
            "id": e.id,
            "prefix": e.prefix,
            "principal": e.principal,
            "scopes": e.scopes,
            "purpose": e.purpose,
            "active": e.active,
            "created": e.created,
            "expires": e.expires,
            "calls": listed.calls.unwrap_or(0) + local_calls,
            "last_used": last_used,
        })
    }
}

fn unmetered(entry: KeyEntry) -> Listed {
    Listed {
        entry,
        calls: None,
        last_used: None,
    }
}

fn parse_body<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    let body = if body.is_empty() {
        b"{}".as_slice()
    } else {
        body
    };
    serde_json::from_slice(body).map_err(|e| bad_request(format!("invalid JSON body: {e}")))
}

fn json_response(status: StatusCode, json: serde_json::Value) -> Response<ProxyBody> {
    let body = if status == StatusCode::NO_CONTENT {
        Bytes::new()
    } else {
        Bytes::from(json.to_string())
    };
    let mut response = Response::new(
        Full::new(body)
            .map_err(|never| match never {})
            .boxed_unsync(),
    );
    *response.status_mut() = status;
    if status != StatusCode::NO_CONTENT {
        response.headers_mut().insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static("application/json"),
        );
    }
    response.headers_mut().insert(
        http::header::CACHE_CONTROL,
        http::HeaderValue::from_static("no-store"),
    );
    response
}

fn problem(status: StatusCode, title: &str, detail: &str, request_id: &str) -> Response<ProxyBody> {
    let json = serde_json::json!({
        "type": format!("https://portcullis.dev/problems/key-api-{}", status.as_u16()),
        "title": title,
        "status": status.as_u16(),
        "detail": detail,
        "request_id": request_id,
    });
    let mut response = json_response(status, json);
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/problem+json"),
    );
    response
}
