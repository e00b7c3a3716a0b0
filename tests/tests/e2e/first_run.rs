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
