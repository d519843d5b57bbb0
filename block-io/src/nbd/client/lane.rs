//! A lane: one NBD connection with its own thread and single-threaded tokio runtime, fed
//! ops over a channel ([`conn::drive`](super::conn) runs on it and reconnects it). A client
//! has one lane, or several when the export advertises `NBD_FLAG_CAN_MULTI_CONN`
//! (proto.md "Transmission flags": then every connection sees the writes completed on any
//! other, and a flush on one makes them all durable).

use std::sync::Arc;
use std::thread::JoinHandle;

use tokio::sync::mpsc::{unbounded_channel, UnboundedSender};

use super::conn::{drive, Op, Stats};
use super::error::ClientError;
use super::handshake::{connect, Negotiated};
use super::options::NbdClientOptions;
use super::url::NbdUrl;

/// One connection's thread and the channel into it.
#[derive(Debug)]
pub(crate) struct Lane {
    tx: Option<UnboundedSender<Op>>,
    thread: Option<JoinHandle<()>>,
}

impl Lane {
    /// Starts a thread that connects to `url` (one attempt within the connect timeout) and
    /// then serves ops until the lane is closed. Returns once the handshake is done.
    pub fn spawn(
        url: &NbdUrl,
        opts: &NbdClientOptions,
        stats: Arc<Stats>,
        index: usize,
    ) -> Result<(Lane, Negotiated), ClientError> {
        let (init_tx, init_rx) = std::sync::mpsc::channel();
        let (tx, rx) = unbounded_channel();
        let url = url.clone();
        let opts = opts.clone();
        let thread = std::thread::Builder::new()
            .name(format!("nbd-client-{index}"))
            .spawn(move || {
                let rt = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(e) => {
                        let _ = init_tx.send(Err(ClientError::transport(e)));
                        return;
                    }
                };
                rt.block_on(async move {
                    match connect(&url, &opts).await {
                        Err(e) => {
                            let _ = init_tx.send(Err(e));
                        }
                        Ok((io, neg)) => {
                            let _ = init_tx.send(Ok(neg.clone()));
                            drive((io, neg), url, opts, rx, stats).await;
                        }
                    }
                });
            })
            .map_err(ClientError::transport)?;
        let mut lane = Lane {
            tx: Some(tx),
            thread: Some(thread),
        };
        match init_rx.recv() {
            Ok(Ok(neg)) => Ok((lane, neg)),
            Ok(Err(e)) => {
                lane.close();
                Err(e)
            }
            Err(_) => {
                lane.close();
                Err(ClientError::Closed)
            }
        }
    }

    /// Hands `op` to the lane's driver.
    pub fn send(&self, op: Op) -> Result<(), ClientError> {
        self.tx
            .as_ref()
            .ok_or(ClientError::Closed)?
            .send(op)
            .map_err(|_| ClientError::Closed)
    }

    /// Lets the driver finish (it sends `NBD_CMD_DISC`) without waiting for it.
    pub fn shut(&mut self) {
        self.tx.take();
    }

    /// [`shut`](Self::shut) and waits for the thread.
    pub fn close(&mut self) {
        self.shut();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Lane {
    fn drop(&mut self) {
        self.close();
    }
}
