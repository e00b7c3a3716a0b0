//! Second hostile review (claims outliving requests, links, interrupted
//! incrementals): each test is an attack; a failing test is a defect.
//!
//! Each test began as an attack during review; where its doc comment
//! describes a defect, that defect was fixed and the test asserts the
//! fixed behaviour (its name says which).

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use reqwest::StatusCode;
use serde_json::json;

use crate::common::*;

/// Feeds a request body by hand.
type BodySender = tokio::sync::mpsc::Sender<Result<Vec<u8>, std::io::Error>>;

/// A request body fed by hand: the sender and the spawned request.
fn streamed_put(server: &Server, url: String) -> (BodySender, tokio::task::JoinHandle<reqwest::Result<reqwest::Response>>) {
    let (sender, mut receiver) = tokio::sync::mpsc::channel::<Result<Vec<u8>, std::io::Error>>(4);
    let body_stream = futures::stream::poll_fn(move |context| receiver.poll_recv(context));
    let request = server.client().put(url).body(reqwest::Body::wrap_stream(body_stream)).send();
    (sender, tokio::spawn(request))
}

/// Claims are keyed by device and inode now, but the chain record is still
/// keyed by the path: a raw write through a hard link clears the record of
/// the link it went through, not that of the other name. An incremental
/// continuing from the checkpoint is then admitted onto an image that
/// changed outside its chain, and recorded as the next checkpoint.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attack2_a_write_through_a_hard_link_clears_the_chain_record_of_every_name() {
    let dir = tempfile::tempdir().unwrap();
    let root = std::fs::canonicalize(dir.path()).unwrap();
    let size = 16 * MIB;
    let image = root.join("disk.raw");
    std::fs::write(&image, vec![0u8; size as usize]).unwrap();
    let link = root.join("link.raw");
    std::fs::hard_link(&image, &link).unwrap();
    let (server, control) = start_with_control(&root, &[]).await;
    assert_eq!(control.add(&ticket("a", &image, &["read", "write"], 300)).await, StatusCode::OK);
    let b = control.add(&ticket("b", &link, &["read", "write"], 300)).await;
    if b != StatusCode::OK {
        eprintln!("second ticket through a hard link: {b}; nothing to attack");
        return;
    }
    let base = random_bytes(MIB as usize, 1);
    let (status, text) =
        sparse_put_to(&server, "a", "", stream(json!({"virtual-size": size, "data-size": MIB, "checkpoint": "c1"}), &base, size)).await;
    assert_eq!(status, StatusCode::OK, "{text}");
    // The target changes outside its chain, through the other name.
    let (status, text) = raw_put_to(&server, "b", 0, &[0xeeu8; 4096]).await;
    assert_eq!(status, StatusCode::OK, "{text}");
    let (status, text) = sparse_put_to(&server, "a", "", incremental(size, "c1", "c2", 4 * MIB, &[7u8; 4096])).await;
    assert_eq!(
        status,
        StatusCode::CONFLICT,
        "an incremental from c1 after a raw write through a hard link of the target was admitted: {status} {text}"
    );
}

/// One NBD export reached through two tickets whose URIs name the same
/// socket with different spellings (`/dir/./s.sock`): the claim key is the
/// URI as written, so a write runs through one ticket while a restore runs
/// through the other, and the other's chain record survives the write.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attack2_one_nbd_export_under_two_spellings_shares_claim_and_record() {
    let dir = tempfile::tempdir().unwrap();
    let root = std::fs::canonicalize(dir.path()).unwrap();
    let size = 16 * MIB;
    let image = root.join("export.raw");
    std::fs::write(&image, vec![0u8; size as usize]).unwrap();
    let socket = root.join("nbd.sock");
    let _nbd = QemuNbd::start(&image, "raw", &socket);
    let (server, control) = start_with_control(&root, &[]).await;
    let nbd_ticket = |id: &str, url: String| json!({"uuid": id, "size": size, "url": url, "ops": ["read", "write"], "timeout": 300, "transfer_id": "x1"});
    let plain = format!("nbd+unix:///?socket={}", socket.display());
    let spelled = format!("nbd+unix:///?socket={}/./nbd.sock", root.display());
    let a = control.add(&nbd_ticket("a", plain)).await;
    let b = control.add(&nbd_ticket("b", spelled)).await;
    assert_eq!(a, StatusCode::OK);
    if b != StatusCode::OK {
        eprintln!("second ticket with another spelling: {b}; nothing to attack");
        return;
    }
    let mut findings = Vec::new();
    // Claim: a write through b while a restore runs through a.
    let data = vec![1u8; 4096];
    let body = stream(json!({"virtual-size": size, "data-size": 4096, "checkpoint": "c1"}), &data, size);
    let (sender, response) = streamed_put(&server, server.image_url("a") + "?format=sparse");
    sender.send(Ok(body[..100].to_vec())).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (during, _) = raw_put_to(&server, "b", 0, &[9u8]).await;
    if during != StatusCode::CONFLICT {
        findings.push(format!("a write through b while a restore runs through a: {during}"));
    }
    sender.send(Ok(body[100..].to_vec())).await.unwrap();
    drop(sender);
    let restored = response.await.unwrap().unwrap();
    let restored = (restored.status(), restored.text().await.unwrap());
    // Record: a raw write through b must clear a's chain record.
    if restored.0 == StatusCode::OK {
        let (status, text) = raw_put_to(&server, "b", 8 * MIB, &[0xeeu8; 4096]).await;
        assert_eq!(status, StatusCode::OK, "{text}");
        let (status, text) = sparse_put_to(&server, "a", "", incremental(size, "c1", "c2", 4 * MIB, &[7u8; 4096])).await;
        if status != StatusCode::CONFLICT {
            findings.push(format!("an incremental from c1 through a after a raw write through b: {status} {text}"));
        }
    } else {
        findings.push(format!("the restore through a ended {restored:?}"));
    }
    assert!(findings.is_empty(), "{}", findings.join("\n"));
}

