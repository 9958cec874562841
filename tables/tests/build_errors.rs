//! Build-time errors: devices too small or missing name the line and the device.

mod common;

use common::Devices;
use tables::io::write_blocking;
use tables::table::Table;
use tables::Bytes;

const S: u64 = 512;

fn build_err(d: &Devices, text: &str) -> tables::table::TableError {
    let reg = common::registry();
    let t = Table::parse(text, &reg).unwrap();
    match t.build(&reg, &d.resolver()) {
        Ok(_) => panic!("built: {text}"),
        Err(e) => e,
    }
}

#[test]
fn linear_device_too_small_names_line_device_and_sizes() {
    let mut d = Devices::default();
    d.mem("small", 100 * S);
    let e = build_err(&d, "0 50 zero\n# comment\n50 80 linear small 30\n");
    assert_eq!(e.line, 3);
    assert_eq!(e.field, Some(4));
    let s = e.to_string();
    assert!(
        s.starts_with("line 3, field 4 (device): device 'small'"),
        "{s}"
    );
    assert!(s.contains("100 sectors"), "{s}");
    assert!(s.contains("offset 30 + length 80 = 110 sectors"), "{s}");
    // Exactly fitting is fine.
    let reg = common::registry();
    let t = Table::parse("0 70 linear small 30", &reg).unwrap();
    let dev = t.build(&reg, &d.resolver()).unwrap();
    assert_eq!(dev.size(), Bytes(70 * S));
}

#[test]
fn unknown_device_names_it() {
    let d = Devices::default();
    let e = build_err(&d, "0 8 linear nosuch 0\n");
    assert_eq!((e.line, e.field), (1, Some(4)));
    assert!(
        e.msg
            .contains("cannot open device 'nosuch': no device named 'nosuch'"),
        "{e}"
    );
}

#[test]
fn striped_leg_too_small_names_its_leg() {
    let mut d = Devices::default();
    d.mem("a", 64 * S);
    d.mem("b", 40 * S);
    // 2 legs × 32 sectors each; b at offset 16 needs 48 sectors.
    let e = build_err(&d, "0 64 striped 2 8 a 0 b 16\n");
    assert_eq!((e.line, e.field), (1, Some(8)));
    assert_eq!(e.field_name.as_deref(), Some("stripe 1 device"));
    assert!(e.msg.contains("device 'b'"), "{e}");
    assert!(e.msg.contains("40 sectors"), "{e}");
    assert!(e.msg.contains("16 + length 32 = 48"), "{e}");
}

#[test]
fn flakey_and_delay_devices_are_checked() {
    let mut d = Devices::default();
    d.mem("a", 64 * S);
    d.mem("tiny", 8 * S);
    let e = build_err(&d, "0 32 flakey a 40 1 1\n");
    assert_eq!((e.line, e.field), (1, Some(4)));
    assert!(e.msg.contains("offset 40 + length 32 = 72"), "{e}");
    let e = build_err(&d, "0 32 delay a 0 1 a 0 1 tiny 0 1\n");
    assert_eq!((e.line, e.field), (1, Some(10)));
    assert_eq!(e.field_name.as_deref(), Some("flush device"));
    assert!(e.msg.contains("device 'tiny'"), "{e}");
}

#[test]
fn build_uses_resolver_for_dmsetup_style_names() {
    let mut d = Devices::default();
    d.mem("7:0", 4096 * S);
    d.mem("7:1", 2048 * S);
    d.mem("7:2", 2048 * S);
    let reg = common::registry();
    let t = Table::parse(
        "0 2048 linear 7:0 2048\n2048 4096 striped 2 128 7:1 0 7:2 0\n",
        &reg,
    )
    .unwrap();
    let dev = t.build(&reg, &d.resolver()).unwrap();
    assert_eq!(dev.size(), Bytes(6144 * S));
    assert_eq!(
        dev.status(),
        "0 2048 linear\n2048 4096 striped 2 7:1 7:2 1 AA"
    );
    // Data lands where dm would put it: table sector 2048 + 128 is chunk 1 -> leg 7:2 at 0.
    write_blocking(
        &*dev,
        Bytes((2048 + 128) * S),
        &[3u8; 512],
        Default::default(),
    )
    .unwrap();
    assert_eq!(d.mems["7:2"].snapshot(0, 512), vec![3u8; 512]);
    assert_eq!(d.mems["7:1"].snapshot(0, 512), vec![0u8; 512]);
}
