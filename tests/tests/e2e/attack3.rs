//! Third hostile review (restore records keyed by device and inode):
//! each test is an attack; a failing test is a defect.
//!
//! Each test began as an attack during review; where its doc comment
//! describes a defect, that defect was fixed and the test asserts the
//! fixed behaviour (its name says which).

use std::os::unix::fs::MetadataExt;
use std::path::Path;

use reqwest::StatusCode;
use serde_json::json;

use crate::common::*;

fn inode(path: &Path) -> u64 {
    std::fs::metadata(path).unwrap().ino()
}

/// The restore record is keyed by the image file's device and inode, and
/// nothing removes it when that file is deleted. ext4 hands a freed inode
/// to the next file: a brand-new image, never restored, made after the
/// old one was deleted, inherits the old image's checkpoint, and an
/// incremental of the old chain is applied to it (a silently corrupt
/// restore). Keyed by path, a new file under another name was safe.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attack3_a_new_image_on_a_reused_inode_inherits_no_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let size = 16 * MIB;
    let old = dir.path().join("old.raw");
    std::fs::File::create(&old).unwrap().set_len(size).unwrap();
    let old_inode = inode(&old);
    let mut server = Server::start(dir.path(), &[format!("old={}", old.display())]).await;
    let full = stream(json!({"virtual-size": size, "data-size": 4096, "incremental": false, "checkpoint": "c1"}), &[1u8; 4096], size);
    let (status, text) = sparse_put_to(&server, "old", "", full).await;
    assert_eq!(status, StatusCode::OK, "full restore: {text}");
    server.stop();
    std::fs::remove_file(&old).unwrap();

    // A new, unrelated image; the first file that gets the freed inode.
    let mut new = None;
    for n in 0..50 {
        let path = dir.path().join(format!("new{n}.raw"));
        std::fs::File::create(&path).unwrap().set_len(size).unwrap();
        if inode(&path) == old_inode {
            new = Some(path);
            break;
        }
    }
    let Some(new) = new else {
        eprintln!("inconclusive: the file system did not reuse inode {old_inode}");
        return;
    };
    let server = Server::start(dir.path(), &[format!("new={}", new.display())]).await;
    let (status, text) = sparse_put_to(&server, "new", "", incremental(size, "c1", "c2", 4 * MIB, &[7u8; 4096])).await;
    assert_eq!(
        status,
        StatusCode::CONFLICT,
        "{} was never restored, but an incremental from c1 (a checkpoint of the deleted {}) was admitted: {text}",
        new.display(),
        old.display()
    );
}

/// An incremental of `count` data frames of 512 bytes, one every 8 KiB,
/// neither since nor checkpoint (applied with force=y).
fn scattered(size: u64, count: u64) -> Vec<u8> {
    let meta = json!({"virtual-size": size, "data-size": count * 512, "incremental": true});
    let mut body = meta_frame(&meta);
    for n in 0..count {
        body.extend(frame("data", n * 8192, 512, &[(n % 251) as u8 + 1; 512]));
    }
    body.extend(frame("stop", 0, 0, &[]));
    body
}

/// The ledger keeps at most 4096 separate ranges and then covers them
/// with one, gaps included. After the daemon restarts under 4097 scattered
/// unflushed writes, the gaps count as lost though nothing was ever written
/// there: applying the same stream again (the 502's own advice, "once those
/// ranges are written again, a flush succeeds") never makes a flush
/// succeed. An incremental restore of a fragmented disk can never complete.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attack3_writes_rewritten_after_a_restart_let_the_flush_succeed_past_4096_ranges() {
    let dir = tempfile::tempdir().unwrap();
    let size = 64 * MIB;
    let server = Server::start(dir.path(), &[format!("disk={}/disk.raw,size={size}", dir.path().display())]).await;
    let body = scattered(size, 4097);
    let url = server.image_url("disk") + "?format=sparse&force=y";
    let first = server.client().put(url.clone() + "&flush=n").body(body.clone()).send().await.unwrap();
    assert_eq!(first.status(), StatusCode::OK, "{}", first.text().await.unwrap());
    kill_daemon(&server).await;
    let mut answers = Vec::new();
    for _ in 0..40 {
        let response = server.client().put(url.clone()).body(body.clone()).send().await.unwrap();
        let status = response.status();
        let text = response.text().await.unwrap();
        if status == StatusCode::OK {
            return;
        }
        let ledger = text.contains("writes may be lost");
        answers.push(format!("{status} {text}"));
        if ledger && answers.iter().filter(|answer| answer.contains("writes may be lost")).count() >= 3 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    panic!("every range was written again, but the flush still fails: {answers:#?}");
}

