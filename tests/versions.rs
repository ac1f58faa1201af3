//! Agreement of `dpkg_cmp` and `rpm_cmp` with the real tools on generated pairs.
//!
//! A seeded generator produces the hard cases (epochs, `~`, `^`, letters against
//! digits, leading zeros, missing revisions, `+`, `.` and `-` inside the upstream
//! part, equal versions written differently). dpkg is asked through
//! `dpkg --compare-versions` in two batched shells; rpm through one `rpm --eval` Lua
//! chunk that reads every pair from a file and calls `rpm.vercmp`.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test and bench code: a panic is the failure report

use std::cmp::Ordering;
use std::collections::BTreeSet;
use std::path::Path;
use std::process::{Command, Stdio};

use patchbook::primitives::version::{dpkg_cmp, rpm_cmp, valid_deb_version, valid_rpm_version};

const PAIRS: usize = 10_000;

/// xorshift64*: small, seeded, the same sequence on every machine.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: usize) -> usize {
        usize::try_from(self.next() % n as u64).unwrap()
    }
    fn chance(&mut self, percent: usize) -> bool {
        self.below(100) < percent
    }
    fn pick<'a>(&mut self, items: &[&'a str]) -> &'a str {
        items[self.below(items.len())]
    }
}

const DIGITS: &[&str] = &[
    "0", "00", "1", "01", "001", "2", "9", "10", "010", "11", "99", "100", "1000", "20240101",
];
const LETTERS: &[&str] = &[
    "a", "b", "z", "A", "Z", "rc", "alpha", "beta", "pre", "git", "dfsg", "ubuntu", "el", "fc",
];

fn token(r: &mut Rng) -> String {
    match r.below(10) {
        0..=4 => r.pick(DIGITS).to_string(),
        5..=7 => r.pick(LETTERS).to_string(),
        8 => format!("{}{}", r.pick(LETTERS), r.pick(DIGITS)),
        _ => format!("{}{}", r.pick(DIGITS), r.pick(LETTERS)),
    }
}

/// A Debian version inside dpkg's grammar.
fn deb_version(r: &mut Rng) -> String {
    let mut v = String::new();
    if r.chance(30) {
        v.push_str(r.pick(&["0", "1", "2", "00", "01", "10"]));
        v.push(':');
    }
    let has_revision = r.chance(55);
    v.push_str(r.pick(DIGITS));
    for _ in 0..r.below(5) {
        let seps: &[&str] = if has_revision {
            &[".", ".", "+", "~", "~~", "-", ""]
        } else {
            &[".", ".", "+", "~", "~~", ""]
        };
        v.push_str(r.pick(seps));
        v.push_str(&token(r));
    }
    if r.chance(8) {
        v.push_str(r.pick(&["~", ".", "+", "~~"]));
    }
    if has_revision {
        v.push('-');
        match r.below(6) {
            0 => v.push_str(r.pick(DIGITS)),
            1 => v.push_str(r.pick(&["~bpo1", "+b1", "0ubuntu1", "deb12u1", "1.1", "1~"])),
            _ => {
                v.push_str(&token(r));
                for _ in 0..r.below(3) {
                    v.push_str(r.pick(&[".", "+", "~", ""]));
                    v.push_str(&token(r));
                }
            }
        }
    }
    v
}

/// An rpm `[epoch:]version[-release]` inside rpm's grammar.
fn rpm_version(r: &mut Rng) -> String {
    let mut v = String::new();
    if r.chance(30) {
        v.push_str(r.pick(&["0", "1", "2", "00", "01", "10"]));
        v.push(':');
    }
    let part = |r: &mut Rng, v: &mut String| {
        v.push_str(&token(r));
        for _ in 0..r.below(5) {
            v.push_str(r.pick(&[".", ".", "_", "+", "~", "^", "~~", "^^", "", "._"]));
            v.push_str(&token(r));
        }
        if r.chance(8) {
            v.push_str(r.pick(&["~", "^", ".", "+"]));
        }
    };
    part(r, &mut v);
    if r.chance(60) {
        v.push('-');
        part(r, &mut v);
    }
    v
}

