//! The chunked transfer coding (RFC 9112 §7.1): a decoder that takes its input in
//! pieces split anywhere, and the size line an encoder writes.

use bytes::{Buf, Bytes, BytesMut};
use http::{HeaderMap, HeaderName, HeaderValue};

use super::{Error, MAX_CHUNK_LINE, MAX_TRAILERS};

/// Where a chunked body's decoder stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Chunk {
    /// Before a chunk-size line.
    Size,
    /// Inside a chunk's data, with this many bytes left.
    Data(u64),
    /// After a chunk's data, before its CRLF.
    DataEnd,
    /// After the last chunk: the trailer section and the final CRLF.
    Trailers,
}

/// What one step of decoding gave.
#[derive(Debug)]
pub enum Decoded {
    Data(Bytes),
    /// The last chunk and its trailers (`None` when there were none). Every byte of the
    /// body is consumed; what follows in the buffer is the next message's.
    End(Option<HeaderMap>),
    /// More bytes are needed.
    More,
}

/// Decodes what `buf` holds of a chunked body, consuming it.
///
/// Lines end with CRLF and nothing else (§7.1: a bare LF or CR anywhere is an error,
/// never a line end): two parsers that disagreed on where a chunk line or the trailer
/// section ends would disagree on where the next message starts.
pub fn decode(buf: &mut BytesMut, state: &mut Chunk) -> Result<Decoded, Error> {
    loop {
        match state {
            Chunk::Size => {
                let Some(line) = line_end(buf, MAX_CHUNK_LINE, "chunk-size line too long")? else {
                    return Ok(Decoded::More);
                };
                let size = parse_size_line(&buf[..line])?;
                buf.advance(line + 2);
                *state = if size == 0 {
                    Chunk::Trailers
                } else {
                    Chunk::Data(size)
                };
            }
            Chunk::Data(left) => {
                if buf.is_empty() {
                    return Ok(Decoded::More);
                }
                let n = (buf.len() as u64).min(*left) as usize;
                *left -= n as u64;
                let data = buf.split_to(n).freeze();
                if *left == 0 {
                    *state = Chunk::DataEnd;
                }
                return Ok(Decoded::Data(data));
            }
            Chunk::DataEnd => {
                if buf.len() < 2 {
                    if buf.first().is_some_and(|b| *b != b'\r') {
                        return Err(Error::Malformed("chunk data not followed by CRLF"));
                    }
                    return Ok(Decoded::More);
                }
                if &buf[..2] != b"\r\n" {
                    return Err(Error::Malformed("chunk data not followed by CRLF"));
                }
                buf.advance(2);
                *state = Chunk::Size;
            }
            Chunk::Trailers => return trailers(buf),
        }
    }
}

/// The position of the CRLF ending the line at the start of `buf`, `None` while it is
/// incomplete. A LF without CR, or a CR without LF, is an error.
fn line_end(buf: &[u8], max: usize, too_long: &'static str) -> Result<Option<usize>, Error> {
    let Some(cr) = buf
        .iter()
        .take(max + 1)
        .position(|b| *b == b'\r' || *b == b'\n')
    else {
        if buf.len() > max {
            return Err(Error::Malformed(too_long));
        }
        return Ok(None);
    };
    match (buf[cr], buf.get(cr + 1)) {
        (b'\r', Some(b'\n')) => Ok(Some(cr)),
        (b'\r', None) => Ok(None),
        _ => Err(Error::Malformed("line not ended by CRLF")),
    }
}

