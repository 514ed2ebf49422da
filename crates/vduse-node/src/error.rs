//! Carries a core error across the boundary: `error.code` is the stable code, the message is a JSON
//! record (`message`, `errno`, `syscall`, `hint`) that the TypeScript layer unpacks into a `VduseError`.

use std::fmt::Write;

/// The JS-visible `code` of a native error.
pub struct Code(pub &'static str);

impl AsRef<str> for Code {
    fn as_ref(&self) -> &str {
        self.0
    }
}

pub type NativeError = napi::Error<Code>;

fn json_string(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

pub fn to_napi(err: vduse_core::Error) -> NativeError {
    let mut reason = String::from("{\"code\":");
    json_string(&mut reason, err.code());
    reason.push_str(",\"message\":");
    json_string(&mut reason, &err.to_string());
    if let Some(errno) = err.errno() {
        let _ = write!(reason, ",\"errno\":{errno}");
    }
    if let Some(syscall) = err.syscall() {
        reason.push_str(",\"syscall\":");
        json_string(&mut reason, syscall);
    }
    if let Some(hint) = err.hint() {
        reason.push_str(",\"hint\":");
        json_string(&mut reason, hint);
    }
    reason.push('}');
    napi::Error::new(Code(err.code()), reason)
}

/// An error of the binding itself (bad arguments from the TypeScript layer, napi failures).
pub fn native(msg: impl std::fmt::Display) -> NativeError {
    let mut reason = String::from("{\"code\":\"ERR_VDUSE_NATIVE\",\"message\":");
    json_string(&mut reason, &msg.to_string());
    reason.push('}');
    napi::Error::new(Code("ERR_VDUSE_NATIVE"), reason)
}
