//! LVM's verbs on LVM2's own on-disk format (`volmgr pvcreate`, `vgs`, `lvcreate`, ...).

#![allow(dead_code)] // The verbs land one by one; the report engine comes first.

pub mod report;
