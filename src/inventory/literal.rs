//! The two pieces of Python that decide what an Ansible INI line means: `shlex.split`
//! (POSIX mode, `#` comments) for host lines, and `ast.literal_eval` for values, so
//! that `a=1` is the number 1, `b=yes` the string "yes" and `c="x"` the string "x",
//! exactly as `ansible-inventory` types them. It must not know inventory structure.

use serde_json::{Map, Number, Value};

/// `shlex.split(line, comments=True)` in POSIX mode.
pub fn shlex_split(line: &str) -> Result<Vec<String>, String> {
    // Most host lines have nothing to unquote, escape or cut off: their words are
    // what whitespace separates, as the state machine below would find them.
    if !line.contains(['"', '\'', '\\', '#']) {
        return Ok(line
            .split(|c: char| c.is_ascii_whitespace())
            .filter(|w| !w.is_empty())
            .map(str::to_string)
            .collect());
    }
    shlex_split_posix(line)
}

/// The whole of `shlex.split` in POSIX mode, quotes, escapes and comments.
fn shlex_split_posix(line: &str) -> Result<Vec<String>, String> {
    #[derive(PartialEq, Clone, Copy)]
    enum State {
        Space,
        Word,
        Quote(char),
        Escape(EscFrom),
    }
    #[derive(PartialEq, Clone, Copy)]
    enum EscFrom {
        Word,
        Double,
    }
    let mut out = Vec::new();
    let mut token = String::new();
    let mut quoted = false;
    let mut state = State::Space;
    for c in line.chars() {
        match state {
            State::Space => {
                if c.is_ascii_whitespace() {
                    continue;
                }
                match c {
                    '#' => break,
                    '\\' => state = State::Escape(EscFrom::Word),
                    '"' | '\'' => {
                        quoted = true;
                        state = State::Quote(c);
                    }
                    _ => {
                        token.push(c);
                        state = State::Word;
                    }
                }
            }
            State::Word => {
                if c.is_ascii_whitespace() {
                    out.push(std::mem::take(&mut token));
                    quoted = false;
                    state = State::Space;
                    continue;
                }
                match c {
                    '#' => {
                        state = State::Space;
                        break;
                    }
                    '"' | '\'' => {
                        quoted = true;
                        state = State::Quote(c);
                    }
                    '\\' => state = State::Escape(EscFrom::Word),
                    _ => token.push(c),
                }
            }
            State::Quote(q) => {
                if c == q {
                    state = State::Word;
                } else if c == '\\' && q == '"' {
                    state = State::Escape(EscFrom::Double);
                } else {
                    token.push(c);
                }
            }
            State::Escape(from) => {
                if from == EscFrom::Double && c != '"' && c != '\\' {
                    token.push('\\');
                }
                token.push(c);
                state = match from {
                    EscFrom::Word => State::Word,
                    EscFrom::Double => State::Quote('"'),
                };
            }
        }
    }
    match state {
        State::Quote(_) => return Err("No closing quotation".into()),
        State::Escape(_) => return Err("No escaped character".into()),
        State::Word => out.push(token),
        State::Space => {
            if quoted || !token.is_empty() {
                out.push(token);
            }
        }
    }
    Ok(out)
}

/// `ast.literal_eval` as the INI plugin applies it: a Python literal becomes its
/// value (tuples and sets as lists, bytes as text); anything else stays the
/// original text. `None` means "not a literal, keep the text".
pub fn literal_eval(text: &str) -> Option<Value> {
    let trimmed = text.trim_start_matches([' ', '\t']);
    let mut p = Parser {
        s: trimmed.as_bytes(),
        src: trimmed,
        i: 0,
    };
    let v = p.expr().ok()?;
    p.skip_ws();
    if p.i != p.s.len() {
        return None;
    }
    Some(v.into_json())
}

/// Runs `literal_eval` and falls back to the text, as the INI plugin does.
pub fn ini_value(text: &str) -> Value {
    literal_eval(text).unwrap_or_else(|| Value::String(text.to_string()))
}

enum Lit {
    Int(i128),
    Float(f64),
    Str(String),
    Bytes(Vec<u8>),
    Bool(bool),
    None,
    Ellipsis,
    List(Vec<Lit>),
    Dict(Vec<(Lit, Lit)>),
}

