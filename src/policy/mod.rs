//! The policy: routes, roles and principals, compiled once per load into fast lookup structures.
//!
//! Pure: no I/O, no clock. `compile` turns the YAML text into a [`Policy`] or reports every
//! problem with its line and column; the request path then only calls [`Policy::lookup`].

pub mod filter;
pub mod grant;
pub mod matcher;
pub mod model;

use std::collections::HashMap;
use std::sync::Arc;

use http::Method;
use marked_yaml::Spanned;

use crate::diagnostic::{self, Problem};
pub use grant::ResourceId;
use grant::{Access, Grant, GrantSpec};
use matcher::{RouteTable, Template};
use model::{PolicyFile, PrincipalSpec, RouteSpec};

/// The resource that key-management grants name; always known, even without a route.
pub const API_KEYS_RESOURCE: &str = "api_keys";

/// Users are people; robots are service accounts. Passed to the backend as a header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PrincipalKind {
    /// A person.
    User,
    /// A service account.
    Robot,
}

impl PrincipalKind {
    /// The kind as written in files and headers.
    pub fn as_str(self) -> &'static str {
        match self {
            PrincipalKind::User => "user",
            PrincipalKind::Robot => "robot",
        }
    }
}

/// A principal with its grants resolved (roles expanded, union simplified).
#[derive(Debug)]
pub struct Principal {
    /// The principal's name.
    pub name: Box<str>,
    /// The name as the `X-Portcullis-Principal` value, made once (absent if it cannot be one).
    pub header_value: Option<http::HeaderValue>,
    /// User or robot.
    pub kind: PrincipalKind,
    /// Everything the principal may do.
    pub grants: Arc<[Grant]>,
    /// Requests per key (or per token principal) allowed, when limited.
    pub limit: Option<crate::limits::Rate>,
    /// `RateLimit-Policy` for that limit, made once.
    pub limit_header: Option<http::HeaderValue>,
}

/// What a matched route demands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RouteRule {
    /// Anyone, no key needed.
    Public,
    /// A key with `access` on `resource` (and the instance named by a parameter, if any).
    Protected {
        /// The resource.
        resource: ResourceId,
        /// The level needed.
        access: Access,
        /// Positional name of the instance parameter.
        instance_param: Option<Box<str>>,
    },
}

/// One compiled route.
#[derive(Debug)]
pub struct Route {
    /// The `match:` text as written, e.g. `GET /v1/datasets/{dataset}`.
    pub matcher: Box<str>,
    /// The path template as written (what metrics and audit show).
    pub template: Box<str>,
    /// What the route demands.
    pub rule: RouteRule,
    /// Line in the policy file, for `explain`.
    pub line: usize,
    /// Position in the policy's route list.
    pub index: usize,
    /// A body is accepted on methods without body semantics (`allow_body: true`).
    pub allow_body: bool,
    /// The answer's list is filtered by the caller's instance grants.
    pub filter: Option<RouteFilter>,
}

/// A route's compiled `filter:`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteFilter {
    /// The array in the answer.
    pub items: filter::Pointer,
    /// The instance value inside each item.
    pub instance: filter::Pointer,
}

/// A route found for a request, with the instance value when the route names one.
pub struct RouteHit<'s, 'p> {
    /// The route.
    pub route: &'s Route,
    /// The instance parameter's value, still percent-encoded as in the normalised path.
    pub instance: Option<&'p str>,
}

/// The compiled policy.
pub struct Policy {
    resources: Vec<Box<str>>,
    resource_ids: HashMap<Box<str>, ResourceId>,
    routes: Vec<Route>,
    table: RouteTable,
    folded: RouteTable,
    principals: HashMap<Box<str>, Arc<Principal>>,
    warnings: Vec<Problem>,
}

impl std::fmt::Debug for Policy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Policy")
            .field("routes", &self.routes.len())
            .field("principals", &self.principals.len())
            .finish()
    }
}

impl Policy {
    /// Finds the route for a method and normalised path.
    #[inline]
    pub fn lookup<'s, 'p>(&'s self, method: &Method, path: &'p str) -> Option<RouteHit<'s, 'p>>
    where
        's: 'p,
    {
        self.hit(self.table.find(method, path)?)
    }

    /// Finds the route for a case-folded path (see [`crate::path::fold_case`]) among the
    /// case-folded templates: the route a case-insensitive backend would pick.
    pub fn lookup_folded<'s, 'p>(
        &'s self,
        method: &Method,
        folded_path: &'p str,
    ) -> Option<RouteHit<'s, 'p>>
    where
        's: 'p,
    {
        self.hit(self.folded.find(method, folded_path)?)
    }