/// `download --incremental --backing base.qcow2`: base.qcow2's header
/// names an external data file, a FIFO in a hidden directory elsewhere.
/// The chain of --backing is followed anywhere (made_here, by design),
/// but the FIFO must not hang the download (held: refused as "not a
/// regular file").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attack3_a_hostile_backing_naming_a_fifo_does_not_hang_the_download() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.qcow2");
    create_image(&image, "qcow2", "16M");
    let server = Server::start(dir.path(), &[format!("disk={}", image.display())]).await;
    let backups = dir.path().join("backups");
    let hidden = dir.path().join("elsewhere/.secret");
    std::fs::create_dir_all(&backups).unwrap();
    std::fs::create_dir_all(&hidden).unwrap();
    let data = hidden.join("data");
    let base = backups.join("base.qcow2");
    run("qemu-img", &["create", "-q", "-f", "qcow2", "-o", &format!("data_file={}", data.display()), base.to_str().unwrap(), "16M"]);
    std::fs::remove_file(&data).unwrap();
    nix::unistd::mkfifo(&data, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
    let overlay = backups.join("inc.qcow2");
    let mut child = std::process::Command::new(binary("blockgate"))
        .arg("--cacert")
        .arg(server.ca())
        .args(["download", "--incremental", "--backing", base.to_str().unwrap(), &server.image_url("disk"), overlay.to_str().unwrap()])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while std::time::Instant::now() < deadline {
        if child.try_wait().unwrap().is_some() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let still_running = child.try_wait().unwrap().is_none();
    if still_running {
        for pid in children(child.id()) {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), nix::sys::signal::Signal::SIGKILL);
        }
        child.kill().unwrap();
    }
    let output = child.wait_with_output().unwrap();
    let said = String::from_utf8_lossy(&output.stderr);
    assert!(!still_running, "the download hung on {} (a FIFO named by the backing's header): {said}", data.display());
    assert!(said.contains("not a regular file"), "{said}");
}

/// A qcow2 whose guest data lives in an external raw data file
/// (data_file_raw): the data file is served as an image of its own too.
/// A raw write into the data file changes what the qcow2 holds, but the
/// record is keyed by the qcow2's inode alone, so it survives, and the
/// next incremental of the qcow2's chain is admitted onto changed data
/// (what the hard-link fix of the second round closed for a second name).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attack3_a_raw_write_into_a_qcow2s_data_file_voids_its_restore_record() {
    let dir = tempfile::tempdir().unwrap();
    let size = 16 * MIB;
    let qcow2 = dir.path().join("disk.qcow2");
    let data = dir.path().join("disk.data");
    run(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            &format!("data_file={},data_file_raw=on", data.display()),
            qcow2.to_str().unwrap(),
            &size.to_string(),
        ],
    );
    let mut server = match Server::try_start(dir.path(), &[format!("disk={}", qcow2.display())], &[]).await {
        Ok(server) => server,
        Err(error) => {
            eprintln!("held: the server refuses a qcow2 with a data file: {error}");
            return;
        }
    };
    let full = stream(json!({"virtual-size": size, "data-size": 4096, "incremental": false, "checkpoint": "c1"}), &[1u8; 4096], size);
    let (status, text) = sparse_put_to(&server, "disk", "", full).await;
    assert_eq!(status, StatusCode::OK, "full restore: {text}");
    server.stop();

    let mut server = Server::start(dir.path(), &[format!("data={},format=raw", data.display())]).await;
    let (status, text) = raw_put_to(&server, "data", 0, &[9u8; 4096]).await;
    assert_eq!(status, StatusCode::OK, "raw write into the data file: {text}");
    server.stop();
    assert_eq!(&raw_view(&qcow2)[..4], &[9u8; 4], "the write changed the qcow2's guest data");

    let server = Server::start(dir.path(), &[format!("disk={}", qcow2.display())]).await;
    let (status, text) = sparse_put_to(&server, "disk", "", incremental(size, "c1", "c2", 4 * MIB, &[7u8; 4096])).await;
    assert_eq!(status, StatusCode::CONFLICT, "an incremental from c1 after a raw write into the qcow2's data file was admitted: {text}");
}

