//! [`SharedData`] over Envoy's shared data (`proxy_get_shared_data` / `proxy_set_shared_data`).

use proxy_wasm::hostcalls;
use proxy_wasm::types::Status;

use crate::shared::{SharedData, WriteError};

/// The process-wide shared data of this Envoy.
pub struct HostShared;

impl SharedData for HostShared {
    fn get(&self, key: &str) -> (Option<Vec<u8>>, Option<u32>) {
        hostcalls::get_shared_data(key).unwrap_or((None, None))
    }

    fn set(&self, key: &str, value: &[u8], cas: Option<u32>) -> Result<(), WriteError> {
        match hostcalls::set_shared_data(key, Some(value), cas) {
            Ok(()) => Ok(()),
            Err(Status::CasMismatch) => Err(WriteError::CasMismatch),
            Err(Status::NotFound) => Err(WriteError::Host("not found")),
            Err(Status::BadArgument) => Err(WriteError::Host("bad argument")),
            Err(_) => Err(WriteError::Host("internal failure")),
        }
    }
}
