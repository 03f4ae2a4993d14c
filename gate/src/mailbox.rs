//! Cross-thread mailbox into one core's runtime: a crossbeam channel for the data plus an
//! [`AtomicWaker`] that wakes the core's receiving task (monoio's `sync` feature lets wakers cross
//! threads). Senders never block.

use std::future::poll_fn;
use std::sync::Arc;
use std::task::Poll;

use atomic_waker::AtomicWaker;
use crossbeam_channel::{Receiver, Sender, TryRecvError};

/// Sending half; cheap to clone, usable from any thread.
pub struct Mailbox<T> {
    tx: Sender<T>,
    waker: Arc<AtomicWaker>,
}

impl<T> Clone for Mailbox<T> {
    fn clone(&self) -> Self {
        Mailbox {
            tx: self.tx.clone(),
            waker: self.waker.clone(),
        }
    }
}

/// Receiving half, owned by one core.
pub struct MailboxRx<T> {
    rx: Receiver<T>,
    waker: Arc<AtomicWaker>,
}

/// A new unbounded mailbox.
pub fn mailbox<T>() -> (Mailbox<T>, MailboxRx<T>) {
    let (tx, rx) = crossbeam_channel::unbounded();
    let waker = Arc::new(AtomicWaker::new());
    (
        Mailbox {
            tx,
            waker: waker.clone(),
        },
        MailboxRx { rx, waker },
    )
}

impl<T> Mailbox<T> {
    /// Messages waiting in the mailbox.
    pub fn len(&self) -> usize {
        self.tx.len()
    }

    /// Whether no message waits.
    pub fn is_empty(&self) -> bool {
        self.tx.is_empty()
    }

    /// Enqueues `v`; on a closed mailbox it is handed back.
    pub fn send(&self, v: T) -> Result<(), T> {
        self.tx.send(v).map_err(|e| e.0)?;
        self.waker.wake();
        Ok(())
    }
}

impl<T> MailboxRx<T> {
    /// Next message; `None` once every sender is gone.
    pub async fn recv(&self) -> Option<T> {
        poll_fn(|cx| match self.rx.try_recv() {
            Ok(v) => Poll::Ready(Some(v)),
            Err(TryRecvError::Disconnected) => Poll::Ready(None),
            Err(TryRecvError::Empty) => {
                self.waker.register(cx.waker());
                match self.rx.try_recv() {
                    Ok(v) => Poll::Ready(Some(v)),
                    Err(TryRecvError::Disconnected) => Poll::Ready(None),
                    Err(TryRecvError::Empty) => Poll::Pending,
                }
            }
        })
        .await
    }

    /// Takes a message without waiting.
    pub fn try_recv(&self) -> Option<T> {
        self.rx.try_recv().ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wakes_a_monoio_core_from_another_thread() {
        let (tx, rx) = mailbox::<u32>();
        let t = std::thread::spawn(move || {
            for i in 0..1000 {
                tx.send(i).unwrap();
            }
        });
        let mut rt = monoio::RuntimeBuilder::<monoio::LegacyDriver>::new()
            .build()
            .unwrap();
        let sum = rt.block_on(async move {
            let mut sum = 0u64;
            while let Some(v) = rx.recv().await {
                sum += v as u64;
            }
            sum
        });
        t.join().unwrap();
        assert_eq!(sum, 999 * 1000 / 2);
    }
}
