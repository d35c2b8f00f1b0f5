//! The admin listener: `GET /metrics` (Prometheus text) and `GET /healthz` (200 while
//! serving, 503 while draining). Separate from the proxy listeners, so a scrape never
//! queues behind proxy traffic and the proxy's own requests never show in it.

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use super::Shutdown;
use super::handover::{self, Leaving};
use crate::metrics::Metrics;

/// Serves the admin endpoints until the process ends, or until `stop` (a reload that
/// moved or removed `[admin]`); connections already open finish on their own. At the
/// exit, an admin port that another process shares (a new binary) is handed over to it
/// ([`handover`]); one this process has alone goes on serving (`/healthz` says 503)
/// until the process ends.
pub async fn serve(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    shutdown: Shutdown,
    leaving: Leaving,
    stop: CancellationToken,
) {
    let mut open = Some(leaving.hold());
    let mut handing = None;
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            () = stop.cancelled() => return,
            shared = handover::closing(&mut handing, &leaving, Some(&listener), "admin listener"),
                if open.is_some() =>
            {
                if shared {
                    return handover::close(handing, crate::net::Listener::Tcp(listener));
                }
                // Alone on its port: it stays, and the exit does not wait for it.
                open = None;
                continue;
            }
        };
        if let (Ok(_), Some(h)) = (&accepted, &mut handing) {
            h.accepted();
        }
        let Ok((stream, _)) = accepted else {
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            continue;
        };
        let (metrics, shutdown) = (metrics.clone(), shutdown.clone());
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                let answer = answer(&req, &metrics, &shutdown);
                async move { Ok::<_, Infallible>(answer) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(std::time::Duration::from_secs(10))
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

fn answer(
    req: &Request<Incoming>,
    metrics: &Metrics,
    shutdown: &Shutdown,
) -> Response<Full<Bytes>> {
    let (status, content_type, body) = match (req.method(), req.uri().path()) {
        (&Method::GET, "/metrics") => (
            StatusCode::OK,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            metrics.render(),
        ),
        (&Method::GET, "/healthz") if shutdown.is_triggered() => (
            StatusCode::SERVICE_UNAVAILABLE,
            "text/plain",
            "draining\n".to_owned(),
        ),
        (&Method::GET, "/healthz") => (StatusCode::OK, "text/plain", "ok\n".to_owned()),
        _ => (
            StatusCode::NOT_FOUND,
            "text/plain",
            "404 not found\n".to_owned(),
        ),
    };
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(content_type),
    );
    resp
}
