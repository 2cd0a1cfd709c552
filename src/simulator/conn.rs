//! Accepting and serving connections: the accept loop, the TLS handshake (ALPN `h2` or
//! `http/1.1`), and one task per connection that drives hyper until the connection ends, a
//! fault cuts or closes it, or the simulator stops.

use std::fmt;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio_rustls::TlsAcceptor;

use super::handler::handle;
use super::stream::{ConnectionSwitch, IoInner, SimIo};
use super::{Shared, SimTls, SHUTDOWN_GRACE};

/// How long a TLS handshake may take before the connection is dropped.
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Resolves once the simulator is told to stop (the guard `wait_for` returns is not `Send`,
/// so it is dropped here).
pub(super) async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|stopped| *stopped).await;
}

pub(super) fn invalid_input(msg: impl fmt::Display) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, msg.to_string())
}

pub(super) fn tls_acceptor(tls: &SimTls, http2: bool) -> io::Result<TlsAcceptor> {
    let certs: Vec<CertificateDer<'static>> =
        rustls_pemfile::certs(&mut tls.cert_chain_pem.as_bytes()).collect::<Result<_, _>>()?;
    if certs.is_empty() {
        return Err(invalid_input(
            "simulator TLS: no certificate in cert_chain_pem",
        ));
    }
    let key: PrivateKeyDer<'static> = rustls_pemfile::private_key(&mut tls.key_pem.as_bytes())?
        .ok_or_else(|| invalid_input("simulator TLS: no private key in key_pem"))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(invalid_input)?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(invalid_input)?;
    config.alpn_protocols = if http2 {
        vec![b"h2".to_vec(), b"http/1.1".to_vec()]
    } else {
        vec![b"http/1.1".to_vec()]
    };
    Ok(TlsAcceptor::from(Arc::new(config)))
}

pub(super) async fn accept_loop(
    listener: TcpListener,
    acceptor: Option<TlsAcceptor>,
    shared: Arc<Shared>,
    done: mpsc::Sender<()>,
) {
    let mut stop = shared.stop.subscribe();
    loop {
        tokio::select! {
            _ = stopped(&mut stop) => break,
            accepted = listener.accept() => match accepted {
                Ok((tcp, _peer)) => {
                    shared.connection_count.fetch_add(1, Ordering::SeqCst);
                    let _ = tcp.set_nodelay(true);
                    tokio::spawn(serve_connection(
                        tcp,
                        acceptor.clone(),
                        Arc::clone(&shared),
                        done.clone(),
                    ));
                }
                Err(err) => {
                    // E.g. out of file descriptors: back off instead of spinning.
                    tracing::warn!(error = %err, "plivo simulator: accept failed");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            },
        }
    }
    tracing::debug!("plivo simulator stopped accepting");
}

async fn serve_connection(
    tcp: TcpStream,
    acceptor: Option<TlsAcceptor>,
    shared: Arc<Shared>,
    _done: mpsc::Sender<()>,
) {
    let mut stop = shared.stop.subscribe();
    let switch = Arc::new(ConnectionSwitch::default());
    let inner = match acceptor {
        None => IoInner::Plain(tcp),
        Some(acceptor) => {
            let handshake = tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(tcp));
            tokio::select! {
                _ = stopped(&mut stop) => return,
                result = handshake => match result {
                    Ok(Ok(tls)) => IoInner::Tls(Box::new(tls)),
                    Ok(Err(err)) => {
                        tracing::debug!(error = %err, "plivo simulator: TLS handshake failed");
                        return;
                    }
                    Err(_) => {
                        tracing::debug!("plivo simulator: TLS handshake timed out");
                        return;
                    }
                },
            }
        }
    };
    let http2 = match &inner {
        IoInner::Tls(tls) => tls.get_ref().1.alpn_protocol() == Some(b"h2"),
        IoInner::Plain(_) => false,
    };
    let io = TokioIo::new(SimIo {
        inner,
        reset: Arc::clone(&switch),
    });
    let svc_shared = Arc::clone(&shared);
    let svc_switch = Arc::clone(&switch);
    let service = hyper::service::service_fn(move |req| {
        handle(Arc::clone(&svc_shared), Arc::clone(&svc_switch), req)
    });
    let result = if http2 {
        let conn = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .serve_connection(io, service);
        drive(conn, |c| c.graceful_shutdown(), &switch, &mut stop).await
    } else {
        let conn = hyper::server::conn::http1::Builder::new()
            .timer(TokioTimer::new())
            .keep_alive(true)
            .serve_connection(io, service);
        drive(conn, |c| c.graceful_shutdown(), &switch, &mut stop).await
    };
    if let Err(err) = result {
        tracing::debug!(error = %err, "plivo simulator: connection ended with an error");
    }
}

/// Serves `conn` until it ends, a [`Fault::Reset`] drops it (every stream of an HTTP/2
/// connection with it), a [`Fault::GoAway`] closes it gracefully, or the simulator stops
/// (graceful, bounded by [`SHUTDOWN_GRACE`]).
///
/// [`Fault::Reset`]: super::Fault::Reset
/// [`Fault::GoAway`]: super::Fault::GoAway
async fn drive<C>(
    conn: C,
    graceful_shutdown: impl FnOnce(Pin<&mut C>),
    switch: &ConnectionSwitch,
    stop: &mut watch::Receiver<bool>,
) -> hyper::Result<()>
where
    C: Future<Output = hyper::Result<()>>,
{
    tokio::pin!(conn);
    tokio::select! {
        result = conn.as_mut() => result,
        () = switch.fired.notified() => Ok(()),
        () = switch.go_away.notified() => {
            graceful_shutdown(conn.as_mut());
            tokio::select! {
                result = conn.as_mut() => result,
                () = switch.fired.notified() => Ok(()),
                _ = stopped(stop) => Ok(()),
            }
        }
        _ = stopped(stop) => {
            graceful_shutdown(conn.as_mut());
            tokio::time::timeout(SHUTDOWN_GRACE, conn).await.unwrap_or(Ok(()))
        }
    }
}
