//! One connection to etcd, through the etcd-client crate: made on first use, made again after
//! a failure, every call bounded. The cluster's store and the etcd discovery source share it
//! (it imports nothing of the daemon but `[cluster]`'s settings). TLS and the user's password
//! are read from their files at each connect, so a rotated certificate or password is taken
//! at the next reconnect without a restart.

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use etcd_client::{Certificate, Client, ConnectOptions, Identity, TlsOptions};
use tokio::sync::Mutex;

use crate::model::cluster_settings::ClusterSettings;

/// How long one etcd call may take before etcd is said to be unavailable.
pub const CALL: Duration = Duration::from_secs(2);

/// The largest certificate, key or password file read.
const MAX_FILE: u64 = 1 << 20;

/// How the daemon proves itself to etcd and checks etcd: the files `[cluster]` names.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Security {
    pub ca: Option<PathBuf>,
    pub cert_key: Option<(PathBuf, PathBuf)>,
    pub user: Option<(String, PathBuf)>,
}

/// `Security`'s files as read: what a connect needs.
struct Loaded {
    tls: Option<TlsOptions>,
    user: Option<(String, String)>,
}

impl Security {
    pub fn of(settings: &ClusterSettings) -> Self {
        Self {
            ca: settings.etcd_ca.clone(),
            cert_key: settings.etcd_cert.clone().zip(settings.etcd_key.clone()),
            user: settings
                .etcd_user
                .clone()
                .zip(settings.etcd_password_file.clone()),
        }
    }

    /// Reads and checks every file (at start and by `lb config check`): one line naming the
    /// file and what is wrong with it.
    pub fn check(&self) -> Result<(), String> {
        self.load().map(drop)
    }

    /// Reads the files. Blocking.
    fn load(&self) -> Result<Loaded, String> {
        use rustls_pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};
        use tokio_rustls::rustls::{ClientConfig, RootCertStore, crypto::ring::default_provider};

        let read = |what: &str, path: &PathBuf| {
            crate::files::read_regular(path, MAX_FILE).map_err(|e| format!("cluster.{what}: cannot read {e}"))
        };
        let certs = |what: &str, path: &PathBuf, pem: &[u8]| {
            let chain = CertificateDer::pem_slice_iter(pem)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| format!("cluster.{what}: bad PEM in {}: {e}", path.display()))?;
            if chain.is_empty() {
                return Err(format!("cluster.{what}: no certificate in {}", path.display()));
            }
            Ok(chain)
        };
        let mut tls = None;
        if let Some(ca) = &self.ca {
            let pem = read("etcd_ca", ca)?;
            let mut roots = RootCertStore::empty();
            for cert in certs("etcd_ca", ca, &pem)? {
                roots
                    .add(cert)
                    .map_err(|e| format!("cluster.etcd_ca: unusable certificate in {}: {e}", ca.display()))?;
            }
            let mut options = TlsOptions::new().ca_certificate(Certificate::from_pem(&pem));
            if let Some((cert, key)) = &self.cert_key {
                let (cert_pem, key_pem) = (read("etcd_cert", cert)?, read("etcd_key", key)?);
                let chain = certs("etcd_cert", cert, &cert_pem)?;
                let private = PrivateKeyDer::from_pem_slice(&key_pem)
                    .map_err(|e| format!("cluster.etcd_key: no private key in {}: {e}", key.display()))?;
                // What the TLS handshake will do with them, checked now (a key that does not
                // fit the certificate, one of a kind rustls cannot sign with).
                ClientConfig::builder_with_provider(default_provider().into())
                    .with_safe_default_protocol_versions()
                    .map_err(|e| format!("cluster: TLS: {e}"))?
                    .with_root_certificates(roots)
                    .with_client_auth_cert(chain, private)
                    .map_err(|e| {
                        format!(
                            "cluster.etcd_key {} does not fit cluster.etcd_cert {}, or is unusable: {e}",
                            key.display(),
                            cert.display()
                        )
                    })?;
                options = options.identity(Identity::from_pem(cert_pem, key_pem));
            }
            tls = Some(options);
        }
        let user = match &self.user {
            Some((name, file)) => Some((name.clone(), read_password(file)?)),
            None => None,
        };
        Ok(Loaded { tls, user })
    }
}

/// The first line of the password file, which only its owner may read.
fn read_password(path: &Path) -> Result<String, String> {
    use std::os::unix::fs::PermissionsExt;
    let at = path.display();
    let (bytes, meta) = crate::files::read_opened(path, MAX_FILE, 0)
        .map_err(|(_, e)| format!("cluster.etcd_password_file: cannot read {e}"))?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(format!(
            "cluster.etcd_password_file {at} is readable by others (mode {mode:o}; fix: chmod 600 {at})"
        ));
    }
    let text =
        String::from_utf8(bytes).map_err(|_| format!("cluster.etcd_password_file {at} is not UTF-8"))?;
    let password = text.lines().next().unwrap_or_default().trim_end_matches('\r');
    if password.is_empty() {
        return Err(format!("cluster.etcd_password_file {at} is empty"));
    }
    Ok(password.to_string())
}

/// An etcd error as one line: gRPC's own message (not its metadata), and the causes a
/// transport error hides in its sources (a refused certificate, a refused connection).
pub fn describe(e: &etcd_client::Error) -> String {
    let mut out = match e {
        etcd_client::Error::GRpcStatus(s) if !s.message().is_empty() => s.message().to_string(),
        other => other.to_string(),
    };
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        let line = s.to_string();
        if !line.is_empty() && !out.contains(&line) {
            out.push_str(": ");
            out.push_str(&line);
        }
        source = s.source();
    }
    out.split_whitespace().collect::<Vec<_>>().join(" ")
}

pub struct Connection {
    endpoints: Vec<String>,
    security: Security,
    client: Mutex<Option<Client>>,
}

impl Connection {
    pub fn new(endpoints: Vec<String>, security: Security) -> Self {
        Self {
            endpoints,
            security,
            client: Mutex::new(None),
        }
    }

    /// A connected client (cheap to clone), connecting on first use or after a failure.
    async fn client(&self) -> Result<Client, String> {
        let mut slot = self.client.lock().await;
        if let Some(c) = slot.as_ref() {
            return Ok(c.clone());
        }
        let security = self.security.clone();
        let loaded = tokio::task::spawn_blocking(move || security.load())
            .await
            .map_err(|e| format!("reading etcd's credentials: {e}"))??;
        let mut options = ConnectOptions::new()
            .with_connect_timeout(CALL)
            .with_timeout(CALL)
            .with_keep_alive(Duration::from_secs(1), CALL);
        if let Some(tls) = loaded.tls {
            options = options.with_tls(tls);
        }
        if let Some((user, password)) = loaded.user {
            options = options.with_user(user, password);
        }
        let c = tokio::time::timeout(CALL * 2, Client::connect(&self.endpoints, Some(options)))
            .await
            .map_err(|_| {
                format!(
                    "no answer from {} within {:?}",
                    self.endpoints.join(", "),
                    CALL * 2
                )
            })?
            .map_err(|e| format!("{}: {}", self.endpoints.join(", "), describe(&e)))?;
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
                Err(describe(&e))
            }
            Err(_) => {
                self.reset().await;
                Err(format!("etcd did not answer within {CALL:?}"))
            }
        }
    }
}
