//! The VDUSE user-space API (`include/uapi/linux/vduse.h`) as of Linux 6.12 (API version 0), plus the
//! few additions of later kernels that we must recognise so as not to break there.
//!
//! No crate ships these bindings; layouts are checked at compile time against the sizes and offsets
//! read from the BTF of Debian's 6.12.117 `vduse.ko`.

#![allow(non_camel_case_types)]

use std::mem::{offset_of, size_of};

use vmm_sys_util::{ioctl_io_nr, ioctl_ior_nr, ioctl_iow_nr, ioctl_iowr_nr};

/// Path of the VDUSE control node.
pub const CONTROL_PATH: &str = "/dev/vduse/control";
/// Directory holding one node per created device.
pub const DEV_DIR: &str = "/dev/vduse";

/// The only API version 6.12 speaks; 7.0 adds version 1 (vq groups, address spaces).
pub const VDUSE_API_VERSION_0: u64 = 0;
/// Bytes in a device name including the terminating NUL.
pub const VDUSE_NAME_MAX: usize = 256;

pub const VDUSE_ACCESS_RO: u8 = 0x1;
pub const VDUSE_ACCESS_WO: u8 = 0x2;
pub const VDUSE_ACCESS_RW: u8 = 0x3;

/// Message types read from `/dev/vduse/$NAME`.
pub const VDUSE_GET_VQ_STATE: u32 = 0;
pub const VDUSE_SET_STATUS: u32 = 1;
pub const VDUSE_UPDATE_IOTLB: u32 = 2;
/// 7.0+, API v1 only.
pub const VDUSE_SET_VQ_GROUP_ASID: u32 = 3;
/// 7.3+, only with `VDUSE_F_QUEUE_READY`.
pub const VDUSE_SET_VQ_READY: u32 = 4;
/// 7.3+, only with `VDUSE_F_SUSPEND`.
pub const VDUSE_SUSPEND: u32 = 5;

pub const VDUSE_REQ_RESULT_OK: u32 = 0;
pub const VDUSE_REQ_RESULT_FAILED: u32 = 1;

/// `vq_num` is a `u32` in the ABI but the kernel caps it here.
pub const VDUSE_MAX_VQ_NUM: u32 = 0xffff;
/// Largest split-ring size the kernel and virtio-queue accept.
pub const VDUSE_MAX_VQ_SIZE: u16 = 32768;
/// `config_size` limit (`PAGE_SIZE` on x86-64/arm64 with 4 KiB pages).
pub const VDUSE_MAX_CONFIG_SIZE: usize = 4096;

/// `struct vduse_dev_config` without its trailing flexible `config[]` array.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct vduse_dev_config {
    pub name: [u8; VDUSE_NAME_MAX],
    pub vendor_id: u32,
    pub device_id: u32,
    pub features: u64,
    pub vq_num: u32,
    pub vq_align: u32,
    pub reserved: [u32; 13],
    pub config_size: u32,
}

