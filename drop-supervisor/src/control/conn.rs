//! One control connection as hyper sees it: the Unix stream, plus the two things hyper does not
//! let a service decide.
//!
//! - hyper answers a request head it cannot use itself, before any service runs: 400 for one it
//!   cannot parse, 431 for one over the head limit, 414 for an over-long target, each with an
//!   empty body. Every other control answer is a JSON error, and clients (dropctl, scripts) read
//!   the `code`, so [`Conn`] rewrites those answers on their way out into the same
//!   `{"error": {"code", "message"}}` shape. It recognises them by what only hyper's own answers
//!   lack: every answer the server builds has a `Content-Type`.
//! - hyper drops a connection whose request head does not arrive in time without writing a
//!   word. Dropping a [`Conn`] hands the stream back (see [`Conn::new`]), so the server can still
//!   say why (408).
//!
//! To find response heads in what hyper writes, [`Conn`] follows the response framing: a head up
//! to its blank line, then `Content-Length` bytes of body passed through untouched. Anything it
//! does not understand switches it to passing every byte through unchanged, so the worst a
//! surprise can do is leave one of hyper's empty answers as it was.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::UnixStream;
use tokio::sync::oneshot;

use crate::error::ApiError;
use crate::http;

/// Longest response head followed; hyper's and the server's heads are a few hundred bytes.
const MAX_RESPONSE_HEAD: usize = 8 * 1024;

/// Where the bytes hyper writes are in the response framing.
#[derive(Debug)]
enum Out {
    /// Inside a response head: the bytes seen so far, held back until the head is complete.
    Head(Vec<u8>),
    /// Inside a body: this many more bytes pass through as they are.
    Body(u64),
    /// Out of step (cannot happen with hyper's output; a safe fallback): everything passes.
    Through,
}

#[derive(Debug)]
pub(super) struct Conn {
    /// `Some` until dropped.
    stream: Option<UnixStream>,
    give_back: Option<oneshot::Sender<UnixStream>>,
    /// The head limit, for the message of the 431 answer.
    max_head: usize,
    out: Out,
    /// Bytes taken from hyper that are not yet on the socket: a completed (maybe rewritten) head.
    held: Vec<u8>,
    held_sent: usize,
}

impl Conn {
    /// Wraps `stream`; when the `Conn` is dropped the stream goes to `give_back`.
    pub(super) fn new(
        stream: UnixStream,
        max_head: usize,
        give_back: oneshot::Sender<UnixStream>,
    ) -> Conn {
        Conn {
            stream: Some(stream),
            give_back: Some(give_back),
            max_head,
            out: Out::Head(Vec::new()),
            held: Vec::new(),
            held_sent: 0,
        }
    }

    fn stream(&mut self) -> Pin<&mut UnixStream> {
        Pin::new(
            self.stream
                .as_mut()
                .expect("the stream is taken only on drop"),
        )
    }

    /// Writes the held bytes; ready once none are left. They go before anything newer.
    fn poll_held(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.held_sent < self.held.len() {
            let stream = self
                .stream
                .as_mut()
                .expect("the stream is taken only on drop");
            match ready!(Pin::new(stream).poll_write(cx, &self.held[self.held_sent..]))? {
                0 => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                n => self.held_sent += n,
            }
        }
        self.held.clear();
        self.held_sent = 0;
        Poll::Ready(Ok(()))
    }

    /// Takes bytes of a response head from `buf` (up to its end); returns how many. A completed
    /// head becomes the held bytes, rewritten if it is one of hyper's own error answers.
    fn take_head(&mut self, buf: &[u8]) -> usize {
        let Out::Head(head) = &mut self.out else {
            unreachable!("take_head is called inside a head")
        };
        let before = head.len();
        head.extend_from_slice(buf);
        let from = before.saturating_sub(3);
        let end = head[from..]
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .map(|i| from + i + 4);
        match end {
            Some(end) => {
                head.truncate(end);
                let head = std::mem::take(head);
                let (bytes, next) = self.finish_head(head);
                self.held = bytes;
                self.out = next;
                end - before
            }
            // A response always starts with its version; anything else is out of step.
            None if head.len() > MAX_RESPONSE_HEAD || !starts_like_a_response(head) => {
                self.held = std::mem::take(head);
                self.out = Out::Through;
                buf.len()
            }
            None => buf.len(),
        }
    }

    /// The bytes to send for a complete `head`, and what follows it.
    fn finish_head(&self, head: Vec<u8>) -> (Vec<u8>, Out) {
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut parsed = httparse::Response::new(&mut headers);
        let Ok(httparse::Status::Complete(_)) = parsed.parse(&head) else {
            return (head, Out::Through);
        };
        let status = parsed.code.unwrap_or_default();
        let mut typed = false;
        let mut length = None;
        for h in parsed.headers.iter() {
            if h.name.eq_ignore_ascii_case("content-type") {
                typed = true;
            } else if h.name.eq_ignore_ascii_case("content-length") {
                length = std::str::from_utf8(h.value)
                    .ok()
                    .and_then(|v| v.trim().parse::<u64>().ok());
                if length.is_none() {
                    return (head, Out::Through);
                }
            } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
                return (head, Out::Through);
            }
        }
        if !typed && status >= 400 {
            // One of hyper's own answers: it has no body and ends the connection.
            let err = hyper_answer(status, self.max_head);
            let bytes = http::encode_json_response(err.status, &err.to_json(), true);
            return (bytes, Out::Head(Vec::new()));
        }
        let next = match length {
            Some(n) if n > 0 => Out::Body(n),
            // No body: 1xx (100 Continue), or an empty one.
            _ => Out::Head(Vec::new()),
        };
        (head, next)
    }

    /// At a flush or shutdown, a head still incomplete means the framing is not what it seems:
    /// send what is held as it is.
    fn give_up_partial_head(&mut self) {
        if let Out::Head(head) = &mut self.out
            && !head.is_empty()
        {
            self.held.extend_from_slice(&std::mem::take(head));
            self.out = Out::Through;
        }
    }
}

