//! The descriptor budget is the process's: each shared directory reserves its node and handle limits
//! out of what the open-file limit leaves, at most half of it, and gives them back when dropped (alone
//! in this binary: the reservations are process-wide).

mod common;

use common::TempDir;
use vduse_fs::{Config, PassthroughFs};

#[test]
fn shared_directories_split_the_descriptors_and_give_them_back() {
    let dir = TempDir::new("budget");
    let a = PassthroughFs::new(Config::new(&dir.0)).unwrap();
    let (na, ha) = a.limits();
    let b = PassthroughFs::new(Config::new(&dir.0)).unwrap();
    let (nb, hb) = b.limits();
    assert!(
        nb + hb < na + ha,
        "the second gets part of what the first left: {nb}+{hb} vs {na}+{ha}"
    );
    let mut limit: libc::rlimit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into our struct.
    unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) };
    assert!(
        ((na + ha + nb + hb) as u64) < limit.rlim_cur,
        "together within the limit"
    );
    drop(a);
    drop(b);
    let c = PassthroughFs::new(Config::new(&dir.0)).unwrap();
    assert_eq!(c.limits(), (na, ha), "what a and b reserved came back");
}
