//! Incremental backup and restore with qemu tools only: a full sparse
//! backup, a bitmap, changes (data, zeros, a discard), an incremental
//! backup of only what changed, and a restore of full + incremental into a
//! fresh image that `qemu-img compare` finds identical; then a second round
//! with a second bitmap. Also: checksums, and bad streams refused with
//! nothing applied after the bad frame.

use std::path::Path;

use reqwest::StatusCode;
use serde_json::Value;

use crate::common::*;

/// Bytes that are dirty and not zero, from the extents route.
async fn dirty_data(client: &reqwest::Client, url: String) -> u64 {
    let extents: Vec<Value> = client.get(url).send().await.unwrap().json().await.unwrap();
    extents.iter().filter(|e| e["dirty"] == true && e["zero"] == false).map(|e| e["length"].as_u64().unwrap()).sum()
}

/// Starts a server on `source` (with its bitmap) and `target`, runs `body`,
/// and stops the server so the images can be changed offline.
async fn with_server<F, Fut>(dir: &Path, images: &[String], body: F)
where
    F: FnOnce(Server) -> Fut,
    Fut: std::future::Future<Output = Server>,
{
    let server = Server::start(dir, images).await;
    let mut server = body(server).await;
    assert!(server.stop().success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_and_incremental_backups_restore_exactly_for_two_rounds() {
    let dir = tempfile::tempdir().unwrap();
    let source = dir.path().join("source.qcow2");
    let restored = dir.path().join("restored.qcow2");
    create_image(&source, "qcow2", "64M");
    qemu_io(&source, "qcow2", &["write -P 0x11 0 4M", "write -P 0x12 40M 1M"]);

    // Full backup, then start tracking changes.
    let mut full = Vec::new();
    with_server(dir.path(), &[format!("src={}", source.display())], |server| async {
        full = get_stream(&server.client(), format!("{}?format=sparse", server.image_url("src"))).await;
        server
    })
    .await;
    assert_eq!(meta(&full)["incremental"], false);
    assert_eq!(meta(&full)["data-size"], 5 * MIB);
    run("qemu-img", &["bitmap", "--add", "-g", "64K", source.to_str().unwrap(), "b1"]);
    qemu_io(&source, "qcow2", &["write -P 0x22 1M 64k", "write -z 40M 64k", "discard 2M 64k", "write -P 0x23 50M 128k"]);

    // Incremental backup of what b1 saw, then restore full + incremental.
    create_image(&restored, "qcow2", "64M");
    let images = [format!("src={},bitmap=b1", source.display()), format!("dst={}", restored.display())];
    with_server(dir.path(), &images, |server| async {
        let client = server.client();
        let incremental = get_stream(&client, format!("{}?format=sparse&context=dirty", server.image_url("src"))).await;
        let meta = meta(&incremental);
        assert_eq!(
            (meta["incremental"].clone(), meta["context"].clone(), meta["bitmap"].clone()),
            (true.into(), "dirty".into(), "b1".into())
        );
        let dirty = dirty_data(&client, format!("{}/extents?context=dirty", server.image_url("src"))).await;
        assert_eq!(meta["data-size"].as_u64().unwrap(), dirty, "the incremental stream carries the dirty data only");
        assert!(dirty <= 192 * 1024, "64 KiB + 128 KiB of data changed, not {dirty}");
        assert!(incremental.len() < 300 * 1024, "incremental stream of {} bytes", incremental.len());

        let (status, summary) = put_stream(&client, format!("{}?format=sparse", server.image_url("dst")), full.clone()).await;
        assert_eq!(status, StatusCode::OK, "{summary}");
        let summary: Value = serde_json::from_str(&summary).unwrap();
        assert_eq!(summary["verified"], true, "the full stream's trailer checksum was checked");
        // A ticket-bitmap incremental names no checkpoint to continue
        // from: refused (nothing written) unless the client forces it.
        let (status, summary) = put_stream(&client, format!("{}?format=sparse", server.image_url("dst")), incremental.clone()).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{summary}");
        assert!(summary.contains("force=y"), "{summary}");
        let (status, summary) = put_stream(&client, format!("{}?format=sparse&force=y", server.image_url("dst")), incremental).await;
        assert_eq!(status, StatusCode::OK, "{summary}");
        let summary: Value = serde_json::from_str(&summary).unwrap();
        assert_eq!(
            (summary["checksum"].as_str(), summary.get("verified")),
            (Some("none"), None),
            "incremental streams carry no checksum: {summary}"
        );
        server
    })
    .await;
    run("qemu-img", &["compare", source.to_str().unwrap(), restored.to_str().unwrap()]);

    // Second round: retire b1, track with b2, change more, back up again.
    run("qemu-img", &["bitmap", "--disable", source.to_str().unwrap(), "b1"]);
    run("qemu-img", &["bitmap", "--add", "-g", "64K", source.to_str().unwrap(), "b2"]);
    qemu_io(&source, "qcow2", &["write -P 0x33 3M 256k", "write -z 50M 64k", "write -P 0x34 63M 1M"]);
    let images = [format!("src={},bitmap=b2", source.display()), format!("dst={}", restored.display())];
    with_server(dir.path(), &images, |server| async {
        let client = server.client();
        let incremental = get_stream(&client, format!("{}?format=sparse&context=dirty", server.image_url("src"))).await;
        assert_eq!(meta(&incremental)["bitmap"], "b2");
        let (status, summary) = put_stream(&client, format!("{}?format=sparse&force=y", server.image_url("dst")), incremental).await;
        assert_eq!(status, StatusCode::OK, "{summary}");
        // Same content, same checksum.
        let checksum = |ticket: &'static str| {
            let client = client.clone();
            let url = format!("{}/checksum", server.image_url(ticket));
            async move { client.get(url).send().await.unwrap().json::<Value>().await.unwrap()["checksum"].clone() }
        };
        assert_eq!(checksum("src").await, checksum("dst").await);
        server
    })
    .await;
    run("qemu-img", &["compare", source.to_str().unwrap(), restored.to_str().unwrap()]);
}

/// The blkhash definition (imageio's), computed by Python's hashlib over
/// qemu's view: BLAKE2b with a 32-byte digest, other algorithms as
/// hashlib makes them.
fn reference_checksum(image: &Path, algorithm: &str, block_size: u64) -> String {
    let view = dir_raw(image);
    let script = "import hashlib, sys
name, bs = sys.argv[2], int(sys.argv[3])
new = (lambda: hashlib.blake2b(digest_size=32)) if name == 'blake2b' else (lambda: hashlib.new(name))
outer = new()
with open(sys.argv[1], 'rb') as f:
    while block := f.read(bs):
        inner = new()
        inner.update(block)
        outer.update(inner.digest())
print(outer.hexdigest())";
    let out = run("python3", &["-c", script, view.to_str().unwrap(), algorithm, &block_size.to_string()]);
    String::from_utf8(out).unwrap().trim().to_string()
}

fn dir_raw(image: &Path) -> std::path::PathBuf {
    let out = image.with_extension("checksum.raw");
    std::fs::write(&out, raw_view(image)).unwrap();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checksum_n_leaves_the_trailer_hash_out_and_the_stream_still_restores() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.qcow2");
    let restored = dir.path().join("restored.qcow2");
    create_image(&image, "qcow2", "10M");
    create_image(&restored, "qcow2", "10M");
    qemu_io(&image, "qcow2", &["write -P 0x51 0 1M", "write -P 0x52 5M 3M"]);
    let images = [format!("disk={}", image.display()), format!("dst={}", restored.display())];
    let server = Server::start(dir.path(), &images).await;
    let client = server.client();
    let hashed = get_stream(&client, format!("{}?format=sparse", server.image_url("disk"))).await;
    let plain = get_stream(&client, format!("{}?format=sparse&checksum=n", server.image_url("disk"))).await;
    let trailer = |stream: &[u8]| -> Value {
        let stop = *frame_headers(stream).last().unwrap();
        serde_json::from_slice(stream[stop + 40..].strip_suffix(b"\r\n").unwrap()).unwrap()
    };
    assert!(trailer(&hashed)["checksum"].is_object());
    let counts = trailer(&plain);
    assert!(counts.get("checksum").is_none(), "checksum=n: {counts}");
    assert_eq!((counts["frames"].clone(), counts["data-size"].clone()), (trailer(&hashed)["frames"].clone(), (4 * MIB).into()));
    let stop = |stream: &[u8]| *frame_headers(stream).last().unwrap();
    assert_eq!(plain[..stop(&plain)], hashed[..stop(&hashed)], "only the trailer differs");

    let (status, summary) = put_stream(&client, format!("{}?format=sparse", server.image_url("dst")), plain).await;
    assert_eq!(status, StatusCode::OK, "{summary}");
    let summary: Value = serde_json::from_str(&summary).unwrap();
    assert_eq!((summary["checksum"].as_str(), summary.get("verified")), (Some("none"), None), "{summary}");
    let response = client.get(format!("{}?format=sparse&checksum=no", server.image_url("disk"))).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    assert!(response.text().await.unwrap().contains("checksum=n"));
    drop(server);
    run("qemu-img", &["compare", image.to_str().unwrap(), restored.to_str().unwrap()]);
}

/// `PUT ?format=sparse&checksum=n` does not hash the stream: a flipped
/// byte that the default restore refuses lands, and the summary says the
/// checksum was not checked. Everything else is still checked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restore_with_checksum_n_skips_only_the_hash_and_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.qcow2");
    let target = dir.path().join("target.raw");
    create_image(&image, "qcow2", "10M");
    create_image(&target, "raw", "10M");
    qemu_io(&image, "qcow2", &["write -P 0x51 0 1M", "write -P 0x52 5M 3M"]);
    let server = Server::start(dir.path(), &[format!("disk={}", image.display()), format!("dst={}", target.display())]).await;
    let client = server.client();
    let stream = get_stream(&client, format!("{}?format=sparse", server.image_url("disk"))).await;
    let headers = frame_headers(&stream);
    assert_eq!(&stream[headers[1]..headers[1] + 4], b"data");
    let mut flipped = stream.clone();
    flipped[headers[1] + 40 + 7] ^= 0xff;
    let dst = server.image_url("dst");

    let (status, message) = put_stream(&client, format!("{dst}?format=sparse"), flipped.clone()).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{message}");
    assert!(message.contains("checksum"), "{message}");
    let (status, summary) = put_stream(&client, format!("{dst}?format=sparse&checksum=n"), flipped.clone()).await;
    assert_eq!(status, StatusCode::OK, "{summary}");
    let summary: Value = serde_json::from_str(&summary).unwrap();
    assert_eq!((summary["checksum"].as_str(), summary["verified"].as_bool()), (Some("unchecked"), Some(false)), "{summary}");
    assert_eq!(summary["data-size"], 4 * MIB, "{summary}");
    let restored = std::fs::read(&target).unwrap();
    assert_eq!((restored[7], restored[8], restored[5 * MIB as usize]), (0x51 ^ 0xff, 0x51, 0x52));

    let mut cut = stream.clone();
    cut.truncate(*headers.last().unwrap());
    let (status, message) = put_stream(&client, format!("{dst}?format=sparse&checksum=n"), cut).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{message}");
    assert!(message.contains("truncated"), "{message}");
    let response = client.put(format!("{dst}?checksum=n")).body(vec![0u8; 4096]).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    assert!(response.text().await.unwrap().contains("applies to format=sparse"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checksums_follow_the_blkhash_definition_and_the_stream_trailer() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.qcow2");
    // Not a multiple of the block size, with data, zeros and holes.
    create_image(&image, "qcow2", "10M");
    qemu_io(&image, "qcow2", &["write -P 0x41 0 1M", "write -P 0x42 5M 3M", "write -z 6M 64k"]);
    let server = Server::start(dir.path(), &[format!("disk={}", image.display())]).await;
    let client = server.client();
    let algorithms = ["blake2b", "blake2s", "sha1", "sha224", "sha256", "sha384", "sha512", "md5"];
    let cases = [(None, 4 << 20), (None, 65536), (None, 4096)].into_iter().chain(algorithms.map(|name| (Some(name), 1 << 20)));
    for (algorithm, block_size) in cases {
        let query = match algorithm {
            Some(name) => format!("algorithm={name}&block_size={block_size}"),
            None => format!("block_size={block_size}"),
        };
        let answer: Value =
            client.get(format!("{}/checksum?{query}", server.image_url("disk"))).send().await.unwrap().json().await.unwrap();
        let name = algorithm.unwrap_or("blake2b");
        assert_eq!(answer["algorithm"], name);
        assert_eq!(answer["block_size"], block_size);
        assert_eq!(answer["checksum"], reference_checksum(&image, name, block_size), "{query}");
    }
    let stream = get_stream(&client, format!("{}?format=sparse", server.image_url("disk"))).await;
    let stop = *frame_headers(&stream).last().unwrap();
    assert_eq!(&stream[stop..stop + 4], b"stop");
    let trailer: Value = serde_json::from_slice(stream[stop + 40..].strip_suffix(b"\r\n").unwrap()).unwrap();
    assert_eq!(trailer["checksum"]["checksum"], reference_checksum(&image, "blake2b", 4 << 20));
    for bad in ["block_size=1000", "block_size=33554432", "algorithm=sha3_256", "algorithm=BLAKE2B"] {
        let response = client.get(format!("{}/checksum?{bad}", server.image_url("disk"))).send().await.unwrap();
        assert_eq!(response.status(), StatusCode::BAD_REQUEST, "{bad}");
    }
    let listed: Value = client.get(format!("{}/checksum/algorithms", server.image_url("disk"))).send().await.unwrap().json().await.unwrap();
    assert_eq!(listed["algorithms"], serde_json::json!(algorithms));
}

/// Offsets of the frame headers of an encoded stream.
fn frame_headers(stream: &[u8]) -> Vec<usize> {
    let mut headers = Vec::new();
    let mut at = 0;
    while at < stream.len() {
        headers.push(at);
        let kind = &stream[at..at + 4];
        let length = usize::from_str_radix(std::str::from_utf8(&stream[at + 22..at + 38]).unwrap(), 16).unwrap();
        at += 40 + if kind == b"zero" || (kind == b"stop" && length == 0) { 0 } else { length + 2 };
    }
    headers
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_streams_are_refused_and_nothing_after_the_bad_frame_is_applied() {
    let dir = tempfile::tempdir().unwrap();
    let source = dir.path().join("source.qcow2");
    create_image(&source, "qcow2", "32M");
    // Three data frames with zeros between them.
    qemu_io(&source, "qcow2", &["write -P 0x01 0 1M", "write -P 0x02 8M 1M", "write -P 0x03 16M 1M"]);
    let target = dir.path().join("target.raw");
    std::fs::write(&target, vec![0xee; 32 * MIB as usize]).unwrap();
    let server = Server::start(dir.path(), &[format!("src={}", source.display()), format!("dst={}", target.display())]).await;
    let client = server.client();
    let good = get_stream(&client, format!("{}?format=sparse", server.image_url("src"))).await;
    let headers = frame_headers(&good);
    // meta, data 0, zero, data 8M, zero, data 16M, zero, stop
    assert_eq!(headers.len(), 8, "{headers:?}");

    let mut corrupt_kind = good.clone();
    corrupt_kind[headers[3]..headers[3] + 4].copy_from_slice(b"dada");
    let mut truncated = good.clone();
    truncated.truncate(headers[5] + 1000);
    let mut wrong_checksum = good.clone();
    let byte_in_third_frame = headers[5] + 40 + 10;
    wrong_checksum[byte_in_third_frame] ^= 0xff;
    let dst = format!("{}?format=sparse", server.image_url("dst"));

    // (name, stream, what the message says, regions applied before it)
    let cases: [(&str, Vec<u8>, &str, usize); 3] = [
        ("unknown kind", corrupt_kind, "frame 4 at offset 8388608: unknown frame kind", 2),
        ("truncated", truncated, "truncated", 4),
        ("wrong checksum", wrong_checksum, "checksum", 6),
    ];
    for (name, stream, says, frames_applied) in cases {
        std::fs::write(&target, vec![0xee; 32 * MIB as usize]).unwrap();
        let (status, message) = put_stream(&client, dst.clone(), stream).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{name}: {message}");
        assert!(message.contains(says), "{name}: {message}");
        assert!(message.contains("were applied before it"), "{name}: {message}");
        let now = std::fs::read(&target).unwrap();
        // Frames 2 to 7 in order: data, zero, data, zero, data, zero.
        let regions: [(u64, u64, u8); 6] = [
            (0, MIB, 0x01),
            (MIB, 8 * MIB, 0),
            (8 * MIB, 9 * MIB, 0x02),
            (9 * MIB, 16 * MIB, 0),
            (16 * MIB, 17 * MIB, 0x03),
            (17 * MIB, 32 * MIB, 0),
        ];
        for (index, (start, end, byte)) in regions.iter().enumerate() {
            let expected = if index < frames_applied { *byte } else { 0xee };
            let mut region = now[*start as usize..*end as usize].to_vec();
            if name == "wrong checksum" && index == 4 {
                // The flipped byte landed: the checksum can only be checked
                // once the whole stream was read.
                region[10] ^= 0xff;
            }
            assert!(region.iter().all(|&b| b == expected), "{name}: region {index} should be {expected:#x}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dirty_tickets_find_their_one_bitmap_or_say_why_not() {
    let dir = tempfile::tempdir().unwrap();
    let none = dir.path().join("none.qcow2");
    let two = dir.path().join("two.qcow2");
    let one = dir.path().join("one.qcow2");
    for image in [&none, &two, &one] {
        create_image(image, "qcow2", "8M");
    }
    for (image, name) in [(&two, "a"), (&two, "b"), (&one, "only")] {
        run("qemu-img", &["bitmap", "--add", image.to_str().unwrap(), name]);
    }
    let error = Server::try_start(dir.path(), &[format!("x={},dirty", none.display())], &[]).await.err().unwrap();
    assert!(error.contains("has no dirty bitmap"), "{error}");
    let error = Server::try_start(dir.path(), &[format!("x={},dirty", two.display())], &[]).await.err().unwrap();
    assert!(error.contains("several dirty bitmaps (a, b)"), "{error}");
    let server = Server::start(dir.path(), &[format!("x={},dirty", one.display())]).await;
    let options: Value =
        server.client().request(reqwest::Method::OPTIONS, server.image_url("x")).send().await.unwrap().json().await.unwrap();
    assert_eq!(options["dirty"], true);
    let response = server.client().get(format!("{}/extents?context=dirty", server.image_url("x"))).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_inconsistent_bitmap_fails_at_startup() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.qcow2");
    create_image(&image, "qcow2", "8M");
    run("qemu-img", &["bitmap", "--add", image.to_str().unwrap(), "b0"]);
    // A writer that dies without closing the image leaves the bitmap in use.
    let mut nbd = QemuNbd::start(&image, "qcow2", &dir.path().join("nbd.sock"));
    std::thread::sleep(std::time::Duration::from_millis(200));
    nbd.child.kill().unwrap();
    nbd.child.wait().unwrap();
    let error = Server::try_start(dir.path(), &[format!("x={},bitmap=b0", image.display())], &[]).await.err().unwrap();
    assert!(error.contains("inconsistent"), "{error}");
}