    fn hit<'s, 'p>(&'s self, found: matcher::RouteMatch<'p>) -> Option<RouteHit<'s, 'p>>
    where
        's: 'p,
    {
        let route = self.routes.get(found.route)?;
        let instance = match &route.rule {
            RouteRule::Protected {
                instance_param: Some(name),
                ..
            } => found.params.get(&**name),
            _ => None,
        };
        Some(RouteHit { route, instance })
    }

    /// A principal by name.
    pub fn principal(&self, name: &str) -> Option<&Arc<Principal>> {
        self.principals.get(name)
    }

    /// Every principal, in no particular order.
    pub fn principals(&self) -> impl Iterator<Item = &Arc<Principal>> {
        self.principals.values()
    }

    /// The routes in file order.
    pub fn routes(&self) -> &[Route] {
        &self.routes
    }

    /// A resource's name.
    pub fn resource_name(&self, id: ResourceId) -> &str {
        self.resources.get(id as usize).map_or("?", |s| s)
    }

    /// A resource's id.
    pub fn resource_id(&self, name: &str) -> Option<ResourceId> {
        self.resource_ids.get(name).copied()
    }

    /// Problems that do not make the policy invalid but that its author should hear about.
    pub fn warnings(&self) -> &[Problem] {
        &self.warnings
    }

    /// Resolves a grant string against this policy's resources.
    pub fn compile_grant(&self, text: &str) -> Result<Grant, String> {
        let spec = GrantSpec::parse(text).map_err(|e| e.to_string())?;
        let resource = match &spec.resource {
            None => None,
            Some(name) => Some(self.resource_id(name).ok_or_else(|| {
                format!("grant {text:?} names unknown resource {name:?} (no route uses it)")
            })?),
        };
        Ok(Grant {
            resource,
            instance: spec.instance.map(Into::into),
            access: spec.access,
        })
    }

    /// Renders a grant the way it is written in files.
    pub fn display_grant(&self, grant: &Grant) -> String {
        let resource = grant.resource.map_or("*", |r| self.resource_name(r));
        match &grant.instance {
            Some(i) => format!("{resource}/{i}:{}", grant.access),
            None => format!("{resource}:{}", grant.access),
        }
    }
}

/// Compiles policy text, reporting every problem found.
pub fn compile(source: &str) -> Result<Policy, Vec<Problem>> {
    let options = marked_yaml::LoaderOptions::default().error_on_duplicate_keys(true);
    let file: PolicyFile = marked_yaml::from_yaml_with_options(0, source, options)
        .map_err(|e| vec![diagnostic::from_marked_yaml(&e)])?;
    let mut problems = Vec::new();
    if *file.version != 1 {
        problems.push(Problem::at_span(
            file.version.span(),
            format!("unsupported policy version {} (expected 1)", *file.version),
        ));
    }
    let mut builder = Builder::default();
    let api_keys = builder.intern(API_KEYS_RESOURCE);
    debug_assert_eq!(api_keys, grant::API_KEYS);
    for spec in &file.routes {
        builder.add_route(spec, &mut problems);
    }
    let roles = compile_roles(&builder, &file, &mut problems);
    let principals = compile_principals(&builder, &file, &roles, &mut problems);
    if !problems.is_empty() {
        return Err(problems);
    }
    Ok(Policy {
        resources: builder.resources,
        resource_ids: builder.resource_ids,
        routes: builder.routes,
        table: builder.table,
        folded: builder.folded,
        principals,
        warnings: wildcard_warnings(&file),
    })
}

/// Before 0.2, `*` as the resource also covered `api_keys`. A role or principal that grants `*`
/// at write level or above but names no `api_keys` grant most likely relied on that to let its
/// holders make keys; say so where the grant is written.
fn wildcard_warnings(file: &PolicyFile) -> Vec<Problem> {
    let lists = file
        .roles
        .iter()
        .map(|(name, grants)| (format!("role {:?}", name.as_str()), grants))
        .chain(
            file.principals
                .iter()
                .map(|(name, p)| (format!("principal {:?}", name.as_str()), &p.grants)),
        );
    let mut warnings = Vec::new();
    for (owner, grants) in lists {
        let parsed: Vec<(&Spanned<String>, GrantSpec)> = grants
            .iter()
            .filter_map(|g| GrantSpec::parse(g).ok().map(|spec| (g, spec)))
            .collect();
        let names_api_keys = parsed
            .iter()
            .any(|(_, s)| s.resource.as_deref() == Some(API_KEYS_RESOURCE));
        let wide = parsed
            .iter()
            .find(|(_, s)| s.resource.is_none() && s.access >= Access::Write);
        if let (false, Some((text, _))) = (names_api_keys, wide) {
            warnings.push(Problem::at_span(
                text.span(),
                format!(
                    "{owner}: {:?} does not cover api_keys (who may make keys is granted by name); add \"api_keys:write\" if its holders should make their own keys",
                    text.as_str()
                ),
            ));
        }
    }
    warnings.sort_by_key(|p| (p.line, p.column));
    warnings
}

