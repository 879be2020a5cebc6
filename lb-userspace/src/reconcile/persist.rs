//! The runtime state file: the services as the API last changed them, and the map slots they
//! use. Written atomically after every change so a restarted daemon sees the same state.
//!
//! It is root's file in root's directory, and still treated as input: it is written through a
//! fresh file (never through a link someone left in its place), readable by root alone, synced
//! with its directory before the rename counts; and read back only as a regular file, each
//! service checked as an API change would be, one that fails reported and left out, so no entry
//! can stop the daemon from starting.

use std::{
    collections::BTreeMap,
    path::Path,
    time::{Duration, Instant, SystemTime},
};

use serde::{Deserialize, Serialize};

use crate::{
    config::ServiceSpec,
    error::{Error, Result},
    model::{BackendRef, Service},
    snapshot::Assignments,
    status::{
        BackendStatus,
        lease::{Lease, Terms},
    },
};

/// Largest state file read back (1,024 services of 16,384 backends stay far below it).
const MAX_STATE_BYTES: u64 = 256 * 1024 * 1024;

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Persisted {
    pub services: Vec<ServiceSpec>,
    /// The config file's services when these were saved (`layers`).
    #[serde(default)]
    pub file: FileLayer,
    pub assignments: Assignments,
    /// The terms of backends registered with a TTL (their heartbeats are not kept: a restarted
    /// daemon gives each a whole TTL to heartbeat again).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub leases: Vec<SavedLease>,
    /// Backends the operator drained (`lb backend drain`): operator intent, kept over a restart.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub drains: Vec<SavedDrain>,
}

/// The config file's services as last loaded, beside the services saved. Most states hold
/// nothing beyond the file (or nothing from it), so "the same" and "none" are written as such.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FileLayer {
    /// A state file written before the layers were kept: the config file is taken as it is now.
    #[default]
    Unknown,
    /// The file declared exactly the services saved.
    Same,
    Services(Vec<ServiceSpec>),
}