/// A near neighbour of `v`: one small edit, so that pairs often share long prefixes
/// and differ only in the rule under test.
fn mutate(r: &mut Rng, v: &str, rpm: bool) -> String {
    let extra = if rpm {
        ["~", "^", ".", "_"]
    } else {
        ["~", "+", ".", "~"]
    };
    match r.below(11) {
        9 => match v.rfind('-') {
            Some(k) => v[..k].to_string(),
            None => format!("{v}-{}", r.pick(&["0", "1", "01", "00"])),
        },
        10 if v.contains('-') => format!("{v}{}{}", r.pick(&extra), token(r)),
        0 => format!("{v}{}{}", r.pick(&extra), token(r)),
        1 => format!("{v}{}", r.pick(&extra)),
        2 if !v.contains(':') => format!("0:{v}"),
        3 if !v.contains(':') => format!("1:{v}"),
        4 => v.replacen('.', ".0", 1),
        5 => v.replacen('~', "", 1),
        6 => {
            // Change the last digit run by one, keeping its width.
            let mut bytes = v.as_bytes().to_vec();
            if let Some(k) = bytes.iter().rposition(u8::is_ascii_digit) {
                bytes[k] = if bytes[k] == b'9' { b'0' } else { bytes[k] + 1 };
            }
            String::from_utf8(bytes).unwrap()
        }
        7 => v.replacen('1', "01", 1),
        _ => {
            // Swap the last letter run for another.
            let mut s = v.to_string();
            if let Some(k) = s.rfind(|c: char| c.is_ascii_alphabetic()) {
                s.replace_range(k..=k, r.pick(&["a", "b", "Z", "rc"]));
            }
            s
        }
    }
}

/// Versions that are equal but written differently, and the classic traps.
const DEB_FIXED: &[(&str, &str)] = &[
    ("1.0", "1.00"),
    ("0:1.0", "1.0"),
    ("1.0-0", "1.0"),
    ("1.0~rc1", "1.0"),
    ("1.0~~", "1.0~"),
    ("1.0~", "1.0"),
    ("1.0a", "1.0+"),
    ("1.0a", "1.0"),
    ("1.0", "1.0.0"),
    ("1.0+dfsg-1", "1.0-1"),
    ("2:0.1", "1:9.9"),
    ("1.01", "1.1"),
    ("1.0-1", "1.0-1~bpo1"),
    ("1-2-3", "1-2"),
    ("1.2.3-4-5", "1.2.3-4.5"),
    ("10", "9"),
    ("000", "0"),
];

const RPM_FIXED: &[(&str, &str)] = &[
    ("1.0", "1.00"),
    ("0:1.0", "1.0"),
    ("1.0-1", "1.0"),
    ("1.0~rc1", "1.0"),
    ("1.0^git1", "1.0"),
    ("1.0^git1", "1.0.1"),
    ("1.0^", "1.0"),
    ("1.0~", "1.0^"),
    ("1.0a", "1.0.1"),
    ("1.0a", "1.0"),
    ("1_0", "1.0"),
    ("1.0.", "1.0"),
    ("1:1.0", "2.0"),
    ("01:1.0", "1:1.0"),
    ("1.01", "1.1"),
    ("a", "1"),
    ("1.0-1.el9", "1.0-1.el9_2"),
];

