//! The server's life and its backends' deaths: a qemu-nbd that dies
//! mid-download must abort the body (never a clean short end), SIGTERM
//! stops the server and its qemu-storage-daemon children, and bad startup arguments
//! fail at once with a clear message.

use std::time::Duration;

use futures::StreamExt;

use crate::common::*;

async fn download_while_qemu_nbd_dies(http1: bool) {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.raw");
    std::fs::write(&image, random_bytes(64 * MIB as usize, 3)).unwrap();
    let mut nbd = QemuNbd::start(&image, "raw", &dir.path().join("nbd.sock"));
    let server = Server::start(dir.path(), &[format!("disk={}", nbd.uri())]).await;
    let builder = server.client_builder();
    let client = if http1 { builder.http1_only() } else { builder }.build().unwrap();
    let response = client.get(server.image_url("disk")).send().await.unwrap();
    assert_eq!(response.status(), reqwest::StatusCode::OK);
    let mut body = response.bytes_stream();
    let mut received = 0u64;
    let mut killed = false;
    let outcome = loop {
        match tokio::time::timeout(Duration::from_secs(20), body.next()).await.expect("body stalled") {
            Some(Ok(chunk)) => {
                received += chunk.len() as u64;
                if !killed && received >= MIB {
                    nbd.child.kill().unwrap();
                    nbd.child.wait().unwrap();
                    killed = true;
                }
            }
            Some(Err(error)) => break Err(error),
            None => break Ok(()),
        }
    };
    assert!(outcome.is_err(), "the body ended cleanly after {received} of {} bytes", 64 * MIB);
    assert!(received < 64 * MIB);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dying_backend_aborts_an_http1_download() {
    download_while_qemu_nbd_dies(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dying_backend_resets_an_http2_download() {
    download_while_qemu_nbd_dies(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_backend_serves_the_next_request() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.raw");
    let content = random_bytes(4 * MIB as usize, 4);
    std::fs::write(&image, &content).unwrap();
    let socket = dir.path().join("nbd.sock");
    let nbd = QemuNbd::start(&image, "raw", &socket);
    let server = Server::start(dir.path(), &[format!("disk={}", nbd.uri())]).await;
    let client = server.client();
    drop(nbd);
    let failed = client.get(server.image_url("disk")).header("range", "bytes=0-99").send().await.unwrap();
    assert_eq!(failed.status(), reqwest::StatusCode::BAD_GATEWAY);
    assert!(failed.text().await.unwrap().contains("NBD"));
    // Writes fail loudly too, never a 200 for data that did not land.
    let put = client.put(server.image_url("disk")).body(random_bytes(3 * MIB as usize, 5)).send().await.unwrap();
    assert_eq!(put.status(), reqwest::StatusCode::BAD_GATEWAY);
    let zero = client.patch(server.image_url("disk")).body(r#"{"op":"zero","size":4096,"flush":true}"#).send().await.unwrap();
    assert_eq!(zero.status(), reqwest::StatusCode::BAD_GATEWAY);
    assert!(std::fs::read(&image).unwrap() == content, "nothing was written while the backend was gone");
    let _nbd = QemuNbd::start(&image, "raw", &socket);
    let again = client.get(server.image_url("disk")).send().await.unwrap();
    assert_eq!(again.status(), reqwest::StatusCode::OK);
    assert!(again.bytes().await.unwrap()[..] == content[..]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_stops_the_server_and_its_daemon_children() {
    let dir = tempfile::tempdir().unwrap();
    let specs = [format!("a={}/a.qcow2,size=8M", dir.path().display()), format!("b={}/b.raw,size=8M,ro", dir.path().display())];
    let mut server = Server::start(dir.path(), &specs).await;
    let children = children(server.pid());
    assert_eq!(children.len(), 2, "one qemu-storage-daemon per image: {children:?}");
    for child in &children {
        let command = std::fs::read_to_string(format!("/proc/{child}/cmdline")).unwrap();
        assert!(command.starts_with("qemu-storage-daemon"), "{command}");
    }
    // An open download must not keep the server alive past its grace.
    let client = server.client();
    let response = client.get(server.image_url("a")).send().await.unwrap();
    let status = tokio::task::spawn_blocking(move || server.stop()).await.unwrap();
    drop(response);
    assert!(status.success(), "exit status {status}");
    for child in children {
        assert!(!std::path::Path::new(&format!("/proc/{child}")).exists(), "qemu-storage-daemon {child} outlived the server");
    }
    // The qcow2 image was closed cleanly: qemu-img check finds no leak.
    run("qemu-img", &["check", dir.path().join("a.qcow2").to_str().unwrap()]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_startup_arguments_fail_at_once_and_say_why() {
    let dir = tempfile::tempdir().unwrap();
    let qcow2 = dir.path().join("disk.qcow2");
    create_image(&qcow2, "qcow2", "8M");
    let cases = [
        (format!("x={}/missing.raw", dir.path().display()), "does not exist"),
        (format!("x={},bitmap=nope", qcow2.display()), "nope"),
        ("x=nbd+unix:///?socket=/nonexistent/nbd.sock".to_string(), "connecting"),
        (format!("x={},colour=red", qcow2.display()), "unknown image option"),
    ];
    for (spec, says) in cases {
        let error = Server::try_start(dir.path(), std::slice::from_ref(&spec), &[]).await.err().unwrap_or_else(|| panic!("{spec} started"));
        assert!(error.contains(says), "{spec}: {error}");
    }
}
