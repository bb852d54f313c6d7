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

use crate::http::ErrorBody;

/// The complete answer, JSON body included, to a head that was refused with `status`.
pub(super) fn answer(status: StatusCode) -> String {
    let (code, message) = match status {
        StatusCode::URI_TOO_LONG => ("uri_too_long", "the request URI is over 65534 bytes"),
        StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE => (
            "headers_too_large",
            "the request's headers are too many or too large",
        ),
        _ => ("bad_request", "the request is not valid HTTP/1"),
    };
    // Plain strings: serializing them cannot fail.
    let body = serde_json::to_string(&ErrorBody::new(code, message.into())).unwrap_or_default();
    format!(
        "HTTP/1.1 {} {}\r\nconnection: close\r\ncontent-type: application/json\r\n\
         content-length: {}\r\ndate: {}\r\n\r\n{body}",
        status.as_u16(),
        status.canonical_reason().unwrap_or(""),
        body.len(),
        super::sse::now_date(),
    )
}

/// The status of a head that hyper wrote for a request it could not parse: one of the
/// three, whole, with no headers but `content-length: 0`, `date` and perhaps
/// `connection`, and nothing after it. No handler's answer looks so, since every error
/// they give has a JSON body.
fn refusal(written: &[u8]) -> Option<StatusCode> {
    // Every response hyper writes passes here: most are told apart by their status alone.
    if !matches!(written.get(9..13), Some(b"400 " | b"414 " | b"431 ")) {
        return None;
    }
    let head = written.strip_suffix(b"\r\n\r\n")?;
    let mut lines = head
        .split(|&b| b == b'\n')
        .map(|l| l.strip_suffix(b"\r").unwrap_or(l));
    let status_line = lines.next()?;
    let status = [
        (&b" 400 Bad Request"[..], StatusCode::BAD_REQUEST),
        (b" 414 URI Too Long", StatusCode::URI_TOO_LONG),
        (
            b" 431 Request Header Fields Too Large",
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
        ),
    ]
    .into_iter()
    .find(|(rest, _)| {
        [&b"HTTP/1.1"[..], b"HTTP/1.0"]
            .iter()
            .any(|version| status_line.strip_prefix(*version) == Some(*rest))
    })?
    .1;
    let mut empty = false;
    for line in lines {
        let line = line.to_ascii_lowercase();
        if line == b"content-length: 0" {
            empty = true;
        } else if !(line.starts_with(b"date: ") || line.starts_with(b"connection: ")) {
            return None;
        }
    }
    empty.then_some(status)
}

/// A connection whose parser refusals go out as [`answer`]s. hyper hands a refusal's
/// head over whole, as one buffer (the first slice of a vectored write), and retries
/// the same buffer while the write is pending, as `AsyncWrite` callers do: the
/// replacement is written across those calls, and the head reported as written once it
/// is all out.
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
    /// Writes what is left of a replacement, if any; then says how much of the caller's
    /// `offered` bytes the replaced head counts for.
    fn poll_replace(&mut self, cx: &mut Context<'_>, offered: usize) -> Poll<io::Result<usize>> {
        while let Some((rest, _)) = self.replacing.as_mut().filter(|(rest, _)| !rest.is_empty()) {
            match ready!(Pin::new(&mut self.io).poll_write(cx, rest))? {
                0 => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                n => drop(rest.drain(..n)),
            }
        }
        let (_, stands_for) = self.replacing.take().unwrap_or_default();
        Poll::Ready(Ok(stands_for.min(offered)))
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
            return this.poll_replace(cx, buf.len());
        }
        Pin::new(&mut this.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let first = bufs
            .iter()
            .find(|b| !b.is_empty())
            .map_or(&[][..], |b| &b[..]);
        if this.replacing.is_some() || refusal(first).is_some() {
            return Pin::new(this).poll_write(cx, first);
        }
        Pin::new(&mut this.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.replacing.is_some() {
            ready!(this.poll_replace(cx, 0))?;
        }
        Pin::new(&mut this.io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.replacing.is_some() {
            ready!(this.poll_replace(cx, 0))?;
        }
        Pin::new(&mut this.io).poll_shutdown(cx)
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
        // After a keep-alive HTTP/1.0 request, hyper answers in that version and does not
        // say it closes.
        let hyper_10 = b"HTTP/1.0 400 Bad Request\r\ncontent-length: 0\r\n\
                         date: Tue, 01 Dec 2026 05:49:12 GMT\r\n\r\n";
        assert_eq!(refusal(hyper_10), Some(StatusCode::BAD_REQUEST));
        let ours = b"HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\n\
                     content-length: 60\r\n\r\n";
        assert_eq!(refusal(ours), None);
        // Anything after the head, or a head cut short, is not a refusal to replace.
        let mut more = hyper_431.to_vec();
        more.extend_from_slice(b"x");
        assert_eq!(refusal(&more), None);
        assert_eq!(refusal(&hyper_431[..40]), None);
        assert_eq!(refusal(b"HTTP/1.1 200 OK\r\n\r\n"), None);
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
