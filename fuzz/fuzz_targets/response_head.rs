//! Strait's response-head parser (`strait::http1::response::parse`).
//!
//! The first byte picks `head_only` (bit 0) and `asks_upgrade` (bit 1); the rest is
//! the bytes from the origin. Invariants:
//! - it never panics;
//! - on a parsed head framed by `Framing::Length(n)`, a `Content-Length` field, if any
//!   is passed on, is exactly `n` in canonical decimal;
//! - the status passed on is 101 or 200..=599 (1xx heads other than 101 are passed
//!   over, so never returned).
#![no_main]

use bytes::BytesMut;
use http::HeaderMap;
use http::header::CONTENT_LENGTH;
use libfuzzer_sys::fuzz_target;
use strait::http1::Framing;
use strait::http1::response::parse;

fuzz_target!(|data: &[u8]| {
    let Some((&flags, rest)) = data.split_first() else {
        return;
    };
    let head_only = flags & 1 != 0;
    let asks_upgrade = flags & 2 != 0;
    let mut buf = BytesMut::from(rest);
    let Ok(Some((resp, _hop))) = parse(&mut buf, head_only, asks_upgrade, &mut HeaderMap::new())
    else {
        return;
    };
    // What is left is a suffix of the input (the body's start).
    assert!(rest.ends_with(&buf), "the bytes left are not the input's tail");
    let status = resp.status().as_u16();
    assert!(
        status == 101 || (200..=599).contains(&status),
        "status {status} passed on"
    );
    if let Framing::Length(n) = *resp.body() {
        let lengths: Vec<_> = resp.headers().get_all(CONTENT_LENGTH).iter().collect();
        assert!(lengths.len() <= 1, "{} Content-Length fields", lengths.len());
        if let Some(v) = lengths.first() {
            assert_eq!(
                v.as_bytes(),
                n.to_string().as_bytes(),
                "Content-Length {v:?} beside Framing::Length({n})"
            );
        }
    }
});
