//! The chunked-body decoder (`strait::http1::chunked::decode`).
//!
//! The input is decoded twice: once handed over whole, once fed in pieces whose sizes
//! come from a small PRNG seeded by the input (its length and first bytes). Invariants:
//! - it never panics;
//! - both runs agree: the same body bytes, and both end (with the same trailers) or
//!   both fail (an error may come at a different point, but not in only one run);
//!   both wanting more bytes at the end of the input also counts as agreeing;
//! - when `decode` returns `End`, the bytes left in the buffer are exactly the input
//!   after the chunked body (checked in the whole run: the suffix; in the split run:
//!   the same suffix once the rest of the input is appended).
#![no_main]

use bytes::BytesMut;
use http::HeaderMap;
use libfuzzer_sys::fuzz_target;
use strait::http1::chunked::{Chunk, Decoded, decode};

#[derive(Debug, PartialEq)]
enum Outcome {
    /// `End`, with the trailers and the input after the body.
    End(Option<Vec<(String, Vec<u8>)>>, Vec<u8>),
    Error,
    /// The input ran out with the decoder asking for more.
    More,
}

fn trailers(t: Option<HeaderMap>) -> Option<Vec<(String, Vec<u8>)>> {
    t.map(|t| {
        t.iter()
            .map(|(k, v)| (k.as_str().to_owned(), v.as_bytes().to_vec()))
            .collect()
    })
}

/// Feeds `data` in pieces of the given sizes (the last piece takes the rest).
fn run(data: &[u8], mut sizes: impl FnMut() -> usize) -> (Vec<u8>, Outcome) {
    let mut buf = BytesMut::new();
    let mut state = Chunk::Size;
    let mut body = Vec::new();
    let mut fed = 0;
    // Feed the first piece.
    let first = sizes().min(data.len());
    buf.extend_from_slice(&data[..first]);
    fed += first;
    let mut steps = 0usize;
    loop {
        steps += 1;
        assert!(steps < 10 * data.len() + 100, "decode makes no progress");
        let before = buf.len();
        match decode(&mut buf, &mut state) {
            Ok(Decoded::Data(d)) => {
                assert!(!d.is_empty(), "empty data chunk returned");
                assert!(buf.len() < before, "Data consumed nothing");
                body.extend_from_slice(&d);
            }
            Ok(Decoded::End(t)) => {
                // The bytes left are exactly what was fed after the body, which is the
                // input's suffix once the unfed rest is appended.
                let mut left = buf.to_vec();
                left.extend_from_slice(&data[fed..]);
                assert!(
                    data.ends_with(&left),
                    "bytes left after End are not the input's suffix"
                );
                return (body, Outcome::End(trailers(t), left));
            }
            Ok(Decoded::More) => {
                if fed == data.len() {
                    return (body, Outcome::More);
                }
                let n = sizes().max(1).min(data.len() - fed);
                buf.extend_from_slice(&data[fed..fed + n]);
                fed += n;
            }
            Err(_) => return (body, Outcome::Error),
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let (whole_body, whole) = run(data, || usize::MAX);
    if let Outcome::End(_, left) = &whole {
        // Handed over whole, the bytes left are exactly the input after the body.
        let consumed = data.len() - left.len();
        assert_eq!(&data[consumed..], &left[..]);
        // And the body ends exactly there: decoding only the bytes consumed ends the
        // same way, with nothing left (no byte of the body was left behind, and none
        // after it was needed).
        let (alone_body, alone) = run(&data[..consumed], || usize::MAX);
        assert_eq!(alone_body, whole_body, "the body alone decodes differently");
        match (&alone, &whole) {
            (Outcome::End(ta, la), Outcome::End(tw, _)) => {
                assert!(la.is_empty(), "bytes left after the body alone");
                assert_eq!(ta, tw, "the body alone has other trailers");
            }
            _ => panic!("the body alone does not end: {alone:?}"),
        }
    }

    // xorshift64*, seeded by the length and the first bytes.
    let mut seed = (data.len() as u64) ^ 0x9e37_79b9_7f4a_7c15;
    for (i, b) in data.iter().take(8).enumerate() {
        seed ^= u64::from(*b) << (8 * i);
    }
    let mut x = seed | 1;
    let (split_body, split) = run(data, move || {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        let r = x.wrapping_mul(0x2545_f491_4f6c_dd1d);
        // Mostly short pieces, sometimes a long one.
        match r % 8 {
            0 => (r >> 8) as usize % 64,
            7 => (r >> 8) as usize % 4096,
            _ => (r >> 8) as usize % 8,
        }
    });

    match (&whole, &split) {
        (Outcome::Error, Outcome::Error) => {
            // The error may come at a different point: the bodies delivered before it
            // agree as far as the shorter goes.
            let n = whole_body.len().min(split_body.len());
            assert_eq!(whole_body[..n], split_body[..n], "bodies differ before the error");
        }
        _ => {
            assert_eq!(whole, split, "whole and split decodes disagree");
            assert_eq!(whole_body, split_body, "whole and split bodies differ");
        }
    }
});
