//! `lvs` (the LV verbs that change things need allocation and activation: next).

use std::collections::HashMap;

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
    // Ours (lvm2 has none): a dedup thin pool's logical / used data blocks.
    Field {
        name: "dedup_ratio",
        heading: "Dedup",
        kind: Kind::Text,
    },
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
    /// What kind of LV it is.
    kind: LvKind,
    /// Figures from the active device's status.
    live: Live,
    /// For a raid image sub-LV: its leg's state in the running array (`failed`,
    /// `rebuilding`), from the raid LV's status.
    leg: Option<&'static str>,
}

/// The state of each image sub-LV of the active raid LVs of `vg`, by LV name: the health
/// word of the array's status (`A` in sync, `a` being rebuilt or resynced, `D` failed).
fn leg_states(
    vg: &VolumeGroup,
    sd: &StateDir,
    running: &HashMap<String, DeviceInfo>,
) -> HashMap<String, &'static str> {
    let mut out = HashMap::new();
    for lv in &vg.logical_volumes {
        let Some(raid) = lvm::alloc::raid_segment(vg, &lv.name) else {
            continue;
        };
        let Some(d) = running.get(&dm_name(&vg.name, &lv.name)) else {
            continue;
        };
        let Ok(Ok(status)) = crate::client::call(
            sd,
            ublk_target::control::Request::Status {
                name: d.name.clone(),
            },
        )
        .map(crate::client::expect_text) else {
            continue;
        };
        let words: Vec<&str> = status.split_whitespace().collect();
        let Some(health) = words.windows(2).find_map(|w| {
            (w[0].parse::<usize>().ok() == Some(raid.images.len())
                && w[1].len() == raid.images.len()
                && w[1].chars().all(|c| "ADa".contains(c)))
            .then_some(w[1])
        }) else {
            continue;
        };
        for ((_, img), c) in raid.images.iter().zip(health.chars()) {
            let state = match c {
                'D' => "failed",
                'a' => "rebuilding",
                _ => continue,
            };
            out.insert(img.clone(), state);
        }
    }
    out
}

/// What an LV is, for its attributes.
enum LvKind {
    Plain,
    Raid,
    ThinPool,
    Thin(lvm::segtypes::ThinSegment),
    Other,
}

impl LvKind {
    fn of(lv: &lvm::LogicalVolume) -> LvKind {
        use lvm::segtypes::VolmgrSegment;
        match lv.segments.first() {
            None => LvKind::Other,
            Some(s) => match (&s.kind, VolmgrSegment::parse(s)) {
                (SegmentKind::Striped { .. }, _) => LvKind::Plain,
                (_, Ok(Some(VolmgrSegment::Raid(_)))) => LvKind::Raid,
                (_, Ok(Some(VolmgrSegment::ThinPool(_)))) => LvKind::ThinPool,
                (_, Ok(Some(VolmgrSegment::Thin(t)))) => LvKind::Thin(t),
                _ => LvKind::Other,
            },
        }
    }

    /// lvm2's volume type letter (`lv_attr` 1): sub-LVs by their name's suffix.
    fn type_char(&self, name: &str) -> char {
        if name.contains("_rimage_") {
            return 'i';
        }
        if name.contains("_rmeta_") || name.ends_with("_tmeta") {
            return 'e';
        }
        if name.ends_with("_tdata") {
            return 'T';
        }
        match self {
            LvKind::Raid => 'r',
            LvKind::ThinPool => 't',
            LvKind::Thin(_) => 'V',
            LvKind::Plain | LvKind::Other => '-',
        }
    }

    /// lvm2's target type letter (`lv_attr` 7).
    fn target_char(&self) -> char {
        match self {
            LvKind::Raid => 'r',
            LvKind::ThinPool | LvKind::Thin(_) => 't',
            LvKind::Plain => '-',
            LvKind::Other => 'u',
        }
    }
}

