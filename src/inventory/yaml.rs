//! YAML read as Ansible reads it: YAML 1.1 scalar typing, the way PyYAML's resolver
//! and safe constructor type plain scalars (`yes`/`on` booleans, `0644` octal,
//! `12:30` sexagesimal, dates), with anchors, aliases and `<<` merge keys.
//!
//! It owns turning YAML text into a tree of JSON scalars, lists and mappings, and
//! the positions of syntax errors. It must not know what an inventory is: groups,
//! hosts and vars belong to the Ansible loader.
//!
//! The parser (saphyr-parser) reports each scalar's style and tag, so typing applies
//! to untagged plain scalars only; quoted and block scalars are always strings.
//! Regexes and constructors follow PyYAML's `resolver.py` and `constructor.py`.

use std::collections::HashMap;
use std::sync::LazyLock;

use regex::Regex;
use saphyr_parser::{Event, Parser, ScalarStyle, ScanError, Span, Tag};
use serde_json::{Number, Value};

/// A loaded YAML node. Mappings keep their first-seen key order; a repeated key
/// keeps its first position and its last value, as a Python dict does.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Yaml {
    Scalar(Value),
    Seq(Vec<Yaml>),
    Map(Vec<(Yaml, Yaml)>),
}

impl Yaml {
    /// The tree of a JSON document, which needs no typing.
    pub(crate) fn from_json(json: Value) -> Yaml {
        match json {
            Value::Array(items) => Yaml::Seq(items.into_iter().map(Yaml::from_json).collect()),
            Value::Object(map) => Yaml::Map(
                map.into_iter()
                    .map(|(k, v)| (Yaml::Scalar(Value::String(k)), Yaml::from_json(v)))
                    .collect(),
            ),
            scalar => Yaml::Scalar(scalar),
        }
    }
}

/// A syntax or typing error at a position (line and column from 1).
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct YamlError {
    pub line: usize,
    pub column: usize,
    pub message: String,
}

/// Deeper nesting than this is not an inventory; refusing it keeps recursion bounded.
const MAX_DEPTH: usize = 256;
/// Nodes copied by aliases: stops alias bombs. Nodes written out in the text are
/// not counted against it (the file's size bounds them), so a 200,000-host
/// inventory with vars on every host reads, and a few lines of aliases do not.
const MAX_NODES: usize = 1_000_000;

fn re(pattern: &str) -> Regex {
    // The patterns are constants checked by the unit tests.
    #[allow(clippy::expect_used)]
    Regex::new(pattern).expect("constant YAML 1.1 regex")
}

// PyYAML's implicit resolvers, written without verbose mode (the `regex` crate's
// `x` flag would also drop the spaces inside `[ \t]`).
static BOOL: LazyLock<Regex> = LazyLock::new(|| {
    re(r"^(?:yes|Yes|YES|no|No|NO|true|True|TRUE|false|False|FALSE|on|On|ON|off|Off|OFF)$")
});
static FLOAT: LazyLock<Regex> = LazyLock::new(|| {
    re(concat!(
        r"^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+][0-9]+)?",
        r"|\.[0-9][0-9_]*(?:[eE][-+][0-9]+)?",
        r"|[-+]?[0-9][0-9_]*(?::[0-5]?[0-9])+\.[0-9_]*",
        r"|[-+]?\.(?:inf|Inf|INF)",
        r"|\.(?:nan|NaN|NAN))$"
    ))
});
static INT: LazyLock<Regex> = LazyLock::new(|| {
    re(concat!(
        r"^(?:[-+]?0b[0-1_]+",
        r"|[-+]?0[0-7_]+",
        r"|[-+]?(?:0|[1-9][0-9_]*)",
        r"|[-+]?0x[0-9a-fA-F_]+",
        r"|[-+]?[1-9][0-9_]*(?::[0-5]?[0-9])+)$"
    ))
});
static NULL: LazyLock<Regex> = LazyLock::new(|| re(r"^(?:~|null|Null|NULL|)$"));
static TIMESTAMP: LazyLock<Regex> = LazyLock::new(|| {
    re(concat!(
        r"^(?:[0-9][0-9][0-9][0-9]-[0-9][0-9]-[0-9][0-9]",
        r"|[0-9][0-9][0-9][0-9]-[0-9][0-9]?-[0-9][0-9]?",
        r"(?:[Tt]|[ \t]+)[0-9][0-9]?:[0-9][0-9]:[0-9][0-9](?:\.[0-9]*)?",
        r"(?:[ \t]*(?:Z|[-+][0-9][0-9]?(?::[0-9][0-9])?))?)$"
    ))
});
/// The constructor's regex, with the parts it reads.
static TIMESTAMP_PARTS: LazyLock<Regex> = LazyLock::new(|| {
    re(concat!(
        r"^(?P<year>[0-9][0-9][0-9][0-9])-(?P<month>[0-9][0-9]?)-(?P<day>[0-9][0-9]?)",
        r"(?:(?:[Tt]|[ \t]+)(?P<hour>[0-9][0-9]?):(?P<minute>[0-9][0-9]):(?P<second>[0-9][0-9])",
        r"(?:\.(?P<fraction>[0-9]*))?",
        r"(?:[ \t]*(?P<tz>Z|(?P<tz_sign>[-+])(?P<tz_hour>[0-9][0-9]?)(?::(?P<tz_minute>[0-9][0-9]))?))?)?$"
    ))
});