/// A chunk-size line without its CRLF (§7.1, §7.1.1):
/// `chunk-size *( BWS ";" BWS ext-name [ BWS "=" BWS ext-value ] ) [ BWS ]`, where a name
/// is a token and a value a token or a quoted string. Extensions are checked and
/// dropped; nothing Strait forwards carries them.
pub fn parse_size_line(line: &[u8]) -> Result<u64, Error> {
    const BAD: Error = Error::Malformed("invalid chunk-size line");
    let digits = line.iter().take_while(|b| b.is_ascii_hexdigit()).count();
    // 15 hex digits are 2^60 bytes: more is no body anyone sends.
    if digits == 0 || digits > 15 {
        return Err(BAD);
    }
    let size = line[..digits]
        .iter()
        .fold(0u64, |n, &b| n << 4 | u64::from(hex_value(b)));
    let mut rest = &line[digits..];
    loop {
        rest = skip_ows(rest);
        let Some((&b';', after)) = rest.split_first() else {
            return if rest.is_empty() { Ok(size) } else { Err(BAD) };
        };
        rest = skip_ows(after);
        let name = rest.iter().take_while(|b| is_tchar(**b)).count();
        if name == 0 {
            return Err(BAD);
        }
        rest = skip_ows(&rest[name..]);
        if let Some((&b'=', after)) = rest.split_first() {
            rest = skip_ows(after);
            rest = match rest.first() {
                Some(b'"') => skip_quoted(rest).ok_or(BAD)?,
                _ => {
                    let value = rest.iter().take_while(|b| is_tchar(**b)).count();
                    if value == 0 {
                        return Err(BAD);
                    }
                    &rest[value..]
                }
            };
        }
    }
}

/// Checks, without consuming anything, the first chunk-size line when `buf` holds it
/// whole: a response whose body fails at its first line is refused (502) before its
/// head goes out, rather than cut short after.
pub fn check_first_line(buf: &[u8]) -> Result<(), Error> {
    match line_end(buf, MAX_CHUNK_LINE, "chunk-size line too long")? {
        Some(line) => parse_size_line(&buf[..line]).map(drop),
        None => Ok(()),
    }
}

fn hex_value(b: u8) -> u8 {
    match b {
        b'0'..=b'9' => b - b'0',
        b'a'..=b'f' => b - b'a' + 10,
        _ => b - b'A' + 10,
    }
}

fn skip_ows(v: &[u8]) -> &[u8] {
    let n = v.iter().take_while(|b| matches!(b, b' ' | b'\t')).count();
    &v[n..]
}

/// The rest after a quoted string (RFC 9110 §5.6.4) at the start of `v`.
fn skip_quoted(v: &[u8]) -> Option<&[u8]> {
    let mut i = 1;
    while i < v.len() {
        match v[i] {
            b'"' => return Some(&v[i + 1..]),
            b'\\' => {
                let escaped = *v.get(i + 1)?;
                if !(escaped == b'\t' || escaped == b' ' || escaped >= 0x21 && escaped != 0x7f) {
                    return None;
                }
                i += 2;
            }
            b'\t' | b' ' | 0x21 | 0x23..=0x5b | 0x5d..=0x7e | 0x80..=0xff => i += 1,
            _ => return None,
        }
    }
    None
}

/// RFC 9110 §5.6.2's tchar.
pub fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// The trailer section after the last chunk, and the final CRLF.
fn trailers(buf: &mut BytesMut) -> Result<Decoded, Error> {
    // Each line is checked as it is found: a bare LF or CR fails at once rather than
    // when the section ends (which, to a parser taking LF alone as a line end, may be
    // somewhere in the next message).
    let mut at = 0;
    loop {
        let Some(line) = line_end(&buf[at..], MAX_TRAILERS, "trailer section too large")? else {
            if buf.len() > MAX_TRAILERS {
                return Err(Error::Malformed("trailer section too large"));
            }
            return Ok(Decoded::More);
        };
        if line == 0 {
            break;
        }
        at += line + 2;
        if at > MAX_TRAILERS {
            return Err(Error::Malformed("trailer section too large"));
        }
    }
    if at == 0 {
        buf.advance(2);
        return Ok(Decoded::End(None));
    }
    let section = buf.split_to(at + 2).freeze();
    let mut fields = [httparse::EMPTY_HEADER; super::MAX_FIELDS];
    let Ok(httparse::Status::Complete((_, fields))) =
        httparse::parse_headers(&section, &mut fields)
    else {
        return Err(Error::Malformed("invalid trailer section"));
    };
    let mut trailers = HeaderMap::new();
    for f in fields {
        let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(f.name.as_bytes()),
            HeaderValue::from_bytes(f.value),
        ) else {
            return Err(Error::Malformed("invalid trailer field"));
        };
        if is_trailer_allowed(&name) {
            trailers.append(name, value);
        }
    }
    Ok(Decoded::End(Some(trailers)))
}

