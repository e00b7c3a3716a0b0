//! The listeners and their connections: the TLS listeners (HTTP/1.1 or
//! HTTP/2 by ALPN: the data API, and the control API for clients with a
//! certificate) and the plain unix sockets (local data listener, control
//! API), each with its router and its own connection budget
//! ([`crate::http::connections`]), so a flood on one never starves another.
//! Connections idle for the header timeout are closed, and a full budget
//! makes room by closing its idlest connection, so slow or idle clients
//! cannot pin connections; request heads must fit a size limit, so greedy
//! ones cannot pin memory. A response the client takes nothing of for the
//! send timeout is cut off and its ticket slot freed. A connection can be
//! cut off ([`ConnectionCut`]): its socket is reset without a TLS
//! close_notify, so no reader can take a body cut short for a complete
//! one; an HTTP/1 response body that fails is cut off this way. Shutdown
//! stops accepting, lets running requests finish for a grace period, then
//! drops what is left.

pub mod access_log;
pub mod connections;
pub mod health;
pub mod json_line;
pub mod routes;
pub mod tls;
pub mod turns;

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::time::Instant;

use axum::Router;
use axum::body::Body;
use axum::http::{Request, Version};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use parking_lot::Mutex;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use tokio::sync::mpsc;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

use crate::http::connections::{Budget, Busy, Closing, Slot};
use crate::http::turns::{Turn, Turns};
use crate::transfer::ConnectionCut;

/// Time a client has to finish its TLS handshake.
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Time running requests get to finish after shutdown starts.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);
/// Largest request head (HTTP/1 read buffer, HTTP/2 header list).
const MAX_HEADER_BYTES: usize = 64 << 10;
/// HTTP/2 flow-control windows: what a client may send ahead of what the
/// server has taken in. The stream window is also what an upload may hold
/// in the server's memory besides its writes in flight: 4 MiB made eight
/// concurrent HTTP/2 uploads peak at 84 MiB of RSS, 1 MiB at 48 MiB
/// (HTTP/1.1: 32 MiB). 1 MiB a round trip still fills 1 GB/s at 1 ms.
const H2_STREAM_WINDOW: u32 = 1 << 20;
const H2_CONNECTION_WINDOW: u32 = 16 << 20;

/// A bound socket.
pub enum Listener {
    /// TCP with TLS.
    Tls(TcpListener, Arc<rustls::ServerConfig>),
    /// A unix socket, plain HTTP.
    Unix(UnixListener),
    /// TCP without TLS: only for `--metrics-listen`, which serves nothing
    /// but metrics.
    PlainTcp(TcpListener),
}

/// A listener, what it serves, and the connection budget it draws from.
pub struct Endpoint {
    /// The socket.
    pub listener: Listener,
    /// The routes.
    pub router: Router,
    /// Open connections allowed; listeners may share one budget (all the
    /// TCP addresses of `--listen`) or have their own (each unix socket).
    pub budget: Arc<Budget>,
}

/// Limits that hold on every listener.
#[derive(Debug, Clone, Copy)]
pub struct ConnectionLimits {
    /// Time a connection may stay idle (no request running): to finish
    /// its TLS handshake and send its first request head, its next one
    /// after a response, or to open a stream on HTTP/2. A slowloris guard that
    /// also closes idle keep-alive connections.
    pub header_timeout: Duration,
    /// Time a response may wait for the client to take more of it before
    /// it is cut off.
    pub send_timeout: Duration,
}

enum Accepted {
    Tcp(TcpStream, std::net::SocketAddr),
    Unix(UnixStream),
}

/// What every connection task needs, whatever its listener.
#[derive(Clone)]
struct Serving {
    acceptor: Option<TlsAcceptor>,
    router: Router,
    builder: auto::Builder<TokioExecutor>,
    limits: ConnectionLimits,
}

