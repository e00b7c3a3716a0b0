//! The `blockgate-server` binary: parse the command line, make or load TLS
//! certificates, open every `--image` and `--ticket` (starting qemu-nbd
//! children), bind the listeners (data, control socket and control over
//! TLS with client certificates, metrics), serve until SIGINT or SIGTERM,
//! then stop the children and remove the sockets.

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use blockgate_nbd::qcow2::LinkPolicy;
use blockgate_nbd::qemu;
use blockgate_protocol::ticket::parse_ticket;
use blockgate_server::config::{self, Args, ImageSource, ImageSpec, LogFormat};
use blockgate_server::control::vms::{self, VmBackups};
use blockgate_server::control::{self, ControlState};
use blockgate_server::http::connections::Budget;
use blockgate_server::http::routes::{self, AppState};
use blockgate_server::http::tls;
use blockgate_server::http::{self, ConnectionLimits, Endpoint, Listener};
use blockgate_server::sources::backend::{Backend, BackendSettings};
use blockgate_server::sources::vm::VmHost;
use blockgate_server::tickets::{Limits, Ticket, Tickets};
use clap::Parser;
use tokio::net::{TcpListener, UnixListener};
use tokio::signal::unix::{SignalKind, signal};

#[tokio::main]
async fn main() -> ExitCode {
    // SIGHUP is handled (a certificate reload) from the first instant: its
    // default action would end a server reloaded while it starts.
    let hangups = signal(SignalKind::hangup());
    // Whatever this process and its qemu children create is private unless
    // made otherwise (the control and local sockets are 0660 by chmod).
    nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o077));
    let arguments = match config::with_config_file(std::env::args_os().collect()) {
        Ok(arguments) => arguments,
        Err(message) => {
            eprintln!("blockgate-server: error: {message}");
            return ExitCode::from(2);
        }
    };
    let args = Args::parse_from(arguments);
    if let Err(message) = args.check() {
        eprintln!("blockgate-server: error: {message}");
        return ExitCode::from(2);
    }
    let filter = tracing_subscriber::EnvFilter::try_new(&args.log).unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Colour only for a person at a terminal, never in a log file.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let logger = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match args.log_format {
        LogFormat::Text => logger.with_ansi(ansi).init(),
        LogFormat::Json => logger.json().with_current_span(true).with_span_list(false).init(),
    }
    let _ = rustls::crypto::ring::default_provider().install_default();
    match run(args, hangups).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!("{error:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args, hangups: std::io::Result<tokio::signal::unix::Signal>) -> Result<()> {
    let (cert, key) = match (&args.tls_cert, &args.tls_key) {
        (Some(cert), Some(key)) => (cert.clone(), key.clone()),
        _ => {
            let files = tls::ensure_self_signed(&args.state_dir())?;
            tracing::info!(ca = %files.ca.display(), "using the generated certificate; clients trust it with --cacert {}", files.ca.display());
            (files.cert, files.key)
        }
    };
    let certificate = tls::Certificate::load(&cert, &key)?;
    tokio::spawn(reload_on_sighup(certificate.clone(), hangups));
    let tls = tls::server_config(certificate.clone())?;
    let tcp_listeners = bind_all("--listen", &args.listen).await?;
    let mut control_listeners = Vec::new();
    if let (Some(listen), Some(client_ca)) = (&args.control_listen, &args.client_ca) {
        let control_tls = tls::client_certificate_config(certificate.clone(), client_ca)?;
        for (tcp, address) in bind_all("--control-listen", listen).await? {
            control_listeners.push((Listener::Tls(tcp, control_tls.clone()), address));
        }
    }
    let mut metrics_listeners = Vec::new();
    if let Some(listen) = &args.metrics_listen {
        metrics_listeners = bind_all("--metrics-listen", listen).await?;
    }
    let port = tcp_listeners[0].1.port();
    let limits = Limits { max_readers: args.max_readers, max_writers: args.max_writers };
    let allow_dirs = Arc::new(allowed_directories(&args.allow_dirs)?);
    let backend = BackendSettings {
        connections: args.nbd_connections,
        request_timeout: Duration::from_secs(args.nbd_timeout),
        state_dir: args.state_dir().into(),
        allowed_links: allowed_links(&allow_dirs, &args.images),
        max_checkpoints: args.max_checkpoints as usize,
    };

    let tickets = Arc::new(Tickets::new(Duration::from_secs(args.cancel_timeout)));
    if let Err(error) = open_tickets(&args, &tickets, limits, &backend, &allow_dirs, port).await {
        stop_all(&tickets).await;
        return Err(error);
    }
    if args.images.is_empty() && args.tickets.is_empty() && args.control_socket.is_none() && args.control_listen.is_none() {
        tracing::warn!("no --image, --ticket, --control-socket or --control-listen: every ticket request will be refused");
    }
    let state = AppState {
        tickets: tickets.clone(),
        limits,
        local_socket: args
            .local_socket
            .as_ref()
            .map(|path| std::path::absolute(path).unwrap_or_else(|_| path.clone()).display().to_string()),
        body_timeout: Duration::from_secs(args.body_timeout),
    };
    // Each listener has its own connection budget (the TCP addresses of
    // --listen share one): a flood of remote clients never delays the
    // orchestrator on the control socket, nor local software.
    let remote_budget = Budget::new(args.max_connections as usize, Some(args.max_connections_per_address as usize));
    let mut endpoints = Vec::new();
    for (listener, address) in tcp_listeners {
        endpoints.push(Endpoint {
            listener: Listener::Tls(listener, tls.clone()),
            router: routes::router(state.clone()),
            budget: remote_budget.clone(),
        });
        tracing::info!(address = %format!("https://{address}"), "data API listening (TLS)");
    }
    if let Some(path) = &args.local_socket {
        let budget = Budget::new(args.max_connections as usize, None);
        endpoints.push(Endpoint { listener: Listener::Unix(bind_unix(path)?), router: routes::router(state.clone()), budget });
        tracing::info!(socket = %path.display(), "data API listening (local, no TLS)");
    }
    let vm_backups = Arc::new(vm_backups(&args, port).await);
    let control = ControlState { tickets: tickets.clone(), limits, backend, allow_dirs: allow_dirs.clone(), vms: vm_backups.clone() };
    if let Some(path) = &args.control_socket {
        let budget = Budget::new(CONTROL_CONNECTIONS, None);
        endpoints.push(Endpoint { listener: Listener::Unix(bind_unix(path)?), router: control::router(control.clone()), budget });
        tracing::info!(socket = %path.display(), "control API listening");
    }
    // A budget apart from the control socket's and the data listener's,
    // shared by the addresses of --control-listen. Anyone may open a
    // connection (the certificate comes in the handshake), so one address
    // has a cap: its connections close its own idle ones, not others'.
    let control_budget = Budget::new(CONTROL_CONNECTIONS, Some(CONTROL_CONNECTIONS_PER_ADDRESS));
    for (listener, address) in control_listeners {
        endpoints.push(Endpoint { listener, router: control::router(control.clone()), budget: control_budget.clone() });
        tracing::info!(address = %format!("https://{address}"), "control API listening (TLS, client certificates)");
    }
    for (listener, address) in metrics_listeners {
        let budget = Budget::new(CONTROL_CONNECTIONS, None);
        endpoints.push(Endpoint { listener: Listener::PlainTcp(listener), router: control::metrics_router(tickets.clone()), budget });
        tracing::info!(address = %format!("http://{address}/metrics"), "metrics listening");
    }
    let reaper = tokio::spawn(reap_expired(tickets.clone()));
    let vm_watcher = tokio::spawn(vms::watch(vm_backups.clone(), tickets.clone()));
    let connection_limits =
        ConnectionLimits { header_timeout: Duration::from_secs(args.header_timeout), send_timeout: Duration::from_secs(args.send_timeout) };
    let shutdown_delay = Duration::from_secs(args.shutdown_delay);
    let shutdown = async move {
        shutdown_signal().await;
        http::health::begin_shutdown();
        if !shutdown_delay.is_zero() {
            tracing::info!("draining: /healthz answers 503 for {shutdown_delay:?} before the listeners close (a second signal ends it)");
            tokio::select! {
                () = tokio::time::sleep(shutdown_delay) => {}
                () = shutdown_signal() => {}
            }
        }
    };
    http::serve(endpoints, connection_limits, shutdown).await;
    reaper.abort();
    vm_watcher.abort();
    vm_backups.end_all(&tickets).await;
    stop_all(&tickets).await;
    for path in [&args.local_socket, &args.control_socket].into_iter().flatten() {
        let _ = std::fs::remove_file(path);
    }
    tracing::info!("stopped");
    Ok(())
}

