//! `patchbook inventory graph`: the group tree and the dependency edges as text.
use super::Inventory;

pub fn render(_inv: &Inventory) -> String {
    String::new()
}