/// An admitted incremental whose ticket is deleted while it runs: the
/// handler future is dropped (`cancelable`), so `restore` never gets to
/// record `interrupted`, and the record was cleared at admission. The
/// README's promise ("applying the same incremental again completes it")
/// does not hold: the same incremental through a new ticket is 409.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attack2_an_incremental_cut_by_ticket_deletion_can_be_run_again() {
    let dir = tempfile::tempdir().unwrap();
    let root = std::fs::canonicalize(dir.path()).unwrap();
    let size = 16 * MIB;
    let image = root.join("disk.raw");
    std::fs::write(&image, vec![0u8; size as usize]).unwrap();
    let (server, control) = start_with_control(&root, &["--cancel-timeout", "2"]).await;
    assert_eq!(control.add(&ticket("a", &image, &["read", "write"], 300)).await, StatusCode::OK);
    let base = random_bytes(MIB as usize, 2);
    let (status, text) =
        sparse_put_to(&server, "a", "", stream(json!({"virtual-size": size, "data-size": MIB, "checkpoint": "c1"}), &base, size)).await;
    assert_eq!(status, StatusCode::OK, "{text}");
    let one = random_bytes(MIB as usize, 3);
    let whole = incremental(size, "c1", "c2", 4 * MIB, &one);
    let (sender, response) = streamed_put(&server, server.image_url("a") + "?format=sparse");
    sender.send(Ok(whole[..300].to_vec())).await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let deleted = control.delete("a").await;
    let cut = response.await.unwrap();
    let cut = match cut {
        Ok(response) => format!("{} {}", response.status(), response.text().await.unwrap_or_default()),
        Err(error) => format!("{error}"),
    };
    drop(sender);
    assert_eq!(control.add(&ticket("b", &image, &["read", "write"], 300)).await, StatusCode::OK);
    let mut again = (StatusCode::CONFLICT, String::new());
    for _ in 0..30 {
        again = sparse_put_to(&server, "b", "", whole.clone()).await;
        // A 409 for a claim still held is retried; the chain's 409 is not.
        if again.0 != StatusCode::CONFLICT || again.1.contains("checkpoint") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(again.0, StatusCode::OK, "DELETE {deleted}, cut restore: {cut}; the same incremental again: {again:?}");
}

/// The same through HTTP/1.1: the client sends half the incremental, then
/// its connection goes. hyper drops an HTTP/1 handler with its connection,
/// so no `interrupted` record is written either.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attack2_an_incremental_cut_by_an_http1_disconnect_can_be_run_again() {
    let dir = tempfile::tempdir().unwrap();
    let root = std::fs::canonicalize(dir.path()).unwrap();
    let size = 16 * MIB;
    let image = root.join("disk.qcow2");
    let server = Server::try_start(&root, &[format!("disk={},size=16M,format=qcow2", image.display())], &[]).await.unwrap();
    let base = random_bytes(MIB as usize, 4);
    let (status, text) =
        sparse_put_to(&server, "disk", "", stream(json!({"virtual-size": size, "data-size": MIB, "checkpoint": "c1"}), &base, size)).await;
    assert_eq!(status, StatusCode::OK, "{text}");
    let one = random_bytes(2 * MIB as usize, 5);
    let whole = incremental(size, "c1", "c2", 4 * MIB, &one);
    let (sender, mut receiver) = tokio::sync::mpsc::channel::<Result<Vec<u8>, std::io::Error>>(4);
    let body_stream = futures::stream::poll_fn(move |context| receiver.poll_recv(context));
    let client = server.client_builder().http1_only().build().unwrap();
    let request = client.put(server.image_url("disk") + "?format=sparse").body(reqwest::Body::wrap_stream(body_stream)).send();
    let response = tokio::spawn(request);
    sender.send(Ok(whole[..MIB as usize].to_vec())).await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    response.abort();
    let _ = response.await;
    drop(sender);
    let mut again = (StatusCode::CONFLICT, String::new());
    for _ in 0..30 {
        tokio::time::sleep(Duration::from_millis(200)).await;
        again = sparse_put_to(&server, "disk", "", whole.clone()).await;
        if again.0 != StatusCode::CONFLICT || again.1.contains("checkpoint") {
            break;
        }
    }
    assert_eq!(again.0, StatusCode::OK, "the same incremental after the client's connection went mid-body: {again:?}");
}

/// An incremental forced (force=y) onto a target at another checkpoint
/// fails part-way: the record then says the target holds `since` plus part
/// of that incremental, so the same incremental is admitted *without*
/// force, though the target never was at `since`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attack2_a_failed_forced_incremental_records_no_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let root = std::fs::canonicalize(dir.path()).unwrap();
    let size = 16 * MIB;
    let image = root.join("disk.qcow2");
    let server = Server::try_start(&root, &[format!("disk={},size=16M,format=qcow2", image.display())], &[]).await.unwrap();
    let base = random_bytes(MIB as usize, 6);
    let (status, text) =
        sparse_put_to(&server, "disk", "", stream(json!({"virtual-size": size, "data-size": MIB, "checkpoint": "other"}), &base, size))
            .await;
    assert_eq!(status, StatusCode::OK, "{text}");
    // Forced c1 -> c2, cut off by a frame past the end (after admission).
    let meta = json!({"virtual-size": size, "data-size": 4096, "incremental": true, "since": "c1", "checkpoint": "c2"});
    let mut bad = meta_frame(&meta);
    bad.extend(frame("data", 0, 4096, &[3u8; 4096]));
    bad.extend(frame("data", size, 4096, &[3u8; 4096]));
    bad.extend(frame("stop", 0, 0, &[]));
    let failed = sparse_put_to(&server, "disk", "&force=y", bad).await;
    assert_ne!(failed.0, StatusCode::OK);
    let (status, text) = sparse_put_to(&server, "disk", "", incremental(size, "c1", "c2", 0, &[4u8; 4096])).await;
    assert_eq!(
        status,
        StatusCode::CONFLICT,
        "target at \"other\"; a forced c1->c2 failed ({failed:?}); c1->c2 without force: {status} {text}"
    );
}