/// Serves every endpoint until `shutdown` completes.
pub async fn serve(endpoints: Vec<Endpoint>, limits: ConnectionLimits, shutdown: impl Future<Output = ()>) {
    let (accepted_tx, mut accepted) = mpsc::channel::<(Accepted, usize, Slot)>(64);
    let stop = CancellationToken::new();
    let builder = http_builder(limits);
    let mut services = Vec::new();
    for (index, endpoint) in endpoints.into_iter().enumerate() {
        let (listener, acceptor) = match endpoint.listener {
            Listener::Tls(tcp, tls) => (Listener::Tls(tcp, tls.clone()), Some(TlsAcceptor::from(tls))),
            plain => (plain, None),
        };
        services.push(Serving { acceptor, router: endpoint.router, builder: builder.clone(), limits });
        tokio::spawn(accept_loop(listener, index, accepted_tx.clone(), endpoint.budget, stop.clone()));
    }
    drop(accepted_tx);
    let graceful = GracefulShutdown::new();
    tokio::pin!(shutdown);
    loop {
        let (connection, index, slot) = tokio::select! {
            next = accepted.recv() => match next {
                Some(next) => next,
                None => break,
            },
            () = &mut shutdown => break,
        };
        let serving = services[index].clone();
        let watcher = graceful.watcher();
        tokio::spawn(async move {
            let activity = slot.activity.clone();
            tokio::select! {
                () = serving.connection(connection, watcher, slot) => {}
                closing = activity.closing(limits.header_timeout) => match closing {
                    Closing::Idle => tracing::debug!("idle connection closed after the header timeout"),
                    Closing::Evicted => tracing::debug!("idle connection closed to make room for a new one"),
                },
            }
        });
    }
    stop.cancel();
    health::begin_shutdown();
    tracing::info!("shutting down: no new connections, waiting for running requests");
    if tokio::time::timeout(SHUTDOWN_GRACE, graceful.shutdown()).await.is_err() {
        tracing::warn!("requests still running after {SHUTDOWN_GRACE:?}; dropping them");
    }
    lingered().await;
}

impl Serving {
    /// Serves one connection (after its TLS handshake) until it ends or
    /// is cut off.
    async fn connection(self, connection: Accepted, watcher: hyper_util::server::graceful::Watcher, slot: Slot) {
        let cut = ConnectionCut::default();
        let peer = Peer(match &connection {
            Accepted::Tcp(_, address) => address.to_string().into(),
            Accepted::Unix(_) => "local".into(),
        });
        let service = hyper::service::service_fn({
            let (cut, router, slot, peer) = (cut.clone(), self.router, Arc::new(slot), peer.clone());
            let send_timeout = self.limits.send_timeout;
            let turns = Arc::new(Turns::default());
            move |request: Request<Incoming>| {
                // HTTP/2 responses of one connection send their data in
                // turns (see `turns`); HTTP/1 has one at a time anyway.
                let turn = (request.version() == Version::HTTP_2).then(|| turns.join());
                let sending = Sending { busy: slot.activity.begin(), cut: cut.clone(), timeout: send_timeout, peer: peer.clone(), turn };
                respond(router.clone(), sending, request)
            }
        });
        let builder = self.builder;
        let serving: Pin<Box<dyn Future<Output = _> + Send>> = match (connection, self.acceptor) {
            (Accepted::Tcp(tcp, peer), Some(acceptor)) => {
                let tcp = CuttableTcp { inner: tcp, cut: cut.clone() };
                let mut tls = match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                    Ok(Ok(tls)) => tls,
                    // Connected and closed before a handshake: a TCP
                    // health check, not a failed client.
                    Ok(Err(error)) if error.kind() == io::ErrorKind::UnexpectedEof => {
                        return tracing::debug!(%peer, "connection closed before a TLS handshake");
                    }
                    Ok(Err(error)) => return handshake_failed(peer, &error.to_string()),
                    Err(_) => return handshake_failed(peer, "timed out"),
                };
                tls.get_mut().1.set_buffer_limit(Some(TLS_BUFFER));
                Box::pin(watcher.watch(builder.serve_connection(TokioIo::new(tls), service).into_owned()))
            }
            (Accepted::Unix(unix), _) => Box::pin(watcher.watch(builder.serve_connection(TokioIo::new(unix), service).into_owned())),
            (Accepted::Tcp(tcp, _), None) => Box::pin(watcher.watch(builder.serve_connection(TokioIo::new(tcp), service).into_owned())),
        };
        tokio::select! {
            result = serving => if let Err(error) = result {
                tracing::debug!(%error, "connection ended with an error");
            },
            () = cut.cut_off() => tracing::info!("connection cut off"),
        }
    }
}

