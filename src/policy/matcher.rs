//! The route table: normalised path + method → route, by radix tree.
//!
//! Templates use `{name}` and `{*tail}`. Parameter names are rewritten to positional names
//! (`p0`, `p1`, ...) before insertion so that `/a/{id}` and `/a/{name}/b` share one tree node;
//! the route keeps the name its author gave. The tree prefers static segments over parameters over
//! catch-alls, which is the "most specific template wins" rule.

use http::Method;

/// A parsed `match:` template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template {
    /// The template with positional parameter names, as inserted into the tree.
    pub positional: String,
    /// Parameter names as written, by position.
    pub params: Vec<String>,
}

/// Why a template is unusable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TemplateError {
    /// Does not start with `/`.
    #[error("path template must start with '/'")]
    NotAbsolute,
    /// Contains something normalisation would remove, so it could never match.
    #[error("path template is not normalised (empty, '.' or '..' segment): it could never match")]
    NotNormalised,
    /// A brace that does not form `{name}` or `{*name}` filling a whole segment.
    #[error("bad parameter {0:?}: use {{name}} or {{*name}} as a whole segment")]
    BadParam(String),
    /// `{*tail}` not in last position.
    #[error("a catch-all {{*name}} must be the last segment")]
    CatchAllNotLast,
    /// The same name twice.
    #[error("parameter {0:?} appears twice")]
    DuplicateParam(String),
}

impl Template {
    /// Parses and checks a path template.
    pub fn parse(path: &str) -> Result<Template, TemplateError> {
        if !path.starts_with('/') {
            return Err(TemplateError::NotAbsolute);
        }
        let segments: Vec<&str> = path.split('/').skip(1).collect();
        let mut positional = String::with_capacity(path.len());
        let mut params: Vec<String> = Vec::new();
        for (i, seg) in segments.iter().enumerate() {
            let last = i + 1 == segments.len();
            positional.push('/');
            if (seg.is_empty() && !(last && segments.len() == 1)) || *seg == "." || *seg == ".." {
                return Err(TemplateError::NotNormalised);
            }
            if !seg.contains(['{', '}']) {
                positional.push_str(seg);
                continue;
            }
            let inner = seg
                .strip_prefix('{')
                .and_then(|s| s.strip_suffix('}'))
                .ok_or_else(|| TemplateError::BadParam(seg.to_string()))?;
            let (catch_all, name) = match inner.strip_prefix('*') {
                Some(name) => (true, name),
                None => (false, inner),
            };
            let valid = !name.is_empty()
                && name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
            if !valid {
                return Err(TemplateError::BadParam(seg.to_string()));
            }
            if catch_all && !last {
                return Err(TemplateError::CatchAllNotLast);
            }
            if params.iter().any(|p| p == name) {
                return Err(TemplateError::DuplicateParam(name.to_string()));
            }
            let star = if catch_all { "*" } else { "" };
            positional.push_str(&format!("{{{star}p{}}}", params.len()));
            params.push(name.to_string());
        }
        Ok(Template { positional, params })
    }

    /// The positional name of a declared parameter.
    pub fn positional_name(&self, declared: &str) -> Option<String> {
        self.params
            .iter()
            .position(|p| p == declared)
            .map(|i| format!("p{i}"))
    }
}

/// Parses `GET|HEAD /path` into methods and the path.
pub fn parse_match(text: &str) -> Result<(Vec<Method>, &str), String> {
    let text = text.trim();
    let (methods, path) = text
        .split_once(char::is_whitespace)
        .ok_or_else(|| format!("expected \"METHOD /path\", got {text:?}"))?;
    let mut out = Vec::new();
    for m in methods.split('|') {
        let upper = m.to_ascii_uppercase();
        if m != upper {
            return Err(format!("method {m:?} must be upper case"));
        }
        let method = match upper.as_str() {
            "GET" | "HEAD" | "POST" | "PUT" | "PATCH" | "DELETE" | "OPTIONS" => {
                Method::from_bytes(upper.as_bytes()).map_err(|e| e.to_string())?
            }
            "*" | "ANY" => return Err("list methods explicitly instead of a wildcard".into()),
            other => return Err(format!("unknown method {other:?}")),
        };
        if out.contains(&method) {
            return Err(format!("method {m} listed twice"));
        }
        out.push(method);
    }
    Ok((out, path.trim()))
}

/// Two radix trees per method, one for templates without a catch-all and one for templates
/// ending in `{*tail}` (the tree cannot hold a parameter and a catch-all at the same position).
/// When both trees match, the route whose segments are more specific from the left wins
/// (static over parameter over catch-all), so the split never changes which route applies.
/// `HEAD` falls back to the `GET` trees.
#[derive(Default)]
pub struct RouteTable {
    trees: Vec<(Method, MethodTrees)>,
    shapes: Vec<Vec<u8>>,
}

/// Per segment: 2 static, 1 parameter, 0 catch-all. Compared left to right, larger is more specific.
fn shape(template: &str) -> Vec<u8> {
    template
        .split('/')
        .skip(1)
        .map(|segment| {
            if segment.starts_with("{*") {
                0
            } else if segment.starts_with('{') {
                1
            } else {
                2
            }
        })
        .collect()
}

#[derive(Default)]
struct MethodTrees {
    exact: matchit::Router<usize>,
    tail: matchit::Router<usize>,
}

/// A successful lookup: the route index and the positional parameters.
pub struct RouteMatch<'p> {
    /// Index into the policy's route list.
    pub route: usize,
    /// The raw match, to read parameters from.
    pub params: matchit::Params<'p, 'p>,
}

