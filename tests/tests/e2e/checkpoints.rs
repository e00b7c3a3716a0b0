//! Checkpoints against a real qemu-storage-daemon, the server never
//! stopped: a chain of a full and three incrementals (writes, zeroing and
//! discards between rounds) restored in order and compared with
//! `qemu-img compare` after each step; the chain out of order refused
//! (nothing written) unless forced; a daemon killed with `kill -9` making
//! its checkpoints unusable until a new full backup; two consumers' chains
//! on one image; writes made during an incremental landing in the next
//! one; and the contract's limits and refusals.

use std::path::Path;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::common::*;

/// qcow2's default cluster size, the granularity of its dirty bitmaps.
const GRANULE: u64 = 64 << 10;
const SIZE: u64 = 32 * MIB;

/// A change made between two backups.
#[derive(Clone, Copy)]
enum Change {
    Write(u64, u64),
    Zero(u64, u64),
}

impl Change {
    fn range(self) -> (u64, u64) {
        match self {
            Change::Write(offset, length) | Change::Zero(offset, length) => (offset, length),
        }
    }
}

async fn apply(client: &reqwest::Client, url: &str, changes: &[Change], seed: u64) {
    for (index, change) in changes.iter().enumerate() {
        let response = match *change {
            Change::Write(offset, length) => client
                .put(url)
                .header("content-range", format!("bytes {offset}-{}/*", offset + length - 1))
                .body(random_bytes(length as usize, seed * 100 + index as u64))
                .send()
                .await
                .unwrap(),
            Change::Zero(offset, length) => {
                client.patch(url).json(&json!({"op": "zero", "offset": offset, "size": length, "flush": true})).send().await.unwrap()
            }
        };
        assert_eq!(response.status(), StatusCode::OK, "{}", response.text().await.unwrap());
    }
}

/// Bytes a change touches, rounded out to whole granules.
fn granules(changes: &[Change]) -> u64 {
    changes
        .iter()
        .map(|change| {
            let (offset, length) = change.range();
            (offset + length).div_ceil(GRANULE) * GRANULE - offset / GRANULE * GRANULE
        })
        .sum()
}

fn written(changes: &[Change]) -> u64 {
    changes.iter().map(|change| if let Change::Write(_, length) = change { *length } else { 0 }).sum()
}

/// A server on a new 32 MiB qcow2 image `src`: the server, a client and
/// the image's URL.
async fn serve_source(dir: &Path, extra: &[&str]) -> (Server, reqwest::Client, String) {
    let image = format!("src={},size=32M", dir.join("src.qcow2").display());
    let server = Server::try_start(dir, &[image], extra).await.unwrap();
    let (client, url) = (server.client(), server.image_url("src"));
    (server, client, url)
}

/// A raw copy of the image as it is now (read while the daemon has it).
fn snapshot(image: &Path, out: &Path) {
    run("qemu-img", &["convert", "-U", "-f", "qcow2", "-O", "raw", image.to_str().unwrap(), out.to_str().unwrap()]);
}

fn assert_identical(expected: &Path, target: &Path, step: &str) {
    let output = std::process::Command::new("qemu-img")
        .args(["compare", "-U", "-f", "raw", "-F", "qcow2"])
        .args([expected, target])
        .output()
        .unwrap();
    assert!(output.status.success(), "{step}: {}", String::from_utf8_lossy(&output.stdout));
}

async fn post_checkpoint(server: &Server, ticket: &str, body: Value) -> (StatusCode, String) {
    let response = server.client().post(format!("{}/checkpoints", server.image_url(ticket))).json(&body).send().await.unwrap();
    (response.status(), response.text().await.unwrap())
}

async fn list(server: &Server, ticket: &str) -> Vec<Value> {
    let response = server.client().get(format!("{}/checkpoints", server.image_url(ticket))).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    response.json().await.unwrap()
}