fn generate(seed: u64, rpm: bool) -> Vec<(String, String)> {
    let mut r = Rng(seed);
    let fixed = if rpm { RPM_FIXED } else { DEB_FIXED };
    let mut pairs: Vec<(String, String)> = fixed
        .iter()
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect();
    let valid = |v: &str| {
        if rpm {
            valid_rpm_version(v)
        } else {
            valid_deb_version(v)
        }
    };
    while pairs.len() < PAIRS + fixed.len() {
        let a = if rpm {
            rpm_version(&mut r)
        } else {
            deb_version(&mut r)
        };
        let b = if r.chance(35) {
            if rpm {
                rpm_version(&mut r)
            } else {
                deb_version(&mut r)
            }
        } else {
            mutate(&mut r, &a, rpm)
        };
        // A mutation can leave the grammar (e.g. a revision-only '-' edit); skip it
        // rather than ask the tool about strings it would reject.
        if valid(&a) && valid(&b) {
            pairs.push((a, b));
        }
    }
    pairs
}

fn sign(o: Ordering) -> i32 {
    match o {
        Ordering::Less => -1,
        Ordering::Equal => 0,
        Ordering::Greater => 1,
    }
}

fn need(tool: &str) {
    let found = Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {tool}"))
        .stdout(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    assert!(found, "`{tool}` is not installed: run .ci/setup as root");
}

fn write_pairs(path: &Path, pairs: &[(String, String)]) {
    let mut text = String::new();
    for (a, b) in pairs {
        assert!(!a.contains(char::is_whitespace) && !b.contains(char::is_whitespace));
        text.push_str(a);
        text.push(' ');
        text.push_str(b);
        text.push('\n');
    }
    std::fs::write(path, text).unwrap();
}

/// Asks dpkg about every pair: two shells, each running `dpkg --compare-versions` on
/// half the pairs, one or two calls per pair.
fn dpkg_verdicts(dir: &Path, pairs: &[(String, String)]) -> Vec<i32> {
    const SCRIPT: &str = r#"
while read -r a b; do
  dpkg --compare-versions "$a" lt "$b"; r=$?
  if [ $r -eq 0 ]; then echo -1
  elif [ $r -ne 1 ]; then echo "error $r"
  else
    dpkg --compare-versions "$a" eq "$b"; r=$?
    if [ $r -eq 0 ]; then echo 0; elif [ $r -eq 1 ]; then echo 1; else echo "error $r"; fi
  fi
done < "$1"
"#;
    let half = pairs.len() / 2;
    let chunks = [&pairs[..half], &pairs[half..]];
    let children: Vec<_> = chunks
        .iter()
        .enumerate()
        .map(|(k, chunk)| {
            let file = dir.join(format!("deb-pairs-{k}"));
            write_pairs(&file, chunk);
            Command::new("sh")
                .arg("-c")
                .arg(SCRIPT)
                .arg("sh")
                .arg(&file)
                .env("LC_ALL", "C")
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .expect("spawn sh")
        })
        .collect();
    let mut verdicts = Vec::with_capacity(pairs.len());
    for child in children {
        let out = child.wait_with_output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success() && stderr.trim().is_empty(),
            "dpkg complained about a generated version (the generator left dpkg's grammar):\n{stderr}"
        );
        for line in String::from_utf8(out.stdout).unwrap().lines() {
            verdicts.push(
                line.parse::<i32>()
                    .unwrap_or_else(|_| panic!("dpkg failed on a pair: {line}")),
            );
        }
    }
    verdicts
}

/// Asks rpm about every pair in one process: one Lua chunk reads the pair file and
/// writes `rpm.vercmp(a, b)` for each line.
fn rpm_verdicts(dir: &Path, pairs: &[(String, String)]) -> Vec<i32> {
    let input = dir.join("rpm-pairs");
    let output = dir.join("rpm-verdicts");
    write_pairs(&input, pairs);
    let chunk = format!(
        r#"%{{lua:
local out = assert(io.open("{out}", "w"))
for line in io.lines("{inp}") do
  local a, b = line:match("^(%S+) (%S+)$")
  out:write(tostring(rpm.vercmp(a, b)), "\n")
end
out:close()
}}"#,
        out = output.display(),
        inp = input.display()
    );
    let out = Command::new("rpm")
        .arg("--eval")
        .arg(&chunk)
        .env("LC_ALL", "C")
        .output()
        .expect("spawn rpm");
    assert!(
        out.status.success(),
        "rpm --eval failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::read_to_string(&output)
        .unwrap_or_else(|e| {
            panic!(
                "rpm wrote no verdicts ({e}); stderr: {}",
                String::from_utf8_lossy(&out.stderr)
            )
        })
        .lines()
        .map(|l| {
            l.trim()
                .parse::<i32>()
                .unwrap_or_else(|_| panic!("rpm printed {l:?}"))
        })
        .collect()
}

