//! The CLI never leaves a file that looks like a finished backup, and says
//! what went wrong: Ctrl-C (or SIGTERM) mid-download removes the partial
//! file and exits 130, a failed incremental leaves no overlay, errors carry
//! the server's reason once, a bad `--cacert` is refused, retries are
//! announced; and over an NBD server that fails reads and writes at random
//! (nbdkit's error filter), transfers end exact or fail loudly.

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::common::*;

fn blockgate(server: &Server, args: &[&str]) -> Output {
    Command::new(binary("blockgate")).arg("--cacert").arg(server.ca()).args(args).output().unwrap()
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// Files in `dir` whose name starts with `prefix`.
fn files_named(dir: &Path, prefix: &str) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|entry| entry.file_name().to_string_lossy().into_owned())
        .filter(|name| name.starts_with(prefix))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_interrupted_download_leaves_no_file_behind() {
    let dir = tempfile::tempdir().unwrap();
    // A slow source: 1 GiB of pattern data, each read delayed.
    let slow = Nbdkit::start(dir.path(), "slow", &["--filter=delay", "pattern", "size=1G", "rdelay=20ms"]);
    let server = Server::start(dir.path(), &[format!("slow={},ro", slow.uri())]).await;
    for (signal, name) in [(Signal::SIGINT, "disk.raw"), (Signal::SIGTERM, "disk.qcow2")] {
        let target = dir.path().join(name);
        let child = Command::new(binary("blockgate"))
            .arg("--cacert")
            .arg(server.ca())
            .args(["download", "--progress", "json", &server.image_url("slow"), target.to_str().unwrap()])
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        wait_until("the download is under way", async || !files_named(dir.path(), &format!(".{name}.partial")).is_empty()).await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        kill(Pid::from_raw(child.id() as i32), signal).unwrap();
        let output = child.wait_with_output().unwrap();
        assert_eq!(output.status.code(), Some(130), "{signal}: {}", stderr(&output));
        assert!(stderr(&output).contains("removed the partial download"), "{}", stderr(&output));
        assert!(!target.exists(), "{name} must not exist after {signal}");
        assert_eq!(files_named(dir.path(), &format!(".{name}")), Vec::<String>::new(), "no partial file is left");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_incremental_leaves_no_overlay() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.qcow2");
    create_image(&image, "qcow2", "16M");
    let base = dir.path().join("base.qcow2");
    create_image(&base, "qcow2", "16M");
    let server = Server::start(dir.path(), &[format!("disk={}", image.display())]).await;
    let overlay = dir.path().join("inc.qcow2");
    let output = blockgate(
        &server,
        &["download", "--incremental", "--backing", base.to_str().unwrap(), &server.image_url("disk"), overlay.to_str().unwrap()],
    );
    assert_eq!(output.status.code(), Some(1));
    assert!(stderr(&output).contains("404") && stderr(&output).contains("dirty bitmap"), "{}", stderr(&output));
    assert!(!overlay.exists(), "an empty overlay would look like a valid 'no changes' backup");
    assert_eq!(files_named(dir.path(), ".inc.qcow2"), Vec::<String>::new());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_say_what_went_wrong_once() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &[format!("disk={}/disk.raw,size=1M", dir.path().display())]).await;
    let target = dir.path().join("x.raw");
    let unknown = blockgate(&server, &["download", &server.url("/images/nope"), target.to_str().unwrap()]);
    assert_eq!(unknown.status.code(), Some(1));
    assert!(stderr(&unknown).contains("403 Forbidden: no such ticket \"nope\""), "{}", stderr(&unknown));
    assert!(!target.exists());

    let not_pem = dir.path().join("not.pem");
    std::fs::write(&not_pem, "just text\n").unwrap();
    let output =
        Command::new(binary("blockgate")).arg("--cacert").arg(&not_pem).args(["info", &server.image_url("disk")]).output().unwrap();
    assert_eq!(output.status.code(), Some(1));
    assert!(stderr(&output).contains("holds no PEM certificate"), "{}", stderr(&output));

    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let refused = blockgate(&server, &["info", &format!("https://localhost:{port}/images/disk")]);
    let said = stderr(&refused);
    assert_eq!(refused.status.code(), Some(1));
    assert!(said.contains("retrying in"), "retries are announced: {said}");
    let last = said.lines().last().unwrap();
    assert!(last.starts_with("blockgate: error: ") && last.contains("Connection refused"), "{said}");
    assert_eq!(last.matches("error sending request").count(), 1, "each cause once: {last}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transfers_over_a_flaky_nbd_server_end_exact_or_fail_loudly() {
    let dir = tempfile::tempdir().unwrap();
    let source = dir.path().join("source.raw");
    let content = random_bytes(64 * MIB as usize, 61);
    std::fs::write(&source, &content).unwrap();
    let flaky_reads = Nbdkit::start(
        dir.path(),
        "reads",
        &["-r", "--filter=error", "file", source.to_str().unwrap(), "error-pread=EIO", "error-pread-rate=10%"],
    );
    let (sturdy, broken) = (dir.path().join("sturdy.raw"), dir.path().join("broken.raw"));
    std::fs::write(&sturdy, vec![0u8; 64 * MIB as usize]).unwrap();
    std::fs::write(&broken, vec![0u8; 64 * MIB as usize]).unwrap();
    let rare_write_errors = Nbdkit::start(
        dir.path(),
        "rare",
        &["--filter=error", "file", sturdy.to_str().unwrap(), "error-pwrite=EIO", "error-pwrite-rate=0.5%"],
    );
    let write_errors = Nbdkit::start(
        dir.path(),
        "often",
        &["--filter=error", "file", broken.to_str().unwrap(), "error-pwrite=EIO", "error-pwrite-rate=50%"],
    );
    let server = Server::start(
        dir.path(),
        &[format!("src={},ro", flaky_reads.uri()), format!("sturdy={}", rare_write_errors.uri()), format!("broken={}", write_errors.uri())],
    )
    .await;

    // The CLI reads on from where each cut body stopped: exact.
    let copy = dir.path().join("copy.raw");
    let output = blockgate(&server, &["download", "--connections", "2", &server.image_url("src"), copy.to_str().unwrap()]);
    assert!(output.status.success(), "{}", stderr(&output));
    assert!(std::fs::read(&copy).unwrap() == content, "the download is byte-exact");

    // curl: exact bytes, or a failure; never a complete-looking wrong body.
    for attempt in 0..3 {
        let out = dir.path().join(format!("curl-{attempt}.raw"));
        let status = Command::new("curl")
            .args(["-sS", "--fail", "--cacert"])
            .arg(server.ca())
            .arg(server.image_url("src"))
            .arg("-o")
            .arg(&out)
            .status()
            .unwrap();
        if status.success() {
            assert!(std::fs::read(&out).unwrap() == content, "curl succeeded with wrong bytes");
        }
    }

    // Uploads: rare write errors are retried to an exact copy; frequent
    // ones fail loudly.
    let output = blockgate(&server, &["upload", copy.to_str().unwrap(), &server.image_url("sturdy")]);
    assert!(output.status.success(), "{}", stderr(&output));
    assert!(std::fs::read(&sturdy).unwrap() == content, "the upload is exact");
    let output = blockgate(&server, &["upload", copy.to_str().unwrap(), &server.image_url("broken")]);
    assert_eq!(output.status.code(), Some(1), "{}", stderr(&output));
    assert!(stderr(&output).contains("502") && stderr(&output).contains("EIO"), "{}", stderr(&output));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicate_image_ids_are_refused_and_host_names_are_listened_on() {
    let dir = tempfile::tempdir().unwrap();
    let output = Command::new(binary("blockgate-server"))
        .args(["--image", "a=x.raw,size=1M", "--image", "a=y.raw,size=1M"])
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
    assert!(stderr(&output).contains("\"a\" is given twice"), "{}", stderr(&output));
    assert!(!dir.path().join("x.raw").exists(), "nothing was created");

    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let state = dir.path().join("state");
    let mut child = Command::new(binary("blockgate-server"))
        .args(["--listen", &format!("localhost:{port}"), "--state-dir", state.to_str().unwrap(), "--image", "a=a.raw,size=1M"])
        .current_dir(dir.path())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let url = format!("https://localhost:{port}/info/");
    let answered = (0..250).any(|_| {
        std::thread::sleep(Duration::from_millis(20));
        Command::new("curl")
            .args(["-sSf", "--cacert"])
            .arg(state.join("ca.pem"))
            .arg(&url)
            .stderr(Stdio::null())
            .status()
            .unwrap()
            .success()
    });
    // SIGTERM, as a service manager stops it: SIGKILL would leave its
    // qemu-storage-daemon behind (see the README's known limits).
    kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM).unwrap();
    assert!(child.wait().unwrap().success(), "the server stops cleanly on SIGTERM");
    assert!(answered, "--listen localhost:PORT serves");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_raw_file_with_a_forged_qcow2_header_is_read_as_raw() {
    let dir = tempfile::tempdir().unwrap();
    // A host file the user can read, and a raw backup of a guest that
    // wrote a qcow2 header naming it as its backing file.
    let secret = dir.path().join("secret.txt");
    std::fs::write(&secret, b"SECRET HOST FILE ".repeat(4096)).unwrap();
    let header = dir.path().join("hdr.qcow2");
    run("qemu-img", &["create", "-q", "-f", "qcow2", "-b", secret.to_str().unwrap(), "-F", "raw", header.to_str().unwrap(), "64M"]);
    let mut backup = std::fs::read(&header).unwrap();
    backup.resize(64 * MIB as usize, 0);
    let backup_file = dir.path().join("backup.raw");
    std::fs::write(&backup_file, &backup).unwrap();
    let target = dir.path().join("target.raw");
    std::fs::write(&target, vec![0u8; 64 * MIB as usize]).unwrap();
    let server = Server::start(dir.path(), &[format!("dst={}", target.display())]).await;

    let output = blockgate(&server, &["upload", backup_file.to_str().unwrap(), &server.image_url("dst")]);
    assert!(output.status.success(), "{}", stderr(&output));
    let uploaded = std::fs::read(&target).unwrap();
    assert!(uploaded == backup, "the file's own bytes were uploaded, header and all");
    assert!(!uploaded.windows(17).any(|window| window == b"SECRET HOST FILE "), "the host file was sent");
    assert!(stderr(&output).contains("looks like qcow2 but is read as raw"), "the user is told: {}", stderr(&output));

    let checksum = |target: &str, extra: &[&str]| {
        let output = blockgate(&server, &[&["checksum"][..], extra, &[target]].concat());
        assert!(output.status.success(), "{}", stderr(&output));
        String::from_utf8_lossy(&output.stdout).split_whitespace().next().unwrap().to_string()
    };
    let remote = checksum(&server.image_url("dst"), &[]);
    assert_eq!(checksum(backup_file.to_str().unwrap(), &[]), remote, "the local file is hashed as raw");
    // As qcow2 only when asked (or named so), and then its header's links
    // are followed only on request (--follow-links).
    let output = blockgate(&server, &["checksum", "--format", "qcow2", backup_file.to_str().unwrap()]);
    assert!(!output.status.success(), "the forged header's backing file was followed");
    assert!(stderr(&output).contains("--follow-links"), "{}", stderr(&output));
    let output = blockgate(&server, &["checksum", "--format", "raw", &server.image_url("dst")]);
    assert!(!output.status.success() && stderr(&output).contains("for a local file"), "{}", stderr(&output));
}

/// The qemu-nbd children of a process.
fn qemu_nbd_children(pid: u32) -> Vec<u32> {
    children(pid)
        .into_iter()
        .filter(|child| std::fs::read_to_string(format!("/proc/{child}/cmdline")).is_ok_and(|line| line.starts_with("qemu-nbd")))
        .collect()
}

/// True while `pid` runs (a zombie does not).
fn running(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .is_ok_and(|stat| stat.rsplit_once(')').is_some_and(|(_, rest)| !rest.trim_start().starts_with('Z')))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_download_leaves_no_qemu_nbd_and_the_next_run_removes_its_partial_file() {
    let dir = tempfile::tempdir().unwrap();
    let slow = Nbdkit::start(dir.path(), "slow", &["--filter=delay", "pattern", "size=1G", "rdelay=20ms"]);
    let small = dir.path().join("small.raw");
    std::fs::write(&small, random_bytes(4 * MIB as usize, 7)).unwrap();
    let server = Server::start(dir.path(), &[format!("slow={},ro", slow.uri()), format!("small={},ro", small.display())]).await;
    let target = dir.path().join("disk.qcow2");
    let mut child = Command::new(binary("blockgate"))
        .arg("--cacert")
        .arg(server.ca())
        .args(["download", "--progress", "none", &server.image_url("slow"), target.to_str().unwrap()])
        .spawn()
        .unwrap();
    wait_until("the download is under way", async || !qemu_nbd_children(child.id()).is_empty()).await;
    let qemu_nbd = qemu_nbd_children(child.id());
    tokio::time::sleep(Duration::from_millis(300)).await;
    child.kill().unwrap();
    child.wait().unwrap();
    wait_until("qemu-nbd died with the CLI", async || !qemu_nbd.iter().any(|pid| running(*pid))).await;
    let partial = files_named(dir.path(), ".disk.qcow2.partial-");
    assert_eq!(partial.len(), 1, "SIGKILL leaves the partial file: {partial:?}");

    let output = blockgate(&server, &["download", &server.image_url("small"), target.to_str().unwrap()]);
    assert!(output.status.success(), "{}", stderr(&output));
    assert!(
        stderr(&output).contains(&format!("removed the stale partial download {}", dir.path().join(&partial[0]).display())),
        "{}",
        stderr(&output)
    );
    assert_eq!(files_named(dir.path(), ".disk.qcow2"), Vec::<String>::new(), "no partial file is left");
    assert!(target.exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ctrl_c_near_the_end_of_a_download_exits_130_and_leaves_nothing() {
    use std::io::BufRead;
    use std::os::unix::process::CommandExt;
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.raw");
    std::fs::write(&image, random_bytes(48 * MIB as usize, 5)).unwrap();
    let server = Server::start(dir.path(), &[format!("disk={},ro", image.display())]).await;
    let mut interrupted = 0;
    for attempt in 0..12 {
        let target = dir.path().join(format!("copy-{attempt}.qcow2"));
        // As a terminal does it: the CLI leads a process group, and Ctrl-C
        // signals the whole group.
        let mut child = Command::new(binary("blockgate"))
            .arg("--cacert")
            .arg(server.ca())
            .args(["download", "--connections", "2", "--progress", "json", &server.image_url("disk"), target.to_str().unwrap()])
            .process_group(0)
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let group = Pid::from_raw(child.id() as i32);
        // Past 80%, 90%... and at 100% (the flush and close).
        let threshold = [0.8, 0.9, 1.0][attempt % 3];
        let mut lines = std::io::BufReader::new(child.stderr.take().unwrap()).lines();
        let mut said = Vec::new();
        let mut qemu_nbd = Vec::new();
        for line in lines.by_ref() {
            let line = line.unwrap();
            if qemu_nbd.is_empty() {
                qemu_nbd = qemu_nbd_children(child.id());
            }
            let progress: Option<serde_json::Value> = serde_json::from_str(&line).ok();
            said.push(line);
            let done = progress.as_ref().and_then(|p| Some(p["done"].as_f64()? / p["total"].as_f64()?));
            if done.is_some_and(|done| done >= threshold) {
                nix::sys::signal::killpg(group, Signal::SIGINT).unwrap();
                break;
            }
        }
        said.extend(lines.map(Result::unwrap));
        let status = child.wait().unwrap();
        let said = said.join("\n");
        // Either the signal came in time (130, nothing left), or after the
        // download was complete (0, the whole file).
        match status.code() {
            Some(130) => {
                assert!(!target.exists(), "attempt {attempt}: {said}");
                interrupted += 1;
            }
            Some(0) => assert_eq!(std::fs::read(&target).unwrap().len(), 48 * MIB as usize, "attempt {attempt}"),
            _ => panic!("attempt {attempt} at {threshold}: {status}: {said}"),
        }
        assert_eq!(files_named(dir.path(), &format!(".copy-{attempt}")), Vec::<String>::new(), "attempt {attempt}: no partial file");
        wait_until("qemu-nbd is gone", async || !qemu_nbd.iter().any(|pid| running(*pid))).await;
    }
    assert!(interrupted >= 6, "most signals came before the end: {interrupted} of 12");
}
