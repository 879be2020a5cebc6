//! Layout versions of the pinned maps, and the plan a start makes from them: reuse a pinned map
//! whose layout this build shares, migrate one this build knows how to convert, create one the
//! pins lack, or refuse, changing nothing, when a map's layout is unknown.
//!
//! The record: a small hash map pinned as `LAYOUT` beside the others (map name -> its layout
//! version; `@build` -> the eBPF object's id, `crate::object_id`). Why a map: bpffs holds only
//! BPF objects and directories (no regular files, and symlinks are refused on hosts like our
//! CI's), and a file elsewhere could outlive the pins (a reboot empties bpffs) or miss them; a
//! pinned map lives and dies with the pins (`lb detach` removes it with the rest). Userspace
//! creates it, not the eBPF object: the data plane never sees it. It is written whole under
//! `LAYOUT_next` (bpffs refuses dots in names) and renamed over `LAYOUT`, so a reader finds the old record or the new one.
//! Pins older than the record are taken as layout version 1 throughout (the layout they had).

use std::path::Path;

use aya::maps::{HashMap, Map, MapData};
use lb_common::{
    FlowKey,
    flow::{FLOW_STATE_SIZES, FLOW_STATE_VERSION},
    maps,
};
use serde::Serialize;

use crate::error::{Error, Result};

/// The record's pin name.
pub const LAYOUT: &str = "LAYOUT";
/// The record's key for the eBPF object's id.
const BUILD: &str = "@build";
type RecordKey = [u8; 32];

/// A map's layout version in this build: bumped whenever the meaning or place of its key's or
/// value's fields changes, so a build never reads another's layout as its own.
pub const fn version(name: &str) -> u32 {
    if str_eq(name, maps::CONNTRACK) || str_eq(name, maps::EMBRYONIC) {
        FLOW_STATE_VERSION
    } else {
        1
    }
}

const fn str_eq(a: &str, b: &str) -> bool {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    if a.len() != b.len() {
        return false;
    }
    let mut i = 0;
    while i < a.len() {
        if a[i] != b[i] {
            return false;
        }
        i += 1;
    }
    true
}

/// A map's shape: the kernel's own (map info) for a pinned one, the object's for this build's.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Shape {
    pub map_type: u32,
    pub key_size: u32,
    pub value_size: u32,
}

/// A map as this build has it.
#[derive(Clone, Copy, Debug)]
pub struct Wanted {
    pub name: &'static str,
    pub version: u32,
    pub shape: Shape,
}

/// A pinned map as found: the record's version for it (1 without a record) and its shape.
#[derive(Clone, Copy, Debug)]
pub struct Found {
    pub version: u32,
    pub shape: Shape,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    Reuse,
    /// Copy every entry into a new map of this build's layout, converted.
    Migrate {
        from: u32,
        to: u32,
    },
    /// The pins lack it (an older build's): a new, empty one.
    Create,
}

