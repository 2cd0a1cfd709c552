//! Accepting connections under a cap: a listener's loop waits for a free slot before it
//! accepts, so connections beyond the cap wait in the kernel's accept queue instead of
//! costing memory. Shared by the data listener and the admin listener ([`crate::admin`]).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Waits for one of the `slots`, then for a connection on `listener`; the permit goes with
/// the connection. An accept error (EMFILE and friends) is logged and retried after a
/// short pause instead of spinning. `None` once the slots are closed.
pub(crate) async fn accept_within(
    listener: &TcpListener,
    slots: &Arc<Semaphore>,
    listener_name: &str,
) -> Option<(OwnedSemaphorePermit, TcpStream, SocketAddr)> {
    let permit = Arc::clone(slots).acquire_owned().await.ok()?;
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => return Some((permit, stream, peer)),
            Err(err) => {
                tracing::warn!(listener = listener_name, error = %err, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}
