//! Native TOML inventories: loading never panics, and what loads is consistent.
use std::path::Path;

use patchbook::inventory::native;

fn main() {
    afl::fuzz!(|data: &[u8]| {
        let Some(text) = patchbook_fuzz::text(data) else {
            return;
        };
        if let Ok(inv) = native::parse(Path::new("fuzz.toml"), text) {
            patchbook_fuzz::check_inventory(&inv);
        }
    });
}
