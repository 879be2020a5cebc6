//! Named failpoints (the `fail` crate) at the steps of a change, compiled in only with the
//! `failpoints` feature, which the tests crate turns on: `FAILPOINTS="name=actions;..."` in the
//! daemon's environment logs (`print(msg)`), stalls (`return(ms)` at a [`stall`]) or crashes it
//! (`return` at a [`crash_point!`]) there, or fails a call (`return` at an [`io_error`]). A
//! build without the feature ignores the variable, and says so.

use anyhow::{Result, anyhow};

/// Sets the failpoints `FAILPOINTS` names, if any: one line naming what is wrong otherwise.
pub fn from_env() -> Result<()> {
    let Ok(spec) = std::env::var("FAILPOINTS") else {
        return Ok(());
    };
    if !fail::has_failpoints() {
        log::warn!("FAILPOINTS is set, but this build has no failpoints: ignored");
        return Ok(());
    }
    for entry in spec.split(';').map(str::trim).filter(|e| !e.is_empty()) {
        let (name, actions) = entry
            .split_once('=')
            .ok_or_else(|| anyhow!("FAILPOINTS: {entry:?} is not name=actions"))?;
        fail::cfg(name.trim(), actions.trim()).map_err(|e| anyhow!("FAILPOINTS: {}: {e}", name.trim()))?;
    }
    log::warn!("failpoints set: {spec}");
    Ok(())
}

/// How long to stall at `name` (`return(ms)`), for the caller to await: the runtime's other
/// tasks go on meanwhile, as they would while a step waits on a slow disk or kernel (the crate's
/// own `sleep` would block a runtime thread instead).
#[cfg_attr(not(feature = "failpoints"), allow(unused_variables))]
pub fn stall(name: &str) -> Option<std::time::Duration> {
    fail::fail_point!(name, |ms: Option<String>| ms
        .and_then(|ms| ms.parse().ok())
        .map(std::time::Duration::from_millis));
    None
}

/// An I/O error to return at `name` (`return`: "Too many open files", the error a daemon out of
/// descriptors sees), in place of the call it stands before.
#[cfg_attr(not(feature = "failpoints"), allow(unused_variables))]
pub fn io_error(name: &str) -> Option<std::io::Error> {
    fail::fail_point!(name, |_| Some(std::io::Error::from_raw_os_error(libc::EMFILE)));
    None
}

/// A descriptor leaked at `name` when it is set to `return`: /dev/null opened and never closed,
/// a leak the soak's judge must catch (`lb_tests::soak`). Nothing else changes.
#[cfg_attr(not(feature = "failpoints"), allow(unused_variables))]
pub fn leak_descriptor(name: &str) {
    fail::fail_point!(name, |_| {
        if let Ok(file) = std::fs::File::open("/dev/null") {
            std::mem::forget(file);
        }
    });
}

/// A failpoint that kills the process when set to `return`: a crash between two steps, with
/// nothing unwound and nothing saved, as a power cut or `kill -9` would leave it.
#[macro_export]
macro_rules! crash_point {
    ($name:expr) => {
        fail::fail_point!($name, |_| std::process::abort())
    };
}