fn upload(server: &Server, file: &Path, extra: &[&str]) -> (Option<i32>, String) {
    let output = Command::new(binary("blockgate"))
        .arg("--cacert")
        .arg(server.ca())
        .arg("upload")
        .args(extra)
        .arg(file)
        .arg(server.image_url("disk"))
        .output()
        .unwrap();
    (output.status.code(), String::from_utf8_lossy(&output.stderr).to_string())
}

async fn read_image(server: &Server) -> Vec<u8> {
    server.client().get(server.image_url("disk")).send().await.unwrap().bytes().await.unwrap().to_vec()
}

/// A local file whose name is not UTF-8 (Latin-1 `é`). A qcow2 goes
/// through qemu-nbd, which gets its nodes as a `json:` name that cannot
/// carry the name as it is, and a lossy copy would name another file: the
/// upload is refused, saying so, and writes nothing. A raw file the CLI
/// opens itself, by its very name: it is uploaded exactly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attack2_cli_upload_of_a_file_whose_name_is_not_utf8_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let root = std::fs::canonicalize(dir.path()).unwrap();
    let server = Server::try_start(&root, &[format!("disk={},size=1M,format=raw", root.join("disk.raw").display())], &[]).await.unwrap();
    let latin1 = |suffix: &str| {
        let mut name = b"caf\xe9".to_vec();
        name.extend_from_slice(suffix.as_bytes());
        root.join(OsStr::from_bytes(&name))
    };
    let qcow2 = latin1(".qcow2");
    let created = Command::new("qemu-img").args(["create", "-q", "-f", "qcow2"]).arg(&qcow2).arg("1M").status().unwrap();
    assert!(created.success());
    let (code, stderr) = upload(&server, &qcow2, &[]);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains("not UTF-8"), "{stderr}");
    assert!(read_image(&server).await.iter().all(|&byte| byte == 0), "nothing was written");

    let raw = latin1(".raw");
    let data = random_bytes(MIB as usize, 7);
    std::fs::write(&raw, &data).unwrap();
    let (code, stderr) = upload(&server, &raw, &[]);
    assert_eq!(code, Some(0), "{stderr}");
    assert!(read_image(&server).await == data, "the raw file itself was uploaded");
}

/// The same bytes turned into a bypass: a directory (an unpacked archive)
/// holds `disk\xff.raw`, and `disk\u{fffd}.raw`, a symlink to the user's
/// key. The CLI checks the first; qemu-nbd opens the second and the key is
/// uploaded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attack2_cli_upload_never_opens_another_file_than_it_checked() {
    let dir = tempfile::tempdir().unwrap();
    let root = std::fs::canonicalize(dir.path()).unwrap();
    let server = Server::try_start(&root, &[format!("disk={},size=1M,format=raw", root.join("disk.raw").display())], &[]).await.unwrap();
    let home = root.join("home");
    std::fs::create_dir_all(home.join(".ssh")).unwrap();
    let key = home.join(".ssh/id_ed25519");
    let mut secret = b"-----BEGIN OPENSSH PRIVATE KEY----- the user's key".to_vec();
    secret.resize(MIB as usize, b'k');
    std::fs::write(&key, &secret).unwrap();
    let unpacked = root.join("unpacked");
    std::fs::create_dir(&unpacked).unwrap();
    let named = unpacked.join(OsStr::from_bytes(b"disk\xff.raw"));
    std::fs::write(&named, vec![0x11u8; MIB as usize]).unwrap();
    std::os::unix::fs::symlink(&key, unpacked.join("disk\u{fffd}.raw")).unwrap();
    let (code, stderr) = upload(&server, &named, &[]);
    let leaked = read_image(&server).await.starts_with(b"-----BEGIN OPENSSH PRIVATE KEY");
    assert!(!leaked, "upload exit {code:?}: the server now holds the key the lossy name pointed at; the CLI said: {stderr}");
}

/// The image's own directory has a non-UTF-8 name and a twin with U+FFFD
/// holds a qcow2 whose backing is `base.raw`, a symlink to the key: the
/// checked chain is benign, the opened one is not (json: names every node,
/// so the twin's `base.raw` is what qemu opens).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attack2_cli_upload_of_a_qcow2_in_a_non_utf8_directory() {
    let dir = tempfile::tempdir().unwrap();
    let root = std::fs::canonicalize(dir.path()).unwrap();
    let server = Server::try_start(&root, &[format!("disk={},size=1M,format=raw", root.join("disk.raw").display())], &[]).await.unwrap();
    let key = root.join("id_ed25519");
    let mut secret = b"-----BEGIN OPENSSH PRIVATE KEY----- the user's key".to_vec();
    secret.resize(MIB as usize, b'k');
    std::fs::write(&key, &secret).unwrap();
    let real: PathBuf = root.join(OsStr::from_bytes(b"vm\xff"));
    let twin = root.join("vm\u{fffd}");
    std::fs::create_dir(&real).unwrap();
    std::fs::create_dir(&twin).unwrap();
    std::fs::write(real.join("base.raw"), vec![0x22u8; MIB as usize]).unwrap();
    let overlay = real.join("disk.qcow2");
    let status = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-u", "-b", "base.raw", "-F", "raw"])
        .arg(&overlay)
        .arg("1M")
        .status()
        .unwrap();
    assert!(status.success());
    std::fs::copy(&overlay, twin.join("disk.qcow2")).unwrap();
    std::os::unix::fs::symlink(&key, twin.join("base.raw")).unwrap();
    let (code, stderr) = upload(&server, &overlay, &[]);
    let image = read_image(&server).await;
    let leaked = image.starts_with(b"-----BEGIN OPENSSH PRIVATE KEY");
    let benign = image.iter().all(|&byte| byte == 0x22);
    assert!(!leaked, "upload exit {code:?}: the key was uploaded; the CLI said: {stderr}");
    assert!(code != Some(0) || benign, "upload exit 0 but the image does not hold base.raw");
}

