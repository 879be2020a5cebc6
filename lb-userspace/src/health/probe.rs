//! The active checks: one attempt each, bounded by the check's timeout.

use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use http_body_util::{BodyExt, Empty};
use hyper::{Request, body::Bytes};
use hyper_util::rt::TokioIo;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpSocket, TcpStream, UdpSocket},
};

use crate::{
    model::health_settings::{AgentSpec, CheckSpec, Probe},
    status::checks::Outcome,
};

/// Largest HTTP body read for `expect_body`.
const MAX_BODY: usize = 64 * 1024;

/// How a check through the VIP leaves: its socket mark (which names the backend's slot, see
/// `lb_common::steer`) and the source the backend's answer comes back to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Via {
    pub mark: u32,
    pub source: std::net::IpAddr,
}

/// Runs one check of `spec` (through the VIP when `via` is given).
pub async fn check(spec: &CheckSpec, via: Option<Via>) -> Outcome {
    let start = Instant::now();
    let result = tokio::time::timeout(spec.timeout, attempt(spec, via)).await;
    let latency = start.elapsed();
    let (ok, detail) = match result {
        Ok(Ok(detail)) => (true, detail),
        Ok(Err(detail)) => (false, detail),
        Err(_) => (false, format!("no answer within {} ms", spec.timeout.as_millis())),
    };
    Outcome { ok, latency, detail }
}

/// A TCP connection to the check's target, marked and bound when it goes through the VIP.
async fn connect(spec: &CheckSpec, via: Option<Via>) -> Result<TcpStream, String> {
    let Some(via) = via else {
        return TcpStream::connect(spec.target)
            .await
            .map_err(|e| format!("connect: {}", io_text(&e)));
    };
    let socket = if spec.target.is_ipv4() {
        TcpSocket::new_v4()
    } else {
        TcpSocket::new_v6()
    }
    .map_err(|e| format!("socket: {}", io_text(&e)))?;
    socket2::SockRef::from(&socket)
        .set_mark(via.mark)
        .map_err(|e| format!("mark: {}", io_text(&e)))?;
    socket
        .bind(SocketAddr::new(via.source, 0))
        .map_err(|e| format!("bind {}: {}", via.source, io_text(&e)))?;
    socket
        .connect(spec.target)
        .await
        .map_err(|e| format!("connect through the VIP: {}", io_text(&e)))
}

async fn attempt(spec: &CheckSpec, via: Option<Via>) -> Result<String, String> {
    match &spec.probe {
        Probe::None => Ok("not checked".into()),
        Probe::Tcp => {
            let stream = connect(spec, via).await?;
            // Close with a reset: thousands of checks a second leave no TIME_WAIT behind.
            let _ = stream.set_zero_linger();
            Ok("connected".into())
        }
        Probe::Http {
            path,
            host,
            status,
            body,
            tls,
        } => {
            let stream = connect(spec, via).await?;
            match tls {
                None => {
                    http(
                        TokioIo::new(stream),
                        spec,
                        path,
                        host.as_deref(),
                        *status,
                        body.as_deref(),
                    )
                    .await
                }
                Some(ca) => {
                    let config = tls::client_config(ca.as_deref()).await?;
                    let name = tls::server_name(host.as_deref(), spec.target)?;
                    let stream = tokio_rustls::TlsConnector::from(config)
                        .connect(name, stream)
                        .await
                        .map_err(|e| format!("tls: {}", io_text(&e)))?;
                    http(
                        TokioIo::new(stream),
                        spec,
                        path,
                        host.as_deref(),
                        *status,
                        body.as_deref(),
                    )
                    .await
                }
            }
        }
        Probe::Udp { send, expect } => udp(spec, via, send, expect.as_deref()).await,
    }
}

/// One GET on a connected stream (plain or TLS).
async fn http<IO>(
    io: IO,
    spec: &CheckSpec,
    path: &str,
    host: Option<&str>,
    (lo, hi): (u16, u16),
    want: Option<&str>,
) -> Result<String, String>
where
    IO: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(io)
        .await
        .map_err(|e| format!("http: {e}"))?;
    let driver = tokio::spawn(conn);
    let host = host.map_or_else(|| spec.target.to_string(), str::to_string);
    let request = Request::get(path)
        .header(hyper::header::HOST, host)
        .header(hyper::header::USER_AGENT, "lb-health-check")
        .header(hyper::header::CONNECTION, "close")
        .body(Empty::<Bytes>::new())
        .map_err(|e| format!("http request: {e}"))?;
    let result = async {
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| format!("http: {e}"))?;
        let code = response.status().as_u16();
        if !(lo..=hi).contains(&code) {
            return Err(format!("status {code}, expected {lo}-{hi}"));
        }
        if let Some(want) = want {
            let mut body = response.into_body();
            let mut seen = Vec::new();
            while let Some(frame) = body.frame().await {
                let frame = frame.map_err(|e| format!("http body: {e}"))?;
                if let Some(data) = frame.data_ref() {
                    seen.extend_from_slice(data);
                }
                if contains(&seen, want.as_bytes()) {
                    return Ok(format!("status {code}, body holds {want:?}"));
                }
                if seen.len() > MAX_BODY {
                    break;
                }
            }
            return Err(format!("status {code}, body lacks {want:?}"));
        }
        Ok(format!("status {code}"))
    }
    .await;
    driver.abort();
    result
}

