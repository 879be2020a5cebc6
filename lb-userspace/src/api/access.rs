//! Who may do what on the API, and an audit line for what they did. The Unix socket is root's
//! (mode 0600): everything. On TCP every request names a token, and the token a scope:
//! `read` (GET, but not a client's flow by its tuple), `report` (what a backend says of itself:
//! register and deregister instances, heartbeat, health and load; optionally only for some
//! services), `admin` (everything). Tokens and the TLS certificate are read again on SIGHUP.

use std::{
    collections::BTreeSet,
    os::unix::fs::PermissionsExt,
    path::Path,
    sync::{Arc, RwLock},
};

use axum::{
    extract::{Request, State},
    http::{Method, StatusCode},
    middleware::Next,
    response::{IntoResponse, Response},
};
use log::info;

use super::failure::Failure;
use crate::{config::ApiConfig, serve::Peer};

/// Shortest token accepted: 32 bytes, as from `openssl rand -hex 16`.
pub const MIN_TOKEN_LEN: usize = 32;

/// What a caller may do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scope {
    Read,
    Report,
    Admin,
}

impl Scope {
    fn name(self) -> &'static str {
        match self {
            Scope::Read => "read",
            Scope::Report => "report",
            Scope::Admin => "admin",
        }
    }
}

/// What a request needs.
#[derive(Debug, PartialEq, Eq)]
enum Need {
    Read,
    /// A backend's report about itself, for this service.
    Report(String),
    Admin,
}

#[derive(Default)]
struct TokenSet {
    admin: Option<String>,
    read: Option<String>,
    report: Option<String>,
}

/// A listener's access rule: the socket (root, no token) or TCP (tokens).
#[derive(Clone)]
pub struct Access {
    tcp: bool,
    tokens: Arc<RwLock<TokenSet>>,
    report_services: Arc<RwLock<Option<BTreeSet<String>>>>,
}

impl Access {
    pub fn socket() -> Self {
        Self {
            tcp: false,
            tokens: Arc::default(),
            report_services: Arc::default(),
        }
    }

    /// The TCP listener's tokens, read from their files.
    pub fn tcp(cfg: &ApiConfig) -> anyhow::Result<Self> {
        let access = Self {
            tcp: true,
            tokens: Arc::default(),
            report_services: Arc::default(),
        };
        access.reload(cfg)?;
        Ok(access)
    }

    /// Reads every token file again; on any error nothing changes.
    pub fn reload(&self, cfg: &ApiConfig) -> anyhow::Result<()> {
        let read = |p: &Option<std::path::PathBuf>| p.as_deref().map(read_token).transpose();
        let set = TokenSet {
            admin: read(&cfg.token_file)?,
            read: read(&cfg.read_token_file)?,
            report: read(&cfg.report_token_file)?,
        };
        *self.tokens.write().unwrap_or_else(|p| p.into_inner()) = set;
        *self.report_services.write().unwrap_or_else(|p| p.into_inner()) =
            cfg.report_services.as_ref().map(|s| s.iter().cloned().collect());
        Ok(())
    }

    /// The scope a bearer token gives, if any (compared in constant time).
    fn scope_of(&self, given: &str) -> Option<Scope> {
        let t = self.tokens.read().unwrap_or_else(|p| p.into_inner());
        let same = |want: &Option<String>| {
            want.as_ref()
                .is_some_and(|w| bool::from(subtle::ConstantTimeEq::ct_eq(given.as_bytes(), w.as_bytes())))
        };
        // Every comparison runs, so the time does not say which token it was.
        let (admin, report, read) = (same(&t.admin), same(&t.report), same(&t.read));
        if admin {
            Some(Scope::Admin)
        } else if report {
            Some(Scope::Report)
        } else if read {
            Some(Scope::Read)
        } else {
            None
        }
    }

    /// The scope of a request: its bearer token's on TCP (refused without a known one), all
    /// on the socket.
    fn caller(&self, headers: &axum::http::HeaderMap) -> Result<Scope, Failure> {
        if !self.tcp {
            return Ok(Scope::Admin);
        }
        let given = crate::serve::bearer(headers)
            .ok_or_else(|| Failure::new(StatusCode::UNAUTHORIZED, "a bearer token is required"))?;
        self.scope_of(given)
            .ok_or_else(|| Failure::new(StatusCode::UNAUTHORIZED, "unknown bearer token"))
    }

    /// Whether a request may read, as `guard` decides a GET, and a refusal audited as its
    /// are: what the status page asks, outside the API's routes.
    pub fn may_read(&self, request: &axum::http::request::Parts) -> Result<(), Failure> {
        let (refused, scope) = match self.caller(&request.headers) {
            Ok(scope) if self.allows(scope, &Need::Read) => return Ok(()),
            Ok(scope) => (refusal(scope, Need::Read, &Method::GET), scope.name()),
            Err(refused) => (refused, "none"),
        };
        let peer = request.extensions.get::<Peer>().and_then(|p| p.0);
        self.audit(&request.method, request.uri.path(), refused.status(), scope, peer);
        Err(refused)
    }