/// `Pipeline::finish` consumes the pipeline, and with it the restore's
/// claim, before the restore's final flush and before it records its
/// checkpoint: while that flush runs, a raw write is admitted (200), and
/// the restore then records checkpoint c1 over an image the write changed;
/// an incremental from c1 is admitted onto it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attack2_a_write_during_a_restores_final_flush_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let root = std::fs::canonicalize(dir.path()).unwrap();
    let (slow, file) = slow_store(&root, 0, 3, 0);
    let server =
        Server::try_start(&root, &[format!("disk={}", slow.uri())], &["--nbd-timeout", "30"]).await.unwrap_or_else(|e| panic!("{e}"));
    let size = 16 * MIB;
    let data = vec![0xabu8; 4096];
    let body = stream(json!({"virtual-size": size, "data-size": 4096, "checkpoint": "c1"}), &data, size);
    let restore = tokio::spawn({
        let (client, url) = (server.client(), server.image_url("disk") + "?format=sparse");
        async move {
            let response = client.put(url).body(body).send().await.unwrap();
            (response.status(), response.text().await.unwrap())
        }
    });
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let (during, during_text) = raw_put_to(&server, "disk", 8 * MIB, &[0xeeu8; 4096]).await;
    let restored = restore.await.unwrap();
    let mut findings = Vec::new();
    if during != StatusCode::CONFLICT {
        findings.push(format!("a raw write 1 s into a restore (waiting for its flush): {during} {during_text}"));
    }
    let (status, text) = sparse_put_to(&server, "disk", "", incremental(size, "c1", "c2", 4 * MIB, &[7u8; 4096])).await;
    let bytes = std::fs::read(&file).unwrap();
    let written_during = bytes[8 * MIB as usize] == 0xee;
    if written_during && status != StatusCode::CONFLICT {
        findings.push(format!(
            "restore {restored:?}; then an incremental from c1 onto an image that took a raw write after c1: {status} {text}"
        ));
    }
    assert!(findings.is_empty(), "{}", findings.join("\n"));
}

