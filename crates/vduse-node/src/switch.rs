//! `BindingSwitch`: a native Ethernet switch (`vduse_backends::switch`) whose ports are NICs created with
//! `DeviceInit.switchId`. Devices find their switch by id in a registry that holds no switch alive: a
//! switch lives as long as its JavaScript object and its ports.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use napi::bindgen_prelude::Buffer;
use napi_derive::napi;
use vduse_backends::switch::{PortStats, Switch, SwitchOptions};

static NEXT_ID: AtomicU32 = AtomicU32::new(1);
static SWITCHES: Mutex<Option<HashMap<u32, Weak<Switch>>>> = Mutex::new(None);

fn registry() -> std::sync::MutexGuard<'static, Option<HashMap<u32, Weak<Switch>>>> {
    SWITCHES.lock().unwrap_or_else(|e| e.into_inner())
}

/// The switch of `id`, while it exists.
pub(crate) fn switch_of(id: u32) -> Option<Arc<Switch>> {
    registry().as_ref()?.get(&id)?.upgrade()
}

/// What the switch did with its ports' frames.
#[napi(object)]
pub struct SwitchCounters {
    pub forwarded: f64,
    pub flooded: f64,
    pub filtered: f64,
    pub spoofed: f64,
    pub unlearned: f64,
    pub invalid: f64,
}

/// One switch port's frame counters (named as a NIC's `NetStats`).
#[napi(object)]
#[derive(Clone)]
pub struct PortCounters {
    pub tx_frames: f64,
    pub tx_bytes: f64,
    pub tx_malformed: f64,
    pub rx_frames: f64,
    pub rx_bytes: f64,
    pub rx_no_buffers: f64,
    pub rx_refused: f64,
}

fn get(a: &std::sync::atomic::AtomicU64) -> f64 {
    a.load(Ordering::Relaxed) as f64
}

pub(crate) fn port_counters(s: &PortStats) -> PortCounters {
    PortCounters {
        tx_frames: get(&s.tx_frames),
        tx_bytes: get(&s.tx_bytes),
        tx_malformed: get(&s.tx_malformed),
        rx_frames: get(&s.rx_frames),
        rx_bytes: get(&s.rx_bytes),
        rx_no_buffers: get(&s.rx_no_buffers),
        rx_refused: get(&s.rx_refused),
    }
}

#[napi]
pub struct BindingSwitch {
    id: u32,
    switch: Arc<Switch>,
}

#[napi]
impl BindingSwitch {
    /// A switch with these port-security settings (see `NetSwitchOptions`).
    #[napi(constructor)]
    pub fn new(max_macs_per_port: u32, mac_age_ms: f64) -> napi::Result<Self> {
        let invalid = |what: &str| napi::Error::new(napi::Status::InvalidArg, what.to_string());
        let mac_age = Duration::try_from_secs_f64(mac_age_ms / 1000.0)
            .map_err(|_| invalid("macAgeMs must be a non-negative number of milliseconds"))?;
        if max_macs_per_port == 0 {
            return Err(invalid("maxMacsPerPort must be at least 1"));
        }
        let switch = Switch::new(SwitchOptions {
            max_macs_per_port: max_macs_per_port as usize,
            mac_age,
        });
        let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
        registry()
            .get_or_insert_with(HashMap::new)
            .insert(id, Arc::downgrade(&switch));
        Ok(Self { id, switch })
    }

    /// What devices name in `DeviceInit.switchId` to become ports of this switch.
    #[napi(getter)]
    pub fn id(&self) -> u32 {
        self.id
    }

    #[napi]
    pub fn stats(&self) -> SwitchCounters {
        let s = self.switch.stats();
        SwitchCounters {
            forwarded: get(&s.forwarded),
            flooded: get(&s.flooded),
            filtered: get(&s.filtered),
            spoofed: get(&s.spoofed),
            unlearned: get(&s.unlearned),
            invalid: get(&s.invalid),
        }
    }

    /// The name of the device whose port `mac` (6 bytes) was learned on.
    #[napi]
    pub fn port_of(&self, mac: Buffer) -> Option<String> {
        let mac: [u8; 6] = mac.as_ref().try_into().ok()?;
        self.switch.port_of(mac)
    }

    /// Ports plugged in (devices not closed yet).
    #[napi(getter)]
    pub fn port_count(&self) -> u32 {
        self.switch.port_count() as u32
    }
}

impl Drop for BindingSwitch {
    fn drop(&mut self) {
        if let Some(map) = registry().as_mut() {
            map.remove(&self.id);
        }
    }
}