/// The client a request came from, as the logs name it: `IP:PORT`, or
/// `local` on a unix socket. In every request's extensions.
#[derive(Debug, Clone)]
pub struct Peer(pub Arc<str>);

/// Counts and logs (at warn, rate-limited) a failed TLS handshake: a
/// client that does not trust the certificate, a scanner, ticket guessing
/// over plain TCP.
fn handshake_failed(peer: std::net::SocketAddr, reason: &str) {
    crate::metrics::metrics().tls_handshake_failures.inc();
    if let Some(suppressed) = access_log::HANDSHAKE_WARNINGS.admit() {
        tracing::warn!(client = %peer, reason, suppressed, "TLS handshake failed");
    }
}

/// What a response needs on its way out: its connection kept busy, the
/// connection's [`ConnectionCut`], the send timeout, the client, and
/// (HTTP/2) its place in the connection's [`Turns`].
struct Sending {
    busy: Busy,
    cut: ConnectionCut,
    timeout: Duration,
    peer: Peer,
    turn: Option<Turn>,
}

/// Routes one request, with its connection's [`ConnectionCut`] at hand,
/// and sends the response as an [`Outgoing`] body.
async fn respond(router: Router, sending: Sending, mut request: Request<Incoming>) -> Result<axum::response::Response, Infallible> {
    request.extensions_mut().insert(sending.cut.clone());
    request.extensions_mut().insert(sending.peer.clone());
    let http1 = request.version() < Version::HTTP_2;
    let response = router.oneshot(request).await?;
    Ok(response.map(|body| Body::new(Outgoing::new(body, sending, http1))))
}

/// A response body on its way to the client. It keeps its connection busy
/// until it is done. It is cut off when the client takes nothing of it
/// for the send timeout (hyper asks for no next frame): the body is
/// dropped, which frees its ticket slot, and so is its hold on the
/// connection; an HTTP/1 connection is cut off (HTTP/2 resets the stream
/// when it next moves, or the idle connection goes). An HTTP/1 body that
/// fails cuts its connection off too (HTTP/2 resets just the stream,
/// which is explicit already). Over HTTP/2 it sends data only while it
/// holds its connection's turn ([`Turns`]).
struct Outgoing {
    state: Arc<Mutex<OutgoingState>>,
    /// Set for HTTP/1, whose connection goes with a failed or stalled body.
    cut: Option<ConnectionCut>,
    /// Cancelled when the body is dropped, which ends its watchdog.
    done: CancellationToken,
    timeout: Duration,
    watched: bool,
    /// HTTP/2: the turn to hold while sending, given up at the end.
    turn: Option<Turn>,
}

struct OutgoingState {
    /// The body and its hold on the connection; gone once cut off, or
    /// once its last data went to hyper.
    body: Option<(Body, Busy)>,
    /// The last data went to hyper.
    ended: bool,
    /// When the last frame went to hyper, while it has not asked for the
    /// next one.
    handed_out: Option<Instant>,
}

impl Outgoing {
    fn new(body: Body, sending: Sending, http1: bool) -> Outgoing {
        let state = OutgoingState { body: Some((body, sending.busy)), ended: false, handed_out: None };
        let turn = if http1 { None } else { sending.turn };
        Outgoing {
            state: Arc::new(Mutex::new(state)),
            cut: http1.then_some(sending.cut),
            done: CancellationToken::new(),
            timeout: sending.timeout,
            watched: false,
            turn,
        }
    }

    /// Cuts the body off once a frame has waited `timeout` for the client.
    async fn watch(state: Arc<Mutex<OutgoingState>>, timeout: Duration, done: CancellationToken, cut: Option<ConnectionCut>) {
        loop {
            let deadline = state.lock().handed_out.unwrap_or_else(Instant::now) + timeout;
            tokio::select! {
                () = done.cancelled() => return,
                () = tokio::time::sleep_until(deadline) => {}
            }
            let mut locked = state.lock();
            if locked.handed_out.is_some_and(|at| at.elapsed() >= timeout) {
                let stalled = locked.body.take();
                drop(locked);
                drop(stalled);
                tracing::info!("the client took nothing of a response for {timeout:?}; cut off");
                if let Some(cut) = cut {
                    cut.cut();
                }
                return;
            }
        }
    }
}