/// PATCH zero whose client goes away while the zero runs (3 s): the
/// claim stays until the storage answers, so a restore right after is
/// 409, and once the zero ended a restore is admitted and its data is
/// not overwritten by the abandoned zero.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attack2_an_abandoned_patch_zero_keeps_the_target_until_it_ends() {
    let dir = tempfile::tempdir().unwrap();
    let root = std::fs::canonicalize(dir.path()).unwrap();
    let (slow, file) = slow_store(&root, 0, 0, 3);
    let server =
        Server::try_start(&root, &[format!("disk={}", slow.uri())], &["--nbd-timeout", "30"]).await.unwrap_or_else(|e| panic!("{e}"));
    std::fs::write(&file, vec![0x55u8; 16 * MIB as usize]).unwrap();
    let patch = tokio::spawn({
        let (client, url) = (server.client(), server.image_url("disk"));
        async move { client.patch(url).json(&json!({"op": "zero", "offset": 0, "size": MIB, "flush": true})).send().await }
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    patch.abort();
    let _ = patch.await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let size = 16 * MIB;
    let data = vec![0xcdu8; 4096];
    let body = stream(json!({"virtual-size": size, "data-size": 4096}), &data, size);
    let (first, first_text) = sparse_put_to(&server, "disk", "&flush=n", body.clone()).await;
    let mut last = (first, first_text.clone());
    for _ in 0..50 {
        if last.0 != StatusCode::CONFLICT {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        last = sparse_put_to(&server, "disk", "&flush=n", body.clone()).await;
    }
    tokio::time::sleep(Duration::from_secs(4)).await;
    let bytes = std::fs::read(&file).unwrap();
    let summary = format!("restore right after: {first} {first_text:?}; later: {last:?}; first byte now {:#x}", bytes[0]);
    assert_eq!(first, StatusCode::CONFLICT, "{summary}");
    assert_eq!(last.0, StatusCode::OK, "{summary}");
    assert_eq!(bytes[0], 0xcd, "{summary}");
}

/// c1 -> c2 admitted, then refused part-way by a frame past the end.
fn failing_incremental(size: u64, since: &str, checkpoint: &str) -> Vec<u8> {
    let meta = json!({"virtual-size": size, "data-size": 8192, "incremental": true, "since": since, "checkpoint": checkpoint});
    let mut bad = meta_frame(&meta);
    bad.extend(frame("data", MIB, 4096, &[3u8; 4096]));
    bad.extend(frame("data", size, 4096, &[3u8; 4096]));
    bad.extend(frame("stop", 0, 0, &[]));
    bad
}

/// The interrupted record across a restart: only the same incremental is
/// admitted, then the chain goes on; a full restore after an interrupted
/// incremental is admitted and clears the record.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attack2_an_interrupted_incremental_across_a_restart_and_a_full_restore() {
    let dir = tempfile::tempdir().unwrap();
    let root = std::fs::canonicalize(dir.path()).unwrap();
    let size = 16 * MIB;
    let image = root.join("disk.qcow2");
    let spec = vec![format!("disk={},size=16M,format=qcow2", image.display())];
    let mut server = Server::try_start(&root, &spec, &[]).await.unwrap();
    let base = random_bytes(MIB as usize, 8);
    let (status, text) =
        sparse_put_to(&server, "disk", "", stream(json!({"virtual-size": size, "data-size": MIB, "checkpoint": "c1"}), &base, size)).await;
    assert_eq!(status, StatusCode::OK, "{text}");
    let (status, text) = sparse_put_to(&server, "disk", "", failing_incremental(size, "c1", "c2")).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{text}");
    server.stop();
    drop(server);
    let server = Server::try_start(&root, &spec, &[]).await.unwrap();
    let (status, text) = sparse_put_to(&server, "disk", "", incremental(size, "c1", "c9", 0, &[1u8; 4096])).await;
    assert_eq!(status, StatusCode::CONFLICT, "after a restart, another incremental from c1: {text}");
    assert!(text.contains("apply that incremental again"), "{text}");
    let (status, text) = sparse_put_to(&server, "disk", "", incremental(size, "c1", "c2", MIB, &[4u8; 4096])).await;
    assert_eq!(status, StatusCode::OK, "after a restart, the same incremental: {text}");
    let (status, text) = sparse_put_to(&server, "disk", "", incremental(size, "c2", "c3", 0, &[5u8; 4096])).await;
    assert_eq!(status, StatusCode::OK, "the chain goes on: {text}");
    // Interrupted again, then a full restore without a checkpoint.
    let (status, text) = sparse_put_to(&server, "disk", "", failing_incremental(size, "c3", "c4")).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{text}");
    let (status, text) = sparse_put_to(&server, "disk", "", stream(json!({"virtual-size": size, "data-size": MIB}), &base, size)).await;
    assert_eq!(status, StatusCode::OK, "a full restore after an interrupted incremental: {text}");
    let (status, text) = sparse_put_to(&server, "disk", "", incremental(size, "c3", "c4", MIB, &[4u8; 4096])).await;
    assert_eq!(status, StatusCode::CONFLICT, "the interrupted incremental after a full restore: {text}");
    // PATCH zero of 0 bytes, with flush, keeps a record.
    let (status, text) =
        sparse_put_to(&server, "disk", "", stream(json!({"virtual-size": size, "data-size": MIB, "checkpoint": "d1"}), &base, size)).await;
    assert_eq!(status, StatusCode::OK, "{text}");
    let response = server
        .client()
        .patch(server.image_url("disk"))
        .json(&json!({"op": "zero", "offset": size, "size": 0, "flush": true}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let (status, text) = sparse_put_to(&server, "disk", "", incremental(size, "d1", "d2", MIB, &[4u8; 4096])).await;
    assert_eq!(status, StatusCode::OK, "after PATCH zero of nothing: {text}");
}

fn cli(server: &Server, args: &[&str]) -> std::process::Output {
    Command::new(binary("blockgate")).arg("--cacert").arg(server.ca()).args(args).output().unwrap()
}

/// A chain the CLI made itself across three directories (full in a/, the
/// first incremental in b/ on a/full, the second in c/ on b/inc1): the
/// download of the second opens inc1's chain with only c/ and b/ allowed,
/// so full.qcow2 in a/ is refused. Then `upload` and `checksum` of b/inc1
/// must say why they refuse (the backing lies in another directory).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attack2_cli_chain_across_three_directories() {
    let dir = tempfile::tempdir().unwrap();
    let root = std::fs::canonicalize(dir.path()).unwrap();
    let source = root.join("source.qcow2");
    create_image(&source, "qcow2", "16M");
    qemu_io(&source, "qcow2", &["write -P 0x01 0 4M"]);
    run("qemu-img", &["bitmap", "--add", source.to_str().unwrap(), "b1"]);
    for sub in ["a", "b", "c"] {
        std::fs::create_dir(root.join(sub)).unwrap();
    }
    let (full, inc1, inc2) = (root.join("a/full.qcow2"), root.join("b/inc1.qcow2"), root.join("c/inc2.qcow2"));
    let spec = [format!("src={},bitmap=b1", source.display())];
    let mut findings = Vec::new();
    {
        let server = Server::start(&root, &spec).await;
        let out = cli(&server, &["download", &server.image_url("src"), full.to_str().unwrap()]);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    }
    qemu_io(&source, "qcow2", &["write -P 0x02 1M 64k"]);
    {
        let server = Server::start(&root, &spec).await;
        let args = ["download", "--incremental", "--backing", full.to_str().unwrap(), &server.image_url("src"), inc1.to_str().unwrap()];
        let out = cli(&server, &args);
        assert!(out.status.success(), "inc1: {}", String::from_utf8_lossy(&out.stderr));
    }
    run("qemu-img", &["bitmap", "--disable", source.to_str().unwrap(), "b1"]);
    run("qemu-img", &["bitmap", "--add", source.to_str().unwrap(), "b2"]);
    qemu_io(&source, "qcow2", &["write -P 0x03 2M 64k"]);
    {
        let server = Server::start(&root, &[format!("src={},bitmap=b2", source.display())]).await;
        let args = ["download", "--incremental", "--backing", inc1.to_str().unwrap(), &server.image_url("src"), inc2.to_str().unwrap()];
        let out = cli(&server, &args);
        if !out.status.success() {
            findings.push(format!(
                "download of c/inc2 on b/inc1 (on a/full): exit {:?}: {:?}",
                out.status.code(),
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        let out = cli(&server, &["checksum", inc1.to_str().unwrap()]);
        let said = String::from_utf8_lossy(&out.stderr).to_string();
        eprintln!("checksum b/inc1: exit {:?}: {said}", out.status.code());
        if out.status.success() {
            eprintln!("checksum of b/inc1 succeeded");
        } else if !said.contains("--follow-links") {
            findings.push(format!("checksum of b/inc1 refused without saying why: {said}"));
        }
    }
    assert!(findings.is_empty(), "{}", findings.join("\n"));
}

/// Paths with a comma, quotes, a backslash, a newline, `%s` and a
/// `json:`-looking part: the server's --blockdev JSON and the CLI's json:
/// name must carry them (a qcow2 with a backing in the same directory).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attack2_odd_characters_in_paths_reach_the_same_files() {
    let dir = tempfile::tempdir().unwrap();
    let root = std::fs::canonicalize(dir.path()).unwrap();
    let odd = root.join("we,ird\"q'\\b\nn%s json:{\"x\":1} file:");
    std::fs::create_dir(&odd).unwrap();
    let base = odd.join("ba,se\".raw");
    let content = random_bytes(MIB as usize, 9);
    std::fs::write(&base, &content).unwrap();
    let overlay = odd.join("disk,x.qcow2");
    let status = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-b", "ba,se\".raw", "-F", "raw"])
        .arg(&overlay)
        .arg("1M")
        .status()
        .unwrap();
    assert!(status.success());
    let mut findings = Vec::new();
    // The server: --image takes `name=path,...`; a comma in the path is
    // doubled (keyval), which the server may or may not accept.
    let odd2 = root.join("we\"ird'q\\b\nn%s json:{\"x\":1} file:");
    std::fs::create_dir(&odd2).unwrap();
    std::fs::write(odd2.join("base\".raw"), &content).unwrap();
    let overlay2 = odd2.join("disk.qcow2");
    let status = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-b", "base\".raw", "-F", "raw"])
        .arg(&overlay2)
        .arg("1M")
        .status()
        .unwrap();
    assert!(status.success());
    let spec = format!("disk={},format=qcow2", overlay2.display());
    match Server::try_start(&root, &[spec], &[]).await {
        Ok(server) => {
            let image = server.client().get(server.image_url("disk")).send().await.unwrap().bytes().await.unwrap();
            if image[..] != content[..] {
                findings.push("the server serves other bytes than the overlay's".to_string());
            }
        }
        Err(error) => findings.push(format!("server with an odd --image path (no comma): {error}")),
    }
    // The CLI uploads it.
    let target = root.join("target.raw");
    let server = Server::try_start(&root, &[format!("t={},size=1M,format=raw", target.display())], &[]).await.unwrap();
    let out = Command::new(binary("blockgate"))
        .arg("--cacert")
        .arg(server.ca())
        .args(["upload", "--follow-links"])
        .arg(&overlay)
        .arg(server.image_url("t"))
        .output()
        .unwrap();
    let got = server.client().get(server.image_url("t")).send().await.unwrap().bytes().await.unwrap();
    if !out.status.success() || got[..] != content[..] {
        findings.push(format!(
            "CLI upload: exit {:?}, same bytes {}: {}",
            out.status.code(),
            got[..] == content[..],
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    assert!(findings.is_empty(), "{}", findings.join("\n"));
}

/// Two writable tickets: one on an overlay, one on the overlay's backing
/// file (same directory, allowed). A restore into the overlay records c1;
/// a write into the base changes what the overlay reads (unallocated
/// ranges) outside its chain; an incremental from c1 is then admitted.
/// Held if the second ticket is refused (qemu's locks) or the write is 409.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attack2_a_write_into_the_backing_file_of_a_restored_overlay() {
    let dir = tempfile::tempdir().unwrap();
    let root = std::fs::canonicalize(dir.path()).unwrap();
    let size = 16 * MIB;
    let base = root.join("base.raw");
    std::fs::write(&base, vec![0u8; size as usize]).unwrap();
    let overlay = root.join("overlay.qcow2");
    run("qemu-img", &["create", "-q", "-f", "qcow2", "-b", "base.raw", "-F", "raw", overlay.to_str().unwrap(), "16M"]);
    let (server, control) = start_with_control(&root, &[]).await;
    let mut a = ticket("a", &overlay, &["read", "write"], 300);
    a["size"] = json!(size);
    a["format"] = json!("qcow2");
    assert_eq!(control.add(&a).await, StatusCode::OK);
    let data = random_bytes(MIB as usize, 10);
    // Data only (incremental with force): the rest stays unallocated, read from base.
    let meta = json!({"virtual-size": size, "data-size": MIB, "checkpoint": "c1"});
    let (status, text) = sparse_put_to(&server, "a", "", stream(meta, &data, MIB)).await;
    eprintln!("restore of 1 MiB into the overlay (not tiling): {status} {text}");
    let meta = json!({"virtual-size": size, "data-size": MIB, "checkpoint": "c1"});
    let (status, text) = sparse_put_to(&server, "a", "", stream(meta, &data, size)).await;
    assert_eq!(status, StatusCode::OK, "{text}");
    let b = control.add(&ticket("b", &base, &["read", "write"], 300)).await;
    if b != StatusCode::OK {
        eprintln!("a writable ticket on the overlay's backing file: {b}");
        return;
    }
    let (wrote, _) = raw_put_to(&server, "b", 8 * MIB, &[0xeeu8; 4096]).await;
    let seen = server
        .client()
        .get(server.image_url("a"))
        .header("range", format!("bytes={}-{}", 8 * MIB, 8 * MIB + 4095))
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    let (status, text) = sparse_put_to(&server, "a", "", incremental(size, "c1", "c2", 4 * MIB, &[7u8; 4096])).await;
    // A restore leaves no cluster of the overlay unallocated, so the
    // write is not seen through it: only a seen write makes c1 false.
    let seen_through = seen.iter().all(|&byte| byte == 0xee);
    assert!(
        wrote != StatusCode::OK || !seen_through || status == StatusCode::CONFLICT,
        "write into the base: {wrote}; the overlay reads it: {}; incremental from c1 into the overlay: {status} {text}",
        seen_through
    );
}

/// A full restore with flush=n records its checkpoint though nothing made
/// it stable; the server and its daemon die (power loss, OOM kill) before
/// anything flushes; after the restart the image lacks part of c1 (the
/// qcow2's metadata was in the daemon's memory), yet an incremental from
/// c1 is admitted and recorded as c2.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attack2_a_checkpoint_is_recorded_only_after_a_flush() {
    use nix::sys::signal::{Signal, kill};
    use nix::unistd::Pid;
    let dir = tempfile::tempdir().unwrap();
    let root = std::fs::canonicalize(dir.path()).unwrap();
    let size = 16 * MIB;
    let image = root.join("disk.qcow2");
    let spec = vec![format!("disk={},size=16M,format=qcow2", image.display())];
    let server = Server::try_start(&root, &spec, &[]).await.unwrap();
    let data = random_bytes(4 * MIB as usize, 12);
    let meta = json!({"virtual-size": size, "data-size": 4 * MIB, "checkpoint": "c1"});
    let (status, text) = sparse_put_to(&server, "disk", "&flush=n", stream(meta, &data, size)).await;
    assert_eq!(status, StatusCode::OK, "{text}");
    let daemons = daemon_pids(&server);
    kill(Pid::from_raw(server.pid() as i32), Signal::SIGKILL).unwrap();
    for pid in daemons {
        let _ = kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
    }
    std::thread::sleep(Duration::from_millis(300));
    std::mem::forget(server);
    let server = Server::try_start(&root, &spec, &[]).await.unwrap();
    let after = server.client().get(server.image_url("disk")).send().await.unwrap().bytes().await.unwrap();
    let kept = after[..4 * MIB as usize] == data[..];
    let (status, text) = sparse_put_to(&server, "disk", "", incremental(size, "c1", "c2", 8 * MIB, &[7u8; 4096])).await;
    assert!(
        kept || status != StatusCode::OK,
        "c1 (flush=n) not on disk after the crash (first 4 MiB kept: {kept}); incremental from c1: {status} {text}"
    );
}

/// Local qcow2 files the CLI must refuse quickly and say why: a qcow2
/// whose backing is itself; a backing hidden in the same directory
/// (`.base.raw`); a raw file given with `--format qcow2` whose header
/// names a file outside its directory. And one it does not refuse: a
/// hostile qcow2 in the user's home directory naming a plain file beside
/// it (`passwords.txt`): "a hostile qcow2 sends no host file" holds only
/// for files outside the image's directory.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attack2_cli_local_links() {
    let dir = tempfile::tempdir().unwrap();
    let root = std::fs::canonicalize(dir.path()).unwrap();
    let server = Server::try_start(&root, &[format!("disk={},size=1M,format=raw", root.join("disk.raw").display())], &[]).await.unwrap();
    let mut findings = Vec::new();
    let work = root.join("work");
    std::fs::create_dir(&work).unwrap();
    // Itself as backing.
    let looped = work.join("loop.qcow2");
    run("qemu-img", &["create", "-q", "-f", "qcow2", looped.to_str().unwrap(), "1M"]);
    run("qemu-img", &["rebase", "-q", "-u", "-b", "loop.qcow2", "-F", "qcow2", looped.to_str().unwrap()]);
    let started = std::time::Instant::now();
    let (code, said) = upload(&server, &looped, &[]);
    eprintln!("self-backing: exit {code:?} in {:?}: {said}", started.elapsed());
    if code == Some(0) || started.elapsed() > Duration::from_secs(10) {
        findings.push(format!("self-backing qcow2: exit {code:?} after {:?}", started.elapsed()));
    }
    // Hidden backing beside it.
    std::fs::write(work.join(".base.raw"), vec![0x33u8; MIB as usize]).unwrap();
    let hidden = work.join("hidden.qcow2");
    run("qemu-img", &["create", "-q", "-f", "qcow2", "-u", "-b", ".base.raw", "-F", "raw", hidden.to_str().unwrap(), "1M"]);
    let (code, said) = upload(&server, &hidden, &[]);
    eprintln!("hidden backing: exit {code:?}: {said}");
    if code == Some(0) {
        findings.push("a hidden backing beside the image was uploaded".to_string());
    }
    // A raw file with a qcow2 header, given as --format qcow2, naming a file elsewhere.
    let secret = root.join("secret.raw");
    std::fs::write(&secret, vec![0x44u8; MIB as usize]).unwrap();
    let disguised = work.join("disguised.img");
    run("qemu-img", &["create", "-q", "-f", "qcow2", "-u", "-b", secret.to_str().unwrap(), "-F", "raw", disguised.to_str().unwrap(), "1M"]);
    let (code, said) = upload(&server, &disguised, &["--format", "qcow2"]);
    eprintln!("--format qcow2 naming a file elsewhere: exit {code:?}: {said}");
    if code == Some(0) {
        findings.push("--format qcow2 uploaded a file outside the image's directory".to_string());
    }
    // A hostile qcow2 in the home directory naming a plain file beside it.
    let home = root.join("home");
    std::fs::create_dir(&home).unwrap();
    let mut passwords = b"bank: hunter2".to_vec();
    passwords.resize(MIB as usize, b' ');
    std::fs::write(home.join("passwords.txt"), &passwords).unwrap();
    let appliance = home.join("appliance.qcow2");
    run("qemu-img", &["create", "-q", "-f", "qcow2", "-u", "-b", "passwords.txt", "-F", "raw", appliance.to_str().unwrap(), "1M"]);
    let (code, said) = upload(&server, &appliance, &[]);
    let leaked = read_image(&server).await.starts_with(b"bank: hunter2");
    if leaked {
        findings.push(format!("a qcow2 in the home directory uploaded ~/passwords.txt (exit {code:?}, said {said:?})"));
    }
    assert!(findings.is_empty(), "{}", findings.join("\n"));
}

