//! The self-service key API, served on the main listener under a reserved prefix and never
//! forwarded. Callers authenticate with their own key; `authz` decides what they may do; changes
//! go through the keys file (locked, atomically replaced) and are applied to the live snapshot
//! before the answer, so a new key works on the very next request.

pub mod authz;

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;

use crate::cli::{expiry_from, format_time};
use crate::keys::entry;
use crate::keys::file::{self, KeyEntry, KeysFile};
use crate::keys::{secret, Key};
use crate::policy::grant::Access;
use crate::proxy::ProxyBody;
use crate::reload::Loader;
use crate::state::Snapshot;
use crate::watch::FileVersion;
use authz::Refused;

/// Largest request body accepted.
const MAX_BODY: usize = 64 * 1024;

/// Where keys live. The file is the only implementation today; a shared store for fleets would
/// implement the same two operations.
pub trait KeyRepository: Send + Sync {
    /// Reads every key entry.
    fn read(&self) -> anyhow::Result<Arc<KeysFile>>;
    /// Changes the entries under an exclusive lock, persists them atomically, and calls `apply`
    /// with the new content while still holding the lock, so the live state can never be set to
    /// an older version than another writer's.
    fn update(
        &self,
        change: &mut dyn FnMut(&mut KeysFile) -> anyhow::Result<()>,
        apply: &mut dyn FnMut(&str) -> anyhow::Result<()>,
    ) -> anyhow::Result<()>;
}

/// The keys file as a repository. Reads are parsed once per file version, so listing keys does
/// not re-read a large keys file on every request.
pub struct FileRepository {
    path: PathBuf,
    cache: Mutex<Option<(FileVersion, Arc<KeysFile>)>>,
}

impl FileRepository {
    /// A repository over the keys file at `path`.
    pub fn new(path: PathBuf) -> Self {
        FileRepository {
            path,
            cache: Mutex::new(None),
        }
    }
}

impl KeyRepository for FileRepository {
    fn read(&self) -> anyhow::Result<Arc<KeysFile>> {
        let version = crate::watch::version(&self.path);
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        if let (Some(v), Some((cached, file))) = (version, cache.as_ref()) {
            if v == *cached {
                return Ok(file.clone());
            }
        }
        let file = Arc::new(file::load(&self.path).map_err(|p| anyhow::anyhow!("{p}"))?);
        *cache = version.map(|v| (v, file.clone()));
        Ok(file)
    }

    fn update(
        &self,
        change: &mut dyn FnMut(&mut KeysFile) -> anyhow::Result<()>,
        apply: &mut dyn FnMut(&str) -> anyhow::Result<()>,
    ) -> anyhow::Result<()> {
        file::update_then(&self.path, |f| change(f), |text| apply(text))?;
        Ok(())
    }
}

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
    repository: Box<dyn KeyRepository>,
    loader: Arc<Loader>,
    write_lock: Mutex<()>,
    on_action: Box<dyn Fn(KeyAction) + Send + Sync>,
    max_keys_per_principal: usize,
}

/// An answer plus the action to audit, if the request was one.
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

fn internal(e: impl std::fmt::Display) -> ApiError {
    tracing::error!(error = %e, "key API failure");
    ApiError::Problem(
        StatusCode::INTERNAL_SERVER_ERROR,
        "Internal error",
        "The key store could not be changed; nothing was changed.".into(),
    )
}

