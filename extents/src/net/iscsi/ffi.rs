//! Hand-written declarations of the libiscsi 1.19 functions this extent uses (from
//! `/usr/include/iscsi/iscsi.h` and `scsi-lowlevel.h`), and a mirror of the leading fields of
//! `struct scsi_task`, which the library allocates and we only read.
//!
//! Nothing here is safe to call on its own: every function takes a context that must be used
//! by one thread at a time (libiscsi contexts are not thread-safe), and every task pointer
//! belongs to the library until its callback has run. [`super::session`] wraps them.

use std::ffi::{c_char, c_int, c_void};

/// `struct iscsi_context`: opaque.
#[repr(C)]
pub(crate) struct IscsiContext {
    _private: [u8; 0],
}

/// `struct scsi_sense` (16 bytes with gcc on x86-64; offsets checked below).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct ScsiSense {
    pub error_type: u8,
    /// `enum scsi_sense_key`.
    pub key: c_int,
    /// Additional sense code and qualifier: `asc << 8 | ascq`.
    pub ascq: c_int,
    /// The bit fields `sense_specific:1, ill_param_in_cdb:1, bit_pointer_valid:1`.
    pub bits: u8,
    pub bit_pointer: u8,
    pub field_pointer: u16,
}

/// `struct scsi_data`.
#[repr(C)]
pub(crate) struct ScsiData {
    pub size: c_int,
    pub data: *mut u8,
}

/// The leading fields of `struct scsi_task`, up to `datain` (the rest is never touched). We
/// never create, move or free one: the library allocates it, passes it to our callback, and
/// [`scsi_free_scsi_task`] frees it.
#[repr(C)]
pub(crate) struct ScsiTask {
    pub status: c_int,
    pub cdb_size: c_int,
    pub xfer_dir: c_int,
    pub expxferlen: c_int,
    pub cdb: [u8; 16],
    /// `enum scsi_residual`.
    pub residual_status: c_int,
    pub residual: usize,
    pub sense: ScsiSense,
    pub datain: ScsiData,
}

// The C layout, as gcc computes it from the 1.19 headers (offsetof): a mismatch would make us
// read the wrong bytes, so the build stops instead.
const _: () = {
    use std::mem::{offset_of, size_of};
    assert!(size_of::<ScsiSense>() == 16);
    assert!(offset_of!(ScsiSense, key) == 4);
    assert!(offset_of!(ScsiSense, ascq) == 8);
    assert!(offset_of!(ScsiSense, bit_pointer) == 13);
    assert!(offset_of!(ScsiSense, field_pointer) == 14);
    assert!(offset_of!(ScsiTask, cdb) == 16);
    assert!(offset_of!(ScsiTask, residual_status) == 32);
    assert!(offset_of!(ScsiTask, residual) == 40);
    assert!(offset_of!(ScsiTask, sense) == 48);
    assert!(offset_of!(ScsiTask, datain) == 64);
    assert!(size_of::<ScsiTask>() == 80);
    assert!(size_of::<UnmapList>() == 16);
};

/// `struct unmap_list`: one UNMAP block descriptor (the library copies it into the task).
#[repr(C)]
pub(crate) struct UnmapList {
    pub lba: u64,
    pub num: u32,
}

/// `iscsi_command_cb`: `(context, status, command data (the task for SCSI commands),
/// private data)`.
pub(crate) type CommandCb =
    unsafe extern "C" fn(*mut IscsiContext, c_int, *mut c_void, *mut c_void);

/// `enum scsi_status` values we look at.
pub(crate) const SCSI_STATUS_GOOD: c_int = 0;
pub(crate) const SCSI_STATUS_CHECK_CONDITION: c_int = 2;
pub(crate) const SCSI_STATUS_BUSY: c_int = 8;
pub(crate) const SCSI_STATUS_RESERVATION_CONFLICT: c_int = 0x18;
pub(crate) const SCSI_STATUS_TASK_SET_FULL: c_int = 0x28;
pub(crate) const SCSI_STATUS_TASK_ABORTED: c_int = 0x40;
pub(crate) const SCSI_STATUS_CANCELLED: c_int = 0x0f00_0000;
pub(crate) const SCSI_STATUS_ERROR: c_int = 0x0f00_0001;
pub(crate) const SCSI_STATUS_TIMEOUT: c_int = 0x0f00_0002;

/// `SCSI_RESIDUAL_UNDERFLOW`: the target moved less data than asked.
pub(crate) const SCSI_RESIDUAL_UNDERFLOW: c_int = 1;

/// `ISCSI_SESSION_NORMAL`.
pub(crate) const ISCSI_SESSION_NORMAL: c_int = 2;
/// `ISCSI_HEADER_DIGEST_NONE`.
pub(crate) const ISCSI_HEADER_DIGEST_NONE: c_int = 0;

