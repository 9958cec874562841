//! Metadata that lvm2 2.03.16 wrote (captured from `pvcreate`/`vgcreate`/`lvcreate` on loop
//! devices, see tests/data/README.md): the copy in a metadata area and the `vgcfgbackup` file
//! read into the model with every field as lvm2 wrote it, and written back losslessly.

use lvm::model::{Metadata, SegmentKind};
use lvm::text::{self, Style};
use lvm::Extents;
use tables::Sectors;

const DISK: &[u8] = include_bytes!("data/lvm2-metadata-seqno3.bin");
const BACKUP: &[u8] = include_bytes!("data/lvm2-vgcfgbackup.vg");

fn check_vgx(md: &Metadata) {
    let vg = &md.vg;
    assert_eq!(vg.name, "vgx");
    assert_eq!(vg.id.to_string(), "W12uUO-sapk-EOtk-Y7wt-uArd-5WR7-MqaA2W");
    assert_eq!(vg.seqno, 3);
    assert_eq!(vg.format.as_deref(), Some("lvm2"));
    assert_eq!(vg.status.0, ["RESIZEABLE", "READ", "WRITE"]);
    assert!(vg.flags.0.is_empty());
    assert_eq!(vg.extent_size, Sectors(8192));
    assert_eq!((vg.max_lv, vg.max_pv, vg.metadata_copies), (0, 0, Some(0)));
    assert_eq!(vg.physical_volumes.len(), 2);
    let pv1 = &vg.physical_volumes[1];
    assert_eq!(pv1.key, "pv1");
    assert_eq!(pv1.id.to_string(), "oMGSa5-IK0b-Fb42-4iPT-UTHX-zeTU-RvZszv");
    assert_eq!(pv1.device.as_deref(), Some("/dev/loop1"));
    assert_eq!(pv1.status.0, ["ALLOCATABLE"]);
    assert_eq!(pv1.dev_size, Some(Sectors(131072)));
    assert_eq!(pv1.pe_start, Sectors(2048));
    assert_eq!(pv1.pe_count, Extents(15));
    let lin = vg.lv("lin").unwrap();
    assert_eq!(lin.status.0, ["READ", "WRITE", "VISIBLE"]);
    assert_eq!(lin.creation_host.as_deref(), Some("vm"));
    assert_eq!(lin.creation_time, Some(1796297118));
    assert_eq!(lin.segments.len(), 1);
    let s = &lin.segments[0];
    assert_eq!((s.start_extent, s.extent_count), (Extents(0), Extents(2)));
    let SegmentKind::Striped {
        stripe_size,
        stripes,
    } = &s.kind
    else {
        panic!("{s:?}")
    };
    assert_eq!(*stripe_size, None);
    assert_eq!(stripes.len(), 1);
    assert_eq!(
        (stripes[0].volume.as_str(), stripes[0].start),
        ("pv0", Extents(0))
    );
    let st = vg.lv("str").unwrap();
    let SegmentKind::Striped {
        stripe_size,
        stripes,
    } = &st.segments[0].kind
    else {
        panic!()
    };
    assert_eq!(*stripe_size, Some(Sectors(128)));
    assert_eq!(st.segments[0].extent_count, Extents(4));
    assert_eq!(
        stripes
            .iter()
            .map(|a| (a.volume.as_str(), a.start.0))
            .collect::<Vec<_>>(),
        [("pv0", 2), ("pv1", 0)]
    );
    assert_eq!(md.creation_host, "vm");
    assert_eq!(md.creation_time, 1796297118);
}

#[test]
fn on_disk_copy_reads_with_every_field() {
    let md = Metadata::from_text(DISK).unwrap();
    check_vgx(&md);
    assert!(
        md.description.starts_with("Write from lvcreate"),
        "{}",
        md.description
    );
}

#[test]
fn backup_file_reads_with_every_field() {
    let md = Metadata::from_text(BACKUP).unwrap();
    check_vgx(&md);
    assert!(
        md.description.starts_with("Created *after*"),
        "{}",
        md.description
    );
}

#[test]
fn written_back_in_both_styles_reads_the_same() {
    for src in [DISK, BACKUP] {
        let md = Metadata::from_text(src).unwrap();
        for style in [Style::Disk, Style::File] {
            let out = md.to_text(style).unwrap();
            assert_eq!(Metadata::from_text(out.as_bytes()).unwrap(), md, "{out}");
        }
    }
}

#[test]
fn tree_round_trip_is_exact() {
    // Parse -> write -> parse keeps the tree identical (order, duplicates, everything).
    for src in [DISK, BACKUP] {
        let tree = text::parse(src).unwrap();
        for style in [Style::Disk, Style::File] {
            let out = text::write(&tree, style).unwrap();
            assert_eq!(text::parse(out.as_bytes()).unwrap(), tree);
        }
    }
}

#[test]
fn a_second_top_level_section_is_kept() {
    // LVM2 takes the first top-level section as the VG and ignores any other; we keep it.
    let mut text = DISK[..DISK.len() - 1].to_vec();
    text.extend_from_slice(b"later_tool {\nnote = \"kept\"\n}\n");
    let md = Metadata::from_text(&text).unwrap();
    check_vgx(&md);
    assert_eq!(md.extra.len(), 1);
    for style in [Style::Disk, Style::File] {
        let out = md.to_text(style).unwrap();
        assert_eq!(Metadata::from_text(out.as_bytes()).unwrap(), md, "{out}");
    }
}

#[test]
fn a_pv_lvm2_resized_reads_with_its_dev_size_less_pe_start() {
    // After pvresize lvm2 writes dev_size = size - pe_start: 39 extents of 1 MiB from sector
    // 2048 end past dev_size 79872, and that is lvm2's own metadata, not damage.
    let md = Metadata::from_text(include_bytes!("data/lvm2-vgcfgbackup-pvresized.vg")).unwrap();
    let pv1 = md.vg.pv_by_key("pv1").unwrap();
    assert_eq!(pv1.dev_size, Some(Sectors(79872)));
    assert_eq!((pv1.pe_start, pv1.pe_count), (Sectors(2048), Extents(39)));
    let mut bad = md.clone();
    bad.vg.physical_volumes[1].pe_count = Extents(40);
    let e = bad.to_text(Style::Disk).unwrap_err();
    assert!(e.to_string().contains("pv1/pe_count"), "{e}");
}
