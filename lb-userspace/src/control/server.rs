//! Serves the control socket: one JSON request per line, one response line back. Changes go
//! to the writer and wait for its pass; reads are answered here from its snapshot.

use std::{
    path::PathBuf,
    sync::{Arc, Mutex},
    time::Duration,
};

use log::{error, warn};
use serde_json::json;
use tokio::{
    io::{AsyncBufReadExt, AsyncWriteExt, BufReader},
    net::{UnixListener, UnixStream},
    sync::{mpsc, oneshot, watch},
};

use super::queries::Queries;
use crate::{
    api::{Request, Response},
    config::{Config, DaemonConfig},
    dataplane::Readers,
    error::{Error, Result},
    health::monitor::Board,
    model::Service,
    nat::NatStatus,
    reconcile::{Change, Command, Snapshot},
};

/// What every connection shares.
pub struct Shared {
    pub config_path: PathBuf,
    pub cfg: DaemonConfig,
    pub writer: mpsc::Sender<Command>,
    pub snapshot: watch::Receiver<Arc<Snapshot>>,
    pub readers: Arc<Readers>,
    pub nat: Arc<Mutex<NatStatus>>,
    pub board: Board,
    pub stop: watch::Sender<bool>,
}

/// Accepts connections until `stop` is set.
pub async fn serve(listener: UnixListener, shared: Arc<Shared>) {
    let mut stop = shared.stop.subscribe();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => { tokio::spawn(connection(stream, shared.clone())); }
                Err(e) => error!("accept: {e}"),
            },
            _ = stop.changed() => return,
        }
    }
}

async fn connection(stream: UnixStream, shared: Arc<Shared>) {
    let (read, mut write) = stream.into_split();
    let mut lines = BufReader::new(read).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        let (response, shutdown) = match serde_json::from_str::<Request>(&line) {
            Ok(Request::Shutdown) => (Response::ok(json!("stopping"), vec![]), true),
            Ok(request) => (handle(&shared, request).await, false),
            Err(e) => (Response::error(format!("malformed request: {e}")), false),
        };
        let mut out =
            serde_json::to_string(&response).unwrap_or_else(|_| r#"{"ok":false,"error":"serialize"}"#.into());
        out.push('\n');
        if write.write_all(out.as_bytes()).await.is_err() {
            return;
        }
        if shutdown {
            let _ = shared.stop.send(true);
            return;
        }
    }
}

async fn handle(shared: &Shared, request: Request) -> Response {
    let queries = || Queries {
        instance: &shared.cfg.instance,
        snap: shared.snapshot.borrow().clone(),
        readers: &shared.readers,
        nat: &shared.nat,
        board: &shared.board,
    };
    let read = |r: Result<serde_json::Value>| match r {
        Ok(data) => Response::ok(data, vec![]),
        Err(e) => Response::error(e.to_string()),
    };
    let reload = matches!(request, Request::Reload);
    let change = match request {
        Request::Status => return Response::ok(queries().status(), vec![]),
        Request::ListServices => return Response::ok(queries().list(), vec![]),
        Request::Stats => return read(queries().stats()),
        Request::Health { service } => return read(queries().health(service.as_deref())),
        Request::Lookup { protocol, src, dst } => return read(queries().lookup(protocol, src, dst)),
        Request::Shutdown => return Response::ok(json!("stopping"), vec![]),
        Request::Reload => match Config::load(&shared.config_path) {
            Ok(cfg) => {
                if cfg.daemon != shared.cfg {
                    warn!("reload: [daemon] changes take effect only after a restart");
                }
                Change::Replace(cfg.services)
            }
            Err(e) => return Response::error(e.to_string()),
        },
        Request::AddService { service } => Change::AddService(Service::from(service)),
        Request::RemoveService { name } => Change::RemoveService(name),
        Request::AddBackend { service, backend } => Change::AddBackend {
            service,
            backend: backend.into(),
        },
        Request::RemoveBackend { service, id } => Change::RemoveBackend { service, id },
        Request::SetWeight { service, id, weight } => Change::SetWeight { service, id, weight },
        Request::SetHealth {
            service,
            id,
            score,
            ttl,
        } => {
            let ttl = match ttl {
                None => None,
                Some(t) if t.is_finite() && t > 0.0 && t <= 30.0 * 24.0 * 3600.0 => {
                    Some(Duration::from_secs_f64(t))
                }
                Some(t) => return Response::error(format!("ttl {t} s is out of range (0, 2592000]")),
            };
            Change::SetExternal {
                service,
                id,
                score,
                ttl,
            }
        }
    };
    match submit(&shared.writer, change).await {
        Ok(warnings) => Response::ok(json!(if reload { "reloaded" } else { "ok" }), warnings),
        Err(e) => Response::error(e.to_string()),
    }
}

/// Hands a change to the writer and waits for the pass that applies (or refuses) it.
pub async fn submit(writer: &mpsc::Sender<Command>, change: Change) -> Result<Vec<String>> {
    let (reply, answer) = oneshot::channel();
    writer
        .send(Command::Change {
            change: Box::new(change),
            reply,
        })
        .await
        .map_err(|_| Error::dataplane("the reconciler has stopped"))?;
    answer
        .await
        .map_err(|_| Error::dataplane("the reconciler dropped the request"))?
}
