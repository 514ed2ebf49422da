//! 10,000 files created, looked up, stat'ed, closed, forgotten and removed: the process's open fds come
//! back to where they started (alone in this binary: fds of other tests would blur the count).

mod common;

use common::{name, Driver, TempDir};
use vduse_fs::abi::op;
use vduse_fs::Config;

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

#[test]
fn ten_thousand_files_leave_no_fd_behind() {
    let dir = TempDir::new("leak");
    let before = open_fds();
    let mut d = Driver::mounted(Config::new(&dir.0));
    let during = open_fds();
    for i in 0..10_000 {
        let n = format!("f{i}");
        let (node, fh) = d.create(1, &n, libc::O_RDWR as u32, 0o644).unwrap();
        d.write(fh, 0, b"x").unwrap();
        assert_eq!(d.call(op::GETATTR, node, &[0; 16], 16 + 104).errno, 0);
        d.release(fh, false);
        assert_eq!(d.lookup(1, &n), Ok(node));
        d.forget(node, 2);
        assert_eq!(d.call(op::UNLINK, 1, &name(&n), 16).errno, 0);
    }
    assert_eq!(d.server.fs().counts(), (0, 0));
    assert_eq!(open_fds(), during, "no fd per file kept");
    drop(d);
    assert_eq!(open_fds(), before);
}
