//! The passthrough server against a real directory, driven with raw FUSE requests as a hostile driver
//! could send them: what each operation does on the host, the escapes it must refuse, its limits.

mod common;

use std::os::unix::fs::{MetadataExt, PermissionsExt};

use common::{le, name, Driver, TempDir};
use vduse_fs::abi::op;
use vduse_fs::{CachePolicy, Config, XattrPolicy};

const ROOT: u64 = 1;
const O_RDWR: u32 = libc::O_RDWR as u32;
const O_EXCL: u32 = libc::O_EXCL as u32;

#[test]
fn nothing_is_served_before_init_and_bad_headers_are_refused() {
    let dir = TempDir::new("init");
    let mut d = Driver::new(Config::new(&dir.0));
    assert_eq!(d.lookup(ROOT, "x"), Err(libc::EIO), "no session yet");
    let r = d.init();
    assert_eq!(r.u32_at(0), 7);
    assert_eq!(r.u32_at(4), 38);
    assert_eq!(r.u32_at(20), 1 << 20, "max_write");
    assert_eq!(r.data.len(), 64);
    // A length that is not what was given, and an extension never granted.
    let r = d.raw(op::GETATTR, ROOT, &[0; 16], 128, Some(200)).unwrap();
    assert_eq!(r.errno, libc::EINVAL);
    assert_eq!(
        d.server
            .counters()
            .malformed
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );
    // No room for the reply: refused before anything happens on the host.
    let mut a = le(&[0o755, 0], &[4, 4]);
    a.extend(name("d"));
    let r = d.call(op::MKDIR, ROOT, &a, 40);
    assert_eq!(r.errno, libc::EINVAL);
    assert!(!dir.0.join("d").exists());
    // Unknown operations: ENOSYS.
    assert_eq!(d.call(4242, ROOT, &[], 16).errno, libc::ENOSYS);
    assert_eq!(d.call(op::ACCESS, ROOT, &[0; 8], 16).errno, libc::ENOSYS);
}