#[derive(Default)]
struct Builder {
    resources: Vec<Box<str>>,
    resource_ids: HashMap<Box<str>, ResourceId>,
    routes: Vec<Route>,
    table: RouteTable,
    folded: RouteTable,
    seen: HashMap<(Method, String), usize>,
}

impl Builder {
    fn intern(&mut self, name: &str) -> ResourceId {
        if let Some(id) = self.resource_ids.get(name) {
            return *id;
        }
        let id = self.resources.len() as ResourceId;
        self.resources.push(name.into());
        self.resource_ids.insert(name.into(), id);
        id
    }

    fn add_route(&mut self, spec: &RouteSpec, problems: &mut Vec<Problem>) {
        let at = |message: String| Problem::at_span(spec.matcher.span(), message);
        let (methods, path) = match matcher::parse_match(&spec.matcher) {
            Ok(parsed) => parsed,
            Err(message) => return problems.push(at(message)),
        };
        let template = match Template::parse(path) {
            Ok(t) => t,
            Err(e) => return problems.push(at(format!("{e} in {path:?}"))),
        };
        let Some(rule) = self.route_rule(spec, &template, problems) else {
            return;
        };
        let filter = match &spec.filter {
            None => None,
            Some(f) => {
                let mut bad = false;
                if matches!(rule, RouteRule::Public) {
                    problems.push(Problem::at_span(
                        f.span(),
                        "a public route cannot filter: everyone may read it whole",
                    ));
                    bad = true;
                }
                if matches!(
                    rule,
                    RouteRule::Protected {
                        instance_param: Some(_),
                        ..
                    }
                ) {
                    problems.push(Problem::at_span(
                        f.span(),
                        "filter is for list routes: this route already names one instance",
                    ));
                    bad = true;
                }
                let mut pointer = |p: &Spanned<String>, field: &str| {
                    filter::Pointer::parse(p).map_err(|e| {
                        problems.push(Problem::at_span(p.span(), format!("filter.{field}: {e}")))
                    })
                };
                let items = pointer(&f.items, "items");
                let instance = pointer(&f.instance, "instance");
                match (items, instance, bad) {
                    (Ok(items), Ok(instance), false) => Some(RouteFilter { items, instance }),
                    _ => return,
                }
            }
        };
        let index = self.routes.len();
        let line = spec.matcher.span().start().map_or(0, |m| m.line());
        for method in &methods {
            let key = (method.clone(), template.positional.clone());
            if let Some(first) = self.seen.get(&key) {
                problems.push(at(format!(
                    "duplicate route: {method} {path} is already defined at line {first}"
                )));
                continue;
            }
            if let Err(e) = self.table.insert(method, &template.positional, index) {
                problems.push(at(format!("route {method} {path} conflicts: {e}")));
                continue;
            }
            // Two templates that differ only in case share one folded entry: the first keeps it,
            // and a request spelled like either is judged against both readings anyway.
            let _ =
                self.folded
                    .insert(method, &crate::path::fold_case(&template.positional), index);
            self.seen.insert(key, line);
        }
        self.routes.push(Route {
            matcher: spec.matcher.trim().into(),
            template: path.into(),
            rule,
            line,
            index,
            allow_body: spec.allow_body.as_ref().is_some_and(|b| **b),
            filter,
        });
    }