/// Reads a single-document YAML text; an empty stream is `null`. Beside the tree
/// come warnings: keys repeated in one mapping, where the last value wins.
pub(crate) fn parse(text: &str) -> Result<(Yaml, Vec<YamlError>), YamlError> {
    let mut loader = Loader {
        parser: Parser::new_from_str(text),
        anchors: HashMap::new(),
        nodes: 0,
        copied: 0,
        last: None,
        warnings: Vec::new(),
    };
    let doc = loader.stream()?;
    Ok((doc, loader.warnings))
}

struct Loader<'a> {
    parser: Parser<'a, saphyr_parser::StrInput<'a>>,
    /// Anchor id to the node and the number of nodes it holds.
    anchors: HashMap<usize, (Yaml, usize)>,
    /// Every node built so far, aliases' copies included: anchors' sizes.
    nodes: usize,
    /// The nodes aliases copied, the measure of an alias bomb.
    copied: usize,
    last: Option<Span>,
    warnings: Vec<YamlError>,
}

fn at(span: &Span, message: impl Into<String>) -> YamlError {
    YamlError {
        line: span.start.line(),
        column: span.start.col() + 1,
        message: message.into(),
    }
}

fn scan_error(e: &ScanError) -> YamlError {
    YamlError {
        line: e.marker().line(),
        column: e.marker().col() + 1,
        message: e.info().to_string(),
    }
}

impl<'a> Loader<'a> {
    fn next(&mut self) -> Result<(Event<'a>, Span), YamlError> {
        match self.parser.next_event() {
            Some(Ok((event, span))) => {
                self.last = Some(span);
                Ok((event, span))
            }
            Some(Err(e)) => Err(scan_error(&e)),
            None => Err(YamlError {
                line: self.last.map_or(1, |s| s.end.line()),
                column: self.last.map_or(1, |s| s.end.col() + 1),
                message: "the YAML ends in the middle of a node".into(),
            }),
        }
    }

    fn stream(&mut self) -> Result<Yaml, YamlError> {
        let mut doc = None;
        loop {
            let (event, span) = self.next()?;
            match event {
                Event::StreamStart | Event::DocumentEnd | Event::Nothing => {}
                Event::StreamEnd => return Ok(doc.unwrap_or(Yaml::Scalar(Value::Null))),
                Event::DocumentStart(_) if doc.is_some() => {
                    return Err(at(
                        &span,
                        "expected a single document in the stream, found another one; \
                         an inventory is one YAML document",
                    ))
                }
                Event::DocumentStart(_) => {
                    let (event, span) = self.next()?;
                    doc = Some(self.node(event, span, 0)?);
                }
                _ => return Err(at(&span, "unexpected YAML event outside a document")),
            }
        }
    }

    fn count(&mut self, n: usize) {
        self.nodes = self.nodes.saturating_add(n);
    }

    fn copy(&mut self, n: usize, span: &Span) -> Result<(), YamlError> {
        self.count(n);
        self.copied = self.copied.saturating_add(n);
        if self.copied > MAX_NODES {
            return Err(at(
                span,
                format!(
                    "the YAML expands to more than {MAX_NODES} values (aliases repeat their \
                     anchor's content); an inventory this large is likely an alias bomb"
                ),
            ));
        }
        Ok(())
    }