impl Drop for Outgoing {
    fn drop(&mut self) {
        self.done.cancel();
        // Not left to the watchdog task's Arc: the body holds the ticket
        // slot.
        let body = self.state.lock().body.take();
        drop(body);
    }
}

impl http_body::Body for Outgoing {
    type Data = bytes::Bytes;
    type Error = axum::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        if let Some(turn) = &mut self.turn {
            std::task::ready!(turn.poll_hold(cx));
        }
        let mut state = self.state.lock();
        state.handed_out = None;
        if state.ended {
            return Poll::Ready(None);
        }
        let Some((body, _)) = &mut state.body else {
            return Poll::Ready(Some(Err(axum::Error::new(io::Error::new(io::ErrorKind::TimedOut, "send timeout")))));
        };
        let polled = Pin::new(&mut *body).poll_frame(cx);
        let more = !body.is_end_stream();
        match &polled {
            Poll::Ready(Some(Ok(_))) if more => state.handed_out = Some(Instant::now()),
            Poll::Ready(Some(Err(_))) => {
                if let Some(cut) = &self.cut {
                    cut.cut();
                }
            }
            _ => {}
        }
        // Its last data is out: the body (and with it the ticket's reader
        // slot) goes now, before hyper has even queued those bytes. Left
        // until hyper dropped the response, the slot could still be held
        // when the client had read the end and asked for its next range:
        // QEMU's driver, 8 reads in flight against 8 slots, got 503 and
        // failed the convert in 3 of 50 pulls on a loaded machine.
        let finished_body = match &polled {
            Poll::Ready(Some(Ok(_))) if !more => {
                state.ended = true;
                state.body.take()
            }
            _ => None,
        };
        drop(state);
        drop(finished_body);
        if let Some(turn) = &mut self.turn {
            match &polled {
                Poll::Pending => {}
                Poll::Ready(Some(Ok(frame))) if more => turn.sent(frame.data_ref().map_or(0, |data| data.len() as u64)),
                // The last data is out (or the body failed): the next
                // response may start while hyper still sends this one's
                // last chunk.
                Poll::Ready(_) => turn.release(),
            }
        }
        if matches!(polled, Poll::Ready(Some(Ok(_)))) && more && !self.watched {
            self.watched = true;
            tokio::spawn(Outgoing::watch(self.state.clone(), self.timeout, self.done.clone(), self.cut.clone()));
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        let state = self.state.lock();
        state.ended || state.body.as_ref().is_some_and(|(body, _)| body.is_end_stream())
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.state.lock().body.as_ref().map_or_else(http_body::SizeHint::default, |(body, _)| body.size_hint())
    }
}

/// The TCP socket under TLS. Once its connection is cut it writes nothing
/// more (so no close_notify can follow a cut body) and is reset when
/// dropped instead of closed in order.
struct CuttableTcp {
    inner: TcpStream,
    cut: ConnectionCut,
}

impl CuttableTcp {
    fn refused() -> io::Error {
        io::Error::new(io::ErrorKind::ConnectionAborted, "connection cut off")
    }
}

impl Drop for CuttableTcp {
    fn drop(&mut self) {
        if self.cut.is_cut() {
            // A zero linger resets the socket at once; the deprecation
            // warns of the blocking close a non-zero linger causes.
            #[allow(deprecated)]
            let _ = self.inner.set_linger(Some(Duration::ZERO));
            return;
        }
        linger(&self.inner);
    }
}

/// Time a connection that ended well may take to read what was sent to
/// it before its socket closes.
const LINGER: Duration = Duration::from_secs(2);

/// Connections lingering now, and a wake-up when one is done.
static LINGERING: (std::sync::atomic::AtomicUsize, tokio::sync::Notify) =
    (std::sync::atomic::AtomicUsize::new(0), tokio::sync::Notify::const_new());