#[derive(Debug, PartialEq, Eq)]
pub struct Plan {
    pub maps: Vec<(&'static str, Action)>,
    /// The pinned program is another build's (or its build is unknown).
    pub replace_program: bool,
}

impl Plan {
    /// Nothing to do but adopt what is pinned.
    pub fn adopt_only(&self) -> bool {
        !self.replace_program && self.maps.iter().all(|(_, a)| *a == Action::Reuse)
    }
}

/// Whether this build converts `name`'s entries from layout `from` to `to`, and what each
/// version's value size must then be. `FlowState` (CONNTRACK, EMBRYONIC): version 2 is version
/// 1 with a field after it, so either way the common prefix is kept and the rest is zero.
fn migration(name: &str, from: u32, to: u32) -> Option<(usize, usize)> {
    let flow = name == maps::CONNTRACK || name == maps::EMBRYONIC;
    let size = |v: u32| FLOW_STATE_SIZES.get((v as usize).checked_sub(1)?).copied();
    (flow && from != to).then_some(())?;
    Some((size(from)?, size(to)?))
}

/// The plan for pins recorded by `recorded_build` (`None` without a record), holding `found`
/// (by name; `None` for a map the pins lack), for this build's `wanted` maps. `Err` is the one
/// line that says why it cannot be done; nothing has been touched then.
pub fn plan(
    wanted: &[Wanted],
    found: &[(&str, Option<Found>)],
    recorded_build: Option<u64>,
    this_build: u64,
) -> std::result::Result<Plan, String> {
    let mut out = Vec::with_capacity(wanted.len());
    for w in wanted {
        let Some(f) = found.iter().find(|(n, _)| *n == w.name).and_then(|(_, f)| *f) else {
            out.push((w.name, Action::Create));
            continue;
        };
        let shape_of = |s: Shape| {
            format!(
                "type {}, key {} bytes, value {} bytes",
                s.map_type, s.key_size, s.value_size
            )
        };
        if f.version == w.version {
            if f.shape != w.shape {
                return Err(format!(
                    "{} is at layout version {} as this build's, but its shape differs ({} pinned, {} here)",
                    w.name,
                    f.version,
                    shape_of(f.shape),
                    shape_of(w.shape)
                ));
            }
            out.push((w.name, Action::Reuse));
            continue;
        }
        match migration(w.name, f.version, w.version) {
            Some((from_size, to_size))
                if f.shape.map_type == w.shape.map_type
                    && f.shape.key_size == w.shape.key_size
                    && f.shape.value_size as usize == from_size
                    && w.shape.value_size as usize == to_size =>
            {
                out.push((
                    w.name,
                    Action::Migrate {
                        from: f.version,
                        to: w.version,
                    },
                ));
            }
            _ => {
                return Err(format!(
                    "{} is at layout version {} ({}) and this build, at version {}, knows no way from it",
                    w.name,
                    f.version,
                    shape_of(f.shape),
                    w.version
                ));
            }
        }
    }
    Ok(Plan {
        maps: out,
        replace_program: recorded_build != Some(this_build),
    })
}

/// This build's maps as its eBPF object declares them.
pub fn wanted(object: &[u8]) -> Result<Vec<Wanted>> {
    let obj =
        aya_obj::Object::parse(object).map_err(|e| Error::dataplane(format!("parse eBPF object: {e}")))?;
    maps::PINNED
        .iter()
        .map(|&name| {
            let m = obj
                .maps
                .get(name)
                .ok_or_else(|| Error::dataplane(format!("map {name} missing from the eBPF object")))?;
            Ok(Wanted {
                name,
                version: version(name),
                shape: Shape {
                    map_type: m.map_type(),
                    key_size: m.key_size(),
                    value_size: m.value_size(),
                },
            })
        })
        .collect()
}

/// The kernel's shape of a pinned map.
pub fn shape(map: &MapData) -> Result<Shape> {
    let info = map
        .info()
        .map_err(|e| Error::dataplane(format!("map info: {e}")))?;
    Ok(Shape {
        map_type: info
            .map_type()
            .map_err(|e| Error::dataplane(format!("map type: {e}")))? as u32,
        key_size: info.key_size(),
        value_size: info.value_size(),
    })
}

/// What the pinned record says.
pub struct Record {
    /// The eBPF object that wrote the pins (`crate::object_id`).
    pub build: u64,
    /// Each map's layout version.
    pub versions: Vec<(String, u32)>,
}

/// The pinned record; `None` without one.
pub fn read_record(dir: &Path) -> Result<Option<Record>> {
    let path = dir.join(LAYOUT);
    if !path.exists() {
        return Ok(None);
    }
    let map = super::open_pinned(&path)?;
    let record: HashMap<MapData, RecordKey, u64> = map.try_into().map_err(super::load::typed)?;
    let mut build = 0;
    let mut versions = Vec::new();
    for entry in record.iter() {
        let (k, v) = entry.map_err(|e| Error::dataplane(format!("read {}: {e}", path.display())))?;
        let name = String::from_utf8_lossy(&k).trim_end_matches('\0').to_string();
        if name == BUILD {
            build = v;
        } else {
            versions.push((name, u32::try_from(v).unwrap_or(u32::MAX)));
        }
    }
    Ok(Some(Record { build, versions }))
}

/// Writes this build's record: whole under `LAYOUT_next` (bpffs refuses dots in names), then renamed over `LAYOUT`.
pub fn write_record(dir: &Path, build: u64) -> Result<()> {
    let next = dir.join(format!("{LAYOUT}_next"));
    let _ = std::fs::remove_file(&next);
    let mut record = HashMap::<MapData, RecordKey, u64>::create(64, 0)
        .map_err(|e| Error::dataplane(format!("create the layout record: {e}")))?;
    let key = |name: &str| {
        let mut k = [0u8; 32];
        k[..name.len()].copy_from_slice(name.as_bytes());
        k
    };
    let mut put = |name: &str, v: u64| {
        record
            .insert(key(name), v, 0)
            .map_err(|e| Error::dataplane(format!("write the layout record: {e}")))
    };
    put(BUILD, build)?;
    for name in maps::PINNED {
        put(name, u64::from(version(name)))?;
    }
    record
        .pin(&next)
        .map_err(|e| Error::dataplane(format!("pin {}: {e}", next.display())))?;
    replace_pin(&next, &dir.join(LAYOUT))
}

/// Moves pin `from` to `to`, over what `to` pinned: a rename (bpffs replaces the target
/// atomically), else unlink and rename.
pub fn replace_pin(from: &Path, to: &Path) -> Result<()> {
    if std::fs::rename(from, to).is_ok() {
        return Ok(());
    }
    let _ = std::fs::remove_file(to);
    std::fs::rename(from, to)
        .map_err(|e| Error::io(format!("move pin {} to {}", from.display(), to.display()), e))
}

/// Copies every entry of flow table `from` (a kernel map id; values at layout `from_v`) into
/// `to` (at `to_v`), converted; with `only_missing` (`BPF_NOEXIST`) an entry `to` has already
/// is left as it is. Returns how many were written.
pub fn copy_flows(from: u32, to: u32, from_v: u32, to_v: u32, only_missing: bool) -> Result<usize> {
    let open = |id: u32| -> Result<Map> {
        let data = MapData::from_id(id).map_err(|e| Error::dataplane(format!("open map {id}: {e}")))?;
        Map::from_map_data(data).map_err(Error::dataplane)
    };
    let (from, to) = (open(from)?, open(to)?);
    match migration(maps::CONNTRACK, from_v, to_v) {
        Some((16, 20)) => copy::<16, 20>(from, to, only_missing),
        Some((20, 16)) => copy::<20, 16>(from, to, only_missing),
        _ => Err(Error::dataplane(format!(
            "no copy from flow layout {from_v} to {to_v}"
        ))),
    }
}

fn copy<const A: usize, const B: usize>(from: Map, to: Map, only_missing: bool) -> Result<usize> {
    let src: HashMap<MapData, FlowKey, [u8; A]> = from.try_into().map_err(super::load::typed)?;
    let mut dst: HashMap<MapData, FlowKey, [u8; B]> = to.try_into().map_err(super::load::typed)?;
    let flags = if only_missing { 1 } else { 0 }; // BPF_NOEXIST
    let mut written = 0;
    // The data plane keeps writing the source: an entry gone between the keys and the lookup
    // is skipped (its flow ended or was evicted).
    for (key, value) in src.iter().filter_map(std::result::Result::ok) {
        match dst.insert(key, convert::<A, B>(&value), flags) {
            Ok(()) => written += 1,
            Err(aya::maps::MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::EEXIST) => {}
            Err(e) => return Err(Error::dataplane(format!("copy a flow: {e}"))),
        }
    }
    Ok(written)
}

/// A flow value at another layout: the common prefix kept, the rest zero.
fn convert<const A: usize, const B: usize>(v: &[u8; A]) -> [u8; B] {
    let mut out = [0u8; B];
    let n = A.min(B);
    out[..n].copy_from_slice(&v[..n]);
    out
}

/// What a start did with pins of another build or layout.
#[derive(Clone, Debug, Default, Serialize, PartialEq, Eq)]
pub struct Upgrade {
    pub reused: Vec<String>,
    pub migrated: Vec<Migrated>,
    pub created: Vec<String>,
    /// The program replaced: the pinned one's kernel id and the new one's.
    pub program: Option<(u32, u32)>,
}

#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct Migrated {
    pub map: String,
    pub from: u32,
    pub to: u32,
    pub entries: usize,
}

