//! The runtime state file: the services as the API last changed them, and the map slots they
//! use. Written atomically after every change so a restarted daemon sees the same state.
//!
//! It is root's file in root's directory, and still treated as input: it is written through a
//! fresh file (never through a link someone left in its place), readable by root alone, synced
//! with its directory before the rename counts; and read back only as a regular file, each
//! service checked as an API change would be, one that fails reported and left out, so no entry
//! can stop the daemon from starting.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::{
    config::ServiceSpec,
    error::{Error, Result},
    model::{BackendRef, Service},
    snapshot::Assignments,
    status::lease::Terms,
};

/// Largest state file read back (1,024 services of 16,384 backends stay far below it).
const MAX_STATE_BYTES: u64 = 256 * 1024 * 1024;

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Persisted {
    pub services: Vec<ServiceSpec>,
    pub assignments: Assignments,
    /// The terms of backends registered with a TTL (their heartbeats are not kept: a restarted
    /// daemon gives each a whole TTL to heartbeat again).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub leases: Vec<SavedLease>,
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
    pub assignments: Assignments,
    /// Registrations with a TTL, of backends kept.
    pub leases: Vec<(BackendRef, Terms)>,
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
        Some(Restored {
            services: kept,
            assignments: p.assignments,
            leases,
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
}
