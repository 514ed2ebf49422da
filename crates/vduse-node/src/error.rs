//! Carries an error across the boundary as a structured JavaScript `Error`: `code` (a stable
//! `ERR_VDUSE_*`), and where known `errno` (negative, as Node's own), `syscall` and `hint` as properties.
//! The TypeScript layer re-wraps it as a `VduseError` without parsing anything.

use napi::bindgen_prelude::{JsObjectValue, JsValue, Object};
use napi::{Env, Status};

/// An error on its way to JavaScript. Built anywhere (worker threads included); turned into the JS
/// object only on the JS thread (`into_js`), where an `Env` exists.
#[derive(Debug)]
pub struct Failure {
    code: &'static str,
    message: String,
    errno: Option<i32>,
    syscall: Option<&'static str>,
    hint: Option<&'static str>,
}

impl From<vduse_core::Error> for Failure {
    fn from(err: vduse_core::Error) -> Self {
        Failure {
            code: err.code(),
            message: err.to_string(),
            errno: err.errno(),
            syscall: err.syscall(),
            hint: err.hint(),
        }
    }
}

impl Failure {
    pub fn new(
        code: &'static str,
        message: String,
        errno: Option<i32>,
        syscall: Option<&'static str>,
        hint: Option<&'static str>,
    ) -> Self {
        Failure {
            code,
            message,
            errno,
            syscall,
            hint,
        }
    }
}

/// An error of the binding itself (bad arguments from the TypeScript layer, napi failures).
pub fn native(msg: impl std::fmt::Display) -> Failure {
    Failure {
        code: "ERR_VDUSE_NATIVE",
        message: msg.to_string(),
        errno: None,
        syscall: None,
        hint: None,
    }
}

/// A failed system call outside the core (`fallocate`).
pub fn syscall(name: &'static str, err: std::io::Error) -> Failure {
    Failure {
        code: "ERR_VDUSE_SYSCALL",
        message: format!("{name} failed: {err}"),
        errno: err.raw_os_error(),
        syscall: Some(name),
        hint: None,
    }
}

impl Failure {
    /// The JS `Error` object, wrapped so that napi throws (or rejects with) exactly that object.
    pub fn into_js(self, env: &Env) -> napi::Error {
        let build = || -> napi::Result<napi::Error> {
            let mut obj: Object =
                env.create_error(napi::Error::new(Status::GenericFailure, &self.message))?;
            obj.set_named_property("code", self.code)?;
            if let Some(errno) = self.errno {
                obj.set_named_property("errno", -errno.abs())?;
            }
            if let Some(syscall) = self.syscall {
                obj.set_named_property("syscall", syscall)?;
            }
            if let Some(hint) = self.hint {
                obj.set_named_property("hint", hint)?;
            }
            Ok(napi::Error::from(obj.to_unknown()))
        };
        // Building the object can only fail if the engine is failing; still say what went wrong.
        build().unwrap_or_else(|_| {
            napi::Error::new(Status::GenericFailure, format!("{}: {}", self.code, self.message))
        })
    }
}

/// `result.or_throw(&env)`: a JS-thread call's error as a structured JS error.
pub trait OrThrow<T> {
    fn or_throw(self, env: &Env) -> napi::Result<T>;
}

impl<T, E: Into<Failure>> OrThrow<T> for Result<T, E> {
    fn or_throw(self, env: &Env) -> napi::Result<T> {
        self.map_err(|e| e.into().into_js(env))
    }
}

/// For async tasks: `compute` (off the JS thread) parks its failure here and returns a placeholder;
/// `reject` (on the JS thread) swaps in the structured error.
#[derive(Default)]
pub struct Parked(Option<Failure>);

impl Parked {
    pub fn park(&mut self, failure: impl Into<Failure>) -> napi::Error {
        let failure = failure.into();
        let placeholder = napi::Error::new(Status::GenericFailure, failure.message.clone());
        self.0 = Some(failure);
        placeholder
    }

    pub fn reject<T>(&mut self, env: &Env, err: napi::Error) -> napi::Result<T> {
        Err(match self.0.take() {
            Some(f) => f.into_js(env),
            None => err,
        })
    }
}
