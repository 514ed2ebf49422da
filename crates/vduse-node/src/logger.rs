//! Rust log records (`log` crate: device broken, refused chains, drains that fenced requests) reach
//! JavaScript: one process-wide logger forwards them through a weak threadsafe function, rate-limited so a
//! hostile driver cannot flood the event loop (records beyond the limit are counted and reported).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Instant;

use napi::threadsafe_function::{ThreadsafeFunction, ThreadsafeFunctionCallMode};
use napi::Status;
use napi_derive::napi;

/// One log record, as JavaScript sees it.
#[napi(object)]
pub struct LogRecord {
    /// `error`, `warn`, `info`, `debug` or `trace`.
    pub level: String,
    /// The Rust module that logged it.
    pub target: String,
    pub message: String,
    /// Records dropped by the rate limit just before this one.
    pub dropped: u32,
}

type Sink = ThreadsafeFunction<LogRecord, (), LogRecord, Status, false, true, 0>;

/// Records per second that reach JavaScript; the rest are counted.
const RATE: u64 = 200;

struct JsLogger {
    sink: Mutex<Option<Sink>>,
    window: Mutex<(Instant, u64)>,
    dropped: AtomicU64,
}

static LOGGER: std::sync::OnceLock<JsLogger> = std::sync::OnceLock::new();

impl log::Log for JsLogger {
    fn enabled(&self, m: &log::Metadata) -> bool {
        m.level() <= log::max_level()
    }

    fn log(&self, r: &log::Record) {
        if !self.enabled(r.metadata()) {
            return;
        }
        {
            let mut w = self.window.lock().unwrap_or_else(|e| e.into_inner());
            if w.0.elapsed().as_secs() >= 1 {
                *w = (Instant::now(), 0);
            }
            if w.1 >= RATE {
                self.dropped.fetch_add(1, Ordering::Relaxed);
                return;
            }
            w.1 += 1;
        }
        let record = LogRecord {
            level: r.level().as_str().to_ascii_lowercase(),
            target: r.target().to_string(),
            message: r.args().to_string(),
            dropped: self.dropped.swap(0, Ordering::Relaxed).min(u64::from(u32::MAX)) as u32,
        };
        match self.sink.lock().unwrap_or_else(|e| e.into_inner()).as_ref() {
            Some(sink) => {
                let _ = sink.call(record, ThreadsafeFunctionCallMode::NonBlocking);
            }
            None if r.level() <= log::Level::Warn => {
                eprintln!("vduse: {}: {}", record.level, record.message);
            }
            None => {}
        }
    }

    fn flush(&self) {}
}

fn logger() -> &'static JsLogger {
    LOGGER.get_or_init(|| JsLogger {
        sink: Mutex::new(None),
        window: Mutex::new((Instant::now(), 0)),
        dropped: AtomicU64::new(0),
    })
}

/// Installs the process-wide logger (once). Until JavaScript sets a sink, warnings go to stderr.
pub fn install() {
    let l = logger();
    if log::set_logger(l).is_ok() {
        log::set_max_level(log::LevelFilter::Info);
    }
}

/// Where Rust log records go (`null` to stop forwarding), and the most verbose level forwarded.
#[napi]
pub fn set_log_sink(
    sink: Option<napi::bindgen_prelude::Function<LogRecord, ()>>,
    level: Option<String>,
) -> napi::Result<()> {
    install();
    let filter = match level.as_deref() {
        Some("error") => log::LevelFilter::Error,
        Some("warn") => log::LevelFilter::Warn,
        Some("debug") => log::LevelFilter::Debug,
        Some("trace") => log::LevelFilter::Trace,
        Some("off") => log::LevelFilter::Off,
        _ => log::LevelFilter::Info,
    };
    log::set_max_level(filter);
    let sink = match sink {
        Some(f) => Some(
            f.build_threadsafe_function()
                .callee_handled::<false>()
                .weak::<true>()
                .build()?,
        ),
        None => None,
    };
    *logger().sink.lock().unwrap_or_else(|e| e.into_inner()) = sink;
    Ok(())
}