/// Closes a connection that ended well the way nginx's lingering close
/// does: the write side first (its last bytes and a FIN), then reading
/// and dropping what the client still sends (an HTTP/2 WINDOW_UPDATE, a
/// GOAWAY) until it closes too, for at most [`LINGER`]. A socket closed
/// with unread input is reset instead, and a reset makes the client's
/// kernel drop the end of the response it had not read yet: a download
/// that completed on the server would fail at the client.
fn linger(tcp: &TcpStream) {
    let Ok(runtime) = tokio::runtime::Handle::try_current() else { return };
    // A second descriptor keeps the socket open once this one closes.
    let Ok(duplicate) = std::os::fd::AsFd::as_fd(tcp).try_clone_to_owned() else { return };
    let std = std::net::TcpStream::from(duplicate);
    if std.set_nonblocking(true).is_err() {
        return;
    }
    let _entered = runtime.enter();
    let Ok(mut socket) = TcpStream::from_std(std) else { return };
    LINGERING.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    runtime.spawn(async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let _ = socket.shutdown().await;
        let mut sink = [0u8; 4096];
        let _ = tokio::time::timeout(LINGER, async { while matches!(socket.read(&mut sink).await, Ok(read) if read > 0) {} }).await;
        drop(socket);
        LINGERING.0.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
        LINGERING.1.notify_waiters();
    });
}

/// Waits (at most [`LINGER`]) for the lingering connections to close.
async fn lingered() {
    let _ = tokio::time::timeout(LINGER, async {
        loop {
            let notified = LINGERING.1.notified();
            if LINGERING.0.load(std::sync::atomic::Ordering::SeqCst) == 0 {
                return;
            }
            notified.await;
        }
    })
    .await;
}

impl AsyncRead for CuttableTcp {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for CuttableTcp {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        if self.cut.is_cut() {
            return Poll::Ready(Err(Self::refused()));
        }
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(mut self: Pin<&mut Self>, cx: &mut Context<'_>, bufs: &[io::IoSlice<'_>]) -> Poll<io::Result<usize>> {
        if self.cut.is_cut() {
            return Poll::Ready(Err(Self::refused()));
        }
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.cut.is_cut() {
            return Poll::Ready(Err(Self::refused()));
        }
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Encrypted bytes a TLS connection may hold before it writes them
/// (rustls's default). A larger limit means fewer `writev` calls, but 512
/// KiB of 16 KiB record buffers, allocated and freed together, made glibc
/// give the top of its heap back to the kernel and fault it in again on
/// every chunk: a TLS download cost 1.0 s of CPU per GiB with 512 KiB and
/// 0.59 s with 64 KiB (HTTP/1.1, medians of 7).
const TLS_BUFFER: usize = 64 << 10;

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

/// Accepts connections and counts them into the endpoint's budget
/// (closing at once those it refuses).
async fn accept_loop(
    listener: Listener,
    index: usize,
    accepted: mpsc::Sender<(Accepted, usize, Slot)>,
    budget: Arc<Budget>,
    stop: CancellationToken,
) {
    loop {
        let connection = tokio::select! {
            connection = accept(&listener) => connection,
            () = stop.cancelled() => return,
        };
        let connection = match connection {
            Ok(connection) => connection,
            Err(error) => {
                // Out of file descriptors and the like: back off, keep serving.
                tracing::warn!(%error, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let address = match &connection {
            Accepted::Tcp(_, peer) => Some(peer.ip()),
            Accepted::Unix(_) => None,
        };
        match budget.admit(address) {
            Ok(slot) => {
                if accepted.send((connection, index, slot)).await.is_err() {
                    return;
                }
            }
            Err(refusal) => tracing::debug!(?address, %refusal, "connection refused"),
        }
    }
}

async fn accept(listener: &Listener) -> std::io::Result<Accepted> {
    match listener {
        Listener::Tls(tcp, _) | Listener::PlainTcp(tcp) => {
            let (stream, peer) = tcp.accept().await?;
            let _ = stream.set_nodelay(true);
            Ok(Accepted::Tcp(stream, peer))
        }
        Listener::Unix(unix) => Ok(Accepted::Unix(unix.accept().await?.0)),
    }
}
