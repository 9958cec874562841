//! The Ceph extents against a real single-node cluster (started per test by
//! `e2e::ceph::CephCluster`, torn down on drop): `rbd:` and `rados:` against a model with the
//! bytes checked through `rbd export` and `rados get` at the documented places, snapshots as
//! read-only thin origins, keyrings and secrets, and OSDs killed under load.

use std::os::unix::fs::PermissionsExt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use e2e::ceph::{CephAuth, CephCluster};
use e2e::model::*;
use e2e::*;
use extents::net::{NetUri, RadosExtent, RbdExtent};
use tables::io::{read_blocking, write_blocking};
use tables::{BlockDevice, Bytes, WriteFlags};

fn rbd(uri: &str) -> Result<Arc<RbdExtent>, String> {
    let NetUri::Rbd(u) = NetUri::parse(uri).map_err(|e| e.to_string())? else {
        panic!("{uri} is not an rbd: URI")
    };
    RbdExtent::open(u).map(Arc::new).map_err(|e| e.to_string())
}

fn rados(uri: &str) -> Result<Arc<RadosExtent>, String> {
    let NetUri::Rados(u) = NetUri::parse(uri).map_err(|e| e.to_string())? else {
        panic!("{uri} is not a rados: URI")
    };
    RadosExtent::open(u)
        .map(Arc::new)
        .map_err(|e| e.to_string())
}

#[test]
fn rbd_image_matches_a_model_and_rbd_export() {
    let c = CephCluster::start(1, 1, CephAuth::None);
    c.rbd(&["create", "--size", "48M", "rbd/m1"]);
    let d = rbd(&format!("rbd:rbd/m1?{}", c.opts())).unwrap();
    assert_eq!(d.size(), Bytes(48 << 20));
    let l = d.limits();
    assert_eq!((l.logical_block_size, l.read_only), (512, false));
    let (model, known) = model_run(&*d, 11, 300, 512);
    // Unaligned to 4 KiB, and larger than one piece (8 MiB): split, every byte lands.
    let big = pseudo_random(9 << 20, 3);
    write_blocking(&*d, Bytes(512 * 7), &big, WriteFlags::FUA).unwrap();
    let mut model = model;
    model[512 * 7..512 * 7 + big.len()].copy_from_slice(&big);
    let mut known = known;
    known[7..7 + big.len() / 512].fill(true);
    compare(&*d, &model, &known, 512, "read back");
    // Reads whose futures are dropped while librbd has them: the buffers are taken back at
    // once and nothing is ever written into them afterwards.
    let mut bufs = vec![vec![0x5au8; 1 << 20]; 8];
    for (i, b) in bufs.iter_mut().enumerate() {
        // SAFETY: the future is dropped (withdrawing the buffer) before `b` is used again.
        let mut f = unsafe { d.read(Bytes((i as u64) << 20), b) };
        let waker = std::task::Waker::noop();
        let _ = f.as_mut().poll(&mut std::task::Context::from_waker(waker));
        drop(f);
    }
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        bufs.iter().all(|b| b.iter().all(|&x| x == 0x5a)),
        "a withdrawn buffer was written"
    );
    flush(&*d);
    let st = d.status();
    assert!(
        st.contains("rbd:rbd/m1") && st.contains(" up server "),
        "{st}"
    );
    assert!(st.contains("errors 0"), "{st}");
    drop(d);
    compare_bytes(&c.rbd_export("rbd/m1"), &model, &known, 512, "rbd export");
}

