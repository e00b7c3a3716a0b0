//! Hostile review of the lost-writes ledger, size checks, restore claims
//! and qcow2 links: each test is an attack; a failing test is a defect.
//!
//! Each test began as an attack during review; where its doc comment
//! describes a defect, that defect was fixed and the test asserts the
//! fixed behaviour (its name says which).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::common::*;

async fn serve(dir: &Path, name: &str, format: &str, size: &str, extra: &[&str]) -> (PathBuf, Server) {
    let image = dir.join(format!("{name}.{format}"));
    let server = Server::try_start(dir, &[format!("disk={},size={size},format={format}", image.display())], extra)
        .await
        .unwrap_or_else(|error| panic!("{error}"));
    (image, server)
}

async fn patch_retrying(server: &Server, body: Value) -> (StatusCode, String) {
    for _ in 0..200 {
        let response = server.client().patch(server.image_url("disk")).json(&body).send().await.unwrap();
        let status = response.status();
        let text = response.text().await.unwrap();
        if status != StatusCode::BAD_GATEWAY || text.contains("writes may be lost") {
            return (status, text);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("PATCH never answered other than a transient 502");
}

async fn sparse_put(server: &Server, query: &str, body: Vec<u8>) -> (StatusCode, String) {
    for _ in 0..200 {
        let response = server.client().put(server.image_url("disk") + "?format=sparse" + query).body(body.clone()).send().await.unwrap();
        let status = response.status();
        let text = response.text().await.unwrap();
        if status != StatusCode::BAD_GATEWAY || text.contains("writes may be lost") {
            return (status, text);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("restore never answered other than a transient 502");
}

async fn read_back(server: &Server) -> Vec<u8> {
    for _ in 0..200 {
        if let Ok(response) = server.client().get(server.image_url("disk")).send().await {
            if response.status() == StatusCode::OK {
                if let Ok(bytes) = response.bytes().await {
                    return bytes.to_vec();
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("the image never read back");
}

/// Attack: writes lost in a crash lie in ranges that a later *full*
/// restore carries as zero frames, and the stream has no data (a backup of
/// a blank disk). The restarted qcow2 reads as zeros (its L2 updates died
/// with the daemon), so the restore skips its zero frames and never writes
/// those ranges again: the ledger keeps them lost and every run of the
/// restore ends 502 "writes may be lost", however often the user runs it
/// again (the CLI tells them to), while the image holds exactly the
/// stream's bytes all along. (With a data frame the first run is 502 and
/// the second, finding data, writes every frame and succeeds.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attack_a_blank_full_restore_after_a_crash_succeeds_when_run_again() {
    let dir = tempfile::tempdir().unwrap();
    let (_image, server) = serve(dir.path(), "disk", "qcow2", "16M", &[]).await;
    let size = 16 * MIB;
    let lost = random_bytes(MIB as usize, 7);
    assert_eq!(put_retrying(&server, 8 * MIB, &lost, "?flush=n").await.0, StatusCode::OK);
    kill_daemon(&server).await;
    let after = read_back(&server).await;
    let zero_after_crash = after.iter().all(|&byte| byte == 0);
    let mut body = meta_frame(&json!({"virtual-size": size, "data-size": 0}));
    body.extend(frame("zero", 0, size, &[]));
    body.extend(frame("stop", 0, 0, &[]));
    let mut answers = Vec::new();
    for _ in 0..4 {
        answers.push(sparse_put(&server, "", body.clone()).await);
    }
    eprintln!("answers: {answers:?}");
    let image = read_back(&server).await;
    assert!(image.iter().all(|&byte| byte == 0), "the image holds the stream's bytes (zeros)");
    assert!(
        answers.iter().any(|(status, _)| *status == StatusCode::OK),
        "a blank full restore run 4 times after a crash never succeeds (image zero after crash: {zero_after_crash}): {answers:?}"
    );
}

/// Same with zero_tail=y: a smaller blank stream; the tail zeroing is
/// skipped on an image that reads as zeros, so a lost range in the tail
/// stays lost for ever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attack_a_blank_zero_tail_restore_after_a_crash_succeeds_when_run_again() {
    let dir = tempfile::tempdir().unwrap();
    let (_image, server) = serve(dir.path(), "disk", "qcow2", "16M", &[]).await;
    let lost = random_bytes(MIB as usize, 9);
    assert_eq!(put_retrying(&server, 12 * MIB, &lost, "?flush=n").await.0, StatusCode::OK);
    kill_daemon(&server).await;
    let mut body = meta_frame(&json!({"virtual-size": 4 * MIB, "data-size": 0}));
    body.extend(frame("zero", 0, 4 * MIB, &[]));
    body.extend(frame("stop", 0, 0, &[]));
    let mut answers = Vec::new();
    for _ in 0..4 {
        answers.push(sparse_put(&server, "&zero_tail=y", body.clone()).await);
    }
    assert!(answers.iter().any(|(status, _)| *status == StatusCode::OK), "zero_tail restore never succeeds: {answers:?}");
}

/// Writes from several concurrent clients with flush=n, over 1 and 2 NBD
/// connections, raw and qcow2, the daemon killed several times: no flush
/// ever answers 200 while a lost range was not written again, and after a
/// 200 a further kill loses nothing.
async fn concurrent_writers_and_kills(format: &str, connections: &str) {
    let dir = tempfile::tempdir().unwrap();
    let (_image, server) = serve(dir.path(), "disk", format, "32M", &["--nbd-connections", connections]).await;
    let chunks: Vec<Vec<u8>> = (0..8).map(|index| random_bytes(2 * MIB as usize, 100 + index)).collect();
    for round in 0..3 {
        // Four writers at once, flush=n.
        let writes: Vec<_> = (0..4u64)
            .map(|index| {
                let server_url = server.image_url("disk");
                let client = server.client();
                let data = chunks[(round * 4 + index as usize) % 8].clone();
                tokio::spawn(async move {
                    let offset = index * 8 * MIB;
                    let range = format!("bytes {offset}-{}/*", offset + data.len() as u64 - 1);
                    client.put(server_url + "?flush=n").header("content-range", range).body(data).send().await.map(|r| r.status())
                })
            })
            .collect();
        for write in writes {
            let status = write.await.unwrap().unwrap();
            assert_eq!(status, StatusCode::OK, "round {round}");
        }
        kill_daemon(&server).await;
        for attempt in 0..3 {
            let (status, text) = patch_retrying(&server, json!({"op": "flush"})).await;
            assert_eq!(status, StatusCode::BAD_GATEWAY, "round {round} flush {attempt} after a kill: {text}");
        }
        // Rewrite three of the four: still 502.
        let mut expected = vec![0u8; 32 * MIB as usize];
        for index in 0..4u64 {
            let data = &chunks[(round * 4 + index as usize) % 8];
            let offset = index * 8 * MIB;
            expected[offset as usize..offset as usize + data.len()].copy_from_slice(data);
        }
        for index in 0..3u64 {
            let data = &chunks[(round * 4 + index as usize) % 8];
            assert_eq!(put_retrying(&server, index * 8 * MIB, data, "?flush=n").await.0, StatusCode::OK);
        }
        let (status, text) = patch_retrying(&server, json!({"op": "flush"})).await;
        assert_eq!(status, StatusCode::BAD_GATEWAY, "round {round}: one range never written again: {text}");
        let data = &chunks[(round * 4 + 3) % 8];
        assert_eq!(put_retrying(&server, 3 * 8 * MIB, data, "?flush=n").await.0, StatusCode::OK);
        let (status, text) = patch_retrying(&server, json!({"op": "flush"})).await;
        assert_eq!(status, StatusCode::OK, "round {round}: everything written again: {text}");
        // A 200 flush is durable: another kill loses nothing.
        kill_daemon(&server).await;
        let image = read_back(&server).await;
        // Earlier rounds' data that was overwritten is the same layout, so compare the whole image.
        assert!(image == expected, "round {round}: after a 200 flush and a kill the image differs");
        let (status, text) = patch_retrying(&server, json!({"op": "flush"})).await;
        assert_eq!(status, StatusCode::OK, "round {round}: nothing unflushed, a flush after the kill is 200: {text}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attack_concurrent_writers_and_kills_qcow2_one_connection() {
    concurrent_writers_and_kills("qcow2", "1").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attack_concurrent_writers_and_kills_qcow2_two_connections() {
    concurrent_writers_and_kills("qcow2", "2").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attack_concurrent_writers_and_kills_raw_two_connections() {
    concurrent_writers_and_kills("raw", "2").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attack2_concurrent_writers_and_kills_qcow2_four_connections() {
    concurrent_writers_and_kills("qcow2", "4").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attack2_concurrent_writers_and_kills_raw_one_connection() {
    concurrent_writers_and_kills("raw", "1").await;
}

/// Numbers at the end of u64: every one a 4xx, the server still serves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attack_u64_max_numbers_are_refused_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let (_image, server) = serve(dir.path(), "disk", "qcow2", "4M", &[]).await;
    let max = u64::MAX;
    for body in [
        json!({"op": "zero", "offset": 0, "size": max}),
        json!({"op": "zero", "offset": max, "size": 1}),
        json!({"op": "zero", "offset": max, "size": 0}),
        json!({"op": "zero", "offset": 4 * MIB, "size": 0}),
        json!({"op": "zero", "offset": max - 1, "size": 2}),
        json!({"op": "zero", "offset": 1, "size": max}),
    ] {
        let (status, text) = patch_retrying(&server, body.clone()).await;
        assert!(status.is_client_error() || status == StatusCode::OK, "{body}: {status} {text}");
        eprintln!("{body} -> {status} {text}");
    }
    for range in [
        format!("bytes {max}-{max}/*"),
        format!("bytes 0-{max}/*"),
        format!("bytes {}-{max}/*", max - 1),
        format!("bytes 0-0/{max}"),
        "bytes 18446744073709551616-18446744073709551617/*".to_string(),
    ] {
        let response =
            server.client().put(server.image_url("disk")).header("content-range", &range).body(vec![1u8; 2]).send().await.unwrap();
        let status = response.status();
        let text = response.text().await.unwrap();
        assert!(status.is_client_error(), "Content-Range {range}: {status} {text}");
        let response = server
            .client()
            .get(server.image_url("disk"))
            .header("range", range.replace("bytes ", "bytes=").split('/').next().unwrap())
            .send()
            .await
            .unwrap();
        let status = response.status();
        assert!(status.is_client_error() || status == StatusCode::OK || status == StatusCode::PARTIAL_CONTENT, "Range {range}: {status}");
    }
    for (size, query) in [(max, ""), (max, "&zero_tail=y"), (0, ""), (4 * MIB + 1, ""), (max, "&force=y")] {
        let mut body = meta_frame(&json!({"virtual-size": size, "data-size": 0}));
        body.extend(frame("stop", 0, 0, &[]));
        let (status, text) = sparse_put(&server, query, body).await;
        eprintln!("meta virtual-size {size}{query} -> {status} {text}");
        assert!(status.is_client_error(), "meta virtual-size {size}{query}: {status} {text}");
    }
    // Frames at the end of u64.
    let mut body = meta_frame(&json!({"virtual-size": 4 * MIB, "data-size": 0, "incremental": true}));
    body.extend(frame("zero", max, max, &[]));
    body.extend(frame("stop", 0, 0, &[]));
    let (status, text) = sparse_put(&server, "&force=y", body).await;
    assert!(status.is_client_error(), "zero frame at u64::MAX: {status} {text}");
    let response = server.client().get(server.url("/info/")).send().await.unwrap();
    assert!(response.status().is_success(), "the server still serves");
}

/// Attack: a meta frame of virtual-size 0 is refused as "0 size"... unless
/// zero_tail=y: then an empty stream (0 frames) is a 200 that zeroes the
/// whole image. The change's rule says a missing/0 size is a 400 before any
/// write; a client whose meta lost its size wipes the disk instead.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attack_a_zero_size_stream_with_zero_tail_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (_image, server) = serve(dir.path(), "disk", "qcow2", "4M", &[]).await;
    let data = random_bytes(4 * MIB as usize, 21);
    assert_eq!(put_retrying(&server, 0, &data, "").await.0, StatusCode::OK);
    let mut body = meta_frame(&json!({"virtual-size": 0, "data-size": 0}));
    body.extend(frame("stop", 0, 0, &[]));
    let (status, text) = sparse_put(&server, "&zero_tail=y", body).await;
    let wiped = read_back(&server).await.iter().all(|&byte| byte == 0);
    assert!(status.is_client_error(), "virtual-size 0 with zero_tail=y: {status} {text} (image wiped: {wiped})");
}

/// A restore whose client goes away mid-body, and one whose ticket is
/// deleted mid-restore, must not leave the image 409 for ever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attack_a_restore_cut_off_mid_body_releases_its_claim() {
    let dir = tempfile::tempdir().unwrap();
    let (_image, server) = serve(dir.path(), "disk", "qcow2", "16M", &[]).await;
    let size = 16 * MIB;
    let data = random_bytes(4 * MIB as usize, 11);
    let body = stream(json!({"virtual-size": size, "data-size": 4 * MIB}), &data, size);
    for cut in [100usize, 2 * MIB as usize] {
        let (sender, mut receiver) = tokio::sync::mpsc::channel::<Result<Vec<u8>, std::io::Error>>(2);
        let stream = futures::stream::poll_fn(move |context| receiver.poll_recv(context));
        let request = server.client().put(server.image_url("disk") + "?format=sparse").body(reqwest::Body::wrap_stream(stream)).send();
        let response = tokio::spawn(request);
        sender.send(Ok(body[..cut].to_vec())).await.unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
        // While it runs, other writes are 409.
        let range = "bytes 0-0/*";
        let status =
            server.client().put(server.image_url("disk")).header("content-range", range).body(vec![1u8]).send().await.unwrap().status();
        assert_eq!(status, StatusCode::CONFLICT, "a write during a restore");
        sender.send(Err(std::io::Error::other("client goes away"))).await.unwrap();
        drop(sender);
        let _ = response.await.unwrap();
        let mut last = StatusCode::CONFLICT;
        for _ in 0..50 {
            last =
                server.client().put(server.image_url("disk")).header("content-range", range).body(vec![1u8]).send().await.unwrap().status();
            if last != StatusCode::CONFLICT {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert_eq!(last, StatusCode::OK, "cut at {cut}: the image stays 409 after the restore's client left");
    }
}

/// A restore with force=y of an incremental without since; a second
/// restore during the first; a PATCH zero during it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attack_restore_claims_under_force_and_zero() {
    let dir = tempfile::tempdir().unwrap();
    let (_image, server) = serve(dir.path(), "disk", "qcow2", "16M", &[]).await;
    let (sender, mut receiver) = tokio::sync::mpsc::channel::<Result<Vec<u8>, std::io::Error>>(2);
    let stream = futures::stream::poll_fn(move |context| receiver.poll_recv(context));
    let data = random_bytes(MIB as usize, 12);
    let mut body = meta_frame(&json!({"virtual-size": 16 * MIB, "data-size": MIB, "incremental": true}));
    body.extend(frame("data", 4 * MIB, MIB, &data));
    body.extend(frame("stop", 0, 0, &[]));
    let request = server.client().put(server.image_url("disk") + "?format=sparse&force=y").body(reqwest::Body::wrap_stream(stream)).send();
    let response = tokio::spawn(request);
    sender.send(Ok(body[..200].to_vec())).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (status, text) = patch_retrying(&server, json!({"op": "zero", "offset": 0, "size": MIB})).await;
    assert_eq!(status, StatusCode::CONFLICT, "PATCH zero during a forced restore: {text}");
    let other = stream_whole(&server).await;
    assert_eq!(other, StatusCode::CONFLICT, "a second restore during the first");
    sender.send(Ok(body[200..].to_vec())).await.unwrap();
    drop(sender);
    let response = response.await.unwrap().unwrap();
    let status = response.status();
    assert_eq!(status, StatusCode::OK, "forced incremental: {}", response.text().await.unwrap());
    let image = read_back(&server).await;
    assert!(image[4 * MIB as usize..5 * MIB as usize] == data[..]);
}

async fn stream_whole(server: &Server) -> StatusCode {
    let body = stream(json!({"virtual-size": 16 * MIB, "data-size": 1}), &[1u8], 16 * MIB);
    server.client().put(server.image_url("disk") + "?format=sparse").body(body).send().await.unwrap().status()
}

/// The CLI uploads with --connections 4 while the daemon is killed at
/// random moments: whenever it exits 0 the target holds the source's bytes,
/// also after one more kill (the upload's flush made them stable). A new
/// server each round, so that the restart backoff of a crash loop stays
/// short.
async fn cli_upload_with_daemon_kills(format: &str, nbd_connections: &str, rounds: u64) {
    cli_upload_with_daemon_kills_n(format, nbd_connections, rounds, 1).await;
}

async fn cli_upload_with_daemon_kills_n(format: &str, nbd_connections: &str, rounds: u64, kills: usize) {
    use rand::{Rng, SeedableRng};
    let seed = rand::random::<u64>();
    eprintln!("seed {seed}");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let guard = tempfile::tempdir().unwrap();
    let top = guard.path().to_path_buf();
    let mut outcomes = Vec::new();
    for round in 0..rounds {
        let dir = top.join(format!("round-{round}"));
        std::fs::create_dir(&dir).unwrap();
        let (_image, server) = serve(&dir, "disk", format, "48M", &["--nbd-connections", nbd_connections]).await;
        // Old data on the target, so that a lost write shows.
        let old = random_bytes(48 * MIB as usize, 5000 + round);
        assert_eq!(put_retrying(&server, 0, &old, "").await.0, StatusCode::OK);
        // A source with data and holes, different each round.
        let source = dir.join("source.raw");
        let mut bytes = vec![0u8; 48 * MIB as usize];
        for piece in 0..24u64 {
            if (piece + round) % 3 != 0 {
                let chunk = random_bytes(MIB as usize, 1000 * round + piece);
                bytes[(piece * 2 * MIB) as usize..(piece * 2 * MIB + MIB) as usize].copy_from_slice(&chunk);
            }
        }
        std::fs::write(&source, &bytes).unwrap();
        let cli = Command::new(binary("blockgate"))
            .arg("--cacert")
            .arg(server.ca())
            .args(["upload", "--connections", "4", source.to_str().unwrap(), &server.image_url("disk")])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let delay = rng.random_range(20..800);
        tokio::time::sleep(Duration::from_millis(delay)).await;
        let [mut pid] = daemon_pids(&server)[..] else { panic!("one daemon") };
        let _ = kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
        for _ in 1..kills {
            let gone = pid;
            wait_until("a new daemon runs", async || daemon_pids(&server).iter().any(|&other| other != gone)).await;
            tokio::time::sleep(Duration::from_millis(rng.random_range(50..300))).await;
            if let [next] = daemon_pids(&server)[..] {
                pid = next;
                let _ = kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
            }
        }
        let output = tokio::task::spawn_blocking(move || cli.wait_with_output().unwrap()).await.unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr).to_string();
        outcomes.push((round, delay, output.status.code(), stderr.lines().last().unwrap_or("").to_string()));
        wait_until("a new daemon runs", async || daemon_pids(&server).iter().any(|&other| other != pid)).await;
        if output.status.success() {
            let image = read_back(&server).await;
            assert!(image == bytes, "round {round} (seed {seed}, kill after {delay} ms): the CLI exited 0 but the image differs: {stderr}");
            kill_daemon(&server).await;
            let image = read_back(&server).await;
            assert!(image == bytes, "round {round} (seed {seed}, kill after {delay} ms): exit 0, then a kill lost data: {stderr}");
        } else {
            assert_eq!(output.status.code(), Some(1), "round {round}: {stderr}");
        }
    }
    eprintln!("{outcomes:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attack_cli_upload_with_daemon_kills_exits_0_only_when_exact_qcow2() {
    cli_upload_with_daemon_kills("qcow2", "2", 8).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attack_cli_upload_with_three_daemon_kills_exits_0_only_when_exact_qcow2() {
    cli_upload_with_daemon_kills_n("qcow2", "2", 6, 3).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attack_cli_upload_with_daemon_kills_exits_0_only_when_exact_raw_one_connection() {
    cli_upload_with_daemon_kills("raw", "1", 6).await;
}

/// Attack (bad luck: storage that hangs for longer than --nbd-timeout): a
/// write that timed out (502 to its client, connection replaced) is still
/// in the frozen daemon's socket and lands when the daemon wakes, possibly
/// after a later write of other bytes to the same range that was answered
/// 200 and flushed 200. The ledger tracks only acknowledged writes, so
/// nothing reports it. Frozen with SIGSTOP; 3 NBD connections so that a
/// connection is left for the later write; rounds vary which slot the
/// round robin gives each request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attack_a_timed_out_write_lands_after_a_later_write_that_was_flushed_200() {
    let mut log = Vec::new();
    for round in 0..6usize {
        let dir = tempfile::tempdir().unwrap();
        let (_image, server) = serve(dir.path(), "disk", "raw", "16M", &["--nbd-connections", "3", "--nbd-timeout", "1"]).await;
        // Connect every slot, and vary the round robin's position.
        for _ in 0..(3 + round) {
            assert_eq!(put_retrying(&server, 8 * MIB, &[7u8; 512], "").await.0, StatusCode::OK);
        }
        let stale = random_bytes(MIB as usize, 31);
        let fresh = vec![0xabu8; 4096];
        let [pid] = daemon_pids(&server)[..] else { panic!("one daemon") };
        kill(Pid::from_raw(pid as i32), Signal::SIGSTOP).unwrap();
        let range = format!("bytes 0-{}/*", stale.len() - 1);
        let response = server
            .client()
            .put(server.image_url("disk") + "?flush=n")
            .header("content-range", range)
            .body(stale.clone())
            .send()
            .await
            .unwrap();
        let stale_status = response.status();
        let flush_frozen = server.client().patch(server.image_url("disk")).json(&json!({"op": "flush"})).send().await.unwrap().status();
        let later = {
            let client = server.client();
            let url = server.image_url("disk");
            let fresh = fresh.clone();
            tokio::spawn(async move {
                let response = client.put(url + "?flush=n").header("content-range", "bytes 0-4095/*").body(fresh).send().await.unwrap();
                response.status()
            })
        };
        tokio::time::sleep(Duration::from_millis(300)).await;
        kill(Pid::from_raw(pid as i32), Signal::SIGCONT).unwrap();
        let later_status = later.await.unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
        let flush = server.client().patch(server.image_url("disk")).json(&json!({"op": "flush"})).send().await.unwrap();
        let flush_status = flush.status();
        let flush_text = flush.text().await.unwrap();
        let image = read_back(&server).await;
        let holds = if image[..4096] == fresh[..] {
            "fresh"
        } else if image[..4096] == stale[..4096] {
            "STALE"
        } else {
            "other"
        };
        log.push(format!("round {round}: stale PUT {stale_status}, flush while frozen {flush_frozen}, later PUT {later_status}, flush {flush_status} {flush_text:?}, image holds {holds}"));
        if later_status == StatusCode::OK && flush_status == StatusCode::OK {
            assert_eq!(holds, "fresh", "{}", log.join("\n"));
        }
    }
    eprintln!("{}", log.join("\n"));
}

/// A client that goes away while its write is in flight releases the
/// image's claim at once, though the write goes on: a restore is admitted
/// ("a restore does not start while writes run"), answers 200, and then
/// the abandoned write lands over what the restore wrote.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attack_a_cancelled_write_keeps_its_claim_until_its_nbd_write_ends() {
    let dir = tempfile::tempdir().unwrap();
    let (_slow, file) = slow_store(dir.path(), 5, 0, 0);
    let server =
        Server::try_start(dir.path(), &[format!("disk={}", _slow.uri())], &["--nbd-timeout", "30"]).await.unwrap_or_else(|e| panic!("{e}"));
    let stale = random_bytes(MIB as usize, 51);
    let request = server
        .client()
        .put(server.image_url("disk"))
        .header("content-range", format!("bytes 0-{}/*", stale.len() - 1))
        .body(stale.clone())
        .send();
    let abandoned = tokio::spawn(request);
    tokio::time::sleep(Duration::from_millis(700)).await;
    abandoned.abort();
    let _ = abandoned.await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let fresh = vec![0xcdu8; 4096];
    let body = stream(json!({"virtual-size": 16 * MIB, "data-size": 4096}), &fresh, 16 * MIB);
    let response = server.client().put(server.image_url("disk") + "?format=sparse").body(body).send().await.unwrap();
    let restore_status = response.status();
    let restore_text = response.text().await.unwrap();
    let right_after = std::fs::read(&file).unwrap();
    tokio::time::sleep(Duration::from_secs(6)).await;
    let later = std::fs::read(&file).unwrap();
    let holds = |bytes: &[u8]| {
        if bytes[..4096] == fresh[..] {
            "the restore's"
        } else if bytes[..4096] == stale[..4096] {
            "THE ABANDONED WRITE'S"
        } else {
            "other"
        }
    };
    let summary = format!(
        "restore while the abandoned write runs: {restore_status} {restore_text:?}; first 4 KiB right after: {}, 6 s later: {}",
        holds(&right_after),
        holds(&later)
    );
    eprintln!("{summary}");
    assert!(restore_status != StatusCode::OK || holds(&later) == "the restore's", "{summary}");
}

/// Two tickets on one image file: the second is refused, or the two share
/// the restore claim ("through any ticket"), and one's lost writes are not
/// hidden by the other.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attack_two_tickets_on_one_image() {
    let dir = tempfile::tempdir().unwrap();
    let root = std::fs::canonicalize(dir.path()).unwrap();
    let image = root.join("disk.raw");
    std::fs::write(&image, vec![0u8; 16 * MIB as usize]).unwrap();
    let (server, control) = start_with_control(&root, &[]).await;
    let a = control.add(&ticket("a", &image, &["read", "write"], 300)).await;
    let b = control.add(&ticket("b", &image, &["read", "write"], 300)).await;
    let r = control.add(&ticket("r", &image, &["read"], 300)).await;
    eprintln!("ticket a: {a}, ticket b: {b}, read-only ticket r: {r}; daemons: {}", daemon_pids(&server).len());
    if a == StatusCode::OK && b == StatusCode::OK {
        // Both writable: a restore through a must make b's writes 409.
        let (sender, mut receiver) = tokio::sync::mpsc::channel::<Result<Vec<u8>, std::io::Error>>(2);
        let body_stream = futures::stream::poll_fn(move |context| receiver.poll_recv(context));
        let data = vec![1u8; 4096];
        let body = stream(json!({"virtual-size": 16 * MIB, "data-size": 4096}), &data, 16 * MIB);
        let request = server.client().put(server.image_url("a") + "?format=sparse").body(reqwest::Body::wrap_stream(body_stream)).send();
        let response = tokio::spawn(request);
        sender.send(Ok(body[..100].to_vec())).await.unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
        let status = server
            .client()
            .put(server.image_url("b"))
            .header("content-range", "bytes 0-0/*")
            .body(vec![9u8])
            .send()
            .await
            .unwrap()
            .status();
        sender.send(Ok(body[100..].to_vec())).await.unwrap();
        drop(sender);
        let restored = response.await.unwrap().unwrap().status();
        assert_eq!(status, StatusCode::CONFLICT, "a write through ticket b while a restore runs through ticket a (restore: {restored})");
    }
}

/// Two writable tickets on one qcow2 file (held: the second is refused, 400). Were both opened: two qemu-storage-daemons with
/// the file open read-write, each with its own metadata cache. Writes
/// through both corrupt the qcow2 (qemu-img check) or lose one's data.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attack_two_writable_tickets_on_one_qcow2_must_not_both_open() {
    let dir = tempfile::tempdir().unwrap();
    let root = std::fs::canonicalize(dir.path()).unwrap();
    let image = root.join("disk.qcow2");
    create_image(&image, "qcow2", "16M");
    let (server, control) = start_with_control(&root, &[]).await;
    let a = qcow2_ticket("a", &image, &["read", "write"], 16 * MIB);
    let mut b = a.clone();
    b["uuid"] = json!("b");
    let added_a = control.add(&a).await;
    let added_b = control.add(&b).await;
    eprintln!("qcow2 ticket a: {added_a}, ticket b: {added_b}; daemons: {}", daemon_pids(&server).len());
    if added_a != StatusCode::OK || added_b != StatusCode::OK {
        return;
    }
    let one = random_bytes(4 * MIB as usize, 61);
    let two = random_bytes(4 * MIB as usize, 62);
    let put = |ticket: &str, offset: u64, data: &[u8]| {
        server
            .client()
            .put(server.image_url(ticket))
            .header("content-range", format!("bytes {offset}-{}/*", offset + data.len() as u64 - 1))
            .body(data.to_vec())
            .send()
    };
    let s1 = put("a", 0, &one).await.unwrap().status();
    let s2 = put("b", 8 * MIB, &two).await.unwrap().status();
    assert_eq!(control.delete("a").await, StatusCode::NO_CONTENT);
    assert_eq!(control.delete("b").await, StatusCode::NO_CONTENT);
    let check = Command::new("qemu-img").args(["check", "-f", "qcow2", image.to_str().unwrap()]).output().unwrap();
    let check_text = String::from_utf8_lossy(&check.stdout).to_string() + &String::from_utf8_lossy(&check.stderr);
    let view = Command::new("qemu-img")
        .args(["convert", "-f", "qcow2", "-O", "raw", image.to_str().unwrap(), root.join("view.raw").to_str().unwrap()])
        .output()
        .unwrap();
    let bytes = std::fs::read(root.join("view.raw")).unwrap_or_default();
    let has_one = bytes.len() >= 4 * MIB as usize && bytes[..4 * MIB as usize] == one[..];
    let has_two = bytes.len() >= 12 * MIB as usize && bytes[8 * MIB as usize..12 * MIB as usize] == two[..];
    let summary = format!(
        "PUT a {s1}, PUT b {s2}; qemu-img check: {} {check_text}; convert ok: {}; image has a's data: {has_one}, b's: {has_two}",
        check.status,
        view.status.success()
    );
    eprintln!("{summary}");
    assert!(check.status.success() && has_one && has_two, "{summary}");
}

/// A ticket deleted while a restore through it waits for its body: the
/// claim must go with it, or a new ticket on the same file is 409 for ever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attack_a_ticket_deleted_mid_restore_leaves_no_claim() {
    let dir = tempfile::tempdir().unwrap();
    let root = std::fs::canonicalize(dir.path()).unwrap();
    let image = root.join("disk.raw");
    std::fs::write(&image, vec![0u8; 16 * MIB as usize]).unwrap();
    let (server, control) = start_with_control(&root, &["--cancel-timeout", "2"]).await;
    assert_eq!(control.add(&ticket("a", &image, &["read", "write"], 300)).await, StatusCode::OK);
    let (sender, mut receiver) = tokio::sync::mpsc::channel::<Result<Vec<u8>, std::io::Error>>(2);
    let body_stream = futures::stream::poll_fn(move |context| receiver.poll_recv(context));
    let data = vec![1u8; 4096];
    let body = stream(json!({"virtual-size": 16 * MIB, "data-size": 4096}), &data, 16 * MIB);
    let request = server.client().put(server.image_url("a") + "?format=sparse").body(reqwest::Body::wrap_stream(body_stream)).send();
    let response = tokio::spawn(request);
    sender.send(Ok(body[..100].to_vec())).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let deleted = control.delete("a").await;
    eprintln!("DELETE during the restore: {deleted}");
    let mut statuses = Vec::new();
    // The client keeps its connection open and silent.
    assert_eq!(control.add(&ticket("b", &image, &["read", "write"], 300)).await, StatusCode::OK);
    for _ in 0..30 {
        let status = server
            .client()
            .put(server.image_url("b"))
            .header("content-range", "bytes 0-0/*")
            .body(vec![9u8])
            .send()
            .await
            .unwrap()
            .status();
        statuses.push(status);
        if status == StatusCode::OK {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    drop(sender);
    let _ = response.await;
    assert_eq!(statuses.last(), Some(&StatusCode::OK), "DELETE {deleted}; writes through a new ticket: {statuses:?}");
}

/// The restore claim is keyed by the resolved path: two tickets on one raw
/// file through two hard links (two daemons, both writable) are two
/// targets, so a write runs through one while a restore runs through the
/// other.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attack_a_hard_link_shares_the_restore_claim() {
    let dir = tempfile::tempdir().unwrap();
    let root = std::fs::canonicalize(dir.path()).unwrap();
    let image = root.join("disk.raw");
    std::fs::write(&image, vec![0u8; 16 * MIB as usize]).unwrap();
    let link = root.join("link.raw");
    std::fs::hard_link(&image, &link).unwrap();
    let (server, control) = start_with_control(&root, &[]).await;
    assert_eq!(control.add(&ticket("a", &image, &["read", "write"], 300)).await, StatusCode::OK);
    let b = control.add(&ticket("b", &link, &["read", "write"], 300)).await;
    if b != StatusCode::OK {
        eprintln!("second ticket through a hard link: {b}");
        return;
    }
    let (sender, mut receiver) = tokio::sync::mpsc::channel::<Result<Vec<u8>, std::io::Error>>(2);
    let body_stream = futures::stream::poll_fn(move |context| receiver.poll_recv(context));
    let data = vec![1u8; 4096];
    let body = stream(json!({"virtual-size": 16 * MIB, "data-size": 4096}), &data, 16 * MIB);
    let request = server.client().put(server.image_url("a") + "?format=sparse").body(reqwest::Body::wrap_stream(body_stream)).send();
    let response = tokio::spawn(request);
    sender.send(Ok(body[..100].to_vec())).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let status =
        server.client().put(server.image_url("b")).header("content-range", "bytes 0-0/*").body(vec![9u8]).send().await.unwrap().status();
    sender.send(Ok(body[100..].to_vec())).await.unwrap();
    drop(sender);
    let _ = response.await;
    assert_eq!(status, StatusCode::CONFLICT, "a write through a hard link of a file a restore runs into");
}

/// The CLI uploads a local qcow2 as qcow2 (by its name), and qemu-nbd
/// follows whatever its header names: a downloaded (hostile) disk.qcow2
/// whose backing file is the user's private key uploads the key. The
/// server refuses such links for its own images; the CLI has no such rule
/// and says nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attack_cli_upload_of_a_hostile_qcow2_sends_no_host_file() {
    let dir = tempfile::tempdir().unwrap();
    let root = std::fs::canonicalize(dir.path()).unwrap();
    let (_image, server) = serve(&root, "disk", "raw", "1M", &[]).await;
    let home = root.join("home");
    std::fs::create_dir_all(home.join(".ssh")).unwrap();
    let key = home.join(".ssh/id_ed25519");
    let mut secret = b"-----BEGIN OPENSSH PRIVATE KEY----- the user's key".to_vec();
    secret.resize(MIB as usize, b'k');
    std::fs::write(&key, &secret).unwrap();
    let downloads = root.join("downloads");
    std::fs::create_dir(&downloads).unwrap();
    let hostile = downloads.join("appliance.qcow2");
    run("qemu-img", &["create", "-q", "-f", "qcow2", "-u", "-b", key.to_str().unwrap(), "-F", "raw", hostile.to_str().unwrap(), "1M"]);
    let output = Command::new(binary("blockgate"))
        .arg("--cacert")
        .arg(server.ca())
        .args(["upload", hostile.to_str().unwrap(), &server.image_url("disk")])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr).to_string();
    let image = read_back(&server).await;
    let leaked = image.starts_with(b"-----BEGIN OPENSSH PRIVATE KEY");
    assert!(!leaked, "upload exit {:?}: the server now holds the user's key; the CLI said: {stderr}", output.status.code());
}

/// The image replaced by a FIFO, then the daemon killed: the restart must
/// refuse without hanging (requests 502 or 503, the server answers), and
/// serve again once the file is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attack_a_fifo_swapped_in_before_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let root = std::fs::canonicalize(dir.path()).unwrap();
    let (image, server) = serve(&root, "disk", "raw", "4M", &[]).await;
    let data = random_bytes(4 * MIB as usize, 81);
    assert_eq!(put_retrying(&server, 0, &data, "").await.0, StatusCode::OK);
    let aside = root.join("aside.raw");
    std::fs::rename(&image, &aside).unwrap();
    assert!(Command::new("mkfifo").arg(&image).status().unwrap().success());
    let [old] = daemon_pids(&server)[..] else { panic!() };
    kill(Pid::from_raw(old as i32), Signal::SIGKILL).unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let started = std::time::Instant::now();
    let response =
        server.client().get(server.image_url("disk")).header("range", "bytes=0-4095").timeout(Duration::from_secs(20)).send().await;
    let status = response.as_ref().map(|r| r.status()).map_err(|e| e.to_string());
    eprintln!("GET with a FIFO in place: {status:?} after {:?}; daemons {:?}", started.elapsed(), daemon_pids(&server));
    assert!(matches!(status, Ok(s) if s.is_server_error()), "{status:?}");
    // A FIFO has no writer: anything that opened it for reading would hang; the server answers.
    let info = server.client().get(server.url("/info/")).timeout(Duration::from_secs(5)).send().await.unwrap().status();
    assert!(info.is_success());
    std::fs::remove_file(&image).unwrap();
    std::fs::rename(&aside, &image).unwrap();
    let back = read_back(&server).await;
    assert!(back == data, "served again, same bytes");
}

/// An incremental restore that ends 502 "writes may be lost" (the daemon
/// died under it): the answer says to start the transfer over, the CLI says
/// "run the restore again from the start"; run again, the same incremental
/// is refused 409 (the record was cleared when it was admitted), so the
/// whole chain must be restored again, or force=y used.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attack_an_incremental_that_lost_writes_can_be_run_again_and_only_it() {
    let dir = tempfile::tempdir().unwrap();
    let (_image, server) = serve(dir.path(), "disk", "qcow2", "16M", &[]).await;
    let size = 16 * MIB;
    let base = random_bytes(MIB as usize, 91);
    let mut meta = json!({"virtual-size": size, "data-size": MIB, "checkpoint": "c1"});
    let full = stream(meta.clone(), &base, size);
    let (status, text) = sparse_put(&server, "", full).await;
    assert_eq!(status, StatusCode::OK, "{text}");
    let one = random_bytes(MIB as usize, 92);
    let two = random_bytes(MIB as usize, 93);
    meta = json!({"virtual-size": size, "data-size": 2 * MIB, "incremental": true, "since": "c1", "checkpoint": "c2"});
    let mut first = meta_frame(&meta);
    first.extend(frame("data", 4 * MIB, MIB, &one));
    let mut second = frame("data", 8 * MIB, MIB, &two);
    second.extend(frame("stop", 0, 0, &[]));
    let whole: Vec<u8> = first.iter().chain(second.iter()).copied().collect();
    let (sender, mut receiver) = tokio::sync::mpsc::channel::<Result<Vec<u8>, std::io::Error>>(2);
    let body_stream = futures::stream::poll_fn(move |context| receiver.poll_recv(context));
    let request = server.client().put(server.image_url("disk") + "?format=sparse").body(reqwest::Body::wrap_stream(body_stream)).send();
    let response = tokio::spawn(request);
    sender.send(Ok(first)).await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    kill_daemon(&server).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    sender.send(Ok(second)).await.unwrap();
    drop(sender);
    let response = response.await.unwrap().unwrap();
    let failed = (response.status(), response.text().await.unwrap());
    assert_ne!(failed.0, StatusCode::OK);
    // Another incremental from c1 would land on part of this one: refused.
    let mut other = meta_frame(&json!({"virtual-size": size, "data-size": MIB, "incremental": true, "since": "c1", "checkpoint": "c9"}));
    other.extend(frame("data", 0, MIB, &two));
    other.extend(frame("stop", 0, 0, &[]));
    let (status, text) = sparse_put(&server, "", other).await;
    assert_eq!(status, StatusCode::CONFLICT, "{text}");
    assert!(text.contains("apply that incremental again"), "{text}");
    let again = sparse_put(&server, "", whole.clone()).await;
    assert_eq!(again.0, StatusCode::OK, "after {failed:?}, running the incremental again: {again:?}");
}

/// A read-only ticket next to a writable one on the same qcow2: a second
/// daemon with its own metadata cache reads what the first writes (and
/// flushes): does it see it?
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attack_a_read_only_ticket_beside_a_writable_one_on_a_qcow2() {
    let dir = tempfile::tempdir().unwrap();
    let root = std::fs::canonicalize(dir.path()).unwrap();
    let image = root.join("disk.qcow2");
    create_image(&image, "qcow2", "16M");
    let (server, control) = start_with_control(&root, &[]).await;
    let a = qcow2_ticket("a", &image, &["read", "write"], 16 * MIB);
    let r = qcow2_ticket("r", &image, &["read"], 16 * MIB);
    let added_a = control.add(&a).await;
    let added_r = control.add(&r).await;
    eprintln!("qcow2 writable ticket: {added_a}, read-only ticket: {added_r}");
    if added_r != StatusCode::OK {
        return;
    }
    let data = random_bytes(4 * MIB as usize, 95);
    let status = server
        .client()
        .put(server.image_url("a"))
        .header("content-range", format!("bytes 0-{}/*", data.len() - 1))
        .body(data.clone())
        .send()
        .await
        .unwrap()
        .status();
    assert_eq!(status, StatusCode::OK);
    let read = server.client().get(server.image_url("r")).header("range", format!("bytes=0-{}", data.len() - 1)).send().await.unwrap();
    let read_status = read.status();
    let bytes = read.bytes().await.unwrap();
    assert!(
        bytes[..] == data[..],
        "the read-only ticket reads {} bytes ({read_status}) that are not what the writable ticket wrote and flushed",
        bytes.len()
    );
}

/// The CLI's size rules: larger is exit 2 even with --zero-tail; smaller
/// without it is exit 2 and writes nothing; smaller with it is exact (an
/// odd size too).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attack_cli_upload_sizes() {
    let dir = tempfile::tempdir().unwrap();
    let root = std::fs::canonicalize(dir.path()).unwrap();
    let (_image, server) = serve(&root, "disk", "qcow2", "4M", &[]).await;
    let old = random_bytes(4 * MIB as usize, 96);
    assert_eq!(put_retrying(&server, 0, &old, "").await.0, StatusCode::OK);
    let upload = |file: &Path, extra: &[&str]| {
        let mut command = Command::new(binary("blockgate"));
        command.arg("--cacert").arg(server.ca()).arg("upload").args(extra).arg(file).arg(server.image_url("disk"));
        command.output().unwrap()
    };
    let larger = root.join("larger.raw");
    std::fs::write(&larger, random_bytes(4 * MIB as usize + 512, 97)).unwrap();
    let output = upload(&larger, &["--zero-tail"]);
    assert_eq!(output.status.code(), Some(2), "larger with --zero-tail: {}", String::from_utf8_lossy(&output.stderr));
    let smaller = root.join("smaller.raw");
    let small = random_bytes(3 * MIB as usize + 777, 98);
    std::fs::write(&smaller, &small).unwrap();
    let output = upload(&smaller, &[]);
    assert_eq!(output.status.code(), Some(2), "smaller: {}", String::from_utf8_lossy(&output.stderr));
    assert!(read_back(&server).await == old, "nothing written");
    let output = upload(&smaller, &["--zero-tail"]);
    assert_eq!(output.status.code(), Some(0), "smaller with --zero-tail: {}", String::from_utf8_lossy(&output.stderr));
    let mut expected = small.clone();
    expected.resize(4 * MIB as usize, 0);
    assert!(read_back(&server).await == expected, "the odd-sized file then zeros");
}