impl FileLayer {
    pub fn of(file: &[Service], services: &[Service]) -> Self {
        if file == services {
            Self::Same
        } else {
            Self::Services(file.iter().map(ServiceSpec::from).collect())
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SavedDrain {
    pub service: String,
    pub id: String,
    /// Since when, in seconds since the Unix epoch.
    pub since_s: f64,
}

impl SavedDrain {
    /// `at` on the wall clock, as `now` (monotonic) and `wall` (its wall-clock reading) place it.
    pub fn new(b: &BackendRef, at: Instant, now: Instant, wall: SystemTime) -> Self {
        let since = wall
            .checked_sub(now.saturating_duration_since(at))
            .unwrap_or(wall);
        Self {
            service: b.service.clone(),
            id: b.id.clone(),
            since_s: since
                .duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0.0, |d| d.as_secs_f64()),
        }
    }

    /// Since when, on the monotonic clock (`now`, read at `wall`); a time in the future or not a
    /// number is taken as now.
    fn since(&self, now: Instant, wall: SystemTime) -> Instant {
        let saved = Duration::try_from_secs_f64(self.since_s)
            .ok()
            .and_then(|d| SystemTime::UNIX_EPOCH.checked_add(d));
        let ago = saved
            .and_then(|t| wall.duration_since(t).ok())
            .unwrap_or_default();
        now.checked_sub(ago).unwrap_or(now)
    }
}

/// What a restart keeps of the backends' status, beside their services: registrations' terms
/// and the operator's drains.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct KeptStatus {
    pub leases: Vec<(BackendRef, Terms)>,
    pub drains: Vec<(BackendRef, Instant)>,
}

impl KeptStatus {
    /// The statuses the writer starts from: a registration has a whole TTL from `now` to
    /// heartbeat this daemon; a drain holds as it was.
    pub fn status(self, now: Instant) -> BTreeMap<BackendRef, BackendStatus> {
        let mut status: BTreeMap<BackendRef, BackendStatus> = BTreeMap::new();
        for (b, terms) in self.leases {
            status.entry(b).or_default().lease = Some(Lease::new(terms, now));
        }
        for (b, since) in self.drains {
            status.entry(b).or_default().held = Some(since);
        }
        status
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SavedLease {
    pub service: String,
    pub id: String,
    pub ttl_s: f64,
    pub deregister_after_s: f64,
}

impl SavedLease {
    pub fn new(b: &BackendRef, t: Terms) -> Self {
        Self {
            service: b.service.clone(),
            id: b.id.clone(),
            ttl_s: t.ttl.as_secs_f64(),
            deregister_after_s: t.deregister_after.as_secs_f64(),
        }
    }
}

/// What a restart takes from the state file.
pub struct Restored {
    pub services: Vec<Service>,
    /// The config file's services when the state was saved, if the state says.
    pub file: Option<Vec<Service>>,
    pub assignments: Assignments,
    /// Registrations with a TTL and operator drains, of backends kept.
    pub kept: KeptStatus,
    /// One line for each service left out.
    pub warnings: Vec<String>,
}

impl Persisted {
    /// Reads the file: none if there is none; an error (one line) if it cannot be used whole.
    pub fn load(path: &Path) -> Result<Option<Self>> {
        // One open, never through a link: the state file is root's, in root's directory.
        let bytes = match crate::files::read_opened(path, MAX_STATE_BYTES, libc::O_NOFOLLOW) {
            Ok((bytes, _)) => bytes,
            Err((Some(std::io::ErrorKind::NotFound), _)) => return Ok(None),
            Err((_, e)) => return Err(Error::config(format!("state file {e}"))),
        };
        serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| Error::config(format!("state file {} is corrupt: {e}", path.display())))
    }

    /// Reads the file for a restart. `accept` checks one service against those kept so far (as
    /// an API change is checked); a service it refuses is left out and reported. A file that
    /// cannot be read whole is reported too, and the daemon starts from its config file.
    pub fn restore(path: &Path, accept: impl Fn(&[Service], &Service) -> Result<()>) -> Option<Restored> {
        let p = match Self::load(path) {
            Ok(p) => p?,
            Err(e) => {
                log::warn!("{e}; starting from the config file");
                return None;
            }
        };
        let mut kept = Vec::new();
        let mut warnings = Vec::new();
        let file = match p.file {
            FileLayer::Unknown => None,
            FileLayer::Same => Some(p.services.iter().cloned().map(Service::from).collect()),
            FileLayer::Services(specs) => Some(specs.into_iter().map(Service::from).collect()),
        };
        for spec in p.services {
            let name = spec.name.clone();
            let service = Service::from(spec);
            match accept(&kept, &service) {
                Ok(()) => kept.push(service),
                Err(e) => warnings.push(format!(
                    "state file {}: service {name:?} left out: {e}",
                    path.display()
                )),
            }
        }
        // Terms out of range are checked as an API registration's; one that fails is left out.
        let mut leases = Vec::new();
        for l in p.leases {
            let key = BackendRef::new(&l.service, &l.id);
            let known = kept
                .iter()
                .any(|s| s.name == l.service && s.backend(&l.id).is_some());
            match Terms::from_secs(l.ttl_s, l.deregister_after_s) {
                Ok(t) if known => leases.push((key, t)),
                Ok(_) => {}
                Err(e) => warnings.push(format!(
                    "state file {}: registration {key} left without its ttl: {e}",
                    path.display()
                )),
            }
        }
        let (now, wall) = (Instant::now(), SystemTime::now());
        let drains = p
            .drains
            .iter()
            .filter(|d| {
                kept.iter()
                    .any(|s| s.name == d.service && s.backend(&d.id).is_some())
            })
            .map(|d| (BackendRef::new(&d.service, &d.id), d.since(now, wall)))
            .collect();
        Some(Restored {
            services: kept,
            file,
            assignments: p.assignments,
            kept: KeptStatus { leases, drains },
            warnings,
        })
    }

    /// Writes the file atomically: a new temporary file (O_EXCL|O_NOFOLLOW, mode 0600), synced,
    /// renamed over the old one, and the directory synced, so a crash leaves the old file or
    /// the new one, whole.
    pub fn save(&self, path: &Path) -> Result<()> {
        let bytes =
            serde_json::to_vec_pretty(self).map_err(|e| Error::dataplane(format!("serialize state: {e}")))?;
        crate::files::write_private(path, &bytes)
            .map_err(|e| Error::io(format!("write {}", path.display()), e))
    }
}

#[cfg(test)]
mod tests {
    use std::{os::unix::fs::PermissionsExt, path::PathBuf};

    use super::*;

