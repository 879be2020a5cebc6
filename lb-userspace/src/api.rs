//! The control API: one JSON request per line on a Unix socket only root can open, one JSON
//! response line back.

use std::{
    io::{BufRead, BufReader, Write},
    net::SocketAddr,
    os::unix::net::UnixStream,
    path::Path,
    time::Duration,
};

use serde::{Deserialize, Serialize};

use crate::config::{BackendSpec, Protocol, ServiceSpec};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    Status,
    ListServices,
    AddService {
        service: ServiceSpec,
    },
    RemoveService {
        name: String,
    },
    AddBackend {
        service: String,
        backend: BackendSpec,
    },
    RemoveBackend {
        service: String,
        id: String,
    },
    SetWeight {
        service: String,
        id: String,
        weight: u32,
    },
    Stats,
    /// Every backend's health, or one service's.
    Health {
        #[serde(default)]
        service: Option<String>,
    },
    /// Set a backend's external health score (0..1), optionally for `ttl` seconds.
    SetHealth {
        service: String,
        id: String,
        score: f64,
        #[serde(default)]
        ttl: Option<f64>,
    },
    Lookup {
        protocol: Protocol,
        src: SocketAddr,
        dst: SocketAddr,
    },
    /// Re-read the config file and replace the running services with it.
    Reload,
    /// Stop the daemon; the data plane stays attached.
    Shutdown,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Response {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
    #[serde(default)]
    pub data: serde_json::Value,
}

impl Response {
    pub fn ok(data: serde_json::Value, warnings: Vec<String>) -> Self {
        Self {
            ok: true,
            error: None,
            warnings,
            data,
        }
    }
    pub fn error(message: impl Into<String>) -> Self {
        Self {
            ok: false,
            error: Some(message.into()),
            warnings: Vec::new(),
            data: serde_json::Value::Null,
        }
    }
}

/// Sends one request and waits for its response.
pub fn call(socket: &Path, request: &Request, timeout: Duration) -> anyhow::Result<Response> {
    let stream = UnixStream::connect(socket).map_err(|e| {
        let hint = match e.kind() {
            std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused => "is the daemon running?",
            std::io::ErrorKind::PermissionDenied => "the control socket is root-only",
            _ => "",
        };
        anyhow::anyhow!(
            "cannot reach the daemon at {}: {e}{}",
            socket.display(),
            if hint.is_empty() {
                String::new()
            } else {
                format!(" ({hint})")
            }
        )
    })?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    let mut line = serde_json::to_string(request)?;
    line.push('\n');
    (&stream).write_all(line.as_bytes())?;
    let mut reader = BufReader::new(&stream);
    let mut answer = String::new();
    reader.read_line(&mut answer)?;
    if answer.is_empty() {
        anyhow::bail!("the daemon closed the connection without answering");
    }
    Ok(serde_json::from_str(&answer)?)
}
