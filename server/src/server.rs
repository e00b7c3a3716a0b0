//! The listeners and their connections: the TLS listener (HTTP/1.1 or
//! HTTP/2 by ALPN) and the plain unix sockets (local data listener, control
//! API), each with its router. One connection cap spans them all; headers
//! must arrive within a timeout and within a size limit, so slow or greedy
//! clients cannot pin connections or memory. Shutdown stops accepting, lets
//! running requests finish for a grace period, then drops what is left.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

/// Time a client has to finish its TLS handshake.
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Time running requests get to finish after shutdown starts.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);
/// Largest request head (HTTP/1 read buffer, HTTP/2 header list).
const MAX_HEADER_BYTES: usize = 64 << 10;
/// HTTP/2 flow-control windows: large enough that one stream can fill a
/// fast link without waiting for WINDOW_UPDATEs.
const H2_STREAM_WINDOW: u32 = 4 << 20;
const H2_CONNECTION_WINDOW: u32 = 16 << 20;

/// A bound socket.
pub enum Listener {
    /// TCP with TLS.
    Tls(TcpListener, Arc<rustls::ServerConfig>),
    /// A unix socket, plain HTTP.
    Unix(UnixListener),
}

/// A listener and what it serves.
pub struct Endpoint {
    /// The socket.
    pub listener: Listener,
    /// The routes.
    pub router: Router,
}

/// Limits that hold across all listeners.
#[derive(Debug, Clone, Copy)]
pub struct ConnectionLimits {
    /// Open connections at most; more wait in the kernel's backlog.
    pub max_connections: usize,
    /// Time a client has to send a request head (slowloris guard; also
    /// closes idle keep-alive connections).
    pub header_timeout: Duration,
}

enum Accepted {
    Tcp(TcpStream, std::net::SocketAddr),
    Unix(UnixStream),
}

/// Serves every endpoint until `shutdown` completes.
pub async fn serve(endpoints: Vec<Endpoint>, limits: ConnectionLimits, shutdown: impl Future<Output = ()>) {
    let (accepted_tx, mut accepted) = mpsc::channel::<(Accepted, usize, OwnedSemaphorePermit)>(64);
    let stop = CancellationToken::new();
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let mut services = Vec::new();
    for (index, endpoint) in endpoints.into_iter().enumerate() {
        let (listener, acceptor) = match endpoint.listener {
            Listener::Tls(tcp, tls) => (Listener::Tls(tcp, tls.clone()), Some(TlsAcceptor::from(tls))),
            unix => (unix, None),
        };
        services.push((acceptor, TowerToHyperService::new(endpoint.router)));
        tokio::spawn(accept_loop(listener, index, accepted_tx.clone(), slots.clone(), stop.clone()));
    }
    drop(accepted_tx);
    let builder = http_builder(limits);
    let graceful = GracefulShutdown::new();
    tokio::pin!(shutdown);
    loop {
        let (connection, index, permit) = tokio::select! {
            next = accepted.recv() => match next {
                Some(next) => next,
                None => break,
            },
            () = &mut shutdown => break,
        };
        let (acceptor, service) = services[index].clone();
        let builder = builder.clone();
        let watcher = graceful.watcher();
        tokio::spawn(async move {
            let _permit = permit;
            let result = match (connection, acceptor) {
                (Accepted::Tcp(tcp, peer), Some(acceptor)) => {
                    let tls = match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                        Ok(Ok(tls)) => tls,
                        Ok(Err(error)) => return tracing::debug!(%peer, %error, "TLS handshake failed"),
                        Err(_) => return tracing::debug!(%peer, "TLS handshake timed out"),
                    };
                    watcher.watch(builder.serve_connection(TokioIo::new(tls), service).into_owned()).await
                }
                (Accepted::Unix(unix), _) => watcher.watch(builder.serve_connection(TokioIo::new(unix), service).into_owned()).await,
                (Accepted::Tcp(..), None) => unreachable!("TCP listeners always have TLS"),
            };
            if let Err(error) = result {
                tracing::debug!(%error, "connection ended with an error");
            }
        });
    }
    stop.cancel();
    tracing::info!("shutting down: no new connections, waiting for running requests");
    if tokio::time::timeout(SHUTDOWN_GRACE, graceful.shutdown()).await.is_err() {
        tracing::warn!("requests still running after {SHUTDOWN_GRACE:?}; dropping them");
    }
}

fn http_builder(limits: ConnectionLimits) -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder.http1().timer(TokioTimer::new()).header_read_timeout(limits.header_timeout).max_buf_size(MAX_HEADER_BYTES);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(MAX_HEADER_BYTES as u32)
        .initial_stream_window_size(H2_STREAM_WINDOW)
        .initial_connection_window_size(H2_CONNECTION_WINDOW)
        .max_frame_size(256 << 10)
        .keep_alive_interval(Duration::from_secs(30))
        .keep_alive_timeout(Duration::from_secs(20));
    builder
}

/// Accepts connections while a connection slot is free.
async fn accept_loop(
    listener: Listener,
    index: usize,
    accepted: mpsc::Sender<(Accepted, usize, OwnedSemaphorePermit)>,
    slots: Arc<Semaphore>,
    stop: CancellationToken,
) {
    loop {
        let permit = tokio::select! {
            permit = slots.clone().acquire_owned() => permit.expect("the semaphore is never closed"),
            () = stop.cancelled() => return,
        };
        let connection = tokio::select! {
            connection = accept(&listener) => connection,
            () = stop.cancelled() => return,
        };
        match connection {
            Ok(connection) => {
                if accepted.send((connection, index, permit)).await.is_err() {
                    return;
                }
            }
            Err(error) => {
                // Out of file descriptors and the like: back off, keep serving.
                tracing::warn!(%error, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

async fn accept(listener: &Listener) -> std::io::Result<Accepted> {
    match listener {
        Listener::Tls(tcp, _) => {
            let (stream, peer) = tcp.accept().await?;
            let _ = stream.set_nodelay(true);
            Ok(Accepted::Tcp(stream, peer))
        }
        Listener::Unix(unix) => Ok(Accepted::Unix(unix.accept().await?.0)),
    }
}