    fn route_rule(
        &mut self,
        spec: &RouteSpec,
        template: &Template,
        problems: &mut Vec<Problem>,
    ) -> Option<RouteRule> {
        let public = spec.public.as_ref().is_some_and(|p| **p);
        if public {
            if let Some(extra) = spec.resource.as_ref().or(spec.access.as_ref()) {
                problems.push(Problem::at_span(
                    extra.span(),
                    "a public route takes no resource or access",
                ));
                return None;
            }
            return Some(RouteRule::Public);
        }
        let Some(resource) = &spec.resource else {
            problems.push(Problem::at_span(
                spec.matcher.span(),
                "route needs a resource and access, or public: true",
            ));
            return None;
        };
        let valid_name = !resource.is_empty()
            && resource
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
        if !valid_name {
            problems.push(Problem::at_span(
                resource.span(),
                format!(
                    "resource name {:?} may only use letters, digits, '_' and '-'",
                    **resource
                ),
            ));
            return None;
        }
        let access = match &spec.access {
            None => {
                problems.push(Problem::at_span(
                    spec.matcher.span(),
                    "route needs an access",
                ));
                return None;
            }
            Some(a) => match Access::parse(a) {
                Some(level) => level,
                None => {
                    problems.push(Problem::at_span(
                        a.span(),
                        format!("unknown access {:?} (expected read, write or manage)", **a),
                    ));
                    return None;
                }
            },
        };
        let instance_param = match &spec.instance {
            None => None,
            Some(name) => match template.positional_name(name) {
                Some(p) => Some(p.into_boxed_str()),
                None => {
                    problems.push(Problem::at_span(
                        name.span(),
                        format!("instance {:?} is not a parameter of the path", **name),
                    ));
                    return None;
                }
            },
        };
        Some(RouteRule::Protected {
            resource: self.intern(resource),
            access,
            instance_param,
        })
    }

    fn grant(&self, text: &Spanned<String>, problems: &mut Vec<Problem>) -> Option<Grant> {
        let spec = match GrantSpec::parse(text) {
            Ok(spec) => spec,
            Err(e) => {
                problems.push(Problem::at_span(text.span(), e.to_string()));
                return None;
            }
        };
        let resource = match &spec.resource {
            None => None,
            Some(name) => match self.resource_ids.get(name.as_str()) {
                Some(id) => Some(*id),
                None => {
                    problems.push(Problem::at_span(
                        text.span(),
                        format!(
                            "grant {:?} names unknown resource {name:?} (no route uses it)",
                            **text
                        ),
                    ));
                    return None;
                }
            },
        };
        Some(Grant {
            resource,
            instance: spec.instance.map(Into::into),
            access: spec.access,
        })
    }
}

fn compile_roles(
    builder: &Builder,
    file: &PolicyFile,
    problems: &mut Vec<Problem>,
) -> HashMap<String, Vec<Grant>> {
    let mut roles = HashMap::new();
    for (name, grants) in &file.roles {
        let compiled = grants
            .iter()
            .filter_map(|g| builder.grant(g, problems))
            .collect();
        roles.insert(name.to_string(), compiled);
    }
    roles
}

fn compile_principals(
    builder: &Builder,
    file: &PolicyFile,
    roles: &HashMap<String, Vec<Grant>>,
    problems: &mut Vec<Problem>,
) -> HashMap<Box<str>, Arc<Principal>> {
    let mut principals = HashMap::new();
    let rate = |text: &Spanned<String>, problems: &mut Vec<Problem>| {
        crate::limits::Rate::parse(text)
            .map_err(|e| problems.push(Problem::at_span(text.span(), e)))
            .ok()
    };
    let default = file
        .limits
        .as_ref()
        .and_then(|l| l.default.as_ref())
        .and_then(|d| rate(d, problems));
    for (name, spec) in &file.principals {
        let limit = match &spec.limit {
            Some(l) => rate(l, problems),
            None => default,
        };
        if let Some(mut p) = compile_principal(builder, name, spec, roles, problems) {
            p.limit = limit;
            p.limit_header = limit.and_then(|r| {
                http::HeaderValue::from_str(&format!(
                    "\"default\";q={};w={}",
                    r.count,
                    r.window_seconds()
                ))
                .ok()
            });
            principals.insert(name.as_str().into(), Arc::new(p));
        }
    }
    principals
}

