//! Tickets through the control socket, driven with curl and with reqwest:
//! add, status while a transfer runs, extend, expire, delete during a
//! transfer, a stalled download cut off by DELETE, read-only tickets,
//! enforced reader limits, `--ticket` files and the local socket.

use std::process::Command;
use std::time::Duration;

use futures::StreamExt;
use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ticket_lives_grows_is_extended_and_expires() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.raw");
    std::fs::write(&image, random_bytes(64 * MIB as usize, 21)).unwrap();
    let (server, control) = start_with_control(dir.path(), &[]).await;

    // Add with curl, as an orchestrator's shell would.
    let body = ticket("t1", &image, &["read"], 300).to_string();
    let (code, said) = control.curl(&["-X", "PUT", "--data-binary", &body, &control.url("/tickets/t1")]);
    assert_eq!(code, 200, "{said}");
    let (code, said) = control.curl(&[&control.url("/tickets/t1")]);
    assert_eq!(code, 200);
    let status: Value = serde_json::from_str(&said).unwrap();
    assert_eq!(
        (status["transfer_id"].clone(), status["active"].clone(), status["transferred"].clone()),
        (json!("x1"), json!(false), json!(0))
    );
    assert_eq!(daemon_children(&server), 1, "file:// tickets get their own qemu-storage-daemon");
    // Adding it again replaces it (its daemon lets go of the image first).
    assert_eq!(control.add(&ticket("t1", &image, &["read"], 300)).await, StatusCode::OK);
    assert_eq!(daemon_children(&server), 1, "the replaced ticket's daemon is gone");

    // A slow reader: transferred grows while the transfer runs.
    let client = server.client_builder().http1_only().build().unwrap();
    let response = client.get(server.image_url("t1")).send().await.unwrap();
    let mut body = response.bytes_stream();
    let mut seen = Vec::new();
    let mut received = 0;
    while let Some(chunk) = body.next().await {
        received += chunk.unwrap().len() as u64;
        if received > seen.len() as u64 * 16 * MIB {
            let (_, status) = control.status("t1").await;
            assert_eq!(status["active"], true);
            seen.push(status["transferred"].as_u64().unwrap());
        }
    }
    assert_eq!(received, 64 * MIB);
    assert!(seen.windows(2).all(|pair| pair[0] < pair[1]) && seen.len() >= 3, "transferred grows: {seen:?}");
    wait_until("the transfer ends", async || control.status("t1").await.1["active"] == false).await;
    assert_eq!(control.status("t1").await.1["transferred"], 64 * MIB);

    // Extend, then shorten to expiry.
    let before = control.status("t1").await.1["expires"].as_u64().unwrap();
    let (code, _) = control.curl(&["-X", "PATCH", "-d", r#"{"timeout":3000}"#, &control.url("/tickets/t1")]);
    assert_eq!(code, 200);
    let after = control.status("t1").await.1["expires"].as_u64().unwrap();
    assert!(after >= before + 2600, "expires moved from {before} to {after}");
    let (code, said) = control.curl(&["-X", "PATCH", "-d", r#"{"timeout":"soon"}"#, &control.url("/tickets/t1")]);
    assert_eq!(code, 400);
    assert!(said.contains("timeout"), "{said}");
    let (code, _) = control.curl(&["-X", "PATCH", "-d", r#"{"timeout":1}"#, &control.url("/tickets/t1")]);
    assert_eq!(code, 200);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let refused = client.get(server.image_url("t1")).header("range", "bytes=0-0").send().await.unwrap();
    assert_eq!(refused.status(), StatusCode::FORBIDDEN);
    wait_until("the expired ticket is gone", async || control.status("t1").await.0 == StatusCode::NOT_FOUND).await;
    wait_until("its daemon is gone", async || daemon_children(&server) == 0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_a_ticket_stops_its_transfer_and_releases_everything() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.raw");
    std::fs::write(&image, random_bytes(128 * MIB as usize, 22)).unwrap();
    let (server, control) = start_with_control(dir.path(), &[]).await;
    assert_eq!(control.add(&ticket("t2", &image, &["read", "write"], 300)).await, StatusCode::OK);
    let client = server.client_builder().http1_only().build().unwrap();
    let mut body = client.get(server.image_url("t2")).send().await.unwrap().bytes_stream();
    let mut received = body.next().await.unwrap().unwrap().len() as u64;
    let reading = tokio::spawn(async move {
        while let Some(chunk) = body.next().await {
            match chunk {
                Ok(chunk) => received += chunk.len() as u64,
                Err(_) => return Err(received),
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        Ok(received)
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(control.delete("t2").await, StatusCode::NO_CONTENT);
    let outcome = tokio::time::timeout(Duration::from_secs(20), reading).await.unwrap().unwrap();
    assert!(outcome.is_err(), "the transfer was cut off, not completed: {outcome:?}");
    assert_eq!(control.status("t2").await.0, StatusCode::NOT_FOUND);
    assert_eq!(daemon_children(&server), 0, "no daemon left");
    let refused = client.get(server.image_url("t2")).send().await.unwrap();
    assert_eq!(refused.status(), StatusCode::FORBIDDEN);
    assert_eq!(control.delete("t2").await, StatusCode::NO_CONTENT, "DELETE is idempotent");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_cuts_off_a_download_whose_client_stopped_reading() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.raw");
    std::fs::write(&image, random_bytes(64 * MIB as usize, 23)).unwrap();
    let (server, control) = start_with_control(dir.path(), &[]).await;
    for http1 in [true, false] {
        assert_eq!(control.add(&ticket("t3", &image, &["read"], 300)).await, StatusCode::OK);
        // A reader that stops reading: the server's body waits on TCP and
        // is never polled again.
        let builder = server.client_builder();
        let client = if http1 { builder.http1_only() } else { builder.http2_prior_knowledge() }.build().unwrap();
        let mut stalled = client.get(server.image_url("t3")).send().await.unwrap();
        let mut last = u64::MAX;
        wait_until("the download stalls", async || {
            tokio::time::sleep(Duration::from_millis(200)).await;
            let now = control.status("t3").await.1["transferred"].as_u64().unwrap();
            let stalled = now == last && now > 0;
            last = now;
            stalled
        })
        .await;
        let started = std::time::Instant::now();
        let (code, said) = control.curl(&["-X", "DELETE", &control.url("/tickets/t3")]);
        assert_eq!(code, 204, "{said}");
        assert!(started.elapsed() < Duration::from_secs(5), "DELETE took {:?}", started.elapsed());
        assert_eq!(control.status("t3").await.0, StatusCode::NOT_FOUND);
        // What was buffered may still arrive, then the body fails: it never ends as if complete.
        let mut received = 0u64;
        let ended = loop {
            match stalled.chunk().await {
                Ok(Some(chunk)) => received += chunk.len() as u64,
                Ok(None) => break Ok(received),
                Err(error) => break Err(error),
            }
        };
        assert!(ended.is_err(), "the cut download must fail, not end (http1: {http1}, {received} bytes)");
        assert!(received < 64 * MIB);
        wait_until("the daemon is released", async || daemon_children(&server) == 0).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_only_tickets_unknown_ids_and_reader_limits() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.raw");
    let content = random_bytes(32 * MIB as usize, 24);
    std::fs::write(&image, &content).unwrap();
    let (server, control) = start_with_control(dir.path(), &["--max-readers", "2"]).await;
    assert_eq!(control.add(&ticket("ro-ticket", &image, &["read"], 300)).await, StatusCode::OK);
    let client = server.client_builder().http1_only().build().unwrap();
    let url = server.image_url("ro-ticket");
    let put = client.put(&url).body(vec![1u8; 4096]).send().await.unwrap();
    assert_eq!(put.status(), StatusCode::FORBIDDEN);
    let patch = client.patch(&url).body(r#"{"op":"zero","size":4096}"#).send().await.unwrap();
    assert_eq!(patch.status(), StatusCode::FORBIDDEN);
    for id in ["ro-ticker", "ro-ticke", "ro-ticket0", "RO-ticket"] {
        let response = client.get(server.image_url(id)).send().await.unwrap();
        assert_eq!(response.status(), StatusCode::FORBIDDEN, "{id}");
    }
    let options: Value = client.request(reqwest::Method::OPTIONS, &url).send().await.unwrap().json().await.unwrap();
    assert_eq!((options["max_readers"].clone(), options["features"].clone()), (json!(2), json!(["checksum", "extents"])));
    // Two readers hold their slots; a third is turned away, not queued.
    let first = server.client_builder().http1_only().build().unwrap().get(&url).send().await.unwrap();
    let second = server.client_builder().http1_only().build().unwrap().get(&url).send().await.unwrap();
    let third = client.get(&url).header("range", "bytes=0-0").send().await.unwrap();
    assert_eq!(third.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert!(third.text().await.unwrap().contains("max_readers"));
    drop((first, second));
    wait_until("a slot frees", async || {
        client.get(&url).header("range", "bytes=0-0").send().await.unwrap().status() == StatusCode::PARTIAL_CONTENT
    })
    .await;
    assert!(std::fs::read(&image).unwrap() == content, "nothing was written");
    // Bad tickets are refused with the field named.
    let mut bad = ticket("bad", &image, &["read"], 300);
    bad["size"] = json!(1);
    let (code, said) = control.curl(&["-X", "PUT", "--data-binary", &bad.to_string(), &control.url("/tickets/bad")]);
    assert_eq!(code, 400);
    assert!(said.contains("size"), "{said}");
    let (code, said) = control.curl(&["-X", "PUT", "--data-binary", "{\"uuid\":\"bad\"}", &control.url("/tickets/bad")]);
    assert_eq!(code, 400);
    assert!(said.contains("size") || said.contains("ops") || said.contains("url"), "{said}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ticket_files_and_the_local_socket() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.qcow2");
    create_image(&image, "qcow2", "16M");
    let spec = json!({"uuid": "from-file", "size": 16 * MIB, "url": format!("file://{}", image.display()), "ops": ["write"], "timeout": 300, "format": "qcow2"});
    let file = dir.path().join("ticket.json");
    std::fs::write(&file, spec.to_string()).unwrap();
    let local = dir.path().join("local.sock");
    let server = Server::try_start(
        dir.path(),
        &[],
        &["--ticket", file.to_str().unwrap(), "--local-socket", local.to_str().unwrap(), "--allow-dir", dir.path().to_str().unwrap()],
    )
    .await
    .unwrap();
    let mode = std::fs::metadata(&local).unwrap().permissions();
    assert_eq!(std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777, 0o660);
    let options = Command::new("curl")
        .args(["-sS", "-X", "OPTIONS", "--unix-socket"])
        .arg(&local)
        .arg("http://localhost/images/from-file")
        .output()
        .unwrap();
    let options: Value = serde_json::from_slice(&options.stdout).unwrap();
    assert_eq!(options["unix_socket"], local.to_str().unwrap());
    // The CLI uploads over the local socket and reads back over TLS.
    let data = dir.path().join("data.raw");
    std::fs::write(&data, random_bytes(16 * MIB as usize, 25)).unwrap();
    let upload = Command::new(binary("blockgate"))
        .args(["upload", "--unix-socket", local.to_str().unwrap(), data.to_str().unwrap(), &server.image_url("from-file")])
        .output()
        .unwrap();
    assert!(upload.status.success(), "{}", String::from_utf8_lossy(&upload.stderr));
    let back = server.client().get(server.image_url("from-file")).send().await.unwrap().bytes().await.unwrap();
    assert!(back[..] == std::fs::read(&data).unwrap()[..]);
}
