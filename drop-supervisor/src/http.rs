//! A small HTTP/1.1 codec for the edges that do not use hyper: the gateway's event loop and
//! blocking readers (requests with `Content-Length` bodies, keep-alive, a JSON error for every
//! malformed request instead of a dropped connection), and the blocking one-request client of
//! the peer transport and of tests. The control socket is served by hyper (see
//! `control::server`); it shares only the [`Request`] shape that `control::api::decode` reads.
//!
//! Deliberately small: no chunked bodies, no pipelining beyond reading requests one after
//! another, and no TLS. Parsing is `httparse`'s; this module frames.

use crate::error::ApiError;

/// Largest request head (request line and headers) accepted.
pub const MAX_HEAD: usize = 16 * 1024;
const MAX_HEADERS: usize = 32;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub method: String,
    /// Path without the query string.
    pub path: String,
    pub query: Option<String>,
    pub body: Vec<u8>,
    /// The client asked to close the connection after this request (or spoke HTTP/1.0).
    pub close: bool,
    /// The `Authorization` header, if any (the gateway's bearer token).
    pub authorization: Option<String>,
    /// The `X-Drop-Peer` header: a peer's signature (see `cluster::peer`).
    pub peer_auth: Option<String>,
    /// The header lines as received (`Name: value`, one per line), for whoever needs them all
    /// (the envelope); kept raw so that the common request pays one copy, not one per header.
    pub head: Vec<u8>,
}

impl Request {
    /// Every header as (name, value), in the order received.
    pub fn headers(&self) -> impl Iterator<Item = (&str, &[u8])> {
        self.head.split(|b| *b == b'\n').filter_map(|line| {
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            let colon = line.iter().position(|b| *b == b':')?;
            let name = std::str::from_utf8(&line[..colon]).ok()?.trim();
            let value = line[colon + 1..].trim_ascii();
            (!name.is_empty()).then_some((name, value))
        })
    }
}

/// Why a request could not be read. Each maps to one status; see [`HttpError::status`].
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum HttpError {
    #[error("malformed request: {0}")]
    Malformed(String),
    #[error("request head larger than {MAX_HEAD} bytes")]
    HeadTooLarge,
    #[error("request body of {0} bytes is larger than the limit")]
    BodyTooLarge(u64),
    #[error("a body needs a Content-Length header (chunked transfer encoding is not supported)")]
    LengthRequired,
    #[error("connection closed in the middle of a request")]
    Truncated,
    #[error("i/o error: {0}")]
    Io(String),
}

impl HttpError {
    pub fn status(&self) -> u16 {
        match self {
            HttpError::Malformed(_) | HttpError::Truncated | HttpError::Io(_) => 400,
            HttpError::HeadTooLarge => 431,
            HttpError::BodyTooLarge(_) => 413,
            HttpError::LengthRequired => 411,
        }
    }
    pub fn code(&self) -> &'static str {
        match self {
            HttpError::Malformed(_) | HttpError::Truncated | HttpError::Io(_) => "bad_request",
            HttpError::HeadTooLarge => "headers_too_large",
            HttpError::BodyTooLarge(_) => "payload_too_large",
            HttpError::LengthRequired => "length_required",
        }
    }
}

impl From<&HttpError> for ApiError {
    fn from(e: &HttpError) -> Self {
        ApiError::new(e.status(), e.code(), e.to_string())
    }
}

/// Reads requests one at a time from a blocking `io`, with its own body limit (thread-per-
/// connection servers: the runtime benchmark's). Bytes after a request stay buffered for the
/// next one.
#[derive(Debug)]
pub struct BlockingReader<R> {
    io: R,
    buf: Vec<u8>,
    max_body: usize,
}

impl<R: std::io::Read> BlockingReader<R> {
    pub fn new(io: R, max_body: usize) -> Self {
        BlockingReader {
            io,
            buf: Vec::with_capacity(4096),
            max_body,
        }
    }

    pub fn get_ref(&self) -> &R {
        &self.io
    }

    fn fill(&mut self) -> Result<usize, HttpError> {
        let len = self.buf.len();
        self.buf.resize(len + 16 * 1024, 0);
        let n = loop {
            match self.io.read(&mut self.buf[len..]) {
                Ok(n) => break n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => {
                    self.buf.truncate(len);
                    return Err(HttpError::Io(e.to_string()));
                }
            }
        };
        self.buf.truncate(len + n);
        Ok(n)
    }

    /// The next request, or `None` when the peer closed the connection between requests.
    pub fn next_request(&mut self) -> Result<Option<Request>, HttpError> {
        loop {
            if let Some(req) = take_request(&mut self.buf, self.max_body)? {
                return Ok(Some(req));
            }
            if self.fill()? == 0 {
                return closed(&self.buf);
            }
        }
    }
}