    fn dir() -> PathBuf {
        let d = std::env::temp_dir().join(format!(
            "lb-state-test-{}-{}",
            std::process::id(),
            fastrand::u64(..)
        ));
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    fn spec(name: &str) -> ServiceSpec {
        let text = format!(
            "[daemon]\ninterfaces = [\"eth0\"]\n[[service]]\nname = \"{name}\"\nvip = \"10.0.0.1\"\nport = 80\nprotocol = \"tcp\"\n"
        );
        let cfg = crate::config::Config::parse(&text).expect("config");
        ServiceSpec::from(&cfg.services[0])
    }

    #[test]
    fn saved_private_through_a_fresh_file_never_a_link() {
        let d = dir();
        let path = d.join("t.state.json");
        // A link planted where the temporary file goes must not be written through.
        let victim = d.join("victim");
        std::fs::write(&victim, "keep").unwrap();
        std::os::unix::fs::symlink(&victim, path.with_extension("json.tmp")).unwrap();
        let p = Persisted {
            services: vec![spec("web")],
            ..Default::default()
        };
        p.save(&path).unwrap();
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "keep");
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(Persisted::load(&path).unwrap().unwrap().services.len(), 1);
        // The state file itself as a link: not followed.
        std::fs::remove_file(&path).unwrap();
        std::os::unix::fs::symlink(&victim, &path).unwrap();
        assert!(Persisted::load(&path).is_err());
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn a_refused_entry_is_left_out_and_a_corrupt_file_starts_from_the_config() {
        let d = dir();
        let path = d.join("t.state.json");
        let p = Persisted {
            services: vec![spec("web"), spec("bad"), spec("db")],
            ..Default::default()
        };
        p.save(&path).unwrap();
        let r = Persisted::restore(&path, |_, s| {
            if s.name == "bad" {
                Err(Error::invalid("health tls_ca /dev/zero: not a regular file"))
            } else {
                Ok(())
            }
        })
        .expect("restored");
        let names: Vec<&str> = r.services.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["web", "db"]);
        assert_eq!(r.warnings.len(), 1);
        assert!(r.warnings[0].contains("\"bad\" left out"), "{:?}", r.warnings);
        std::fs::write(&path, "{ not json").unwrap();
        assert!(Persisted::restore(&path, |_, _| Ok(())).is_none());
        assert!(Persisted::restore(&d.join("none"), |_, _| Ok(())).is_none());
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn operator_drains_are_kept_with_their_time_for_backends_still_there() {
        let d = dir();
        let path = d.join("t.state.json");
        let mut model = Service::new(
            "web",
            "10.0.0.1".parse().unwrap(),
            80,
            crate::model::Protocol::Tcp,
        );
        model
            .backends
            .push(crate::model::Backend::new("b1", "10.0.1.1".parse().unwrap()));
        let web = ServiceSpec::from(&model);
        let (now, wall) = (Instant::now(), SystemTime::now());
        let b1 = BackendRef::new("web", "b1");
        let drained_at = now - Duration::from_secs(30);
        let p = Persisted {
            services: vec![web],
            drains: vec![
                SavedDrain::new(&b1, drained_at, now, wall),
                // A backend no longer there, and a time that is not one: left out, taken as now.
                SavedDrain::new(&BackendRef::new("web", "gone"), now, now, wall),
            ],
            ..Default::default()
        };
        p.save(&path).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.contains("\"drains\""), "{text}");
        let r = Persisted::restore(&path, |_, _| Ok(())).expect("restored");
        assert_eq!(r.kept.drains.len(), 1, "{:?}", r.kept);
        let (b, since) = r.kept.drains[0].clone();
        assert_eq!(b, b1);
        let ago = now.saturating_duration_since(since).as_secs_f64();
        assert!((29.0..32.0).contains(&ago), "drained {ago} s ago");
        let status = r.kept.status(now);
        assert_eq!(status[&b1].held, Some(since));
        assert_eq!(status[&b1].state_name(), "drained");
        let odd = SavedDrain {
            since_s: f64::NAN,
            ..SavedDrain::new(&b1, now, now, wall)
        };
        assert_eq!(odd.since(now, wall), now);
        let future = SavedDrain {
            since_s: 1e12,
            ..SavedDrain::new(&b1, now, now, wall)
        };
        assert_eq!(future.since(now, wall), now);
        // A file without drains (an older daemon's) reads as none.
        let older = serde_json::to_string(&Persisted::default()).unwrap();
        assert!(!older.contains("drains"), "{older}");
        std::fs::write(&path, older).unwrap();
        let r = Persisted::restore(&path, |_, _| Ok(())).expect("restored");
        assert!(r.kept.drains.is_empty());
        let _ = std::fs::remove_dir_all(&d);
    }
}