impl KeyApi {
    /// A key API under `prefix` over `repository`, applying changes through `loader`.
    pub fn new(
        prefix: String,
        repository: Box<dyn KeyRepository>,
        loader: Arc<Loader>,
        on_action: Box<dyn Fn(KeyAction) + Send + Sync>,
        max_keys_per_principal: usize,
    ) -> Self {
        KeyApi {
            prefix: prefix.trim_end_matches('/').to_string(),
            repository,
            loader,
            write_lock: Mutex::new(()),
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
        let api = self.clone();
        let rid = request_id.to_string();
        let result = tokio::task::spawn_blocking(move || {
            let Some(caller) = snapshot.keys.get(caller) else {
                return Err(not_found());
            };
            api.route(&method, &rest, &query, &body, &snapshot, caller)
        })
        .await
        .unwrap_or_else(|e| Err(internal(e)));
        match result {
            Ok((status, json)) => Handled {
                response: json_response(status, json),
                forbidden: false,
            },
            Err(ApiError::Refused(r)) => Handled {
                response: problem(StatusCode::FORBIDDEN, "Forbidden", &r.to_string(), &rid),
                forbidden: true,
            },
            Err(ApiError::Problem(status, title, detail)) => Handled {
                response: problem(status, title, &detail, &rid),
                forbidden: false,
            },
        }
    }

    fn route(
        &self,
        method: &Method,
        rest: &str,
        query: &str,
        body: &[u8],
        snapshot: &Snapshot,
        caller: Key<'_>,
    ) -> Result<(StatusCode, serde_json::Value), ApiError> {
        let parts: Vec<&str> = if rest.is_empty() {
            Vec::new()
        } else {
            rest.split('/').collect()
        };
        match (method, parts.as_slice()) {
            (&Method::POST, []) => self.create(body, snapshot, caller),
            (&Method::GET, []) => self.list(query, snapshot, caller),
            (&Method::GET, [id]) => self.get(id, snapshot, caller),
            (&Method::POST, [id, "activate"]) => self.set_active(id, true, snapshot, caller),
            (&Method::POST, [id, "deactivate"]) => self.set_active(id, false, snapshot, caller),
            (&Method::POST, [id, "rotate"]) => self.rotate(id, body, snapshot, caller),
            (&Method::DELETE, [id]) => self.revoke(id, snapshot, caller),
            _ => Err(ApiError::Problem(
                StatusCode::NOT_FOUND,
                "Not found",
                "No such key API operation.".into(),
            )),
        }
    }

    fn audit(
        &self,
        action: &'static str,
        caller: Key<'_>,
        target: (&str, &str),
        result: &Result<(StatusCode, serde_json::Value), ApiError>,
    ) {
        let result = match result {
            Ok(_) => "ok".to_string(),
            Err(ApiError::Refused(r)) => r.to_string(),
            Err(ApiError::Problem(_, _, detail)) => detail.clone(),
        };
        (self.on_action)(KeyAction {
            action,
            key_id: caller.id().to_string(),
            principal: caller.principal().name.to_string(),
            target_key_id: target.0.to_string(),
            target_principal: target.1.to_string(),
            result,
        });
    }

    fn create(
        &self,
        body: &[u8],
        snapshot: &Snapshot,
        caller: Key<'_>,
    ) -> Result<(StatusCode, serde_json::Value), ApiError> {
        #[derive(serde::Deserialize)]
        #[serde(deny_unknown_fields)]
        struct CreateBody {
            principal: Option<String>,
            scopes: Option<Vec<String>>,
            purpose: Option<String>,
            expires: Option<String>,
        }
        let req: CreateBody = match parse_body(body) {
            Ok(req) => req,
            Err(e) => {
                let refused = Err(e);
                let own = caller.principal().name.to_string();
                self.audit("key_create", caller, ("", &own), &refused);
                return refused;
            }
        };
        let target = req
            .principal
            .clone()
            .unwrap_or_else(|| caller.principal().name.to_string());
        let result = self.create_inner(
            req.scopes,
            req.purpose,
            req.expires,
            &target,
            snapshot,
            caller,
        );
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

    fn create_inner(
        &self,
        scopes: Option<Vec<String>>,
        purpose: Option<String>,
        expires: Option<String>,
        target: &str,
        snapshot: &Snapshot,
        caller: Key<'_>,
    ) -> Result<(StatusCode, serde_json::Value), ApiError> {
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
            .map(|e| expiry_from(&e, now))
            .transpose()
            .map_err(bad_request)?;
        let created = format_time(now).map_err(internal)?;
        let new = secret::generate();
        let max_keys = self.max_keys_per_principal;
        let mut outcome: Option<Result<KeyEntry, ApiError>> = None;
        let _guard = self.write_lock.lock().unwrap_or_else(|p| p.into_inner());
        let written = self.repository.update(
            &mut |f: &mut KeysFile| {
                let caller_scopes = f
                    .keys
                    .iter()
                    .find(|k| *k.id == *caller.id())
                    .and_then(|k| k.scopes.clone());
                let scopes = match authz::scopes_for_new_key(
                    policy,
                    caller,
                    caller_scopes.as_deref(),
                    &principal,
                    scopes.as_deref(),
                ) {
                    Ok(s) => s,
                    Err(r) => {
                        outcome = Some(Err(r.into()));
                        anyhow::bail!("refused");
                    }
                };
                if f.keys.iter().filter(|k| k.principal == target).count() >= max_keys {
                    outcome = Some(Err(ApiError::Problem(
                        StatusCode::CONFLICT,
                        "Conflict",
                        format!("principal {target:?} already holds {max_keys} keys, the most allowed; revoke unused keys first"),
                    )));
                    anyhow::bail!("quota");
                }
                let entry = KeyEntry::for_new_key(
                    &new,
                    target,
                    scopes,
                    purpose.clone(),
                    created.clone(),
                    expires.clone(),
                );
                f.keys.push(entry.clone());
                outcome = Some(Ok(entry));
                Ok(())
            },
            &mut |text| self.apply(text),
        );
        let entry = match (written, outcome) {
            (Ok(()), Some(Ok(entry))) => entry,
            (_, Some(Err(e))) => return Err(e),
            (Err(e), _) => return Err(internal(e)),
            (Ok(()), None) => return Err(internal("the change was not run")),
        };
        let mut json = key_object(&entry, self.loader.state().load().keys.by_id(&entry.id));
        json["key"] = serde_json::Value::from(new.secret);
        Ok((StatusCode::CREATED, json))
    }

    fn list(
        &self,
        query: &str,
        snapshot: &Snapshot,
        caller: Key<'_>,
    ) -> Result<(StatusCode, serde_json::Value), ApiError> {
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
        let file = self.repository.read().map_err(internal)?;
        let keys: Vec<serde_json::Value> = file
            .keys
            .iter()
            .filter(|k| filter.as_deref().is_none_or(|p| k.principal == p))
            .map(|k| key_object(k, snapshot.keys.by_id(&k.id)))
            .collect();
        Ok((StatusCode::OK, serde_json::json!({ "keys": keys })))
    }

    /// Finds an entry the caller may see, or 404 (never revealing that it exists).
    fn visible(
        &self,
        id: &str,
        snapshot: &Snapshot,
        caller: Key<'_>,
    ) -> Result<KeyEntry, ApiError> {
        let file = self.repository.read().map_err(internal)?;
        let entry = file
            .keys
            .iter()
            .find(|k| k.id == id)
            .cloned()
            .ok_or_else(not_found)?;
        authz::may(&snapshot.policy, caller, &entry.principal, Access::Read)
            .map_err(|_| not_found())?;
        Ok(entry)
    }

    fn get(
        &self,
        id: &str,
        snapshot: &Snapshot,
        caller: Key<'_>,
    ) -> Result<(StatusCode, serde_json::Value), ApiError> {
        let entry = self.visible(id, snapshot, caller)?;
        Ok((StatusCode::OK, key_object(&entry, snapshot.keys.by_id(id))))
    }

    /// Runs a change on one existing entry the caller may write, then applies the new file.
    fn change_entry(
        &self,
        id: &str,
        snapshot: &Snapshot,
        caller: Key<'_>,
        change: &mut dyn FnMut(&mut KeysFile, usize) -> Result<(), ApiError>,
    ) -> Result<KeyEntry, ApiError> {
        let entry = self.visible(id, snapshot, caller)?;
        authz::may(&snapshot.policy, caller, &entry.principal, Access::Write)?;
        let mut outcome: Result<(), ApiError> = Ok(());
        let _guard = self.write_lock.lock().unwrap_or_else(|p| p.into_inner());
        let written = self.repository.update(
            &mut |f: &mut KeysFile| {
                let Some(index) = f.keys.iter().position(|k| k.id == id) else {
                    outcome = Err(not_found());
                    anyhow::bail!("gone");
                };
                if let Err(e) = change(f, index) {
                    outcome = Err(e);
                    anyhow::bail!("refused");
                }
                Ok(())
            },
            &mut |text| self.apply(text),
        );
        outcome?;
        written.map_err(internal)?;
        Ok(entry)
    }

    /// Puts freshly written keys live; runs under the keys-file lock.
    fn apply(&self, text: &str) -> anyhow::Result<()> {
        self.loader
            .apply_keys_text(text)
            .map(|_| ())
            .map_err(|e| anyhow::anyhow!("the keys file was written but could not be applied: {e}"))
    }

    fn set_active(
        &self,
        id: &str,
        active: bool,
        snapshot: &Snapshot,
        caller: Key<'_>,
    ) -> Result<(StatusCode, serde_json::Value), ApiError> {
        let mut updated: Option<KeyEntry> = None;
        let result = self
            .change_entry(id, snapshot, caller, &mut |f, i| {
                // Turning a key back on gives its access back: only to a caller who holds it all.
                if active && !f.keys[i].active {
                    let old = snapshot.keys.by_id(id).ok_or_else(not_yet_loaded)?;
                    authz::within_caller(&snapshot.policy, caller, old.grants())?;
                }
                f.keys[i].active = active;
                updated = Some(f.keys[i].clone());
                Ok(())
            })
            .map(|entry| {
                let entry = updated.clone().unwrap_or(entry);
                (
                    StatusCode::OK,
                    key_object(&entry, self.loader.state().load().keys.by_id(id)),
                )
            });
        let action = if active {
            "key_activate"
        } else {
            "key_deactivate"
        };
        self.audit_target(action, caller, id, snapshot, &result);
        result
    }

    fn revoke(
        &self,
        id: &str,
        snapshot: &Snapshot,
        caller: Key<'_>,
    ) -> Result<(StatusCode, serde_json::Value), ApiError> {
        let result = self
            .change_entry(id, snapshot, caller, &mut |f, i| {
                f.keys.remove(i);
                Ok(())
            })
            .map(|_| (StatusCode::NO_CONTENT, serde_json::Value::Null));
        self.audit_target("key_revoke", caller, id, snapshot, &result);
        result
    }

    fn rotate(
        &self,
        id: &str,
        body: &[u8],
        snapshot: &Snapshot,
        caller: Key<'_>,
    ) -> Result<(StatusCode, serde_json::Value), ApiError> {
        #[derive(serde::Deserialize, Default)]
        #[serde(deny_unknown_fields)]
        struct RotateBody {
            overlap: Option<String>,
        }
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
        let new = secret::generate();
        let mut successor: Option<KeyEntry> = None;
        let result = self
            .change_entry(id, snapshot, caller, &mut |f, i| {
                // The successor has the old key's access, so the caller must hold all of it. A key
                // the live state does not know yet (just written by the CLI) cannot be checked.
                let old = snapshot.keys.by_id(id).ok_or_else(not_yet_loaded)?;
                authz::within_caller(&snapshot.policy, caller, old.grants())?;
                let entry = f.keys[i].rotate_to(&new, created.clone(), old_expiry.clone());
                f.keys.push(entry.clone());
                successor = Some(entry);
                Ok(())
            })
            .and_then(|_| {
                let entry = successor
                    .clone()
                    .ok_or_else(|| internal("rotation produced no key"))?;
                let mut json = key_object(&entry, self.loader.state().load().keys.by_id(&entry.id));
                json["key"] = serde_json::Value::from(new.secret.clone());
                json["replaces"] = serde_json::Value::from(id);
                Ok((StatusCode::CREATED, json))
            });
        self.audit_target("key_rotate", caller, id, snapshot, &result);
        result
    }

    fn audit_target(
        &self,
        action: &'static str,
        caller: Key<'_>,
        id: &str,
        snapshot: &Snapshot,
        result: &Result<(StatusCode, serde_json::Value), ApiError>,
    ) {
        let principal = snapshot
            .keys
            .by_id(id)
            .map_or(String::new(), |k| k.principal().name.to_string());
        let id = secret::mask_in_path(id);
        self.audit(action, caller, (&id, &principal), result);
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

/// The key object: never the key or its hash.
fn key_object(entry: &KeyEntry, live: Option<Key<'_>>) -> serde_json::Value {
    let last_used = live
        .and_then(|k| k.usage().last_used())
        .and_then(|t| time::OffsetDateTime::from_unix_timestamp(t).ok())
        .and_then(|t| format_time(t).ok());
    serde_json::json!({
        "id": entry.id,
        "prefix": entry.prefix,
        "principal": entry.principal,
        "scopes": entry.scopes,
        "purpose": entry.purpose,
        "active": entry.active,
        "created": entry.created,
        "expires": entry.expires,
        "calls": live.map_or(0, |k| k.usage().calls()),
        "last_used": last_used,
    })
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
