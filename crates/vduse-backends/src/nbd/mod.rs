//! The NBD client's transmission phase, native: requests out and replies in on a socket the handshake
//! (done by the caller) left in transmission mode, with the driver's data moved without JavaScript.
//!
//! - [`proto`]: the wire format, no I/O: request headers, a reply parser that trusts nothing;
//! - [`conn`]: one connection: commands written whole, replies parsed on a thread of its own, every
//!   command answered or handed back;
//! - [`engine`]: virtio-blk requests served over connections: staging, splitting, resending, liveness,
//!   deadlines, kept writes;
//! - [`model`]: the virtio-blk model for a queue's worker threads, handing requests to the engine.

pub mod conn;
pub mod engine;
pub mod model;
pub mod proto;