#[test]
fn files_directories_links_and_attributes_are_the_host_s() {
    let dir = TempDir::new("ops");
    let mut d = Driver::mounted(Config::new(&dir.0));
    let sub = d.mkdir(ROOT, "sub", 0o750).unwrap();
    assert_eq!(
        std::fs::metadata(dir.0.join("sub")).unwrap().permissions().mode() & 0o7777,
        0o750
    );
    let (f, fh) = d.create(sub, "f", O_RDWR | O_EXCL, 0o640).unwrap();
    assert_eq!(d.create(sub, "f", O_RDWR | O_EXCL, 0o640), Err(libc::EEXIST));
    let data: Vec<u8> = (0..300_000u32).map(|i| (i * 7) as u8).collect();
    assert_eq!(d.write(fh, 4096, &data).unwrap(), data.len() as u32);
    let host = std::fs::read(dir.0.join("sub/f")).unwrap();
    assert_eq!(host.len(), 4096 + data.len());
    assert_eq!(&host[4096..], &data[..]);
    assert_eq!(d.read(fh, 4096, 300_000).unwrap(), data);
    assert_eq!(
        d.read(fh, 4096 + 299_990, 100).unwrap(),
        &data[299_990..],
        "short at the end"
    );
    // The same inode is the same node; attributes are the host's.
    assert_eq!(d.lookup(sub, "f"), Ok(f));
    let r = d.call(op::GETATTR, f, &[0; 16], 16 + 104);
    let md = std::fs::metadata(dir.0.join("sub/f")).unwrap();
    assert_eq!(r.u64_at(16), md.ino());
    assert_eq!(r.u64_at(24), md.size());
    assert_eq!(r.u32_at(16 + 60), md.mode());
    // SETATTR: mode, size, times.
    let mut sa = vec![0u8; 88];
    let valid = 1 | 8 | 32; // MODE | SIZE | MTIME
    sa[..4].copy_from_slice(&(valid as u32).to_le_bytes());
    sa[16..24].copy_from_slice(&10u64.to_le_bytes());
    sa[40..48].copy_from_slice(&1_000_000u64.to_le_bytes());
    sa[68..72].copy_from_slice(&0o600u32.to_le_bytes());
    assert_eq!(d.call(op::SETATTR, f, &sa, 16 + 104).errno, 0);
    let md = std::fs::metadata(dir.0.join("sub/f")).unwrap();
    assert_eq!(
        (md.size(), md.mode() & 0o7777, md.mtime()),
        (10, 0o600, 1_000_000)
    );
    // Hard link, symlink, readlink, rename, readdir.
    let mut a = f.to_le_bytes().to_vec();
    a.extend(name("hard"));
    let r = d.call(op::LINK, ROOT, &a, 16 + 128);
    assert_eq!(r.errno, 0);
    assert_eq!(r.u64_at(0), f, "a hard link is the same node");
    let mut a = name("ln");
    a.extend(name("../../etc/passwd"));
    let ln = d.call(op::SYMLINK, ROOT, &a, 16 + 128).u64_at(0);
    assert_eq!(d.call(op::READLINK, ln, &[], 16 + 4096).ok(), b"../../etc/passwd");
    let mut a = sub.to_le_bytes().to_vec();
    a.extend(name("hard"));
    a.extend(name("moved"));
    assert_eq!(d.call(op::RENAME, ROOT, &a, 16).errno, 0);
    assert!(dir.0.join("sub/moved").exists());
    let dh = d.opendir(sub).unwrap();
    let mut names: Vec<String> = d
        .readdir(dh, 0, 4096, false)
        .unwrap()
        .into_iter()
        .map(|e| e.0)
        .collect();
    names.sort();
    assert_eq!(names, [".", "..", "f", "moved"]);
    // READDIRPLUS gives nodes (not for . and ..), and a small buffer continues where it stopped.
    let all = d.readdir(dh, 0, 4096, true).unwrap();
    for (n, _, node) in &all {
        assert_eq!(*node == 0, n == "." || n == "..", "{n}");
    }
    let first = d.readdir(dh, 0, 160, true).unwrap();
    assert_eq!(first.len(), 1, "one plus entry fits in 160 bytes");
    let rest = d.readdir(dh, first[0].1, 4096, true).unwrap();
    assert_eq!(rest.len(), all.len() - 1);
    d.release(dh, true);
    // Unlink and rmdir.
    let unlink = |d: &mut Driver, parent, n: &str, dir: bool| {
        d.call(if dir { op::RMDIR } else { op::UNLINK }, parent, &name(n), 16)
            .errno
    };
    assert_eq!(unlink(&mut d, ROOT, "sub", true), libc::ENOTEMPTY);
    assert_eq!(unlink(&mut d, sub, "moved", false), 0);
    assert_eq!(unlink(&mut d, sub, "f", false), 0);
    assert_eq!(
        d.read(fh, 0, 10).unwrap().len(),
        10,
        "an open file outlives its name"
    );
    d.release(fh, false);
    assert_eq!(unlink(&mut d, ROOT, "sub", true), 0);
    // STATFS is the host's.
    let r = d.call(op::STATFS, ROOT, &[], 16 + 80);
    assert_eq!(r.errno, 0);
    assert!(r.u64_at(0) > 0);
}

#[test]
fn fsync_fallocate_lseek_and_copy_file_range_reach_the_host() {
    let dir = TempDir::new("data");
    let mut d = Driver::mounted(Config::new(&dir.0));
    let (_, a) = d.create(ROOT, "a", O_RDWR, 0o644).unwrap();
    let (_, b) = d.create(ROOT, "b", O_RDWR, 0o644).unwrap();
    d.write(a, 0, &[7u8; 8192]).unwrap();
    assert_eq!(d.call(op::FSYNC, 0, &le(&[a, 1, 0], &[8, 4, 4]), 16).errno, 0);
    let r = d.call(
        op::FALLOCATE,
        0,
        &le(&[a, 0, 1 << 20, 0, 0], &[8, 8, 8, 4, 4]),
        16,
    );
    assert_eq!(r.errno, 0);
    assert_eq!(std::fs::metadata(dir.0.join("a")).unwrap().len(), 1 << 20);
    let r = d.call(
        op::LSEEK,
        0,
        &le(&[a, 0, libc::SEEK_DATA as u64, 0], &[8, 8, 4, 4]),
        24,
    );
    assert_eq!((r.errno, r.u64_at(0)), (0, 0));
    let r = d.call(
        op::COPY_FILE_RANGE,
        0,
        &le(&[a, 0, 0, b, 100, 8192, 0], &[8; 7]),
        24,
    );
    assert_eq!((r.errno, r.u32_at(0)), (0, 8192));
    let host = std::fs::read(dir.0.join("b")).unwrap();
    assert_eq!(&host[100..], &[7u8; 8192][..]);
    assert_eq!(d.call(op::SYNCFS, ROOT, &[0; 8], 16).errno, 0);
}

