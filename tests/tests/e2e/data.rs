//! Data correctness: bytes served equal the image as qemu sees it, writes
//! land where they should, zeroing reads back as zeros (and holes where the
//! ticket is sparse), and extents agree with `qemu-img map`.

use reqwest::StatusCode;
use reqwest::header::{CONTENT_LENGTH, CONTENT_RANGE, RANGE};
use serde_json::Value;

use crate::common::*;

/// Writes a recognisable layout: data, a zeroed range, a discarded range,
/// data near the end.
fn populate(path: &std::path::Path, format: &str) {
    qemu_io(
        path,
        format,
        &["write -P 0x11 0 1M", "write -P 0x22 5M 3M", "write -P 0x33 12M 64k", "write -z 5M 64k", "discard 6M 1M", "write -P 0x44 63M 1M"],
    );
}

/// A 64 MiB image of `format` with the layout of [`populate`], served.
async fn serve_populated(format: &str) -> (tempfile::TempDir, std::path::PathBuf, Server) {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join(format!("disk.{format}"));
    create_image(&image, format, "64M");
    populate(&image, format);
    let server = Server::start(dir.path(), &[format!("disk={}", image.display())]).await;
    (dir, image, server)
}

async fn check_ranges_against_qemu(format: &str) {
    let (_dir, image, server) = serve_populated(format).await;
    let client = server.client();
    let expected = raw_view(&image);

    let whole = client.get(server.image_url("disk")).send().await.unwrap();
    assert_eq!(whole.status(), StatusCode::OK);
    assert_eq!(whole.headers()["accept-ranges"], "bytes");
    assert_eq!(whole.headers()[CONTENT_LENGTH], (64 * MIB).to_string().as_str());
    assert!(whole.bytes().await.unwrap() == expected, "whole image differs from qemu's view");

    let size = expected.len() as u64;
    let cases: [(&str, u64, u64); 7] = [
        ("bytes=0-0", 0, 1),
        ("bytes=1048575-1048576", MIB - 1, MIB + 1),
        ("bytes=5242000-5309999", 5242000, 5310000),
        ("bytes=12582911-", 12582911, size),
        ("bytes=-1000", size - 1000, size),
        ("bytes=100-999999999999", 100, size),
        ("bytes=6291456-7340031", 6 * MIB, 7 * MIB),
    ];
    for (range, start, end) in cases {
        let response = client.get(server.image_url("disk")).header(RANGE, range).send().await.unwrap();
        assert_eq!(response.status(), StatusCode::PARTIAL_CONTENT, "{range}");
        assert_eq!(response.headers()[CONTENT_RANGE], format!("bytes {start}-{}/{size}", end - 1).as_str(), "{range}");
        assert_eq!(response.headers()[CONTENT_LENGTH], (end - start).to_string().as_str(), "{range}");
        let body = response.bytes().await.unwrap();
        assert!(body[..] == expected[start as usize..end as usize], "{range}: bytes differ from qemu's view");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ranges_of_a_raw_image_match_qemu() {
    check_ranges_against_qemu("raw").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ranges_of_a_qcow2_image_match_qemu() {
    check_ranges_against_qemu("qcow2").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn put_then_get_round_trips_on_http1_and_http2() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.qcow2");
    create_image(&image, "qcow2", "64M");
    let server = Server::start(dir.path(), &[format!("disk={}", image.display())]).await;
    let url = server.image_url("disk");
    for (round, client) in [server.client_builder().http1_only().build().unwrap(), server.client()].into_iter().enumerate() {
        let data = random_bytes(3 * MIB as usize + 1234, round as u64);
        let offset = 7 + round as u64 * 10 * MIB;
        let end = offset + data.len() as u64 - 1;
        let response = client.put(&url).header(CONTENT_RANGE, format!("bytes {offset}-{end}/*")).body(data.clone()).send().await.unwrap();
        assert_eq!(response.status(), StatusCode::OK, "{}", response.text().await.unwrap());
        let back = client.get(&url).header(RANGE, format!("bytes={offset}-{end}")).send().await.unwrap().bytes().await.unwrap();
        assert!(back[..] == data[..], "round {round}: read back differs");
        let view = raw_view(&image);
        assert!(view[offset as usize..=end as usize] == data[..], "round {round}: qemu sees other bytes");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunked_put_without_flush_then_patch_flush() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.raw");
    create_image(&image, "raw", "32M");
    let server = Server::start(dir.path(), &[format!("disk={}", image.display())]).await;
    let data = random_bytes(5 * MIB as usize + 17, 9);
    let chunks: Vec<Result<Vec<u8>, std::io::Error>> = data.chunks(100_000).map(|chunk| Ok(chunk.to_vec())).collect();
    let body = reqwest::Body::wrap_stream(futures::stream::iter(chunks));
    let client = server.client_builder().http1_only().build().unwrap();
    let response =
        client.put(format!("{}?flush=n", server.image_url("disk"))).header(CONTENT_RANGE, "bytes 4096-/*").body(body).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::OK, "{}", response.text().await.unwrap());
    let flush = client.patch(server.image_url("disk")).body(r#"{"op":"flush"}"#).send().await.unwrap();
    assert_eq!(flush.status(), StatusCode::OK);
    let on_disk = std::fs::read(&image).unwrap();
    assert!(on_disk[4096..4096 + data.len()] == data[..], "the raw file holds the body after flush");
}

async fn extents(client: &reqwest::Client, url: &str) -> Vec<Value> {
    let response = client.get(url).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::OK, "{url}");
    response.json().await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn patch_zero_reads_back_zeros_and_deallocates_only_when_sparse() {
    let dir = tempfile::tempdir().unwrap();
    let mut images = Vec::new();
    for name in ["dense", "sparse"] {
        let image = dir.path().join(format!("{name}.qcow2"));
        create_image(&image, "qcow2", "16M");
        qemu_io(&image, "qcow2", &["write -P 0x55 0 8M"]);
        images.push(image);
    }
    let server =
        Server::start(dir.path(), &[format!("dense={}", images[0].display()), format!("sparse={},sparse", images[1].display())]).await;
    let client = server.client();
    for (ticket, image, expect_deallocated) in [("dense", &images[0], false), ("sparse", &images[1], true)] {
        let url = server.image_url(ticket);
        let body = r#"{"op":"zero","offset":1048576,"size":2097152,"flush":true}"#;
        let response = client.patch(&url).header("content-type", "application/json").body(body).send().await.unwrap();
        assert_eq!(response.status(), StatusCode::OK, "{ticket}: {}", response.text().await.unwrap());
        let zeros = client.get(&url).header(RANGE, "bytes=1048576-3145727").send().await.unwrap().bytes().await.unwrap();
        assert!(zeros.iter().all(|&b| b == 0), "{ticket}: zeroed range reads zeros");
        let around = client.get(&url).header(RANGE, "bytes=1048575-3145728").send().await.unwrap().bytes().await.unwrap();
        assert_eq!((around[0], around[around.len() - 1]), (0x55, 0x55), "{ticket}: neighbours untouched");
        let map = extents(&client, &format!("{url}/extents?start=1048576&length=2097152")).await;
        assert_eq!(map.len(), 1, "{ticket}: {map:?}");
        assert_eq!(map[0]["zero"], true, "{ticket}");
        // qemu's own map says whether storage still backs the range.
        let output = run("qemu-img", &["map", "-U", "--output=json", image.to_str().unwrap()]);
        let entries: Vec<Value> = serde_json::from_slice(&output).unwrap();
        let zeroed = entries
            .iter()
            .find(|e| e["start"].as_u64().unwrap() <= MIB && MIB < e["start"].as_u64().unwrap() + e["length"].as_u64().unwrap())
            .unwrap();
        assert_eq!(zeroed["data"], false, "{ticket}: {entries:?}");
        assert_eq!(zeroed.get("offset").is_none(), expect_deallocated, "{ticket}: host clusters kept only without sparse: {entries:?}");
    }
}

/// `qemu-img map` coalesced into our `(start, length, zero, hole)` terms.
fn qemu_map(path: &std::path::Path) -> Vec<(u64, u64, bool, bool)> {
    let output = run("qemu-img", &["map", "-U", "--output=json", path.to_str().unwrap()]);
    let entries: Vec<Value> = serde_json::from_slice(&output).unwrap();
    let mut map: Vec<(u64, u64, bool, bool)> = Vec::new();
    for entry in entries {
        let (start, length) = (entry["start"].as_u64().unwrap(), entry["length"].as_u64().unwrap());
        let flags = (entry["zero"].as_bool().unwrap(), !entry["present"].as_bool().unwrap());
        match map.last_mut() {
            Some(last) if (last.2, last.3) == flags => last.1 += length,
            _ => map.push((start, length, flags.0, flags.1)),
        }
    }
    map
}

async fn check_extents_against_qemu_map(format: &str) {
    let (_dir, image, server) = serve_populated(format).await;
    let client = server.client();
    let ours: Vec<(u64, u64, bool, bool)> = extents(&client, &format!("{}/extents?context=zero", server.image_url("disk")))
        .await
        .iter()
        .map(|e| (e["start"].as_u64().unwrap(), e["length"].as_u64().unwrap(), e["zero"].as_bool().unwrap(), e["hole"].as_bool().unwrap()))
        .collect();
    assert_eq!(ours, qemu_map(&image), "{format}: extents differ from qemu-img map");
    assert!(ours.len() > 3, "{format}: the layout has several extents: {ours:?}");

    // A partial listing is the whole listing cut to the window.
    let (start, length) = (5 * MIB + 4096, 8 * MIB);
    let partial = extents(&client, &format!("{}/extents?start={start}&length={length}", server.image_url("disk"))).await;
    assert_eq!(partial.first().unwrap()["start"], start);
    let last = partial.last().unwrap();
    assert_eq!(last["start"].as_u64().unwrap() + last["length"].as_u64().unwrap(), start + length);
    for extent in &partial {
        let at = extent["start"].as_u64().unwrap();
        let covering = ours.iter().find(|e| e.0 <= at && at < e.0 + e.1).unwrap();
        assert_eq!((extent["zero"].as_bool().unwrap(), extent["hole"].as_bool().unwrap()), (covering.2, covering.3));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn extents_of_a_raw_image_match_qemu_img_map() {
    check_extents_against_qemu_map("raw").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn extents_of_a_qcow2_image_match_qemu_img_map() {
    check_extents_against_qemu_map("qcow2").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn options_allow_names_every_method_the_ticket_serves() {
    let dir = tempfile::tempdir().unwrap();
    let (rw, ro) = (dir.path().join("rw.raw"), dir.path().join("ro.raw"));
    let server = Server::start(dir.path(), &[format!("rw={},size=1M", rw.display()), format!("ro={},size=1M,ro", ro.display())]).await;
    let client = server.client();
    for (ticket, allow) in [("rw", "OPTIONS,HEAD,GET,PUT,PATCH"), ("ro", "OPTIONS,HEAD,GET")] {
        let options = client.request(reqwest::Method::OPTIONS, server.image_url(ticket)).send().await.unwrap();
        assert_eq!(options.headers()["allow"], allow, "{ticket}");
        let head = client.head(server.image_url(ticket)).send().await.unwrap();
        assert_eq!(head.status(), reqwest::StatusCode::OK, "{ticket}: HEAD is listed, so it is served");
    }
}
