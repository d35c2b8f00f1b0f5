//! An upstream's response head: parsed into a `Response` whose body is its
//! [`Framing`], and what the head says about its connection.

use std::time::Duration;

use bytes::{Buf, BytesMut};
use http::header::{
    CONNECTION, CONTENT_LENGTH, PROXY_AUTHENTICATE, TE, TRAILER, TRANSFER_ENCODING, UPGRADE,
};
use http::{HeaderMap, HeaderName, HeaderValue, Response, StatusCode};

use super::framing::{length_needs_canon, parse_length};
use super::{Error, Framing, MAX_FIELDS, MAX_HEAD, chunked, decimal, trim_ows};

/// What a response head says about its connection. These hop-by-hop fields
/// (`Connection`, `Keep-Alive`) are read while parsing and not kept in the header map,
/// where the proxy would only remove them again; a `Connection` naming other fields is
/// kept, so those are removed with it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Hop {
    /// `Connection: close`.
    pub close: bool,
    /// `Connection: keep-alive` (what an HTTP/1.0 response needs to be reused).
    pub keep_alive: bool,
    /// The origin's `Keep-Alive: timeout=N`.
    pub hint: Option<Duration>,
}

static KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");

/// `timeout=N` in one `Keep-Alive` value.
pub fn keep_alive_timeout(v: &[u8]) -> Option<Duration> {
    v.split(|b| *b == b',').find_map(|part| {
        let (k, n) = std::str::from_utf8(part).ok()?.split_once('=')?;
        if k.trim().eq_ignore_ascii_case("timeout") {
            n.trim().parse::<u64>().ok().map(Duration::from_secs)
        } else {
            None
        }
    })
}

