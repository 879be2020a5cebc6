//! The metrics endpoint: one render at a time, shared by the scrapes that wait for it, served
//! by the daemon's one accept loop (`crate::serve`).

use std::sync::Arc;

use tokio::sync::watch;

use super::{Metrics, render};

/// One render at a time: scrapes that arrive while one is under way wait for it and share
/// its body, so a crowd of scrapers costs one render, not one each.
#[derive(Clone)]
pub struct SharedRender {
    render: Arc<dyn Fn() -> Vec<u8> + Send + Sync>,
    /// Renders finished; read before waiting, so a waiter knows whether one finished since.
    done: Arc<std::sync::atomic::AtomicU64>,
    last: Arc<tokio::sync::Mutex<Arc<Vec<u8>>>>,
}

impl SharedRender {
    pub fn new(metrics: Metrics) -> Self {
        Self::with(move || render(&metrics))
    }

    /// Around any render function (the tests count its calls).
    pub fn with(render: impl Fn() -> Vec<u8> + Send + Sync + 'static) -> Self {
        Self {
            render: Arc::new(render),
            done: Arc::default(),
            last: Arc::default(),
        }
    }

    /// The body of a render that finished after this call began: the one under way when it
    /// came, shared, or its own.
    pub async fn body(&self) -> Option<Arc<Vec<u8>>> {
        use std::sync::atomic::Ordering;
        let seen = self.done.load(Ordering::Acquire);
        let mut last = self.last.lock().await;
        if self.done.load(Ordering::Acquire) != seen {
            // A render finished while this call waited for the lock: its body is no older
            // than the call.
            return Some(last.clone());
        }
        // Reading the maps and encoding take milliseconds: off the async workers.
        let render = self.render.clone();
        let body = Arc::new(tokio::task::spawn_blocking(move || render()).await.ok()?);
        *last = body.clone();
        self.done.fetch_add(1, Ordering::Release);
        Some(body)
    }
}

/// Whether the request sends `Authorization: Bearer <token>` (compared in constant time).
pub fn bearer_matches(headers: &axum::http::HeaderMap, token: &str) -> bool {
    let given = crate::serve::bearer(headers).unwrap_or_default();
    bool::from(subtle::ConstantTimeEq::ct_eq(given.as_bytes(), token.as_bytes()))
}

/// Serves `GET /metrics`, and `also` (the status page), on `listener` within `limits` until
/// `stop` is set. With a token, a scrape must send `Authorization: Bearer <token>`.
pub async fn serve(
    listener: tokio::net::TcpListener,
    metrics: Metrics,
    token: Option<String>,
    also: Option<axum::Router>,
    limits: crate::config::HttpLimits,
    stop: watch::Receiver<bool>,
) {
    use axum::{
        extract::State,
        http::{HeaderMap, StatusCode, header},
        response::IntoResponse,
        routing::get,
    };
    #[derive(Clone)]
    struct Endpoint {
        render: SharedRender,
        token: Option<Arc<String>>,
    }
    async fn scrape(State(e): State<Endpoint>, headers: HeaderMap) -> axum::response::Response {
        if let Some(token) = &e.token
            && !bearer_matches(&headers, token)
        {
            return (StatusCode::UNAUTHORIZED, "missing or wrong bearer token\n").into_response();
        }
        match e.render.body().await {
            Some(body) => (
                [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
                body.as_ref().clone(),
            )
                .into_response(),
            None => (StatusCode::INTERNAL_SERVER_ERROR, "scrape failed\n").into_response(),
        }
    }
    let app = axum::Router::new()
        .route("/metrics", get(scrape))
        .with_state(Endpoint {
            render: SharedRender::new(metrics),
            token: token.map(Arc::new),
        })
        .merge(also.unwrap_or_default());
    crate::serve::serve(
        "metrics",
        crate::serve::Listener::Tcp(listener),
        app,
        None,
        limits,
        stop,
    )
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn concurrent_scrapes_share_one_render() {
        use std::sync::atomic::{AtomicU64, Ordering};
        let renders = Arc::new(AtomicU64::new(0));
        let counted = renders.clone();
        let shared = SharedRender::with(move || {
            counted.fetch_add(1, Ordering::SeqCst);
            std::thread::sleep(std::time::Duration::from_millis(200));
            b"lb_up 1\n".to_vec()
        });
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let bodies = rt.block_on(async {
            let scrapes: Vec<_> = (0..32)
                .map(|_| {
                    let s = shared.clone();
                    tokio::spawn(async move { s.body().await })
                })
                .collect();
            let mut out = Vec::new();
            for s in scrapes {
                out.push(s.await.unwrap().expect("body"));
            }
            out
        });
        assert!(bodies.iter().all(|b| b.as_slice() == b"lb_up 1\n"));
        // 32 scrapes at once: the first renders, the rest wait for it and share it (one more
        // at most, for a scrape that came between a render's end and the next waiter).
        let n = renders.load(Ordering::SeqCst);
        assert!(n <= 2, "{n} renders for 32 concurrent scrapes");
    }
}
