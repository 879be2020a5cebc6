//! The runtime state file: the services as the API last changed them, and the map slots they
//! use. Written atomically after every change so a restarted daemon sees the same state.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::{
    config::ServiceSpec,
    error::{Error, Result},
    reconcile::plan::Assignments,
};

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Persisted {
    pub services: Vec<ServiceSpec>,
    pub assignments: Assignments,
}

impl Persisted {
    pub fn load(path: &Path) -> Result<Option<Self>> {
        match std::fs::read(path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|e| Error::config(format!("state file {} is corrupt: {e}", path.display()))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(Error::io(format!("read {}", path.display()), e)),
        }
    }

    pub fn save(&self, path: &Path) -> Result<()> {
        let tmp = path.with_extension("json.tmp");
        let bytes =
            serde_json::to_vec_pretty(self).map_err(|e| Error::dataplane(format!("serialize state: {e}")))?;
        std::fs::write(&tmp, bytes).map_err(|e| Error::io(format!("write {}", tmp.display()), e))?;
        std::fs::rename(&tmp, path).map_err(|e| Error::io(format!("rename {}", path.display()), e))
    }
}