/// Dirty ranges `(start, length)` of `extents?since=...`.
async fn dirty_ranges(server: &Server, ticket: &str, query: &str) -> Vec<(u64, u64)> {
    let response = server.client().get(format!("{}/extents?{query}", server.image_url(ticket))).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::OK, "{query}");
    let extents: Vec<Value> = response.json().await.unwrap();
    extents.iter().filter(|e| e["dirty"] == true).map(|e| (e["start"].as_u64().unwrap(), e["length"].as_u64().unwrap())).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chain_of_a_full_and_three_incrementals_restores_exactly_and_only_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let (source, target, other) = (dir.path().join("src.qcow2"), dir.path().join("dst.qcow2"), dir.path().join("other.qcow2"));
    let specs = [
        format!("src={},size=32M,sparse", source.display()),
        format!("dst={},size=32M", target.display()),
        format!("other={},size=32M", other.display()),
    ];
    let server = Server::start(dir.path(), &specs).await;
    let client = server.client();
    let (src, dst, other_url) = (server.image_url("src"), server.image_url("dst"), server.image_url("other"));
    apply(&client, &src, &[Change::Write(0, 4 * MIB), Change::Write(16 * MIB, 2 * MIB)], 1).await;

    let rounds: [&[Change]; 3] = [
        &[Change::Write(5 * MIB + 4096, 100 << 10), Change::Zero(MIB, MIB), Change::Write(20 * MIB, GRANULE)],
        // A discard: the ticket is sparse, so zeroing punches a hole.
        &[Change::Zero(16 * MIB, 512 << 10), Change::Write(30 * MIB, 300 << 10), Change::Write(7 * MIB + 1, 10)],
        &[Change::Write(0, 4096), Change::Zero(2 * MIB + 8192, 128 << 10), Change::Write(SIZE - GRANULE, GRANULE)],
    ];
    let full = get_stream(&client, format!("{src}?format=sparse&checkpoint=r0")).await;
    assert_eq!(meta(&full)["checkpoint"], "r0");
    assert!(meta(&full).get("since").is_none());
    let mut streams = vec![full];
    let mut expected = vec![dir.path().join("expected-0.raw")];
    snapshot(&source, &expected[0]);
    for (round, changes) in rounds.iter().enumerate() {
        apply(&client, &src, changes, round as u64 + 2).await;
        let (since, next) = (format!("r{round}"), format!("r{}", round + 1));
        let stream = get_stream(&client, format!("{src}?format=sparse&since={since}&checkpoint={next}")).await;
        let meta = meta(&stream);
        assert_eq!(
            (meta["incremental"].as_bool(), meta["since"].as_str(), meta["checkpoint"].as_str()),
            (Some(true), Some(&*since), Some(&*next))
        );
        let data_size = meta["data-size"].as_u64().unwrap();
        assert!(
            written(changes) <= data_size && data_size <= granules(changes),
            "round {round}: data-size {data_size}, written {}, granules {}",
            written(changes),
            granules(changes)
        );
        streams.push(stream);
        expected.push(dir.path().join(format!("expected-{}.raw", round + 1)));
        snapshot(&source, &expected[round + 1]);
    }
    let listed = list(&server, "src").await;
    let ids: Vec<&str> = listed.iter().map(|c| c["id"].as_str().unwrap()).collect();
    assert_eq!(ids, ["r0", "r1", "r2", "r3"]);
    assert_eq!(listed[2]["parent"], "r1");
    assert!(listed.iter().all(|c| c["usable"] == true));

    // In order, each step identical to the source at its backup.
    for (step, stream) in streams.iter().enumerate() {
        let (status, body) = put_stream(&client, format!("{dst}?format=sparse"), stream.clone()).await;
        assert_eq!(status, StatusCode::OK, "step {step}: {body}");
        let reached: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(reached["checkpoint"], format!("r{step}"));
        assert_identical(&expected[step], &target, &format!("step {step}"));
    }
    // Applying the last incremental again is out of order too.
    let (status, body) = put_stream(&client, format!("{dst}?format=sparse"), streams[3].clone()).await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");

    // Out of order: refused, both ids named, nothing written.
    let (status, body) = put_stream(&client, format!("{other_url}?format=sparse"), streams[1].clone()).await;
    assert_eq!(status, StatusCode::CONFLICT, "an incremental onto an image with no chain: {body}");
    let (status, _) = put_stream(&client, format!("{other_url}?format=sparse"), streams[0].clone()).await;
    assert_eq!(status, StatusCode::OK);
    let (status, body) = put_stream(&client, format!("{other_url}?format=sparse"), streams[2].clone()).await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    assert!(body.contains("\"r1\"") && body.contains("\"r0\"") && body.contains("force=y"), "{body}");
    assert_identical(&expected[0], &other, "after the refused incremental");
    // A write outside the chain breaks it: even the right next link is refused.
    apply(&client, &other_url, &[Change::Write(MIB, 4096)], 9).await;
    let (status, body) = put_stream(&client, format!("{other_url}?format=sparse"), streams[1].clone()).await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    // force=y applies it anyway.
    let (status, body) = put_stream(&client, format!("{other_url}?format=sparse&force=y"), streams[2].clone()).await;
    assert_eq!(status, StatusCode::OK, "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_kill_9_the_chain_needs_a_new_full_backup() {
    let dir = tempfile::tempdir().unwrap();
    let (server, client, src) = serve_source(dir.path(), &[]).await;
    apply(&client, &src, &[Change::Write(0, MIB)], 1).await;
    get_stream(&client, format!("{src}?format=sparse&checkpoint=c1")).await;
    apply(&client, &src, &[Change::Write(4 * MIB, GRANULE)], 2).await;

    let [old] = daemon_pids(&server)[..] else { panic!("one qemu-storage-daemon child") };
    kill(Pid::from_raw(old as i32), Signal::SIGKILL).unwrap();
    wait_until("the daemon is restarted", async || daemon_pids(&server).iter().any(|&pid| pid != old)).await;
    let mut listed: Vec<Value> = Vec::new();
    wait_until("the restarted daemon serves data and lists checkpoints", async || {
        let data = client.get(&src).header("range", "bytes=0-4095").send().await.unwrap();
        let response = client.get(format!("{src}/checkpoints")).send().await.unwrap();
        data.status() == StatusCode::PARTIAL_CONTENT && response.status() == StatusCode::OK && {
            listed = response.json().await.unwrap();
            true
        }
    })
    .await;
    assert_eq!(listed.len(), 1);
    assert_eq!((listed[0]["id"].as_str(), listed[0]["usable"].as_bool()), (Some("c1"), Some(false)));
    for url in [format!("{src}?format=sparse&since=c1&checkpoint=c2"), format!("{src}/extents?since=c1")] {
        let response = client.get(&url).send().await.unwrap();
        assert_eq!(response.status(), StatusCode::CONFLICT, "{url}");
        assert!(response.text().await.unwrap().contains("full backup"));
    }
    assert!(list(&server, "src").await.iter().all(|c| c["id"] != "c2"), "a refused incremental makes no checkpoint");
    // A new full backup and checkpoint restart the chain.
    get_stream(&client, format!("{src}?format=sparse&checkpoint=c2")).await;
    apply(&client, &src, &[Change::Write(8 * MIB, GRANULE)], 3).await;
    assert_eq!(dirty_ranges(&server, "src", "since=c2").await, [(8 * MIB, GRANULE)]);
    let response = client.delete(format!("{src}/checkpoints/c1")).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::NO_CONTENT, "an unusable checkpoint can be deleted");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_consumers_keep_independent_chains_on_one_image() {
    let dir = tempfile::tempdir().unwrap();
    let (server, client, src) = serve_source(dir.path(), &[]).await;
    apply(&client, &src, &[Change::Write(0, MIB)], 1).await;
    assert_eq!(post_checkpoint(&server, "src", json!({"id": "a1"})).await.0, StatusCode::CREATED);
    assert_eq!(post_checkpoint(&server, "src", json!({"id": "b1"})).await.0, StatusCode::CREATED);
    apply(&client, &src, &[Change::Write(2 * MIB, GRANULE)], 2).await;
    assert_eq!(dirty_ranges(&server, "src", "since=a1&checkpoint=a2").await, [(2 * MIB, GRANULE)]);
    apply(&client, &src, &[Change::Write(6 * MIB, GRANULE)], 3).await;
    assert_eq!(dirty_ranges(&server, "src", "since=a2").await, [(6 * MIB, GRANULE)]);
    for id in ["a1", "a2"] {
        let response = client.delete(format!("{src}/checkpoints/{id}")).send().await.unwrap();
        assert_eq!(response.status(), StatusCode::NO_CONTENT);
    }
    assert_eq!(dirty_ranges(&server, "src", "since=b1").await, [(2 * MIB, GRANULE), (6 * MIB, GRANULE)]);
    let listed = list(&server, "src").await;
    assert_eq!(listed.len(), 1);
    assert_eq!((listed[0]["id"].as_str(), listed[0]["dirty_bytes"].as_u64()), (Some("b1"), Some(2 * GRANULE)));
    let response = client.get(format!("{src}/extents?since=a1")).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::NOT_FOUND);
    let response = client.delete(format!("{src}/checkpoints/a1")).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::NOT_FOUND);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_during_an_incremental_land_in_the_next_one() {
    let dir = tempfile::tempdir().unwrap();
    let (server, client, src) = serve_source(dir.path(), &[]).await;
    get_stream(&client, format!("{src}?format=sparse&checkpoint=r0")).await;
    // 8 MiB changed: the stream is still running when the write lands.
    apply(&client, &src, &[Change::Write(0, 8 * MIB)], 1).await;
    let response = client.get(format!("{src}?format=sparse&since=r0&checkpoint=r1")).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    apply(&client, &src, &[Change::Write(20 * MIB, GRANULE)], 2).await;
    let stream = response.bytes().await.unwrap();
    assert_eq!(meta(&stream)["data-size"], 8 * MIB, "the map was frozen before the write");
    let header = format!("data {:016x}", 20 * MIB);
    assert!(!stream.windows(header.len()).any(|window| window == header.as_bytes()), "the write is not in this round");
    assert_eq!(dirty_ranges(&server, "src", "since=r1").await, [(20 * MIB, GRANULE)]);
}

