//! A streaming reader for the keys file, fast enough for a million keys.
//!
//! A general YAML parser holds the whole document in memory and takes seconds on a keys file of
//! a million entries. This reader handles, line by line, the shapes keys files take in practice
//! (what `render` writes, and hand-written files like SPEC's example: block or flow `scopes`,
//! plain, single- or double-quoted scalars, comments). Anything outside that subset makes it
//! stop with [`ReadError::Unsupported`], and the caller falls back to `serde_yaml`, so an
//! unusual but valid file still loads and an invalid one still gets serde's precise message.

use std::io::BufRead;

use super::entry::{forbidden_char, KeyEntry, KeysFile};

/// Where an entry's fields are, for error messages (1-based lines; 0 when absent).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EntryLines {
    /// The `- ` line that starts the entry.
    pub entry: usize,
    /// One line per field, in [`FIELDS`] order.
    pub fields: [usize; 9],
    /// The column where field values start.
    pub value_column: usize,
}

/// The fields of an entry, in the order files are written.
pub const FIELDS: [&str; 9] = [
    "id",
    "prefix",
    "hash",
    "principal",
    "scopes",
    "purpose",
    "active",
    "created",
    "expires",
];

impl EntryLines {
    /// Line and column of `field`, or of the entry when the field is absent.
    pub fn of(&self, field: Option<&str>) -> (usize, usize) {
        let line = field
            .and_then(|f| FIELDS.iter().position(|x| *x == f))
            .map(|i| self.fields[i])
            .filter(|l| *l > 0);
        match line {
            Some(l) => (l, self.value_column),
            None => (self.entry, 1),
        }
    }
}

/// Why the fast reader stopped.
#[derive(Debug)]
pub enum ReadError {
    /// Valid YAML perhaps, but outside the subset; use the general parser.
    Unsupported {
        /// The line that was not understood.
        line: usize,
    },
    /// The file could not be read.
    Io(std::io::Error),
    /// `version` is missing or not 1.
    Version(String),
}

#[derive(Default)]
struct Partial {
    entry: KeyEntry,
    seen: [bool; 9],
    lines: EntryLines,
}

impl Default for KeyEntry {
    fn default() -> Self {
        KeyEntry {
            id: String::new(),
            prefix: String::new(),
            hash: String::new(),
            principal: String::new(),
            scopes: None,
            purpose: None,
            active: true,
            created: None,
            expires: None,
        }
    }
}

enum State {
    Top,
    Keys { item_indent: Option<usize> },
}

/// Reads every entry, handing each to `sink` with its line numbers. Returns the number read.
pub fn read_entries<R: BufRead>(
    mut reader: R,
    sink: &mut dyn FnMut(KeyEntry, EntryLines),
) -> Result<usize, ReadError> {
    let mut buf = String::new();
    let mut line_no = 0;
    let mut state = State::Top;
    let mut version: Option<u32> = None;
    let mut current: Option<Partial> = None;
    let mut in_block_scopes = false;
    let mut scope_indent: Option<usize> = None;
    let mut seen_keys = false;
    let mut count = 0;
    loop {
        buf.clear();
        let n = reader.read_line(&mut buf).map_err(ReadError::Io)?;
        if n == 0 {
            break;
        }
        line_no += 1;
        let line = buf.trim_end_matches(['\n', '\r']);
        let unsupported = ReadError::Unsupported { line: line_no };
        let body = line.trim_start_matches(' ');
        if body.is_empty() || body.starts_with('#') {
            continue;
        }
        // Tabs, documents, and characters YAML treats as line breaks or forbids: general parser.
        let odd_char = line
            .chars()
            .any(|c| c.is_control() || matches!(c, '\u{2028}' | '\u{2029}' | '\u{feff}'));
        if odd_char || body.starts_with("---") || body.starts_with("...") {
            return Err(unsupported);
        }
        let indent = line.len() - body.len();
        let is_item = body.starts_with("- ") || body == "-";
        if indent == 0 && !is_item {
            in_block_scopes = false;
            if let Some(done) = current.take() {
                count += finish(done, sink, line_no)?;
            }
            let (key, value) = split_field(body).ok_or(ReadError::Unsupported { line: line_no })?;
            match key {
                "version" if version.is_some() => return Err(unsupported),
                "keys" if seen_keys => return Err(unsupported),
                "keys" => seen_keys = true,
                _ => {}
            }
            match key {
                "version" => {
                    let v = scalar(value).ok_or(ReadError::Unsupported { line: line_no })?;
                    version = Some(v.as_deref().unwrap_or("").parse().map_err(|_| {
                        ReadError::Version(format!("{line_no}:1: version must be 1"))
                    })?);
                }
                "keys" if value.trim().is_empty() => state = State::Keys { item_indent: None },
                "keys" if value.trim() == "[]" => {}
                _ => return Err(unsupported),
            }
            continue;
        }
        let State::Keys { item_indent } = &mut state else {
            return Err(unsupported);
        };
        if is_item && item_indent.is_none_or(|i| i == indent) {
            *item_indent = Some(indent);
            in_block_scopes = false;
            scope_indent = None;
            if let Some(done) = current.take() {
                count += finish(done, sink, line_no)?;
            }
            let mut partial = Partial::default();
            partial.lines.entry = line_no;
            let rest = body[1..].trim_start_matches(' ');
            let field_indent = indent + (body.len() - rest.len());
            partial.lines.value_column = field_indent + 1;
            if !rest.is_empty() {
                in_block_scopes = field(&mut partial, rest, line_no, field_indent)?;
            }
            current = Some(partial);
            continue;
        }
        let Some(partial) = current.as_mut() else {
            return Err(unsupported);
        };
        let field_indent = partial.lines.value_column - 1;
        if in_block_scopes && is_item && indent >= field_indent {
            if *scope_indent.get_or_insert(indent) != indent {
                return Err(unsupported);
            }
            let value = body[1..].trim_start_matches(' ');
            let item = scalar(value)
                .flatten()
                .ok_or(ReadError::Unsupported { line: line_no })?;
            partial.entry.scopes.get_or_insert_with(Vec::new).push(item);
            continue;
        }
        if indent != field_indent {
            return Err(unsupported);
        }
        in_block_scopes = field(partial, body, line_no, field_indent)?;
        scope_indent = None;
    }
    if let Some(done) = current.take() {
        count += finish(done, sink, line_no)?;
    }
    match version {
        Some(1) => Ok(count),
        Some(v) => Err(ReadError::Version(format!(
            "unsupported keys file version {v} (expected 1)"
        ))),
        None => Err(ReadError::Unsupported { line: 1 }),
    }
}

