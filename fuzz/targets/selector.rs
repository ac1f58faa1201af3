//! Selectors: the first line is the pattern, the rest an INI inventory (a fixed
//! one when the rest does not load), so both the pattern and the groups it runs
//! over vary.
use std::path::Path;
use std::sync::OnceLock;

use patchbook::inventory::{ansible, Inventory};

const FALLBACK: &str = "\
bastion ansible_host=10.0.0.1
[web]
web[01:12].example.com
[db]
db1 depends_on=web
db2
[eu:children]
web
db
[canary]
web03.example.com
";

fn fallback() -> &'static Inventory {
    static INV: OnceLock<Inventory> = OnceLock::new();
    INV.get_or_init(|| ansible::parse_ini(Path::new("fallback.ini"), FALLBACK).unwrap())
}

fn main() {
    afl::fuzz!(|data: &[u8]| {
        let Some(text) = patchbook_fuzz::text(data) else {
            return;
        };
        let (pattern, rest) = text.split_once('\n').unwrap_or((text, ""));
        let loaded = ansible::parse_ini(Path::new("fuzz.ini"), rest).ok();
        let inv = loaded.as_ref().unwrap_or_else(|| fallback());
        patchbook_fuzz::check_selector(inv, pattern);
    });
}