async fn udp(
    spec: &CheckSpec,
    via: Option<Via>,
    send: &[u8],
    expect: Option<&[u8]>,
) -> Result<String, String> {
    let local: SocketAddr = match via {
        Some(v) => SocketAddr::new(v.source, 0),
        None if spec.target.is_ipv4() => "0.0.0.0:0".parse().expect("literal"),
        None => "[::]:0".parse().expect("literal"),
    };
    let socket = UdpSocket::bind(local)
        .await
        .map_err(|e| format!("bind: {}", io_text(&e)))?;
    if let Some(v) = via {
        socket2::SockRef::from(&socket)
            .set_mark(v.mark)
            .map_err(|e| format!("mark: {}", io_text(&e)))?;
    }
    // Connected, so an ICMP port unreachable comes back as ECONNREFUSED.
    socket
        .connect(spec.target)
        .await
        .map_err(|e| format!("connect: {}", io_text(&e)))?;
    socket
        .send(send)
        .await
        .map_err(|e| format!("send: {}", io_text(&e)))?;
    let mut buf = vec![0u8; 2048];
    let n = socket.recv(&mut buf).await.map_err(|e| match e.kind() {
        std::io::ErrorKind::ConnectionRefused => "port unreachable".to_string(),
        _ => format!("recv: {}", io_text(&e)),
    })?;
    match expect {
        Some(want) if !contains(&buf[..n], want) => Err(format!(
            "reply of {n} bytes lacks {:?}",
            String::from_utf8_lossy(want)
        )),
        _ => Ok(format!("reply of {n} bytes")),
    }
}

/// Longest agent line read.
const MAX_AGENT_LINE: usize = 1024;

/// What an agent said.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AgentAnswer {
    Line(String),
    /// No connection or no answer in time: not a health failure (HAProxy's rule).
    Unreachable(String),
    /// An answer that is no agent line.
    Malformed(String),
}