fn starts_like_a_response(head: &[u8]) -> bool {
    const PREFIX: &[u8] = b"HTTP/";
    let n = head.len().min(PREFIX.len());
    head[..n] == PREFIX[..n]
}

/// The JSON error for an answer hyper wrote itself with `status`.
fn hyper_answer(status: u16, max_head: usize) -> ApiError {
    match status {
        431 => ApiError::new(
            431,
            "headers_too_large",
            format!("request head larger than {max_head} bytes"),
        ),
        414 => ApiError::new(414, "uri_too_long", "request target too long"),
        400 => ApiError::new(400, "bad_request", "malformed request head"),
        _ => ApiError::new(status, "bad_request", "request refused by the HTTP layer"),
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        if let (Some(stream), Some(give_back)) = (self.stream.take(), self.give_back.take()) {
            // Nobody waiting for it is fine: the stream is then closed here.
            let _ = give_back.send(stream);
        }
    }
}

impl AsyncRead for Conn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        self.get_mut().stream().poll_read(cx, buf)
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        ready!(this.poll_held(cx))?;
        match &mut this.out {
            Out::Through => this.stream().poll_write(cx, buf),
            Out::Body(left) => {
                let left = *left;
                let n = usize::try_from(left).unwrap_or(usize::MAX).min(buf.len());
                let n = ready!(this.stream().poll_write(cx, &buf[..n]))?;
                this.out = match left - n as u64 {
                    0 => Out::Head(Vec::new()),
                    left => Out::Body(left),
                };
                Poll::Ready(Ok(n))
            }
            Out::Head(_) => {
                let taken = this.take_head(buf);
                // The taken bytes are accepted; start them on their way. If the socket is full
                // they go at the next write or flush, which hyper always does.
                if let Poll::Ready(Err(e)) = this.poll_held(cx) {
                    return Poll::Ready(Err(e));
                }
                Poll::Ready(Ok(taken))
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        this.give_up_partial_head();
        ready!(this.poll_held(cx))?;
        this.stream().poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        this.give_up_partial_head();
        ready!(this.poll_held(cx))?;
        this.stream().poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// Writes `chunks` through a `Conn` (as separate writes), shuts it down and returns what
    /// arrived on the other end.
    async fn through(chunks: &[&[u8]]) -> String {
        let (ours, mut theirs) = UnixStream::pair().unwrap();
        let (tx, _rx) = oneshot::channel();
        let mut conn = Conn::new(ours, 16 * 1024, tx);
        for chunk in chunks {
            conn.write_all(chunk).await.unwrap();
        }
        conn.shutdown().await.unwrap();
        let mut got = String::new();
        theirs.read_to_string(&mut got).await.unwrap();
        got
    }

    const OURS: &[u8] = b"HTTP/1.1 404 Not Found\r\ncontent-type: application/json\r\ncontent-length: 13\r\n\r\n{\"error\":404}";

    #[tokio::test]
    async fn answers_of_the_server_pass_unchanged_however_they_are_split() {
        let whole = String::from_utf8(OURS.to_vec()).unwrap();
        assert_eq!(through(&[OURS]).await, whole);
        let bytes: Vec<&[u8]> = OURS.chunks(1).collect();
        assert_eq!(through(&bytes).await, whole);
        let twice = [OURS, OURS].concat();
        assert_eq!(through(&[&twice]).await, whole.repeat(2));
    }

    #[tokio::test]
    async fn hyper_error_answers_become_json() {
        let canned = b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-length: 0\r\ndate: Thu, 01 Jan 2026 00:00:00 GMT\r\n\r\n";
        let got = through(&[OURS, &canned[..10], &canned[10..]]).await;
        let (first, second) = got.split_at(OURS.len());
        assert_eq!(first.as_bytes(), OURS);
        assert!(second.starts_with("HTTP/1.1 431 "), "{second}");
        assert!(second.contains("Connection: close"), "{second}");
        let body = second.split("\r\n\r\n").nth(1).unwrap();
        let v: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(v["error"]["code"], "headers_too_large");

        let got = through(&[b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n"]).await;
        assert!(got.contains(r#""code":"bad_request""#), "{got}");
    }

    #[tokio::test]
    async fn what_is_not_a_response_passes_through() {
        assert_eq!(
            through(&[b"garbage\r\n\r\n", b"more"]).await,
            "garbage\r\n\r\nmore"
        );
        // An incomplete head at a flush is sent as it is.
        assert_eq!(through(&[b"HTTP/1.1 400 Bad"]).await, "HTTP/1.1 400 Bad");
    }

    #[tokio::test]
    async fn dropping_hands_the_stream_back() {
        let (ours, _theirs) = UnixStream::pair().unwrap();
        let (tx, rx) = oneshot::channel();
        drop(Conn::new(ours, 1024, tx));
        assert!(rx.await.is_ok());
    }
}