/// False for fields a trailer section must not carry (RFC 9110 §6.5.1): framing,
/// routing, connection control, authentication and what describes the content. A
/// recipient would otherwise act on them after the fact (an HTTP/2 client given a
/// `content-length` trailer drops the whole connection).
pub fn is_trailer_allowed(name: &HeaderName) -> bool {
    use http::header::*;
    !(name == CONTENT_LENGTH
        || name == TRANSFER_ENCODING
        || name == HOST
        || name == CONNECTION
        || name == TE
        || name == TRAILER
        || name == UPGRADE
        || name == AUTHORIZATION
        || name == PROXY_AUTHORIZATION
        || name == PROXY_AUTHENTICATE
        || name == WWW_AUTHENTICATE
        || name == SET_COOKIE
        || name == COOKIE
        || name == CONTENT_ENCODING
        || name == CONTENT_TYPE
        || name == CONTENT_RANGE
        || name == CACHE_CONTROL
        || name == EXPECT
        || name == MAX_FORWARDS
        || name == RANGE
        || name == LOCATION
        || name.as_str() == "keep-alive"
        || name.as_str() == "proxy-connection")
}

/// Removes from `trailers` every field [`is_trailer_allowed`] refuses.
pub fn strip_trailers(trailers: &mut HeaderMap) {
    if trailers.keys().all(is_trailer_allowed) {
        return;
    }
    let refused: Vec<HeaderName> = trailers
        .keys()
        .filter(|n| !is_trailer_allowed(n))
        .cloned()
        .collect();
    for name in refused {
        trailers.remove(name);
    }
}

/// A chunk's size line: `len` in hex and CRLF, appended to `out`.
pub fn size_line(out: &mut impl Extend<u8>, len: usize) {
    let mut digits = [0u8; 16];
    let mut i = digits.len();
    let mut n = len;
    loop {
        i -= 1;
        digits[i] = b"0123456789abcdef"[n & 15];
        n >>= 4;
        if n == 0 {
            break;
        }
    }
    out.extend(digits[i..].iter().copied());
    out.extend(*b"\r\n");
}

/// Follows a chunked body's framing over bytes as they pass to another decoder (hyper's,
/// for requests hyper serves), holding only what a size line or the trailer section
/// needs: chunk data is counted, not kept. It fails at the first piece where this
/// codec's rules and a laxer decoder's could part (a bare LF ending a trailer line,
/// which hyper takes as part of the line and so reads the next request as trailers),
/// before that decoder sees it.
#[derive(Debug, Default)]
pub struct Follow {
    state: Option<Chunk>,
    held: BytesMut,
    done: bool,
}

impl Follow {
    /// The body's end has passed; what follows is not this body's.
    pub fn is_done(&self) -> bool {
        self.done
    }

    /// Takes the next bytes of the stream; returns how many of them are the body's
    /// (all of them, until the body ends).
    pub fn feed(&mut self, data: &[u8]) -> Result<usize, Error> {
        let state = self.state.get_or_insert(Chunk::Size);
        let mut at = 0;
        while at < data.len() && !self.done {
            if let Chunk::Data(left) = state
                && self.held.is_empty()
            {
                let n = (*left).min((data.len() - at) as u64) as usize;
                *left -= n as u64;
                at += n;
                if *left == 0 {
                    *state = Chunk::DataEnd;
                }
                continue;
            }
            let n = (data.len() - at).min(MAX_CHUNK_LINE);
            self.held.extend_from_slice(&data[at..at + n]);
            at += n;
            loop {
                match decode(&mut self.held, state)? {
                    Decoded::Data(_) => {}
                    Decoded::End(_) => {
                        // What the decoder left is the next message's.
                        at -= self.held.len();
                        self.done = true;
                        self.held = BytesMut::new();
                        break;
                    }
                    Decoded::More => break,
                }
            }
        }
        Ok(at)
    }
}