/// The client of an incremental gives up while the server runs the
/// restore's final flush (a client timeout; here the flush takes 3 s):
/// the handler is dropped with the request, no `interrupted` record is
/// written, and the record was cleared at admission, so the same
/// incremental is refused afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attack2_an_incremental_abandoned_during_its_final_flush_can_be_run_again() {
    let dir = tempfile::tempdir().unwrap();
    let root = std::fs::canonicalize(dir.path()).unwrap();
    let (slow, _file) = slow_store(&root, 0, 3, 0);
    let server =
        Server::try_start(&root, &[format!("disk={}", slow.uri())], &["--nbd-timeout", "30"]).await.unwrap_or_else(|e| panic!("{e}"));
    let size = 16 * MIB;
    let base = random_bytes(MIB as usize, 13);
    let (status, text) =
        sparse_put_to(&server, "disk", "", stream(json!({"virtual-size": size, "data-size": MIB, "checkpoint": "c1"}), &base, size)).await;
    assert_eq!(status, StatusCode::OK, "{text}");
    let whole = incremental(size, "c1", "c2", 4 * MIB, &[6u8; 4096]);
    let request = tokio::spawn({
        let (client, url, body) = (server.client(), server.image_url("disk") + "?format=sparse", whole.clone());
        async move { client.put(url).body(body).send().await }
    });
    tokio::time::sleep(Duration::from_millis(1000)).await;
    request.abort();
    let _ = request.await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let again = sparse_put_to(&server, "disk", "", whole).await;
    assert_eq!(again.0, StatusCode::OK, "the same incremental after its client left during the final flush: {again:?}");
}