/// Asks the agent once for its first line.
pub async fn agent(spec: &AgentSpec) -> AgentAnswer {
    let ask = async {
        let mut stream = match TcpStream::connect(spec.target).await {
            Ok(s) => s,
            Err(e) => return AgentAnswer::Unreachable(format!("connect: {}", io_text(&e))),
        };
        if let Some(send) = &spec.send
            && let Err(e) = stream.write_all(send).await
        {
            return AgentAnswer::Unreachable(format!("send: {}", io_text(&e)));
        }
        let mut line = Vec::new();
        let mut buf = [0u8; 256];
        loop {
            let n = match stream.read(&mut buf).await {
                Ok(n) => n,
                Err(e) => return AgentAnswer::Unreachable(format!("read: {}", io_text(&e))),
            };
            line.extend_from_slice(&buf[..n]);
            if let Some(end) = line.iter().position(|&c| c == b'\n') {
                line.truncate(end);
                break;
            }
            if n == 0 {
                break;
            }
            if line.len() > MAX_AGENT_LINE {
                return AgentAnswer::Malformed(format!("agent line longer than {MAX_AGENT_LINE} bytes"));
            }
        }
        match String::from_utf8(line) {
            Ok(l) => AgentAnswer::Line(l),
            Err(_) => AgentAnswer::Malformed("agent line is not UTF-8".into()),
        }
    };
    match tokio::time::timeout(spec.timeout, ask).await {
        Ok(a) => a,
        Err(_) => AgentAnswer::Unreachable(format!("no answer within {} ms", spec.timeout.as_millis())),
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    needle.is_empty() || haystack.windows(needle.len()).any(|w| w == needle)
}

/// The OS error's text without the "(os error N)" tail.
fn io_text(e: &std::io::Error) -> String {
    let text = e.to_string();
    match text.find(" (os error") {
        Some(i) => text[..i].to_lowercase(),
        None => text.to_lowercase(),
    }
}

/// The wait before a backend's next check: the interval (the fast one while unsettled) with
/// up to `jitter` of it added or taken away, from a per-check random draw in 0..1.
pub fn next_delay(spec: &CheckSpec, unsettled: bool, draw: f64) -> Duration {
    let base = if unsettled {
        spec.fast_interval
    } else {
        spec.interval
    };
    let spread = spec.jitter * (2.0 * draw.clamp(0.0, 1.0) - 1.0);
    base.mul_f64((1.0 + spread).max(0.05))
}

/// HTTPS checks' TLS: a client config per CA file (or none: not verified), built once.
/// Reads and parses a `tls_ca` file as a check does (`lb config check`).
pub async fn load_tls_ca(ca: &str) -> Result<(), String> {
    tls::client_config(Some(ca)).await.map(drop)
}

mod tls {
    use std::{
        collections::HashMap,
        sync::{Arc, Mutex, OnceLock},
    };

    use rustls_pki_types::{CertificateDer, ServerName, UnixTime, pem::PemObject};
    use tokio_rustls::rustls::{
        self, ClientConfig, DigitallySignedStruct, SignatureScheme,
        client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
        crypto::CryptoProvider,
    };

    /// Accepts any certificate (the signatures of the handshake are still checked): for
    /// checks without `tls_ca`.
    #[derive(Debug)]
    struct Unverified(Arc<CryptoProvider>);

    impl ServerCertVerifier for Unverified {
        fn verify_server_cert(
            &self,
            _: &CertificateDer<'_>,
            _: &[CertificateDer<'_>],
            _: &ServerName<'_>,
            _: &[u8],
            _: UnixTime,
        ) -> Result<ServerCertVerified, rustls::Error> {
            Ok(ServerCertVerified::assertion())
        }

        fn verify_tls12_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls12_signature(
                message,
                cert,
                dss,
                &self.0.signature_verification_algorithms,
            )
        }

        fn verify_tls13_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls13_signature(
                message,
                cert,
                dss,
                &self.0.signature_verification_algorithms,
            )
        }

        fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
            self.0.signature_verification_algorithms.supported_schemes()
        }
    }

    type Cache = Mutex<HashMap<Option<String>, Arc<ClientConfig>>>;

    /// Largest `tls_ca` file read (a CA bundle of every public root is about 200 KiB).
    pub const MAX_CA_FILE: u64 = crate::files::MIB;

    /// The config for `ca` (a PEM file of CA certificates), read once; a file that cannot be
    /// read fails the check with why (and is tried again next time).
    pub async fn client_config(ca: Option<&str>) -> Result<Arc<ClientConfig>, String> {
        static CACHE: OnceLock<Cache> = OnceLock::new();
        let cache = CACHE.get_or_init(Default::default);
        let key = ca.map(str::to_string);
        if let Some(c) = cache.lock().unwrap_or_else(|p| p.into_inner()).get(&key) {
            return Ok(c.clone());
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("tls: {e}"))?;
        let config = match ca {
            None => builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(Unverified(provider)))
                .with_no_client_auth(),
            Some(path) => {
                // Any path an API body names, read as root: a regular file of at most
                // MAX_CA_FILE, off the runtime's threads.
                let owned = std::path::PathBuf::from(path);
                let pem =
                    tokio::task::spawn_blocking(move || crate::files::read_regular(&owned, MAX_CA_FILE))
                        .await
                        .map_err(|e| format!("tls_ca {path}: {e}"))?
                        .map_err(|e| format!("tls_ca {e}"))?;
                let mut roots = rustls::RootCertStore::empty();
                let certs = CertificateDer::pem_slice_iter(&pem)
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|e| format!("tls_ca {path}: {e}"))?;
                let (added, _) = roots.add_parsable_certificates(certs);
                if added == 0 {
                    return Err(format!("tls_ca {path}: no CA certificate"));
                }
                builder.with_root_certificates(roots).with_no_client_auth()
            }
        };
        let config = Arc::new(config);
        cache
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(key, config.clone());
        Ok(config)
    }

    /// The name the certificate must carry: the check's host, else the backend's address.
    pub fn server_name(
        host: Option<&str>,
        target: std::net::SocketAddr,
    ) -> Result<ServerName<'static>, String> {
        match host {
            Some(h) => ServerName::try_from(h.to_string()).map_err(|e| format!("tls: host {h:?}: {e}")),
            None => Ok(ServerName::IpAddress(target.ip().into())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn tls_ca_is_a_regular_file_of_at_most_a_mib() {
        let e = tls::client_config(Some("/dev/zero")).await.unwrap_err();
        assert_eq!(e, "tls_ca /dev/zero: not a regular file");
        let dir = std::env::temp_dir().join(format!("lb-tls-ca-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let big = dir.join("big.pem");
        std::fs::write(&big, vec![b'-'; tls::MAX_CA_FILE as usize + 1]).unwrap();
        let e = tls::client_config(big.to_str()).await.unwrap_err();
        assert_eq!(
            e,
            format!("tls_ca {}: larger than the limit of 1 MiB", big.display())
        );
        let empty = dir.join("empty.pem");
        std::fs::write(&empty, "not a certificate\n").unwrap();
        let e = tls::client_config(empty.to_str()).await.unwrap_err();
        assert!(e.ends_with("empty.pem: no CA certificate"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