fn compile_principal(
    builder: &Builder,
    name: &Spanned<String>,
    spec: &PrincipalSpec,
    roles: &HashMap<String, Vec<Grant>>,
    problems: &mut Vec<Problem>,
) -> Option<Principal> {
    // The name travels in a header and in syslog structured data: visible ASCII only.
    let name_ok = !name.is_empty() && name.bytes().all(|b| b.is_ascii_graphic());
    if !name_ok {
        problems.push(Problem::at_span(
            name.span(),
            format!("principal name {:?} may only use visible ASCII characters (it is sent as a header)", name.as_str()),
        ));
        return None;
    }
    let kind = match spec.kind.as_str() {
        "user" => Some(PrincipalKind::User),
        "robot" => Some(PrincipalKind::Robot),
        other => {
            problems.push(Problem::at_span(
                spec.kind.span(),
                format!("unknown principal kind {other:?} (expected user or robot)"),
            ));
            None
        }
    };
    let mut grants = Vec::new();
    for role in &spec.roles {
        match roles.get(role.as_str()) {
            Some(role_grants) => grants.extend(role_grants.iter().cloned()),
            None => problems.push(Problem::at_span(
                role.span(),
                format!(
                    "principal {:?} has unknown role {:?}",
                    name.as_str(),
                    role.as_str()
                ),
            )),
        }
    }
    grants.extend(
        spec.grants
            .iter()
            .filter_map(|g| builder.grant(g, problems)),
    );
    Some(Principal {
        name: name.as_str().into(),
        header_value: http::HeaderValue::from_str(name.as_str()).ok(),
        limit: None,
        limit_header: None,
        kind: kind?,
        grants: grant::simplify(grants).into(),
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    const POLICY: &str = r#"
version: 1
routes:
  - match: GET /v1/datasets
    resource: datasets
    access: read
  - match: GET /v1/datasets/{dataset}
    resource: datasets
    instance: dataset
    access: read
  - match: PUT|PATCH|DELETE /v1/datasets/{dataset}
    resource: datasets
    instance: dataset
    access: write
  - match: GET /v1/files/{*path}
    resource: files
    access: read
  - match: GET /status
    public: true
roles:
  viewer: ["*:read"]
  editor: ["*:read", "*:write"]
principals:
  alice: { kind: user, roles: [editor] }
  etl-bot: { kind: robot, grants: ["datasets/ds_1:write", "files:read"] }
"#;

    #[test]
    fn compiles_and_looks_up() {
        let policy = compile(POLICY).unwrap();
        let hit = policy.lookup(&Method::PATCH, "/v1/datasets/ds_1").unwrap();
        assert_eq!(&*hit.route.template, "/v1/datasets/{dataset}");
        assert_eq!(hit.instance, Some("ds_1"));
        assert!(matches!(
            hit.route.rule,
            RouteRule::Protected {
                access: Access::Write,
                ..
            }
        ));
        let hit = policy.lookup(&Method::HEAD, "/status").unwrap();
        assert_eq!(hit.route.rule, RouteRule::Public);
        assert!(policy.lookup(&Method::POST, "/v1/datasets").is_none());
        let bot = policy.principal("etl-bot").unwrap();
        assert_eq!(bot.kind, PrincipalKind::Robot);
        let ds = policy.resource_id("datasets").unwrap();
        assert!(grant::any_allows(&bot.grants, ds, Some("ds_1"), Access::Write).is_some());
        assert!(grant::any_allows(&bot.grants, ds, Some("ds_2"), Access::Read).is_none());
        assert!(policy.resource_id(API_KEYS_RESOURCE).is_some());
    }

    #[test]
    fn reports_every_problem_with_positions() {
        let bad = r#"version: 1
routes:
  - match: GET /v1/x
    resource: x
    access: read
  - match: GET /v1/x
    resource: x
    access: read
roles:
  viewer: ["nope:read"]
principals:
  bob: { kind: user, roles: [viewr] }
"#;
        let problems = compile(bad).unwrap_err();
        let text: Vec<String> = problems
            .iter()
            .map(|p| format!("{}:{} {}", p.line, p.column, p.message))
            .collect();
        assert_eq!(problems.len(), 3, "{text:?}");
        assert!(
            text.iter()
                .any(|t| t.starts_with("6:") && t.contains("duplicate route")),
            "{text:?}"
        );
        assert!(
            text.iter()
                .any(|t| t.starts_with("10:") && t.contains("unknown resource")),
            "{text:?}"
        );
        assert!(
            text.iter()
                .any(|t| t.starts_with("12:") && t.contains("unknown role")),
            "{text:?}"
        );
    }

    #[test]
    fn typo_in_a_field_is_an_error_with_position() {
        let bad = "version: 1\nroutes:\n  - match: GET /x\n    resource: x\n    acess: read\n";
        let problems = compile(bad).unwrap_err();
        assert_eq!(problems.len(), 1);
        assert!(problems[0].message.contains("acess"), "{:?}", problems[0]);
        assert!(problems[0].line >= 3, "{:?}", problems[0]);
    }

    #[test]
    fn rejects_bad_instance_and_public_with_resource() {
        let bad = "version: 1\nroutes:\n  - match: GET /x/{id}\n    resource: x\n    instance: nope\n    access: read\n  - match: GET /y\n    public: true\n    resource: y\n";
        let problems = compile(bad).unwrap_err();
        assert_eq!(problems.len(), 2, "{problems:?}");
    }
}
