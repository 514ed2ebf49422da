//! The few libuv calls JS-thread serving needs: a poll handle per kick eventfd on Node's own loop.
//! libuv's symbols come from the `node` executable that loads us, like N-API's.

use std::ffi::{c_int, c_void};

/// `uv_handle_t` as far as we touch it: `data` is its first field (a documented public member).
#[repr(C)]
pub struct Handle {
    pub data: *mut c_void,
}

#[repr(C)]
pub struct Loop {
    _private: [u8; 0],
}

pub type PollCb = unsafe extern "C" fn(handle: *mut Handle, status: c_int, events: c_int);
pub type CloseCb = unsafe extern "C" fn(handle: *mut Handle);

pub const UV_POLL: c_int = 8;
pub const UV_READABLE: c_int = 1;

extern "C" {
    pub fn uv_handle_size(kind: c_int) -> usize;
    pub fn uv_poll_init(lp: *mut Loop, handle: *mut Handle, fd: c_int) -> c_int;
    pub fn uv_poll_start(handle: *mut Handle, events: c_int, cb: PollCb) -> c_int;
    pub fn uv_poll_stop(handle: *mut Handle) -> c_int;
    pub fn uv_close(handle: *mut Handle, cb: Option<CloseCb>);
    pub fn uv_unref(handle: *mut Handle);
    pub fn uv_strerror(err: c_int) -> *const std::ffi::c_char;
}

/// An owned `uv_poll_t` (allocated at libuv's size, freed by its close callback).
pub struct Poll {
    handle: *mut Handle,
}

/// Where the handle memory comes from (and goes back to in the close callback).
fn layout() -> std::alloc::Layout {
    // SAFETY: uv_handle_size has no preconditions.
    let size = unsafe { uv_handle_size(UV_POLL) }.max(std::mem::size_of::<Handle>());
    std::alloc::Layout::from_size_align(size, 16).expect("uv_poll_t layout")
}

unsafe extern "C" fn free_handle(handle: *mut Handle) {
    // SAFETY: `handle` was allocated in `Poll::start` with this layout and is closed now.
    unsafe { std::alloc::dealloc(handle.cast(), layout()) };
}

impl Poll {
    /// Starts polling `fd` for readability on `lp`; `data` is handed to `cb` (through the handle).
    ///
    /// # Safety
    /// `lp` is the current thread's loop; `data` stays valid until [`close`](Self::close).
    pub unsafe fn start(lp: *mut Loop, fd: c_int, data: *mut c_void, cb: PollCb) -> Result<Self, String> {
        // SAFETY: allocating libuv's size for a poll handle.
        let handle = unsafe { std::alloc::alloc_zeroed(layout()) }.cast::<Handle>();
        if handle.is_null() {
            return Err("out of memory".into());
        }
        // SAFETY: a zeroed handle of the right size, initialized by libuv on this loop.
        let ret = unsafe { uv_poll_init(lp, handle, fd) };
        if ret != 0 {
            // SAFETY: never initialized: free it directly.
            unsafe { std::alloc::dealloc(handle.cast(), layout()) };
            return Err(uv_error(ret));
        }
        // SAFETY: an initialized handle; `data` is ours to set.
        unsafe {
            (*handle).data = data;
            let ret = uv_poll_start(handle, UV_READABLE, cb);
            if ret != 0 {
                uv_close(handle, Some(free_handle));
                return Err(uv_error(ret));
            }
            // Polls never keep the process alive: devices decide that (ref/unref in TypeScript).
            uv_unref(handle);
        }
        Ok(Self { handle })
    }

    /// Stops and closes the handle; no callback runs after this; memory is freed by libuv's close.
    pub fn close(self) {
        // SAFETY: a started handle, closed exactly once (self is consumed).
        unsafe {
            uv_poll_stop(self.handle);
            uv_close(self.handle, Some(free_handle));
        }
    }
}

fn uv_error(code: c_int) -> String {
    // SAFETY: uv_strerror returns a static NUL-terminated string for any code.
    unsafe { std::ffi::CStr::from_ptr(uv_strerror(code)) }
        .to_string_lossy()
        .into_owned()
}
