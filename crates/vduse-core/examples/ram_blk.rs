//! Serves the native RAM virtio-blk model until stdin closes — the transport's own speed, with no
//! JavaScript involved (the benchmark's reference row).
//!
//!   ram_blk NAME SIZE_MIB [QUEUES] [QUEUE_SIZE]
//!
//! Prints "ready" once the device exists; attach it with `vdpa dev add name NAME mgmtdev vduse`, detach it
//! before closing stdin.

use std::io::Read;
use std::sync::Arc;

use vduse_core::ram_blk::RamBlk;
use vduse_core::{DeviceOptions, Serving, VduseDevice};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 3 {
        eprintln!("usage: ram_blk NAME SIZE_MIB [QUEUES] [QUEUE_SIZE]");
        std::process::exit(2);
    }
    let arg = |i: usize, default: u64| args.get(i).map_or(Ok(default), |s| s.parse::<u64>());
    let (Ok(mib), Ok(queues), Ok(queue_size)) = (arg(2, 64), arg(3, 1), arg(4, 256)) else {
        eprintln!("ram_blk: sizes and counts must be numbers");
        std::process::exit(2);
    };
    let model = Arc::new(RamBlk::new(
        mib << 20,
        queues as u16,
        queue_size as u16,
        "native-ram",
    ));
    let mut options = DeviceOptions::new(&args[1]);
    options.replace_stale = true;
    let spec = model.spec();
    let mut device = match VduseDevice::create(options, spec, Serving::Workers(model), None) {
        Ok(d) => d,
        Err(e) => {
            eprintln!("ram_blk: {e} ({})", e.code());
            std::process::exit(1);
        }
    };
    println!("ready");
    let _ = std::io::stdin().read_to_end(&mut Vec::new());
    let stats = device.stats();
    if let Err(e) = device.close() {
        eprintln!("ram_blk: {e}");
        std::process::exit(1);
    }
    println!("stopped {stats:?}");
}