/// VM backups through `--libvirt`, after ending the jobs an earlier run
/// left; or off, saying how to turn them on.
async fn vm_backups(args: &Args, port: u16) -> VmBackups {
    let host = match &args.libvirt {
        Some(uri) => Ok(VmHost::new(uri.clone(), args.vm_scratch_dir.clone().unwrap_or_else(|| args.state_dir().join("vm-backups")))),
        None => Err("VM backups are off: start the server with --libvirt [URI]".to_string()),
    };
    let backups = VmBackups::new(host, data_url(&args.listen, port));
    if let Some(uri) = &args.libvirt {
        backups.end_leftovers().await;
        tracing::info!(libvirt = %uri, "backing up running VMs through libvirt");
    }
    backups
}

/// `https://HOST:PORT` of the data API as clients reach it: the `--listen`
/// host, or this machine's name when it listens on every address.
fn data_url(listen: &str, port: u16) -> String {
    let host = listen.rsplit_once(':').map_or(listen, |(host, _)| host);
    let host = match host.trim_start_matches('[').trim_end_matches(']') {
        "" | "::" | "0.0.0.0" => hostname::get().ok().and_then(|name| name.into_string().ok()).unwrap_or_else(|| "localhost".into()),
        _ => host.to_string(),
    };
    format!("https://{host}:{port}")
}