/// The second round's backing-file attack ran both tickets at once (qemu's
/// locks refuse that). One after the other: a full restore into an
/// overlay of a zero base skips the zero frames (the target reads as
/// zeros), so most of the overlay stays unallocated and reads the base. A
/// later raw write into the base (its own ticket, the overlay's closed)
/// changes what the overlay holds, but the overlay's record, keyed by its
/// own inode, still says c1, and an incremental from c1 is admitted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attack3_a_raw_write_into_a_restored_overlays_base_voids_its_restore_record() {
    let dir = tempfile::tempdir().unwrap();
    let root = std::fs::canonicalize(dir.path()).unwrap();
    let size = 16 * MIB;
    let base = root.join("base.raw");
    std::fs::File::create(&base).unwrap().set_len(size).unwrap();
    let overlay = root.join("overlay.qcow2");
    run("qemu-img", &["create", "-q", "-f", "qcow2", "-b", "base.raw", "-F", "raw", overlay.to_str().unwrap(), "16M"]);
    let mut server = match Server::try_start(&root, &[format!("disk={}", overlay.display())], &[]).await {
        Ok(server) => server,
        Err(error) => {
            eprintln!("held: the server refuses the overlay: {error}");
            return;
        }
    };
    let full = stream(json!({"virtual-size": size, "data-size": 4096, "incremental": false, "checkpoint": "c1"}), &[1u8; 4096], size);
    let (status, text) = sparse_put_to(&server, "disk", "", full).await;
    assert_eq!(status, StatusCode::OK, "full restore: {text}");
    server.stop();

    let mut server = Server::start(&root, &[format!("base={},format=raw", base.display())]).await;
    let (status, text) = raw_put_to(&server, "base", 8 * MIB, &[0xeeu8; 4096]).await;
    assert_eq!(status, StatusCode::OK, "raw write into the base: {text}");
    server.stop();
    let view = raw_view(&overlay);
    if view[8 * MIB as usize] != 0xee {
        eprintln!("held: the restore allocated the overlay's clusters; the base's write is not seen through it");
        return;
    }

    let server = Server::start(&root, &[format!("disk={}", overlay.display())]).await;
    let (status, text) = sparse_put_to(&server, "disk", "", incremental(size, "c1", "c2", 4 * MIB, &[7u8; 4096])).await;
    assert_eq!(
        status,
        StatusCode::CONFLICT,
        "the overlay reads the base's new bytes at 8 MiB (not c1), yet an incremental from c1 was admitted: {text}"
    );
}

/// Full restores that fail after their meta frame (a bad frame part-way)
/// leave no record behind: neither the old checkpoint nor the new one
/// admits an incremental. Held if both are 409.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attack3_a_failed_full_restore_leaves_no_record() {
    let dir = tempfile::tempdir().unwrap();
    let size = 16 * MIB;
    let server = Server::start(dir.path(), &[format!("disk={}/disk.raw,size={size}", dir.path().display())]).await;
    let full = stream(json!({"virtual-size": size, "data-size": 4096, "incremental": false, "checkpoint": "c1"}), &[1u8; 4096], size);
    assert_eq!(sparse_put_to(&server, "disk", "", full).await.0, StatusCode::OK);
    let mut broken = meta_frame(&json!({"virtual-size": size, "data-size": 8192, "incremental": false, "checkpoint": "d1"}));
    broken.extend(frame("data", 0, 4096, &[2u8; 4096]));
    broken.extend(b"garbage that is no frame header\r\n");
    let (status, text) = sparse_put_to(&server, "disk", "", broken).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{text}");
    for since in ["c1", "d1"] {
        let (status, text) = sparse_put_to(&server, "disk", "", incremental(size, since, "x2", 4 * MIB, &[7u8; 4096])).await;
        assert_eq!(status, StatusCode::CONFLICT, "after a failed full restore, an incremental from {since}: {text}");
    }
}