/// Parses one `key: value` inside an entry; returns whether a block `scopes:` list starts.
fn field(
    partial: &mut Partial,
    text: &str,
    line: usize,
    _indent: usize,
) -> Result<bool, ReadError> {
    let unsupported = || ReadError::Unsupported { line };
    let (key, value) = split_field(text).ok_or_else(unsupported)?;
    let index = FIELDS
        .iter()
        .position(|f| *f == key)
        .ok_or_else(unsupported)?;
    if partial.seen[index] {
        return Err(unsupported());
    }
    partial.seen[index] = true;
    partial.lines.fields[index] = line;
    let e = &mut partial.entry;
    if key == "scopes" {
        let value = strip_comment(value).trim();
        if value.is_empty() {
            // A block list follows, or nothing: `scopes:` alone is null in YAML.
            e.scopes = None;
            return Ok(true);
        }
        e.scopes = Some(flow_sequence(value).ok_or_else(unsupported)?);
        return Ok(false);
    }
    if key == "active" && value.trim_start().starts_with(['"', '\'']) {
        return Err(unsupported());
    }
    let value = scalar(value).ok_or_else(unsupported)?;
    match key {
        "active" => {
            e.active = match value.as_deref() {
                Some("true") => true,
                Some("false") => false,
                _ => return Err(unsupported()),
            }
        }
        "purpose" => e.purpose = value,
        "created" => e.created = value,
        "expires" => e.expires = value,
        _ => {
            let v = value.ok_or_else(unsupported)?;
            match key {
                "id" => e.id = v,
                "prefix" => e.prefix = v,
                "hash" => e.hash = v,
                _ => e.principal = v,
            }
        }
    }
    Ok(false)
}

fn finish(
    done: Partial,
    sink: &mut dyn FnMut(KeyEntry, EntryLines),
    line: usize,
) -> Result<usize, ReadError> {
    // id, prefix, hash and principal are required; serde words the error precisely.
    if !(done.seen[0] && done.seen[1] && done.seen[2] && done.seen[3]) {
        return Err(ReadError::Unsupported { line });
    }
    sink(done.entry, done.lines);
    Ok(1)
}

/// Splits `key: value` (or `key:` at the end of the line).
fn split_field(text: &str) -> Option<(&str, &str)> {
    let colon = text.find(':')?;
    let (key, rest) = text.split_at(colon);
    let rest = &rest[1..];
    if !(rest.is_empty() || rest.starts_with(' ')) {
        return None;
    }
    let key = key.trim_end();
    let simple = !key.is_empty() && key.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
    simple.then_some((key, rest))
}