/// Takes one complete request off the front of `buf`, or `None` while more bytes are needed.
/// Shared by [`BlockingReader`] and the gateway's event loop, which differ only in how they read.
pub fn take_request(buf: &mut Vec<u8>, max_body: usize) -> Result<Option<Request>, HttpError> {
    let Some((head_len, mut req, content_length)) = parse_head(buf)? else {
        return if buf.len() > MAX_HEAD {
            Err(HttpError::HeadTooLarge)
        } else {
            Ok(None)
        };
    };
    if content_length > max_body as u64 {
        return Err(HttpError::BodyTooLarge(content_length));
    }
    let total = head_len + content_length as usize;
    if buf.len() < total {
        return Ok(None);
    }
    req.body = buf[head_len..total].to_vec();
    buf.drain(..total);
    Ok(Some(req))
}

/// The peer closed the connection: cleanly between requests, or in the middle of one.
fn closed(buf: &[u8]) -> Result<Option<Request>, HttpError> {
    if buf.iter().all(u8::is_ascii_whitespace) {
        Ok(None)
    } else {
        Err(HttpError::Truncated)
    }
}

/// Parses a complete head from `buf`: `(head length, request without body, content length)`,
/// or `None` while the head is incomplete.
pub fn parse_head(buf: &[u8]) -> Result<Option<(usize, Request, u64)>, HttpError> {
    // Tolerate blank lines between keep-alive requests (RFC 9112 §2.2).
    let skip = buf
        .iter()
        .take_while(|b| **b == b'\r' || **b == b'\n')
        .count();
    let buf = &buf[skip..];
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut parsed = httparse::Request::new(&mut headers);
    let head_len = match parsed.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => return Err(HttpError::HeadTooLarge),
        Err(e) => return Err(HttpError::Malformed(e.to_string())),
    };
    let method = parsed.method.unwrap_or_default().to_string();
    let target = parsed.path.unwrap_or_default();
    let (path, query) = match target.split_once('?') {
        Some((p, q)) => (p.to_string(), Some(q.to_string())),
        None => (target.to_string(), None),
    };
    let mut close = parsed.version == Some(0);
    let mut authorization = None;
    let mut peer_auth = None;
    let mut content_length: Option<u64> = None;
    for h in parsed.headers.iter() {
        let value = std::str::from_utf8(h.value)
            .map_err(|_| HttpError::Malformed(format!("header {} is not UTF-8", h.name)))?
            .trim();
        if h.name.eq_ignore_ascii_case("content-length") {
            let n: u64 = value
                .parse()
                .map_err(|_| HttpError::Malformed(format!("bad Content-Length {value:?}")))?;
            if content_length.is_some_and(|prev| prev != n) {
                return Err(HttpError::Malformed(
                    "conflicting Content-Length headers".into(),
                ));
            }
            content_length = Some(n);
        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
            return Err(HttpError::LengthRequired);
        } else if h.name.eq_ignore_ascii_case("connection") {
            close = value.eq_ignore_ascii_case("close");
        } else if h.name.eq_ignore_ascii_case("authorization") {
            authorization = Some(value.to_string());
        } else if h.name.eq_ignore_ascii_case("x-drop-peer") {
            peer_auth = Some(value.to_string());
        }
    }
    // The header lines: after the request line, before the blank line that ends the head.
    let lines_start = buf
        .iter()
        .position(|b| *b == b'\n')
        .map_or(head_len, |i| i + 1);
    let head = buf[lines_start.min(head_len)..head_len].to_vec();
    let req = Request {
        method,
        path,
        query,
        body: Vec::new(),
        close,
        authorization,
        peer_auth,
        head,
    };
    Ok(Some((skip + head_len, req, content_length.unwrap_or(0))))
}

/// Standard reason phrase for the statuses DROP uses.
pub fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        201 => "Created",
        202 => "Accepted",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        401 => "Unauthorized",
        403 => "Forbidden",
        408 => "Request Timeout",
        409 => "Conflict",
        411 => "Length Required",
        413 => "Content Too Large",
        414 => "URI Too Long",
        422 => "Unprocessable Content",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        _ => "Unknown",
    }
}

/// Appends a complete response to `out`.
pub fn encode_response(
    status: u16,
    content_type: &str,
    body: &[u8],
    close: bool,
    out: &mut Vec<u8>,
) {
    encode_response_with(status, content_type, &[], body, close, out);
}

