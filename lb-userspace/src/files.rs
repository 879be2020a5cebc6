//! Files that a config or an API body names and the daemon (as root) reads: a health check's
//! `tls_ca`, the geo data. Only regular files, and only so many bytes: `/dev/zero` never ends
//! and a FIFO never answers. And the files it writes itself (the state file, BIRD's config),
//! privately and atomically.

use std::{io::Read, os::unix::fs::OpenOptionsExt, path::Path};

pub const MIB: u64 = 1024 * 1024;

/// Reads the regular file at `path`, at most `max` bytes. What it is comes from the opened
/// file's own metadata (fstat), so the path cannot be swapped for a device between a check and
/// the read. Blocking: call it from a blocking thread. Errors are one line naming the file.
pub fn read_regular(path: &Path, max: u64) -> Result<Vec<u8>, String> {
    read_opened(path, max, 0).map(|(bytes, _)| bytes).map_err(|e| e.1)
}

/// As `read_regular`, with the opened file's metadata (its mode, say), extra `open` flags
/// (`O_NOFOLLOW`), and the error's kind beside its line (a caller may take NotFound as none).
pub fn read_opened(
    path: &Path,
    max: u64,
    flags: libc::c_int,
) -> Result<(Vec<u8>, std::fs::Metadata), (Option<std::io::ErrorKind>, String)> {
    let at = path.display();
    let io = |e: std::io::Error| (Some(e.kind()), format!("{at}: {e}"));
    let file = std::fs::OpenOptions::new()
        .read(true)
        // Opening a FIFO must not wait for a writer, nor a terminal become ours.
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY | flags)
        .open(path)
        .map_err(io)?;
    let meta = file.metadata().map_err(io)?;
    if !meta.file_type().is_file() {
        return Err((None, format!("{at}: not a regular file")));
    }
    let too_big = || (None, format!("{at}: larger than the limit of {}", size(max)));
    if meta.len() > max {
        return Err(too_big());
    }
    // The size is only a hint (procfs says 0, a file may grow): the read is bounded itself.
    let mut bytes = Vec::with_capacity(meta.len() as usize);
    file.take(max.saturating_add(1))
        .read_to_end(&mut bytes)
        .map_err(io)?;
    if bytes.len() as u64 > max {
        return Err(too_big());
    }
    Ok((bytes, meta))
}

fn size(bytes: u64) -> String {
    if bytes >= MIB && bytes.is_multiple_of(MIB) {
        format!("{} MiB", bytes / MIB)
    } else {
        format!("{bytes} bytes")
    }
}

/// Replaces `path` with `bytes`, atomically and privately: written to a fresh `.tmp` beside it
/// (0600, created new, never through a link: a leftover or a planted link is removed first),
/// synced, renamed over `path`, and the directory synced.
pub fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = std::path::PathBuf::from(tmp);
    match std::fs::remove_file(&tmp) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    // The new file is whole beside the old one.
    crate::crash_point!("file-written-before-rename");
    std::fs::rename(&tmp, path)?;
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::File::open(dir)?.sync_all()
}

/// Watches `path`'s directory for anything that touches the file (an edit, or a rename over it,
/// as config management writes files), sending a unit on `tx` for each event.
pub fn watch(
    path: &Path,
    tx: tokio::sync::mpsc::UnboundedSender<()>,
) -> notify::Result<notify::RecommendedWatcher> {
    use notify::Watcher;
    let dir = path.parent().unwrap_or(Path::new("/")).to_path_buf();
    let file = path.to_path_buf();
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        if let Ok(e) = event
            && e.paths.iter().any(|p| p == &file)
            && !matches!(e.kind, notify::EventKind::Access(_))
        {
            let _ = tx.send(());
        }
    })?;
    watcher.watch(&dir, notify::RecursiveMode::NonRecursive)?;
    Ok(watcher)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp(name: &str, len: usize) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("lb-files-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(name);
        std::fs::write(&path, vec![b'a'; len]).unwrap();
        path
    }

    #[test]
    fn only_regular_files_within_the_limit_are_read() {
        let ok = temp("ok", 1000);
        assert_eq!(read_regular(&ok, 1000).unwrap().len(), 1000);
        let e = read_regular(&ok, 999).unwrap_err();
        assert_eq!(e, format!("{}: larger than the limit of 999 bytes", ok.display()));
        let big = temp("big", (MIB + 1) as usize);
        let e = read_regular(&big, MIB).unwrap_err();
        assert!(
            e.ends_with("larger than the limit of 1 MiB") && e.contains("big"),
            "{e}"
        );
        for (path, needle) in [
            ("/dev/zero", "/dev/zero: not a regular file"),
            ("/dev/null", "/dev/null: not a regular file"),
            ("/", "/: not a regular file"),
            ("/nonexistent/ca.pem", "/nonexistent/ca.pem: "),
        ] {
            let e = read_regular(Path::new(path), MIB).unwrap_err();
            assert!(e.starts_with(needle) && !e.contains('\n'), "{e}");
        }
        let _ = std::fs::remove_dir_all(ok.parent().unwrap());
    }

    #[test]
    fn a_fifo_is_refused_without_waiting_for_a_writer() {
        let dir = std::env::temp_dir().join(format!("lb-files-fifo-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let fifo = dir.join("fifo");
        let c = std::ffi::CString::new(fifo.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: a valid C string; mkfifo only creates the node.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let e = read_regular(&fifo, MIB).unwrap_err();
        assert!(e.ends_with("not a regular file"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
