//! Splicing two streams with an idle timeout: the copy ends when neither direction moved a
//! byte for the given time, so abandoned raw connections do not pin a workload forever.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Instant;

/// Copies both ways between `a` and `b` (with half-close handling) until both sides closed,
/// an error, or `idle` without traffic; the latter is reported as [`io::ErrorKind::TimedOut`].
pub async fn copy_bidirectional_with_idle_timeout<A, B>(a: A, b: B, idle: Duration) -> io::Result<(u64, u64)>
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let start = Instant::now();
    let activity = Arc::new(AtomicU64::new(0));
    let mut a = Tracked { inner: a, start, activity: activity.clone() };
    let mut b = Tracked { inner: b, start, activity: activity.clone() };
    let copy = tokio::io::copy_bidirectional(&mut a, &mut b);
    tokio::pin!(copy);
    loop {
        let last = start + Duration::from_millis(activity.load(Ordering::Relaxed));
        let deadline = last + idle;
        tokio::select! {
            result = &mut copy => return result,
            () = tokio::time::sleep_until(deadline) => {
                // Traffic may have moved the deadline while we slept.
                let last = start + Duration::from_millis(activity.load(Ordering::Relaxed));
                if Instant::now() >= last + idle {
                    return Err(io::Error::new(io::ErrorKind::TimedOut, "idle timeout"));
                }
            }
        }
    }
}

/// A stream that records when it last moved data, in milliseconds since `start`.
struct Tracked<S> {
    inner: S,
    start: Instant,
    activity: Arc<AtomicU64>,
}

impl<S> Tracked<S> {
    fn touch(&self) {
        let elapsed = u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.activity.fetch_max(elapsed, Ordering::Relaxed);
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Tracked<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let result = Pin::new(&mut self.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.touch();
        }
        result
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Tracked<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        let result = Pin::new(&mut self.inner).poll_write(cx, data);
        if matches!(result, Poll::Ready(Ok(written)) if written > 0) {
            self.touch();
        }
        result
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
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    #[tokio::test(start_paused = true)]
    async fn ends_after_idle_but_not_while_traffic_flows() {
        let (client, proxy_side) = tokio::io::duplex(1024);
        let (workload_side, mut workload) = tokio::io::duplex(1024);
        let splice =
            tokio::spawn(copy_bidirectional_with_idle_timeout(proxy_side, workload_side, Duration::from_secs(10)));
        let mut client = client;
        // Traffic every 6 s keeps the splice alive past the 10 s idle limit.
        for _ in 0..3 {
            tokio::time::sleep(Duration::from_secs(6)).await;
            client.write_all(b"ping").await.unwrap();
            let mut buffer = [0u8; 4];
            workload.read_exact(&mut buffer).await.unwrap();
            assert_eq!(&buffer, b"ping");
        }
        assert!(!splice.is_finished());
        let error = splice.await.unwrap().unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::TimedOut);
    }

    #[tokio::test]
    async fn ends_when_both_sides_close() {
        let (mut client, proxy_side) = tokio::io::duplex(1024);
        let (workload_side, mut workload) = tokio::io::duplex(1024);
        let splice =
            tokio::spawn(copy_bidirectional_with_idle_timeout(proxy_side, workload_side, Duration::from_secs(60)));
        client.write_all(b"hi").await.unwrap();
        client.shutdown().await.unwrap();
        let mut received = Vec::new();
        workload.read_to_end(&mut received).await.unwrap();
        assert_eq!(received, b"hi");
        workload.shutdown().await.unwrap();
        assert_eq!(splice.await.unwrap().unwrap(), (2, 0));
    }
}
