//! Strait's own request-head parser (`strait::server::h1::inspect`).
//!
//! Invariants:
//! - it never panics, whatever the bytes;
//! - `Served { len, body, .. }`: `len <= data.len()` and `body <= len`;
//! - a served message's verdict does not depend on the bytes after it: inspecting
//!   `data[..len]` alone gives the same `Served` verdict.
#![no_main]

use libfuzzer_sys::fuzz_target;
use strait::server::h1::{Inspected, inspect};

fuzz_target!(|data: &[u8]| {
    let verdict = inspect(data);
    if let Inspected::Served { len, body, .. } = verdict {
        assert!(len <= data.len(), "len {len} > input {}", data.len());
        assert!(body <= len, "body {body} > len {len}");
        let alone = inspect(&data[..len]);
        assert_eq!(
            alone, verdict,
            "the verdict on the message alone differs from the one with {} bytes after it",
            data.len() - len
        );
    }
});
