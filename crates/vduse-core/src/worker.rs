//! Worker-thread serving, for models written in Rust: one thread per queue waits for kicks and drains the
//! queue in bounded rounds, handing each batch to the model.

use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::thread::JoinHandle;

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::model::{Completer, DeviceModel};
use crate::queue::{Budget, Pop, RequestBatch, Virtqueue};

/// A running queue worker.
pub struct Worker {
    thread: Option<JoinHandle<()>>,
    stop: EventFd,
}

impl Worker {
    pub fn spawn(
        name: &str,
        queue: Arc<Virtqueue>,
        model: Arc<dyn DeviceModel>,
        kick: Arc<EventFd>,
        budget: Budget,
    ) -> std::io::Result<Self> {
        let stop = EventFd::new(EFD_NONBLOCK)?;
        let their_stop = stop.try_clone()?;
        let thread = std::thread::Builder::new()
            .name(format!("vduse-vq{}-{name}", queue.index))
            .spawn(move || run(&queue, model.as_ref(), &kick, &their_stop, budget))?;
        Ok(Self {
            thread: Some(thread),
            stop,
        })
    }

    pub fn stop(&mut self) {
        let _ = self.stop.write(1);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Serves `queue` until nothing is left to do right now.
pub fn drain(
    queue: &Arc<Virtqueue>,
    model: &dyn DeviceModel,
    batch: &mut RequestBatch,
    completer: &Completer,
    budget: Budget,
) {
    loop {
        let more = queue.pop(budget, batch);
        if !batch.is_empty() {
            model.handle(queue.index, batch, completer);
            completer.flush();
        }
        if more != Pop::More {
            return; // Idle: wait for a kick; Full: a completion writes the kick fd
        }
    }
}

fn run(queue: &Arc<Virtqueue>, model: &dyn DeviceModel, kick: &EventFd, stop: &EventFd, budget: Budget) {
    let mut batch = RequestBatch::default();
    let completer = Completer::new(queue.clone());
    loop {
        match crate::wait_readable(kick.as_raw_fd(), stop.as_raw_fd()) {
            Ok(true) => {
                let _ = kick.read();
                queue.kicked();
                drain(queue, model, &mut batch, &completer, budget);
            }
            Ok(false) => return,
            Err(e) => {
                log::error!("queue {}: poll failed: {e}", queue.index);
                return;
            }
        }
    }
}