impl Lit {
    fn into_json(self) -> Value {
        match self {
            Lit::Int(i) => i64::try_from(i)
                .map(Value::from)
                .or_else(|_| u64::try_from(i).map(Value::from))
                .unwrap_or_else(|_| Number::from_f64(i as f64).map_or(Value::Null, Value::Number)),
            Lit::Float(f) => Number::from_f64(f)
                .map(Value::Number)
                .unwrap_or_else(|| Value::String(f.to_string())),
            Lit::Str(s) => Value::String(s),
            Lit::Bytes(b) => Value::String(String::from_utf8_lossy(&b).into_owned()),
            Lit::Bool(b) => Value::Bool(b),
            Lit::None => Value::Null,
            Lit::Ellipsis => Value::String("...".into()),
            Lit::List(items) => Value::Array(items.into_iter().map(Lit::into_json).collect()),
            Lit::Dict(items) => {
                let mut m = Map::new();
                for (k, v) in items {
                    let key = match k.into_json() {
                        Value::String(s) => s,
                        Value::Null => "null".into(),
                        other => other.to_string(),
                    };
                    m.insert(key, v.into_json());
                }
                Value::Object(m)
            }
        }
    }
}

struct Parser<'a> {
    s: &'a [u8],
    src: &'a str,
    i: usize,
}

type R<T> = Result<T, ()>;