fn assert_agreement(
    tool: &str,
    pairs: &[(String, String)],
    theirs: &[i32],
    ours: impl Fn(&str, &str) -> Ordering,
) {
    assert_eq!(
        theirs.len(),
        pairs.len(),
        "{tool} answered {} of {} pairs",
        theirs.len(),
        pairs.len()
    );
    let mut failures = Vec::new();
    for ((a, b), t) in pairs.iter().zip(theirs) {
        let mine = sign(ours(a, b));
        if mine != t.signum() {
            failures.push(format!(
                "  {a} vs {b}: {tool} says {t}, patchbook says {mine}"
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} pairs disagree with {tool}:\n{}",
        failures.len(),
        pairs.len(),
        failures
            .iter()
            .take(50)
            .cloned()
            .collect::<Vec<_>>()
            .join("\n")
    );
}

/// The generated set must actually contain the hard cases it claims to.
fn assert_coverage(pairs: &[(String, String)], theirs: &[i32], marks: &[&str]) {
    let all: BTreeSet<&str> = pairs
        .iter()
        .flat_map(|(a, b)| [a.as_str(), b.as_str()])
        .collect();
    for mark in marks {
        let n = all.iter().filter(|v| v.contains(mark)).count();
        assert!(n > 100, "only {n} generated versions contain {mark:?}");
    }
    let equal_but_different = pairs
        .iter()
        .zip(theirs)
        .filter(|((a, b), t)| **t == 0 && a != b)
        .count();
    assert!(
        equal_but_different > 50,
        "only {equal_but_different} pairs are equal but written differently"
    );
    for verdict in [-1, 0, 1] {
        let n = theirs.iter().filter(|t| t.signum() == verdict).count();
        assert!(n > 500, "only {n} pairs compare as {verdict}");
    }
}

#[test]
fn dpkg_cmp_agrees_with_dpkg_compare_versions() {
    need("dpkg");
    let dir = tempfile::tempdir().unwrap();
    let pairs = generate(0x5EED_DEB0_0000_0001, false);
    assert!(pairs.len() >= PAIRS);
    let theirs = dpkg_verdicts(dir.path(), &pairs);
    assert_agreement("dpkg", &pairs, &theirs, dpkg_cmp);
    assert_coverage(&pairs, &theirs, &[":", "~", "-", "+", "00", "a"]);
    let without_revision = pairs.iter().filter(|(a, _)| !a.contains('-')).count();
    assert!(without_revision > 1000, "{without_revision}");
}

#[test]
fn rpm_cmp_agrees_with_rpm_vercmp() {
    need("rpm");
    let dir = tempfile::tempdir().unwrap();
    let pairs = generate(0x5EED_0127_0000_0002, true);
    assert!(pairs.len() >= PAIRS);
    let theirs = rpm_verdicts(dir.path(), &pairs);
    assert_agreement("rpm", &pairs, &theirs, rpm_cmp);
    assert_coverage(&pairs, &theirs, &[":", "~", "^", "-", "_", "00", "a"]);
}

#[test]
fn orderings_are_antisymmetric() {
    for rpm in [false, true] {
        let cmp = if rpm { rpm_cmp } else { dpkg_cmp };
        for (a, b) in generate(7, rpm).iter().take(2000) {
            assert_eq!(cmp(a, b), cmp(b, a).reverse(), "{a} vs {b}");
        }
    }
}
