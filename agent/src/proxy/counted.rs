//! A stream wrapper counting the bytes read from and written to the client, for usage.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::sleep::Counters;

/// Counts what passes through `inner` into `counters` (`bytes_in`: read from the client,
/// `bytes_out`: written to it); without counters it only passes through.
pub struct Counted<S> {
    inner: S,
    counters: Option<Arc<Counters>>,
}

impl<S> Counted<S> {
    pub fn new(inner: S, counters: Option<Arc<Counters>>) -> Self {
        Self { inner, counters }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Counted<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let result = Pin::new(&mut self.inner).poll_read(cx, buf);
        if let (Poll::Ready(Ok(())), Some(counters)) = (&result, &self.counters) {
            Counters::add(&counters.bytes_in, (buf.filled().len() - before) as u64);
        }
        result
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Counted<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let result = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let (Poll::Ready(Ok(written)), Some(counters)) = (&result, &self.counters) {
            Counters::add(&counters.bytes_out, *written as u64);
        }
        result
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let result = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if let (Poll::Ready(Ok(written)), Some(counters)) = (&result, &self.counters) {
            Counters::add(&counters.bytes_out, *written as u64);
        }
        result
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    #[tokio::test]
    async fn counts_both_directions() {
        let (near, mut far) = tokio::io::duplex(64);
        let counters = Arc::new(Counters::default());
        let mut counted = Counted::new(near, Some(counters.clone()));
        far.write_all(b"hello").await.expect("written");
        let mut buf = [0u8; 5];
        counted.read_exact(&mut buf).await.expect("read");
        counted.write_all(b"hi there").await.expect("written");
        assert_eq!(counters.bytes_in.load(Ordering::Relaxed), 5);
        assert_eq!(counters.bytes_out.load(Ordering::Relaxed), 8);
    }
}