/// `--image links/disk.qcow2`, a symlink to `store/disk.qcow2` whose
/// backing `base.raw` lies beside it in store/: the allowed directory is
/// that of the path given (links/), the backing is resolved from the real
/// file's (store/), so the server refuses its own image's chain; and
/// links/ is allowed for every image's links instead.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attack2_an_image_given_through_a_symlink() {
    let dir = tempfile::tempdir().unwrap();
    let root = std::fs::canonicalize(dir.path()).unwrap();
    let (store, links) = (root.join("store"), root.join("links"));
    std::fs::create_dir(&store).unwrap();
    std::fs::create_dir(&links).unwrap();
    let content = random_bytes(MIB as usize, 14);
    std::fs::write(store.join("base.raw"), &content).unwrap();
    run("qemu-img", &["create", "-q", "-f", "qcow2", "-b", "base.raw", "-F", "raw", store.join("disk.qcow2").to_str().unwrap(), "1M"]);
    std::os::unix::fs::symlink(store.join("disk.qcow2"), links.join("disk.qcow2")).unwrap();
    let started = Server::try_start(&root, &[format!("disk={},format=qcow2", links.join("disk.qcow2").display())], &[]).await;
    match started {
        Ok(server) => {
            let image = server.client().get(server.image_url("disk")).send().await.unwrap().bytes().await.unwrap();
            assert!(image[..] == content[..], "served other bytes");
        }
        Err(error) => panic!("an --image given through a symlink, its backing beside the real file: {error}"),
    }
}

