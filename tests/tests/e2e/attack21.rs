//! Hostile review of the restore that writes data pieces as they arrive
//! and hashes on the blocking pool (`ParallelHasher`), and of
//! `checksum=n`: trailer checksums that differ or that the server does not
//! compute, streams of tiny frames, and the `checksum` query value. Each
//! test began as an attack; where its doc comment describes a defect, that
//! defect was fixed and the test asserts the fixed behaviour.

use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::common::*;

/// `stream` with its trailer changed by `change`.
fn with_trailer(stream: &[u8], change: impl FnOnce(&mut Value)) -> Vec<u8> {
    let at = stream.windows(22).rposition(|window| window == b"stop 0000000000000000 ").expect("a stop frame");
    let length = usize::from_str_radix(std::str::from_utf8(&stream[at + 22..at + 38]).unwrap(), 16).unwrap();
    let mut trailer: Value = serde_json::from_slice(&stream[at + 40..at + 40 + length]).unwrap();
    change(&mut trailer);
    let json = serde_json::to_vec(&trailer).unwrap();
    let mut changed = stream[..at].to_vec();
    changed.extend(frame("stop", 0, json.len() as u64, &json));
    changed
}

/// A trailer checksum is checked whatever case its hex is in, one of
/// another algorithm or block size is reported unchecked (never verified),
/// and one that differs is a 400 at the stop frame that says what was
/// applied. The zero frames skipped on a fresh target are still hashed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trailer_checksums_that_differ_are_refused_and_others_are_never_verified() {
    let dir = tempfile::tempdir().unwrap();
    let source = dir.path().join("source.qcow2");
    create_image(&source, "qcow2", "10M");
    qemu_io(&source, "qcow2", &["write -P 0x51 0 1M", "write -P 0x52 5M 3M"]);
    let targets = ["upper", "other", "size", "wrong"];
    let mut images = vec![format!("src={}", source.display())];
    for target in targets {
        let path = dir.path().join(format!("{target}.qcow2"));
        create_image(&path, "qcow2", "10M");
        images.push(format!("{target}={}", path.display()));
    }
    let server = Server::start(dir.path(), &images).await;
    let client = server.client();
    let full = get_stream(&client, format!("{}?format=sparse", server.image_url("src"))).await;
    let put = |ticket: &'static str, body: Vec<u8>| {
        let client = client.clone();
        let url = format!("{}?format=sparse", server.image_url(ticket));
        async move { put_stream(&client, url, body).await }
    };

    let upper = with_trailer(&full, |trailer| {
        let hex = trailer["checksum"]["checksum"].as_str().unwrap().to_uppercase();
        trailer["checksum"]["checksum"] = hex.into();
    });
    let (status, summary) = put("upper", upper).await;
    assert_eq!(status, StatusCode::OK, "{summary}");
    let summary: Value = serde_json::from_str(&summary).unwrap();
    assert_eq!((summary["checksum"].as_str(), summary["verified"].as_bool()), (Some("verified"), Some(true)), "{summary}");

    let other = with_trailer(&full, |trailer| trailer["checksum"]["algorithm"] = "sha256".into());
    let size = with_trailer(&full, |trailer| trailer["checksum"]["block_size"] = MIB.into());
    for (ticket, body) in [("other", other), ("size", size)] {
        let (status, summary) = put(ticket, body).await;
        assert_eq!(status, StatusCode::OK, "{ticket}: {summary}");
        let summary: Value = serde_json::from_str(&summary).unwrap();
        assert_eq!((summary["checksum"].as_str(), summary["verified"].as_bool()), (Some("unchecked"), Some(false)), "{summary}");
    }

    let wrong = with_trailer(&full, |trailer| {
        let hex = trailer["checksum"]["checksum"].as_str().unwrap();
        let first = if hex.starts_with('0') { '1' } else { '0' };
        let flipped = format!("{first}{}", &hex[1..]);
        trailer["checksum"]["checksum"] = flipped.into();
    });
    let (status, text) = put("wrong", wrong).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{text}");
    assert!(!text.contains("verified"), "{text}");
    for said in ["frame ", "differs from the trailer's", "4194304 bytes of data", "applied before it"] {
        assert!(text.contains(said), "the refusal says {said:?}: {text}");
    }
    // Its claim is gone: the good stream restores the same target.
    let (status, summary) = put("wrong", full).await;
    assert_eq!(status, StatusCode::OK, "{summary}");
    assert_eq!(serde_json::from_str::<Value>(&summary).unwrap()["verified"], true, "{summary}");
    drop(server);
    for target in targets {
        run("qemu-img", &["compare", source.to_str().unwrap(), dir.path().join(format!("{target}.qcow2")).to_str().unwrap()]);
    }
}

