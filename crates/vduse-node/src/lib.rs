//! Node.js binding for `vduse-core`. Thin on purpose: the public API lives in TypeScript (`src/`),
//! which wraps these `Binding*` items and turns their errors into `VduseError`s.

use napi_derive::napi;

mod error;

use error::{to_napi, Code};

/// The VDUSE API version spoken by `/dev/vduse/control` (0 on Linux 6.12).
/// Throws `ERR_VDUSE_UNAVAILABLE` when the node is missing and `ERR_VDUSE_PERMISSION` when it may not be opened.
#[napi]
pub fn get_api_version(control_path: Option<String>) -> napi::Result<u32, Code> {
    let control = match control_path {
        Some(p) => vduse_core::Control::open_path(p),
        None => vduse_core::Control::open(),
    }
    .map_err(to_napi)?;
    let version = control.api_version().map_err(to_napi)?;
    Ok(version as u32)
}