#[link(name = "iscsi")]
extern "C" {
    pub(crate) fn iscsi_create_context(initiator_name: *const c_char) -> *mut IscsiContext;
    pub(crate) fn iscsi_destroy_context(iscsi: *mut IscsiContext) -> c_int;
    pub(crate) fn iscsi_set_targetname(iscsi: *mut IscsiContext, name: *const c_char) -> c_int;
    pub(crate) fn iscsi_set_session_type(iscsi: *mut IscsiContext, session_type: c_int) -> c_int;
    pub(crate) fn iscsi_set_header_digest(iscsi: *mut IscsiContext, digest: c_int) -> c_int;
    pub(crate) fn iscsi_set_initiator_username_pwd(
        iscsi: *mut IscsiContext,
        user: *const c_char,
        passwd: *const c_char,
    ) -> c_int;
    pub(crate) fn iscsi_set_noautoreconnect(iscsi: *mut IscsiContext, state: c_int);
    pub(crate) fn iscsi_full_connect_async(
        iscsi: *mut IscsiContext,
        portal: *const c_char,
        lun: c_int,
        cb: CommandCb,
        private_data: *mut c_void,
    ) -> c_int;
    pub(crate) fn iscsi_get_fd(iscsi: *mut IscsiContext) -> c_int;
    pub(crate) fn iscsi_which_events(iscsi: *mut IscsiContext) -> c_int;
    pub(crate) fn iscsi_service(iscsi: *mut IscsiContext, revents: c_int) -> c_int;
    pub(crate) fn iscsi_get_error(iscsi: *mut IscsiContext) -> *const c_char;

    pub(crate) fn iscsi_inquiry_task(
        iscsi: *mut IscsiContext,
        lun: c_int,
        evpd: c_int,
        page_code: c_int,
        maxsize: c_int,
        cb: CommandCb,
        private_data: *mut c_void,
    ) -> *mut ScsiTask;
    pub(crate) fn iscsi_readcapacity16_task(
        iscsi: *mut IscsiContext,
        lun: c_int,
        cb: CommandCb,
        private_data: *mut c_void,
    ) -> *mut ScsiTask;
    pub(crate) fn iscsi_read16_task(
        iscsi: *mut IscsiContext,
        lun: c_int,
        lba: u64,
        datalen: u32,
        blocksize: c_int,
        rdprotect: c_int,
        dpo: c_int,
        fua: c_int,
        fua_nv: c_int,
        group_number: c_int,
        cb: CommandCb,
        private_data: *mut c_void,
    ) -> *mut ScsiTask;
    pub(crate) fn iscsi_write16_task(
        iscsi: *mut IscsiContext,
        lun: c_int,
        lba: u64,
        data: *mut u8,
        datalen: u32,
        blocksize: c_int,
        wrprotect: c_int,
        dpo: c_int,
        fua: c_int,
        fua_nv: c_int,
        group_number: c_int,
        cb: CommandCb,
        private_data: *mut c_void,
    ) -> *mut ScsiTask;
    pub(crate) fn iscsi_synchronizecache16_task(
        iscsi: *mut IscsiContext,
        lun: c_int,
        lba: u64,
        num_blocks: u32,
        syncnv: c_int,
        immed: c_int,
        cb: CommandCb,
        private_data: *mut c_void,
    ) -> *mut ScsiTask;
    pub(crate) fn iscsi_unmap_task(
        iscsi: *mut IscsiContext,
        lun: c_int,
        anchor: c_int,
        group: c_int,
        list: *mut UnmapList,
        list_len: c_int,
        cb: CommandCb,
        private_data: *mut c_void,
    ) -> *mut ScsiTask;
    pub(crate) fn iscsi_writesame16_task(
        iscsi: *mut IscsiContext,
        lun: c_int,
        lba: u64,
        data: *mut u8,
        datalen: u32,
        num_blocks: u32,
        anchor: c_int,
        unmap: c_int,
        wrprotect: c_int,
        group: c_int,
        cb: CommandCb,
        private_data: *mut c_void,
    ) -> *mut ScsiTask;
    pub(crate) fn scsi_task_add_data_in_buffer(
        task: *mut ScsiTask,
        len: c_int,
        buf: *mut u8,
    ) -> c_int;
    pub(crate) fn scsi_free_scsi_task(task: *mut ScsiTask);
    pub(crate) fn scsi_sense_ascq_str(ascq: c_int) -> *const c_char;
}

#[cfg(test)]
extern "C" {
    fn scsi_create_task(
        cdb_size: c_int,
        cdb: *mut u8,
        xfer_dir: c_int,
        expxferlen: c_int,
    ) -> *mut ScsiTask;
    fn scsi_parse_sense_data(sense: *mut ScsiSense, sb: *const u8);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The library's own idea of where the fields are agrees with our mirror.
    #[test]
    fn task_and_sense_layout_match_the_library() {
        let mut cdb = [0x88u8, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15];
        // SAFETY: `cdb` outlives the call (the library copies it); the task is freed below.
        let t = unsafe { scsi_create_task(16, cdb.as_mut_ptr(), 1, 4096) };
        assert!(!t.is_null());
        // SAFETY: `t` is a live task the library allocated; we read the fields it set.
        let (size, dir, len, bytes) =
            unsafe { ((*t).cdb_size, (*t).xfer_dir, (*t).expxferlen, (*t).cdb) };
        // SAFETY: `t` came from scsi_create_task and is freed once.
        unsafe { scsi_free_scsi_task(t) };
        assert_eq!((size, dir, len), (16, 1, 4096));
        assert_eq!(bytes, cdb);

        // Fixed-format sense: MEDIUM ERROR, ASC 0x11 ASCQ 0x00 (unrecovered read error).
        let mut sb = [0u8; 18];
        sb[0] = 0x70;
        sb[2] = 0x03;
        sb[7] = 10;
        sb[12] = 0x11;
        let mut s = ScsiSense::default();
        // SAFETY: `s` and `sb` are valid for the call; 18 bytes is a full fixed-format block.
        unsafe { scsi_parse_sense_data(&mut s, sb.as_ptr()) };
        assert_eq!((s.error_type, s.key, s.ascq), (0x70, 3, 0x1100));
    }
}