/// The last chunk with no trailers.
pub const LAST: &[u8] = b"0\r\n\r\n";

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `raw` one byte at a time: every state must cope with a split anywhere.
    /// Returns the body, the trailers and what was left after the body.
    pub fn decode_all(raw: &[u8]) -> Result<(Vec<u8>, Option<HeaderMap>), Error> {
        let mut buf = BytesMut::new();
        let mut state = Chunk::Size;
        let mut out = Vec::new();
        let mut input = raw.iter();
        loop {
            match decode(&mut buf, &mut state)? {
                Decoded::Data(d) => out.extend_from_slice(&d),
                Decoded::End(t) => {
                    assert!(buf.is_empty() && input.next().is_none());
                    return Ok((out, t));
                }
                Decoded::More => match input.next() {
                    Some(b) => buf.extend_from_slice(&[*b]),
                    None => return Err(Error::Malformed("ended early")),
                },
            }
        }
    }

    #[test]
    fn chunked_bodies_decode_split_anywhere() {
        let (body, t) = decode_all(b"5\r\nhello\r\n1;ext=1\r\n \r\n0\r\n\r\n").unwrap();
        assert_eq!(body, b"hello ");
        assert!(t.is_none());
        let (body, t) =
            decode_all(b"3\r\nabc\r\n0\r\nX-Sum: 1\r\nContent-Length: 9\r\n\r\n").unwrap();
        assert_eq!(body, b"abc");
        let t = t.unwrap();
        assert_eq!(t["x-sum"], "1");
        assert!(
            t.get("content-length").is_none(),
            "a framing trailer is dropped"
        );
        let (body, _) = decode_all(b"A ; a = \"q \\\" x\" ;b\r\n0123456789\r\n0\r\n\r\n").unwrap();
        assert_eq!(body, b"0123456789");
    }

    #[test]
    fn bad_chunks_are_refused() {
        for bad in [
            &b"z\r\n"[..],
            b"3\r\nabcX\r\n",
            b"3\nabc\r\n",
            b"3\r\nabc\n",
            b"5;a\rb\r\nhello\r\n0\r\n\r\n",
            b"5 x\r\nhello\r\n0\r\n\r\n",
            b"5;\r\nhello\r\n0\r\n\r\n",
            b"5;a=\r\nhello\r\n0\r\n\r\n",
            b"5;a=\"x\r\nhello\r\n0\r\n\r\n",
            b"-5\r\n",
            b"0x5\r\n",
            b"1000000000000000\r\n",
            b"0\r\nX-T: 1\n\n",
            b"0\r\nX-T: 1\r\n\n",
            b"0\r\n\n",
            b"0\r\nX-T: 1\rX\r\n\r\n",
            b"0\r\nbad line\r\n\r\n",
        ] {
            assert!(
                decode_all(bad).is_err(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
        let long = [b"1;".as_slice(), &[b'x'; MAX_CHUNK_LINE + 10]].concat();
        assert!(decode_all(&long).is_err());
    }

    #[test]
    fn a_first_line_is_checked_only_when_whole() {
        assert!(check_first_line(b"zz\r\n").is_err());
        assert!(check_first_line(b"5;a\rb\r\n").is_err());
        assert!(check_first_line(b"5\r\nhel").is_ok());
        assert!(check_first_line(b"5").is_ok());
        assert!(check_first_line(b"").is_ok());
    }

    #[test]
    fn a_follower_agrees_with_the_decoder_wherever_the_stream_splits() {
        let body = b"5\r\nhello\r\n10;x=\"y\"\r\n0123456789abcdef\r\n0\r\nX-T: 1\r\n\r\n";
        let next = b"GET /next HTTP/1.1\r\n\r\n";
        let all = [&body[..], next].concat();
        for split in 1..all.len() {
            let mut f = Follow::default();
            let mut taken = 0;
            for piece in all.chunks(split) {
                if !f.is_done() {
                    taken += f.feed(piece).unwrap();
                }
            }
            assert!(f.is_done(), "split {split}");
            assert_eq!(taken, body.len(), "split {split}");
        }
        let bad = b"0\r\nX-T: 1\n\nGET /next HTTP/1.1\r\n\r\n";
        for split in 1..bad.len() {
            let mut f = Follow::default();
            let failed = bad.chunks(split).any(|piece| f.feed(piece).is_err());
            assert!(failed && !f.is_done(), "split {split}");
        }
    }

    #[test]
    fn size_lines_are_hex() {
        let mut out = Vec::new();
        size_line(&mut out, 0x1a2b);
        size_line(&mut out, 0);
        assert_eq!(out, b"1a2b\r\n0\r\n");
    }
}
