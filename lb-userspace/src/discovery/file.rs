//! The `file` source: a JSON or TOML list of instances, for config management (Ansible,
//! Puppet) to write. Read at start and whenever it changes.
//!
//! Changes are seen through inotify (the `notify` crate, as `watch_config` does): a write is
//! seen at once rather than a poll interval later, and an idle file costs nothing. The watch is
//! on the file's directory, so a file replaced by a rename (the atomic writes of config
//! management tools) is seen too. While the file cannot be read, or the watch cannot be set,
//! both are tried again every `RETRY`, so a directory made later, or removed and made again,
//! is picked up.
//!
//! - JSON: a list of objects, `[{"id": "web-1", "address": "10.0.1.1", "port": 8080}, ...]`.
//! - TOML: tables `[[instance]]` with the same keys.
//!
//! Each object: `id`, `address`, and optionally `port`, `weight`, `zone`, `region`, `labels`.
//! A file that does not parse is refused whole (the last set stays); an entry that is not an
//! instance is skipped and counted, the rest apply.

use std::{path::Path, time::Duration};

use log::debug;

use super::Reporter;
use crate::status::discovery::{Entries, Entry, ErrorReason, Malformed, SourceError};

/// How often a file that cannot be read (or watched) is tried again.
const RETRY: Duration = Duration::from_secs(2);
/// Events closer than this are one change (a save makes several).
const SETTLE: Duration = Duration::from_millis(100);
/// Largest file read (10,000 instances with labels stay far below it).
const MAX_BYTES: u64 = 16 * 1024 * 1024;

/// Reads the file now and on every change, until the writer is gone.
pub async fn run(reporter: Reporter) {
    let Some(path) = reporter.settings.path.clone() else {
        return;
    };
    loop {
        let (tx, mut events) = tokio::sync::mpsc::unbounded_channel::<()>();
        let watcher = match crate::files::watch(&path, tx) {
            Ok(w) => w,
            Err(e) => {
                let e = SourceError::new(
                    ErrorReason::Unreadable,
                    format!("cannot watch {}: {e}", path.display()),
                );
                if !reporter.send(Err(e)).await {
                    return;
                }
                tokio::time::sleep(RETRY).await;
                continue;
            }
        };
        let mut outcome = read(&path).await;
        loop {
            let failed = outcome.is_err();
            if !reporter.send(outcome).await {
                return;
            }
            if failed {
                // Made later, or its directory gone and made again (the watch with it).
                tokio::select! {
                    e = events.recv() => if e.is_none() { break },
                    _ = tokio::time::sleep(RETRY) => break,
                }
            } else if events.recv().await.is_none() {
                break;
            }
            tokio::time::sleep(SETTLE).await;
            while events.try_recv().is_ok() {}
            outcome = read(&path).await;
        }
        drop(watcher);
    }
}

/// The file, read and parsed off the async workers.
async fn read(path: &Path) -> Result<Entries, SourceError> {
    let owned = path.to_path_buf();
    let entries = tokio::task::spawn_blocking(move || load(&owned))
        .await
        .map_err(|e| SourceError::new(ErrorReason::Unreadable, format!("read task: {e}")))??;
    debug!("{}: {} entries", path.display(), entries.len());
    Ok(entries)
}

/// The file read and parsed, as the source reads it (`lb config check` too).
pub fn load(path: &Path) -> Result<Entries, SourceError> {
    let bytes = read_bounded(path)?;
    let text = String::from_utf8(bytes).map_err(|_| {
        SourceError::new(
            ErrorReason::Parse,
            format!("{} is not UTF-8 text", path.display()),
        )
    })?;
    parse(path, &text).map_err(|e| SourceError::new(ErrorReason::Parse, e))
}

fn read_bounded(path: &Path) -> Result<Vec<u8>, SourceError> {
    use std::io::Read;
    let unreadable = |e: std::io::Error| {
        SourceError::new(
            ErrorReason::Unreadable,
            format!("cannot read {}: {e}", path.display()),
        )
    };
    let mut bytes = Vec::new();
    std::fs::File::open(path)
        .map_err(unreadable)?
        .take(MAX_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(unreadable)?;
    if bytes.len() as u64 > MAX_BYTES {
        return Err(SourceError::new(
            ErrorReason::Unreadable,
            format!("{} is larger than {MAX_BYTES} bytes", path.display()),
        ));
    }
    Ok(bytes)
}

/// The TOML form: tables `[[instance]]`, nothing else.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct TomlList {
    #[serde(default)]
    instance: Vec<toml::Value>,
}

