//! What the fuzz targets share: the properties every inventory that loads must
//! have, whatever format it came from. A broken property panics, which AFL records
//! as a crash. This crate only reads patchbook's public API; it must not be a
//! dependency of anything.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a panic is the finding

use std::collections::HashSet;

use patchbook::inventory::{ansible, graph, select, Host, Inventory};

/// Loads happened: every view of the inventory must work and agree with itself.
pub fn check_inventory(inv: &Inventory) {
    let names: Vec<&str> = inv.hosts().iter().map(|h| h.name.as_str()).collect();
    let unique: HashSet<&str> = names.iter().copied().collect();
    assert_eq!(
        unique.len(),
        names.len(),
        "a host is listed twice: {names:?}"
    );
    for h in inv.hosts() {
        assert!(
            inv.host(&h.name)
                .is_some_and(|found| std::ptr::eq(found, h)),
            "host `{}` is not found by its name",
            h.name
        );
        for g in &h.groups {
            assert!(
                inv.groups().contains_key(g),
                "host `{}` is in group `{g}`, which the inventory does not list",
                h.name
            );
        }
        let _ = inv.dependencies_of(h);
    }
    let all = inv.select("all").expect("`all` is always a valid selector");
    assert_eq!(all.len(), inv.hosts().len(), "`all` must select every host");
    let _ = inv.check_dependencies();
    let _ = ansible::to_list_json(inv);
    let _ = graph::render(inv);
    let _ = graph::table(inv);
    for g in inv.groups().keys() {
        // Group names that look like patterns select something else; only a
        // plain name must pick its own members.
        if g.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') && inv.host(g).is_none() {
            let chosen = inv
                .select(g)
                .expect("a plain group name is a valid selector");
            for h in &chosen {
                assert!(h.in_group(g), "`{g}` selected `{}`, not a member", h.name);
            }
        }
    }
}

/// A selector over `inv`: whatever it selects is a set of the inventory's hosts,
/// in inventory order, and an empty selection has an explanation.
pub fn check_selector(inv: &Inventory, pattern: &str) {
    match inv.select(pattern) {
        Ok(chosen) => {
            // Places by address, built once: a scan per selected host made this
            // check quadratic, and large inputs read as hangs.
            let places: std::collections::HashMap<*const Host, usize> = inv
                .hosts()
                .iter()
                .enumerate()
                .map(|(i, h)| (h as *const Host, i))
                .collect();
            let mut last = None;
            for h in &chosen {
                let at = *places
                    .get(&(*h as *const Host))
                    .expect("a selected host belongs to the inventory");
                assert!(
                    last.is_none_or(|l| l < at),
                    "`{pattern}` selected hosts out of inventory order or twice"
                );
                last = Some(at);
            }
            if chosen.is_empty() {
                assert!(!select::why_empty(inv, pattern).is_empty());
            }
        }
        Err(e) => assert!(!e.to_string().is_empty()),
    }
}

/// The input as text, or `None` for bytes that are not UTF-8 (the loaders read
/// files with `read_to_string`, which refuses those before any parser sees them).
pub fn text(data: &[u8]) -> Option<&str> {
    std::str::from_utf8(data).ok()
}
