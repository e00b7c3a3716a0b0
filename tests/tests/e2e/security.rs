//! What a ticket holder must never reach: host files through a forged
//! image header (the format is never probed), `file://` urls outside the
//! `--allow-dir` directories (refused without a word about the file), and
//! images or sockets readable by others (whatever the umask); numbers in
//! ticket JSON that no clock can hold, which are a 400 while the reaper
//! goes on expiring tickets; and ticket ids, which never reach the log
//! (their fingerprints do) and with control characters are a 400.

use std::path::Path;
use std::time::Duration;

use reqwest::StatusCode;
use serde_json::json;

use crate::common::*;

const IMAGE_SIZE: u64 = 64 * MIB;

/// PUTs `bytes` at offset 0 of a ticket's image.
async fn put_at_zero(server: &Server, ticket: &str, bytes: Vec<u8>) {
    let range = format!("bytes 0-{}/*", bytes.len() - 1);
    let response = server.client().put(server.image_url(ticket)).header("Content-Range", range).body(bytes).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
}

async fn get_all(server: &Server, ticket: &str) -> Vec<u8> {
    let response = server.client().get(server.image_url(ticket)).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    response.bytes().await.unwrap().to_vec()
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|window| window == needle)
}

/// A qcow2 header made by qemu-img with the given create options.
fn forged_header(dir: &Path, name: &str, args: &[&str]) -> Vec<u8> {
    let path = dir.join(name);
    let mut all = vec!["create", "-q", "-f", "qcow2"];
    all.extend(args);
    all.extend([path.to_str().unwrap(), "64M"]);
    run("qemu-img", &all);
    std::fs::read(path).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_qcow2_header_written_into_a_raw_image_never_reaches_a_host_file() {
    let dir = tempfile::tempdir().unwrap();
    let (images, outside) = (dir.path().join("images"), dir.path().join("outside"));
    std::fs::create_dir_all(&images).unwrap();
    std::fs::create_dir_all(&outside).unwrap();
    let secret = outside.join("secret");
    let secret_bytes = random_bytes(MIB as usize, 41);
    std::fs::write(&secret, &secret_bytes).unwrap();
    let victim = outside.join("victim");
    let disk = images.join("disk.raw");
    std::fs::write(&disk, vec![0u8; IMAGE_SIZE as usize]).unwrap();

    let (server, control) = start_with_control(&images, &[]).await;
    let ticket = |id: &str| ticket(id, &disk, &["read", "write"], 300);
    // A client with a write ticket writes a qcow2 header whose backing
    // file is the secret, then the ticket is replaced by a new one.
    let backing_header = forged_header(dir.path(), "backing.qcow2", &["-b", secret.to_str().unwrap(), "-F", "raw"]);
    assert_eq!(control.add(&ticket("t1")).await, StatusCode::OK);
    put_at_zero(&server, "t1", backing_header.clone()).await;
    assert_eq!(control.delete("t1").await, StatusCode::NO_CONTENT);
    assert_eq!(control.add(&ticket("t2")).await, StatusCode::OK);
    let served = get_all(&server, "t2").await;
    assert_eq!(served.len() as u64, IMAGE_SIZE, "still the raw image's size");
    assert!(served[..backing_header.len()] == backing_header[..], "the header is served as the bytes it is");
    assert!(!contains(&served, &secret_bytes[..4096]), "the secret must never be served");
    assert_eq!(control.delete("t2").await, StatusCode::NO_CONTENT);

    // The same with an external data file: a write must not land in it.
    let data_file_header = forged_header(dir.path(), "data.qcow2", &["-o", &format!("data_file={},data_file_raw=on", victim.display())]);
    let victim_bytes = random_bytes(MIB as usize, 42);
    std::fs::write(&victim, &victim_bytes).unwrap();
    assert_eq!(control.add(&ticket("t3")).await, StatusCode::OK);
    put_at_zero(&server, "t3", data_file_header).await;
    assert_eq!(control.delete("t3").await, StatusCode::NO_CONTENT);
    assert_eq!(control.add(&ticket("t4")).await, StatusCode::OK);
    put_at_zero(&server, "t4", vec![0xaa; 65536]).await;
    assert!(std::fs::read(&victim).unwrap() == victim_bytes, "the host file is untouched");
    assert!(get_all(&server, "t4").await[..65536] == [0xaa; 65536][..], "the write went into the image");
    drop(server);
    let log = std::fs::read_to_string(
        std::fs::read_dir(&images).unwrap().flatten().find(|e| e.file_name().to_string_lossy().starts_with("server-")).unwrap().path(),
    )
    .unwrap();
    assert!(log.contains("looks like qcow2"), "the server warns about the forged header: {log}");
    assert!(!log.contains('\x1b'), "no terminal colour codes in a log file");

    // An --image spec is opened by its name, not by its content, too.
    std::fs::write(&disk, &backing_header).unwrap();
    let server = Server::start(dir.path(), &[format!("disk={}", disk.display())]).await;
    let served = get_all(&server, "disk").await;
    // qemu rounds a raw file's size up to whole sectors.
    assert_eq!(served.len() as u64, (backing_header.len() as u64).div_ceil(512) * 512);
    assert!(served[..backing_header.len()] == backing_header[..], "a .raw file is served raw, whatever it holds");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn file_urls_outside_the_allowed_directories_are_refused_without_a_word_about_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let (images, outside) = (dir.path().join("images"), dir.path().join("outside"));
    std::fs::create_dir_all(&images).unwrap();
    std::fs::create_dir_all(&outside).unwrap();
    std::fs::write(outside.join("secret"), random_bytes(123_456, 43)).unwrap();
    std::os::unix::fs::symlink(outside.join("secret"), images.join("link.raw")).unwrap();
    std::fs::write(images.join("disk.raw"), vec![0u8; MIB as usize]).unwrap();

    let (_server, control) = start_with_control(&images, &[]).await;
    let add = |path: String| {
        let body = json!({"uuid": "x", "size": 123_456, "url": format!("file://{path}"), "ops": ["read"], "timeout": 60});
        control.curl(&["-X", "PUT", "-d", &body.to_string(), &control.url("/tickets/x")])
    };
    let refused = add(outside.join("secret").display().to_string());
    assert_eq!(refused.0, 400);
    assert!(refused.1.contains("--allow-dir"), "{}", refused.1);
    let tries = [
        "/etc/shadow".to_string(),
        "/etc/passwd".to_string(),
        "/no/such/file".to_string(),
        images.join("link.raw").display().to_string(),
        images.join("../outside/secret").display().to_string(),
        images.join("../outside/missing").display().to_string(),
    ];
    for path in tries {
        assert_eq!(add(path.clone()), refused, "{path}: the same words whether it exists or not");
    }
    assert!(!refused.1.contains("123456") && !refused.1.contains("secret"), "{}", refused.1);
    let missing = add(images.join("new.raw").display().to_string());
    assert_eq!(missing.0, 400);
    assert!(missing.1.contains("does not exist") && !missing.1.contains("size="), "no --image hint in a ticket answer: {}", missing.1);
    let inside = add(images.join("disk.raw").display().to_string());
    assert_eq!(inside.0, 400, "inside, the size check applies as before");
    assert!(inside.1.contains("\"size\""), "{}", inside.1);

    // Without --allow-dir, file:// is off.
    let other = tempfile::tempdir().unwrap();
    let socket = other.path().join("control.sock");
    let _plain = Server::try_start(other.path(), &[], &["--control-socket", socket.to_str().unwrap()]).await.unwrap();
    let control = Control::new(socket);
    let body =
        json!({"uuid": "y", "size": MIB, "url": format!("file://{}", images.join("disk.raw").display()), "ops": ["read"], "timeout": 60});
    let (code, said) = control.curl(&["-X", "PUT", "-d", &body.to_string(), &control.url("/tickets/y")]);
    assert_eq!(code, 400);
    assert!(said.contains("disabled") && said.contains("--allow-dir"), "{said}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn images_the_server_creates_are_readable_by_their_owner_only() {
    let dir = tempfile::tempdir().unwrap();
    let (raw, qcow2) = (dir.path().join("new.raw"), dir.path().join("new.qcow2"));
    let _server = Server::start(dir.path(), &[format!("a={},size=1M", raw.display()), format!("b={},size=1M", qcow2.display())]).await;
    for path in [raw, qcow2] {
        let mode = std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&path).unwrap().permissions());
        assert_eq!(mode & 0o777, 0o600, "{}", path.display());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn absurd_timeouts_are_refused_and_tickets_still_expire() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.raw");
    std::fs::write(&image, vec![0u8; MIB as usize]).unwrap();
    let (server, control) = start_with_control(dir.path(), &[]).await;
    for field in ["timeout", "inactivity_timeout"] {
        for seconds in [u64::MAX, i64::MAX as u64, i64::MAX as u64 / 1_000_000_000] {
            let mut body = ticket("big", &image, &["read"], 60);
            body[field] = json!(seconds);
            let (code, said) = control.curl(&["-X", "PUT", "-d", &body.to_string(), &control.url("/tickets/big")]);
            assert_eq!(code, 400, "{field}={seconds}: {said}");
            assert!(said.contains(field), "{said}");
        }
    }
    assert_eq!(control.add(&ticket("short", &image, &["read"], 1)).await, StatusCode::OK);
    for seconds in [u64::MAX, i64::MAX as u64] {
        let (code, said) = control.curl(&["-X", "PATCH", "-d", &format!("{{\"timeout\": {seconds}}}"), &control.url("/tickets/short")]);
        assert_eq!(code, 400, "{said}");
    }
    assert_eq!(server.client().get(server.image_url("short")).send().await.unwrap().status(), StatusCode::OK, "the server still serves");
    // The reaper is alive: the one-second ticket goes.
    tokio::time::sleep(Duration::from_secs(1)).await;
    wait_until("the ticket expires", async || control.status("short").await.0 == StatusCode::NOT_FOUND).await;
}

/// What the server logs for a ticket id: `hashlib.blake2s(id)`'s first 8
/// hex digits.
fn fingerprint(id: &str) -> String {
    let script = "import hashlib, sys; print(hashlib.blake2s(sys.argv[1].encode()).hexdigest()[:8])";
    String::from_utf8(run("python3", &["-c", script, id])).unwrap().trim().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ticket_ids_never_reach_the_log_but_their_fingerprints_do() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.raw");
    std::fs::write(&image, random_bytes(64 * MIB as usize, 44)).unwrap();
    let ids = ["from-file-6d0b9e1f2a3c4d5e", "added-8c1f3a5b7d9e0f2a", "short-1a2b3c4d5e6f7a8b", "canceled-9f8e7d6c5b4a3f2e"];
    let file = dir.path().join("ticket.json");
    std::fs::write(&file, ticket(ids[0], &image, &["read"], 300).to_string()).unwrap();
    let file_argument = file.display().to_string();
    let (mut server, control) = start_with_control(dir.path(), &["--ticket", &file_argument, "--max-readers", "1"]).await;
    // Added, expired, served to a reader while another waits (503), and
    // canceled under a download.
    for (id, timeout) in [(ids[1], 300), (ids[2], 1), (ids[3], 300)] {
        assert_eq!(control.add(&ticket(id, &image, &["read"], timeout)).await, StatusCode::OK);
    }
    let client = server.client_builder().http1_only().build().unwrap();
    let mut download = client.get(server.image_url(ids[3])).send().await.unwrap();
    assert_eq!(download.status(), StatusCode::OK);
    assert_eq!(client.get(server.image_url(ids[3])).send().await.unwrap().status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(client.get(server.image_url(ids[0])).send().await.unwrap().status(), StatusCode::OK);
    assert_eq!(control.delete(ids[3]).await, StatusCode::NO_CONTENT);
    while let Ok(Some(_)) = download.chunk().await {}
    wait_until("the short ticket expires", async || control.status(ids[2]).await.0 == StatusCode::NOT_FOUND).await;
    server.stop();
    let log = std::fs::read_to_string(dir.path().join(format!("server-{}.log", server.port))).unwrap();
    for id in ids {
        assert!(!log.contains(id), "{id} is in the log:\n{log}");
    }
    let lines = |what: &str, id: &str| log.lines().filter(|line| line.contains(what) && line.contains(&fingerprint(id))).count();
    assert_eq!(lines("serving ticket", ids[0]), 1, "{log}");
    assert_eq!(lines("ticket added", ids[1]), 1, "{log}");
    assert_eq!(lines("ticket expired", ids[2]), 1, "{log}");
    assert!(lines("already has 1 readers", ids[3]) >= 1, "{log}");
    // The cut download may log "aborting a response body ... was
    // canceled" (when the body is polled before its connection is cut):
    // with the fingerprint, then.
    assert!(log.lines().filter(|line| line.contains("was canceled")).all(|line| line.contains(&fingerprint(ids[3]))), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ids_and_urls_with_control_characters_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.raw");
    std::fs::write(&image, vec![0u8; MIB as usize]).unwrap();
    let (server, control) = start_with_control(dir.path(), &[]).await;
    for (id, encoded) in
        [("a\nb", "a%0Ab"), ("a\rb", "a%0db"), ("a\u{1b}[31mb", "a%1B%5B31mb"), ("a\u{7f}", "a%7F"), ("a\u{85}", "a%C2%85")]
    {
        let body = ticket(id, &image, &["read"], 60).to_string();
        let (code, said) = control.curl(&["-X", "PUT", "-d", &body, &control.url(&format!("/tickets/{encoded}"))]);
        assert_eq!(code, 400, "PUT /tickets/{encoded}: {said}");
        assert!(said.contains("control characters"), "{said}");
        let response = server.client().get(server.image_url(encoded)).send().await.unwrap();
        assert_eq!(response.status(), StatusCode::BAD_REQUEST, "GET /images/{encoded}");
    }
    let mut body = ticket("t1", &image, &["read"], 60);
    body["url"] = serde_json::json!(format!("file://{}\nforged", image.display()));
    let (code, said) = control.curl(&["-X", "PUT", "-d", &body.to_string(), &control.url("/tickets/t1")]);
    assert_eq!(code, 400, "{said}");
    assert!(said.contains("\"url\""), "{said}");
}

/// The directory of the unix socket a child process of `parent` named
/// `program` listens on (qemu-nbd's `--socket PATH`, qemu-storage-daemon's
/// `addr.path=PATH`), once such a child runs.
async fn socket_dir_of_child(parent: u32, program: &str) -> std::path::PathBuf {
    let mut found = None;
    wait_until(&format!("{program} runs"), async || {
        found = children(parent).into_iter().find_map(|pid| {
            let cmdline = std::fs::read_to_string(format!("/proc/{pid}/cmdline")).ok()?;
            let words: Vec<&str> = cmdline.split('\0').collect();
            if !words[0].ends_with(program) {
                return None;
            }
            let after_flag = words.iter().position(|&word| word == "--socket").map(|at| words[at + 1].to_string());
            after_flag.or_else(|| words.iter().find_map(|word| Some(word.split("addr.path=").nth(1)?.split(',').next()?.to_string())))
        });
        found.is_some()
    })
    .await;
    Path::new(&found.unwrap()).parent().unwrap().to_path_buf()
}

/// The mode of a socket directory and of the sockets in it, once they are
/// `expected` (or after 5 s).
async fn modes(dir: &Path, expected: (u32, Vec<u32>)) -> (u32, Vec<u32>) {
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};
    let mode = |path: &Path| std::fs::symlink_metadata(path).unwrap().permissions().mode() & 0o777;
    let mut seen = (0, Vec::new());
    for _ in 0..50 {
        let sockets = std::fs::read_dir(dir).unwrap().flatten().filter(|entry| entry.file_type().unwrap().is_socket());
        seen = (mode(dir), sockets.map(|entry| mode(&entry.path())).collect());
        if seen == expected {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn private_sockets_stay_private_under_umask_000() {
    // Inherited by the server, the CLI and their qemu children.
    nix::sys::stat::umask(nix::sys::stat::Mode::empty());
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.qcow2");
    create_image(&image, "qcow2", "64M");
    let slow = Nbdkit::start(dir.path(), "slow", &["--filter=delay", "pattern", "size=1G", "rdelay=20ms"]);
    let server = Server::start(dir.path(), &[format!("disk={}", image.display()), format!("slow={},ro", slow.uri())]).await;
    let daemon = socket_dir_of_child(server.pid(), "qemu-storage-daemon").await;
    let private = (0o700, vec![0o600, 0o600]);
    assert_eq!(modes(&daemon, private.clone()).await, private, "the daemon's directory, its NBD and QMP sockets");
    // The CLI writes a qcow2 download through a local qemu-nbd.
    let target = dir.path().join("copy.qcow2");
    let mut cli = std::process::Command::new(binary("blockgate"))
        .arg("--cacert")
        .arg(server.ca())
        .args(["download", "--progress", "none", &server.image_url("slow"), target.to_str().unwrap()])
        .spawn()
        .unwrap();
    let local = socket_dir_of_child(cli.id(), "qemu-nbd").await;
    let private = (0o700, vec![0o600]);
    let seen = modes(&local, private.clone()).await;
    let _ = cli.kill();
    let _ = cli.wait();
    assert_eq!(seen, private, "the CLI's qemu-nbd directory and socket");
}
