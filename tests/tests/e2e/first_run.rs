//! A first run that is safe, and what operators look for: the default
//! listener, health checks, access logs, certificate reloads, and the
//! words the CLI uses.

use std::process::{Command, Stdio};
use std::time::Duration;

use crate::common::*;

/// A child process killed when the test ends, passed or not.
struct KilledOnDrop(std::process::Child);

impl Drop for KilledOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The addresses a server logged as its data listeners.
fn listening_addresses(log: &str) -> Vec<String> {
    log.lines()
        .filter(|line| line.contains("data API listening (TLS)"))
        .filter_map(|line| line.split("address=https://").nth(1))
        .map(|rest| rest.split_whitespace().next().unwrap_or_default().to_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_listen_the_server_serves_this_host_only() {
    let dir = tempfile::tempdir().unwrap();
    let log_path = dir.path().join("server.log");
    let _server = KilledOnDrop(
        Command::new(binary("blockgate-server"))
            .args(["--state-dir", "state", "--image", "demo=./demo.qcow2,size=1M"])
            .current_dir(dir.path())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log_path).unwrap())
            .spawn()
            .unwrap(),
    );
    wait_until("the default listeners are up", async || {
        std::fs::read_to_string(&log_path).is_ok_and(|log| log.contains("data API listening"))
    })
    .await;
    let log = std::fs::read_to_string(&log_path).unwrap();
    let addresses = listening_addresses(&log);
    assert!(
        addresses.iter().all(|address| address == "127.0.0.1:54322" || address == "[::1]:54322"),
        "the default listens beyond this host: {addresses:?}\n{log}"
    );
    // And nothing answers on this machine's other addresses.
    let others = String::from_utf8(Command::new("hostname").arg("-I").output().unwrap().stdout).unwrap();
    for address in others.split_whitespace().filter(|address| !address.starts_with("127.")) {
        let target = if address.contains(':') { format!("[{address}]:54322") } else { format!("{address}:54322") };
        let connected = tokio::time::timeout(Duration::from_secs(2), tokio::net::TcpStream::connect(&target)).await;
        assert!(!matches!(connected, Ok(Ok(_))), "{target} accepted a connection while the server ran on the default listener");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_errors_speak_the_clis_words() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &["disk=./disk.qcow2,size=1M".to_string()]).await;
    let stream = dir.path().join("inc.sparse");
    std::fs::write(&stream, incremental(MIB, "c1", "c2", 0, &[7u8; 4096])).unwrap();
    let cli = |args: &[&str]| Command::new(binary("blockgate")).arg("--cacert").arg(server.ca()).args(args).output().unwrap();
    let refused = cli(&["restore", &server.image_url("disk"), stream.to_str().unwrap(), "--progress", "none"]);
    let said = String::from_utf8_lossy(&refused.stderr);
    assert_eq!(refused.status.code(), Some(1), "{said}");
    assert!(said.contains("use --force") && !said.contains("force=y"), "the server's query parameter, not the CLI's flag: {said}");
    for args in [&["frobnicate"][..], &["restore"], &["download", "--connections", "0", "https://h/images/x", "f"]] {
        let output = cli(args);
        let said = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{args:?}: {said}");
        assert!(said.starts_with("blockgate: error: "), "{args:?}: {said}");
    }
}