    fn node(&mut self, event: Event<'a>, span: Span, depth: usize) -> Result<Yaml, YamlError> {
        if depth > MAX_DEPTH {
            return Err(at(
                &span,
                format!("the YAML nests deeper than {MAX_DEPTH} levels"),
            ));
        }
        let before = self.nodes;
        let (node, anchor) = match event {
            Event::Alias(id) => {
                let Some((node, size)) = self.anchors.get(&id).cloned() else {
                    return Err(at(
                        &span,
                        "this alias refers to the node that contains it; recursive aliases \
                         cannot be read",
                    ));
                };
                self.copy(size, &span)?;
                return Ok(node);
            }
            Event::Scalar(value, style, anchor, tag) => {
                self.count(1);
                let node = scalar(&value, style, tag.as_deref()).map_err(|m| at(&span, m))?;
                (Yaml::Scalar(node), anchor)
            }
            Event::SequenceStart(anchor, _) => {
                self.count(1);
                let mut items = Vec::new();
                loop {
                    let (event, span) = self.next()?;
                    if event == Event::SequenceEnd {
                        break;
                    }
                    items.push(self.node(event, span, depth + 1)?);
                }
                (Yaml::Seq(items), anchor)
            }
            Event::MappingStart(anchor, _) => {
                self.count(1);
                (self.mapping(depth)?, anchor)
            }
            _ => return Err(at(&span, "unexpected YAML event where a node was expected")),
        };
        if anchor != 0 {
            let size = self.nodes - before;
            self.anchors.insert(anchor, (node.clone(), size));
        }
        Ok(node)
    }

    /// A mapping with its `<<` merge keys applied as PyYAML's `flatten_mapping` does:
    /// merged entries come first, so the mapping's own keys win.
    fn mapping(&mut self, depth: usize) -> Result<Yaml, YamlError> {
        let mut merged: Vec<(Yaml, Yaml)> = Vec::new();
        let mut own: Vec<(Yaml, Yaml, Span)> = Vec::new();
        loop {
            let (event, span) = self.next()?;
            if event == Event::MappingEnd {
                break;
            }
            let is_merge = matches!(
                &event,
                Event::Scalar(v, ScalarStyle::Plain, _, None) if v == "<<"
            );
            let key = self.node(event, span, depth + 1)?;
            if !matches!(key, Yaml::Scalar(_)) {
                return Err(at(
                    &span,
                    "a mapping key is a list or mapping, which Ansible cannot read; \
                     use a plain value as the key",
                ));
            }
            let (event, value_span) = self.next()?;
            let value = self.node(event, value_span, depth + 1)?;
            if !is_merge {
                own.push((key, value, span));
                continue;
            }
            match value {
                Yaml::Map(entries) => merged.extend(entries),
                Yaml::Seq(items) => {
                    let mut maps = Vec::new();
                    for item in items {
                        let Yaml::Map(entries) = item else {
                            return Err(at(
                                &value_span,
                                "a `<<` merge key takes a mapping or a list of mappings",
                            ));
                        };
                        maps.push(entries);
                    }
                    // Earlier mappings in the list win, so they go last.
                    for entries in maps.into_iter().rev() {
                        merged.extend(entries);
                    }
                }
                Yaml::Scalar(_) => {
                    return Err(at(
                        &value_span,
                        "a `<<` merge key takes a mapping or a list of mappings",
                    ))
                }
            }
        }
        let mut out: Vec<(Yaml, Yaml)> = Vec::with_capacity(merged.len() + own.len());
        // Key text to its slot, and whether the mapping itself wrote it (a key
        // overriding a merged one is what merging is for; a key written twice is a slip).
        let mut index: HashMap<String, (usize, bool)> = HashMap::new();
        let entries = merged
            .into_iter()
            .map(|(k, v)| (k, v, None))
            .chain(own.into_iter().map(|(k, v, s)| (k, v, Some(s))));
        for (key, value, span) in entries {
            let text = match &key {
                Yaml::Scalar(k) => k.to_string(),
                other => format!("{other:?}"),
            };
            match index.get_mut(&text) {
                Some((i, written)) => {
                    if let (Some(span), true) = (span, *written) {
                        self.warnings.push(at(
                            &span,
                            format!("key {text} appears twice in one mapping; the last value is used, as Ansible does"),
                        ));
                    }
                    *written |= span.is_some();
                    out[*i].1 = value;
                }
                None => {
                    index.insert(text, (out.len(), span.is_some()));
                    out.push((key, value));
                }
            }
        }
        Ok(Yaml::Map(out))
    }
}