/// A control ticket for a qcow2 image of `size` bytes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limits_ids_raw_images_uris_and_ticket_ops_answer_as_the_contract_says() {
    let dir = tempfile::tempdir().unwrap();
    let (image, raw) = (dir.path().join("disk.qcow2"), dir.path().join("disk.raw"));
    create_image(&image, "qcow2", "32M");
    create_image(&raw, "raw", "32M");
    let nbd_image = dir.path().join("nbd.qcow2");
    create_image(&nbd_image, "qcow2", "32M");
    let nbd = QemuNbd::start(&nbd_image, "qcow2", &dir.path().join("nbd.sock"));
    let (server, control) = start_with_control(dir.path(), &[]).await;
    assert_eq!(control.add(&qcow2_ticket("rw", &image, &["read", "write"], SIZE)).await, StatusCode::OK);
    let client = server.client();

    for (body, status) in [
        (json!({"id": ".hidden"}), StatusCode::BAD_REQUEST),
        (json!({"id": "a/b"}), StatusCode::BAD_REQUEST),
        (json!({"id": "x".repeat(65)}), StatusCode::BAD_REQUEST),
        (json!({"id": 7}), StatusCode::BAD_REQUEST),
    ] {
        assert_eq!(post_checkpoint(&server, "rw", body.clone()).await.0, status, "{body}");
    }
    for query in ["since=..%2Fx", "since=.x", "since=a&checkpoint=a", "context=zero&since=a"] {
        let response = client.get(format!("{}/extents?{query}", server.image_url("rw"))).send().await.unwrap();
        assert_eq!(response.status(), StatusCode::BAD_REQUEST, "{query}");
    }
    let response = client.get(format!("{}/extents?since=never", server.image_url("rw"))).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::NOT_FOUND);
    for n in 0..16 {
        assert_eq!(post_checkpoint(&server, "rw", json!({"id": format!("cp{n}")})).await.0, StatusCode::CREATED);
    }
    let (status, body) = post_checkpoint(&server, "rw", json!({})).await;
    assert_eq!(status, StatusCode::CONFLICT);
    assert!(body.contains("16"), "{body}");
    let (status, body) = post_checkpoint(&server, "rw", json!({"id": "cp3"})).await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    let options: Value = client.request(reqwest::Method::OPTIONS, server.image_url("rw")).send().await.unwrap().json().await.unwrap();
    assert_eq!(options["checkpoints"], true);
    for n in 0..16 {
        assert_eq!(client.delete(format!("{}/checkpoints/cp{n}", server.image_url("rw"))).send().await.unwrap().status(), 204);
    }
    let (status, body) = post_checkpoint(&server, "rw", Value::Null).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "null is not an object: {body}");
    let response = client.post(format!("{}/checkpoints", server.image_url("rw"))).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::CREATED, "no body: the server names it");
    let made: Value = response.json().await.unwrap();
    assert!(made["id"].as_str().unwrap().starts_with("cp-"));
    assert_eq!(control.delete("rw").await, StatusCode::NO_CONTENT);

    // A read-only ticket lists but may not change, unless it has the
    // checkpoint op, which still gives no write access to data.
    assert_eq!(control.add(&qcow2_ticket("ro", &image, &["read"], SIZE)).await, StatusCode::OK);
    assert_eq!(list(&server, "ro").await.len(), 1);
    assert_eq!(post_checkpoint(&server, "ro", json!({"id": "n1"})).await.0, StatusCode::FORBIDDEN);
    let response = client.get(format!("{}?format=sparse&checkpoint=n1", server.image_url("ro"))).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::FORBIDDEN);
    let response = client.delete(format!("{}/checkpoints/{}", server.image_url("ro"), made["id"].as_str().unwrap())).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::FORBIDDEN);
    assert_eq!(control.delete("ro").await, StatusCode::NO_CONTENT);
    assert_eq!(control.add(&qcow2_ticket("backup", &image, &["read", "checkpoint"], SIZE)).await, StatusCode::OK);
    assert_eq!(post_checkpoint(&server, "backup", json!({"id": "n1"})).await.0, StatusCode::CREATED);
    let stream = get_stream(&client, format!("{}?format=sparse&since=n1&checkpoint=n2", server.image_url("backup"))).await;
    assert_eq!(meta(&stream)["checkpoint"], "n2");
    let put = client.put(server.image_url("backup")).body(vec![1u8; 512]).send().await.unwrap();
    assert_eq!(put.status(), StatusCode::FORBIDDEN);
    assert_eq!(control.delete("backup").await, StatusCode::NO_CONTENT);

    // A stream whose meta frame names a checkpoint no id can be (bytes a
    // client wrote, read back as metadata) is refused before any write.
    assert_eq!(control.add(&qcow2_ticket("restore", &image, &["read", "write"], SIZE)).await, StatusCode::OK);
    let meta = format!(r#"{{"virtual-size":{SIZE},"data-size":4,"incremental":true,"since":"../../etc/passwd","checkpoint":"n3"}}"#);
    let mut stream = format!("meta {:016x} {:016x}\r\n{meta}\r\n", 0, meta.len()).into_bytes();
    stream.extend(format!("data {:016x} {:016x}\r\nXXXX\r\n", 0, 4).into_bytes());
    let before = raw_view(&image);
    let (status, body) = put_stream(&client, format!("{}?format=sparse&force=y", server.image_url("restore")), stream).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert!(body.contains("since") && body.contains("invalid checkpoint id"), "{body}");
    assert!(raw_view(&image) == before, "nothing was written");
    assert_eq!(control.delete("restore").await, StatusCode::NO_CONTENT);

    // Raw images and NBD URIs cannot hold checkpoints.
    let raw_ticket =
        json!({"uuid": "raw", "size": SIZE, "url": format!("file://{}", raw.display()), "ops": ["read", "write"], "timeout": 300});
    assert_eq!(control.add(&raw_ticket).await, StatusCode::OK);
    let (status, body) = post_checkpoint(&server, "raw", json!({"id": "cp1"})).await;
    assert_eq!(status, StatusCode::CONFLICT);
    assert!(body.contains("raw"), "{body}");
    let options: Value = client.request(reqwest::Method::OPTIONS, server.image_url("raw")).send().await.unwrap().json().await.unwrap();
    assert_eq!(options["checkpoints"], false);
    let response = client.get(format!("{}?format=sparse&since=cp1", server.image_url("raw"))).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::CONFLICT);
    let uri_ticket = json!({"uuid": "uri", "size": SIZE, "url": nbd.uri(), "ops": ["read", "write"], "timeout": 300});
    assert_eq!(control.add(&uri_ticket).await, StatusCode::OK);
    let (status, body) = post_checkpoint(&server, "uri", json!({"id": "cp1"})).await;
    assert_eq!(status, StatusCode::CONFLICT);
    assert!(body.contains("NBD URI"), "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_view_is_released_when_its_request_ends_even_cut_short() {
    let dir = tempfile::tempdir().unwrap();
    let (server, client, src) = serve_source(dir.path(), &["--log", "info,blockgate_server::sources::checkpoints=debug"]).await;
    get_stream(&client, format!("{src}?format=sparse&checkpoint=r0")).await;
    apply(&client, &src, &[Change::Write(0, 16 * MIB)], 1).await;
    dirty_ranges(&server, "src", "since=r0").await;
    get_stream(&client, format!("{src}?format=sparse&since=r0")).await;
    // A client that goes away after the first chunk.
    let mut cut = client.get(format!("{src}?format=sparse&since=r0")).send().await.unwrap();
    assert!(cut.chunk().await.unwrap().is_some());
    drop(cut);
    let log = dir.path().join(format!("server-{}.log", server.port));
    wait_until("three views are released", async || std::fs::read_to_string(&log).unwrap().matches("view released").count() == 3).await;
}
