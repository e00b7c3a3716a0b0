//! Hostile review of the restore that gathers data pieces in pooled
//! buffers (`gather_piece`, `Decoder::piece_wanted`/`put_piece`) and of
//! `PUT ?format=sparse&checksum=n`.

use reqwest::StatusCode;
use serde_json::json;

use crate::common::*;

const PIECE: usize = 256 << 10;

/// PUTs `body` as a chunked body cut in `chunk`-byte pieces.
async fn put_in_chunks(server: &Server, ticket: &str, query: &str, body: &[u8], chunk: usize) -> (StatusCode, String) {
    let chunks: Vec<Result<Vec<u8>, std::io::Error>> = body.chunks(chunk).map(|c| Ok(c.to_vec())).collect();
    let stream = futures::stream::iter(chunks);
    let response = server
        .client_builder()
        .http1_only()
        .build()
        .unwrap()
        .put(format!("{}?format=sparse{query}", server.image_url(ticket)))
        .body(reqwest::Body::wrap_stream(stream))
        .send()
        .await;
    match response {
        Ok(response) => (response.status(), response.text().await.unwrap()),
        Err(error) => (StatusCode::IM_A_TEAPOT, format!("{error:?}")),
    }
}

/// A full stream of one data frame of two pieces and 3 bytes, a zero
/// frame, and a 1-piece frame, sent in HTTP chunks cut at every
/// interesting place relative to headers and pieces: it restores the same
/// whatever the cuts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pieces_cut_anywhere_by_http_chunks_restore_the_same() {
    let dir = tempfile::tempdir().unwrap();
    let size = 2 * MIB;
    let target = dir.path().join("t.raw");
    create_image(&target, "raw", &size.to_string());
    let server = Server::start(dir.path(), &[format!("t={}", target.display())]).await;
    let first = random_bytes(2 * PIECE + 3, 1);
    let second = random_bytes(PIECE, 2);
    let zero_at = first.len() as u64;
    let second_at = zero_at + 1000;
    let tail_at = second_at + PIECE as u64;
    let mut body = meta_frame(&json!({"virtual-size": size, "data-size": first.len() + second.len()}));
    let meta_len = body.len();
    body.extend(frame("data", 0, first.len() as u64, &first));
    body.extend(frame("zero", zero_at, 1000, &[]));
    body.extend(frame("data", second_at, PIECE as u64, &second));
    body.extend(frame("zero", tail_at, size - tail_at, &[]));
    body.extend(frame("stop", 0, 0, &[]));
    let mut expected = vec![0u8; size as usize];
    expected[..first.len()].copy_from_slice(&first);
    expected[second_at as usize..tail_at as usize].copy_from_slice(&second);
    let head = meta_len + 40;
    for chunk in [
        body.len(),
        1,
        2,
        39,
        40,
        41,
        head,
        head + 1,
        head + PIECE - 1,
        head + PIECE,
        head + PIECE + 1,
        PIECE + 1,
        2 * PIECE + 45,
        1 << 20,
        body.len(),
    ] {
        std::fs::write(&target, vec![0xeeu8; size as usize]).unwrap();
        let (status, text) = put_in_chunks(&server, "t", "&zero_tail=n", &body, chunk).await;
        if status != StatusCode::OK {
            let logs: Vec<String> = std::fs::read_dir(dir.path())
                .unwrap()
                .filter_map(|e| {
                    let p = e.unwrap().path();
                    p.to_str().unwrap().ends_with(".log").then(|| std::fs::read_to_string(p).unwrap())
                })
                .collect();
            panic!("chunks of {chunk}: {text}\nlogs: {}", logs.join("\n").lines().rev().take(20).collect::<Vec<_>>().join("\n"));
        }
        assert!(std::fs::read(&target).unwrap() == expected, "chunks of {chunk}: the target differs");
    }
}

