//! Hostile qcow2 headers and host files: crafted headers must be refused
//! quickly (no crash, no hang), and no header may hand out a host file.
//!
//! Each test began as an attack during review; where its doc comment
//! describes a defect, that defect was fixed and the test asserts the
//! fixed behaviour (its name says which).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use reqwest::StatusCode;

use crate::common::*;

fn qcow2(path: &Path, options: &[&str], size: &str) {
    let mut args = vec!["create", "-q", "-f", "qcow2", "-u"];
    args.extend(options);
    args.extend([path.to_str().unwrap(), size]);
    run("qemu-img", &args);
}

fn root() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let root = std::fs::canonicalize(dir.path()).unwrap();
    (dir, root)
}

/// Starts a server on `image` as qcow2; the error text if it refused, and how long it took.
async fn try_serve(dir: &Path, image: &Path, extra: &[&str]) -> (Result<Server, String>, Duration) {
    let started = Instant::now();
    let result = Server::try_start(dir, &[format!("disk={},format=qcow2", image.display())], extra).await;
    (result, started.elapsed())
}

/// A version-3 qcow2 header (real fields, 64 KiB clusters, 4 MiB) built by
/// qemu-img, then patched.
fn real_header(dir: &Path, name: &str) -> (PathBuf, Vec<u8>) {
    let path = dir.join(name);
    run("qemu-img", &["create", "-q", "-f", "qcow2", path.to_str().unwrap(), "4M"]);
    let bytes = std::fs::read(&path).unwrap();
    (path, bytes)
}

/// A change made to a qcow2 header.
type HeaderEdit = Box<dyn Fn(&mut Vec<u8>)>;

fn put_u32(bytes: &mut [u8], at: usize, value: u32) {
    bytes[at..at + 4].copy_from_slice(&value.to_be_bytes());
}
fn put_u64(bytes: &mut [u8], at: usize, value: u64) {
    bytes[at..at + 8].copy_from_slice(&value.to_be_bytes());
}

/// Puts a backing name at `offset` (inside the first cluster) and an
/// extension list starting at the header length (104).
fn with_backing(bytes: &mut Vec<u8>, name: &[u8], offset: u64, extensions: &[(u32, Vec<u8>)]) {
    let mut at = u32::from_be_bytes(bytes[100..104].try_into().unwrap()) as usize;
    for (kind, data) in extensions {
        put_u32(bytes, at, *kind);
        put_u32(bytes, at + 4, data.len() as u32);
        bytes[at + 8..at + 8 + data.len()].copy_from_slice(data);
        at += 8 + data.len().next_multiple_of(8);
    }
    put_u64(bytes, at, 0);
    if !name.is_empty() {
        put_u64(bytes, 8, offset);
        put_u32(bytes, 16, name.len() as u32);
        let end = offset as usize + name.len();
        if bytes.len() < end {
            bytes.resize(end, 0);
        }
        bytes[offset as usize..end].copy_from_slice(name);
    }
}