#[test]
fn names_that_are_not_one_component_are_refused() {
    let dir = TempDir::new("names");
    std::fs::write(dir.0.join("inside"), b"x").unwrap();
    let mut d = Driver::mounted(Config::new(&dir.0));
    for bad in ["..", ".", "a/b", "", "../etc", "/etc"] {
        let r = d.call(op::LOOKUP, ROOT, &name(bad), 16 + 128);
        assert_eq!(r.errno, libc::EINVAL, "{bad:?}");
        let r = d.create(ROOT, bad, O_RDWR, 0o644);
        assert_eq!(r, Err(libc::EINVAL), "{bad:?}");
    }
    // A name without its NUL, and one longer than NAME_MAX.
    let r = d.call(op::LOOKUP, ROOT, b"inside", 16 + 128);
    assert_eq!(r.errno, libc::EINVAL);
    let r = d.call(op::LOOKUP, ROOT, &name(&"x".repeat(256)), 16 + 128);
    assert_eq!(
        r.errno,
        libc::ENAMETOOLONG,
        "too long is the caller's error, as on any file system"
    );
}

#[test]
fn symlinks_are_never_followed_on_the_host() {
    let outside = TempDir::new("outside");
    std::fs::write(outside.0.join("secret"), b"secret").unwrap();
    let dir = TempDir::new("links");
    std::os::unix::fs::symlink("/", dir.0.join("root")).unwrap();
    std::os::unix::fs::symlink(outside.0.join("secret"), dir.0.join("secret")).unwrap();
    std::os::unix::fs::symlink(&outside.0, dir.0.join("out")).unwrap();
    let mut d = Driver::mounted(Config::new(&dir.0));
    // The symlinks are nodes of their own; nothing under them resolves.
    let root_link = d.lookup(ROOT, "root").unwrap();
    assert_eq!(d.lookup(root_link, "etc"), Err(libc::ENOTDIR));
    let out = d.lookup(ROOT, "out").unwrap();
    assert_eq!(d.lookup(out, "secret"), Err(libc::ENOTDIR));
    let secret = d.lookup(ROOT, "secret").unwrap();
    assert_eq!(
        d.open(secret, 0),
        Err(libc::EACCES),
        "a symlink node is never opened"
    );
    assert_eq!(d.opendir(out), Err(libc::ENOTDIR));
    let r = d.call(op::GETATTR, secret, &[0; 16], 16 + 104);
    assert_eq!(Driver::attr_mode(&r, 16) & libc::S_IFMT, libc::S_IFLNK);
    // Creating over a symlink to a file outside: refused, the file untouched.
    assert_eq!(
        d.create(ROOT, "secret", O_RDWR | libc::O_TRUNC as u32, 0o644),
        Err(libc::ELOOP)
    );
    assert_eq!(std::fs::read(outside.0.join("secret")).unwrap(), b"secret");
    // SETATTR on a symlink node changes the link, never its target.
    let mut sa = vec![0u8; 88];
    sa[..4].copy_from_slice(&8u32.to_le_bytes()); // SIZE
    assert_eq!(d.call(op::SETATTR, secret, &sa, 16 + 104).errno, libc::EINVAL);
    sa[..4].copy_from_slice(&1u32.to_le_bytes()); // MODE
    sa[68..72].copy_from_slice(&0o777u32.to_le_bytes());
    assert_eq!(d.call(op::SETATTR, secret, &sa, 16 + 104).errno, libc::EOPNOTSUPP);
    assert_eq!(std::fs::read(outside.0.join("secret")).unwrap(), b"secret");
    // xattrs of a symlink node do not reach the target.
    let mut a = le(&[1, 0], &[4, 4]);
    a.extend(name("user.x"));
    a.push(b'v');
    assert_eq!(d.call(op::SETXATTR, secret, &a, 16).errno, libc::EPERM);
    // Device nodes are refused by default.
    let mut a = le(&[u64::from(libc::S_IFCHR | 0o666), 0x0103, 0, 0], &[4, 4, 4, 4]);
    a.extend(name("null"));
    assert_eq!(d.call(op::MKNOD, ROOT, &a, 16 + 128).errno, libc::EPERM);
    let mut a = le(&[u64::from(libc::S_IFIFO | 0o644), 0, 0, 0], &[4, 4, 4, 4]);
    a.extend(name("fifo"));
    let fifo = d.call(op::MKNOD, ROOT, &a, 16 + 128).u64_at(0);
    assert_eq!(
        d.open(fifo, 0),
        Err(libc::EACCES),
        "a FIFO is never opened (it would block a worker)"
    );
}