/// Fractions read from an active device's status line.
#[derive(Default)]
struct Live {
    /// Cpy%Sync of a raid LV.
    sync: Option<(u64, u64)>,
    /// Data% of a thin pool or thin LV.
    data: Option<(u64, u64)>,
    /// Meta% of a thin pool.
    meta: Option<(u64, u64)>,
    /// A raid LV running with a leg failed or missing.
    degraded: bool,
    /// The source PV of a pvmove this LV is part of (then `sync` is the move's copy).
    moving: Option<String>,
    /// A dedup thin pool's ratio (logical / used data blocks), from its status's `dedup` tail.
    dedup_ratio: Option<String>,
}

/// The ratio in a thin pool status's dedup tail (`... dedup L/U SHARED ZERO RATIO ...`).
fn dedup_ratio(status: &str) -> Option<String> {
    let w: Vec<&str> = status.split_whitespace().collect();
    let at = w.iter().position(|x| *x == "dedup")?;
    let r = w.get(at + 4)?;
    r.parse::<f64>().ok().map(|_| r.to_string())
}

/// `a/b` pairs of a status line, in order.
fn fractions(status: &str) -> Vec<(u64, u64)> {
    status
        .split_whitespace()
        .filter_map(|t| {
            let (a, b) = t.split_once('/')?;
            Some((a.parse().ok()?, b.parse().ok()?))
        })
        .collect()
}

impl Live {
    /// Reads the status of an active raid or thin LV of `sectors` sectors.
    fn read(kind: &LvKind, sd: &StateDir, dm: &str, sectors: u64) -> Live {
        if matches!(kind, LvKind::Plain | LvKind::Other) {
            return Live::default();
        }
        let Ok(Ok(status)) = crate::client::call(
            sd,
            ublk_target::control::Request::Status {
                name: dm.to_string(),
            },
        )
        .map(crate::client::expect_text) else {
            return Live::default();
        };
        let f = fractions(&status);
        match kind {
            // `raid1 2 AA done/total idle ...`
            LvKind::Raid => Live {
                sync: f.first().copied(),
                // The health word (`AA`, `AD`, ...) comes right after the leg count.
                degraded: status.split_whitespace().any(|w| {
                    w.len() > 1 && w.chars().all(|c| "ADa".contains(c)) && w.contains('D')
                }),
                ..Live::default()
            },
            // `tid used_meta/total_meta used_data/total_data ...`
            LvKind::ThinPool => Live {
                meta: f.first().copied(),
                data: f.get(1).copied(),
                dedup_ratio: dedup_ratio(&status),
                ..Live::default()
            },
            // `mapped_sectors highest|-` (after `start len thin` when the table prefixes it).
            LvKind::Thin(_) => {
                let words: Vec<&str> = status.split_whitespace().collect();
                let mapped = match words.as_slice() {
                    [_, _, "thin", m, ..] => m.parse().ok(),
                    [m, ..] => m.parse().ok(),
                    [] => None,
                };
                Live {
                    data: mapped.map(|m| (m, sectors)),
                    ..Live::default()
                }
            }
            LvKind::Plain | LvKind::Other => Live::default(),
        }
    }
}

/// `a/b` as lvm2 prints percentages (two decimals).
fn percent((a, b): (u64, u64)) -> String {
    if b == 0 {
        return String::new();
    }
    format!("{:.2}", a as f64 * 100.0 / b as f64)
}

