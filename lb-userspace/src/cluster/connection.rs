//! One connection to etcd, through the etcd-client crate: made on first use, made again after
//! a failure, every call bounded. The cluster's store and the etcd discovery source share it
//! (it imports nothing of the daemon).

use std::time::Duration;

use etcd_client::{Client, ConnectOptions};
use tokio::sync::Mutex;

/// How long one etcd call may take before etcd is said to be unavailable.
pub const CALL: Duration = Duration::from_secs(2);

pub struct Connection {
    endpoints: Vec<String>,
    client: Mutex<Option<Client>>,
}

impl Connection {
    pub fn new(endpoints: Vec<String>) -> Self {
        Self {
            endpoints,
            client: Mutex::new(None),
        }
    }

    /// A connected client (cheap to clone), connecting on first use or after a failure.
    async fn client(&self) -> Result<Client, String> {
        let mut slot = self.client.lock().await;
        if let Some(c) = slot.as_ref() {
            return Ok(c.clone());
        }
        let options = ConnectOptions::new()
            .with_connect_timeout(CALL)
            .with_timeout(CALL)
            .with_keep_alive(Duration::from_secs(1), CALL);
        let c = tokio::time::timeout(CALL * 2, Client::connect(&self.endpoints, Some(options)))
            .await
            .map_err(|_| {
                format!(
                    "no answer from {} within {:?}",
                    self.endpoints.join(", "),
                    CALL * 2
                )
            })?
            .map_err(|e| format!("{}: {e}", self.endpoints.join(", ")))?;
        *slot = Some(c.clone());
        Ok(c)
    }

    /// Forgets the client after an error, so the next call connects again.
    async fn reset(&self) {
        *self.client.lock().await = None;
    }

    /// One call, bounded by `CALL`; an error (one line) forgets the client.
    pub async fn call<T, F: std::future::Future<Output = Result<T, etcd_client::Error>>>(
        &self,
        f: impl FnOnce(Client) -> F,
    ) -> Result<T, String> {
        let client = self.client().await?;
        match tokio::time::timeout(CALL, f(client)).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => {
                self.reset().await;
                Err(e.to_string())
            }
            Err(_) => {
                self.reset().await;
                Err(format!("etcd did not answer within {CALL:?}"))
            }
        }
    }
}
