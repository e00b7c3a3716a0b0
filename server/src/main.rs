//! The `blockgate-server` binary: parse the command line, make or load TLS
//! certificates, open every `--image` (starting qemu-nbd children), serve
//! until SIGINT or SIGTERM, then stop the children.

use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Context, Result};
use blockgate_server::backend::Backend;
use blockgate_server::config::Args;
use blockgate_server::routes::{AppState, Limits};
use blockgate_server::tickets::{Ticket, Tickets};
use blockgate_server::{server, tls};
use clap::Parser;
use tokio::net::TcpListener;
use tokio::signal::unix::{signal, SignalKind};

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    let filter = tracing_subscriber::EnvFilter::try_new(&args.log).unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).init();
    let _ = rustls::crypto::ring::default_provider().install_default();
    match run(args).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!("{error:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> Result<()> {
    let (cert, key) = match (&args.tls_cert, &args.tls_key) {
        (Some(cert), Some(key)) => (cert.clone(), key.clone()),
        _ => {
            let files = tls::ensure_self_signed(&args.state_dir())?;
            tracing::info!(ca = %files.ca.display(), "using the generated certificate; clients trust it with --cacert {}", files.ca.display());
            (files.cert, files.key)
        }
    };
    let tls = tls::server_config(&cert, &key)?;
    let listener = TcpListener::bind(args.listen).await.with_context(|| format!("listening on {}", args.listen))?;
    let port = listener.local_addr()?.port();

    let tickets = Arc::new(Tickets::default());
    let opened = open_images(&args, &tickets, port).await;
    if let Err(error) = opened {
        stop_all(&tickets).await;
        return Err(error);
    }
    if args.images.is_empty() {
        tracing::warn!("no --image given: every ticket request will be refused");
    }
    tracing::info!(address = %listener.local_addr()?, "listening (TLS)");
    let state = AppState { tickets: tickets.clone(), limits: Limits::default(), local_socket: None };
    server::serve(state, listener, tls, shutdown_signal()).await;
    stop_all(&tickets).await;
    tracing::info!("stopped");
    Ok(())
}

async fn open_images(args: &Args, tickets: &Tickets, port: u16) -> Result<()> {
    for spec in &args.images {
        let backend = Backend::open(spec, args.nbd_connections).await.with_context(|| format!("opening image {:?}", spec.id))?;
        tracing::info!(id = %spec.id, size = backend.size(), url = %format!("https://localhost:{port}/images/{}", spec.id), "serving image");
        tickets.insert(Ticket { id: spec.id.clone(), writable: !spec.read_only, sparse: spec.sparse, backend: Arc::new(backend) });
    }
    Ok(())
}

async fn stop_all(tickets: &Tickets) {
    for ticket in tickets.drain() {
        ticket.backend.stop().await;
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
