//! `lvs` (the LV verbs that change things need allocation and activation: next).

use anyhow::Result;
use clap::Args;
use lvm::{SegmentKind, VolumeGroup};

use lvm::activate::dm_name;
use ublk_target::control::DeviceInfo;

use super::activate::daemon_devices;
use super::report::{Field, Kind, Value};
use super::scan::Scan;
use super::{DeviceArgs, ReportArgs};
use crate::client::StateDir;

#[derive(Args)]
pub struct LvsArgs {
    /// Only these VGs or VG/LV names.
    names: Vec<String>,
    /// Internal LVs too (their names in brackets, as lvm2).
    #[arg(short = 'a', long)]
    all: bool,
    #[command(flatten)]
    report: ReportArgs,
    #[command(flatten)]
    dev: DeviceArgs,
    #[command(flatten)]
    sd: StateDir,
}

const LV_FIELDS: &[Field] = &[
    Field {
        name: "lv_name",
        heading: "LV",
        kind: Kind::Text,
    },
    Field {
        name: "vg_name",
        heading: "VG",
        kind: Kind::Text,
    },
    Field {
        name: "lv_attr",
        heading: "Attr",
        kind: Kind::Text,
    },
    Field {
        name: "lv_size",
        heading: "LSize",
        kind: Kind::Size,
    },
    Field {
        name: "pool_lv",
        heading: "Pool",
        kind: Kind::Text,
    },
    Field {
        name: "origin",
        heading: "Origin",
        kind: Kind::Text,
    },
    Field {
        name: "data_percent",
        heading: "Data%",
        kind: Kind::Text,
    },
    Field {
        name: "metadata_percent",
        heading: "Meta%",
        kind: Kind::Text,
    },
    Field {
        name: "move_pv",
        heading: "Move",
        kind: Kind::Text,
    },
    Field {
        name: "mirror_log",
        heading: "Log",
        kind: Kind::Text,
    },
    Field {
        name: "copy_percent",
        heading: "Cpy%Sync",
        kind: Kind::Text,
    },
    Field {
        name: "convert_lv",
        heading: "Convert",
        kind: Kind::Text,
    },
    Field {
        name: "lv_uuid",
        heading: "LV UUID",
        kind: Kind::Text,
    },
    Field {
        name: "lv_path",
        heading: "Path",
        kind: Kind::Text,
    },
    Field {
        name: "lv_active",
        heading: "Active",
        kind: Kind::Text,
    },
    Field {
        name: "lv_dm_path",
        heading: "DMPath",
        kind: Kind::Text,
    },
    Field {
        name: "lv_health_status",
        heading: "Health",
        kind: Kind::Text,
    },
    Field {
        name: "seg_count",
        heading: "#Seg",
        kind: Kind::Number,
    },
    Field {
        name: "segtype",
        heading: "Type",
        kind: Kind::Text,
    },
    Field {
        name: "stripes",
        heading: "#Str",
        kind: Kind::Number,
    },
    Field {
        name: "stripe_size",
        heading: "Stripe",
        kind: Kind::Size,
    },
    Field {
        name: "devices",
        heading: "Devices",
        kind: Kind::Text,
    },
];
const LV_DEFAULT: &[&str] = &[
    "lv_name",
    "vg_name",
    "lv_attr",
    "lv_size",
    "pool_lv",
    "origin",
    "data_percent",
    "metadata_percent",
    "move_pv",
    "mirror_log",
    "copy_percent",
    "convert_lv",
];

struct LvRow<'a> {
    vg: &'a VolumeGroup,
    lv: &'a lvm::LogicalVolume,
    devices: String,
    /// The daemon's device, when the LV is active.
    active: Option<&'a DeviceInfo>,
}