    /// The audit line of a change or a refusal.
    fn audit(
        &self,
        method: &Method,
        path: &str,
        status: StatusCode,
        scope: &str,
        peer: Option<std::net::IpAddr>,
    ) {
        let transport = if self.tcp { "tcp" } else { "socket" };
        let peer = peer.map_or_else(|| "local".to_string(), |p| p.to_string());
        info!(target: "audit", "{method} {path} {} transport={transport} scope={scope} peer={peer}", status.as_u16());
    }

    fn allows(&self, scope: Scope, need: &Need) -> bool {
        match (scope, need) {
            (Scope::Admin, _) => true,
            (Scope::Read, Need::Read) => true,
            (Scope::Report, Need::Report(service)) => self
                .report_services
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .as_ref()
                .is_none_or(|s| s.contains(service)),
            _ => false,
        }
    }
}

/// Reads a token file: a regular file readable by its owner alone, whose first line is the
/// token, at least `MIN_TOKEN_LEN` bytes. Errors are one line naming the file and the fix.
pub fn read_token(path: &Path) -> anyhow::Result<String> {
    let at = path.display();
    // The mode of the file read (fstat), not of whatever the path named a moment before.
    let (bytes, meta) = crate::files::read_opened(path, 64 * 1024, 0)
        .map_err(|(_, e)| anyhow::anyhow!("cannot read token file {e}"))?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        anyhow::bail!("token file {at} is readable by others (mode {mode:o}; fix: chmod 600 {at})");
    }
    let text = String::from_utf8(bytes).map_err(|_| anyhow::anyhow!("token file {at} is not UTF-8"))?;
    let token = text.lines().next().unwrap_or_default().trim().to_string();
    if token.is_empty() {
        anyhow::bail!("token file {at} is empty");
    }
    if token.len() < MIN_TOKEN_LEN {
        anyhow::bail!(
            "the token in {at} has {} bytes, fewer than {MIN_TOKEN_LEN} (fix: openssl rand -hex 32 > {at})",
            token.len()
        );
    }
    Ok(token)
}

/// What `method path?query` needs.
fn need(method: &Method, path: &str, query: Option<&str>) -> Need {
    let segs: Vec<String> = path
        .split('/')
        .skip(1)
        .map(|s| {
            percent_encoding::percent_decode_str(s)
                .decode_utf8_lossy()
                .into_owned()
        })
        .collect();
    let segs: Vec<&str> = segs.iter().map(String::as_str).collect();
    if *method == Method::GET || *method == Method::HEAD {
        // A client's flow by its tuple tells who talks to whom: not for readers.
        let by_tuple = match segs.as_slice() {
            ["v1", "lookup"] => true,
            ["v1", "services", _, "pick"] => {
                query.is_some_and(|q| q.split('&').any(|kv| kv.starts_with("src=")))
            }
            _ => false,
        };
        return if by_tuple { Need::Admin } else { Need::Read };
    }
    match (method, segs.as_slice()) {
        (&Method::POST, ["v1", "services", s, "instances"])
        | (&Method::DELETE, ["v1", "services", s, "instances", _])
        | (
            &Method::PUT,
            [
                "v1",
                "services",
                s,
                "instances",
                _,
                "health" | "load" | "heartbeat",
            ],
        ) => Need::Report((*s).to_string()),
        _ => Need::Admin,
    }
}

/// Why `scope` may not do what `need`s more.
fn refusal(scope: Scope, need: Need, method: &Method) -> Failure {
    let why = match (scope, need) {
        (Scope::Read, Need::Admin) if *method == Method::GET => {
            "looking up a client's flow needs the admin token".to_string()
        }
        (Scope::Read, _) => "this token may only read".to_string(),
        (Scope::Report, Need::Report(s)) => format!("this token may not report for service {s}"),
        (Scope::Report, _) => {
            "this token may only register, deregister, heartbeat and report health and load".to_string()
        }
        _ => "not allowed".to_string(),
    };
    Failure::new(StatusCode::FORBIDDEN, why)
}