/// Binds a unix socket with mode 0660, replacing a stale socket file.
fn bind_unix(path: &Path) -> Result<UnixListener> {
    if std::fs::symlink_metadata(path).is_ok_and(|meta| std::os::unix::fs::FileTypeExt::is_socket(&meta.file_type())) {
        std::fs::remove_file(path).with_context(|| format!("removing the stale socket {}", path.display()))?;
    }
    let listener = UnixListener::bind(path).with_context(|| format!("binding {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660)).with_context(|| format!("chmod {}", path.display()))?;
    Ok(listener)
}

/// Connections the control socket (and, apart, the control listener)
/// serves at once: an orchestrator needs a few, and they must never queue
/// behind data clients.
const CONTROL_CONNECTIONS: usize = 64;
/// Connections of one client address on the control listener.
const CONTROL_CONNECTIONS_PER_ADDRESS: usize = 16;

/// Every address `HOST:PORT` names: an IP literal, or a host name.
async fn resolve_listen(flag: &str, listen: &str) -> Result<Vec<SocketAddr>> {
    let mut addresses: Vec<SocketAddr> = tokio::net::lookup_host(listen)
        .await
        .with_context(|| format!("{flag} {listen:?}: expected HOST:PORT, such as [::]:54322, 127.0.0.1:54322 or localhost:54322"))?
        .collect();
    addresses.dedup();
    if addresses.is_empty() {
        anyhow::bail!("{flag} {listen:?}: the name resolves to no address");
    }
    Ok(addresses)
}

/// Binds every address `listen` names, each listener with the address it
/// really has. With port 0, every address gets the port the first one
/// got. An address this host does not have (`::1` where IPv6 is off, for
/// `localhost`) is skipped with a warning while another one binds.
async fn bind_all(flag: &str, listen: &str) -> Result<Vec<(TcpListener, SocketAddr)>> {
    let mut bound: Vec<(TcpListener, SocketAddr)> = Vec::new();
    let mut missing = Vec::new();
    for mut address in resolve_listen(flag, listen).await? {
        if let (0, Some((_, first))) = (address.port(), bound.first()) {
            address.set_port(first.port());
        }
        match TcpListener::bind(address).await {
            Ok(listener) => {
                let local = listener.local_addr()?;
                bound.push((listener, local));
            }
            Err(error) if error.kind() == std::io::ErrorKind::AddrNotAvailable => missing.push((address, error)),
            Err(error) => return Err(error).with_context(|| format!("{flag} {address}")),
        }
    }
    if bound.is_empty() {
        let (address, error) = missing.into_iter().next().expect("resolve_listen returns an address");
        return Err(error).with_context(|| format!("{flag} {address}"));
    }
    for (address, error) in missing {
        tracing::warn!("{flag} {listen}: not listening on {address}, which this host does not have ({error})");
    }
    Ok(bound)
}

/// The `--allow-dir` directories, resolved once so that a ticket's path is
/// compared with what they really are.
fn allowed_directories(dirs: &[PathBuf]) -> Result<Vec<PathBuf>> {
    dirs.iter()
        .map(|dir| {
            let real = std::fs::canonicalize(dir).with_context(|| format!("--allow-dir {}", dir.display()))?;
            anyhow::ensure!(real.is_dir(), "--allow-dir {} is not a directory", dir.display());
            Ok(real)
        })
        .collect()
}

/// Where the backing and data files of qcow2 images may lie: the trees of
/// the allowed directories, and the directories of `--image` files (where
/// the file really is, when its path is a symlink).
fn allowed_links(allow_dirs: &[PathBuf], images: &[ImageSpec]) -> Arc<LinkPolicy> {
    let directories = images
        .iter()
        .filter_map(|spec| match &spec.source {
            ImageSource::File(path) => {
                let real = std::fs::canonicalize(path).ok().or_else(|| std::path::absolute(path).ok())?;
                std::fs::canonicalize(real.parent()?).ok()
            }
            ImageSource::Nbd(_) => None,
        })
        .collect();
    let rule = "links are followed inside --allow-dir trees and directly in the directories of --image files, never to a hidden file";
    Arc::new(LinkPolicy { trees: allow_dirs.to_vec(), directories, anywhere: false, rule })
}

async fn open_tickets(
    args: &Args,
    tickets: &Tickets,
    limits: Limits,
    backend: &BackendSettings,
    allow_dirs: &[PathBuf],
    port: u16,
) -> Result<()> {
    for spec in &args.images {
        if let ImageSource::File(path) = &spec.source {
            if spec.create_size.is_none() && !path.exists() {
                anyhow::bail!("image {:?}: {} does not exist (add ,size=SIZE to create it)", spec.id, path.display());
            }
            if path.exists() {
                qemu::open_image_file(path).with_context(|| format!("image {:?}", spec.id))?;
            }
        }
        let backend = Backend::open(spec, backend.clone()).await.with_context(|| format!("opening image {:?}", spec.id))?;
        tracing::info!(id = %spec.id, size = backend.size(), url = %format!("https://localhost:{port}/images/{}", spec.id), "serving image");
        tickets.insert(Ticket::permanent(spec.id.clone(), Arc::new(backend), !spec.read_only, spec.sparse, limits));
    }
    for file in &args.tickets {
        let body = std::fs::read(file).with_context(|| format!("reading {}", file.display()))?;
        let spec = parse_ticket(&body).with_context(|| format!("ticket {}", file.display()))?;
        let ticket =
            control::open_ticket(spec, limits, backend.clone(), allow_dirs).await.with_context(|| format!("ticket {}", file.display()))?;
        tracing::info!(ticket = %ticket.fingerprint, file = %file.display(), "serving ticket");
        tickets.insert(ticket);
    }
    Ok(())
}

async fn reap_expired(tickets: Arc<Tickets>) {
    let mut every_second = tokio::time::interval(Duration::from_secs(1));
    loop {
        every_second.tick().await;
        tickets.reap_expired().await;
    }
}

async fn stop_all(tickets: &Tickets) {
    for ticket in tickets.drain() {
        ticket.backend.stop().await;
    }
}

/// Reads the TLS certificate and key again at every SIGHUP (certificate
/// rotation without dropping transfers); a failed reload keeps the ones
/// in use and says why.
async fn reload_on_sighup(certificate: Arc<tls::Certificate>, hangups: std::io::Result<tokio::signal::unix::Signal>) {
    let Ok(mut hangups) = hangups else {
        return tracing::warn!("no SIGHUP handler: the TLS certificate cannot be reloaded");
    };
    while hangups.recv().await.is_some() {
        match certificate.reload() {
            Ok(()) => tracing::info!("SIGHUP: reloaded the TLS certificate and key"),
            Err(error) => tracing::warn!("SIGHUP: reloading the TLS certificate failed, the old one stays in use: {error:#}"),
        }
    }
}

async fn shutdown_signal() {
    let mut terminate = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let mut interrupt = signal(SignalKind::interrupt()).expect("SIGINT handler");
    tokio::select! {
        _ = terminate.recv() => tracing::info!("SIGTERM received"),
        _ = interrupt.recv() => tracing::info!("SIGINT received"),
    }
}