impl Upgrade {
    /// One line: "reused 17 maps, migrated CONNTRACK v1→v2 (200 entries), program replaced
    /// (id 41 → 57)".
    pub fn summary(&self) -> String {
        let mut parts = vec![format!("reused {} maps", self.reused.len())];
        for m in &self.migrated {
            parts.push(format!(
                "migrated {} v{}→v{} ({} entries)",
                m.map, m.from, m.to, m.entries
            ));
        }
        if !self.created.is_empty() {
            parts.push(format!("created {}", self.created.join(", ")));
        }
        match self.program {
            Some((old, new)) => parts.push(format!("program replaced (id {old} → {new})")),
            None => parts.push("program kept".into()),
        }
        parts.join(", ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LRU: u32 = 9;
    const HASH: u32 = 1;

    fn flows(version: u32) -> Shape {
        Shape {
            map_type: LRU,
            key_size: 40,
            value_size: FLOW_STATE_SIZES[version as usize - 1] as u32,
        }
    }

    fn other() -> Shape {
        Shape {
            map_type: HASH,
            key_size: 8,
            value_size: 8,
        }
    }

    fn wanted(flow_version: u32) -> Vec<Wanted> {
        vec![
            Wanted {
                name: maps::SERVICES,
                version: 1,
                shape: other(),
            },
            Wanted {
                name: maps::CONNTRACK,
                version: flow_version,
                shape: flows(flow_version),
            },
        ]
    }

    fn found(flow_version: u32, shape: Shape) -> Vec<(&'static str, Option<Found>)> {
        vec![
            (
                maps::SERVICES,
                Some(Found {
                    version: 1,
                    shape: other(),
                }),
            ),
            (
                maps::CONNTRACK,
                Some(Found {
                    version: flow_version,
                    shape,
                }),
            ),
        ]
    }

    #[test]
    fn the_same_build_adopts_and_another_with_the_same_layout_replaces_the_program_only() {
        let p = plan(&wanted(1), &found(1, flows(1)), Some(7), 7).unwrap();
        assert!(p.adopt_only());
        let p = plan(&wanted(1), &found(1, flows(1)), Some(6), 7).unwrap();
        assert!(p.replace_program);
        assert!(p.maps.iter().all(|(_, a)| *a == Action::Reuse));
        // Pins older than the record: layout 1, the program replaced.
        assert!(
            plan(&wanted(1), &found(1, flows(1)), None, 7)
                .unwrap()
                .replace_program
        );
    }

    #[test]
    fn flow_tables_migrate_up_and_down_and_a_missing_map_is_created() {
        let p = plan(&wanted(2), &found(1, flows(1)), Some(1), 2).unwrap();
        assert_eq!(p.maps[1], (maps::CONNTRACK, Action::Migrate { from: 1, to: 2 }));
        let p = plan(&wanted(1), &found(2, flows(2)), Some(2), 1).unwrap();
        assert_eq!(p.maps[1], (maps::CONNTRACK, Action::Migrate { from: 2, to: 1 }));
        let p = plan(&wanted(1), &found(1, flows(1))[..1], Some(1), 1).unwrap();
        assert_eq!(p.maps[1], (maps::CONNTRACK, Action::Create));
        assert!(!p.adopt_only());
    }

    #[test]
    fn an_unknown_version_or_a_shape_that_belies_its_version_is_refused() {
        let e = plan(&wanted(1), &found(3, flows(2)), Some(1), 2).unwrap_err();
        assert!(e.starts_with("CONNTRACK is at layout version 3"), "{e}");
        // Version 1 recorded, but the value is version 2's size.
        let e = plan(&wanted(1), &found(1, flows(2)), Some(1), 2).unwrap_err();
        assert!(e.contains("its shape differs"), "{e}");
        // A migration whose source is not the size that version has.
        let e = plan(&wanted(2), &found(1, flows(2)), Some(1), 2).unwrap_err();
        assert!(e.contains("knows no way"), "{e}");
        // A map with no migration at all.
        let mut f = found(1, flows(1));
        f[0].1 = Some(Found {
            version: 2,
            shape: other(),
        });
        let e = plan(&wanted(1), &f, Some(1), 2).unwrap_err();
        assert!(e.starts_with("SERVICES is at layout version 2"), "{e}");
    }

    #[test]
    fn a_converted_flow_keeps_its_prefix() {
        let v1: [u8; 16] = core::array::from_fn(|i| i as u8 + 1);
        let v2: [u8; 20] = convert(&v1);
        assert_eq!(&v2[..16], &v1);
        assert_eq!(&v2[16..], &[0; 4]);
        assert_eq!(convert::<20, 16>(&v2), v1);
    }

    #[test]
    fn a_summary_names_what_was_done() {
        let u = Upgrade {
            reused: vec!["A".into(), "B".into()],
            migrated: vec![Migrated {
                map: "CONNTRACK".into(),
                from: 1,
                to: 2,
                entries: 200,
            }],
            created: vec![],
            program: Some((41, 57)),
        };
        assert_eq!(
            u.summary(),
            "reused 2 maps, migrated CONNTRACK v1→v2 (200 entries), program replaced (id 41 → 57)"
        );
    }
}