pub fn lvs(a: LvsArgs) -> Result<()> {
    let scan = Scan::run(&a.dev)?;
    scan.warn();
    let running = daemon_devices(&a.sd);
    let mut rows = Vec::new();
    for sv in &scan.report.vgs {
        let vg = &sv.metadata.vg;
        let moving = super::pvmove::moving(&a.sd, &vg.name);
        let legs = if a.all {
            leg_states(vg, &a.sd, &running)
        } else {
            HashMap::new()
        };
        for lv in &vg.logical_volumes {
            let visible = lv.status.has("VISIBLE");
            if !visible && !a.all {
                continue;
            }
            if !super::lv_wanted(&a.names, &vg.name, &lv.name) {
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
            let active = running.get(&dm_name(&vg.name, &lv.name));
            let kind = LvKind::of(lv);
            let moved_by = moving
                .as_ref()
                .filter(|m| m.users.contains(&dm_name(&vg.name, &lv.name)));
            let mut live = match active {
                Some(d) if d.state == "active" => {
                    let sectors = lv
                        .extent_count()
                        .and_then(|e| e.to_sectors(vg.extent_size))
                        .map(|s| s.0)
                        .unwrap_or(0);
                    Live::read(&kind, &a.sd, &d.name, sectors)
                }
                _ => Live::default(),
            };
            if let Some(m) = moved_by {
                live.moving = Some(m.source.clone());
                live.sync = m.progress;
            }
            rows.push(LvRow {
                vg,
                lv,
                devices: devs.join(","),
                active,
                kind,
                live,
                leg: legs.get(&lv.name).copied(),
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
                "{}{}i-{}{}{}---",
                r.kind.type_char(&r.lv.name),
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
                r.kind.target_char(),
            )),
            "pool_lv" => Value::Text(match &r.kind {
                LvKind::Thin(t) => t.thin_pool.clone(),
                _ => String::new(),
            }),
            "origin" => Value::Text(match &r.kind {
                LvKind::Thin(t) => t.origin.clone().unwrap_or_default(),
                _ => String::new(),
            }),
            "data_percent" => Value::Text(r.live.data.map(percent).unwrap_or_default()),
            "dedup_ratio" => Value::Text(r.live.dedup_ratio.clone().unwrap_or_default()),
            "metadata_percent" => Value::Text(r.live.meta.map(percent).unwrap_or_default()),
            "copy_percent" => Value::Text(r.live.sync.map(percent).unwrap_or_default()),
            "move_pv" => Value::Text(r.live.moving.clone().unwrap_or_default()),
            "lv_active" => Value::Text(match r.active {
                Some(d) if d.state == "active" => "active".into(),
                Some(d) => d.state.clone(),
                None => String::new(),
            }),
            "lv_dm_path" => Value::Text(r.active.map(|d| d.path.clone()).unwrap_or_default()),
            "lv_health_status" => Value::Text(match r.active.and_then(|d| d.error.clone()) {
                Some(e) => e,
                // lvm2's word for a raid LV with an image gone.
                None if r.live.degraded => "partial".into(),
                // An image sub-LV of a running array: its leg's state.
                None if r.leg.is_some() => r.leg.unwrap_or_default().into(),
                None => String::new(),
            }),
            "lv_size" => Value::Size(extents * ext),
            "lv_uuid" => Value::Text(r.lv.id.to_string()),
            "lv_path" => Value::Text(format!("/dev/{}/{}", r.vg.name, r.lv.name)),
            "seg_count" => Value::Number(r.lv.segments.len() as u64),
            "segtype" => Value::Text(match first.map(|s| &s.kind) {
                Some(SegmentKind::Striped { stripes, .. }) if stripes.len() == 1 => "linear".into(),
                Some(SegmentKind::Striped { .. }) => "striped".into(),
                // volmgr's own types show under LVM's names (raid1, thin-pool, thin).
                Some(SegmentKind::Other { segtype }) => segtype
                    .strip_prefix(lvm::segtypes::PREFIX)
                    .unwrap_or(segtype)
                    .to_string(),
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
    })?;
    super::refuse_unknown_names(&a.names, &scan)
}

#[cfg(test)]
mod dedup_ratio_tests {
    use super::dedup_ratio;

    #[test]
    fn ratio_from_the_pool_status_tail() {
        let st = "0 12/1024 300/4096 - rw discard_passdown queue_if_no_space - \
                  dedup 600/300 10 4 2.00 300/1000 9400 0 0 - 0 0";
        assert_eq!(dedup_ratio(st).as_deref(), Some("2.00"));
        assert_eq!(dedup_ratio("0 12/1024 300/4096 - rw"), None);
    }
}
