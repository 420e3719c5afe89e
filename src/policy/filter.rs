//! Response filtering: a route's `filter: {items, instance}` names, by JSON Pointer (RFC 6901),
//! the array in the backend's answer and the value inside each item that names its instance.
//!
//! Filtering is a splice, not a re-serialisation: the body is validated as JSON, the array and
//! its elements are located by byte range, and the answer is the original bytes with the
//! refused elements left out. Every other byte (key order, number spellings, whitespace outside
//! the array) is the backend's own.

use std::borrow::Cow;

/// A parsed JSON Pointer: its reference tokens, unescaped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pointer {
    text: Box<str>,
    tokens: Vec<String>,
}

impl Pointer {
    /// Parses `""` (the whole document) or `/token/token...` with `~0` and `~1` escapes.
    pub fn parse(text: &str) -> Result<Pointer, String> {
        if text.is_empty() {
            return Ok(Pointer {
                text: "".into(),
                tokens: Vec::new(),
            });
        }
        let Some(rest) = text.strip_prefix('/') else {
            return Err(format!(
                "{text:?} is not a JSON Pointer: it must be empty or start with '/'"
            ));
        };
        let mut tokens = Vec::new();
        for raw in rest.split('/') {
            let mut token = String::with_capacity(raw.len());
            let mut chars = raw.chars();
            while let Some(c) = chars.next() {
                match (c, c == '~') {
                    (_, true) => match chars.next() {
                        Some('0') => token.push('~'),
                        Some('1') => token.push('/'),
                        _ => {
                            return Err(format!(
                                "{text:?} is not a JSON Pointer: '~' must be followed by 0 or 1"
                            ))
                        }
                    },
                    (c, false) => token.push(c),
                }
            }
            tokens.push(token);
        }
        Ok(Pointer {
            text: text.into(),
            tokens,
        })
    }

    /// The pointer as written.
    pub fn as_str(&self) -> &str {
        &self.text
    }
}

/// Why an answer could not be filtered (the audit event's `filter_error`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FilterError {
    /// The body is not JSON.
    NotJson,
    /// `items` names nothing, or something that is not an array.
    NotAnArray,
    /// The body was compressed.
    Compressed,
    /// The body was larger than `filter_max_bytes`.
    TooLarge,
    /// Reading the body from the backend failed.
    Unreadable,
}

impl FilterError {
    /// The audit and metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            FilterError::NotJson => "not_json",
            FilterError::NotAnArray => "not_an_array",
            FilterError::Compressed => "compressed",
            FilterError::TooLarge => "too_large",
            FilterError::Unreadable => "unreadable",
        }
    }
}

/// An item's instance as the grant logic compares it: a JSON string in the form a normalised
/// request path would carry it, a number by its JSON text; `None` for any other value.
pub type InstanceOf<'a> = Option<Cow<'a, str>>;

/// Keeps the elements of the array at `items` whose value at `instance` `keep` accepts (an
/// element without a usable value is removed). Returns the new body and how many were removed.
pub fn filter(
    body: &[u8],
    items: &Pointer,
    instance: &Pointer,
    keep: impl Fn(&str) -> bool,
) -> Result<(Vec<u8>, usize), FilterError> {
    if serde_json::from_slice::<serde::de::IgnoredAny>(body).is_err() {
        return Err(FilterError::NotJson);
    }
    let (start, end) = locate(body, 0, &items.tokens).ok_or(FilterError::NotAnArray)?;
    if body.get(start) != Some(&b'[') {
        return Err(FilterError::NotAnArray);
    }
    let elements = array_elements(body, start).ok_or(FilterError::NotJson)?;
    let mut out = Vec::with_capacity(body.len());
    out.extend_from_slice(&body[..=start]);
    let mut removed = 0;
    let mut first = true;
    for (s, e) in elements {
        let element = &body[s..e];
        let passes = instance_of(element, instance).is_some_and(|i| keep(&i));
        if passes {
            if !first {
                out.push(b',');
            }
            out.extend_from_slice(element);
            first = false;
        } else {
            removed += 1;
        }
    }
    out.extend_from_slice(&body[end - 1..]);
    Ok((out, removed))
}

/// The instance value of one element (valid JSON), see [`InstanceOf`].
fn instance_of<'a>(element: &'a [u8], pointer: &Pointer) -> InstanceOf<'a> {
    let (s, e) = locate(element, 0, &pointer.tokens)?;
    let raw = &element[s..e];
    match raw.first()? {
        b'"' => {
            let text: String = serde_json::from_slice(raw).ok()?;
            Some(Cow::Owned(crate::path::segment_form(&text).into_owned()))
        }
        b'-' | b'0'..=b'9' => std::str::from_utf8(raw).ok().map(Cow::Borrowed),
        _ => None,
    }
}

/// The byte range of the value `tokens` name inside the value starting at or after `at`.
fn locate(body: &[u8], at: usize, tokens: &[String]) -> Option<(usize, usize)> {
    let start = skip_ws(body, at);
    let end = value_end(body, start)?;
    let Some((token, rest)) = tokens.split_first() else {
        return Some((start, end));
    };
    match body.get(start)? {
        b'{' => {
            let mut i = skip_ws(body, start + 1);
            if body.get(i) == Some(&b'}') {
                return None;
            }
            loop {
                let key_end = value_end(body, i)?;
                let key: String = serde_json::from_slice(&body[i..key_end]).ok()?;
                i = skip_ws(body, key_end);
                if body.get(i) != Some(&b':') {
                    return None;
                }
                let value_start = skip_ws(body, i + 1);
                let value_end_at = value_end(body, value_start)?;
                if key == *token {
                    return locate(body, value_start, rest);
                }
                i = skip_ws(body, value_end_at);
                match body.get(i)? {
                    b',' => i = skip_ws(body, i + 1),
                    _ => return None,
                }
            }
        }
        b'[' => {
            let index: usize = token.parse().ok()?;
            if token.len() > 1 && token.starts_with('0') {
                return None;
            }
            let (s, _) = *array_elements(body, start)?.get(index)?;
            locate(body, s, rest)
        }
        _ => None,
    }
}