/// A full stream of 1-byte frames (mostly zero frames, a data frame every
/// 256): the hasher kept each one as a part of its block until the block
/// was hashed, and each data part kept alive the whole receive buffer it
/// was cut from, so 2 MiB of image held about 150 MiB (the parts list,
/// and every byte of the stream received); 1 MiB here, about 75 MiB. Memory must follow buffers,
/// not the number of frames.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_of_tiny_frames_restores_in_bounded_memory() {
    let dir = tempfile::tempdir().unwrap();
    let size = MIB;
    let target = dir.path().join("target.raw");
    create_image(&target, "raw", &size.to_string());
    let server = Server::start(dir.path(), &[format!("dst={}", target.display())]).await;
    let every = 256;
    let mut body = meta_frame(&json!({"virtual-size": size, "data-size": size / every}));
    body.reserve((size * 41) as usize);
    for at in 0..size {
        if at % every == 0 {
            body.extend(frame("data", at, 1, &[(at / every) as u8 | 1]));
        } else {
            body.extend(frame("zero", at, 1, &[]));
        }
    }
    body.extend(frame("stop", 0, 0, &[]));
    let before = peak_rss_kib(server.pid());
    let started = std::time::Instant::now();
    let (status, summary) = put_stream(&server.client(), format!("{}?format=sparse", server.image_url("dst")), body).await;
    let grown = peak_rss_kib(server.pid()).saturating_sub(before);
    eprintln!("{size} frames of 1 byte: {:?}, the server grew by {} MiB", started.elapsed(), grown >> 10);
    assert_eq!(status, StatusCode::OK, "{summary}");
    assert!(grown < 32 << 10, "the server grew by {} MiB for a 1 MiB image sent in 1-byte frames", grown >> 10);
    drop(server);
    let image = std::fs::read(&target).unwrap();
    for (at, &byte) in image.iter().enumerate() {
        let at = at as u64;
        let expected = if at % every == 0 { (at / every) as u8 | 1 } else { 0 };
        assert_eq!(byte, expected, "byte {at}");
    }
}

/// `checksum=` is a sparse-stream parameter: on a raw GET a bad value was
/// ignored (200 with the data), where `since=` on a raw GET is a 400.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_checksum_parameter_is_checked_wherever_it_is_given() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.raw");
    create_image(&image, "raw", "1M");
    let server = Server::start(dir.path(), &[format!("disk={}", image.display())]).await;
    let client = server.client();
    for query in ["?checksum=nope", "?checksum=n", "?format=raw&checksum=y", "?format=sparse&checksum=Y", "?format=sparse&checksum="] {
        let response = client.get(format!("{}{query}", server.image_url("disk"))).send().await.unwrap();
        let status = response.status();
        let text = response.text().await.unwrap();
        assert_eq!(status, StatusCode::BAD_REQUEST, "{query}: {}", &text[..text.len().min(200)]);
        assert!(text.contains("checksum"), "{query}: {text}");
    }
    let explicit = get_stream(&client, format!("{}?format=sparse&checksum=y", server.image_url("disk"))).await;
    assert!(String::from_utf8_lossy(&explicit).contains("\"checksum\":{"), "checksum=y carries the checksum");
}

/// Concurrent full restores: what each holds while its stream is hashed.
/// The hasher gathers four 4 MiB blocks (BLAKE2b hashes them side by side)
/// while the four before are hashed: up to 36 MiB a restore (36 MiB
/// measured for one restore alone, whatever its frame sizes; the 8 MiB
/// frame the decoder held before cost about 10 MiB).
/// Bounded by buffers, not by the image: this guards that bound.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_full_restores_hold_bounded_memory() {
    let dir = tempfile::tempdir().unwrap();
    let size = 48 * MIB;
    let source = dir.path().join("source.raw");
    std::fs::write(&source, random_bytes(size as usize, 21)).unwrap();
    let count = 4;
    let mut images = vec![format!("src={}", source.display())];
    for n in 0..count {
        let path = dir.path().join(format!("t{n}.raw"));
        create_image(&path, "raw", &size.to_string());
        images.push(format!("t{n}={}", path.display()));
    }
    let server = Server::start(dir.path(), &images).await;
    let full = get_stream(&server.client(), format!("{}?format=sparse", server.image_url("src"))).await;
    let before = peak_rss_kib(server.pid());
    let mut puts = Vec::new();
    for n in 0..count {
        let client = server.client();
        let url = format!("{}?format=sparse", server.image_url(&format!("t{n}")));
        let body = full.clone();
        puts.push(tokio::spawn(async move { put_stream(&client, url, body).await }));
    }
    for put in puts {
        let (status, summary) = put.await.unwrap();
        assert_eq!(status, StatusCode::OK, "{summary}");
    }
    let grown = peak_rss_kib(server.pid()).saturating_sub(before);
    eprintln!("{count} concurrent full restores of {} MiB: the server grew by {} MiB", size >> 20, grown >> 10);
    assert!(grown < count * (40 << 10), "{count} concurrent restores grew the server by {} MiB", grown >> 10);
}

