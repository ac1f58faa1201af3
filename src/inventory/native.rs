//! The native TOML inventory format.
use std::path::Path;

use super::{Inventory, InventoryError};

pub fn parse(path: &Path, _text: &str) -> Result<Inventory, InventoryError> {
    Err(InventoryError::Invalid {
        path: path.to_path_buf(),
        message: "native inventory not implemented yet".into(),
    })
}