#[test]
fn the_servers_help_says_what_serves_images_and_what_the_state_directory_holds() {
    let help = String::from_utf8(Command::new(binary("blockgate-server")).arg("--help").output().unwrap().stdout).unwrap();
    assert!(help.contains("qemu-storage-daemon child") && !help.contains("qemu-nbd child"), "{help}");
    assert!(help.contains("checkpoint and restore") && help.contains("records"), "{help}");
    assert!(help.contains("[default: localhost:54322]"), "{help}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ticket_errors_name_ticket_fields() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.raw");
    std::fs::write(&image, vec![0u8; MIB as usize]).unwrap();
    let socket = dir.path().join("ro.sock");
    let read_only = Command::new("qemu-nbd").args(["-t", "-r", "-f", "raw", "-k"]).arg(&socket).arg(&image).spawn().unwrap();
    let _read_only = QemuNbd { child: serving(read_only, &socket, "qemu-nbd -r"), socket: socket.clone() };
    let (_server, control) = start_with_control(dir.path(), &[]).await;
    let add = |body: serde_json::Value| control.curl(&["-X", "PUT", "-d", &body.to_string(), &control.url("/tickets/t1")]);
    let uri = QemuNbd::uri_of(&socket);
    let ticket = |extra: serde_json::Value| {
        let mut ticket = serde_json::json!({"uuid": "t1", "size": MIB, "url": uri, "ops": ["read", "write"], "timeout": 60});
        ticket.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        ticket
    };
    let (code, said) = add(ticket(serde_json::json!({})));
    assert_eq!(code, 400, "{said}");
    assert!(said.contains(r#""ops": ["read"]"#) && !said.contains(",ro"), "a read-only export's refusal names the ticket field: {said}");
    let (code, said) = add(ticket(serde_json::json!({"ops": ["read"], "dirty": true})));
    assert_eq!(code, 400, "{said}");
    assert!(said.contains("qemu-nbd -B") && !said.contains("qemu-img bitmap"), "an NBD export gets its bitmap from its server: {said}");
    assert!(said.contains(r#""dirty": true"#), "{said}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_answers_end_with_a_newline() {
    let dir = tempfile::tempdir().unwrap();
    let (server, control) = start_with_control(dir.path(), &["--image", "disk=./disk.qcow2,size=1M"]).await;
    let client = server.client();
    for (method, path) in [
        (reqwest::Method::GET, "/info/"),
        (reqwest::Method::OPTIONS, "/images/disk"),
        (reqwest::Method::OPTIONS, "/images/*"),
        (reqwest::Method::GET, "/images/disk/extents"),
        (reqwest::Method::GET, "/images/disk/checkpoints"),
        (reqwest::Method::POST, "/images/disk/checkpoints"),
        (reqwest::Method::GET, "/images/disk/checksum"),
        (reqwest::Method::GET, "/images/disk/checksum/algorithms"),
    ] {
        let response = client.request(method.clone(), server.url(path)).send().await.unwrap();
        assert!(response.status().is_success(), "{method} {path}: {}", response.status());
        let body = response.text().await.unwrap();
        assert!(body.ends_with('\n') && serde_json::from_str::<serde_json::Value>(&body).is_ok(), "{method} {path}: {body:?}");
    }
    let (code, body) = control.curl(&[&control.url("/tickets/disk")]);
    assert_eq!(code, 404, "{body}");
    let image = dir.path().join("other.qcow2");
    create_image(&image, "qcow2", "1M");
    assert_eq!(control.add(&qcow2_ticket("t1", &image, &["read"], MIB)).await, 200);
    let (_, body) = control.curl(&[&control.url("/tickets/t1")]);
    assert!(body.ends_with('\n') && serde_json::from_str::<serde_json::Value>(&body).is_ok(), "ticket status: {body:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_untrusted_certificate_fails_at_once_and_says_to_pass_cacert() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &["disk=./disk.qcow2,size=1M".to_string()]).await;
    for args in [&["info"][..], &["download", "--progress", "none"]] {
        let started = std::time::Instant::now();
        let mut command = Command::new(binary("blockgate"));
        command.args(args).arg(server.image_url("disk"));
        if args[0] == "download" {
            command.arg(dir.path().join("copy.raw"));
        }
        let output = command.output().unwrap();
        let said = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(1), "{said}");
        assert!(said.contains("--cacert") && !said.contains("retrying"), "{said}");
        assert!(started.elapsed() < Duration::from_secs(2), "{args:?} took {:?}: {said}", started.elapsed());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_checkpoints_caps_an_image_and_deleting_the_oldest_makes_room() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::try_start(dir.path(), &["disk=./disk.qcow2,size=1M".to_string()], &["--max-checkpoints", "2"]).await.unwrap();
    let client = server.client();
    let create = async |id: &str| {
        let response = client.post(server.url("/images/disk/checkpoints")).json(&serde_json::json!({"id": id})).send().await.unwrap();
        (response.status().as_u16(), response.text().await.unwrap())
    };
    assert_eq!(create("mon").await.0, 201);
    assert_eq!(create("tue").await.0, 201);
    let (code, said) = create("wed").await;
    assert_eq!(code, 409, "{said}");
    assert!(said.contains("--max-checkpoints") && said.contains("oldest"), "{said}");
    let deleted = client.delete(server.url("/images/disk/checkpoints/mon")).send().await.unwrap();
    assert_eq!(deleted.status(), 204);
    assert_eq!(create("wed").await.0, 201, "rotation: the oldest deleted, a new one fits");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthz_answers_ok_and_503_while_the_server_drains() {
    let dir = tempfile::tempdir().unwrap();
    let (mut server, control) = start_with_control(dir.path(), &["--shutdown-delay", "3"]).await;
    let healthz = async |client: &reqwest::Client| {
        let response = client.get(server.url("/healthz")).send().await.unwrap();
        (response.status().as_u16(), response.text().await.unwrap())
    };
    assert_eq!(healthz(&server.client()).await, (200, "ok\n".to_string()));
    assert_eq!(control.curl(&[&control.url("/healthz")]), (200, "ok\n".to_string()));
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(server.pid() as i32), nix::sys::signal::Signal::SIGTERM).unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    // A new client (a load balancer's probe) while the server drains.
    assert_eq!(healthz(&server.client()).await, (503, "shutting down\n".to_string()));
    assert_eq!(control.curl(&[&control.url("/healthz")]).0, 503);
    assert!(server.stop().success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_lines_name_the_client_and_the_http_version_once() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &["disk=./disk.qcow2,size=1M".to_string()]).await;
    for client in [server.client_builder().http1_only().build().unwrap(), server.client()] {
        assert_eq!(client.get(server.url("/info/")).send().await.unwrap().status(), 200);
    }
    let log = std::fs::read_to_string(dir.path().join(format!("server-{}.log", server.port))).unwrap();
    let lines: Vec<&str> = log.lines().filter(|line| line.contains("route=\"/info/\"") && line.contains("status=200")).collect();
    // The last two: the start-up probe asked for /info/ too.
    assert!(lines.len() >= 2, "{log}");
    for (line, version) in lines[lines.len() - 2..].iter().zip(["HTTP/1.1", "HTTP/2.0"]) {
        assert!(line.contains("client=127.0.0.1:") && line.contains(&format!("version={version}")), "{line}");
        assert_eq!(line.matches("route=").count(), 1, "a field repeated: {line}");
        assert_eq!(line.matches(" id=").count(), 1, "a field repeated: {line}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ticket_guessing_and_failed_handshakes_show_at_warn_with_the_client() {
    let dir = tempfile::tempdir().unwrap();
    let (server, control) = start_with_control(dir.path(), &[]).await;
    let client = server.client();
    for guess in 0..40 {
        let response = client.get(server.image_url(&format!("guess{guess}"))).send().await.unwrap();
        assert_eq!(response.status(), 403);
    }
    for _ in 0..3 {
        let mut plain = tokio::net::TcpStream::connect(("127.0.0.1", server.port)).await.unwrap();
        tokio::io::AsyncWriteExt::write_all(&mut plain, b"GET /images/x HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
        let mut answer = Vec::new();
        let _ = tokio::io::AsyncReadExt::read_to_end(&mut plain, &mut answer).await;
    }
    let log_path = dir.path().join(format!("server-{}.log", server.port));
    // The server logs a failed handshake after it closed the connection.
    wait_until("the three handshake warnings", async || {
        std::fs::read_to_string(&log_path).unwrap_or_default().matches("TLS handshake failed").count() >= 3
    })
    .await;
    let log = std::fs::read_to_string(&log_path).unwrap();
    let refusals: Vec<&str> = log.lines().filter(|line| line.contains("WARN") && line.contains("refused for its ticket")).collect();
    assert_eq!(refusals.len(), 20, "at most 20 a minute: {log}");
    assert!(refusals.iter().all(|line| line.contains("client=127.0.0.1:")), "{refusals:?}");
    assert!(refusals.iter().all(|line| !line.contains("guess")), "ticket ids stay out of the log: {refusals:?}");
    let handshakes: Vec<&str> = log.lines().filter(|line| line.contains("WARN") && line.contains("TLS handshake failed")).collect();
    assert_eq!(handshakes.len(), 3, "{log}");
    assert!(handshakes.iter().all(|line| line.contains("client=127.0.0.1:")), "{handshakes:?}");
    let (_, metrics) = control.curl(&[&control.url("/metrics")]);
    for expected in [
        "blockgate_tls_handshake_failures_total 3",
        "blockgate_build_info{version=",
        "blockgate_process_cpu_seconds",
        "blockgate_process_resident_memory_bytes",
        "blockgate_process_open_fds",
    ] {
        assert!(metrics.contains(expected), "{expected} missing:\n{metrics}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_the_certificate_and_a_bad_one_keeps_the_old() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    let first = signed_pair(dir.path(), "first", "localhost", rcgen::ExtendedKeyUsagePurpose::ServerAuth);
    std::fs::copy(&first.cert, &cert).unwrap();
    std::fs::copy(&first.key, &key).unwrap();
    let mut image = vec![0u8; 8 * MIB as usize];
    image[..4096].fill(7);
    std::fs::write(dir.path().join("disk.raw"), &image).unwrap();
    // Started here, not by Server::start, which waits for a generated CA.
    let tls = ["--tls-cert", cert.to_str().unwrap(), "--tls-key", key.to_str().unwrap()];
    let port = free_port();
    let log_path = dir.path().join("reload.log");
    let _server = KilledOnDrop(
        Command::new(binary("blockgate-server"))
            .args(["--listen", &format!("127.0.0.1:{port}"), "--state-dir", "state", "--image", "disk=./disk.raw"])
            .args(tls)
            .current_dir(dir.path())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log_path).unwrap())
            .spawn()
            .unwrap(),
    );
    let pid = _server.0.id();
    let trusting = |ca: &std::path::Path| {
        let ca = reqwest::Certificate::from_pem(&std::fs::read(ca).unwrap()).unwrap();
        reqwest::Client::builder().use_rustls_tls().tls_built_in_root_certs(false).add_root_certificate(ca).build().unwrap()
    };
    let url = format!("https://localhost:{port}/images/disk");
    let old_client = trusting(&first.ca);
    wait_until("the server answers", async || old_client.get(&url).send().await.is_ok_and(|response| response.status() == 200)).await;
    // A download that runs across the reload keeps its connection.
    let mut running = old_client.get(&url).send().await.unwrap();
    let first_chunk = running.chunk().await.unwrap().unwrap();

    let second = signed_pair(dir.path(), "second", "localhost", rcgen::ExtendedKeyUsagePurpose::ServerAuth);
    std::fs::copy(&second.cert, &cert).unwrap();
    std::fs::copy(&second.key, &key).unwrap();
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), nix::sys::signal::Signal::SIGHUP).unwrap();
    wait_until("the reload", async || std::fs::read_to_string(&log_path).unwrap_or_default().contains("reloaded the TLS certificate"))
        .await;
    let fresh = trusting(&second.ca);
    assert_eq!(fresh.get(&url).send().await.unwrap().status(), 200, "the new certificate serves");
    assert!(trusting(&first.ca).get(&url).send().await.is_err(), "the old certificate is gone for new connections");
    let mut received = first_chunk.len();
    while let Some(chunk) = running.chunk().await.unwrap() {
        received += chunk.len();
    }
    assert_eq!(received, image.len(), "the download begun before the reload completed");

    std::fs::write(&cert, b"not a certificate").unwrap();
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), nix::sys::signal::Signal::SIGHUP).unwrap();
    wait_until("the failed reload", async || std::fs::read_to_string(&log_path).unwrap_or_default().contains("the old one stays in use"))
        .await;
    assert_eq!(fresh.get(&url).send().await.unwrap().status(), 200, "a failed reload keeps the certificate in use");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_healthy_start_logs_no_warning() {
    let dir = tempfile::tempdir().unwrap();
    let images = ["a=./a.qcow2,size=1M".to_string(), "b=./b.raw,size=1M".to_string()];
    let (server, control) = start_with_control(dir.path(), &["--image", &images[0], "--image", &images[1]]).await;
    let image = dir.path().join("c.qcow2");
    create_image(&image, "qcow2", "1M");
    assert_eq!(control.add(&qcow2_ticket("t1", &image, &["read"], MIB)).await, 200);
    assert_eq!(server.client().get(server.image_url("t1")).send().await.unwrap().status(), 200);
    let log = std::fs::read_to_string(dir.path().join(format!("server-{}.log", server.port))).unwrap();
    let warnings: Vec<&str> = log.lines().filter(|line| line.contains(" WARN ") || line.contains(" ERROR ")).collect();
    assert!(warnings.is_empty(), "{warnings:#?}");
}

/// The `{"done","total"}` lines of `--progress json` on stderr.
fn progress_lines(stderr: &[u8]) -> Vec<(u64, u64)> {
    String::from_utf8_lossy(stderr)
        .lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter_map(|line| Some((line.get("done")?.as_u64()?, line.get("total")?.as_u64()?)))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_progress_knows_its_total_from_the_first_line_and_comes_a_few_times_a_second() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("src.raw"), random_bytes(96 * MIB as usize, 11)).unwrap();
    let server = Server::start(dir.path(), &["src=./src.raw".to_string(), "dst=./dst.raw,size=96M".to_string()]).await;
    let stream = dir.path().join("full.sparse");
    let started = std::time::Instant::now();
    let backup = Command::new(binary("blockgate"))
        .arg("--cacert")
        .arg(server.ca())
        .args(["backup", "--progress", "json", &server.image_url("src")])
        .stdout(std::fs::File::create(&stream).unwrap())
        .output()
        .unwrap();
    let seconds = started.elapsed().as_secs_f64();
    assert!(backup.status.success(), "{}", String::from_utf8_lossy(&backup.stderr));
    let data_size = meta(&std::fs::read(&stream).unwrap())["data-size"].as_u64().unwrap();
    let lines = progress_lines(&backup.stderr);
    assert!(!lines.is_empty() && lines.iter().all(|(_, total)| *total == data_size), "every line has the total: {lines:?}");
    assert_eq!(lines.last(), Some(&(data_size, data_size)));
    assert!(lines.len() as f64 <= seconds * 4.0 + 2.0, "{} lines in {seconds:.1} s", lines.len());

    let started = std::time::Instant::now();
    let restore = Command::new("bash")
        .arg("-c")
        .arg(format!(
            "cat {} | {} --cacert {} restore --progress json {}",
            stream.display(),
            binary("blockgate").display(),
            server.ca().display(),
            server.image_url("dst")
        ))
        .output()
        .unwrap();
    let seconds = started.elapsed().as_secs_f64();
    assert!(restore.status.success(), "{}", String::from_utf8_lossy(&restore.stderr));
    let lines = progress_lines(&restore.stderr);
    assert!(!lines.is_empty() && lines.iter().all(|(_, total)| *total == data_size), "a piped restore knows its total: {lines:?}");
    assert_eq!(lines.last(), Some(&(data_size, data_size)));
    assert!(lines.len() as f64 <= seconds * 4.0 + 2.0, "{} lines in {seconds:.1} s", lines.len());
}
