//! The kernel path, for real: needs VDUSE (run in the test guest: `scripts/vm/run cargo test … -- --ignored`).
//! A RAM virtio-blk device is created, attached with `vdpa`, and its /dev/vdX is used with dd, cmp, fio,
//! mkfs.ext4, mount and fsck; then detached and destroyed — twice, to prove teardown and re-creation.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use vduse_core::ram_blk::RamBlk;
use vduse_core::{DeviceOptions, Serving, VduseDevice};

mod common;
use common::{init_log, sh};

fn create(opts: DeviceOptions, model: Arc<RamBlk>) -> vduse_core::Result<VduseDevice> {
    VduseDevice::create(opts, model.spec(), Serving::Workers(model), None)
}

/// The /dev/vdX the kernel created for vDPA device `name`.
fn block_node(name: &str) -> PathBuf {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let dir = Path::new("/sys/bus/vdpa/devices").join(name);
        if let Ok(entries) = std::fs::read_dir(&dir) {
            for e in entries.flatten() {
                let block = e.path().join("block");
                if let Ok(mut b) = std::fs::read_dir(&block) {
                    if let Some(Ok(dev)) = b.next() {
                        return Path::new("/dev").join(dev.file_name());
                    }
                }
            }
        }
        assert!(Instant::now() < deadline, "no block device appeared for {name}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn serve_and_exercise(name: &str, round: u32) {
    const SIZE: u64 = 64 << 20;
    init_log();
    let model = Arc::new(RamBlk::new(SIZE, 2, 256, &format!("ram-{round}")));
    let mut opts = DeviceOptions::new(name);
    opts.replace_stale = true;
    let mut device = create(opts, model).expect("create device");
    // The attach runs the driver probe, which does I/O that our worker threads serve meanwhile.
    sh(&format!("vdpa dev add name {name} mgmtdev vduse"));
    let dev = block_node(name);
    let dev = dev.display();
    assert_eq!(
        sh(&format!("blockdev --getsize64 {dev}")).trim(),
        SIZE.to_string()
    );

    // Byte-exact across the whole device.
    sh(&format!(
        "head -c {SIZE} /dev/urandom > /tmp/pattern-{name}
         dd if=/tmp/pattern-{name} of={dev} bs=1M oflag=direct status=none
         dd if={dev} of=/tmp/readback-{name} bs=1M iflag=direct status=none
         cmp /tmp/pattern-{name} /tmp/readback-{name}
         rm -f /tmp/pattern-{name} /tmp/readback-{name}"
    ));
    // Random writes with verification, two jobs over both queues.
    sh(&format!(
        "fio --name=verify --filename={dev} --rw=randwrite --bs=4k --iodepth=16 --ioengine=libaio \
         --direct=1 --numjobs=2 --size=16M --offset_increment=16M --verify=crc32c --verify_state_save=0 --do_verify=1 \
         --verify_fatal=1 --group_reporting --output-format=terse >/dev/null"
    ));
    // A file system on it: files in, checksums kept, unmounted, checked clean.
    sh(&format!(
        "mkfs.ext4 -q -F {dev}
         mkdir -p /tmp/mnt-{name}
         mount {dev} /tmp/mnt-{name}
         for i in 1 2 3 4; do head -c $((i*1000000)) /dev/urandom > /tmp/mnt-{name}/f$i; done
         (cd /tmp/mnt-{name} && sha256sum f* > /tmp/sums-{name})
         umount /tmp/mnt-{name}
         fsck.ext4 -f -n {dev} >/dev/null
         mount {dev} /tmp/mnt-{name}
         (cd /tmp/mnt-{name} && sha256sum -c --quiet /tmp/sums-{name})
         umount /tmp/mnt-{name}"
    ));
    sh(&format!("vdpa dev del {name}"));
    let stats = device.stats();
    assert!(stats.requests > 1000, "requests were served: {stats:?}");
    assert_eq!(
        stats.bad_chains, 0,
        "the kernel driver sends only valid chains: {stats:?}"
    );
    assert_eq!(
        stats.requests, stats.completions,
        "every request completed: {stats:?}"
    );
    device.close().expect("destroy after detach");
    assert!(
        !vduse_core::list_devices().contains(&name.to_string()),
        "device is gone"
    );
}

#[test]
#[ignore = "needs VDUSE: run inside the test guest"]
fn guest_ram_blk_serves_a_real_block_device_twice() {
    for round in 0..2 {
        serve_and_exercise("vduse-ram-test", round);
    }
}

#[test]
#[ignore = "needs VDUSE: run inside the test guest"]
fn guest_stale_device_of_a_dead_process_is_replaced() {
    use std::io::{BufRead, BufReader};
    const NAME: &str = "vduse-stale-test";
    let model = || Arc::new(RamBlk::new(1 << 20, 1, 64, "stale"));
    if std::env::var_os("VDUSE_TEST_CHILD").is_some() {
        // Child: create the device, say so, and wait to be killed (a daemon that crashes).
        let device = create(DeviceOptions::new(NAME), model()).expect("child create");
        println!("ready");
        std::thread::sleep(Duration::from_secs(600));
        drop(device);
        return;
    }
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "--ignored",
            "--exact",
            "guest_stale_device_of_a_dead_process_is_replaced",
            "--nocapture",
        ])
        .env("VDUSE_TEST_CHILD", "1")
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("spawn child");
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    assert!(
        lines.any(|l| l.map(|l| l.contains("ready")).unwrap_or(false)),
        "child created the device"
    );
    // While the child serves it, the name is taken even for replace_stale: the device is live.
    let mut opts = DeviceOptions::new(NAME);
    opts.replace_stale = true;
    let err = create(opts.clone(), model())
        .err()
        .expect("live device is not stale");
    assert_eq!(err.code(), "ERR_VDUSE_EXISTS");
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(
        vduse_core::list_devices().contains(&NAME.to_string()),
        "the device outlives its process"
    );
    let err = create(DeviceOptions::new(NAME), model())
        .err()
        .expect("name clash");
    assert_eq!(err.code(), "ERR_VDUSE_EXISTS");
    assert!(err.hint().unwrap().contains("destroy"));
    let mut device = create(opts, model()).expect("stale device replaced");
    device.close().expect("destroy");
    assert!(!vduse_core::list_devices().contains(&NAME.to_string()));
}