/// [`encode_response`] with extra headers. A header [`extra_header_ok`] refuses is left out:
/// extra headers may come from a function's reply, and must neither split the response (CR or
/// LF) nor contradict the framing this encoder writes.
pub fn encode_response_with(
    status: u16,
    content_type: &str,
    headers: &[(String, String)],
    body: &[u8],
    close: bool,
    out: &mut Vec<u8>,
) {
    use std::io::Write as _;
    let _ = write!(
        out,
        "HTTP/1.1 {status} {}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n{}",
        reason(status),
        body.len(),
        if close { "Connection: close\r\n" } else { "" }
    );
    for (name, value) in headers {
        if extra_header_ok(name, value) {
            out.extend_from_slice(name.as_bytes());
            out.extend_from_slice(b": ");
            out.extend_from_slice(value.as_bytes());
            out.extend_from_slice(b"\r\n");
        }
    }
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(body);
}

/// Whether an extra response header may be sent as is: its name is a token (RFC 9110 §5.6.2),
/// its value has no control character but tab, and it is none of the headers the server
/// itself owns (`Content-Type` has its own field; length and connection are the framing).
pub fn extra_header_ok(name: &str, value: &str) -> bool {
    const OWNED: [&str; 4] = [
        "content-type",
        "content-length",
        "transfer-encoding",
        "connection",
    ];
    let token = |b: u8| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b);
    !name.is_empty()
        && name.bytes().all(token)
        && value
            .bytes()
            .all(|b| b == b'\t' || (b >= 0x20 && b != 0x7f))
        && !OWNED.iter().any(|o| name.eq_ignore_ascii_case(o))
}

/// Encodes a complete response with a JSON body.
pub fn encode_json_response(status: u16, body: &[u8], close: bool) -> Vec<u8> {
    let mut out = Vec::with_capacity(128 + body.len());
    encode_response(status, "application/json", body, close, &mut out);
    out
}

/// A response as the blocking client sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    pub body: Vec<u8>,
}

/// One read, again after a signal: a socket with a read timeout is not restarted after a
/// signal handler and says `Interrupted` (a process with child processes gets SIGCHLD).
fn read_retrying<S: std::io::Read>(stream: &mut S, buf: &mut [u8]) -> std::io::Result<usize> {
    loop {
        match stream.read(buf) {
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            r => return r,
        }
    }
}

/// Blocking client side: writes one request and reads one response (`Content-Length` framed).
pub fn roundtrip<S: std::io::Read + std::io::Write>(
    stream: &mut S,
    method: &str,
    path: &str,
    body: Option<&[u8]>,
) -> std::io::Result<Response> {
    roundtrip_with(stream, method, path, body, &[])
}

