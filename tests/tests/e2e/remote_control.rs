//! The control API from another machine: `--control-listen` serves it
//! over TLS to clients whose certificate chains to `--client-ca`, and to
//! no one else (no certificate, or one of another CA: the handshake fails
//! and nothing is served), while the data listener still asks no client
//! for a certificate. The CLI library's `ControlClient` on that listener
//! and on the control socket. Certificates are made here with rcgen.

use std::path::{Path, PathBuf};

use blockgate_client::{ClientError, ControlArgs, ControlClient, Trust, chain};
use clap::Parser;
use rcgen::ExtendedKeyUsagePurpose;
use reqwest::StatusCode;

use crate::common::*;

/// A client certificate and key, as PEM files.
struct ClientFiles {
    cert: PathBuf,
    key: PathBuf,
}

/// A CA (its certificate in `NAME-ca.pem`) and a client certificate it
/// signed, written to `dir`.
fn client_pki(dir: &Path, name: &str) -> (PathBuf, ClientFiles) {
    let pki = signed_pair(dir, name, &format!("{name}.example"), ExtendedKeyUsagePurpose::ClientAuth);
    (pki.ca, ClientFiles { cert: pki.cert, key: pki.key })
}

/// A server whose control listener admits clients of `client_ca`; its
/// `https://localhost:PORT` address.
async fn start_with_control_listener(dir: &Path, client_ca: &Path) -> (Server, u16, String) {
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let args = ["--control-listen", &listen, "--client-ca", client_ca.to_str().unwrap(), "--allow-dir", dir.to_str().unwrap()];
    let server = Server::try_start(dir, &[], &args).await.unwrap();
    (server, port, format!("https://localhost:{port}"))
}

fn control_client(server: &Server, url: &str, files: &ClientFiles) -> ControlClient {
    ControlClient::over_https(url, &Trust::CaFile(server.ca()), &files.cert, &files.key).unwrap()
}

/// What a TLS client of the control listener at `port` learns when it
/// presents `identity` (or no certificate): the handshake's end on its
/// side, then the server's alert on the first read. Panics if the server
/// sends a byte of HTTP.
async fn refusal(port: u16, server_ca: &Path, identity: Option<&ClientFiles>) -> String {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
    use tokio::io::AsyncReadExt;

    let mut roots = rustls::RootCertStore::empty();
    roots.add(CertificateDer::from_pem_file(server_ca).unwrap()).unwrap();
    let builder = rustls::ClientConfig::builder().with_root_certificates(roots);
    let config = match identity {
        Some(files) => {
            let chain = vec![CertificateDer::from_pem_file(&files.cert).unwrap()];
            builder.with_client_auth_cert(chain, PrivateKeyDer::from_pem_file(&files.key).unwrap()).unwrap()
        }
        None => builder.with_no_client_auth(),
    };
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config));
    // TLS 1.3: the client's side of the handshake ends before the server
    // has checked its certificate; the verdict comes as an alert.
    let mut tls = match connector.connect(ServerName::try_from("localhost").unwrap(), tcp).await {
        Ok(tls) => tls,
        Err(error) => return error.to_string(),
    };
    let mut answer = Vec::new();
    match tokio::time::timeout(std::time::Duration::from_secs(10), tls.read_to_end(&mut answer)).await {
        Ok(Err(error)) => error.to_string(),
        other => panic!("expected a TLS alert, got {other:?}: {:?}", String::from_utf8_lossy(&answer)),
    }
}