/// The byte ranges of the elements of the array starting at `start` (`[`).
fn array_elements(body: &[u8], start: usize) -> Option<Vec<(usize, usize)>> {
    let mut out = Vec::new();
    let mut i = skip_ws(body, start + 1);
    if body.get(i) == Some(&b']') {
        return Some(out);
    }
    loop {
        let end = value_end(body, i)?;
        out.push((i, end));
        i = skip_ws(body, end);
        match body.get(i)? {
            b',' => i = skip_ws(body, i + 1),
            b']' => return Some(out),
            _ => return None,
        }
    }
}

fn skip_ws(body: &[u8], mut i: usize) -> usize {
    while matches!(body.get(i), Some(b' ' | b'\t' | b'\n' | b'\r')) {
        i += 1;
    }
    i
}

/// Where the value starting at `start` ends (exclusive), for a document already known valid.
fn value_end(body: &[u8], start: usize) -> Option<usize> {
    match body.get(start)? {
        b'"' => {
            let mut i = start + 1;
            loop {
                match body.get(i)? {
                    b'\\' => i += 2,
                    b'"' => return Some(i + 1),
                    _ => i += 1,
                }
            }
        }
        b'{' | b'[' => {
            let mut depth = 0usize;
            let mut i = start;
            loop {
                match body.get(i)? {
                    b'"' => {
                        i = value_end(body, i)?;
                        continue;
                    }
                    b'{' | b'[' => depth += 1,
                    b'}' | b']' => {
                        depth -= 1;
                        if depth == 0 {
                            return Some(i + 1);
                        }
                    }
                    _ => {}
                }
                i += 1;
            }
        }
        _ => {
            let mut i = start;
            while let Some(b) = body.get(i) {
                if matches!(b, b',' | b'}' | b']' | b' ' | b'\t' | b'\n' | b'\r') {
                    break;
                }
                i += 1;
            }
            (i > start).then_some(i)
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn run(body: &str, items: &str, keep: &[&str]) -> Result<(String, usize), FilterError> {
        let items = Pointer::parse(items).unwrap();
        let instance = Pointer::parse("/id").unwrap();
        filter(body.as_bytes(), &items, &instance, |i| keep.contains(&i))
            .map(|(b, n)| (String::from_utf8(b).unwrap(), n))
    }

    #[test]
    fn keeps_the_allowed_items_in_order_and_every_other_byte() {
        let body = r#"{"total": 3, "data": [ {"id": "a", "n": 1.50}, {"id":"b"} , {"id": "c"} ], "next": null}"#;
        let (out, removed) = run(body, "/data", &["a", "c"]).unwrap();
        assert_eq!(
            out,
            r#"{"total": 3, "data": [{"id": "a", "n": 1.50},{"id": "c"}], "next": null}"#
        );
        assert_eq!(removed, 1);
        let (out, removed) = run(body, "/data", &[]).unwrap();
        assert_eq!(out, r#"{"total": 3, "data": [], "next": null}"#);
        assert_eq!(removed, 3);
    }

    #[test]
    fn the_whole_body_numbers_and_missing_values() {
        let body = r#"[{"id": 7}, {"id": 7.0}, {"name": "x"}, {"id": true}, {"id": "a/b"}]"#;
        let (out, removed) = run(body, "", &["7", "a%2Fb"]).unwrap();
        assert_eq!(out, r#"[{"id": 7},{"id": "a/b"}]"#);
        assert_eq!(removed, 3);
    }

    #[test]
    fn refuses_what_it_cannot_filter() {
        assert_eq!(run("not json", "", &[]), Err(FilterError::NotJson));
        assert_eq!(
            run(r#"{"data": {}}"#, "/data", &[]),
            Err(FilterError::NotAnArray)
        );
        assert_eq!(
            run(r#"{"data": []}"#, "/items", &[]),
            Err(FilterError::NotAnArray)
        );
        assert_eq!(
            run(r#"{"data": [1]} x"#, "/data", &[]),
            Err(FilterError::NotJson)
        );
    }

    #[test]
    fn pointers_follow_rfc_6901() {
        let p = Pointer::parse("/a~1b/m~0n/0").unwrap();
        assert_eq!(p.tokens, vec!["a/b", "m~n", "0"]);
        assert!(Pointer::parse("data").is_err());
        assert!(Pointer::parse("/a~2").is_err());
        let body = r#"{"a/b": {"m~n": [{"x": [{"id": "q"}, {"id": "r"}]}]}}"#;
        let items = Pointer::parse("/a~1b/m~0n/0/x").unwrap();
        let instance = Pointer::parse("/id").unwrap();
        let (out, _) = filter(body.as_bytes(), &items, &instance, |i| i == "r").unwrap();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            r#"{"a/b": {"m~n": [{"x": [{"id": "r"}]}]}}"#
        );
    }

    #[test]
    fn strings_with_escapes_and_nesting_do_not_confuse_the_scanner() {
        let body = r#"{"data": [{"id": "a", "s": "x\"],[{"}, {"id": "b", "deep": [[{"]": 1}]]}]}"#;
        let (out, removed) = run(body, "/data", &["b"]).unwrap();
        assert_eq!(out, r#"{"data": [{"id": "b", "deep": [[{"]": 1}]]}]}"#);
        assert_eq!(removed, 1);
    }
}