/// Where an fd of this process points.
fn fd_path(fd: i32) -> String {
    std::fs::read_link(format!("/proc/self/fd/{fd}"))
        .map_or_else(|_| String::new(), |p| p.display().to_string())
}

#[test]
fn a_rename_race_never_leads_a_walk_outside() {
    let outside = TempDir::new("race-out");
    std::fs::write(outside.0.join("secret"), b"secret").unwrap();
    let dir = TempDir::new("race");
    std::fs::create_dir_all(dir.0.join("a/b/c")).unwrap();
    std::fs::write(dir.0.join("a/b/c/file"), b"in").unwrap();
    let root = std::fs::canonicalize(&dir.0).unwrap().display().to_string();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    // Another thread keeps swapping a directory with a symlink to outside, and renaming levels around.
    let swapper = {
        let (stop, base, out) = (stop.clone(), dir.0.clone(), outside.0.clone());
        std::thread::spawn(move || {
            let mut i = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let _ = std::fs::rename(base.join("a/b"), base.join("a/tmp"));
                let _ = std::os::unix::fs::symlink(&out, base.join("a/b"));
                let _ = std::fs::remove_file(base.join("a/b"));
                let _ = std::fs::rename(base.join("a/tmp"), base.join("a/b"));
                i += 1;
            }
            i
        })
    };
    let mut d = Driver::mounted(Config::new(&dir.0));
    let mut opened = 0;
    for _ in 0..3000 {
        let Ok(a) = d.lookup(ROOT, "a") else { continue };
        let Ok(b) = d.lookup(a, "b") else { continue };
        for n in ["c", "secret"] {
            let Ok(x) = d.lookup(b, n) else { continue };
            assert_ne!(n, "secret", "a name outside resolved");
            if let Ok(c) = d.lookup(x, "file") {
                if let Ok(fh) = d.open(c, 0) {
                    assert_eq!(d.read(fh, 0, 10).unwrap(), b"in");
                    let h = d.server.fs().handle(fh).unwrap();
                    let p = fd_path(h.fd());
                    assert!(p.starts_with(&root), "{p} is outside {root}");
                    d.release(fh, false);
                    opened += 1;
                }
            }
        }
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let swaps = swapper.join().unwrap();
    assert!(swaps > 10, "the race ran ({swaps} swaps)");
    assert!(opened > 0, "some walks got through");
}