fn strip_comment(value: &str) -> &str {
    match value.find(" #") {
        Some(i) => &value[..i],
        None => value,
    }
}

/// A scalar value: `None` for null, `Some(text)`, or (outer `None`) when unsupported.
fn scalar(value: &str) -> Option<Option<String>> {
    let value = value.trim_start_matches(' ');
    match value.as_bytes().first() {
        Some(b'"') => double_quoted(value).map(Some),
        Some(b'\'') => single_quoted(value).map(Some),
        _ => {
            let plain = strip_comment(value).trim_end();
            if plain.is_empty() || plain == "~" || plain == "null" {
                return Some(None);
            }
            let first = plain.as_bytes()[0];
            let special = matches!(
                first,
                b'[' | b']'
                    | b'{'
                    | b'}'
                    | b'&'
                    | b'*'
                    | b'!'
                    | b'|'
                    | b'>'
                    | b'%'
                    | b'@'
                    | b'`'
                    | b'#'
                    | b','
            ) || plain.contains(": ")
                || plain.ends_with(':');
            (!special).then(|| Some(plain.to_string()))
        }
    }
}

fn rest_is_comment(rest: &str) -> bool {
    let rest = rest.trim_start_matches(' ');
    rest.is_empty() || rest.starts_with('#')
}

fn double_quoted(value: &str) -> Option<String> {
    let mut out = String::new();
    let mut chars = value[1..].char_indices();
    while let Some((i, c)) = chars.next() {
        match c {
            '"' => return rest_is_comment(&value[i + 2..]).then_some(out),
            '\\' => {
                let (_, esc) = chars.next()?;
                match esc {
                    '"' => out.push('"'),
                    '\\' => out.push('\\'),
                    '/' => out.push('/'),
                    'n' => out.push('\n'),
                    't' => out.push('\t'),
                    'r' => out.push('\r'),
                    'b' => out.push('\u{8}'),
                    'f' => out.push('\u{c}'),
                    'u' => {
                        let hex: String = (0..4)
                            .filter_map(|_| chars.next().map(|(_, h)| h))
                            .collect();
                        let code = u32::from_str_radix(&hex, 16).ok()?;
                        out.push(char::from_u32(code)?);
                    }
                    _ => return None,
                }
            }
            c => out.push(c),
        }
    }
    None
}

fn single_quoted(value: &str) -> Option<String> {
    let mut out = String::new();
    let body = &value[1..];
    let mut chars = body.char_indices().peekable();
    while let Some((i, c)) = chars.next() {
        if c == '\'' {
            if chars.peek().is_some_and(|(_, n)| *n == '\'') {
                chars.next();
                out.push('\'');
                continue;
            }
            return rest_is_comment(&body[i + 1..]).then_some(out);
        }
        out.push(c);
    }
    None
}

/// `[a, "b", 'c']` on one line.
fn flow_sequence(value: &str) -> Option<Vec<String>> {
    let inner = value.strip_prefix('[')?.strip_suffix(']')?;
    let mut items = Vec::new();
    let mut rest = inner.trim();
    while !rest.is_empty() {
        let (item, after) = match rest.as_bytes()[0] {
            b'"' | b'\'' => {
                let quote = rest.as_bytes()[0] as char;
                let end = closing_quote(rest, quote)?;
                let text = &rest[..=end];
                let parsed = if quote == '"' {
                    double_quoted(text)?
                } else {
                    single_quoted(text)?
                };
                (parsed, rest[end + 1..].trim_start())
            }
            _ => {
                let end = rest.find(',').unwrap_or(rest.len());
                let text = rest[..end].trim();
                let special_start =
                    text.starts_with(['*', '&', '!', '|', '>', '%', '@', '`', '#', '-', '?', ':']);
                if text.is_empty()
                    || special_start
                    || text.contains(['[', ']', '{', '}', '"', '\'', '#'])
                {
                    return None;
                }
                (text.to_string(), &rest[end..])
            }
        };
        items.push(item);
        rest = match after.strip_prefix(',') {
            Some(r) => r.trim_start(),
            None if after.trim().is_empty() => "",
            None => return None,
        };
    }
    Some(items)
}

fn closing_quote(text: &str, quote: char) -> Option<usize> {
    let bytes = text.as_bytes();
    let mut i = 1;
    while i < bytes.len() {
        let b = bytes[i] as char;
        if quote == '"' && b == '\\' {
            i += 2;
            continue;
        }
        if b == quote {
            if quote == '\'' && bytes.get(i + 1) == Some(&b'\'') {
                i += 2;
                continue;
            }
            return Some(i);
        }
        i += 1;
    }
    None
}