/// Crafted headers: each refused at startup, quickly, the server alive
/// enough to say why; none leaks the secret.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attack_crafted_qcow2_headers_are_refused_quickly() {
    let (_guard, root) = root();
    let outside = root.join("outside");
    std::fs::create_dir(&outside).unwrap();
    let secret = outside.join("secret.raw");
    std::fs::write(&secret, random_bytes(4 * MIB as usize, 3)).unwrap();
    let images = root.join("images");
    std::fs::create_dir(&images).unwrap();
    std::fs::write(images.join("base.raw"), vec![0u8; 4 * MIB as usize]).unwrap();
    let raw_fmt = (0xe279_2acau32, b"raw".to_vec());
    let secret_name = secret.to_str().unwrap().as_bytes().to_vec();
    let mut nul_name = b"base.raw\0".to_vec();
    nul_name.extend(b"../outside/secret.raw");
    let long_name = format!("{}base.raw", "./".repeat(3000));
    let cases: Vec<(&str, HeaderEdit)> = vec![
        ("backing name with NUL", Box::new(move |b| with_backing(b, &nul_name, 4096, std::slice::from_ref(&raw_fmt)))),
        ("backing name of 6 KB", Box::new(move |b| with_backing(b, long_name.as_bytes(), 4096, &[(0xe279_2aca, b"raw".to_vec())]))),
        (
            "extension length past the header",
            Box::new(|b| {
                put_u32(b, 112, 0xe279_2aca);
                put_u32(b, 116, u32::MAX);
            }),
        ),
        (
            "extension length past the cluster, in the file",
            Box::new(|b| {
                put_u32(b, 112, 0x4441_5441);
                put_u32(b, 116, 70_000);
                put_u64(b, 72, 4);
            }),
        ),
        ("header length u32::MAX", Box::new(|b| put_u32(b, 100, u32::MAX))),
        ("header length 0", Box::new(|b| put_u32(b, 100, 0))),
        ("data-file bit without a name", Box::new(|b| put_u64(b, 72, 4))),
        (
            "data-file bit, name outside",
            Box::new({
                let name = secret_name.clone();
                move |b| {
                    put_u64(b, 72, 4);
                    with_backing(b, &[], 0, &[(0x4441_5441, name.clone())]);
                }
            }),
        ),
        (
            "version 2 with an absolute backing outside",
            Box::new({
                let name = secret_name.clone();
                move |b| {
                    put_u32(b, 4, 2);
                    put_u64(b, 8, 4096);
                    put_u32(b, 16, name.len() as u32);
                    b[4096..4096 + name.len()].copy_from_slice(&name);
                }
            }),
        ),
        (
            "version 2 relative backing ..",
            Box::new(|b| {
                let name = b"../outside/secret.raw";
                put_u32(b, 4, 2);
                put_u64(b, 8, 4096);
                put_u32(b, 16, name.len() as u32);
                b[4096..4096 + name.len()].copy_from_slice(name);
            }),
        ),
        (
            "backing offset u64::MAX",
            Box::new(|b| {
                put_u64(b, 8, u64::MAX);
                put_u32(b, 16, 10);
            }),
        ),
        (
            "backing offset past the 2 MiB read, size u32::MAX",
            Box::new(|b| {
                put_u64(b, 8, 3 << 20);
                put_u32(b, 16, u32::MAX);
            }),
        ),
        ("backing format json", Box::new(|b| with_backing(b, b"base.raw", 4096, &[(0xe279_2aca, b"json".to_vec())]))),
        ("backing format vmdk", Box::new(|b| with_backing(b, b"base.raw", 4096, &[(0xe279_2aca, b"vmdk".to_vec())]))),
        (
            "backing format qcow2 on a raw file naming a host file",
            Box::new(|b| with_backing(b, b"base.raw", 4096, &[(0xe279_2aca, b"qcow2".to_vec())])),
        ),
        (
            "json: backing",
            Box::new(|b| {
                with_backing(
                    b,
                    br#"json:{"driver":"raw","file":{"driver":"file","filename":"/etc/passwd"}}"#,
                    4096,
                    &[(0xe279_2aca, b"raw".to_vec())],
                )
            }),
        ),
        ("backing file is the image directory", Box::new(|b| with_backing(b, b".", 4096, &[(0xe279_2aca, b"raw".to_vec())]))),
        ("backing is /proc/self/fd/0 style", Box::new(|b| with_backing(b, b"/dev/stdin", 4096, &[(0xe279_2aca, b"raw".to_vec())]))),
    ];
    let mut report = Vec::new();
    for (index, (name, patch)) in cases.iter().enumerate() {
        let sub = root.join(format!("case-{index}"));
        std::fs::create_dir(&sub).unwrap();
        let (path, mut bytes) = real_header(&images, &format!("case-{index}.qcow2"));
        patch(&mut bytes);
        std::fs::write(&path, &bytes).unwrap();
        let (result, took) = try_serve(&sub, &path, &[]).await;
        assert!(took < Duration::from_secs(20), "{name}: took {took:?}");
        match result {
            Ok(server) => {
                let response = server.client().get(server.image_url("disk")).send().await.unwrap();
                let body = response.bytes().await.unwrap();
                let secret_bytes = std::fs::read(&secret).unwrap();
                assert!(!body.windows(64).any(|w| w == &secret_bytes[..64]), "{name}: the secret was served");
                report.push(format!("{name}: SERVED ({} bytes)", body.len()));
            }
            Err(error) => {
                let last = error.lines().rev().find(|line| !line.trim().is_empty()).unwrap_or("").to_string();
                assert!(!last.contains("panicked"), "{name}: the server panicked: {error}");
                report.push(format!("{name}: refused: {}", &last[..last.len().min(300)]));
            }
        }
    }
    eprintln!("{}", report.join("\n"));
    // Those that must be refused.
    for line in &report {
        if line.starts_with("json")
            || line.contains("outside")
            || line.contains("NUL")
            || line.contains("data-file bit")
            || line.contains("/dev/stdin")
            || line.contains("version 2")
        {
            assert!(line.contains("refused"), "{line}");
        }
    }
}