#[test]
fn read_only_refuses_every_change_before_the_host_sees_it() {
    let dir = TempDir::new("ro");
    std::fs::write(dir.0.join("f"), b"data").unwrap();
    let mut cfg = Config::new(&dir.0);
    cfg.read_only = true;
    let mut d = Driver::mounted(cfg);
    let f = d.lookup(ROOT, "f").unwrap();
    assert_eq!(d.open(f, O_RDWR), Err(libc::EROFS));
    assert_eq!(d.open(f, libc::O_TRUNC as u32), Err(libc::EROFS));
    assert_eq!(d.create(ROOT, "g", O_RDWR, 0o644), Err(libc::EROFS));
    assert_eq!(d.mkdir(ROOT, "d", 0o755), Err(libc::EROFS));
    assert_eq!(d.call(op::UNLINK, ROOT, &name("f"), 16).errno, libc::EROFS);
    let fh = d.open(f, 0).unwrap();
    assert_eq!(d.write(fh, 0, b"x"), Err(libc::EROFS));
    assert_eq!(d.read(fh, 0, 10).unwrap(), b"data");
    assert_eq!(std::fs::read(dir.0.join("f")).unwrap(), b"data");
    assert_eq!(std::fs::read_dir(&dir.0).unwrap().count(), 1);
}

#[test]
fn the_xattr_policy_hides_trusted_and_security() {
    let dir = TempDir::new("xattr");
    std::fs::write(dir.0.join("f"), b"").unwrap();
    let mut d = Driver::mounted(Config::new(&dir.0));
    let f = d.lookup(ROOT, "f").unwrap();
    let set = |d: &mut Driver, n: &str, v: &[u8]| {
        let mut a = le(&[v.len() as u64, 0], &[4, 4]);
        a.extend(name(n));
        a.extend_from_slice(v);
        d.call(op::SETXATTR, f, &a, 16).errno
    };
    let user = set(&mut d, "user.k", b"value");
    if user == libc::EOPNOTSUPP {
        eprintln!("skipped: the temp directory's file system has no user xattrs");
        return;
    }
    assert_eq!(user, 0);
    assert_eq!(set(&mut d, "trusted.k", b"v"), libc::EPERM);
    assert_eq!(set(&mut d, "security.capability", b"v"), libc::EPERM);
    let mut a = le(&[0, 0], &[4, 4]);
    a.extend(name("user.k"));
    let r = d.call(op::GETXATTR, f, &a, 24);
    assert_eq!((r.errno, r.u32_at(0)), (0, 5), "size query");
    let mut a = le(&[64, 0], &[4, 4]);
    a.extend(name("user.k"));
    assert_eq!(d.call(op::GETXATTR, f, &a, 16 + 64).ok(), b"value");
    let mut a = le(&[2, 0], &[4, 4]);
    a.extend(name("user.k"));
    assert_eq!(d.call(op::GETXATTR, f, &a, 16 + 64).errno, libc::ERANGE);
    // As root the host can set trusted.*: the driver still never sees it.
    let host = std::ffi::CString::new(dir.0.join("f").display().to_string()).unwrap();
    // SAFETY: NUL-terminated path and name; a 1-byte value.
    unsafe {
        libc::setxattr(
            host.as_ptr(),
            c"trusted.hidden".as_ptr(),
            b"1".as_ptr().cast(),
            1,
            0,
        )
    };
    let r = d.call(op::LISTXATTR, f, &le(&[4096, 0], &[4, 4]), 16 + 4096);
    assert_eq!(r.ok(), b"user.k\0");
    let mut a = le(&[64, 0], &[4, 4]);
    a.extend(name("trusted.hidden"));
    assert_eq!(d.call(op::GETXATTR, f, &a, 16 + 64).errno, libc::ENODATA);
    // Off: the driver is told the operations do not exist.
    let mut cfg = Config::new(&dir.0);
    cfg.xattr = XattrPolicy::Off;
    let mut d = Driver::mounted(cfg);
    let f = d.lookup(ROOT, "f").unwrap();
    assert_eq!(
        d.call(op::LISTXATTR, f, &le(&[4096, 0], &[4, 4]), 16 + 4096)
            .errno,
        libc::ENOSYS
    );
}

