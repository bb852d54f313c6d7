//! Answers to requests whose head cannot be parsed, with the JSON error body every other
//! error has. hyper writes these answers itself (`400`, `414`, `431`, with an empty
//! body) and has no setting to change them, so the connection's writes are watched for
//! exactly those heads and each one is replaced by ours.

use std::{
    io,
    pin::Pin,
    task::{Context, Poll, ready},
};

use axum::http::StatusCode;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// The complete answer, JSON body included, to a head that was refused with `status`.
pub(super) fn answer(status: StatusCode) -> String {
    let (code, message) = match status {
        StatusCode::URI_TOO_LONG => ("uri_too_long", "the request URI is over 65534 bytes"),
        StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE => (
            "headers_too_large",
            "the request has more than 100 headers, or its head is too large",
        ),
        _ => ("bad_request", "the request is not valid HTTP/1.1"),
    };
    let body = format!(r#"{{"error":{{"code":"{code}","message":"{message}"}}}}"#);
    format!(
        "HTTP/1.1 {} {}\r\nconnection: close\r\ncontent-type: application/json\r\n\
         content-length: {}\r\ndate: {}\r\n\r\n{body}",
        status.as_u16(),
        status.canonical_reason().unwrap_or(""),
        body.len(),
        httpdate::fmt_http_date(std::time::SystemTime::now()),
    )
}

/// The status of a head that hyper wrote for a request it could not parse: one of the
/// three, closing the connection, with nothing after it. No handler's answer starts so,
/// since every error they give has a body.
fn refusal(written: &[u8]) -> Option<StatusCode> {
    const REST: &[u8] = b"\r\nconnection: close\r\ncontent-length: 0\r\n";
    [
        (&b"HTTP/1.1 400 Bad Request"[..], StatusCode::BAD_REQUEST),
        (b"HTTP/1.1 414 URI Too Long", StatusCode::URI_TOO_LONG),
        (
            b"HTTP/1.1 431 Request Header Fields Too Large",
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
        ),
    ]
    .into_iter()
    .find(|(line, _)| written.starts_with(line) && written[line.len()..].starts_with(REST))
    .map(|(_, status)| status)
}

/// A connection whose parser refusals go out as [`answer`]s.
pub(super) struct WithJsonRefusals<IO> {
    io: IO,
    /// What is left of a replacement, and the length of the head it stands for.
    replacing: Option<(Vec<u8>, usize)>,
}

impl<IO> WithJsonRefusals<IO> {
    pub fn new(io: IO) -> Self {
        Self {
            io,
            replacing: None,
        }
    }
}

impl<IO: AsyncWrite + Unpin> WithJsonRefusals<IO> {
    /// Writes the rest of a replacement; then reports the replaced head as written.
    fn poll_replace(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        while let Some((rest, _)) = self.replacing.as_mut().filter(|(rest, _)| !rest.is_empty()) {
            match ready!(Pin::new(&mut self.io).poll_write(cx, rest))? {
                0 => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                n => drop(rest.drain(..n)),
            }
        }
        let (_, stands_for) = self.replacing.take().unwrap_or_default();
        Poll::Ready(Ok(stands_for))
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for WithJsonRefusals<IO> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_read(cx, buf)
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for WithJsonRefusals<IO> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.replacing.is_none()
            && let Some(status) = refusal(buf)
        {
            this.replacing = Some((answer(status).into_bytes(), buf.len()));
        }
        if this.replacing.is_some() {
            return this.poll_replace(cx);
        }
        Pin::new(&mut this.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        // hyper hands a refusal's head over as one slice with nothing after it.
        let this = self.get_mut();
        let first = bufs.iter().find(|b| !b.is_empty());
        if this.replacing.is_some() || first.is_some_and(|b| refusal(b).is_some()) {
            return Pin::new(this).poll_write(cx, first.map_or(&[][..], |b| &b[..]));
        }
        Pin::new(&mut this.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_parsers_own_refusals_are_recognized() {
        let hyper_431 = b"HTTP/1.1 431 Request Header Fields Too Large\r\nconnection: close\r\n\
                          content-length: 0\r\ndate: Tue, 01 Dec 2026 05:49:12 GMT\r\n\r\n";
        assert_eq!(
            refusal(hyper_431),
            Some(StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE)
        );
        let ours = b"HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\n\
                     content-length: 60\r\n\r\n";
        assert_eq!(refusal(ours), None);
        assert_eq!(refusal(b"HTTP/1.1 200 OK\r\n"), None);
    }

    #[test]
    fn an_answer_is_the_contracts_json_error() {
        let answer = answer(StatusCode::URI_TOO_LONG);
        let (head, body) = answer.split_once("\r\n\r\n").unwrap();
        assert!(head.starts_with("HTTP/1.1 414 URI Too Long\r\n"));
        assert!(head.contains(&format!("content-length: {}\r\n", body.len())));
        let error: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(error["error"]["code"], "uri_too_long");
    }
}