/// A server with a 16 MiB raw target `t` (`--body-timeout 2`) and a
/// restore into it under way: its meta frame and the head of an 8 MiB
/// data frame are sent; the rest of the body is whatever goes down the
/// sender.
async fn trickled_restore(
    dir: &std::path::Path,
) -> (Server, tokio::sync::mpsc::Sender<Result<Vec<u8>, std::io::Error>>, tokio::task::JoinHandle<reqwest::Result<reqwest::Response>>) {
    let size = 16 * MIB;
    let target = dir.join("t.raw");
    create_image(&target, "raw", &size.to_string());
    let server = Server::try_start(dir, &[format!("t={}", target.display())], &["--body-timeout", "2"]).await.unwrap();
    let (sender, mut receiver) = tokio::sync::mpsc::channel::<Result<Vec<u8>, std::io::Error>>(4);
    let body = futures::stream::poll_fn(move |context| receiver.poll_recv(context));
    let request = server.client().put(server.image_url("t") + "?format=sparse").body(reqwest::Body::wrap_stream(body)).send();
    let response = tokio::spawn(request);
    let mut head = meta_frame(&json!({"virtual-size": size, "data-size": 8 * MIB}));
    head.extend(frame("data", 0, 8 * MIB, &[]));
    sender.send(Ok(head)).await.unwrap();
    (server, sender, response)
}

/// An 8 MiB data frame that trickles in a byte at a time, then stalls: the
/// pieces that arrived are written as they come (the decoder holds at most
/// one), the stall is a 400 after the body timeout that says what was
/// applied, and the target is free again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trickled_frame_that_stalls_is_refused_after_the_body_timeout_saying_what_was_applied() {
    let dir = tempfile::tempdir().unwrap();
    let (server, sender, response) = trickled_restore(dir.path()).await;
    for _ in 0..2000 {
        sender.send(Ok(vec![0x61])).await.unwrap();
    }
    sender.send(Ok(vec![0x61; 300 << 10])).await.unwrap();
    let stalled = std::time::Instant::now();
    let response = response.await.unwrap().unwrap();
    let waited = stalled.elapsed();
    let status = response.status();
    let text = response.text().await.unwrap();
    drop(sender);
    assert_eq!(status, StatusCode::BAD_REQUEST, "{text}");
    assert!(waited < std::time::Duration::from_secs(10), "refused after {waited:?}");
    for said in ["stalled", "262144 bytes of data", "applied before it"] {
        assert!(text.contains(said), "the refusal says {said:?}: {text}");
    }
    let (status, text) = raw_put_to(&server, "t", 0, &[1u8]).await;
    assert_eq!(status, StatusCode::OK, "the target is free after the stall: {text}");
}

/// Open finding: the body timeout is per stall, so a client that sends a
/// byte every second (under `--body-timeout`) holds its restore, the
/// target's claim and what the restore has gathered (up to 36 MiB of
/// hash batches since the restore hashes on the blocking pool) for as
/// long as it likes. Needs a policy (a least average rate, or a deadline
/// per body); run with `--run-ignored all`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "open finding: a body trickled at 1 byte/s is never cut (the body timeout is per stall)"]
async fn a_restore_trickled_at_one_byte_a_second_is_cut_off() {
    let dir = tempfile::tempdir().unwrap();
    let (_server, sender, mut response) = trickled_restore(dir.path()).await;
    let started = std::time::Instant::now();
    while started.elapsed() < std::time::Duration::from_secs(12) {
        tokio::select! {
            answer = &mut response => {
                let response = answer.unwrap().unwrap();
                assert_eq!(response.status(), StatusCode::BAD_REQUEST);
                return;
            }
            _ = tokio::time::sleep(std::time::Duration::from_secs(1)) => {
                if sender.send(Ok(vec![0x61])).await.is_err() {
                    return;
                }
            }
        }
    }
    panic!("a restore trickled at 1 byte/s ran for {:?} with --body-timeout 2", started.elapsed());
}