/// A backing chain that loops A -> B -> A, and chains of 17 and 18 files:
/// refused or served, never a hang or a crash.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attack_backing_loops_and_long_chains() {
    let (_guard, root) = root();
    let a = root.join("a.qcow2");
    let b = root.join("b.qcow2");
    qcow2(&a, &["-b", "b.qcow2", "-F", "qcow2"], "4M");
    qcow2(&b, &["-b", "a.qcow2", "-F", "qcow2"], "4M");
    let sub = root.join("loop");
    std::fs::create_dir(&sub).unwrap();
    let (result, took) = try_serve(&sub, &a, &[]).await;
    assert!(took < Duration::from_secs(20), "loop took {took:?}");
    assert!(result.is_err(), "a loop A->B->A is served");
    eprintln!("loop: {}", result.err().unwrap().lines().last().unwrap_or(""));
    // Self loop.
    let s = root.join("self.qcow2");
    qcow2(&s, &["-b", "self.qcow2", "-F", "qcow2"], "4M");
    let sub = root.join("self");
    std::fs::create_dir(&sub).unwrap();
    let (result, _) = try_serve(&sub, &s, &[]).await;
    assert!(result.is_err(), "a self loop is served");
    for files in [17usize, 18] {
        let chain = root.join(format!("chain-{files}"));
        std::fs::create_dir(&chain).unwrap();
        run("qemu-img", &["create", "-q", "-f", "raw", chain.join("l0.raw").to_str().unwrap(), "4M"]);
        let mut below = ("l0.raw".to_string(), "raw");
        for level in 1..files {
            let name = format!("l{level}.qcow2");
            qcow2(&chain.join(&name), &["-b", &below.0, "-F", below.1], "4M");
            below = (name, "qcow2");
        }
        let top = chain.join(&below.0);
        let (result, took) = try_serve(&chain, &top, &[]).await;
        assert!(took < Duration::from_secs(20), "chain of {files} took {took:?}");
        match result {
            Ok(server) => {
                let response = server.client().get(server.image_url("disk")).send().await.unwrap();
                eprintln!("chain of {files} files: served, GET {}", response.status());
            }
            Err(error) => eprintln!("chain of {files} files: refused: {}", error.lines().last().unwrap_or("")),
        }
    }
}

/// A raw image whose bytes are a qcow2 header naming a host file, served
/// as raw: its own bytes come back, and the daemon never opens the file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attack_a_raw_image_with_a_qcow2_header_is_never_followed() {
    let (_guard, root) = root();
    let secret = root.join("secret.raw");
    std::fs::write(&secret, random_bytes(MIB as usize, 4)).unwrap();
    let fake = root.join("fake.qcow2");
    qcow2(&fake, &["-b", secret.to_str().unwrap(), "-F", "raw"], "1M");
    let mut bytes = std::fs::read(&fake).unwrap();
    bytes.resize(MIB as usize, 0);
    let image = root.join("disk.img");
    std::fs::write(&image, &bytes).unwrap();
    let server = Server::start(&root, &[format!("disk={}", image.display())]).await;
    let body = server.client().get(server.image_url("disk")).send().await.unwrap().bytes().await.unwrap();
    assert!(body[..] == bytes[..], "raw bytes served");
    // A client writes a qcow2 header naming the secret into a raw image; after a daemon restart it is still raw.
    let [pid] = daemon_pids(&server)[..] else { panic!() };
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), nix::sys::signal::Signal::SIGKILL).unwrap();
    wait_until("restart", async || daemon_pids(&server).iter().any(|&other| other != pid)).await;
    let [pid] = daemon_pids(&server)[..] else { panic!() };
    let secret_meta = std::fs::metadata(&secret).unwrap();
    use std::os::unix::fs::MetadataExt;
    for entry in std::fs::read_dir(format!("/proc/{pid}/fd")).unwrap() {
        if let Ok(metadata) = std::fs::metadata(entry.unwrap().path()) {
            assert!(!(metadata.ino() == secret_meta.ino() && metadata.dev() == secret_meta.dev()), "the daemon opened the secret");
        }
    }
}

/// Attack (policy): the directory of an `--image` file is an allowed
/// directory *with everything below it*. A hostile qcow2 kept in a home or
/// /tmp directory names a hidden file below it as its external data file
/// (read *and written* through the image): a client's PUT then writes
/// into that file (here `.ssh/authorized_keys`), and a GET reads it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attack_an_image_in_a_home_directory_cannot_reach_a_hidden_file_below_it() {
    let (_guard, home) = root();
    let ssh = home.join(".ssh");
    std::fs::create_dir(&ssh).unwrap();
    let keys = ssh.join("authorized_keys");
    let image = home.join("disk.qcow2");
    run(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", "-o", &format!("data_file={},data_file_raw=on", keys.display()), image.to_str().unwrap(), "1M"],
    );
    let mut old = b"ssh-ed25519 AAAA-the-owners-key owner@host\n".to_vec();
    old.resize(MIB as usize, 0);
    std::fs::write(&keys, &old).unwrap();
    let started = Server::try_start(&home, &[format!("disk={}", image.display())], &[]).await;
    let server = match started {
        Err(error) => {
            eprintln!("refused: {}", error.lines().last().unwrap_or(""));
            return;
        }
        Ok(server) => server,
    };
    let read = server.client().get(server.image_url("disk")).send().await.unwrap().bytes().await.unwrap();
    let leaked = read.starts_with(b"ssh-ed25519 AAAA-the-owners-key");
    let attacker = b"ssh-ed25519 AAAA-attackers-key attacker@evil\n";
    let status = server
        .client()
        .put(server.image_url("disk"))
        .header("content-range", format!("bytes 0-{}/*", attacker.len() - 1))
        .body(attacker.to_vec())
        .send()
        .await
        .unwrap()
        .status();
    let now = std::fs::read(&keys).unwrap();
    assert!(
        !leaked && !now.starts_with(attacker),
        "a hidden file below the image's directory is served as its data file: read it: {leaked}, PUT {status} wrote authorized_keys: {}",
        now.starts_with(attacker)
    );
    let _ = StatusCode::OK;
}