/// Parses a response head at the front of `buf`: `None` while incomplete. A 1xx head
/// (other than 101) is consumed and the next one parsed. On success the head is taken
/// off `buf`, which keeps what followed it (the body's start).
///
/// The framing rules (RFC 9112 §6.3), where two parsers could disagree on where the
/// body ends:
/// - no body for HEAD, 1xx, 204 and 304 (rule 1), whatever the head says;
/// - `Transfer-Encoding: chunked` frames the body (rule 4); any other coding, which
///   Strait could not pass on (the field is hop-by-hop), is a 502. With a
///   `Content-Length` beside it the length is dropped and the connection is not reused
///   (rule 3);
/// - `Content-Length` is `1*DIGIT`; an invalid value, or a second field (even an equal
///   one, as nginx refuses), makes the response unusable: 502 (rule 5). The value goes
///   on canonical (`010` becomes `10`);
/// - a chunked body whose first size line is already here and broken is refused now,
///   before the head goes anywhere.
pub fn parse(
    buf: &mut BytesMut,
    head_only: bool,
    asks_upgrade: bool,
    spare: &mut HeaderMap,
) -> Result<Option<(Response<Framing>, Hop)>, Error> {
    loop {
        if buf.is_empty() {
            return Ok(None);
        }
        // Field positions, kept while the parser borrows the buffer: on the stack for
        // the usual few fields (zeroing room for all of them cost more than the rest).
        let mut few = [(0u32, 0u32, 0u32, 0u32); 24];
        let mut many = Vec::new();
        let (len, status, minor, count) = {
            let mut fields =
                [const { std::mem::MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_FIELDS];
            let mut resp = httparse::Response::new(&mut []);
            let parsed = httparse::ParserConfig::default().parse_response_with_uninit_headers(
                &mut resp,
                buf,
                &mut fields,
            );
            let len = match parsed {
                Ok(httparse::Status::Complete(len)) if len <= MAX_HEAD => len,
                Ok(httparse::Status::Complete(_)) => return Err(Error::TooLarge),
                Ok(httparse::Status::Partial) if buf.len() >= MAX_HEAD => {
                    return Err(Error::TooLarge);
                }
                Ok(httparse::Status::Partial) => return Ok(None),
                Err(httparse::Error::TooManyHeaders) => return Err(Error::TooLarge),
                Err(_) => return Err(Error::Malformed("unparsable response head")),
            };
            let base = buf.as_ptr() as usize;
            let at = if resp.headers.len() <= few.len() {
                &mut few[..]
            } else {
                many.resize(resp.headers.len(), (0, 0, 0, 0));
                &mut many[..]
            };
            for (slot, h) in at.iter_mut().zip(resp.headers.iter()) {
                let n = h.name.as_ptr() as usize - base;
                let v = h.value.as_ptr() as usize - base;
                *slot = (
                    n as u32,
                    h.name.len() as u32,
                    v as u32,
                    h.value.len() as u32,
                );
            }
            let status = resp.code.ok_or(Error::Malformed("no status"))?;
            (len, status, resp.version.unwrap_or(1), resp.headers.len())
        };
        // RFC 9110 §15: codes outside 100-599 are invalid (httparse and `StatusCode`
        // take any three digits); a client would have to guess what a 600 means.
        if !(100..=599).contains(&status) {
            return Err(Error::Malformed("status code outside 100-599"));
        }
        if status == 101 && !asks_upgrade {
            return Err(Error::Malformed(
                "101 to a request that asked for no upgrade",
            ));
        }
        if (100..200).contains(&status) && status != 101 {
            buf.advance(len);
            continue;
        }
        let head = buf.split_to(len).freeze();
        // The spare map (with its room) goes into the response, the response's new
        // empty one into the spare slot: nothing is made or dropped for it.
        let mut resp = Response::new(Framing::Done);
        std::mem::swap(resp.headers_mut(), spare);
        let headers = resp.headers_mut();
        headers.reserve(count);
        let mut length: Option<u64> = None;
        let mut chunked = false;
        let mut coded = false;
        let mut hop = Hop::default();
        let at = if count <= few.len() {
            &few[..]
        } else {
            &many[..]
        };
        for &(n, nl, v, vl) in &at[..count] {
            let name = HeaderName::from_bytes(&head[n as usize..(n + nl) as usize])
                .map_err(|_| Error::Malformed("invalid field name"))?;
            let raw = head.slice(v as usize..(v + vl) as usize);
            if name == CONTENT_LENGTH {
                if length.is_some() {
                    return Err(Error::Malformed("repeated Content-Length"));
                }
                let n = parse_length(&raw).ok_or(Error::Malformed("invalid Content-Length"))?;
                length = Some(n);
                if length_needs_canon(&raw) {
                    headers.append(
                        name,
                        HeaderValue::from_bytes(decimal(n, &mut [0; 20]))
                            .expect("digits are a valid field value"),
                    );
                    continue;
                }
            } else if name == TRANSFER_ENCODING {
                // A second field continues the list (RFC 9110 §5.3): only one field
                // holding exactly `chunked` is taken.
                chunked = !coded && trim_ows(&raw).eq_ignore_ascii_case(b"chunked");
                coded = true;
                continue;
            } else if name == CONNECTION {
                let mut names_others = false;
                for token in raw.split(|b| *b == b',').map(trim_ows) {
                    if token.eq_ignore_ascii_case(b"close") {
                        hop.close = true;
                    } else if token.eq_ignore_ascii_case(b"keep-alive") {
                        hop.keep_alive = true;
                    } else if !token.is_empty() {
                        names_others = true;
                    }
                }
                if !names_others {
                    continue;
                }
            } else if name == KEEP_ALIVE {
                if hop.hint.is_none() {
                    hop.hint = keep_alive_timeout(&raw);
                }
                continue;
            } else if name == UPGRADE && status == 101 {
                // The protocol switched to: the proxy passes it on when the client asked.
            } else if name == TE || name == TRAILER || name == UPGRADE || name == PROXY_AUTHENTICATE
            {
                // Hop-by-hop: the proxy would remove them.
                continue;
            }
            // The value shares the head's memory; httparse accepted only bytes a
            // `HeaderValue` allows, so the check here does not fail.
            let value = HeaderValue::from_maybe_shared(raw)
                .map_err(|_| Error::Malformed("invalid field value"))?;
            headers.append(name, value);
        }
        let status =
            StatusCode::from_u16(status).map_err(|_| Error::Malformed("invalid status code"))?;
        let framing = if head_only
            || status.is_informational()
            || status == StatusCode::NO_CONTENT
            || status == StatusCode::NOT_MODIFIED
        {
            Framing::Done
        } else if coded {
            // Any coding but `chunked` (`gzip, chunked`) is one Strait cannot pass on:
            // `Transfer-Encoding` is hop-by-hop, so the client would take still-coded
            // bytes as the content. 502, as nginx (1.23 on) answers.
            if !chunked {
                return Err(Error::Malformed("Transfer-Encoding other than chunked"));
            }
            chunked::check_first_line(buf)?;
            Framing::CHUNKED
        } else if let Some(n) = length {
            Framing::Length(n)
        } else {
            Framing::Close
        };
        if coded && length.is_some() {
            // Both framings: Transfer-Encoding wins, the length is dropped (the client
            // must not frame by it), and the connection is not trusted with another
            // request (RFC 9112 §6.3, item 3).
            headers.remove(CONTENT_LENGTH);
            hop.close = true;
        }
        *resp.body_mut() = framing;
        *resp.status_mut() = status;
        *resp.version_mut() = if minor == 0 {
            http::Version::HTTP_10
        } else {
            http::Version::HTTP_11
        };
        return Ok(Some((resp, hop)));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http1::chunked::Chunk;

    fn parse_one(raw: &[u8]) -> Result<Option<Response<Framing>>, Error> {
        let mut buf = BytesMut::from(raw);
        Ok(parse(&mut buf, false, false, &mut HeaderMap::new())?.map(|(r, _)| r))
    }

    fn hop(raw: &[u8]) -> Hop {
        let mut buf = BytesMut::from(raw);
        parse(&mut buf, false, false, &mut HeaderMap::new())
            .unwrap()
            .unwrap()
            .1
    }

    #[test]
    fn heads_are_parsed_with_their_framing() {
        let r = parse_one(b"HTTP/1.1 200 OK\r\nContent-Length: 12\r\nX-A: b\r\n\r\n")
            .unwrap()
            .unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(*r.body(), Framing::Length(12));
        assert_eq!(r.headers()["x-a"], "b");

        let r = parse_one(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: Chunked\r\n\r\n")
            .unwrap()
            .unwrap();
        assert_eq!(*r.body(), Framing::Chunked(Chunk::Size));

        // A coding on a response without a body is not looked at.
        let r = parse_one(b"HTTP/1.1 304 Not Modified\r\nTransfer-Encoding: gzip\r\n\r\n")
            .unwrap()
            .unwrap();
        assert_eq!(*r.body(), Framing::Done);

        let r = parse_one(b"HTTP/1.0 200 OK\r\n\r\n").unwrap().unwrap();
        assert_eq!(*r.body(), Framing::Close);
        assert_eq!(r.version(), http::Version::HTTP_10);

        let r = parse_one(b"HTTP/1.1 304 Not Modified\r\nContent-Length: 5\r\n\r\n")
            .unwrap()
            .unwrap();
        assert_eq!(*r.body(), Framing::Done);

        assert!(
            parse_one(b"HTTP/1.1 200 OK\r\nContent-Le")
                .unwrap()
                .is_none()
        );
    }

    #[test]
    fn lengths_go_on_canonical() {
        let r = parse_one(b"HTTP/1.1 200 OK\r\nContent-Length: 010\r\n\r\n")
            .unwrap()
            .unwrap();
        assert_eq!(*r.body(), Framing::Length(10));
        assert_eq!(r.headers()["content-length"], "10");
    }

    #[test]
    fn a_101_is_final_only_for_a_request_that_asked() {
        let raw = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\nbytes";
        let mut buf = BytesMut::from(&raw[..]);
        let (r, _) = parse(&mut buf, false, true, &mut HeaderMap::new())
            .unwrap()
            .unwrap();
        assert_eq!(r.status(), 101);
        assert_eq!(r.headers()[UPGRADE], "websocket");
        assert_eq!(*r.body(), Framing::Done);
        assert_eq!(&buf[..], b"bytes", "the new protocol's bytes stay buffered");
        let mut buf = BytesMut::from(&raw[..]);
        assert!(matches!(
            parse(&mut buf, false, false, &mut HeaderMap::new()),
            Err(Error::Malformed(_))
        ));
    }

    #[test]
    fn informational_heads_are_passed_over() {
        let r = parse_one(
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201 Created\r\nContent-Length: 0\r\n\r\n",
        )
        .unwrap()
        .unwrap();
        assert_eq!(r.status(), 201);
        let mut buf = BytesMut::from(&b"HTTP/1.1 100 Continue\r\n\r\n"[..]);
        assert!(
            parse(&mut buf, false, false, &mut HeaderMap::new())
                .unwrap()
                .is_none()
        );
        assert!(buf.is_empty());
    }

    #[test]
    fn bad_heads_are_refused() {
        for raw in [
            &b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n"[..],
            b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: 5, 5\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: +5\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: 5\xa0\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: 18446744073709551615\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5;a\rb\r\nhello",
            b"HTTP/1.1 600 OK\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, gzip\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: identity\r\n\r\n",
            b"HTTP/1.1 999\r\n\r\n",
            b"garbage\r\n\r\n",
        ] {
            assert!(
                matches!(parse_one(raw), Err(Error::Malformed(_))),
                "{:?}",
                String::from_utf8_lossy(raw)
            );
        }
        let mut many = b"HTTP/1.1 200 OK\r\n".to_vec();
        for i in 0..=MAX_FIELDS {
            many.extend_from_slice(format!("x-{i}: y\r\n").as_bytes());
        }
        many.extend_from_slice(b"\r\n");
        assert!(matches!(parse_one(&many), Err(Error::TooLarge)));
        let long = [&b"HTTP/1.1 200 OK\r\nx: "[..], &[b'y'; MAX_HEAD]].concat();
        assert!(matches!(parse_one(&long), Err(Error::TooLarge)));
    }

    #[test]
    fn both_framings_mark_the_connection_closing() {
        let raw = b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n";
        let r = parse_one(raw).unwrap().unwrap();
        assert_eq!(*r.body(), Framing::Chunked(Chunk::Size));
        assert!(r.headers().get("content-length").is_none());
        assert!(hop(raw).close);
    }

    #[test]
    fn connection_fields_are_read_not_kept() {
        let raw = b"HTTP/1.1 200 OK\r\nConnection: Keep-Alive\r\nKeep-Alive: timeout=5, max=100\r\nContent-Length: 0\r\n\r\n";
        let h = hop(raw);
        assert!(h.keep_alive && !h.close);
        assert_eq!(h.hint, Some(Duration::from_secs(5)));
        assert_eq!(keep_alive_timeout(b"max=3"), None);
        let r = parse_one(raw).unwrap().unwrap();
        assert!(r.headers().get("connection").is_none());
        assert!(r.headers().get("keep-alive").is_none());
        // A Connection naming another field stays, so the proxy removes that one too.
        let raw =
            b"HTTP/1.1 200 OK\r\nConnection: close, X-Hop\r\nX-Hop: 1\r\nContent-Length: 0\r\n\r\n";
        assert!(hop(raw).close);
        assert_eq!(
            parse_one(raw).unwrap().unwrap().headers()["connection"],
            "close, X-Hop"
        );
    }
}
