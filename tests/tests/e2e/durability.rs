//! Nothing lost is ever reported as saved: writes a qemu-storage-daemon
//! acknowledged and lost in a `kill -9` fail every later flush until they
//! are written again (raw and qcow2), a sparse restore that spans a crash
//! never ends 200, a stream whose meta frame does not fit the target is
//! refused before it writes, and a restore has its target to itself.

use std::time::Duration;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::common::*;

/// A server with one qcow2 image `disk` of `size` in a new directory.
async fn serve_disk(size: &str) -> (tempfile::TempDir, std::path::PathBuf, Server) {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.qcow2");
    let server = Server::start(dir.path(), &[format!("disk={},size={size}", image.display())]).await;
    (dir, image, server)
}

async fn patch(server: &Server, body: Value) -> (StatusCode, String) {
    let response = server.client().patch(server.image_url("disk")).json(&body).send().await.unwrap();
    (response.status(), response.text().await.unwrap())
}

async fn writes_lost_in_a_crash_fail_every_flush_until_written_again(format: &str) {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join(format!("disk.{format}"));
    let server = Server::start(dir.path(), &[format!("disk={},size=64M,format={format}", image.display())]).await;
    let first = random_bytes(8 * MIB as usize, 1);
    assert_eq!(put_retrying(&server, 0, &first, "?flush=n").await.0, StatusCode::OK);
    kill_daemon(&server).await;
    let second = random_bytes(MIB as usize, 2);
    assert_eq!(put_retrying(&server, 32 * MIB, &second, "?flush=n").await.0, StatusCode::OK, "a write after the restart lands");
    for attempt in 0..3 {
        let (status, text) = patch(&server, json!({"op": "flush"})).await;
        assert_eq!(status, StatusCode::BAD_GATEWAY, "flush attempt {attempt}: {text}");
        assert!(text.contains("writes may be lost") && text.contains("start the transfer over"), "{text}");
    }
    let (status, text) = put_retrying(&server, 40 * MIB, &second, "").await;
    assert_eq!(status, StatusCode::BAD_GATEWAY, "a PUT's own flush reports the loss too: {text}");
    let (status, _) = patch(&server, json!({"op": "zero", "offset": 0, "size": MIB, "flush": true})).await;
    assert_eq!(status, StatusCode::BAD_GATEWAY, "7 MiB are still lost");
    // Written again (the first MiB as zeros, the rest as data): stable.
    assert_eq!(put_retrying(&server, MIB, &first[MIB as usize..], "?flush=n").await.0, StatusCode::OK);
    let (status, text) = patch(&server, json!({"op": "flush"})).await;
    assert_eq!(status, StatusCode::OK, "{text}");
    let view = raw_view(&image);
    assert!(view[..MIB as usize].iter().all(|&byte| byte == 0));
    assert!(view[MIB as usize..8 * MIB as usize] == first[MIB as usize..]);
    assert!(view[32 * MIB as usize..33 * MIB as usize] == second[..]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qcow2_writes_lost_in_a_crash_fail_every_flush_until_written_again() {
    writes_lost_in_a_crash_fail_every_flush_until_written_again("qcow2").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raw_writes_lost_in_a_crash_fail_every_flush_until_written_again() {
    writes_lost_in_a_crash_fail_every_flush_until_written_again("raw").await;
}

/// A PUT whose body the test feeds: the sender and the pending response.
struct SlowPut {
    sender: tokio::sync::mpsc::Sender<Result<Vec<u8>, std::io::Error>>,
    response: tokio::task::JoinHandle<(StatusCode, String)>,
}

impl SlowPut {
    fn start(server: &Server, query: &str, headers: &[(&str, String)]) -> SlowPut {
        let (sender, receiver) = tokio::sync::mpsc::channel(4);
        let body = reqwest::Body::wrap_stream(tokio_stream(receiver));
        let mut request = server.client().put(server.image_url("disk") + query).body(body);
        for (name, value) in headers {
            request = request.header(*name, value);
        }
        let response = tokio::spawn(async move {
            let response = request.send().await.unwrap();
            (response.status(), response.text().await.unwrap())
        });
        SlowPut { sender, response }
    }

    async fn send(&self, bytes: Vec<u8>) {
        self.sender.send(Ok(bytes)).await.unwrap();
    }

    async fn finish(self) -> (StatusCode, String) {
        drop(self.sender);
        self.response.await.unwrap()
    }
}

fn tokio_stream(
    mut receiver: tokio::sync::mpsc::Receiver<Result<Vec<u8>, std::io::Error>>,
) -> impl futures::Stream<Item = Result<Vec<u8>, std::io::Error>> {
    futures::stream::poll_fn(move |context| receiver.poll_recv(context))
}

fn full_meta(size: u64, data_size: u64, checkpoint: Option<&str>) -> Value {
    let mut meta = json!({"virtual-size": size, "data-size": data_size});
    if let Some(checkpoint) = checkpoint {
        meta["checkpoint"] = json!(checkpoint);
    }
    meta
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restore_that_spans_a_daemon_crash_never_ends_200() {
    let (_dir, image, server) = serve_disk("64M").await;
    let data = random_bytes(16 * MIB as usize, 3);
    let whole = stream(full_meta(64 * MIB, data.len() as u64, Some("c1")), &data, 64 * MIB);
    let (head, rest) = whole.split_at(whole.len() - 80);
    let restore = SlowPut::start(&server, "?format=sparse", &[]);
    restore.send(head.to_vec()).await;
    // The data frame is written and acknowledged (qcow2 metadata may
    // still be in the daemon's memory); then the daemon dies.
    tokio::time::sleep(Duration::from_secs(1)).await;
    kill_daemon(&server).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    restore.send(rest.to_vec()).await;
    let (status, text) = restore.finish().await;
    assert_eq!(status, StatusCode::BAD_GATEWAY, "{text}");
    assert!(text.contains("writes may be lost"), "{text}");
    let incremental = stream(json!({"virtual-size": 64 * MIB, "data-size": 4096, "incremental": true, "since": "c1"}), &[1; 4096], 0);
    let (status, text) = put_stream(&server.client(), server.image_url("disk") + "?format=sparse", incremental).await;
    assert_eq!(status, StatusCode::CONFLICT, "the failed restore recorded no checkpoint: {text}");
    // Started over, the restore ends exact.
    let (status, text) = put_stream(&server.client(), server.image_url("disk") + "?format=sparse", whole.clone()).await;
    assert_eq!(status, StatusCode::OK, "{text}");
    assert!(raw_view(&image)[..data.len()] == data[..]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_that_does_not_fit_the_target_is_refused_before_it_writes() {
    let (_dir, image, server) = serve_disk("128M").await;
    let old = random_bytes(MIB as usize, 4);
    assert_eq!(put_retrying(&server, 100 * MIB, &old, "").await.0, StatusCode::OK);
    let url = server.image_url("disk") + "?format=sparse";
    let data = random_bytes(MIB as usize, 5);
    let small = stream(full_meta(64 * MIB, MIB, Some("c1")), &data, 64 * MIB);
    let refusals = [
        (small.clone(), "64 MiB full stream onto 128 MiB", "67108864"),
        (stream(full_meta(0, 0, Some("c1")), &[], 0)[..].to_vec(), "virtual-size 0", "virtual-size 0"),
        (meta_frame(&json!({"data-size": 0})), "missing virtual-size", "virtual-size"),
        (
            stream(json!({"virtual-size": 128 * MIB, "data-size": MIB, "incremental": true, "checkpoint": "c1"}), &data, 0),
            "incremental without since",
            "since",
        ),
        (
            stream(json!({"virtual-size": 64 * MIB, "data-size": MIB, "incremental": true, "since": "c0"}), &data, 0),
            "small incremental",
            "67108864",
        ),
        (stream(json!({"virtual-size": 128 * MIB, "data-size": MIB, "since": "c0"}), &data, 128 * MIB), "full stream with since", "since"),
    ];
    for (body, what, named) in refusals {
        let (status, text) = put_stream(&server.client(), url.clone(), body).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{what}: {text}");
        assert!(text.contains(named), "{what}: {text}");
    }
    let view = raw_view(&image);
    assert!(view[..MIB as usize].iter().all(|&byte| byte == 0), "nothing was written");
    assert!(view[100 * MIB as usize..101 * MIB as usize] == old[..]);
    // No checkpoint was recorded: an incremental from c1 is out of its chain.
    let incremental = stream(json!({"virtual-size": 128 * MIB, "data-size": 4096, "incremental": true, "since": "c1"}), &[1; 4096], 0);
    assert_eq!(put_stream(&server.client(), url.clone(), incremental).await.0, StatusCode::CONFLICT);
    // With zero_tail=y the rest is zeroed, and the summary says so.
    let (status, text) = put_stream(&server.client(), url.clone() + "&zero_tail=y", small).await;
    assert_eq!(status, StatusCode::OK, "{text}");
    let summary: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(summary["zero-tail"], 64 * MIB, "{summary}");
    let view = raw_view(&image);
    assert!(view[..MIB as usize] == data[..]);
    assert!(view[64 * MIB as usize..].iter().all(|&byte| byte == 0), "old data past the stream is gone");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_restore_has_its_target_to_itself() {
    let (_dir, image, server) = serve_disk("16M").await;
    let data = random_bytes(MIB as usize, 6);
    let whole = stream(full_meta(16 * MIB, MIB, Some("c1")), &data, 16 * MIB);
    let (head, rest) = whole.split_at(100);
    let restore = SlowPut::start(&server, "?format=sparse", &[]);
    restore.send(head.to_vec()).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (status, text) = put_retrying(&server, 0, &[7; 4096], "").await;
    assert_eq!(status, StatusCode::CONFLICT, "a raw PUT during a restore: {text}");
    assert!(text.contains("restore"), "{text}");
    assert_eq!(patch(&server, json!({"op": "zero", "offset": 0, "size": 4096})).await.0, StatusCode::CONFLICT);
    let (status, text) = put_stream(&server.client(), server.image_url("disk") + "?format=sparse", whole.clone()).await;
    assert_eq!(status, StatusCode::CONFLICT, "a second restore: {text}");
    restore.send(rest.to_vec()).await;
    let (status, text) = restore.finish().await;
    assert_eq!(status, StatusCode::OK, "{text}");
    assert!(raw_view(&image)[..MIB as usize] == data[..]);

    // A restore does not start while a raw PUT runs.
    let upload = SlowPut::start(&server, "", &[("content-range", format!("bytes 0-{}/*", 2 * 4096 - 1))]);
    upload.send(vec![9; 4096]).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (status, text) = put_stream(&server.client(), server.image_url("disk") + "?format=sparse", whole).await;
    assert_eq!(status, StatusCode::CONFLICT, "a restore during a raw PUT: {text}");
    upload.send(vec![9; 4096]).await;
    assert_eq!(upload.finish().await.0, StatusCode::OK);
}

/// The qemu-storage-daemon child serving `image`.
fn daemon_of(server: &Server, image: &std::path::Path) -> u32 {
    let name = image.file_name().unwrap().to_str().unwrap();
    let pids: Vec<u32> = daemon_pids(server)
        .into_iter()
        .filter(|pid| std::fs::read_to_string(format!("/proc/{pid}/cmdline")).is_ok_and(|cmdline| cmdline.contains(name)))
        .collect();
    let [pid] = pids[..] else { panic!("one daemon for {name}, found {pids:?}") };
    pid
}

/// Kills `image`'s daemon after `delay` (in a task of its own).
fn kill_later(server: &Server, image: &std::path::Path, delay: Duration) -> tokio::task::JoinHandle<()> {
    let pid = daemon_of(server, image);
    tokio::spawn(async move {
        tokio::time::sleep(delay).await;
        let _ = kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
    })
}

/// The whole image as the server reads it.
async fn image_bytes(server: &Server, ticket: &str) -> Option<Vec<u8>> {
    let response = server.client().get(server.image_url(ticket)).send().await.ok()?;
    if response.status() != StatusCode::OK {
        return None;
    }
    response.bytes().await.ok().map(|bytes| bytes.to_vec())
}

/// Retries until the image reads whole (the daemon may be restarting).
async fn read_back(server: &Server, ticket: &str) -> Vec<u8> {
    for _ in 0..100 {
        if let Some(bytes) = image_bytes(server, ticket).await {
            return bytes;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("{ticket} never read back");
}

/// A sparse restore whose body arrives at a network's pace (256 KiB every
/// 10 ms), so that the daemon may die while the server waits for data.
async fn paced_restore(server: &Server, ticket: &str, stream: &[u8]) -> (StatusCode, String) {
    let (sender, receiver) = tokio::sync::mpsc::channel(2);
    let body = reqwest::Body::wrap_stream(tokio_stream(receiver));
    let request = server.client().put(server.image_url(ticket) + "?format=sparse").body(body).send();
    let response = tokio::spawn(async move {
        let response = request.await.unwrap();
        (response.status(), response.text().await.unwrap())
    });
    for chunk in stream.chunks(256 << 10) {
        if sender.send(Ok(chunk.to_vec())).await.is_err() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    drop(sender);
    response.await.unwrap()
}

/// A full stream of `url`, retried while its daemon restarts.
async fn full_stream(client: &reqwest::Client, url: &str) -> Vec<u8> {
    for _ in 0..100 {
        let response = client.get(format!("{url}?format=sparse")).send().await.unwrap();
        if response.status() == StatusCode::OK {
            if let Ok(bytes) = response.bytes().await {
                return bytes.to_vec();
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("no full stream of {url}");
}

/// CLI uploads, restores and incremental backups with the daemon killed
/// at random moments, 20 rounds over five pairs of images (so that no
/// daemon meets the restart backoff of a crash loop): an exit 0 or a 200
/// always means the target holds exactly the source's bytes, and a backup
/// stream that reads as complete restores exactly; anything else is an
/// error the client sees, and started over the transfer ends exact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn daemon_kills_at_random_moments_never_end_in_a_false_success() {
    use rand::{Rng, SeedableRng};
    const PAIRS: usize = 5;
    let seed = rand::random::<u64>();
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let dir = tempfile::tempdir().unwrap();
    let path = |name: String| dir.path().join(format!("{name}.qcow2"));
    let images: Vec<String> = (0..PAIRS)
        .flat_map(|pair| ["src", "dst"].map(|side| format!("{side}{pair}={},size=32M", path(format!("{side}{pair}")).display())))
        .collect();
    let server = Server::start(dir.path(), &images).await;
    let client = server.client();
    let data = random_bytes(12 * MIB as usize, seed);
    for pair in 0..PAIRS {
        for (at, chunk) in data.chunks(4 * MIB as usize).enumerate() {
            let offset = at as u64 * 10 * MIB;
            let range = format!("bytes {offset}-{}/*", offset + chunk.len() as u64 - 1);
            let response = client
                .put(server.image_url(&format!("src{pair}")))
                .header("content-range", range)
                .body(chunk.to_vec())
                .send()
                .await
                .unwrap();
            assert_eq!(response.status(), StatusCode::OK);
        }
    }
    let mut since: Vec<Option<String>> = vec![None; PAIRS];
    for round in 0..20 {
        let pair = round % PAIRS;
        let (src_ticket, dst_ticket) = (format!("src{pair}"), format!("dst{pair}"));
        let (src, dst) = (server.image_url(&src_ticket), server.image_url(&dst_ticket));
        let context = format!("seed {seed}, round {round}");
        if round % 3 == 2 {
            // `blockgate upload` of a raw file, the target's daemon killed
            // at a random moment.
            let file = dir.path().join(format!("upload{round}.raw"));
            let content = random_bytes(32 * MIB as usize, seed ^ round as u64);
            std::fs::write(&file, &content).unwrap();
            let killer = kill_later(&server, &path(dst_ticket.clone()), Duration::from_millis(rng.random_range(0..1500)));
            let mut attempts = 0;
            loop {
                let output = tokio::process::Command::new(binary("blockgate"))
                    .arg("--cacert")
                    .arg(server.ca())
                    .args(["upload", "--connections", "1"])
                    .arg(&file)
                    .arg(&dst)
                    .output()
                    .await
                    .unwrap();
                if output.status.success() {
                    let stderr = String::from_utf8_lossy(&output.stderr);
                    assert!(read_back(&server, &dst_ticket).await == content, "{context}: upload exit 0 with other bytes: {stderr}");
                    break;
                }
                attempts += 1;
                assert!(attempts < 20, "{context}: the upload never succeeded: {}", String::from_utf8_lossy(&output.stderr));
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            killer.await.unwrap();
            since[pair] = None;
        } else if round % 3 == 0 {
            // A full restore, the target's daemon killed at a random moment.
            let full = full_stream(&client, &src).await;
            let expected = read_back(&server, &src_ticket).await;
            let killer = kill_later(&server, &path(dst_ticket.clone()), Duration::from_millis(rng.random_range(0..600)));
            let mut attempts = 0;
            loop {
                let (status, text) = paced_restore(&server, &dst_ticket, &full).await;
                if status == StatusCode::OK {
                    assert!(read_back(&server, &dst_ticket).await == expected, "{context}: a 200 restore with other bytes: {text}");
                    break;
                }
                attempts += 1;
                assert!(attempts < 100, "{context}: the restore never succeeded: {status} {text}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            killer.await.unwrap();
            since[pair] = None;
        } else {
            // An incremental (or, with no usable checkpoint, a full) backup,
            // the source's daemon killed at a random moment; a stream read
            // whole is applied to the target and must make it equal.
            let offset = rng.random_range(0..31) * MIB;
            let change = random_bytes(MIB as usize, seed + round as u64);
            let range = format!("bytes {offset}-{}/*", offset + MIB - 1);
            for _ in 0..100 {
                let response = client.put(&src).header("content-range", &range).body(change.clone()).send().await.unwrap();
                if response.status() == StatusCode::OK {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            let expected = read_back(&server, &src_ticket).await;
            let next = format!("c{round}");
            let query = match &since[pair] {
                Some(since) => format!("{src}?format=sparse&since={since}&checkpoint={next}"),
                None => format!("{src}?format=sparse&checkpoint={next}"),
            };
            let killer = kill_later(&server, &path(src_ticket.clone()), Duration::from_millis(rng.random_range(0..300)));
            let stream = match client.get(&query).send().await {
                Ok(response) if response.status() == StatusCode::OK => response.bytes().await.ok(),
                _ => None,
            };
            killer.await.unwrap();
            since[pair] = None;
            if let Some(stream) = stream {
                let (status, text) = put_stream(&client, format!("{dst}?format=sparse"), stream.to_vec()).await;
                if status == StatusCode::OK {
                    assert!(read_back(&server, &dst_ticket).await == expected, "{context}: a complete backup restored other bytes: {text}");
                    since[pair] = Some(next);
                }
            }
        }
    }
}

/// The case: `blockgate upload --connections 1` into a qcow2
/// image, its daemon killed once part of the file is written. The writes
/// acknowledged before the kill were never flushed, so the upload must
/// start over (it says so) and end with the file's bytes, never exit 0
/// with zeros where data was lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cli_upload_whose_daemon_is_killed_starts_over_and_ends_exact() {
    use tokio::io::AsyncBufReadExt;
    let (dir, image, server) = serve_disk("64M").await;
    let file = dir.path().join("source.raw");
    let content = random_bytes(64 * MIB as usize, 8);
    std::fs::write(&file, &content).unwrap();
    let mut child = tokio::process::Command::new(binary("blockgate"))
        .arg("--cacert")
        .arg(server.ca())
        .args(["upload", "--connections", "1", "--progress", "json"])
        .arg(&file)
        .arg(server.image_url("disk"))
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = tokio::io::BufReader::new(child.stderr.take().unwrap()).lines();
    let mut said = Vec::new();
    let mut killed = false;
    while let Some(line) = lines.next_line().await.unwrap() {
        let done = serde_json::from_str::<Value>(&line).ok().and_then(|progress| progress["done"].as_u64());
        if !killed && done.is_some_and(|done| done >= 16 * MIB) {
            kill_daemon(&server).await;
            killed = true;
        }
        said.push(line);
    }
    let status = child.wait().await.unwrap();
    let said = said.join("\n");
    assert!(killed, "the upload ended before 16 MiB: {said}");
    assert!(status.success(), "{said}");
    assert!(said.contains("starting the upload over"), "{said}");
    assert!(raw_view(&image) == content);
}

async fn cli(server: &Server, args: &[&str], stdin: Option<&std::path::Path>) -> std::process::Output {
    let mut command = tokio::process::Command::new(binary("blockgate"));
    command.arg("--cacert").arg(server.ca()).args(args);
    if let Some(stdin) = stdin {
        command.stdin(std::fs::File::open(stdin).unwrap());
    }
    command.output().await.unwrap()
}

/// A smaller file or stream leaves the image's old tail behind: refused
/// (exit 2, both sizes named) before anything is written, unless the
/// tail is zeroed on request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_smaller_upload_or_restore_is_refused_unless_the_tail_is_zeroed() {
    let (dir, image, server) = serve_disk("32M").await;
    let old = random_bytes(32 * MIB as usize, 9);
    assert_eq!(put_retrying(&server, 0, &old, "").await.0, StatusCode::OK);
    let small = dir.path().join("small.raw");
    let content = random_bytes(8 * MIB as usize, 10);
    std::fs::write(&small, &content).unwrap();
    let url = server.image_url("disk");
    let output = cli(&server, &["upload", small.to_str().unwrap(), &url], None).await;
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains(&(8 * MIB).to_string()) && stderr.contains(&(32 * MIB).to_string()), "{stderr}");
    assert!(raw_view(&image) == old, "nothing was written");
    let output = cli(&server, &["upload", "--zero-tail", small.to_str().unwrap(), &url], None).await;
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let view = raw_view(&image);
    assert!(view[..8 * MIB as usize] == content[..] && view[8 * MIB as usize..].iter().all(|&byte| byte == 0));

    // The same through a stream of a smaller image.
    assert_eq!(put_retrying(&server, 0, &old, "").await.0, StatusCode::OK);
    let stream_file = dir.path().join("small.sparse");
    std::fs::write(&stream_file, stream(json!({"virtual-size": 8 * MIB, "data-size": 8 * MIB}), &content, 8 * MIB)).unwrap();
    let output = cli(&server, &["restore", &url], Some(&stream_file)).await;
    assert_eq!(output.status.code(), Some(2), "{}", String::from_utf8_lossy(&output.stderr));
    assert!(raw_view(&image) == old, "nothing was written");
    let output = cli(&server, &["restore", "--zero-tail", &url], Some(&stream_file)).await;
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    assert!(raw_view(&image) == view);
}
