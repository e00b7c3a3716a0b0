//! The `blockgate` CLI against a server that lies or breaks its contract:
//! a fake HTTPS image server in the test (axum on rustls, an rcgen
//! certificate) answers each request as a well-behaved server would,
//! except where a case makes it answer badly. The CLI must exit non-zero
//! with a clear message, stay within bounded memory and time, never print
//! the server's control characters raw, and treat lost writes (a 502
//! "writes may be lost" after the server's storage daemon restarted) as
//! what they are.

use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::extract::Request;
use axum::http::{Method, StatusCode};
use axum::response::{IntoResponse, Response};
use futures::StreamExt;

use crate::common::*;

/// Answers a request (method, path and query, body) instead of the
/// well-behaved image, or passes (`None`).
type Override = Arc<dyn Fn(&Method, &str, &Bytes) -> Option<Response> + Send + Sync>;

/// A fake image server on 127.0.0.1 with a certificate for localhost.
struct Fake {
    port: u16,
    ca: PathBuf,
    /// Each request: `METHOD PATH?QUERY` and, for writes, what it wrote.
    seen: Arc<Mutex<Vec<String>>>,
    task: tokio::task::JoinHandle<()>,
    _dir: tempfile::TempDir,
}

impl Fake {
    /// A well-behaved image of `size` bytes (all zeros) but for what
    /// `answer` answers itself.
    async fn start(size: u64, answer: impl Fn(&Method, &str, &Bytes) -> Option<Response> + Send + Sync + 'static) -> Fake {
        let dir = tempfile::tempdir().unwrap();
        let (acceptor, ca) = self_signed_acceptor(dir.path());
        let seen = Arc::new(Mutex::new(Vec::new()));
        let answer: Override = Arc::new(answer);
        let log = seen.clone();
        let router = axum::Router::new().fallback(move |request: Request| {
            let (answer, log) = (answer.clone(), log.clone());
            async move {
                let (parts, body) = request.into_parts();
                let body = axum::body::to_bytes(body, 64 << 20).await.unwrap_or_default();
                let target = parts.uri.path_and_query().map_or("", |target| target.as_str()).to_string();
                let wrote = match (parts.headers.get("content-range"), parts.method.clone()) {
                    (Some(range), Method::PUT) => format!(" {}", range.to_str().unwrap()),
                    (_, Method::PATCH) => format!(" {}", String::from_utf8_lossy(&body)),
                    _ => String::new(),
                };
                log.lock().unwrap().push(format!("{} {target}{wrote}", parts.method));
                answer(&parts.method, &target, &body).unwrap_or_else(|| well_behaved(size, &parts.method, &target))
            }
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let task = tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else { return };
                let (acceptor, router) = (acceptor.clone(), router.clone());
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else { return };
                    let service = hyper_util::service::TowerToHyperService::new(router);
                    let builder = hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new());
                    let _ = builder.serve_connection(hyper_util::rt::TokioIo::new(tls), service).await;
                });
            }
        });
        Fake { port, ca, seen, task, _dir: dir }
    }

    fn url(&self) -> String {
        format!("https://localhost:{}/images/disk", self.port)
    }

    fn seen(&self) -> Vec<String> {
        self.seen.lock().unwrap().clone()
    }

    /// Runs the CLI with `ARGS` and `stdin`, killed past `limit` or 1 GiB
    /// resident: the output and the largest resident size seen, in bytes.
    async fn run(&self, args: &[&str], stdin: Stdio, limit: Duration) -> (Output, u64) {
        let mut command = Command::new(binary("blockgate"));
        command.arg("--cacert").arg(&self.ca).args(args).stdin(stdin).stdout(Stdio::piped()).stderr(Stdio::piped());
        let child = command.spawn().unwrap();
        let pid = child.id();
        let waiter = tokio::task::spawn_blocking(move || child.wait_with_output().unwrap());
        let started = Instant::now();
        let mut peak = 0;
        while !waiter.is_finished() {
            peak = peak.max(resident_peak(pid));
            // Past 1 GiB it would only grow: stop it before the machine
            // runs out.
            if started.elapsed() > limit || peak > 1 << 30 {
                let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), nix::sys::signal::Signal::SIGKILL);
                let output = waiter.await.unwrap();
                panic!(
                    "blockgate {args:?} ran past {limit:?} or 1 GiB (peak {} MiB): {}",
                    peak >> 20,
                    String::from_utf8_lossy(&output.stderr)
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        (waiter.await.unwrap(), peak)
    }
}