/// Two restores at once: a second full restore (no checkpoint) is admitted
/// while the first waits for its final flush; the first then records c1
/// over the image the second wrote, and an incremental from c1 is
/// admitted onto it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attack2_a_second_restore_during_the_first_ones_final_flush() {
    let dir = tempfile::tempdir().unwrap();
    let root = std::fs::canonicalize(dir.path()).unwrap();
    let (slow, file) = slow_store(&root, 0, 3, 0);
    let server =
        Server::try_start(&root, &[format!("disk={}", slow.uri())], &["--nbd-timeout", "30"]).await.unwrap_or_else(|e| panic!("{e}"));
    let size = 16 * MIB;
    let first = vec![0x11u8; 4096];
    let second = vec![0x22u8; 4096];
    let restore = tokio::spawn({
        let (client, url) = (server.client(), server.image_url("disk") + "?format=sparse");
        let body = stream(json!({"virtual-size": size, "data-size": 4096, "checkpoint": "c1"}), &first, size);
        async move {
            let response = client.put(url).body(body).send().await.unwrap();
            (response.status(), response.text().await.unwrap())
        }
    });
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let other = sparse_put_to(&server, "disk", "", stream(json!({"virtual-size": size, "data-size": 4096}), &second, size)).await;
    let one = restore.await.unwrap();
    let holds = std::fs::read(&file).unwrap()[0];
    let (status, text) = sparse_put_to(&server, "disk", "", incremental(size, "c1", "c2", 8 * MIB, &[7u8; 4096])).await;
    assert!(
        other.0 == StatusCode::CONFLICT || holds == 0x11 || status == StatusCode::CONFLICT,
        "restore c1: {one:?}; a second restore 1 s later: {other:?}; the image holds the {} restore's data; incremental from c1: {status} {text}",
        if holds == 0x22 { "second" } else { "first" }
    );
}