impl RouteTable {
    /// Adds a route; fails when it conflicts with one already present.
    pub fn insert(
        &mut self,
        method: &Method,
        template: &str,
        route: usize,
    ) -> Result<(), matchit::InsertError> {
        let index = match self.trees.iter().position(|(m, _)| m == method) {
            Some(i) => i,
            None => {
                self.trees.push((method.clone(), MethodTrees::default()));
                self.trees.len() - 1
            }
        };
        if self.shapes.len() <= route {
            self.shapes.resize(route + 1, Vec::new());
        }
        self.shapes[route] = shape(template);
        let trees = &mut self.trees[index].1;
        if template.contains("{*") {
            trees.tail.insert(template, route)
        } else {
            trees.exact.insert(template, route)
        }
    }

    /// Finds the most specific route for `method` and a normalised `path`.
    pub fn find<'a>(&'a self, method: &Method, path: &'a str) -> Option<RouteMatch<'a>> {
        if let Some(found) = self.find_exact(method, path) {
            return Some(found);
        }
        if method == Method::HEAD {
            return self.find_exact(&Method::GET, path);
        }
        None
    }

    fn find_exact<'a>(&'a self, method: &Method, path: &'a str) -> Option<RouteMatch<'a>> {
        let (_, trees) = self.trees.iter().find(|(m, _)| m == method)?;
        let found = match (trees.exact.at(path).ok(), trees.tail.at(path).ok()) {
            (Some(exact), Some(tail)) => {
                let exact_shape = self.shapes.get(*exact.value);
                let tail_shape = self.shapes.get(*tail.value);
                if tail_shape > exact_shape {
                    tail
                } else {
                    exact
                }
            }
            (Some(only), None) | (None, Some(only)) => only,
            (None, None) => return None,
        };
        Some(RouteMatch {
            route: *found.value,
            params: found.params,
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn templates_become_positional() {
        let t = Template::parse("/v1/{company}/files/{*path}").unwrap();
        assert_eq!(t.positional, "/v1/{p0}/files/{*p1}");
        assert_eq!(t.params, vec!["company", "path"]);
        assert_eq!(t.positional_name("path").as_deref(), Some("p1"));
        assert_eq!(Template::parse("/").unwrap().positional, "/");
    }

    #[test]
    fn bad_templates_are_refused() {
        assert_eq!(Template::parse("v1"), Err(TemplateError::NotAbsolute));
        assert_eq!(Template::parse("/a//b"), Err(TemplateError::NotNormalised));
        assert_eq!(
            Template::parse("/a/../b"),
            Err(TemplateError::NotNormalised)
        );
        assert!(matches!(
            Template::parse("/a/{x"),
            Err(TemplateError::BadParam(_))
        ));
        assert!(matches!(
            Template::parse("/a/x{y}"),
            Err(TemplateError::BadParam(_))
        ));
        assert_eq!(
            Template::parse("/{*a}/b"),
            Err(TemplateError::CatchAllNotLast)
        );
        assert!(matches!(
            Template::parse("/{a}/{a}"),
            Err(TemplateError::DuplicateParam(_))
        ));
    }

    #[test]
    fn parses_methods() {
        let (m, p) = parse_match("PUT|PATCH /x").unwrap();
        assert_eq!(m, vec![Method::PUT, Method::PATCH]);
        assert_eq!(p, "/x");
        assert!(parse_match("get /x").is_err());
        assert!(parse_match("GET|GET /x").is_err());
        assert!(parse_match("BREW /x").is_err());
        assert!(parse_match("/x").is_err());
    }

    #[test]
    fn most_specific_wins_and_head_follows_get() {
        let mut table = RouteTable::default();
        let templates = ["/v1/{p0}", "/v1/special", "/v1/{*p0}", "/v1/{p0}/x"];
        for (i, t) in templates.iter().enumerate() {
            table.insert(&Method::GET, t, i).unwrap();
        }
        let at = |m: Method, p: &str| table.find(&m, p).map(|r| r.route);
        assert_eq!(at(Method::GET, "/v1/special"), Some(1));
        assert_eq!(at(Method::GET, "/v1/other"), Some(0));
        assert_eq!(at(Method::GET, "/v1/other/x"), Some(3));
        assert_eq!(at(Method::GET, "/v1/a/b/c"), Some(2));
        assert_eq!(at(Method::HEAD, "/v1/special"), Some(1));
        assert_eq!(at(Method::POST, "/v1/special"), None);
        assert_eq!(at(Method::GET, "/v2"), None);
        assert_eq!(at(Method::GET, "/v1special"), None);
    }

    #[test]
    fn a_static_segment_before_a_catch_all_beats_a_parameter() {
        let mut table = RouteTable::default();
        table.insert(&Method::GET, "/v1/{p0}/{p1}", 0).unwrap();
        table.insert(&Method::GET, "/v1/admin/{*p0}", 1).unwrap();
        table.insert(&Method::GET, "/v1/{p0}/x/{*p1}", 2).unwrap();
        let at = |p: &str| table.find(&Method::GET, p).map(|r| r.route);
        assert_eq!(at("/v1/admin/users"), Some(1));
        assert_eq!(at("/v1/team/report"), Some(0));
        assert_eq!(
            at("/v1/team/x"),
            Some(0),
            "a parameter beats a catch-all at the same depth"
        );
        assert_eq!(at("/v1/team/x/y"), Some(2));
    }
}
