//! The librados and librbd functions we call (Ceph 16.2's `rados/librados.h` and
//! `rbd/librbd.h`), declared by hand: only these, with the headers' exact types.

#![allow(non_camel_case_types)]

use std::ffi::{c_char, c_int, c_void};

/// `rados_t`: a cluster handle.
pub(crate) type rados_t = *mut c_void;
/// `rados_ioctx_t`: a pool's I/O context.
pub(crate) type rados_ioctx_t = *mut c_void;
/// `rados_completion_t`.
pub(crate) type rados_completion_t = *mut c_void;
/// `rados_write_op_t`.
pub(crate) type rados_write_op_t = *mut c_void;
/// `rados_callback_t`.
pub(crate) type rados_callback_t = extern "C" fn(rados_completion_t, *mut c_void);
/// `rbd_image_t`.
pub(crate) type rbd_image_t = *mut c_void;
/// `rbd_completion_t`.
pub(crate) type rbd_completion_t = *mut c_void;
/// `rbd_callback_t`.
pub(crate) type rbd_callback_t = extern "C" fn(rbd_completion_t, *mut c_void);

/// `LIBRADOS_OP_FLAG_FADVISE_FUA`: librbd's write-around cache acknowledges such a write only
/// once the OSDs have it.
pub(crate) const LIBRADOS_OP_FLAG_FADVISE_FUA: c_int = 0x80;

/// `rbd_image_info_t`.
#[repr(C)]
pub(crate) struct rbd_image_info_t {
    pub size: u64,
    pub obj_size: u64,
    pub num_objs: u64,
    pub order: c_int,
    pub block_name_prefix: [c_char; 24],
    pub parent_pool: i64,
    pub parent_name: [c_char; 96],
}

#[link(name = "rados")]
extern "C" {
    pub(crate) fn rados_create2(
        cluster: *mut rados_t,
        clustername: *const c_char,
        name: *const c_char,
        flags: u64,
    ) -> c_int;
    pub(crate) fn rados_conf_read_file(cluster: rados_t, path: *const c_char) -> c_int;
    pub(crate) fn rados_conf_set(
        cluster: rados_t,
        option: *const c_char,
        value: *const c_char,
    ) -> c_int;
    pub(crate) fn rados_conf_get(
        cluster: rados_t,
        option: *const c_char,
        buf: *mut c_char,
        len: usize,
    ) -> c_int;
    pub(crate) fn rados_connect(cluster: rados_t) -> c_int;
    pub(crate) fn rados_shutdown(cluster: rados_t);
    pub(crate) fn rados_ioctx_create(
        cluster: rados_t,
        pool_name: *const c_char,
        ioctx: *mut rados_ioctx_t,
    ) -> c_int;
    pub(crate) fn rados_ioctx_destroy(io: rados_ioctx_t);

    pub(crate) fn rados_aio_create_completion2(
        cb_arg: *mut c_void,
        cb_complete: rados_callback_t,
        pc: *mut rados_completion_t,
    ) -> c_int;
    pub(crate) fn rados_aio_get_return_value(c: rados_completion_t) -> c_int;
    pub(crate) fn rados_aio_release(c: rados_completion_t);
    pub(crate) fn rados_aio_read(
        io: rados_ioctx_t,
        oid: *const c_char,
        completion: rados_completion_t,
        buf: *mut c_char,
        len: usize,
        off: u64,
    ) -> c_int;
    pub(crate) fn rados_aio_write(
        io: rados_ioctx_t,
        oid: *const c_char,
        completion: rados_completion_t,
        buf: *const c_char,
        len: usize,
        off: u64,
    ) -> c_int;
    pub(crate) fn rados_aio_remove(
        io: rados_ioctx_t,
        oid: *const c_char,
        completion: rados_completion_t,
    ) -> c_int;
    pub(crate) fn rados_aio_stat(
        io: rados_ioctx_t,
        oid: *const c_char,
        completion: rados_completion_t,
        psize: *mut u64,
        pmtime: *mut libc::time_t,
    ) -> c_int;
    pub(crate) fn rados_create_write_op() -> rados_write_op_t;
    pub(crate) fn rados_release_write_op(write_op: rados_write_op_t);
    pub(crate) fn rados_write_op_zero(write_op: rados_write_op_t, offset: u64, len: u64);
    pub(crate) fn rados_aio_write_op_operate(
        write_op: rados_write_op_t,
        io: rados_ioctx_t,
        completion: rados_completion_t,
        oid: *const c_char,
        mtime: *mut libc::time_t,
        flags: c_int,
    ) -> c_int;
}

#[link(name = "rbd")]
extern "C" {
    pub(crate) fn rbd_open(
        io: rados_ioctx_t,
        name: *const c_char,
        image: *mut rbd_image_t,
        snap_name: *const c_char,
    ) -> c_int;
    pub(crate) fn rbd_open_read_only(
        io: rados_ioctx_t,
        name: *const c_char,
        image: *mut rbd_image_t,
        snap_name: *const c_char,
    ) -> c_int;
    pub(crate) fn rbd_close(image: rbd_image_t) -> c_int;
    pub(crate) fn rbd_stat(
        image: rbd_image_t,
        info: *mut rbd_image_info_t,
        infosize: usize,
    ) -> c_int;
    pub(crate) fn rbd_aio_create_completion(
        cb_arg: *mut c_void,
        complete_cb: rbd_callback_t,
        c: *mut rbd_completion_t,
    ) -> c_int;
    pub(crate) fn rbd_aio_get_return_value(c: rbd_completion_t) -> isize;
    pub(crate) fn rbd_aio_release(c: rbd_completion_t);
    pub(crate) fn rbd_aio_read(
        image: rbd_image_t,
        off: u64,
        len: usize,
        buf: *mut c_char,
        c: rbd_completion_t,
    ) -> c_int;
    pub(crate) fn rbd_aio_write2(
        image: rbd_image_t,
        off: u64,
        len: usize,
        buf: *const c_char,
        c: rbd_completion_t,
        op_flags: c_int,
    ) -> c_int;
    pub(crate) fn rbd_aio_discard(
        image: rbd_image_t,
        off: u64,
        len: u64,
        c: rbd_completion_t,
    ) -> c_int;
    pub(crate) fn rbd_aio_write_zeroes(
        image: rbd_image_t,
        off: u64,
        len: usize,
        c: rbd_completion_t,
        zero_flags: c_int,
        op_flags: c_int,
    ) -> c_int;
    pub(crate) fn rbd_aio_flush(image: rbd_image_t, c: rbd_completion_t) -> c_int;
}