impl Parser<'_> {
    fn skip_ws(&mut self) {
        while self.i < self.s.len() {
            match self.s[self.i] {
                b' ' | b'\t' | b'\x0c' => self.i += 1,
                b'#' => self.i = self.s.len(),
                _ => break,
            }
        }
    }

    fn peek(&mut self) -> Option<u8> {
        self.skip_ws();
        self.s.get(self.i).copied()
    }

    fn eat(&mut self, c: u8) -> bool {
        if self.peek() == Some(c) {
            self.i += 1;
            true
        } else {
            false
        }
    }

    fn expr(&mut self) -> R<Lit> {
        match self.peek().ok_or(())? {
            b'-' | b'+' => {
                let neg = self.s[self.i] == b'-';
                self.i += 1;
                self.skip_ws();
                match self.number()? {
                    Lit::Int(i) if neg => Ok(Lit::Int(-i)),
                    Lit::Float(f) if neg => Ok(Lit::Float(-f)),
                    n => Ok(n),
                }
            }
            b'0'..=b'9' => self.number(),
            b'.' if self.s.get(self.i + 1).is_some_and(u8::is_ascii_digit) => self.number(),
            b'.' => {
                if self.src[self.i..].starts_with("...") {
                    self.i += 3;
                    Ok(Lit::Ellipsis)
                } else {
                    Err(())
                }
            }
            b'[' => {
                self.i += 1;
                Ok(Lit::List(self.items(b']')?))
            }
            b'(' => {
                self.i += 1;
                if self.eat(b')') {
                    return Ok(Lit::List(Vec::new()));
                }
                let first = self.expr()?;
                if self.eat(b')') {
                    return Ok(first);
                }
                if !self.eat(b',') {
                    return Err(());
                }
                let mut items = vec![first];
                items.extend(self.items(b')')?);
                Ok(Lit::List(items))
            }
            b'{' => {
                self.i += 1;
                if self.eat(b'}') {
                    return Ok(Lit::Dict(Vec::new()));
                }
                let first = self.expr()?;
                if self.eat(b':') {
                    let v = self.expr()?;
                    let mut pairs = vec![(first, v)];
                    loop {
                        if self.eat(b'}') {
                            break;
                        }
                        if !self.eat(b',') {
                            return Err(());
                        }
                        if self.eat(b'}') {
                            break;
                        }
                        let k = self.expr()?;
                        if !self.eat(b':') {
                            return Err(());
                        }
                        pairs.push((k, self.expr()?));
                    }
                    Ok(Lit::Dict(pairs))
                } else {
                    let mut items = vec![first];
                    if !self.eat(b'}') {
                        if !self.eat(b',') {
                            return Err(());
                        }
                        items.extend(self.items(b'}')?);
                    }
                    Ok(Lit::List(items))
                }
            }
            c if c == b'"' || c == b'\'' || c.is_ascii_alphabetic() || c == b'_' => {
                self.word_or_string()
            }
            _ => Err(()),
        }
    }

    /// Comma-separated items up to `close`, trailing comma allowed.
    fn items(&mut self, close: u8) -> R<Vec<Lit>> {
        let mut items = Vec::new();
        loop {
            if self.eat(close) {
                return Ok(items);
            }
            items.push(self.expr()?);
            if self.eat(close) {
                return Ok(items);
            }
            if !self.eat(b',') {
                return Err(());
            }
        }
    }

    fn word_or_string(&mut self) -> R<Lit> {
        let start = self.i;
        while self.i < self.s.len()
            && (self.s[self.i].is_ascii_alphanumeric() || self.s[self.i] == b'_')
        {
            self.i += 1;
        }
        let word = &self.src[start..self.i];
        if self.s.get(self.i).is_some_and(|&c| c == b'"' || c == b'\'') {
            let lower = word.to_ascii_lowercase();
            let (raw, bytes) = match lower.as_str() {
                "" | "u" => (false, false),
                "r" => (true, false),
                "b" => (false, true),
                "rb" | "br" => (true, true),
                _ => return Err(()),
            };
            let first = self.string_body(raw, bytes)?;
            let mut acc = first;
            // Adjacent literals concatenate, but text and bytes never mix.
            loop {
                let save = self.i;
                match self.peek() {
                    Some(c) if c == b'"' || c == b'\'' || c.is_ascii_alphabetic() => {
                        let next = self.word_or_string();
                        match (&mut acc, next) {
                            (Lit::Str(a), Ok(Lit::Str(b))) => a.push_str(&b),
                            (Lit::Bytes(a), Ok(Lit::Bytes(b))) => a.extend(b),
                            _ => {
                                self.i = save;
                                return Err(());
                            }
                        }
                    }
                    _ => break,
                }
            }
            return Ok(acc);
        }
        match word {
            "True" => Ok(Lit::Bool(true)),
            "False" => Ok(Lit::Bool(false)),
            "None" => Ok(Lit::None),
            "set" => {
                if self.eat(b'(') && self.eat(b')') {
                    Ok(Lit::List(Vec::new()))
                } else {
                    Err(())
                }
            }
            _ => Err(()),
        }
    }

    fn string_body(&mut self, raw: bool, bytes: bool) -> R<Lit> {
        let q = self.s[self.i];
        let triple = self.s[self.i..].starts_with(&[q, q, q]);
        self.i += if triple { 3 } else { 1 };
        let mut out = String::new();
        loop {
            let rest = &self.src[self.i..];
            let c = rest.chars().next().ok_or(())?;
            if c as u32 == q as u32 {
                if !triple {
                    self.i += 1;
                    break;
                }
                if rest.as_bytes().starts_with(&[q, q, q]) {
                    self.i += 3;
                    break;
                }
            }
            if bytes && !c.is_ascii() {
                return Err(());
            }
            if c == '\\' {
                let next = rest[1..].chars().next().ok_or(())?;
                self.i += 1 + next.len_utf8();
                if raw {
                    out.push('\\');
                    out.push(next);
                    continue;
                }
                match next {
                    '\\' => out.push('\\'),
                    '\'' => out.push('\''),
                    '"' => out.push('"'),
                    'n' => out.push('\n'),
                    't' => out.push('\t'),
                    'r' => out.push('\r'),
                    'a' => out.push('\x07'),
                    'b' => out.push('\x08'),
                    'f' => out.push('\x0c'),
                    'v' => out.push('\x0b'),
                    '0'..='7' => {
                        let mut n = next.to_digit(8).unwrap_or(0);
                        for _ in 0..2 {
                            match self.s.get(self.i) {
                                Some(d @ b'0'..=b'7') => {
                                    n = n * 8 + u32::from(d - b'0');
                                    self.i += 1;
                                }
                                _ => break,
                            }
                        }
                        out.push(char::from_u32(n).ok_or(())?);
                    }
                    'x' => out.push(self.hex_escape(2)?),
                    'u' if !bytes => out.push(self.hex_escape(4)?),
                    'U' if !bytes => out.push(self.hex_escape(8)?),
                    _ => {
                        out.push('\\');
                        out.push(next);
                    }
                }
                continue;
            }
            if !triple && (c == '\n' || c == '\r') {
                return Err(());
            }
            out.push(c);
            self.i += c.len_utf8();
        }
        Ok(if bytes {
            // A bytes literal holds one byte per char; anything wider is malformed.
            Lit::Bytes(
                out.chars()
                    .map(|c| u8::try_from(u32::from(c)).map_err(|_| ()))
                    .collect::<Result<_, ()>>()?,
            )
        } else {
            Lit::Str(out)
        })
    }

    fn hex_escape(&mut self, n: usize) -> R<char> {
        let digits = self.src.get(self.i..self.i + n).ok_or(())?;
        if !digits.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(());
        }
        self.i += n;
        char::from_u32(u32::from_str_radix(digits, 16).map_err(|_| ())?).ok_or(())
    }

    /// Python's numeric literal grammar: decimal without leading zeros, 0x/0o/0b,
    /// underscores between digits, floats with `.` or exponent. Complex numbers
    /// are refused, so they stay text.
    fn number(&mut self) -> R<Lit> {
        let start = self.i;
        let s = self.s;
        let digits = |i: &mut usize, ok: fn(u8) -> bool| -> R<()> {
            // One or more digits, single underscores only between digits.
            if !s.get(*i).is_some_and(|&c| ok(c)) {
                return Err(());
            }
            while *i < s.len() {
                if ok(s[*i]) {
                    *i += 1;
                } else if s[*i] == b'_' && s.get(*i + 1).is_some_and(|&c| ok(c)) {
                    *i += 2;
                } else {
                    break;
                }
            }
            Ok(())
        };
        let mut i = self.i;
        if s.get(i) == Some(&b'0') && s.get(i + 1).is_some_and(|c| b"xXoObB".contains(c)) {
            let radix = match s[i + 1] {
                b'x' | b'X' => 16,
                b'o' | b'O' => 8,
                _ => 2,
            };
            i += 2;
            if s.get(i) == Some(&b'_') {
                i += 1;
            }
            let ok: fn(u8) -> bool = match radix {
                16 => |c: u8| c.is_ascii_hexdigit(),
                8 => |c: u8| (b'0'..=b'7').contains(&c),
                _ => |c: u8| c == b'0' || c == b'1',
            };
            let dstart = i;
            digits(&mut i, ok)?;
            if s.get(i)
                .is_some_and(|c| c.is_ascii_alphanumeric() || *c == b'.')
            {
                return Err(());
            }
            let text: String = self.src[dstart..i].chars().filter(|&c| c != '_').collect();
            self.i = i;
            return i128::from_str_radix(&text, radix)
                .map(Lit::Int)
                .map_err(|_| ());
        }
        let mut is_float = false;
        if s.get(i) != Some(&b'.') {
            digits(&mut i, |c| c.is_ascii_digit())?;
        }
        if s.get(i) == Some(&b'.') {
            is_float = true;
            i += 1;
            if s.get(i).is_some_and(u8::is_ascii_digit) {
                digits(&mut i, |c| c.is_ascii_digit())?;
            }
        }
        if s.get(i).is_some_and(|c| *c == b'e' || *c == b'E') {
            is_float = true;
            i += 1;
            if s.get(i).is_some_and(|c| *c == b'+' || *c == b'-') {
                i += 1;
            }
            digits(&mut i, |c| c.is_ascii_digit())?;
        }
        if s.get(i)
            .is_some_and(|c| c.is_ascii_alphanumeric() || *c == b'_' || *c == b'.')
        {
            return Err(());
        }
        let text: String = self.src[start..i].chars().filter(|&c| c != '_').collect();
        self.i = i;
        if is_float {
            return text.parse::<f64>().map(Lit::Float).map_err(|_| ());
        }
        // `010` is a syntax error in Python 3; `000` is zero.
        if text.len() > 1 && text.starts_with('0') && text.bytes().any(|b| b != b'0') {
            return Err(());
        }
        text.parse::<i128>().map(Lit::Int).map_err(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    proptest::proptest! {
        /// The whitespace fast path splits every line it takes as the POSIX
        /// state machine does.
        #[test]
        fn plain_lines_split_as_shlex_does(line in "[a-z0-9=.:\\[\\] \t\x0c_-]{0,60}") {
            proptest::prop_assert_eq!(shlex_split(&line), shlex_split_posix(&line));
        }
    }

    #[test]
    fn values_are_typed_like_literal_eval() {
        assert_eq!(ini_value("1"), json!(1));
        assert_eq!(ini_value("yes"), json!("yes"));
        assert_eq!(ini_value("'x y'"), json!("x y"));
        assert_eq!(ini_value("1.5"), json!(1.5));
        assert_eq!(ini_value("[1, 'a', (2, 3)]"), json!([1, "a", [2, 3]]));
        assert_eq!(
            ini_value("{'k': True, 'n': None}"),
            json!({"k": true, "n": null})
        );
        assert_eq!(ini_value("0x10"), json!(16));
        assert_eq!(ini_value("010"), json!("010"));
        assert_eq!(ini_value("-3"), json!(-3));
        assert_eq!(ini_value("1_000"), json!(1000));
        assert_eq!(ini_value("1 # note"), json!(1));
        assert_eq!(ini_value("'a' 'b'"), json!("ab"));
        assert_eq!(ini_value("true"), json!("true"));
        assert_eq!(ini_value("1e3"), json!(1000.0));
        assert_eq!(ini_value("1.2.3"), json!("1.2.3"));
        assert_eq!(ini_value("10.0.0.1"), json!("10.0.0.1"));
        assert_eq!(ini_value("..."), json!("..."));
    }

    #[test]
    fn shlex_follows_posix_rules() {
        assert_eq!(
            shlex_split(r#"h a="x y" b='q' c=d#e f"#).unwrap(),
            vec!["h", "a=x y", "b=q", "c=d"]
        );
        assert_eq!(shlex_split(r#"a="\"\n""#).unwrap(), vec![r#"a="\n"#]);
        assert!(shlex_split("a='x").is_err());
        assert_eq!(shlex_split("''").unwrap(), vec![""]);
    }
}
