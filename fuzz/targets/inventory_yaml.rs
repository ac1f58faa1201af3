//! Ansible YAML (and JSON) inventories: loading never panics, and what loads is
//! consistent.
use std::path::Path;

use patchbook::inventory::ansible;

fn main() {
    afl::fuzz!(|data: &[u8]| {
        let Some(text) = patchbook_fuzz::text(data) else {
            return;
        };
        if let Ok(inv) = ansible::parse_yaml(Path::new("fuzz.yml"), text) {
            patchbook_fuzz::check_inventory(&inv);
        }
    });
}