impl vduse_dev_config {
    /// The struct's bytes, as `VDUSE_CREATE_DEV` reads them.
    pub fn as_bytes(&self) -> &[u8] {
        // SAFETY: a repr(C) struct of integers and byte arrays without padding (size asserted below);
        // every byte is initialized.
        unsafe { std::slice::from_raw_parts((self as *const Self).cast::<u8>(), size_of::<Self>()) }
    }
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct vduse_iotlb_entry {
    pub offset: u64,
    pub start: u64,
    pub last: u64,
    pub perm: u8,
}

/// `struct vduse_config_data` without its trailing `buffer[]`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct vduse_config_data {
    pub offset: u32,
    pub length: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct vduse_vq_config {
    pub index: u32,
    pub max_size: u16,
    pub reserved: [u16; 13],
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct vduse_vq_state_split {
    pub avail_index: u16,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct vduse_vq_state_packed {
    pub last_avail_counter: u16,
    pub last_avail_idx: u16,
    pub last_used_counter: u16,
    pub last_used_idx: u16,
}

#[repr(C)]
#[derive(Clone, Copy)]
pub union vduse_vq_state_union {
    pub split: vduse_vq_state_split,
    pub packed: vduse_vq_state_packed,
}

impl Default for vduse_vq_state_union {
    fn default() -> Self {
        Self {
            packed: vduse_vq_state_packed::default(),
        }
    }
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
pub struct vduse_vq_info {
    pub index: u32,
    pub num: u32,
    pub desc_addr: u64,
    pub driver_addr: u64,
    pub device_addr: u64,
    pub state: vduse_vq_state_union,
    pub ready: u8,
}

impl vduse_vq_info {
    /// The split-ring avail index the driver set (not live progress).
    pub fn split_avail_index(&self) -> u16 {
        // SAFETY: both union members are plain integers; any bit pattern is a valid `split`.
        unsafe { self.state.split.avail_index }
    }
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct vduse_vq_eventfd {
    pub index: u32,
    pub fd: i32,
}

/// `fd` value that detaches a kick eventfd.
pub const VDUSE_EVENTFD_DEASSIGN: i32 = -1;

#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct vduse_iova_umem {
    pub uaddr: u64,
    pub iova: u64,
    pub size: u64,
    pub reserved: [u64; 3],
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct vduse_iova_info {
    pub start: u64,
    pub last: u64,
    pub capability: u64,
    pub reserved: [u64; 3],
}

/// `VDUSE_IOVA_CAP_UMEM`: the region is the bounce buffer and can be replaced by user memory.
pub const VDUSE_IOVA_CAP_UMEM: u64 = 1;

/// 7.0+ (API v1) `struct vduse_iotlb_entry_v2`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct vduse_iotlb_entry_v2 {
    pub offset: u64,
    pub start: u64,
    pub last: u64,
    pub perm: u8,
    pub padding: [u8; 7],
    pub asid: u32,
    pub reserved: [u32; 11],
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct vduse_vq_state {
    pub index: u32,
    /// Split or packed state; for split rings only the first `u16` is meaningful.
    pub packed: vduse_vq_state_packed,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct vduse_iova_range {
    pub start: u64,
    pub last: u64,
}

/// One control message from the kernel: exactly what `read()` returns.
#[repr(C, align(8))]
#[derive(Clone, Copy, Default)]
pub struct vduse_dev_request {
    pub type_: u32,
    pub request_id: u32,
    pub reserved: [u32; 4],
    /// The type-dependent payload (`vq_state`, `s.status`, `iova`, …); decode with the accessors.
    pub payload: [u32; 32],
}

impl vduse_dev_request {
    /// The bytes `read()` fills.
    pub fn as_mut_bytes(&mut self) -> &mut [u8] {
        // SAFETY: plain old data of fixed size; every bit pattern is a valid request.
        unsafe { std::slice::from_raw_parts_mut((self as *mut Self).cast::<u8>(), size_of::<Self>()) }
    }

    fn payload_bytes(&self) -> [u8; 128] {
        let mut out = [0u8; 128];
        for (chunk, word) in out.chunks_exact_mut(4).zip(self.payload.iter()) {
            chunk.copy_from_slice(&word.to_ne_bytes());
        }
        out
    }
    /// `s.status` of a `VDUSE_SET_STATUS` message.
    pub fn status(&self) -> u8 {
        self.payload_bytes()[0]
    }
    /// `vq_state.index` of a `VDUSE_GET_VQ_STATE` message.
    pub fn vq_index(&self) -> u32 {
        self.payload[0]
    }
    /// `iova` of a `VDUSE_UPDATE_IOTLB` message.
    pub fn iova(&self) -> vduse_iova_range {
        let b = self.payload_bytes();
        vduse_iova_range {
            start: u64::from_ne_bytes(b[0..8].try_into().unwrap()),
            last: u64::from_ne_bytes(b[8..16].try_into().unwrap()),
        }
    }
    /// The two `u32`s of `vq_group_asid` / `vq_ready` (7.0+ / 7.3+ messages).
    pub fn pair(&self) -> (u32, u32) {
        (self.payload[0], self.payload[1])
    }
}

/// The reply to one message: exactly what `write()` takes. `reserved` must stay zero.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct vduse_dev_response {
    pub request_id: u32,
    pub result: u32,
    pub reserved: [u32; 4],
    pub payload: [u32; 32],
}

impl vduse_dev_response {
    /// The bytes `write()` sends.
    pub fn as_bytes(&self) -> &[u8] {
        // SAFETY: plain old data of fixed size without padding.
        unsafe { std::slice::from_raw_parts((self as *const Self).cast::<u8>(), size_of::<Self>()) }
    }

    pub fn new(request_id: u32, ok: bool) -> Self {
        Self {
            request_id,
            result: if ok {
                VDUSE_REQ_RESULT_OK
            } else {
                VDUSE_REQ_RESULT_FAILED
            },
            reserved: [0; 4],
            payload: [0; 32],
        }
    }
    /// Fills `vq_state` for a `VDUSE_GET_VQ_STATE` reply (split ring: the next avail index).
    pub fn set_split_vq_state(&mut self, index: u32, avail_index: u16) {
        self.payload[0] = index;
        self.payload[1] = u32::from(avail_index);
    }
}

pub const VDUSE_BASE: u32 = 0x81;

ioctl_ior_nr!(VDUSE_GET_API_VERSION, VDUSE_BASE, 0x00, u64);
ioctl_iow_nr!(VDUSE_SET_API_VERSION, VDUSE_BASE, 0x01, u64);
ioctl_iow_nr!(VDUSE_CREATE_DEV, VDUSE_BASE, 0x02, vduse_dev_config);
ioctl_iow_nr!(VDUSE_DESTROY_DEV, VDUSE_BASE, 0x03, [u8; VDUSE_NAME_MAX]);
// 7.3+: the VDUSE feature mask; EINVAL before that, which is how we probe.
ioctl_ior_nr!(VDUSE_GET_FEATURES, VDUSE_BASE, 0x04, u64);
ioctl_iow_nr!(VDUSE_SET_FEATURES, VDUSE_BASE, 0x05, u64);

ioctl_iowr_nr!(VDUSE_IOTLB_GET_FD, VDUSE_BASE, 0x10, vduse_iotlb_entry);
ioctl_ior_nr!(VDUSE_DEV_GET_FEATURES, VDUSE_BASE, 0x11, u64);
ioctl_iow_nr!(VDUSE_DEV_SET_CONFIG, VDUSE_BASE, 0x12, vduse_config_data);
ioctl_io_nr!(VDUSE_DEV_INJECT_CONFIG_IRQ, VDUSE_BASE, 0x13);
ioctl_iow_nr!(VDUSE_VQ_SETUP, VDUSE_BASE, 0x14, vduse_vq_config);
ioctl_iowr_nr!(VDUSE_VQ_GET_INFO, VDUSE_BASE, 0x15, vduse_vq_info);
ioctl_iow_nr!(VDUSE_VQ_SETUP_KICKFD, VDUSE_BASE, 0x16, vduse_vq_eventfd);
ioctl_iow_nr!(VDUSE_VQ_INJECT_IRQ, VDUSE_BASE, 0x17, u32);
ioctl_iow_nr!(VDUSE_IOTLB_REG_UMEM, VDUSE_BASE, 0x18, vduse_iova_umem);
ioctl_iow_nr!(VDUSE_IOTLB_DEREG_UMEM, VDUSE_BASE, 0x19, vduse_iova_umem);
ioctl_iowr_nr!(VDUSE_IOTLB_GET_INFO, VDUSE_BASE, 0x1a, vduse_iova_info);
ioctl_iowr_nr!(VDUSE_IOTLB_GET_FD2, VDUSE_BASE, 0x1b, vduse_iotlb_entry_v2);

// Layouts as the 6.12 kernel sees them (BTF of vduse.ko). A mismatch fails the build, not a device.
const _: () = {
    assert!(size_of::<vduse_dev_config>() == 336);
    assert!(offset_of!(vduse_dev_config, vendor_id) == 256);
    assert!(offset_of!(vduse_dev_config, device_id) == 260);
    assert!(offset_of!(vduse_dev_config, features) == 264);
    assert!(offset_of!(vduse_dev_config, vq_num) == 272);
    assert!(offset_of!(vduse_dev_config, vq_align) == 276);
    assert!(offset_of!(vduse_dev_config, reserved) == 280);
    assert!(offset_of!(vduse_dev_config, config_size) == 332);
    assert!(size_of::<vduse_iotlb_entry>() == 32);
    assert!(offset_of!(vduse_iotlb_entry, perm) == 24);
    assert!(size_of::<vduse_config_data>() == 8);
    assert!(size_of::<vduse_vq_config>() == 32);
    assert!(offset_of!(vduse_vq_config, max_size) == 4);
    assert!(size_of::<vduse_vq_info>() == 48);
    assert!(offset_of!(vduse_vq_info, desc_addr) == 8);
    assert!(offset_of!(vduse_vq_info, driver_addr) == 16);
    assert!(offset_of!(vduse_vq_info, device_addr) == 24);
    assert!(offset_of!(vduse_vq_info, state) == 32);
    assert!(offset_of!(vduse_vq_info, ready) == 40);
    assert!(size_of::<vduse_vq_eventfd>() == 8);
    assert!(size_of::<vduse_vq_state>() == 12);
    assert!(size_of::<vduse_iova_umem>() == 48);
    assert!(size_of::<vduse_iova_info>() == 48);
    assert!(size_of::<vduse_iotlb_entry_v2>() == 80);
    assert!(offset_of!(vduse_iotlb_entry_v2, asid) == 32);
    assert!(size_of::<vduse_dev_request>() == 152);
    assert!(offset_of!(vduse_dev_request, payload) == 24);
    assert!(size_of::<vduse_dev_response>() == 152);
    assert!(offset_of!(vduse_dev_response, payload) == 24);
};

#[cfg(test)]
mod tests {
    use super::*;

    /// Encoded request numbers as the x86-64 kernel defines them (vduse-uapi reference, §3/§4).
    #[test]
    fn ioctl_numbers_match_the_kernel() {
        let table: &[(&str, libc::c_ulong, libc::c_ulong)] = &[
            ("GET_API_VERSION", VDUSE_GET_API_VERSION(), 0x8008_8100),
            ("SET_API_VERSION", VDUSE_SET_API_VERSION(), 0x4008_8101),
            ("CREATE_DEV", VDUSE_CREATE_DEV(), 0x4150_8102),
            ("DESTROY_DEV", VDUSE_DESTROY_DEV(), 0x4100_8103),
            ("GET_FEATURES", VDUSE_GET_FEATURES(), 0x8008_8104),
            ("SET_FEATURES", VDUSE_SET_FEATURES(), 0x4008_8105),
            ("IOTLB_GET_FD", VDUSE_IOTLB_GET_FD(), 0xc020_8110),
            ("DEV_GET_FEATURES", VDUSE_DEV_GET_FEATURES(), 0x8008_8111),
            ("DEV_SET_CONFIG", VDUSE_DEV_SET_CONFIG(), 0x4008_8112),
            (
                "DEV_INJECT_CONFIG_IRQ",
                VDUSE_DEV_INJECT_CONFIG_IRQ(),
                0x0000_8113,
            ),
            ("VQ_SETUP", VDUSE_VQ_SETUP(), 0x4020_8114),
            ("VQ_GET_INFO", VDUSE_VQ_GET_INFO(), 0xc030_8115),
            ("VQ_SETUP_KICKFD", VDUSE_VQ_SETUP_KICKFD(), 0x4008_8116),
            ("VQ_INJECT_IRQ", VDUSE_VQ_INJECT_IRQ(), 0x4004_8117),
            ("IOTLB_REG_UMEM", VDUSE_IOTLB_REG_UMEM(), 0x4030_8118),
            ("IOTLB_DEREG_UMEM", VDUSE_IOTLB_DEREG_UMEM(), 0x4030_8119),
            ("IOTLB_GET_INFO", VDUSE_IOTLB_GET_INFO(), 0xc030_811a),
            ("IOTLB_GET_FD2", VDUSE_IOTLB_GET_FD2(), 0xc050_811b),
        ];
        for (name, got, want) in table {
            assert_eq!(got, want, "VDUSE_{name}: {got:#x} != {want:#x}");
        }
    }

    #[test]
    fn request_payload_accessors_decode_the_union() {
        let mut req = vduse_dev_request {
            type_: VDUSE_UPDATE_IOTLB,
            ..Default::default()
        };
        req.payload[0] = 0x1000;
        req.payload[1] = 0;
        req.payload[2] = u32::MAX;
        req.payload[3] = u32::MAX;
        assert_eq!(
            req.iova(),
            vduse_iova_range {
                start: 0x1000,
                last: u64::MAX
            }
        );
        let mut req = vduse_dev_request {
            type_: VDUSE_SET_STATUS,
            ..Default::default()
        };
        req.payload[0] = 0x0f;
        assert_eq!(req.status(), 0x0f);
    }

    #[test]
    fn responses_keep_reserved_zero() {
        let mut r = vduse_dev_response::new(7, true);
        r.set_split_vq_state(3, 0x1234);
        assert_eq!(r.reserved, [0; 4]);
        assert_eq!(r.result, VDUSE_REQ_RESULT_OK);
        assert_eq!((r.payload[0], r.payload[1]), (3, 0x1234));
        assert_eq!(vduse_dev_response::new(1, false).result, VDUSE_REQ_RESULT_FAILED);
    }
}
