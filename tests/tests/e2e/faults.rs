//! Faults of the NBD side and of the network, as a user with bad luck
//! meets them: the owned qemu-storage-daemon killed (reaped and restarted), every
//! route answering 502 with a status line while the backend is gone, a
//! body cut off with neither a last chunk nor a TLS close_notify, a frozen
//! qemu-storage-daemon (502 after `--nbd-timeout`), a flood of idle TCP connections
//! that must not delay the control socket, bytes after a sparse
//! stream's stop frame, and tickets naming FIFOs (refused at once while
//! the server goes on serving).

use std::process::Command;
use std::time::{Duration, Instant};

use futures::StreamExt;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use reqwest::StatusCode;

use crate::common::*;

async fn get_range(server: &Server, ticket: &str, range: &str) -> reqwest::Response {
    server.client().get(server.image_url(ticket)).header("range", range).send().await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_storage_daemon_is_reaped_and_restarted() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.raw");
    let content = random_bytes(8 * MIB as usize, 51);
    std::fs::write(&image, &content).unwrap();
    let server = Server::start(dir.path(), &[format!("disk={}", image.display())]).await;
    for round in 0..2 {
        let [old] = daemon_pids(&server)[..] else { panic!("one qemu-storage-daemon child") };
        kill(Pid::from_raw(old as i32), Signal::SIGKILL).unwrap();
        wait_until("the dead child is reaped and a new one runs", async || {
            let gone = !std::path::Path::new(&format!("/proc/{old}")).exists();
            gone && daemon_pids(&server).iter().any(|&pid| pid != old)
        })
        .await;
        // Requests that meet the old connection, or the new daemon before
        // its export is back, get 502 (a client retries); then they succeed.
        let mut response = get_range(&server, "disk", "bytes=0-1048575").await;
        for _ in 0..50 {
            if response.status() != StatusCode::BAD_GATEWAY {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
            response = get_range(&server, "disk", "bytes=0-1048575").await;
        }
        assert_eq!(response.status(), StatusCode::PARTIAL_CONTENT, "round {round}");
        assert!(response.bytes().await.unwrap()[..] == content[..MIB as usize]);
        let extents = server.client().get(server.image_url("disk") + "/extents").send().await.unwrap();
        assert_eq!(extents.status(), StatusCode::OK);
    }
}

/// curl's view of one request: status code (0 when no status line came)
/// and body.
fn curl(server: &Server, args: &[&str]) -> (u16, String) {
    curl_status(Command::new("curl").arg("--cacert").arg(server.ca()).args(args))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_nbd_route_answers_502_with_a_status_line_when_the_backend_is_gone() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.raw");
    std::fs::write(&image, random_bytes(4 * MIB as usize, 52)).unwrap();
    let nbd = QemuNbd::start(&image, "raw", &dir.path().join("nbd.sock"));
    let server = Server::start(dir.path(), &[format!("disk={}", nbd.uri())]).await;
    drop(nbd);
    let url = server.image_url("disk");
    let zero = r#"{"op":"zero","size":4096}"#;
    let requests: Vec<Vec<String>> = vec![
        vec![url.clone()],
        vec!["-r".into(), "0-99".into(), url.clone()],
        vec![format!("{url}/extents")],
        vec![format!("{url}/extents?context=zero&start=0&length=4096")],
        vec![format!("{url}/checksum")],
        vec![format!("{url}?format=sparse")],
        vec!["-X".into(), "PUT".into(), "--data-binary".into(), "abcd".into(), url.clone()],
        vec!["-X".into(), "PATCH".into(), "-d".into(), zero.into(), url.clone()],
        vec!["-X".into(), "PATCH".into(), "-d".into(), r#"{"op":"flush"}"#.into(), url.clone()],
    ];
    for args in requests {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        for version in ["--http1.1", "--http2"] {
            let mut all = vec![version];
            all.extend(&args);
            let (code, body) = curl(&server, &all);
            assert_eq!(code, 502, "{args:?} {version}: {body}");
            assert!(body.contains("NBD"), "{args:?}: {body}");
        }
    }
}

/// Reads a response over raw TLS with Python's ssl module, which tells a
/// TLS close_notify from a bare end of the connection; prints how it ended.
const RAW_TLS_READER: &str = r#"
import os, signal, socket, ssl, sys
ca, port, request, kill_after, pid = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
context = ssl.create_default_context(cafile=ca)
tls = context.wrap_socket(socket.create_connection(("127.0.0.1", port)), server_hostname="localhost", suppress_ragged_eofs=False)
tls.sendall(request.encode().decode("unicode_escape").encode())
got, tail, killed = 0, b"", False
try:
    while True:
        data = tls.recv(1 << 16)
        if not data:
            print("close_notify", got, tail.hex())
            break
        got += len(data)
        tail = (tail + data)[-16:]
        if got > kill_after and not killed:
            os.kill(pid, signal.SIGKILL)
            killed = True
except (ssl.SSLEOFError, ConnectionResetError) as error:
    print("cut", got, tail.hex())
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_cut_off_ends_without_last_chunk_or_close_notify() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.raw");
    std::fs::write(&image, random_bytes(256 * MIB as usize, 53)).unwrap();
    for (version, path) in [("1.0", "/images/disk?format=sparse"), ("1.1", "/images/disk?format=sparse"), ("1.0", "/images/disk")] {
        let mut nbd = QemuNbd::start(&image, "raw", &dir.path().join(format!("nbd-{}.sock", nbd_suffix(version, path))));
        let server = Server::start(dir.path(), &[format!("disk={}", nbd.uri())]).await;
        let request = format!("GET {path} HTTP/{version}\\r\\nHost: localhost\\r\\n\\r\\n");
        let output = Command::new("python3")
            .args(["-c", RAW_TLS_READER])
            .arg(server.ca())
            .arg(server.port.to_string())
            .arg(&request)
            .arg((4 * MIB).to_string())
            .arg(nbd.child.id().to_string())
            .output()
            .unwrap();
        let said = String::from_utf8_lossy(&output.stdout).into_owned();
        assert!(said.starts_with("cut "), "HTTP/{version} {path}: {said} {}", String::from_utf8_lossy(&output.stderr));
        assert!(!said.trim_end().ends_with("300d0a0d0a"), "no last chunk: {said}");
        let _ = nbd.child.wait();
    }
}

fn nbd_suffix(version: &str, path: &str) -> String {
    format!("{}-{}", version.replace('.', ""), path.len())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_storage_daemon_costs_a_502_after_the_nbd_timeout_not_a_hang() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.raw");
    let content = random_bytes(4 * MIB as usize, 54);
    std::fs::write(&image, &content).unwrap();
    let server = Server::try_start(dir.path(), &[format!("disk={}", image.display())], &["--nbd-timeout", "2"]).await.unwrap();
    let [child] = daemon_pids(&server)[..] else { panic!("one qemu-storage-daemon child") };
    kill(Pid::from_raw(child as i32), Signal::SIGSTOP).unwrap();
    let started = Instant::now();
    let frozen = tokio::time::timeout(Duration::from_secs(20), get_range(&server, "disk", "bytes=0-1048575")).await.expect("no hang");
    assert_eq!(frozen.status(), StatusCode::BAD_GATEWAY);
    assert!(frozen.text().await.unwrap().contains("no reply within"));
    let waited = started.elapsed();
    assert!(waited >= Duration::from_secs(2) && waited < Duration::from_secs(10), "{waited:?}");
    kill(Pid::from_raw(child as i32), Signal::SIGCONT).unwrap();
    let thawed = get_range(&server, "disk", "bytes=0-1048575").await;
    assert_eq!(thawed.status(), StatusCode::PARTIAL_CONTENT, "a new connection serves the next request");
    assert!(thawed.bytes().await.unwrap()[..] == content[..MIB as usize]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_on_the_tcp_port_does_not_delay_the_control_socket() {
    let dir = tempfile::tempdir().unwrap();
    let (server, control) = start_with_control(dir.path(), &[]).await;
    let flood: Vec<std::net::TcpStream> = (0..520).map(|_| std::net::TcpStream::connect(("127.0.0.1", server.port)).unwrap()).collect();
    tokio::time::sleep(Duration::from_millis(300)).await;
    for _ in 0..5 {
        let started = Instant::now();
        assert_eq!(control.status("none").await.0, StatusCode::NOT_FOUND);
        let took = started.elapsed();
        assert!(took < Duration::from_millis(100), "a control request took {took:?} under the flood");
    }
    drop(flood);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bytes_after_the_stop_frame_are_refused_however_late_they_come() {
    let dir = tempfile::tempdir().unwrap();
    let (source, target) = (dir.path().join("source.raw"), dir.path().join("target.raw"));
    std::fs::write(&source, random_bytes(MIB as usize, 55)).unwrap();
    std::fs::write(&target, vec![0u8; MIB as usize]).unwrap();
    let server = Server::start(dir.path(), &[format!("src={}", source.display()), format!("dst={}", target.display())]).await;
    let stream = server.client().get(server.image_url("src") + "?format=sparse").send().await.unwrap().bytes().await.unwrap();
    let late =
        futures::stream::iter([Ok::<_, std::io::Error>(stream.clone()), Ok(bytes::Bytes::from_static(b"late"))]).then(|chunk| async move {
            if chunk.as_ref().is_ok_and(|bytes| bytes.len() == 4) {
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            chunk
        });
    let response =
        server.client().put(server.image_url("dst") + "?format=sparse").body(reqwest::Body::wrap_stream(late)).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    assert!(response.text().await.unwrap().contains("follow the stop frame"));
    // The same stream alone is applied and verified.
    let whole = server.client().put(server.image_url("dst") + "?format=sparse").body(stream).send().await.unwrap();
    assert_eq!(whole.status(), StatusCode::OK);
    assert_eq!(whole.json::<serde_json::Value>().await.unwrap()["verified"], true);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_storage_daemon_costs_checkpoint_requests_a_502_after_the_nbd_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.qcow2");
    let server = Server::try_start(dir.path(), &[format!("disk={},size=16M", image.display())], &["--nbd-timeout", "2"]).await.unwrap();
    let client = server.client();
    let checkpoints = format!("{}/checkpoints", server.image_url("disk"));
    assert_eq!(client.post(&checkpoints).json(&serde_json::json!({"id": "cp1"})).send().await.unwrap().status(), StatusCode::CREATED);
    let [child] = daemon_pids(&server)[..] else { panic!("one qemu-storage-daemon child") };
    kill(Pid::from_raw(child as i32), Signal::SIGSTOP).unwrap();
    for request in [client.post(&checkpoints).json(&serde_json::json!({"id": "cp2"})), client.get(&checkpoints)] {
        let started = Instant::now();
        let frozen = tokio::time::timeout(Duration::from_secs(20), request.send()).await.expect("no hang").unwrap();
        assert_eq!(frozen.status(), StatusCode::BAD_GATEWAY);
        assert!(frozen.text().await.unwrap().contains("no reply"));
        assert!(started.elapsed() < Duration::from_secs(10), "{:?}", started.elapsed());
    }
    kill(Pid::from_raw(child as i32), Signal::SIGCONT).unwrap();
    // Thawed, the daemon first answers what it still owes: on a loaded
    // machine one more listing may get the 502 before it answers again.
    let started = Instant::now();
    let listed = loop {
        let response = client.get(&checkpoints).send().await.unwrap();
        if response.status() == StatusCode::OK {
            break response.json::<Vec<serde_json::Value>>().await.unwrap();
        }
        assert_eq!(response.status(), StatusCode::BAD_GATEWAY);
        assert!(started.elapsed() < Duration::from_secs(10), "the thawed daemon never answered again");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let ids: Vec<&str> = listed.iter().map(|c| c["id"].as_str().unwrap()).collect();
    assert_eq!(ids, ["cp1"], "the refused checkpoint was not recorded");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifos_are_refused_at_once_and_the_server_goes_on_serving() {
    let dir = tempfile::tempdir().unwrap();
    let (server, control) = start_with_control(dir.path(), &[]).await;
    let mode = nix::sys::stat::Mode::from_bits_truncate(0o600);
    for name in ["a.fifo", "b.fifo"] {
        nix::unistd::mkfifo(&dir.path().join(name), mode).unwrap();
    }
    std::os::unix::fs::symlink(dir.path().join("a.fifo"), dir.path().join("link.raw")).unwrap();
    // Three tickets naming FIFOs at once (more than the server has async
    // workers), answered while the data API and /metrics go on answering.
    let adds: Vec<_> = ["a.fifo", "b.fifo", "link.raw"]
        .into_iter()
        .map(|name| {
            let body = serde_json::json!({"uuid": name, "size": 1, "url": format!("file://{}", dir.path().join(name).display()), "ops": ["read"], "timeout": 60});
            let (socket, url) = (control.socket.clone(), control.url(&format!("/tickets/{name}")));
            std::thread::spawn(move || {
                let mut curl = Command::new("curl");
                curl.args(["-m", "10", "--unix-socket"]).arg(socket).args(["-X", "PUT", "-d", &body.to_string(), &url]);
                curl_status(&mut curl)
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(200)).await;
    for _ in 0..3 {
        let started = Instant::now();
        let info = tokio::time::timeout(Duration::from_secs(2), server.client().get(server.url("/info/")).send()).await;
        assert_eq!(info.expect("/info/ answers").unwrap().status(), StatusCode::OK);
        let (code, metrics) = control.curl(&["-m", "2", &control.url("/metrics")]);
        assert_eq!(code, 200, "{metrics}");
        assert!(started.elapsed() < Duration::from_secs(2), "{:?}", started.elapsed());
    }
    for add in adds {
        let (code, said) = add.join().unwrap();
        assert_eq!(code, 400, "{said}");
        assert!(said.contains("not a regular file or a block device"), "{said}");
    }
    // An --image naming a FIFO stops the start with the reason, at once.
    let other = tempfile::tempdir().unwrap();
    let started = Instant::now();
    let refused = Server::try_start(other.path(), &[format!("fifo={}", dir.path().join("b.fifo").display())], &[]).await.err().unwrap();
    assert!(refused.contains("not a regular file or a block device"), "{refused}");
    assert!(started.elapsed() < Duration::from_secs(10));
}