pub fn lvs(a: LvsArgs) -> Result<()> {
    let scan = Scan::run(&a.dev)?;
    scan.warn();
    let running = daemon_devices(&a.sd);
    let mut rows = Vec::new();
    for sv in &scan.report.vgs {
        let vg = &sv.metadata.vg;
        for lv in &vg.logical_volumes {
            let visible = lv.status.has("VISIBLE");
            if !visible && !a.all {
                continue;
            }
            let wanted = a.names.is_empty()
                || a.names
                    .iter()
                    .any(|n| n == &vg.name || *n == format!("{}/{}", vg.name, lv.name));
            if !wanted {
                continue;
            }
            let mut devs = Vec::new();
            for seg in &lv.segments {
                if let SegmentKind::Striped { stripes, .. } = &seg.kind {
                    for s in stripes {
                        let name = vg
                            .pv_by_key(&s.volume)
                            .and_then(|pv| scan.pv_path(&pv.id).map(|p| p.display().to_string()))
                            .unwrap_or_else(|| s.volume.clone());
                        devs.push(format!("{name}({})", s.start.0));
                    }
                }
            }
            rows.push(LvRow {
                vg,
                lv,
                devices: devs.join(","),
                active: running.get(&dm_name(&vg.name, &lv.name)),
            });
        }
    }
    rows.sort_by(|x, y| (&x.vg.name, &x.lv.name).cmp(&(&y.vg.name, &y.lv.name)));
    a.report.print("lv", LV_FIELDS, LV_DEFAULT, &rows, |r, f| {
        let ext = r.vg.extent_size.bytes().0;
        let extents: u64 =
            r.lv.segments
                .iter()
                .map(|s| u64::from(s.extent_count.0))
                .sum();
        let first = r.lv.segments.first();
        let name = if r.lv.status.has("VISIBLE") {
            r.lv.name.clone()
        } else {
            format!("[{}]", r.lv.name)
        };
        match f {
            "lv_name" => Value::Text(name),
            "vg_name" => Value::Text(r.vg.name.clone()),
            // Volume type, permissions, allocation, fixed minor, state, open, target type,
            // zero, health, skip.
            "lv_attr" => Value::Text(format!(
                "-{}i-{}{}----",
                if r.lv.status.has("WRITE") { 'w' } else { 'r' },
                match r.active.map(|d| d.state.as_str()) {
                    None => '-',
                    Some("active") => 'a',
                    Some("suspended") => 's',
                    // Failed, pending, building, stopping: present but not serving.
                    Some(_) => 'd',
                },
                // Whether it is open is not known here.
                '-',
            )),
            "lv_active" => Value::Text(match r.active {
                Some(d) if d.state == "active" => "active".into(),
                Some(d) => d.state.clone(),
                None => String::new(),
            }),
            "lv_dm_path" => Value::Text(r.active.map(|d| d.path.clone()).unwrap_or_default()),
            "lv_health_status" => {
                Value::Text(r.active.and_then(|d| d.error.clone()).unwrap_or_default())
            }
            "lv_size" => Value::Size(extents * ext),
            "lv_uuid" => Value::Text(r.lv.id.to_string()),
            "lv_path" => Value::Text(format!("/dev/{}/{}", r.vg.name, r.lv.name)),
            "seg_count" => Value::Number(r.lv.segments.len() as u64),
            "segtype" => Value::Text(match first.map(|s| &s.kind) {
                Some(SegmentKind::Striped { stripes, .. }) if stripes.len() == 1 => "linear".into(),
                Some(SegmentKind::Striped { .. }) => "striped".into(),
                Some(SegmentKind::Other { segtype }) => segtype.clone(),
                None => String::new(),
            }),
            "stripes" => Value::Number(match first.map(|s| &s.kind) {
                Some(SegmentKind::Striped { stripes, .. }) => stripes.len() as u64,
                _ => 0,
            }),
            "stripe_size" => Value::Size(match first.map(|s| &s.kind) {
                Some(SegmentKind::Striped {
                    stripe_size: Some(s),
                    ..
                }) => s.bytes().0,
                _ => 0,
            }),
            "devices" => Value::Text(r.devices.clone()),
            _ => Value::Text(String::new()),
        }
    })
}
