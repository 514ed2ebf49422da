//! The vhost-user transport against rust-vmm's own vhost-user frontend, in process: a native model served
//! end to end, the ring state handed back, what a client may not do, and a socket that is not ours or a
//! client that stalls.

use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use vduse_core::ram_blk::{RamBlk, VIRTIO_BLK_S_OK, VIRTIO_BLK_T_GET_ID};
use vduse_core::rig::{desc, offer, DriverRing, Rig, MEM_END, QSIZE};
use vduse_core::{DeviceOptions, Error, Serving, VhostUserDevice};
use vhost::vhost_user::message::{VhostUserHeaderFlag, VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

/// Where the "client" says its memory is in its own address space (never dereferenced by anyone).
const CLIENT_VA: u64 = 0x7f00_0000_0000;
const VERSION_1: u64 = 1 << 32;

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("vduse-vu-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn device(sock: &std::path::Path, name: &str) -> (VhostUserDevice, Arc<RamBlk>) {
    let model = Arc::new(RamBlk::new(1 << 20, 1, QSIZE, "vu-test"));
    let dev = VhostUserDevice::listen(
        sock,
        DeviceOptions::new(name),
        model.spec(),
        Serving::Workers(model.clone()),
        None,
    )
    .unwrap();
    (dev, model)
}

/// A client that negotiated features and REPLY_ACK (so refusals come back as errors).
fn client(sock: &std::path::Path) -> Frontend {
    let mut fe = Frontend::connect(sock, 1).unwrap();
    fe.set_owner().unwrap();
    let offered = fe.get_features().unwrap();
    assert_ne!(offered & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits(), 0);
    fe.set_features(VERSION_1 | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits())
        .unwrap();
    let proto = fe.get_protocol_features().unwrap();
    assert!(proto.contains(VhostUserProtocolFeatures::REPLY_ACK | VhostUserProtocolFeatures::CONFIG));
    fe.set_protocol_features(VhostUserProtocolFeatures::REPLY_ACK | VhostUserProtocolFeatures::CONFIG)
        .unwrap();
    fe
}

/// The next message asks for an answer (REPLY_ACK is per message), so a refusal comes back as an error.
fn acked(fe: &Frontend) -> &Frontend {
    fe.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
    fe
}

fn region(fd: i32, size: u64) -> VhostUserMemoryRegionInfo {
    VhostUserMemoryRegionInfo {
        guest_phys_addr: 0,
        memory_size: size,
        userspace_addr: CLIENT_VA,
        mmap_offset: 0,
        mmap_handle: fd,
    }
}

fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
    let end = Instant::now() + Duration::from_secs(20);
    while !done() {
        assert!(Instant::now() < end, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn a_client_drives_the_native_model_and_gets_the_ring_state_back() {
    let dir = scratch("e2e");
    let sock = dir.join("d.sock");
    let (mut dev, _model) = device(&sock, "vu-e2e");
    let (rig, file) = Rig::memfd_backed(MEM_END);
    let mut fe = client(&sock);

    // Memory the file does not hold is refused (an access past its end would be a SIGBUS), and so is
    // a second region overlapping the first.
    assert!(acked(&fe)
        .set_mem_table(&[region(file.as_raw_fd(), 2 * MEM_END)])
        .is_err());
    let mut twice = region(file.as_raw_fd(), MEM_END / 2);
    twice.guest_phys_addr = MEM_END / 4;
    twice.userspace_addr = CLIENT_VA + MEM_END;
    assert!(acked(&fe)
        .set_mem_table(&[region(file.as_raw_fd(), MEM_END / 2), twice])
        .is_err());
    acked(&fe)
        .set_mem_table(&[region(file.as_raw_fd(), MEM_END)])
        .unwrap();
    assert!(
        acked(&fe).set_vring_num(0, 3).is_err(),
        "a ring size must be a power of two"
    );
    assert!(
        acked(&fe).set_vring_num(0, QSIZE * 2).is_err(),
        "a ring larger than the device's"
    );

    let ring = DriverRing {
        map: rig.map.clone(),
        desc: 0,
        avail: 0x1000,
        used: 0x3000,
        size: QSIZE,
    };
    rig.map.write_slice(&[0u8; 8], GuestAddress(ring.avail)).unwrap();
    rig.map.write_slice(&[0u8; 8], GuestAddress(ring.used)).unwrap();
    acked(&fe).set_vring_num(0, QSIZE).unwrap();
    acked(&fe)
        .set_vring_addr(
            0,
            &VringConfigData {
                queue_max_size: QSIZE,
                queue_size: QSIZE,
                flags: 0,
                desc_table_addr: CLIENT_VA + ring.desc,
                used_ring_addr: CLIENT_VA + ring.used,
                avail_ring_addr: CLIENT_VA + ring.avail,
                log_addr: None,
            },
        )
        .unwrap();
    acked(&fe).set_vring_base(0, 0).unwrap();
    let call = EventFd::new(0).unwrap();
    let kick = EventFd::new(0).unwrap();
    acked(&fe).set_vring_call(0, &call).unwrap();
    acked(&fe).set_vring_kick(0, &kick).unwrap();
    fe.set_vring_enable(0, true).unwrap();

    // A GET_ID request, kicked: the serial comes back with status OK and an interrupt.
    let base = 0x8000;
    rig.header(base, VIRTIO_BLK_T_GET_ID, 0);
    let n = VRING_DESC_F_NEXT;
    let w = VRING_DESC_F_WRITE;
    offer(
        &ring,
        &[
            (0, desc(base, 16, n, 1)),
            (1, desc(base + 0x100, 20, w | n, 2)),
            (2, desc(base + 0x200, 1, w, 0)),
        ],
        &[0],
    );
    kick.write(1).unwrap();
    wait_for("the completion", || ring.used_idx() == 1);
    assert_eq!(ring.used_elem(0).0, 0);
    let mut status = [0u8; 1];
    rig.map
        .read_slice(&mut status, GuestAddress(base + 0x200))
        .unwrap();
    assert_eq!(status[0], VIRTIO_BLK_S_OK);
    let mut serial = [0u8; 7];
    rig.map
        .read_slice(&mut serial, GuestAddress(base + 0x100))
        .unwrap();
    assert_eq!(&serial, b"vu-test");
    wait_for("the interrupt", || call.read().is_ok());
    assert_eq!(dev.stats().completions, 1);

    // Stopping the ring answers where it resumes; nothing is left in flight.
    assert_eq!(fe.get_vring_base(0).unwrap(), 1);
    assert_eq!(dev.stats().in_flight, 0);
    drop(fe);
    wait_for("the client to be gone", || !dev.is_connected());
    dev.close().unwrap();
    assert!(!sock.exists(), "close() removes the socket");
}

#[test]
fn a_ring_does_not_start_before_the_features_are_set() {
    let dir = scratch("order");
    let sock = dir.join("d.sock");
    let (mut dev, _model) = device(&sock, "vu-order");
    let (_rig, file) = Rig::memfd_backed(MEM_END);
    let mut fe = Frontend::connect(&sock, 1).unwrap();
    fe.set_owner().unwrap();
    fe.get_features().unwrap();
    // No SET_FEATURES at all.
    fe.set_protocol_features(VhostUserProtocolFeatures::REPLY_ACK)
        .unwrap();
    acked(&fe)
        .set_mem_table(&[region(file.as_raw_fd(), MEM_END)])
        .unwrap();
    acked(&fe).set_vring_num(0, QSIZE).unwrap();
    let config = VringConfigData {
        queue_max_size: QSIZE,
        queue_size: QSIZE,
        flags: 0,
        desc_table_addr: CLIENT_VA,
        used_ring_addr: CLIENT_VA + 0x3000,
        avail_ring_addr: CLIENT_VA + 0x1000,
        log_addr: None,
    };
    acked(&fe).set_vring_addr(0, &config).unwrap();
    acked(&fe).set_vring_base(0, 0).unwrap();
    let kick = EventFd::new(0).unwrap();
    assert!(
        acked(&fe).set_vring_kick(0, &kick).is_err(),
        "a ring may not start before SET_FEATURES"
    );
    assert_eq!(dev.status(), 0, "no ring runs");
    assert!(
        fe.set_vring_enable(5, true).is_err(),
        "a queue the device does not have"
    );
    drop(fe);
    wait_for("the client to be gone", || !dev.is_connected());
    dev.close().unwrap();
}

#[test]
fn refused_features_cost_the_client_its_session() {
    let dir = scratch("features");
    let sock = dir.join("d.sock");
    let (mut dev, _model) = device(&sock, "vu-features");
    let fe = Frontend::connect(&sock, 1).unwrap();
    fe.set_owner().unwrap();
    fe.get_features().unwrap();
    wait_for("the client", || dev.is_connected());
    // Without VERSION_1 (legacy rings): refused, and the protocol crate has already taken them as acked,
    // so the session cannot go on in step.
    fe.set_features(VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits())
        .unwrap();
    wait_for("the client to be dropped", || !dev.is_connected());
    assert!(fe.get_features().is_err());
    dev.close().unwrap();
}

#[test]
fn the_socket_path_must_be_free_or_stale_and_only_ours_is_removed() {
    let dir = scratch("socket");
    let model = RamBlk::new(1 << 20, 1, QSIZE, "x");
    let listen = |path: &std::path::Path| {
        VhostUserDevice::listen(
            path,
            DeviceOptions::new("vu-sock"),
            model.spec(),
            Serving::External,
            None,
        )
    };
    // A regular file is never replaced.
    let file = dir.join("file");
    std::fs::write(&file, b"data").unwrap();
    assert!(matches!(listen(&file), Err(Error::InvalidConfig(_))));
    assert_eq!(std::fs::read(&file).unwrap(), b"data");
    // A live server's socket is refused.
    let live = dir.join("live.sock");
    let _server = UnixListener::bind(&live).unwrap();
    assert!(matches!(listen(&live), Err(Error::Busy { .. })));
    // A stale socket (its server gone) is replaced.
    let stale = dir.join("stale.sock");
    drop(UnixListener::bind(&stale).unwrap());
    let mut dev = listen(&stale).unwrap();
    // Replaced behind our back by a successor's: close() leaves it alone.
    std::fs::remove_file(&stale).unwrap();
    let _successor = UnixListener::bind(&stale).unwrap();
    dev.close().unwrap();
    assert!(stale.exists());
}

#[test]
fn a_client_that_stalls_mid_message_neither_holds_the_device_nor_its_close() {
    let dir = scratch("stall");
    let sock = dir.join("d.sock");
    let (mut dev, _model) = device(&sock, "vu-stall");
    let mut stalled = UnixStream::connect(&sock).unwrap();
    // Half a message header, then nothing.
    stalled.write_all(&[1, 0, 0]).unwrap();
    wait_for("the client to be served", || dev.is_connected());
    // Closed from another thread: it must come back (the control thread is cut out of its read).
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        tx.send(dev.close().is_ok()).unwrap();
    });
    assert_eq!(rx.recv_timeout(Duration::from_secs(20)), Ok(true));
    drop(stalled);
    assert!(!sock.exists());
}

#[test]
fn in_connect_mode_the_device_dials_the_vmm_and_again_when_it_comes_back() {
    let dir = scratch("connect");
    let sock = dir.join("vmm.sock");
    let model = Arc::new(RamBlk::new(1 << 20, 1, QSIZE, "vu-test"));
    // The device starts first: the VMM's socket is not there yet, it keeps trying.
    let mut dev = VhostUserDevice::connect(
        &sock,
        DeviceOptions::new("vu-connect"),
        model.spec(),
        Serving::Workers(model.clone()),
        None,
    )
    .unwrap();
    let vmm = UnixListener::bind(&sock).unwrap();
    for session in 1..=2 {
        let (stream, _) = vmm.accept().unwrap();
        let fe = Frontend::from_stream(stream, 1);
        fe.set_owner().unwrap();
        assert_ne!(fe.get_features().unwrap() & VERSION_1, 0);
        wait_for("the session", || dev.sessions() == session);
        // The VMM goes away: the device dials again.
        drop(fe);
    }
    dev.close().unwrap();
    assert!(sock.exists(), "the VMM's socket is not ours to remove");
}