/// The error of a request that got no answer: a transport error (never a
/// status), as one line.
fn no_answer(result: Result<impl std::fmt::Debug, ClientError>) -> String {
    match result {
        Err(error @ ClientError::Transport(_)) => chain(&error),
        other => panic!("expected no answer at all, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_certificate_of_the_client_ca_reaches_the_control_api_over_tls() {
    let dir = tempfile::tempdir().unwrap();
    let (ca, client) = client_pki(dir.path(), "good");
    let image = dir.path().join("disk.raw");
    let data = random_bytes(MIB as usize, 61);
    std::fs::write(&image, &data).unwrap();
    let (server, _, url) = start_with_control_listener(dir.path(), &ca).await;
    let control = control_client(&server, &url, &client);

    let metrics = control.get_text("/metrics").await.unwrap();
    assert!(metrics.contains("blockgate_tickets{state=\"active\"} 0"), "{metrics}");
    let added = control.put_json("/tickets/t1", &ticket("t1", &image, &["read"], 300)).await.unwrap();
    assert_eq!(added, serde_json::Value::Null, "PUT answers 200 with no body");
    let status = control.get_json("/tickets/t1").await.unwrap();
    assert_eq!((status["size"].as_u64(), status["ops"].clone()), (Some(MIB), serde_json::json!(["read"])), "{status}");

    // The ticket serves on the data listener, to a client with no certificate.
    let response = server.client().get(server.image_url("t1")).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert!(response.bytes().await.unwrap() == data, "the image's bytes");

    // Errors carry the server's message.
    match control.post_json("/tickets/t1", &serde_json::json!({})).await {
        Err(ClientError::Status { status: StatusCode::METHOD_NOT_ALLOWED, message, .. }) => {
            assert!(message.contains("POST") && message.contains("not allowed"), "{message}")
        }
        other => panic!("POST /tickets/t1: {other:?}"),
    }
    control.delete("/tickets/t1").await.unwrap();
    match control.get_json("/tickets/t1").await {
        Err(ClientError::Status { status: StatusCode::NOT_FOUND, message, .. }) => assert!(message.contains("no such ticket"), "{message}"),
        other => panic!("GET of a deleted ticket: {other:?}"),
    }
    let log = std::fs::read_to_string(dir.path().join(format!("server-{}.log", server.port))).unwrap();
    let listening = url.replace("localhost", "127.0.0.1");
    assert!(log.contains("control API listening (TLS, client certificates)") && log.contains(&listening), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_certificate_of_the_client_ca_the_handshake_fails_and_nothing_is_served() {
    let dir = tempfile::tempdir().unwrap();
    let (ca, good) = client_pki(dir.path(), "good");
    let (_, other) = client_pki(dir.path(), "other");
    let image = dir.path().join("disk.raw");
    std::fs::write(&image, random_bytes(MIB as usize, 62)).unwrap();
    let (server, port, url) = start_with_control_listener(dir.path(), &ca).await;
    control_client(&server, &url, &good).put_json("/tickets/t1", &ticket("t1", &image, &["read"], 300)).await.unwrap();

    // No certificate: the client that the data listener serves gets no
    // answer at all from the control listener.
    let anonymous = server.client();
    let response = anonymous.get(server.image_url("t1")).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::OK, "the data listener asks for no certificate");
    anonymous.get(format!("{url}/tickets/t1")).send().await.expect_err("an answer without a client certificate");
    let said = refusal(port, &server.ca(), None).await;
    assert!(said.contains("received fatal alert: CertificateRequired"), "{said}");

    // A certificate of another CA: no answer either, whatever the request.
    let said = refusal(port, &server.ca(), Some(&other)).await;
    assert!(said.contains("received fatal alert: UnknownCA"), "{said}");
    let stranger = control_client(&server, &url, &other);
    no_answer(stranger.get_json("/tickets/t1").await);
    no_answer(stranger.delete("/tickets/t1").await);
    no_answer(stranger.put_json("/tickets/t2", &ticket("t2", &image, &["read", "write"], 300)).await);

    // Nothing was done for them.
    let control = control_client(&server, &url, &good);
    assert_eq!(control.get_json("/tickets/t1").await.unwrap()["ops"], serde_json::json!(["read"]));
    assert!(matches!(control.get_json("/tickets/t2").await, Err(ClientError::Status { status: StatusCode::NOT_FOUND, .. })));
    let metrics = control.get_text("/metrics").await.unwrap();
    for counted in [r#"route="/tickets/{id}",method="PUT",status="200"} 1"#, r#"route="/tickets/{id}",method="GET",status="200"} 1"#] {
        assert!(metrics.contains(counted), "only the good client's requests were served: {counted}\n{metrics}");
    }
    assert!(!metrics.contains(r#"method="DELETE""#), "{metrics}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_control_listener_refuses_to_start_without_a_client_ca() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port().to_string();
    let error = Server::try_start(dir.path(), &[], &["--control-listen", &format!("127.0.0.1:{port}")]).await.err().unwrap();
    assert!(error.contains("--control-listen needs --client-ca"), "{error}");
    let (ca, client) = client_pki(dir.path(), "good");
    let error = Server::try_start(dir.path(), &[], &["--client-ca", ca.to_str().unwrap()]).await.err().unwrap();
    assert!(error.contains("--client-ca is for the clients of --control-listen"), "{error}");
    let key_as_ca = ["--control-listen", &format!("127.0.0.1:{port}"), "--client-ca", client.key.to_str().unwrap()];
    let error = Server::try_start(dir.path(), &[], &key_as_ca).await.err().unwrap();
    assert!(error.contains("no certificate in") && error.contains("good-key.pem"), "{error}");
}

/// The flags a `blockgate` command flattens in.
#[derive(Parser)]
struct Command {
    #[command(flatten)]
    control: ControlArgs,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_client_works_on_the_control_socket() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.raw");
    std::fs::write(&image, random_bytes(MIB as usize, 63)).unwrap();
    let (_server, socket) = start_with_control(dir.path(), &[]).await;
    let args = Command::try_parse_from(["blockgate", "--control-socket", socket.socket.to_str().unwrap()]).unwrap();
    let control = args.control.client(&Trust::System).unwrap();

    assert!(control.get_text("/metrics").await.unwrap().contains("blockgate_tickets"));
    assert_eq!(control.put_json("/tickets/t1", &ticket("t1", &image, &["read"], 300)).await.unwrap(), serde_json::Value::Null);
    assert_eq!(control.get_json("/tickets/t1").await.unwrap()["size"], MIB);
    let refused = control.put_json("/tickets/t2", &ticket("t1", &image, &["read"], 300)).await.unwrap_err();
    assert!(matches!(&refused, ClientError::Status { status: StatusCode::BAD_REQUEST, .. }), "{refused}");
    assert!(refused.to_string().contains("differs from the path's \"t2\""), "{refused}");
    control.delete("/tickets/t1").await.unwrap();
    assert!(matches!(control.get_json("/tickets/t1").await, Err(ClientError::Status { status: StatusCode::NOT_FOUND, .. })));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_args_name_the_files_that_are_wrong() {
    let dir = tempfile::tempdir().unwrap();
    let (ca, client) = client_pki(dir.path(), "good");
    let words = ["blockgate", "--control", "https://localhost:54323", "--cert"];
    let parse = |cert: &Path, key: &Path| {
        let words = words.iter().copied().chain([cert.to_str().unwrap(), "--key", key.to_str().unwrap()]);
        Command::try_parse_from(words).unwrap().control.client(&Trust::CaFile(ca.clone())).err().map(|error| error.to_string())
    };
    assert_eq!(parse(&client.cert, &client.key), None);
    let said = parse(&client.cert, &client.cert).unwrap();
    assert!(said.contains("good-cert.pem holds no PEM private key"), "{said}");
    let said = parse(&client.key, &client.key).unwrap();
    assert!(said.contains("good-key.pem holds no PEM certificate"), "{said}");
}