/// Types one scalar: explicit core tags first, then YAML 1.1 resolution for
/// untagged plain scalars; everything else is a string.
fn scalar(value: &str, style: ScalarStyle, tag: Option<&Tag>) -> Result<Value, String> {
    if let Some(tag) = tag {
        if tag.is_yaml_core_schema() {
            return match tag.suffix.as_str() {
                "str" => Ok(Value::String(value.to_string())),
                "int" => int(value),
                "float" => float(value),
                "bool" => match value.to_lowercase().as_str() {
                    "yes" | "true" | "on" => Ok(Value::Bool(true)),
                    "no" | "false" | "off" => Ok(Value::Bool(false)),
                    _ => Err(format!("`{value}` is tagged !!bool but is not a boolean")),
                },
                "null" => Ok(Value::Null),
                "timestamp" => timestamp(value),
                other => Err(format!(
                    "the tag !!{other} on a scalar cannot be read; remove it or quote the value"
                )),
            };
        }
        if tag.handle == "!" && tag.suffix.is_empty() {
            return Ok(Value::String(value.to_string()));
        }
        // Other local tags (Ansible's `!unsafe`, `!vault`) keep the value's own typing.
    }
    if style != ScalarStyle::Plain {
        return Ok(Value::String(value.to_string()));
    }
    resolve_plain(value)
}

/// PyYAML's implicit resolution of a plain scalar.
fn resolve_plain(value: &str) -> Result<Value, String> {
    if NULL.is_match(value) {
        Ok(Value::Null)
    } else if BOOL.is_match(value) {
        Ok(Value::Bool(matches!(
            value.to_lowercase().as_str(),
            "yes" | "true" | "on"
        )))
    } else if INT.is_match(value) {
        int(value)
    } else if FLOAT.is_match(value) {
        float(value)
    } else if TIMESTAMP.is_match(value) {
        timestamp(value)
    } else if value == "=" {
        Err("a plain `=` is YAML 1.1's value key, which Ansible cannot read; quote it".into())
    } else {
        Ok(Value::String(value.to_string()))
    }
}

fn split_sign(value: &str) -> (bool, &str) {
    match value.as_bytes().first() {
        Some(b'-') => (true, &value[1..]),
        Some(b'+') => (false, &value[1..]),
        _ => (false, value),
    }
}

/// Digits in a radix, exact while they fit in 128 bits, then as a float the way a
/// JSON reader sees Python's big integers.
enum Magnitude {
    Exact(u128),
    Huge(f64),
}

fn digits(text: &str, radix: u32) -> Option<Magnitude> {
    if text.is_empty() {
        return None;
    }
    let mut exact: Option<u128> = Some(0);
    let mut approx = 0f64;
    for c in text.chars() {
        let d = c.to_digit(radix)?;
        approx = approx * f64::from(radix) + f64::from(d);
        exact = exact
            .and_then(|e| e.checked_mul(u128::from(radix)))
            .and_then(|e| e.checked_add(u128::from(d)));
    }
    Some(exact.map_or(Magnitude::Huge(approx), Magnitude::Exact))
}

fn signed(negative: bool, m: Magnitude) -> Value {
    match m {
        Magnitude::Exact(u) => {
            if negative {
                if let Ok(i) = i64::try_from(u) {
                    return Value::from(-i);
                }
                if u == 1u128 << 63 {
                    return Value::from(i64::MIN);
                }
            } else if let Ok(v) = u64::try_from(u) {
                return Value::from(v);
            }
            #[allow(clippy::cast_precision_loss)]
            let f = u as f64;
            float_value(if negative { -f } else { f })
        }
        Magnitude::Huge(f) => float_value(if negative { -f } else { f }),
    }
}

/// PyYAML's `construct_yaml_int`.
fn int(value: &str) -> Result<Value, String> {
    let bad = || format!("`{value}` is not an integer");
    let cleaned = value.replace('_', "");
    let (negative, body) = split_sign(&cleaned);
    if body == "0" {
        return Ok(Value::from(0));
    }
    let magnitude = if let Some(bin) = body.strip_prefix("0b") {
        digits(bin, 2)
    } else if let Some(hex) = body.strip_prefix("0x") {
        digits(hex, 16)
    } else if body.starts_with('0') {
        digits(body, 8)
    } else if body.contains(':') {
        let mut total = Magnitude::Exact(0);
        for part in body.split(':') {
            let d = digits(part, 10).ok_or_else(bad)?;
            total = match (total, d) {
                (Magnitude::Exact(t), Magnitude::Exact(d)) => t
                    .checked_mul(60)
                    .and_then(|t| t.checked_add(d))
                    .map_or_else(
                        || {
                            #[allow(clippy::cast_precision_loss)]
                            Magnitude::Huge(t as f64 * 60.0 + d as f64)
                        },
                        Magnitude::Exact,
                    ),
                (t, d) => Magnitude::Huge(as_f64(&t) * 60.0 + as_f64(&d)),
            };
        }
        Some(total)
    } else {
        digits(body, 10)
    };
    Ok(signed(negative, magnitude.ok_or_else(bad)?))
}