#[test]
fn node_and_handle_limits_answer_enfile_and_emfile() {
    let dir = TempDir::new("limits");
    for i in 0..40 {
        std::fs::write(dir.0.join(format!("f{i}")), b"").unwrap();
    }
    let mut cfg = Config::new(&dir.0);
    cfg.max_nodes = 16;
    cfg.max_handles = 4;
    let mut d = Driver::mounted(cfg);
    let ids: Vec<_> = (0..16)
        .map(|i| d.lookup(ROOT, &format!("f{i}")).unwrap())
        .collect();
    assert_eq!(d.lookup(ROOT, "f16"), Err(libc::ENFILE));
    d.forget(ids[0], 1);
    assert!(d.lookup(ROOT, "f16").is_ok(), "a forgotten node frees its place");
    let fhs: Vec<_> = (1..5).map(|i| d.open(ids[i], 0).unwrap()).collect();
    assert_eq!(d.open(ids[5], 0), Err(libc::EMFILE));
    d.release(fhs[0], false);
    assert!(d.open(ids[5], 0).is_ok());
    // A new session (INIT) forgets everything.
    d.init();
    assert_eq!(d.server.fs().counts(), (0, 0));
    assert_eq!(d.open(ids[1], 0), Err(libc::ESTALE));
}

#[test]
fn cache_policies_set_validity_and_open_flags() {
    let dir = TempDir::new("cache");
    std::fs::write(dir.0.join("f"), b"").unwrap();
    for (cache, secs, fopen, inval) in [
        (CachePolicy::Never, 0, 1, false),
        (CachePolicy::Auto, 1, 0, true),
        (CachePolicy::Always, 86_400, 2, false),
    ] {
        let mut cfg = Config::new(&dir.0);
        cfg.cache = cache;
        let mut d = Driver::new(cfg);
        let init = d.init();
        assert_eq!(
            init.u32_at(12) & (1 << 12) != 0,
            inval,
            "{cache:?} AUTO_INVAL_DATA"
        );
        let r = d.call(op::LOOKUP, ROOT, &name("f"), 16 + 128);
        assert_eq!((r.u64_at(16), r.u64_at(24)), (secs, secs), "{cache:?}");
        let f = r.u64_at(0);
        let r = d.call(op::OPEN, f, &le(&[0, 0], &[4, 4]), 32);
        assert_eq!(r.u32_at(8), fopen, "{cache:?}");
    }
    let mut cfg = Config::new(&dir.0);
    cfg.cache = CachePolicy::Never;
    cfg.writeback = true;
    assert!(
        vduse_fs::PassthroughFs::new(cfg).is_err(),
        "writeback needs a cache"
    );
}

#[test]
fn creations_belong_to_the_caller() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: needs root");
        return;
    }
    let dir = TempDir::new("owner");
    std::fs::set_permissions(&dir.0, std::fs::Permissions::from_mode(0o777)).unwrap();
    let mut d = Driver::mounted(Config::new(&dir.0));
    d.uid = 1234;
    d.gid = 5678;
    d.mkdir(ROOT, "d", 0o755).unwrap();
    d.create(ROOT, "f", O_RDWR, 0o644).unwrap();
    for n in ["d", "f"] {
        let md = std::fs::metadata(dir.0.join(n)).unwrap();
        assert_eq!((md.uid(), md.gid()), (1234, 5678), "{n}");
    }
    // And the thread is root again afterwards.
    d.uid = 0;
    d.gid = 0;
    d.mkdir(ROOT, "r", 0o700).unwrap();
    assert_eq!(std::fs::metadata(dir.0.join("r")).unwrap().uid(), 0);
}