/// A double-quoted scalar valid as both JSON and YAML: `"` and `\\` escaped, and every character
/// YAML would refuse or fold (controls, DEL, C1, line separators, BOM) as `\\uXXXX`. Validation
/// keeps such characters out of stored fields; this keeps a file written by hand-edited entries
/// readable anyway.
fn quote(text: &str) -> String {
    use std::fmt::Write;
    let mut out = String::with_capacity(text.len() + 2);
    out.push('"');
    for c in text.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if forbidden_char(c) && u32::from(c) <= 0xFFFF => {
                let _ = write!(out, "\\u{:04x}", u32::from(c));
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// Writes the canonical form: every value a JSON string (valid YAML), one field per line.
pub fn render(file: &KeysFile) -> String {
    let mut out = String::with_capacity(64 + file.keys.len() * 260);
    render_header(&mut out, file.version, file.keys.is_empty());
    for k in &file.keys {
        render_entry(&mut out, k);
    }
    out
}

/// The file's first lines; `empty` writes `keys: []`.
pub fn render_header(out: &mut String, version: u32, empty: bool) {
    use std::fmt::Write;
    out.push_str("# portcullis keys: SHA-256 hashes only, never a plaintext key.\n");
    out.push_str("# Managed by `portcullis keys ...` and the key API; hand edits are fine.\n");
    let _ = writeln!(out, "version: {version}");
    out.push_str(if empty { "keys: []\n" } else { "keys:\n" });
}

/// One entry in canonical form.
pub fn render_entry(out: &mut String, k: &KeyEntry) {
    use std::fmt::Write;
    let q = |s: &str| quote(s);
    // The narrowing fields come first and the hash last: an entry cut short by a partial
    // write lacks its hash and is refused, rather than loading wider than written.
    let _ = writeln!(out, "  - id: {}", q(&k.id));
    let _ = writeln!(out, "    prefix: {}", q(&k.prefix));
    let _ = writeln!(out, "    principal: {}", q(&k.principal));
    if let Some(scopes) = &k.scopes {
        let items: Vec<String> = scopes.iter().map(|s| q(s)).collect();
        let _ = writeln!(out, "    scopes: [{}]", items.join(", "));
    }
    let _ = writeln!(out, "    active: {}", k.active);
    if let Some(e) = &k.expires {
        let _ = writeln!(out, "    expires: {}", q(e));
    }
    if let Some(p) = &k.purpose {
        let _ = writeln!(out, "    purpose: {}", q(p));
    }
    if let Some(c) = &k.created {
        let _ = writeln!(out, "    created: {}", q(c));
    }
    let _ = writeln!(out, "    hash: {}", q(&k.hash));
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use proptest::prelude::*;

    fn read(text: &str) -> Result<Vec<(KeyEntry, EntryLines)>, ReadError> {
        let mut out = Vec::new();
        read_entries(text.as_bytes(), &mut |e, l| out.push((e, l)))?;
        Ok(out)
    }

    #[test]
    fn reads_the_spec_example_style() {
        let text = r#"# keys.yaml
version: 1
keys:
  - id: k7Hq2mZ9                          # public identifier, unique
    prefix: "pcs_k7Hq2m"                  # the first 10 characters of the key
    hash: "sha256:abcd"
    principal: alice
    scopes: ["datasets:read", 'jobs:write']
    purpose: "analytics dashboard"
    active: true
    created: 2026-11-23T10:00:00Z
    expires: 2027-02-21T10:00:00Z         # optional
  - id: second
    prefix: pcs_second
    hash: sha256:ef
    principal: "bob"
    scopes:
      - "a:read"
      - b:write
    active: false
"#;
        let entries = read(text).unwrap();
        assert_eq!(entries.len(), 2);
        let (a, lines) = &entries[0];
        assert_eq!(a.id, "k7Hq2mZ9");
        assert_eq!(a.prefix, "pcs_k7Hq2m");
        assert_eq!(
            a.scopes.as_deref().unwrap(),
            ["datasets:read", "jobs:write"]
        );
        assert_eq!(a.purpose.as_deref(), Some("analytics dashboard"));
        assert_eq!(a.expires.as_deref(), Some("2027-02-21T10:00:00Z"));
        assert_eq!(lines.entry, 4);
        assert_eq!(lines.of(Some("hash")), (6, 5));
        let (b, _) = &entries[1];
        assert_eq!(b.scopes.as_deref().unwrap(), ["a:read", "b:write"]);
        assert!(!b.active);
    }

    #[test]
    fn reads_what_serde_yaml_writes() {
        let file = KeysFile {
            version: 1,
            keys: vec![KeyEntry {
                id: "a".into(),
                prefix: "pcs_a".into(),
                hash: "sha256:00".into(),
                principal: "p".into(),
                scopes: Some(vec!["x:read".into(), "y/z:write".into()]),
                purpose: Some("it's \"quoted\"".into()),
                active: true,
                created: Some("2026-01-01T00:00:00Z".into()),
                expires: None,
            }],
        };
        let text = serde_yaml::to_string(&file).unwrap();
        let entries = read(&text).unwrap();
        assert_eq!(entries[0].0, file.keys[0]);
    }

    #[test]
    fn hands_unusual_yaml_to_the_general_parser() {
        for text in [
            "version: 1\nkeys:\n  - {id: a, prefix: b, hash: c, principal: d}\n",
            "version: 1\nkeys:\n  - id: &anchor a\n    prefix: b\n    hash: c\n    principal: d\n",
            "version: 1\nkeys:\n  - id: a\n    prefix: b\n    hash: c\n    principal: d\n    acitve: true\n",
            "version: 1\nkeys:\n  - id: a\n    prefix: b\n    hash: c\n",
            "version: 1\nkeys:\n  - id: a\n    id: b\n    prefix: b\n    hash: c\n    principal: d\n",
            "version: 1\nkeys:\n  - id: |\n      a\n",
            "version: 1\nkeys:\n  - id: a\n    prefix: b\n    hash: c\n    principal: d\n    scopes:\n      - ds/a:read\n        - datasets:write\n",
            "version: 1\nkeys: []\nkeys: []\n",
            "version: 1\nkeys:\n  - id: a\n    prefix: b\n    hash: c\n    principal: d\n    purpose: x\u{85}active: false\n",
            "version: 1\nkeys:\n  - id: a\n    prefix: b\n    hash: c\n    principal: d\n    active: \"false\"\n",
            "version: 1\nkeys:\n  - id: a\n    prefix: b\n    hash: c\n    principal: d\n    scopes: [*x]\n",
        ] {
            assert!(matches!(read(text), Err(ReadError::Unsupported { .. })), "{text}");
        }
        assert!(matches!(
            read("version: 2\nkeys: []\n"),
            Err(ReadError::Version(_))
        ));
        assert_eq!(read("version: 1\nkeys: []\n").unwrap().len(), 0);
    }

    fn entry_strategy() -> impl Strategy<Value = KeyEntry> {
        let text = "[ -~]{0,12}";
        (
            "[A-Za-z0-9]{1,8}",
            text,
            "[a-z0-9:]{1,10}",
            "[a-z-]{1,6}",
            proptest::option::of(proptest::collection::vec(
                "[a-z*/]{1,5}:(read|write|\\*)",
                0..3,
            )),
            proptest::option::of(text),
            any::<bool>(),
            proptest::option::of("20[0-9]{2}-0[1-9]-1[0-9]T00:00:00Z"),
        )
            .prop_map(
                |(id, prefix, hash, principal, scopes, purpose, active, created)| KeyEntry {
                    id,
                    prefix,
                    hash,
                    principal,
                    scopes,
                    purpose,
                    active,
                    created: created.clone(),
                    expires: created,
                },
            )
    }

    proptest! {
        #[test]
        fn any_text_is_read_or_handed_on_never_a_panic(
            lines in proptest::collection::vec(
                prop_oneof![
                    Just("version: 1".to_string()),
                    Just("keys:".to_string()),
                    Just("  - id: a".to_string()),
                    Just("    scopes:".to_string()),
                    Just("      - x:read".to_string()),
                    "[ -~]{0,30}",
                    "( |-|:|#|'|\"|\\[|\\]|,|a){0,12}",
                ],
                0..12,
            )
        ) {
            let text = lines.join("\n");
            let _ = read_entries(text.as_bytes(), &mut |_, _| {});
        }

        #[test]
        fn render_then_read_round_trips_and_agrees_with_serde(entries in proptest::collection::vec(entry_strategy(), 0..6)) {
            let file = KeysFile { version: 1, keys: entries };
            let text = render(&file);
            let fast: Vec<KeyEntry> = read(&text).unwrap().into_iter().map(|(e, _)| e).collect();
            prop_assert_eq!(&fast, &file.keys);
            let general: KeysFile = serde_yaml::from_str(&text).unwrap();
            prop_assert_eq!(&general.keys, &file.keys);
            let from_serde = serde_yaml::to_string(&file).unwrap();
            let fast: Vec<KeyEntry> = read(&from_serde).unwrap().into_iter().map(|(e, _)| e).collect();
            prop_assert_eq!(&fast, &file.keys);
        }
    }
}