fn as_f64(m: &Magnitude) -> f64 {
    match m {
        #[allow(clippy::cast_precision_loss)]
        Magnitude::Exact(u) => *u as f64,
        Magnitude::Huge(f) => *f,
    }
}

/// PyYAML's `construct_yaml_float`.
fn float(value: &str) -> Result<Value, String> {
    let bad = || format!("`{value}` is not a number");
    let cleaned = value.replace('_', "").to_lowercase();
    let (negative, body) = split_sign(&cleaned);
    let sign = if negative { -1.0 } else { 1.0 };
    let parsed = if body == ".inf" {
        f64::INFINITY
    } else if body == ".nan" {
        return Ok(float_value(f64::NAN));
    } else if body.contains(':') {
        // Summed from the last part up, in the order Python adds them.
        let mut total = 0.0;
        let mut base = 1.0;
        for part in body.rsplit(':') {
            total += python_float(part).ok_or_else(bad)? * base;
            base *= 60.0;
        }
        total
    } else {
        python_float(body).ok_or_else(bad)?
    };
    Ok(float_value(sign * parsed))
}

/// Python's `float()` on text without sign or underscores.
fn python_float(text: &str) -> Option<f64> {
    if text.is_empty() || text.starts_with(['+', '-']) {
        return None;
    }
    text.parse().ok()
}

/// A float as JSON. JSON has no infinities or NaN: they become the strings
/// Python's `json` module prints for them (`Infinity`, `-Infinity`, `NaN`).
fn float_value(f: f64) -> Value {
    match Number::from_f64(f) {
        Some(n) => Value::Number(n),
        None if f.is_nan() => Value::String("NaN".into()),
        None if f > 0.0 => Value::String("Infinity".into()),
        None => Value::String("-Infinity".into()),
    }
}

