//! Reading a request body through a hard limit and a deadline.
//!
//! A declared length over the limit is refused before a byte is read. Otherwise frames are taken as
//! they arrive and the read stops at the first byte past the limit, whatever `Content-Length` or the
//! chunked encoding claimed; the handler never holds more than `limit` bytes. The caller closes the
//! connection after a refusal, since the rest of the body is left unread.

use std::time::Instant;

use http_body_util::BodyExt;
use zeroize::Zeroizing;

/// Why a body could not be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyError {
    /// More than the limit: declared, or received. `read` is how many bytes were taken (at most
    /// `limit + 1`).
    TooLarge {
        /// Bytes taken before stopping.
        read: usize,
    },
    /// The body did not arrive before the deadline.
    Timeout {
        /// Bytes taken before the deadline.
        read: usize,
    },
    /// The body stream broke (connection reset, malformed chunked encoding).
    Broken {
        /// Bytes taken before it broke.
        read: usize,
    },
}

impl BodyError {
    /// Bytes taken before the read stopped.
    pub fn bytes_read(self) -> usize {
        match self {
            BodyError::TooLarge { read }
            | BodyError::Timeout { read }
            | BodyError::Broken { read } => read,
        }
    }
}

/// Reads at most `limit` bytes of `body` before `deadline`, into a buffer wiped on drop.
pub(crate) async fn read_limited<B: super::RequestBody>(
    mut body: B,
    limit: usize,
    deadline: Instant,
) -> Result<Zeroizing<Vec<u8>>, BodyError> {
    if body.size_hint().lower() > limit as u64 {
        return Err(BodyError::TooLarge { read: 0 });
    }
    let mut buf = Zeroizing::new(Vec::with_capacity(limit.min(4096)));
    loop {
        let frame = match tokio::time::timeout_at(deadline.into(), body.frame()).await {
            Err(_) => return Err(BodyError::Timeout { read: buf.len() }),
            Ok(None) => return Ok(buf),
            Ok(Some(Err(_))) => return Err(BodyError::Broken { read: buf.len() }),
            Ok(Some(Ok(frame))) => frame,
        };
        let Ok(data) = frame.into_data() else {
            continue; // trailers carry nothing we use
        };
        if buf.len() + data.len() > limit {
            return Err(BodyError::TooLarge { read: limit + 1 });
        }
        buf.extend_from_slice(&data);
    }
}