/// A file's text as entries: JSON for `.json`, TOML for `.toml`. An error (one line) when it
/// is not a list of objects at all; an entry that is not an instance is a malformed entry.
pub fn parse(path: &Path, text: &str) -> Result<Entries, String> {
    let json = path.extension().is_some_and(|e| e == "json");
    if json {
        let values: Vec<serde_json::Value> = serde_json::from_str(text)
            .map_err(|e| format!("{}: not a JSON list of instances: {e}", path.display()))?;
        Ok(values
            .into_iter()
            .enumerate()
            .map(|(i, v)| {
                let at = named(i, v.get("id").and_then(|x| x.as_str()));
                serde_json::from_value::<Entry>(v).map_err(|e| Malformed {
                    at,
                    why: e.to_string(),
                })
            })
            .collect())
    } else {
        let list: TomlList = toml::from_str(text).map_err(|e| {
            format!(
                "{}: not a TOML list of [[instance]] tables: {}",
                path.display(),
                e.message().lines().next().unwrap_or("invalid TOML")
            )
        })?;
        Ok(list
            .instance
            .into_iter()
            .enumerate()
            .map(|(i, v)| {
                let at = named(i, v.get("id").and_then(|x| x.as_str()));
                v.try_into::<Entry>().map_err(|e| Malformed {
                    at,
                    why: e
                        .message()
                        .lines()
                        .next()
                        .unwrap_or("not an instance")
                        .to_string(),
                })
            })
            .collect())
    }
}

/// How a skipped entry is named: its id, or its place in the file.
fn named(i: usize, id: Option<&str>) -> String {
    match id {
        Some(id) if !id.is_empty() => id.to_string(),
        _ => format!("entry {}", i + 1),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_and_toml_lists_parse_and_bad_entries_are_marked() {
        let json = r#"[
            {"id": "a", "address": "10.0.1.1", "port": 8080, "weight": 5, "zone": "z1", "region": "eu", "labels": {"role": "canary"}},
            {"id": "b", "address": "10.0.1.2", "port": "http"},
            {"address": "10.0.1.3", "colour": "blue"}
        ]"#;
        let e = parse(Path::new("/x/web.json"), json).unwrap();
        assert_eq!(e.len(), 3);
        let a = e[0].as_ref().unwrap();
        assert_eq!(
            (a.port, a.weight, a.labels["role"].as_str()),
            (Some(8080), Some(5), "canary")
        );
        let b = e[1].as_ref().unwrap_err();
        assert_eq!(b.at, "b");
        assert!(b.why.contains("invalid type"), "{}", b.why);
        let third = e[2].as_ref().unwrap_err();
        assert_eq!(third.at, "entry 3");
        assert!(
            third.why.contains("colour") || third.why.contains("missing field"),
            "{}",
            third.why
        );

        let toml = "[[instance]]\nid = \"a\"\naddress = \"10.0.1.1\"\nlabels = { role = \"canary\" }\n\n[[instance]]\nid = \"b\"\naddress = \"10.0.1.2\"\nport = 70000\n";
        let e = parse(Path::new("/x/web.toml"), toml).unwrap();
        assert_eq!(e[0].as_ref().unwrap().labels["role"], "canary");
        let b = e[1].as_ref().unwrap_err();
        assert_eq!(b.at, "b");
        assert!(!b.why.contains('\n'), "{}", b.why);
        assert!(parse(Path::new("/x/web.toml"), "").unwrap().is_empty());
    }

    #[test]
    fn a_file_that_is_no_list_is_refused_whole_in_one_line() {
        for (path, text) in [
            ("/x/web.json", "{\"id\": \"a\"}"),
            ("/x/web.json", "[{\"id\": \"a\", "),
            ("/x/web.toml", "[[instance]\nid = 1"),
            ("/x/web.toml", "[[backend]]\nid = \"a\"\naddress = \"10.0.1.1\"\n"),
        ] {
            let e = parse(Path::new(path), text).unwrap_err();
            assert!(e.starts_with(path) && !e.contains('\n'), "{e}");
        }
    }
}