/// [`roundtrip`] with extra request headers.
pub fn roundtrip_with<S: std::io::Read + std::io::Write>(
    stream: &mut S,
    method: &str,
    path: &str,
    body: Option<&[u8]>,
    headers: &[(&str, &str)],
) -> std::io::Result<Response> {
    use std::io::{Error, ErrorKind};
    let body = body.unwrap_or_default();
    let extra: String = headers
        .iter()
        .map(|(k, v)| format!("{k}: {v}\r\n"))
        .collect();
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: drop\r\nContent-Length: {}\r\n{}{extra}Connection: close\r\n\r\n",
        body.len(),
        if body.is_empty() { "" } else { "Content-Type: application/json\r\n" }
    )
    .into_bytes();
    req.extend_from_slice(body);
    stream.write_all(&req)?;

    let mut buf = Vec::with_capacity(4096);
    let mut chunk = [0u8; 8192];
    loop {
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut resp = httparse::Response::new(&mut headers);
        match resp.parse(&buf) {
            Ok(httparse::Status::Complete(head_len)) => {
                let status = resp.code.unwrap_or(0);
                let len = resp
                    .headers
                    .iter()
                    .find(|h| h.name.eq_ignore_ascii_case("content-length"))
                    .and_then(|h| {
                        std::str::from_utf8(h.value)
                            .ok()?
                            .trim()
                            .parse::<usize>()
                            .ok()
                    });
                let Some(len) = len else {
                    return Err(Error::new(
                        ErrorKind::InvalidData,
                        "response without Content-Length",
                    ));
                };
                while buf.len() < head_len + len {
                    let n = read_retrying(stream, &mut chunk)?;
                    if n == 0 {
                        return Err(Error::new(
                            ErrorKind::UnexpectedEof,
                            "response body cut short",
                        ));
                    }
                    buf.extend_from_slice(&chunk[..n]);
                }
                return Ok(Response {
                    status,
                    body: buf[head_len..head_len + len].to_vec(),
                });
            }
            Ok(httparse::Status::Partial) => {}
            Err(e) => {
                return Err(Error::new(
                    ErrorKind::InvalidData,
                    format!("bad response: {e}"),
                ));
            }
        }
        if buf.len() > MAX_HEAD {
            return Err(Error::new(
                ErrorKind::InvalidData,
                "response head too large",
            ));
        }
        let n = read_retrying(stream, &mut chunk)?;
        if n == 0 {
            return Err(Error::new(
                ErrorKind::UnexpectedEof,
                "connection closed before a response",
            ));
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMIT: usize = 1024 * 1024;

    fn read_all(input: &[u8]) -> Vec<Result<Option<Request>, HttpError>> {
        let mut r = BlockingReader::new(input, LIMIT);
        let mut out = Vec::new();
        loop {
            let next = r.next_request();
            let stop = !matches!(next, Ok(Some(_)));
            out.push(next);
            if stop {
                return out;
            }
        }
    }

    #[test]
    fn reads_keep_alive_requests_one_after_another() {
        let input = b"GET /v1/status HTTP/1.1\r\nHost: x\r\n\r\nPOST /v1/tune/apply?x=1 HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}";
        let got = read_all(input);
        assert_eq!(got.len(), 3);
        let first = got[0].clone().unwrap().unwrap();
        assert_eq!(
            (first.method.as_str(), first.path.as_str(), first.close),
            ("GET", "/v1/status", false)
        );
        let second = got[1].clone().unwrap().unwrap();
        assert_eq!(second.path, "/v1/tune/apply");
        assert_eq!(second.query.as_deref(), Some("x=1"));
        assert_eq!(second.body, b"{}");
        assert_eq!(got[2], Ok(None));
    }

    #[test]
    fn body_split_across_reads_is_assembled() {
        use std::io::Read as _;
        // A chain answers each read from one part only: the body arrives in two reads.
        let input =
            (&b"POST /a HTTP/1.1\r\nContent-Length: 10\r\n\r\n01234"[..]).chain(&b"56789"[..]);
        let mut r = BlockingReader::new(input, LIMIT);
        let req = r.next_request().unwrap().unwrap();
        assert_eq!(req.body, b"0123456789");
    }

    #[test]
    fn every_malformed_request_has_its_own_status() {
        let cases: [(&[u8], u16); 6] = [
            (b"NOT HTTP AT ALL\r\n\r\n", 400),
            (b"GET / HTTP/1.1\r\nContent-Length: nope\r\n\r\n", 400),
            (b"POST / HTTP/1.1\r\nContent-Length: 99999999\r\n\r\n", 413),
            (
                b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n",
                411,
            ),
            (b"POST / HTTP/1.1\r\nContent-Length: 10\r\n\r\nshort", 400),
            (
                b"GET / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
                400,
            ),
        ];
        for (input, status) in cases {
            let got = read_all(input);
            let err = got.last().unwrap().clone().unwrap_err();
            assert_eq!(
                err.status(),
                status,
                "{:?} -> {err:?}",
                String::from_utf8_lossy(input)
            );
        }
        let mut huge = b"GET / HTTP/1.1\r\n".to_vec();
        huge.extend(std::iter::repeat_n(b'a', MAX_HEAD + 10));
        assert_eq!(
            read_all(&huge)
                .last()
                .unwrap()
                .clone()
                .unwrap_err()
                .status(),
            431
        );
    }

    #[test]
    fn extra_headers_go_before_the_body_and_unsafe_ones_are_left_out() {
        let headers = [
            ("X-Trace", "abc 1"),
            ("Bad\r\nName", "x"),
            ("X-Split", "a\r\nSet-Cookie: evil"),
            ("content-length", "0"),
            ("Connection", "keep-alive"),
            ("Content-Type", "text/html"),
            ("", "empty name"),
        ]
        .map(|(k, v)| (k.to_string(), v.to_string()));
        let mut out = Vec::new();
        encode_response_with(201, "application/json", &headers, b"{}", true, &mut out);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "HTTP/1.1 201 Created\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\
             Connection: close\r\nX-Trace: abc 1\r\n\r\n{}"
        );
        let mut plain = Vec::new();
        encode_response(200, "text/plain", b"hi", false, &mut plain);
        assert_eq!(
            plain,
            b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 2\r\n\r\nhi"
        );
    }

    #[test]
    fn client_reads_a_framed_response() {
        struct Io(std::io::Cursor<Vec<u8>>, Vec<u8>);
        impl std::io::Read for Io {
            fn read(&mut self, b: &mut [u8]) -> std::io::Result<usize> {
                // one byte at a time: framing must not depend on read sizes
                let n = 1.min(b.len());
                std::io::Read::read(&mut self.0, &mut b[..n])
            }
        }
        impl std::io::Write for Io {
            fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
                self.1.extend_from_slice(b);
                Ok(b.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let wire = encode_json_response(404, br#"{"error":{}}"#, true);
        let mut io = Io(std::io::Cursor::new(wire), Vec::new());
        let resp = roundtrip(&mut io, "GET", "/v1/x", None).unwrap();
        assert_eq!(
            resp,
            Response {
                status: 404,
                body: br#"{"error":{}}"#.to_vec()
            }
        );
        assert!(
            String::from_utf8(io.1)
                .unwrap()
                .starts_with("GET /v1/x HTTP/1.1\r\n")
        );
    }
}