/// The CR LF after a gathered last piece is wrong (or missing, the next
/// header right after the data): nothing of that piece lands, and the
/// refusal says what did (the two pieces before it), whatever the cuts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_crlf_after_a_gathered_piece_applies_nothing_of_it() {
    let dir = tempfile::tempdir().unwrap();
    let size = MIB;
    let target = dir.path().join("t.raw");
    create_image(&target, "raw", &size.to_string());
    let server = Server::start(dir.path(), &[format!("t={}", target.display())]).await;
    let data = random_bytes(2 * PIECE + 5, 3);
    for (terminator, chunk) in [(&b"\n\r"[..], 1), (b"\r\r", 7), (b"zero", 41), (b"\r\n", 0)] {
        let mut body = meta_frame(&json!({"virtual-size": size, "data-size": data.len()}));
        body.extend(format!("data {:016x} {:016x}\r\n", 0, data.len()).into_bytes());
        body.extend_from_slice(&data);
        if chunk == 0 {
            // Truncated exactly at the end of the last piece, before CR LF.
        } else {
            body.extend_from_slice(terminator);
            body.extend(frame("zero", data.len() as u64, size - data.len() as u64, &[]));
            body.extend(frame("stop", 0, 0, &[]));
        }
        std::fs::write(&target, vec![0u8; size as usize]).unwrap();
        let (status, text) = put_in_chunks(&server, "t", "", &body, chunk.max(1)).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{terminator:?}: {text}");
        let why = if chunk == 0 { "truncated" } else { "missing CR LF" };
        assert!(text.contains(why), "{terminator:?}: {text}");
        assert!(text.contains(&format!("{} bytes of data", 2 * PIECE)), "{terminator:?}: {text}");
        let image = std::fs::read(&target).unwrap();
        assert!(image[..2 * PIECE] == data[..2 * PIECE], "{terminator:?}: the pieces before landed");
        assert!(image[2 * PIECE..].iter().all(|&b| b == 0), "{terminator:?}: nothing of the bad piece landed");
    }
}

/// A full stream of random data in 64 KiB data frames (a fragmented
/// image's stream looks like this; a client may choose it) costs no more
/// memory than one of 8 MiB frames. The hasher holds pieces of 64 KiB and
/// more as they are, up to two batches of 16 MiB of blocks: when each
/// piece was gathered in its own pooled 256 KiB buffer, every 64 KiB it
/// held kept 256 KiB, and the server grew by 43-53 MiB (8 MiB frames:
/// 27-29 MiB), past the 40 MiB a restore may hold (attack21).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_of_64_kib_data_frames_holds_no_more_than_one_of_large_frames() {
    let size = 96 * MIB;
    let data = random_bytes(size as usize, 7);
    let mut grown = Vec::new();
    for (large, frame_size) in [(0, 8 * MIB as usize), (0, 64 << 10), (48 * MIB as usize, 64 << 10)] {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("t.raw");
        create_image(&target, "raw", &size.to_string());
        let server = Server::start(dir.path(), &[format!("t={}", target.display())]).await;
        let mut body = meta_frame(&json!({"virtual-size": size, "data-size": size}));
        body.reserve(size as usize + size as usize / 1000);
        for (n, piece) in data[..large].chunks(8 * MIB as usize).enumerate() {
            body.extend(frame("data", (n * 8 * MIB as usize) as u64, piece.len() as u64, piece));
        }
        for (n, piece) in data[large..].chunks(frame_size).enumerate() {
            body.extend(frame("data", (large + n * frame_size) as u64, piece.len() as u64, piece));
        }
        body.extend(frame("stop", 0, 0, &[]));
        let before = peak_rss_kib(server.pid());
        let (status, text) = put_stream(&server.client(), format!("{}?format=sparse", server.image_url("t")), body).await;
        assert_eq!(status, StatusCode::OK, "{text}");
        let mib = peak_rss_kib(server.pid()).saturating_sub(before) >> 10;
        eprintln!("{large} bytes in 8 MiB frames, then frames of {frame_size} bytes: the server grew by {mib} MiB");
        grown.push(mib);
    }
    assert!(
        grown[1].max(grown[2]) <= 40,
        "64 KiB frames: the server grew by {:?} MiB (8 MiB frames, 64 KiB ones, 8 MiB then 64 KiB)",
        grown
    );
}