impl Drop for Fake {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// VmHWM of a process, in bytes (0 once it is gone).
fn resident_peak(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let line = status.lines().find(|line| line.starts_with("VmHWM:")).unwrap_or("VmHWM: 0 kB");
    line.split_whitespace().nth(1).and_then(|kb| kb.parse::<u64>().ok()).unwrap_or(0) << 10
}

/// What a well-behaved blockgate answers for an image of `size` zeros.
fn well_behaved(size: u64, method: &Method, target: &str) -> Response {
    let path = target.split('?').next().unwrap();
    match (method.as_str(), path.trim_start_matches("/images/disk")) {
        ("OPTIONS", "") => axum::Json(serde_json::json!({
            "features": ["extents", "zero", "flush", "checksum"], "max_readers": 8, "max_writers": 8, "size": size
        }))
        .into_response(),
        ("GET", "") if !target.contains("format=sparse") => (
            StatusCode::PARTIAL_CONTENT,
            [("content-range", format!("bytes 0-0/{size}")), ("content-type", "application/octet-stream".to_string())],
            vec![0u8],
        )
            .into_response(),
        ("GET", "/extents") => {
            let flags = if target.contains("context=dirty") { r#""dirty":false,"zero":true"# } else { r#""zero":true,"hole":true"# };
            format!(r#"[{{"start":0,"length":{size},{flags}}}]"#).into_response()
        }
        ("PUT", "") if target.contains("format=sparse") => {
            axum::Json(serde_json::json!({"frames": 1, "data-size": 0, "zero-size": size, "verified": false})).into_response()
        }
        ("PUT", "") | ("PATCH", "") => StatusCode::OK.into_response(),
        ("GET", "/checkpoints") => axum::Json(serde_json::json!([])).into_response(),
        _ => (StatusCode::NOT_FOUND, "not in the fake").into_response(),
    }
}

/// A body that never ends: `first`, then `more` again and again.
fn endless(first: &'static [u8], more: &'static [u8]) -> Body {
    let chunks = futures::stream::once(async move { Bytes::from_static(first) }).chain(futures::stream::repeat(Bytes::from_static(more)));
    Body::from_stream(chunks.map(Ok::<_, std::io::Error>))
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// The sparse-stream header of a frame.
fn frame(kind: &str, start: u64, length: u64) -> String {
    format!("{kind} {start:016x} {length:016x}\r\n")
}

const SIZE: u64 = 4 << 20;
const SECONDS: Duration = Duration::from_secs(60);

/// Fails if `text` holds a control character other than a newline.
fn assert_printable(what: &str, text: &[u8]) {
    let text = String::from_utf8_lossy(text);
    assert!(!text.chars().any(|c| c.is_control() && c != '\n'), "{what} holds control characters: {text:?}");
}

fn status(code: StatusCode, body: &'static str) -> Option<Response> {
    Some((code, [("content-type", "text/plain")], body).into_response())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_stream_that_ends_without_its_stop_frame_fails() {
    let meta = format!(r#"{{"virtual-size":{SIZE},"data-size":0}}"#);
    let stream = format!("{}{meta}\r\n{}", frame("meta", 0, meta.len() as u64), frame("zero", 0, SIZE));
    let fake = Fake::start(SIZE, move |method, target, _| {
        (method == Method::GET && target.contains("format=sparse")).then(|| stream.clone().into_response())
    })
    .await;
    let (output, _) = fake.run(&["backup", &fake.url()], Stdio::null(), SECONDS).await;
    assert_eq!(output.status.code(), Some(1), "{}", stderr(&output));
    assert!(stderr(&output).contains("ended before its stop frame"), "{}", stderr(&output));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_download_whose_extents_cover_half_the_image_fails() {
    let fake = Fake::start(SIZE, |_, target, _| {
        target.contains("/extents").then(|| format!(r#"[{{"start":0,"length":{},"zero":true,"hole":true}}]"#, SIZE / 2).into_response())
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let target = dir.path().join("disk.raw");
    let (output, _) = fake.run(&["download", &fake.url(), target.to_str().unwrap()], Stdio::null(), SECONDS).await;
    assert_eq!(output.status.code(), Some(1), "{}", stderr(&output));
    assert!(stderr(&output).contains(&format!("the extents end at {} of {SIZE} bytes", SIZE / 2)), "{}", stderr(&output));
    assert!(!target.exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_download_fails_at_once_on_zero_length_extents() {
    let fake = Fake::start(SIZE, |_, target, _| {
        const EMPTY: &[u8] = br#",{"start":0,"length":0,"zero":true,"hole":true}"#;
        target.contains("/extents").then(|| endless(br#"[{"start":0,"length":0,"zero":true,"hole":true}"#, EMPTY).into_response())
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let target = dir.path().join("disk.raw");
    let (output, _) = fake.run(&["download", &fake.url(), target.to_str().unwrap()], Stdio::null(), SECONDS).await;
    assert_eq!(output.status.code(), Some(1), "{}", stderr(&output));
    assert!(stderr(&output).contains("an empty extent at offset 0"), "{}", stderr(&output));
}

/// 64 KiB of one letter.
static LETTERS: [u8; 64 << 10] = [b'x'; 64 << 10];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endless_bodies_are_read_with_bounded_memory() {
    let fake = Fake::start(SIZE, |method, target, _| match (method.as_str(), target) {
        ("OPTIONS", _) => Some(endless(br#"{"features":[""#, &LETTERS).into_response()),
        (_, target) if target.contains("/extents") => Some(endless(br#"[{"start":0,"length":1,"zero":""#, &LETTERS).into_response()),
        (_, target) if target.contains("/checkpoints") => {
            Some((StatusCode::FORBIDDEN, endless(b"no such ticket ", &LETTERS)).into_response())
        }
        _ => None,
    })
    .await;
    let cases: [(&[&str], &str); 3] =
        [(&["info"], "larger than"), (&["extents"], "larger than"), (&["checkpoint", "list"], "403 Forbidden: no such ticket xxx")];
    for (args, says) in cases {
        let (output, peak) = fake.run(&[args, &[fake.url().as_str()]].concat(), Stdio::null(), SECONDS).await;
        assert_eq!(output.status.code(), Some(1), "{args:?}: {}", stderr(&output));
        assert!(stderr(&output).contains(says) && stderr(&output).len() < 20_000, "{args:?}: {}", stderr(&output));
        assert!(peak < 128 << 20, "{args:?}: {} MiB resident", peak >> 20);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_servers_text_reaches_the_terminal_escaped() {
    let fake = Fake::start(SIZE, |method, target, _| match (method.as_str(), target) {
        ("OPTIONS", _) => Some(
            axum::Json(serde_json::json!({"features": ["\u{9b}2J\u{1b}]0;title\u{7}"], "max_readers": 1, "max_writers": 1}))
                .into_response(),
        ),
        ("GET", "/images/disk/checkpoints") => Some(
            axum::Json(
                serde_json::json!([{"id": "cp\u{1b}[2J", "created": "\u{9b}31m", "parent": "\u{7f}", "dirty_bytes": 1, "usable": true}]),
            )
            .into_response(),
        ),
        ("GET", target) if target.starts_with("/images/disk/checksum") => Some(
            axum::Json(serde_json::json!({"algorithm": "blake2b", "block_size": 4 << 20, "checksum": "\u{1b}[2J\u{1b}[1;1H00ff"}))
                .into_response(),
        ),
        ("DELETE", _) => status(StatusCode::NOT_FOUND, "no checkpoint \u{1b}]0;owned\u{7}\u{1b}[2J\u{9b}1m here"),
        ("PUT", target) if target.contains("format=sparse") => Some(
            axum::Json(
                serde_json::json!({"frames": 1, "data-size": 0, "zero-size": 1, "verified": false, "checkpoint": "cp\u{9b}2J\u{1b}c"}),
            )
            .into_response(),
        ),
        _ => None,
    })
    .await;
    let url = fake.url();
    let cases: [&[&str]; 6] = [
        &["info", &url],
        &["checksum", &url],
        &["checkpoint", "list", &url],
        &["checkpoint", "list", "--json", &url],
        &["checkpoint", "delete", &url, "cp1"],
        &["restore", &url],
    ];
    for args in cases {
        let (output, _) = fake.run(args, Stdio::null(), SECONDS).await;
        assert_printable(&format!("{args:?} stdout"), &output.stdout);
        assert_printable(&format!("{args:?} stderr"), &output.stderr);
        let printed = String::from_utf8_lossy(&output.stdout).to_string() + &stderr(&output);
        assert!(printed.contains("2J"), "{args:?}: the text is shown, escaped: {printed}");
    }
}

/// A local raw file of `size` bytes: a MiB of data, then a hole.
fn local_file(dir: &std::path::Path, size: u64) -> PathBuf {
    let path = dir.join(format!("local-{size}.raw"));
    std::fs::write(&path, random_bytes(MIB as usize, 3)).unwrap();
    std::fs::File::options().write(true).open(&path).unwrap().set_len(size).unwrap();
    path
}

fn count(seen: &[String], prefix: &str) -> usize {
    seen.iter().filter(|line| line.starts_with(prefix)).count()
}

const LOST: &str = "the storage daemon restarted: writes may be lost; write the ranges again";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upload_whose_writes_were_lost_starts_over_and_sends_every_range() {
    let flushes = Arc::new(Mutex::new(0));
    let counted = flushes.clone();
    let fake = Fake::start(SIZE, move |method, _, body| {
        let flush = method == Method::PATCH && String::from_utf8_lossy(body).contains(r#""op":"flush""#);
        if !flush {
            return None;
        }
        let mut flushes = counted.lock().unwrap();
        *flushes += 1;
        if *flushes == 1 { status(StatusCode::BAD_GATEWAY, LOST) } else { None }
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let local = local_file(dir.path(), SIZE);
    let (output, _) = fake.run(&["upload", local.to_str().unwrap(), &fake.url()], Stdio::null(), SECONDS).await;
    assert!(output.status.success(), "{}", stderr(&output));
    assert!(stderr(&output).contains("starting the upload over"), "{}", stderr(&output));
    let seen = fake.seen();
    assert_eq!(*flushes.lock().unwrap(), 2, "a lost-writes 502 is not retried as if transient: {seen:?}");
    assert_eq!(count(&seen, "PUT /images/disk?flush=n bytes 0-1048575/*"), 2, "the data was sent again: {seen:?}");
    let zeroed = format!(r#"PATCH /images/disk {{"flush":false,"offset":{MIB},"op":"zero","size":{}}}"#, SIZE - MIB);
    assert_eq!(count(&seen, &zeroed), 1, "the zeros were written the second time, though the target reads as zeros: {seen:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upload_that_keeps_losing_writes_gives_up_and_says_so() {
    let fake = Fake::start(SIZE, move |method, _, body| {
        (method == Method::PATCH && String::from_utf8_lossy(body).contains(r#""op":"flush""#))
            .then(|| status(StatusCode::BAD_GATEWAY, LOST))
            .flatten()
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let local = local_file(dir.path(), SIZE);
    let (output, _) = fake.run(&["upload", local.to_str().unwrap(), &fake.url()], Stdio::null(), SECONDS).await;
    assert_eq!(output.status.code(), Some(1), "{}", stderr(&output));
    let said = stderr(&output);
    assert_eq!(said.matches("starting the upload over").count(), 2, "{said}");
    assert!(said.contains("writes were lost") && said.contains("run the upload again"), "{said}");
    assert_eq!(count(&fake.seen(), "PATCH /images/disk {\"op\":\"flush\"}"), 3, "{:?}", fake.seen());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restore_whose_writes_were_lost_must_be_run_again() {
    let fake = Fake::start(SIZE, |method, target, _| {
        (method == Method::PUT && target.contains("format=sparse")).then(|| status(StatusCode::BAD_GATEWAY, LOST)).flatten()
    })
    .await;
    let (output, _) = fake.run(&["restore", &fake.url()], Stdio::null(), SECONDS).await;
    assert_eq!(output.status.code(), Some(1), "{}", stderr(&output));
    assert!(stderr(&output).contains("run the restore again from the start"), "{}", stderr(&output));
    assert_eq!(count(&fake.seen(), "PUT /images/disk?format=sparse"), 1, "never retried");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upload_of_another_size_is_refused_unless_the_tail_is_zeroed() {
    let fake = Fake::start(SIZE, |_, _, _| None).await;
    let dir = tempfile::tempdir().unwrap();
    for size in [SIZE / 2, SIZE * 2] {
        let local = local_file(dir.path(), size);
        let (output, _) = fake.run(&["upload", local.to_str().unwrap(), &fake.url()], Stdio::null(), SECONDS).await;
        assert_eq!(output.status.code(), Some(2), "{}", stderr(&output));
        assert!(stderr(&output).contains(&size.to_string()) && stderr(&output).contains(&SIZE.to_string()), "{}", stderr(&output));
    }
    let seen = fake.seen();
    assert_eq!(count(&seen, "PUT") + count(&seen, "PATCH"), 0, "nothing was written: {seen:?}");
    let larger = local_file(dir.path(), SIZE * 2);
    let (output, _) = fake.run(&["upload", "--zero-tail", larger.to_str().unwrap(), &fake.url()], Stdio::null(), SECONDS).await;
    assert_eq!(output.status.code(), Some(2), "a larger file is refused even with --zero-tail: {}", stderr(&output));

    let smaller = local_file(dir.path(), SIZE / 2);
    let (output, _) = fake.run(&["upload", "--zero-tail", smaller.to_str().unwrap(), &fake.url()], Stdio::null(), SECONDS).await;
    assert!(output.status.success(), "{}", stderr(&output));
    assert!(stderr(&output).contains(&format!("zeroed the {} bytes past", SIZE / 2)), "{}", stderr(&output));
    let zeroed = format!(r#"PATCH /images/disk {{"flush":false,"offset":{},"op":"zero","size":{}}}"#, SIZE / 2, SIZE / 2);
    assert_eq!(count(&fake.seen(), &zeroed), 1, "{:?}", fake.seen());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restore_passes_zero_tail_and_a_size_refusal_exits_2() {
    let fake = Fake::start(SIZE, |method, target, _| {
        let refused = method == Method::PUT && target.contains("format=sparse") && !target.contains("zero_tail=y");
        refused
            .then(|| {
                status(
                    StatusCode::BAD_REQUEST,
                    "the stream's virtual-size 2097152 differs from the image's size 4194304 (zero_tail=y zeroes the rest)",
                )
            })
            .flatten()
    })
    .await;
    let (output, _) = fake.run(&["restore", &fake.url()], Stdio::null(), SECONDS).await;
    assert_eq!(output.status.code(), Some(2), "{}", stderr(&output));
    assert!(stderr(&output).contains("2097152") && stderr(&output).contains("--zero-tail"), "{}", stderr(&output));
    let (output, _) = fake.run(&["restore", "--zero-tail", &fake.url()], Stdio::null(), SECONDS).await;
    assert!(output.status.success(), "{}", stderr(&output));
    assert_eq!(count(&fake.seen(), "PUT /images/disk?format=sparse&force=n&zero_tail=y"), 1, "{:?}", fake.seen());
}

/// Extents that say the whole image is data, so a download reads it.
fn all_data(target: &str) -> Option<Response> {
    target.contains("/extents").then(|| format!(r#"[{{"start":0,"length":{SIZE},"zero":false,"hole":false}}]"#).into_response())
}

/// A ranged GET's answer: `body`, said to be bytes `start`-`end`.
fn ranged(start: u64, end: u64, body: Vec<u8>) -> Option<Response> {
    Some((StatusCode::PARTIAL_CONTENT, [("content-range", format!("bytes {start}-{end}/{SIZE}"))], body).into_response())
}

/// Downloads from `fake` into a fresh raw file: the output, and whether a
/// file (under its name, or a partial one beside it) was left behind.
async fn download_raw(fake: &Fake) -> (Output, Vec<String>) {
    let dir = tempfile::tempdir().unwrap();
    let target = dir.path().join("disk.raw");
    let (output, _) = fake.run(&["download", "--progress", "none", &fake.url(), target.to_str().unwrap()], Stdio::null(), SECONDS).await;
    let left = std::fs::read_dir(dir.path()).unwrap().map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned()).collect();
    (output, left)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_download_whose_server_sends_fewer_or_more_bytes_than_asked_leaves_no_file() {
    for (what, length) in [("fewer", SIZE - 1), ("more", SIZE + 1)] {
        // Every ranged GET (the one-byte size probes too) is answered with
        // the whole image's Content-Range and `length` bytes.
        let fake = Fake::start(SIZE, move |method, target, _| match (method.as_str(), target) {
            ("GET", "/images/disk") => ranged(0, SIZE - 1, vec![0x5a; length as usize]),
            _ => all_data(target),
        })
        .await;
        let (output, left) = download_raw(&fake).await;
        assert_eq!(output.status.code(), Some(1), "{what}: {}", stderr(&output));
        assert!(stderr(&output).contains("short read") || stderr(&output).contains("Content-Range"), "{what}: {}", stderr(&output));
        assert_eq!(left, Vec::<String>::new(), "{what}: no file is left, under its name or as a partial one");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_download_whose_server_answers_another_range_fails() {
    // Half the image each time, always said to start at 0: the resumed
    // read of the second half gets the first half again.
    let fake = Fake::start(SIZE, |method, target, _| match (method.as_str(), target) {
        ("GET", "/images/disk") => ranged(0, SIZE - 1, random_bytes((SIZE / 2) as usize, 9)),
        _ => all_data(target),
    })
    .await;
    let (output, left) = download_raw(&fake).await;
    assert_eq!(output.status.code(), Some(1), "{}", stderr(&output));
    assert!(
        stderr(&output).contains(&format!("a GET of bytes {}-{}/* was answered with Content-Range", SIZE / 2, SIZE - 1)),
        "{}",
        stderr(&output)
    );
    assert_eq!(left, Vec::<String>::new());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_download_of_one_data_extent_of_an_enormous_image_stays_in_bounded_memory() {
    // 2^62 bytes, all said to be data: tmpfs takes a sparse file that
    // large, so the download reaches its jobs. Its reads are refused.
    const HUGE: u64 = 1 << 62;
    let fake = Fake::start(HUGE, |method, target, _| match (method.as_str(), target) {
        ("GET", "/images/disk/extents?context=zero") => {
            Some(format!(r#"[{{"start":0,"length":{HUGE},"zero":false,"hole":false}}]"#).into_response())
        }
        ("GET", "/images/disk") => None,
        _ => None,
    })
    .await;
    let dir = tempfile::tempdir_in("/dev/shm").unwrap();
    let target = dir.path().join("disk.raw");
    let (output, peak) = fake.run(&["download", "--progress", "none", &fake.url(), target.to_str().unwrap()], Stdio::null(), SECONDS).await;
    assert_eq!(output.status.code(), Some(1), "{}", stderr(&output));
    assert!(stderr(&output).contains("Content-Range"), "{}", stderr(&output));
    assert!(peak < 256 << 20, "peak {} MiB", peak >> 20);
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0, "no file is left");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_download_of_an_image_larger_than_a_file_can_be_says_so() {
    for size in [u64::MAX, i64::MAX as u64 + 1] {
        let fake = Fake::start(size, |_, _, _| None).await;
        let dir = tempfile::tempdir_in("/dev/shm").unwrap();
        let target = dir.path().join("disk.raw");
        let (output, _) =
            fake.run(&["download", "--progress", "none", &fake.url(), target.to_str().unwrap()], Stdio::null(), SECONDS).await;
        assert_eq!(output.status.code(), Some(1), "{size}: {}", stderr(&output));
        assert!(stderr(&output).contains(&format!("{size} bytes are more than a file can hold")), "{size}: {}", stderr(&output));
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0, "{size}: no file is left");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redirect_to_plain_http_is_not_followed() {
    // A plain-TCP listener where the redirect points: nothing may reach it.
    let plain = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    plain.set_nonblocking(true).unwrap();
    let location = format!("http://127.0.0.1:{}/images/disk", plain.local_addr().unwrap().port());
    let fake = Fake::start(SIZE, move |method, target, _| match (method.as_str(), target) {
        ("GET", "/images/disk") => Some((StatusCode::FOUND, [("location", location.clone())]).into_response()),
        _ => all_data(target),
    })
    .await;
    let (output, left) = download_raw(&fake).await;
    assert_eq!(output.status.code(), Some(1), "{}", stderr(&output));
    assert!(stderr(&output).contains("302"), "{}", stderr(&output));
    assert!(plain.accept().is_err(), "the CLI followed the redirect to plain HTTP: {}", stderr(&output));
    assert_eq!(left, Vec::<String>::new());
}
