//! Ansible INI and YAML inventories.
use std::path::Path;

use super::{Inventory, InventoryError};

pub fn parse_ini(path: &Path, _text: &str) -> Result<Inventory, InventoryError> {
    Err(InventoryError::Invalid {
        path: path.to_path_buf(),
        message: "INI inventory not implemented yet".into(),
    })
}

pub fn parse_yaml(path: &Path, _text: &str) -> Result<Inventory, InventoryError> {
    Err(InventoryError::Invalid {
        path: path.to_path_buf(),
        message: "YAML inventory not implemented yet".into(),
    })
}

/// The structure `ansible-inventory --list` prints: `_meta.hostvars`, and each group
/// with `hosts` and `children`.
pub fn to_list_json(_inv: &Inventory) -> serde_json::Value {
    serde_json::json!({})
}