/// Checks the caller's scope for the request, runs it, and writes the audit line: every
/// change and every refusal, with verb, path, status, transport, scope and peer.
pub async fn guard(State(access): State<Access>, request: Request, next: Next) -> Response {
    let method = request.method().clone();
    let path = request.uri().path().to_string();
    let peer = request.extensions().get::<Peer>().and_then(|p| p.0);
    let audit = |status: StatusCode, scope: &str| access.audit(&method, &path, status, scope, peer);
    let scope = match access.caller(request.headers()) {
        Ok(scope) => scope,
        Err(refused) => {
            audit(StatusCode::UNAUTHORIZED, "none");
            return refused.into_response();
        }
    };
    let need = need(&method, &path, request.uri().query());
    if !access.allows(scope, &need) {
        audit(StatusCode::FORBIDDEN, scope.name());
        return refusal(scope, need, &method).into_response();
    }
    let response = next.run(request).await;
    // A heartbeat that renews is counted (lb_registration_heartbeats_total), not audited: at
    // 10,000 instances every 10 s it would be a thousand lines a second, 8 GB of log a day.
    // A refused one is audited as any refusal.
    let renewal = method == Method::PUT && path.ends_with("/heartbeat") && response.status().is_success();
    if method != Method::GET && method != Method::HEAD && !renewal {
        audit(response.status(), scope.name());
    }
    response
}

#[cfg(test)]
mod tests {
    use axum::http::header;

    use super::*;

    #[test]
    fn each_route_needs_its_scope() {
        let get = Method::GET;
        assert_eq!(need(&get, "/v1/services", None), Need::Read);
        assert_eq!(need(&get, "/v1/lookup", Some("src=1.2.3.4")), Need::Admin);
        assert_eq!(
            need(&get, "/v1/services/web/pick", Some("src=1.2.3.4&sport=1")),
            Need::Admin
        );
        assert_eq!(need(&get, "/v1/services/web/pick", None), Need::Read);
        let report = |m: Method, p: &str| need(&m, p, None);
        assert_eq!(
            report(Method::POST, "/v1/services/web/instances"),
            Need::Report("web".into())
        );
        assert_eq!(
            report(Method::DELETE, "/v1/services/web/instances/b1"),
            Need::Report("web".into())
        );
        assert_eq!(
            report(Method::PUT, "/v1/services/w%65b/instances/b1/load"),
            Need::Report("web".into())
        );
        assert_eq!(
            report(Method::PUT, "/v1/services/web/instances/b1/weight"),
            Need::Admin
        );
        // The operator's drain is the admin's, not a backend's report about itself.
        for verb in ["drain", "undrain"] {
            assert_eq!(
                report(Method::POST, &format!("/v1/services/web/instances/b1/{verb}")),
                Need::Admin
            );
        }
        assert_eq!(report(Method::DELETE, "/v1/services/web"), Need::Admin);
        assert_eq!(report(Method::POST, "/v1/services"), Need::Admin);
        assert_eq!(report(Method::POST, "/v1/reload"), Need::Admin);
    }

    #[test]
    fn a_report_token_reports_for_its_services_only() {
        let a = Access::socket();
        *a.report_services.write().unwrap() = Some(BTreeSet::from(["web".to_string()]));
        assert!(a.allows(Scope::Report, &Need::Report("web".into())));
        assert!(!a.allows(Scope::Report, &Need::Report("db".into())));
        assert!(!a.allows(Scope::Report, &Need::Read));
        assert!(!a.allows(Scope::Report, &Need::Admin));
        assert!(!a.allows(Scope::Read, &Need::Report("web".into())));
        assert!(!a.allows(Scope::Read, &Need::Admin));
        assert!(a.allows(Scope::Admin, &Need::Admin));
    }

    #[test]
    fn the_status_page_reads_with_a_read_or_admin_token_only() {
        let a = Access {
            tcp: true,
            tokens: Arc::new(RwLock::new(TokenSet {
                admin: Some("admin".into()),
                read: Some("read".into()),
                report: Some("report".into()),
            })),
            report_services: Arc::default(),
        };
        let request = |token: Option<&str>| {
            let mut r = axum::http::Request::builder().uri("/status/data");
            if let Some(t) = token {
                r = r.header(header::AUTHORIZATION, format!("Bearer {t}"));
            }
            r.body(()).unwrap().into_parts().0
        };
        for (token, want) in [
            (None, Some(StatusCode::UNAUTHORIZED)),
            (Some("nope"), Some(StatusCode::UNAUTHORIZED)),
            (Some("report"), Some(StatusCode::FORBIDDEN)),
            (Some("read"), None),
            (Some("admin"), None),
        ] {
            let got = a.may_read(&request(token)).err().map(|f| f.status());
            assert_eq!(got, want, "{token:?}");
        }
        // The socket is root's: no token.
        assert!(Access::socket().may_read(&request(None)).is_ok());
    }

    #[test]
    fn token_files_must_be_private_and_long() {
        let dir = std::env::temp_dir().join(format!("lb-token-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("t");
        let long = "0123456789abcdef0123456789abcdef";
        std::fs::write(&file, format!("{long}\n")).unwrap();
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = read_token(&file).unwrap_err().to_string();
        assert!(e.contains("readable by others") && e.contains("chmod 600"), "{e}");
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(read_token(&file).unwrap(), long);
        std::fs::write(&file, "short\n").unwrap();
        let e = read_token(&file).unwrap_err().to_string();
        assert!(e.contains("fewer than 32"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