/// PyYAML's `construct_yaml_timestamp`, printed as Ansible's JSON prints Python's
/// `date` and `datetime` (`isoformat()`).
fn timestamp(value: &str) -> Result<Value, String> {
    let bad =
        |why: &str| format!("`{value}` is read as a date but {why}; quote it to keep it text");
    let caps = TIMESTAMP_PARTS
        .captures(value)
        .ok_or_else(|| bad("is not one"))?;
    let num = |name: &str| -> u32 {
        caps.name(name)
            .and_then(|m| m.as_str().parse().ok())
            .unwrap_or(0)
    };
    let (year, month, day) = (num("year"), num("month"), num("day"));
    let date = i32::try_from(year)
        .ok()
        .filter(|&y| y >= 1)
        .and_then(|y| chrono::NaiveDate::from_ymd_opt(y, month, day))
        .ok_or_else(|| bad("the day does not exist"))?;
    let date_text = date.format("%Y-%m-%d").to_string();
    if caps.name("hour").is_none() {
        return Ok(Value::String(date_text));
    }
    let (hour, minute, second) = (num("hour"), num("minute"), num("second"));
    if hour > 23 || minute > 59 || second > 59 {
        return Err(bad("the time does not exist"));
    }
    let mut out = format!("{date_text}T{hour:02}:{minute:02}:{second:02}");
    if let Some(fraction) = caps.name("fraction").map(|m| m.as_str()) {
        let mut micros: String = fraction.chars().take(6).collect();
        while !micros.is_empty() && micros.len() < 6 {
            micros.push('0');
        }
        if !micros.is_empty() && micros != "000000" {
            out.push('.');
            out.push_str(&micros);
        }
    }
    if caps.name("tz_sign").is_some() {
        let (tz_hour, tz_minute) = (num("tz_hour"), num("tz_minute"));
        let total = tz_hour * 60 + tz_minute;
        if total >= 24 * 60 {
            return Err(bad("the time zone offset is a day or more"));
        }
        let sign = match caps.name("tz_sign").map(|m| m.as_str()) {
            Some("-") if total > 0 => '-',
            _ => '+',
        };
        out.push_str(&format!("{sign}{:02}:{:02}", total / 60, total % 60));
    } else if caps.name("tz").is_some() {
        out.push_str("+00:00");
    }
    Ok(Value::String(out))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn one(text: &str) -> Value {
        match parse(&format!("v: {text}\n")).unwrap().0 {
            Yaml::Map(mut m) => match m.remove(0).1 {
                Yaml::Scalar(v) => v,
                other => panic!("{other:?}"),
            },
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn plain_scalars_are_typed_as_pyyaml_types_them() {
        for (text, want) in [
            ("yes", json!(true)),
            ("No", json!(false)),
            ("OFF", json!(false)),
            ("y", json!("y")),
            ("0644", json!(420)),
            ("0x1F", json!(31)),
            ("-0b101", json!(-5)),
            ("1_000", json!(1000)),
            ("12:30", json!(750)),
            ("1e3", json!("1e3")),
            ("1.0e3", json!("1.0e3")),
            ("1.0e+3", json!(1000.0)),
            ("1.", json!(1.0)),
            (".5", json!(0.5)),
            ("190:20:30.15", json!(685_230.15)),
            (".inf", json!("Infinity")),
            ("-.Inf", json!("-Infinity")),
            (".NaN", json!("NaN")),
            ("~", json!(null)),
            ("", json!(null)),
            ("09", json!("09")),
            ("2001-12-14", json!("2001-12-14")),
            (
                "2001-12-14t21:59:43.10-05:00",
                json!("2001-12-14T21:59:43.100000-05:00"),
            ),
            (
                "2001-12-15T02:59:43.1Z",
                json!("2001-12-15T02:59:43.100000+00:00"),
            ),
            ("2001-1-2 3:04:05", json!("2001-01-02T03:04:05")),
            ("0999-01-02", json!("0999-01-02")),
            ("2001-12-14 21:59:43 -0", json!("2001-12-14T21:59:43+00:00")),
            ("'0644'", json!("0644")),
            ("!!str 0644", json!("0644")),
            ("!!int \"0x1F\"", json!(31)),
            ("9223372036854775808", json!(9_223_372_036_854_775_808u64)),
            ("-9223372036854775808", json!(i64::MIN)),
        ] {
            assert_eq!(one(text), want, "{text}");
        }
    }

    #[test]
    fn merge_keys_aliases_and_repeated_keys() {
        let doc = "a: &base {x: 1, y: 2}\nb:\n  <<: *base\n  y: 3\n  y: 4\n";
        let (Yaml::Map(top), warnings) = parse(doc).unwrap() else {
            panic!()
        };
        assert_eq!(warnings.len(), 1, "{warnings:?}");
        assert_eq!((warnings[0].line, warnings[0].column), (5, 3));
        assert!(warnings[0].message.contains("\"y\" appears twice"));
        let s = |v: Value| Yaml::Scalar(v);
        assert_eq!(
            top[1].1,
            Yaml::Map(vec![
                (s(json!("x")), s(json!(1))),
                (s(json!("y")), s(json!(4)))
            ])
        );
    }

    #[test]
    fn errors_name_line_and_column() {
        let e = parse("a:\n  b: 1\n c: 2\n").unwrap_err();
        assert_eq!(e.line, 3, "{e:?}");
        assert!(parse("a: =\n").unwrap_err().message.contains("quote it"));
        assert!(parse("a: 2001-02-30\n")
            .unwrap_err()
            .message
            .contains("date"));
        assert!(parse("a: 1\n---\nb: 2\n")
            .unwrap_err()
            .message
            .contains("single"));
    }

    #[test]
    fn alias_bombs_are_refused() {
        let mut doc = String::from("a0: &a0 [x, x, x, x, x, x, x, x, x, x]\n");
        for i in 1..8 {
            let p = i - 1;
            doc.push_str(&format!(
                "a{i}: &a{i} [*a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}]\n"
            ));
        }
        assert!(parse(&doc).unwrap_err().message.contains("alias bomb"));
    }

    #[test]
    fn large_documents_written_out_are_not_alias_bombs() {
        // A 200,000-host inventory with a few vars per host holds more than a
        // million nodes, every one of them in the text.
        let n = MAX_NODES + 1;
        let doc = format!("a: [{}]\n", "0,".repeat(n));
        let (Yaml::Map(top), _) = parse(&doc).unwrap() else {
            panic!("not a mapping");
        };
        assert!(matches!(&top[0].1, Yaml::Seq(items) if items.len() == n));
    }
}
