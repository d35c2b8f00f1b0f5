//! Strait: a fast HTTP forward and reverse proxy.
//!
//! # Layout
//!
//! Data flows left to right, one module per concern:
//!
//! ```text
//! client ─▶ server ─▶ proxy ─▶ upstream ─▶ origin
//! ```
//!
//! - [`app`]: the composition root: a configuration becomes the server, the proxy and
//!   the upstream side.
//! - [`server`]: listeners, TLS, serving HTTP/1.1 and HTTP/2 connections (idle HTTP/1.1
//!   ones parked without hyper's buffers), shutdown.
//! - [`proxy`]: what a request is (forward, CONNECT, reverse) and where it goes; the one
//!   place that turns a refusal into a status code.
//! - [`route`]: the reverse route table (host and path prefix).
//! - [`http1`]: the HTTP/1.1 wire format, once: framing, the chunked coding, the
//!   response head parser and the limits every HTTP/1.1 path shares. No sockets.
//! - [`upstream`]: pooled connections to origins, connect and TLS, load balancing. Knows
//!   nothing of routes or users.
//! - [`io`]: stream wrappers (idle timeout, byte counting).
//! - [`net`]: client sockets of either family (TCP, or a Unix socket's path) and the
//!   client's address as logs show it.
//! - [`pem`]: reading PEM certificate files (both sides of TLS).
//! - [`metrics`]: the Prometheus registry and its bounded label sets.
//! - [`access`]: the access log writer (bounded queue, never blocks a request).
//! - [`date`]: the dates Strait writes (the HTTP `Date` field, the access log's time).
//! - [`body`]: the body type that crosses the proxy.
//! - [`config`] and [`cli`]: the TOML schema and the command line, turned into typed
//!   values once.

pub mod access;
pub mod app;
pub mod body;
pub mod cli;
pub mod config;
pub mod date;
pub mod http1;
pub mod io;
pub mod metrics;
pub mod net;
pub mod pem;
pub mod proxy;
pub mod route;
pub mod server;
pub mod upstream;

pub use app::{run, run_reloading};
pub use config::Config;
pub use server::{Reload, RunError};