#[test]
fn create_over_an_existing_fifo_or_device_never_opens_it() {
    let dir = TempDir::new("create-existing");
    let mut d = Driver::mounted(Config::new(&dir.0));
    let mut a = le(&[u64::from(libc::S_IFIFO | 0o666), 0, 0, 0], &[4, 4, 4, 4]);
    a.extend(name("p"));
    assert_eq!(d.call(op::MKNOD, ROOT, &a, 16 + 128).errno, 0);
    // Without O_EXCL: the name exists and is not a regular file. Before, openat(O_CREAT) blocked here.
    assert_eq!(d.create(ROOT, "p", 0, 0o644), Err(libc::EACCES));
    assert_eq!(d.create(ROOT, "p", O_RDWR | O_EXCL, 0o644), Err(libc::EEXIST));
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        // A device node already in the tree (the host put it there): never opened either.
        let c = std::ffi::CString::new(dir.0.join("null").display().to_string()).unwrap();
        // SAFETY: a NUL-terminated path.
        let rc = unsafe { libc::mknod(c.as_ptr(), libc::S_IFCHR | 0o666, libc::makedev(1, 3)) };
        assert_eq!(rc, 0);
        assert_eq!(d.create(ROOT, "null", O_RDWR, 0o644), Err(libc::EACCES));
    }
    // An existing regular file is opened (and truncated when asked), as the kernel's O_CREAT would.
    std::fs::write(dir.0.join("f"), b"old data").unwrap();
    let (node, fh) = d.create(ROOT, "f", O_RDWR | libc::O_TRUNC as u32, 0o644).unwrap();
    assert_eq!(d.lookup(ROOT, "f"), Ok(node));
    assert_eq!(d.read(fh, 0, 100).unwrap(), b"");
    std::fs::create_dir(dir.0.join("d")).unwrap();
    assert_eq!(d.create(ROOT, "d", O_RDWR, 0o644), Err(libc::EISDIR));
}

#[test]
fn the_kernel_s_own_file_systems_and_other_mounts_are_never_entered() {
    // The root directory holds mount points: /proc and /sys at least.
    let mut d = Driver::mounted(Config::new("/"));
    assert_eq!(d.lookup(ROOT, "proc"), Err(libc::EACCES), "procfs");
    assert_eq!(d.lookup(ROOT, "sys"), Err(libc::EACCES), "sysfs");
    assert!(
        d.lookup(ROOT, "etc").is_ok(),
        "the share's own file system is served"
    );
    let mut cfg = Config::new("/");
    cfg.cross_mounts = true;
    let mut d = Driver::mounted(cfg);
    assert_eq!(
        d.lookup(ROOT, "proc"),
        Err(libc::EACCES),
        "procfs, even with cross_mounts"
    );
    assert_eq!(
        d.lookup(ROOT, "sys"),
        Err(libc::EACCES),
        "sysfs, even with cross_mounts"
    );
}

#[test]
fn ids_are_never_reused_across_sessions_and_unswitchable_ids_fail() {
    let dir = TempDir::new("ids");
    std::fs::write(dir.0.join("f"), b"").unwrap();
    let mut d = Driver::mounted(Config::new(&dir.0));
    let old = d.lookup(ROOT, "f").unwrap();
    let fh = d.open(old, 0).unwrap();
    d.init();
    let new = d.lookup(ROOT, "f").unwrap();
    assert_ne!(new, old, "a node id of the last session names nothing now");
    assert_eq!(d.open(new, 0).map(|h| h == fh), Ok(false));
    assert_eq!(d.read(fh, 0, 1), Err(libc::EBADF));
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        d.uid = u32::MAX;
        assert_eq!(
            d.mkdir(ROOT, "x", 0o755),
            Err(libc::EPERM),
            "not created as root instead"
        );
        assert!(!dir.0.join("x").exists());
    }
}