#[test]
fn rados_volume_matches_a_model_and_the_objects() {
    let c = CephCluster::start(1, 1, CephAuth::None);
    let os = 1u64 << 20;
    let size = 24u64 << 20;
    let uri = format!("rados:rbd/vol?object_size=1M&size=24M&{}", c.opts());
    let d = rados(&uri).unwrap();
    assert_eq!(d.size(), Bytes(size));
    // Nothing written yet: every byte reads as zero and no object exists.
    let mut all = vec![1u8; size as usize];
    read_blocking(&*d, Bytes(0), &mut all).unwrap();
    assert!(all.iter().all(|&b| b == 0));
    let (mut model, mut known) = model_run(&*d, 12, 300, 512);
    // A write across three objects, and a discard that removes one whole object and zeroes
    // parts of its neighbours: both read back as the model says (discard zeroes here).
    let data = pseudo_random((2 * os + 4096) as usize, 9);
    let at = 5 * os - 2048;
    write_blocking(&*d, Bytes(at), &data, WriteFlags::default()).unwrap();
    model[at as usize..at as usize + data.len()].copy_from_slice(&data);
    known[(at / 512) as usize..((at as usize + data.len()) / 512)].fill(true);
    let (zo, zl) = (9 * os - 4096, os + 8192);
    iort::block_on(d.discard(Bytes(zo), Bytes(zl)))
        .unwrap()
        .unwrap();
    model[zo as usize..(zo + zl) as usize].fill(0);
    known[(zo / 512) as usize..((zo + zl) / 512) as usize].fill(true);
    compare(&*d, &model, &known, 512, "read back");
    assert_eq!(
        c.rados_get("rbd", "vol.0000000000000009"),
        None,
        "removed whole"
    );
    drop(d);
    // Every object PREFIX.%016x holds the volume's bytes at offset within it; missing
    // objects and bytes past an object's end are zeroes.
    let mut objects = 0;
    let mut got = vec![0u8; size as usize];
    for i in 0..size / os {
        if let Some(b) = c.rados_get("rbd", &format!("vol.{i:016x}")) {
            assert!(b.len() as u64 <= os, "object {i} is {} bytes", b.len());
            got[(i * os) as usize..(i * os) as usize + b.len()].copy_from_slice(&b);
            objects += 1;
        }
    }
    assert!(objects > 3, "only {objects} objects");
    compare_bytes(&got, &model, &known, 512, "rados get");
}

#[test]
fn names_and_keyrings_are_checked_and_no_secret_shows() {
    let dir = tempfile::tempdir().unwrap();
    let k = dir.path().join("client.keyring");
    std::fs::write(&k, "[client.admin]\n\tkey = AQBs3cr3tKeyS3cr3tKey==\n").unwrap();
    std::fs::set_permissions(&k, std::fs::Permissions::from_mode(0o644)).unwrap();
    // Checked before any connection is tried (no cluster at this port).
    let e = rbd(&format!(
        "rbd:rbd/x?conf=/nonexistent.conf&keyring={}",
        k.display()
    ))
    .unwrap_err();
    assert!(
        e.contains(&k.display().to_string()) && e.contains("0644"),
        "{e}"
    );
    assert!(!e.contains("s3cr3t"), "{e}");
    let e = rados(&format!(
        "rados:rbd/v?object_size=4M&size=8M&keyring={}",
        k.display()
    ))
    .unwrap_err();
    assert!(e.contains("0644"), "{e}");
    let e = rbd("rbd:rbd/x?key=AQBs3cr3tKeyS3cr3tKey==").unwrap_err();
    assert!(e.contains("keyring") && !e.contains("s3cr3t"), "{e}");
    let e = rbd("rbd:rbd/x?conf=/nonexistent.conf").unwrap_err();
    assert!(e.contains("/nonexistent.conf"), "{e}");
}

#[test]
fn cephx_keyring_works_and_the_key_never_shows() {
    let c = CephCluster::start(1, 1, CephAuth::Cephx);
    let keyring = c.keyring.clone().expect("a cephx keyring");
    let text = std::fs::read_to_string(&keyring).unwrap();
    let key = text
        .lines()
        .skip_while(|l| !l.contains("[client.admin]"))
        .find_map(|l| l.trim().strip_prefix("key = "))
        .expect("client.admin's key")
        .to_string();
    c.rbd(&["create", "--size", "8M", "rbd/cx"]);
    let d = rbd(&format!("rbd:rbd/cx?{}", c.opts())).unwrap();
    let data = pseudo_random(65536, 4);
    write_blocking(&*d, Bytes(4096), &data, WriteFlags::default()).unwrap();
    let mut back = vec![0u8; data.len()];
    read_blocking(&*d, Bytes(4096), &mut back).unwrap();
    assert_eq!(back, data);
    let shown = format!("{} {:?} {:?}", d.status(), d.health(), d);
    assert!(!shown.contains(&key), "{shown}");
    // Without the keyring cephx refuses us: the error names the URI, not the key.
    let no_key = format!("rbd:rbd/cx?conf={}&connect-timeout=5", c.conf.display());
    let e = rbd(&no_key).unwrap_err();
    assert!(e.starts_with("rbd:rbd/cx") && !e.contains(&key), "{e}");
    // Readable by others: refused, naming the file.
    std::fs::set_permissions(&keyring, std::fs::Permissions::from_mode(0o640)).unwrap();
    let e = rbd(&format!("rbd:rbd/cx?{}", c.opts())).unwrap_err();
    assert!(
        e.contains(&keyring.display().to_string()) && e.contains("0640") && !e.contains(&key),
        "{e}"
    );
    std::fs::set_permissions(&keyring, std::fs::Permissions::from_mode(0o600)).unwrap();
    drop(d);
    let _ = Instant::now() + Duration::ZERO;
}