#[test]
fn setuid_bits_go_when_the_driver_says_the_writer_has_no_cap_fsetid() {
    use std::os::unix::fs::PermissionsExt as _;
    let dir = TempDir::new("killpriv");
    let mut d = Driver::mounted(Config::new(&dir.0));
    let init = d.init();
    assert_ne!(init.u32_at(12) & (1 << 28), 0, "HANDLE_KILLPRIV_V2 granted");
    let mode = |n: &str| std::fs::metadata(dir.0.join(n)).unwrap().permissions().mode() & 0o7777;
    let set = |n: &str, m: u32| {
        std::fs::set_permissions(dir.0.join(n), std::fs::Permissions::from_mode(m)).unwrap()
    };
    let (f, fh) = d.create(ROOT, "f", O_RDWR, 0o755).unwrap();
    set("f", 0o6755);
    // A write without the flag (a writer with CAP_FSETID) keeps them.
    d.write(fh, 0, b"a").unwrap();
    assert_eq!(mode("f"), 0o6755);
    // With it: setuid goes, setgid too (group-executable).
    let mut a = le(&[fh, 0, 1, 1 << 2, 0, 0, 0], &[8, 8, 4, 4, 8, 4, 4]);
    a.push(b'b');
    assert_eq!(d.call(op::WRITE, 0, &a, 24).errno, 0);
    assert_eq!(mode("f"), 0o755);
    // setgid without group-execute is a mandatory-locking mark, not a privilege: it stays.
    set("f", 0o2745);
    assert_eq!(d.call(op::WRITE, 0, &a, 24).errno, 0);
    assert_eq!(mode("f"), 0o2745);
    // A truncate (SETATTR size + KILL_SUIDGID), and an open with O_TRUNC and OPEN_KILL_SUIDGID.
    set("f", 0o4755);
    let mut sa = vec![0u8; 88];
    sa[..4].copy_from_slice(&(8u32 | (1 << 11)).to_le_bytes());
    assert_eq!(d.call(op::SETATTR, f, &sa, 16 + 104).errno, 0);
    assert_eq!(mode("f"), 0o755);
    set("f", 0o4755);
    let r = d.call(
        op::OPEN,
        f,
        &le(&[u64::from(O_RDWR | libc::O_TRUNC as u32), 1], &[4, 4]),
        32,
    );
    assert_eq!(r.errno, 0);
    assert_eq!(mode("f"), 0o755);
    // An open without O_TRUNC changes nothing.
    set("f", 0o4755);
    assert_eq!(
        d.call(op::OPEN, f, &le(&[u64::from(O_RDWR), 1], &[4, 4]), 32)
            .errno,
        0
    );
    assert_eq!(mode("f"), 0o4755);
}

#[test]
fn create_of_an_existing_file_is_checked_as_the_caller_and_procfs_is_never_a_share() {
    assert!(
        vduse_fs::PassthroughFs::new(Config::new("/proc")).is_err(),
        "a share on procfs"
    );
    assert!(
        vduse_fs::PassthroughFs::new(Config::new("/sys")).is_err(),
        "a share on sysfs"
    );
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return;
    }
    let dir = TempDir::new("create-perm");
    std::fs::set_permissions(&dir.0, std::fs::Permissions::from_mode(0o1777)).unwrap();
    std::fs::write(dir.0.join("private"), b"root's").unwrap();
    std::fs::set_permissions(dir.0.join("private"), std::fs::Permissions::from_mode(0o600)).unwrap();
    let mut d = Driver::mounted(Config::new(&dir.0));
    d.uid = 1234;
    d.gid = 1234;
    // The driver's kernel checks nothing on an open that became a CREATE: the host must.
    assert_eq!(
        d.create(ROOT, "private", O_RDWR | libc::O_TRUNC as u32, 0o644),
        Err(libc::EACCES)
    );
    assert_eq!(
        std::fs::read(dir.0.join("private")).unwrap(),
        b"root's",
        "not truncated"
    );
    // A non-root caller's fallocate and copy_file_range clear setuid, as its writes do.
    d.uid = 0;
    d.gid = 0;
    let (_, src) = d.create(ROOT, "src", O_RDWR, 0o644).unwrap();
    d.write(src, 0, &[1u8; 4096]).unwrap();
    let (_, dst) = d.create(ROOT, "dst", O_RDWR, 0o755).unwrap();
    std::fs::set_permissions(dir.0.join("dst"), std::fs::Permissions::from_mode(0o4755)).unwrap();
    d.uid = 1234;
    let r = d.call(
        op::COPY_FILE_RANGE,
        0,
        &le(&[src, 0, 0, dst, 0, 4096, 0], &[8; 7]),
        24,
    );
    assert_eq!(r.errno, 0);
    let mode = || std::fs::metadata(dir.0.join("dst")).unwrap().permissions().mode() & 0o7777;
    assert_eq!(mode(), 0o755);
    std::fs::set_permissions(dir.0.join("dst"), std::fs::Permissions::from_mode(0o4755)).unwrap();
    let r = d.call(op::FALLOCATE, 0, &le(&[dst, 0, 8192, 0, 0], &[8, 8, 8, 4, 4]), 16);
    assert_eq!(r.errno, 0);
    assert_eq!(mode(), 0o755);
}
