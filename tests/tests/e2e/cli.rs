//! The `blockgate` CLI against a real server: round trips of raw and qcow2
//! images, a sparse 10 GiB image that moves only its data, an incremental
//! download chain, a checkpoint chain, backup | restore through a pipe, a
//! qemu-nbd restarted
//! mid-transfer, and failures that exit non-zero with one line.

use std::path::Path;
use std::process::{Command, Output, Stdio};

use serde_json::Value;

use crate::common::*;

fn blockgate(server: &Server, args: &[&str]) -> Output {
    Command::new(binary("blockgate")).arg("--cacert").arg(server.ca()).args(args).output().unwrap()
}

fn ok(output: Output) -> Output {
    assert!(output.status.success(), "blockgate failed: {}", String::from_utf8_lossy(&output.stderr));
    output
}

/// The final stats line of `--progress json`.
fn stats(output: &Output) -> Value {
    let stderr = String::from_utf8_lossy(&output.stderr);
    let last = stderr.lines().last().expect("a stats line");
    serde_json::from_str::<Value>(last).unwrap()["stats"].clone()
}

fn compare(a: &Path, b: &Path) {
    run("qemu-img", &["compare", "-U", a.to_str().unwrap(), b.to_str().unwrap()]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn download_and_upload_round_trip_raw_and_qcow2() {
    let dir = tempfile::tempdir().unwrap();
    let source = dir.path().join("source.qcow2");
    create_image(&source, "qcow2", "256M");
    qemu_io(&source, "qcow2", &["write -P 0x61 0 3M", "write -P 0x62 100M 17M", "write -z 101M 1M", "write -P 0x63 255M 1M"]);
    let mut images = vec![format!("src={}", source.display())];
    for format in ["raw", "qcow2"] {
        let target = dir.path().join(format!("target.{format}"));
        create_image(&target, format, "256M");
        images.push(format!("dst-{format}={}", target.display()));
    }
    let server = Server::start(dir.path(), &images).await;
    for format in ["raw", "qcow2"] {
        let copy = dir.path().join(format!("copy.{format}"));
        ok(blockgate(&server, &["download", "--progress", "none", &server.image_url("src"), copy.to_str().unwrap()]));
        let info: Value = serde_json::from_slice(&run("qemu-img", &["info", "--output=json", copy.to_str().unwrap()])).unwrap();
        assert_eq!(info["format"], format);
        compare(&source, &copy);
        let target_url = server.image_url(&format!("dst-{format}"));
        ok(blockgate(&server, &["upload", "--connections", "2", copy.to_str().unwrap(), &target_url]));
        compare(&source, &dir.path().join(format!("target.{format}")));
    }
    let remote = ok(blockgate(&server, &["checksum", &server.image_url("src")]));
    let local = ok(blockgate(&server, &["checksum", dir.path().join("copy.qcow2").to_str().unwrap()]));
    let value = |output: &Output| String::from_utf8_lossy(&output.stdout).split_whitespace().next().unwrap().to_string();
    assert_eq!(value(&remote), value(&local), "same content, same checksum");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sparse_10_gib_image_moves_only_its_data() {
    let dir = tempfile::tempdir().unwrap();
    let source = dir.path().join("sparse.qcow2");
    create_image(&source, "qcow2", "10G");
    qemu_io(&source, "qcow2", &["write -P 0x71 0 1M", "write -P 0x72 5G 2M", "write -P 0x73 10239M 1M"]);
    let target = dir.path().join("target.qcow2");
    create_image(&target, "qcow2", "10G");
    let server = Server::start(dir.path(), &[format!("src={}", source.display()), format!("dst={}", target.display())]).await;
    let copy = dir.path().join("copy.qcow2");
    let down = ok(blockgate(&server, &["download", "--progress", "json", &server.image_url("src"), copy.to_str().unwrap()]));
    assert_eq!(stats(&down)["data_bytes"], 4 * MIB, "only the 4 MiB of data crossed the network");
    compare(&source, &copy);
    let up = ok(blockgate(&server, &["upload", "--progress", "json", copy.to_str().unwrap(), &server.image_url("dst")]));
    assert_eq!(stats(&up)["data_bytes"], 4 * MIB);
    compare(&source, &target);
    let copy_size = std::fs::metadata(&copy).unwrap().len();
    assert!(copy_size < 64 * MIB, "the local copy stays sparse: {copy_size} bytes");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_incremental_download_chain_reproduces_the_source() {
    let dir = tempfile::tempdir().unwrap();
    let source = dir.path().join("source.qcow2");
    create_image(&source, "qcow2", "64M");
    qemu_io(&source, "qcow2", &["write -P 0x01 0 8M"]);
    run("qemu-img", &["bitmap", "--add", source.to_str().unwrap(), "b1"]);
    let full = dir.path().join("full.qcow2");
    let inc1 = dir.path().join("inc1.qcow2");
    let inc2 = dir.path().join("inc2.qcow2");
    {
        let server = Server::start(dir.path(), &[format!("src={},bitmap=b1", source.display())]).await;
        ok(blockgate(&server, &["download", &server.image_url("src"), full.to_str().unwrap()]));
    }
    qemu_io(&source, "qcow2", &["write -P 0x02 1M 64k", "write -z 2M 64k", "write -P 0x03 40M 1M"]);
    {
        let server = Server::start(dir.path(), &[format!("src={},bitmap=b1", source.display())]).await;
        let args = [
            "download",
            "--progress",
            "json",
            "--incremental",
            "--backing",
            full.to_str().unwrap(),
            &server.image_url("src"),
            inc1.to_str().unwrap(),
        ];
        let output = ok(blockgate(&server, &args));
        assert_eq!(stats(&output)["data_bytes"], 64 * 1024 + MIB, "only dirty data moved");
    }
    compare(&source, &inc1);
    run("qemu-img", &["bitmap", "--disable", source.to_str().unwrap(), "b1"]);
    run("qemu-img", &["bitmap", "--add", source.to_str().unwrap(), "b2"]);
    qemu_io(&source, "qcow2", &["write -P 0x04 50M 128k", "discard 40M 1M"]);
    {
        let server = Server::start(dir.path(), &[format!("src={},bitmap=b2", source.display())]).await;
        let args = ["download", "--incremental", "--backing", inc1.to_str().unwrap(), &server.image_url("src"), inc2.to_str().unwrap()];
        ok(blockgate(&server, &args));
    }
    compare(&source, &inc2);
    // The chain: inc2 -> inc1 -> full.
    let info: Value =
        serde_json::from_slice(&run("qemu-img", &["info", "--output=json", "--backing-chain", inc2.to_str().unwrap()])).unwrap();
    assert_eq!(info.as_array().unwrap().len(), 3, "{info}");
    assert_eq!(info[0]["backing-filename"], "inc1.qcow2", "backing files are recorded relative to the overlay");
    // A backup directory moved elsewhere keeps its chain.
    let moved = dir.path().join("moved");
    std::fs::create_dir(&moved).unwrap();
    for file in [&full, &inc1, &inc2] {
        std::fs::rename(file, moved.join(file.file_name().unwrap())).unwrap();
    }
    compare(&source, &moved.join("inc2.qcow2"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backup_pipes_into_restore() {
    let dir = tempfile::tempdir().unwrap();
    let source = dir.path().join("source.qcow2");
    create_image(&source, "qcow2", "64M");
    qemu_io(&source, "qcow2", &["write -P 0x51 0 5M", "write -P 0x52 60M 4M"]);
    let target = dir.path().join("target.qcow2");
    create_image(&target, "qcow2", "64M");
    let server = Server::start(dir.path(), &[format!("src={}", source.display()), format!("dst={}", target.display())]).await;
    let exe = binary("blockgate");
    let ca = server.ca();
    let script = format!(
        "{exe} --cacert {ca} backup {src} | gzip -1 | gunzip | {exe} --cacert {ca} restore {dst}",
        exe = exe.display(),
        ca = ca.display(),
        src = server.image_url("src"),
        dst = server.image_url("dst")
    );
    let output = Command::new("bash").args(["-euo", "pipefail", "-c", &script]).output().unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let summary: Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(summary["verified"], true);
    compare(&source, &target);
}

/// Runs the CLI with a file as stdin.
fn blockgate_with_input(server: &Server, args: &[&str], input: &Path) -> Output {
    let stdin = std::fs::File::open(input).unwrap();
    Command::new(binary("blockgate")).arg("--cacert").arg(server.ca()).args(args).stdin(stdin).output().unwrap()
}

/// Runs the CLI with stdout into a file.
fn blockgate_to_file(server: &Server, args: &[&str], output: &Path) -> Output {
    let stdout = std::fs::File::create(output).unwrap();
    Command::new(binary("blockgate")).arg("--cacert").arg(server.ca()).args(args).stdout(stdout).output().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_checkpoint_chain_from_the_command_line() {
    let dir = tempfile::tempdir().unwrap();
    let (source, target) = (dir.path().join("source.qcow2"), dir.path().join("target.qcow2"));
    let specs = [format!("src={},size=64M", source.display()), format!("dst={},size=64M", target.display())];
    let server = Server::start(dir.path(), &specs).await;
    let (src, dst) = (server.image_url("src"), server.image_url("dst"));
    let client = server.client();
    let write = async |offset: u64, seed: u64| {
        let range = format!("bytes {offset}-{}/*", offset + MIB - 1);
        let response = client.put(&src).header("content-range", range).body(random_bytes(MIB as usize, seed)).send().await.unwrap();
        assert!(response.status().is_success());
    };
    write(0, 1).await;
    let files: Vec<_> = ["full", "inc1", "inc2"].iter().map(|name| dir.path().join(format!("{name}.sparse"))).collect();
    ok(blockgate_to_file(&server, &["backup", "--checkpoint", "cp1", &src], &files[0]));
    write(8 * MIB, 2).await;
    let output =
        ok(blockgate_to_file(&server, &["backup", "--progress", "json", "--since", "cp1", "--checkpoint", "cp2", &src], &files[1]));
    let progress: Vec<Value> = String::from_utf8_lossy(&output.stderr).lines().map(|line| serde_json::from_str(line).unwrap()).collect();
    let last_progress = &progress[progress.len() - 2];
    assert_eq!(last_progress["total"], last_progress["done"], "{progress:?}");
    assert!(last_progress["total"].as_u64().unwrap() >= MIB, "the total is the stream's announced 1 MiB of data and more: {progress:?}");
    assert_eq!(stats(&output)["data_bytes"], std::fs::metadata(&files[1]).unwrap().len());
    write(16 * MIB, 3).await;
    // The incremental as a qcow2 overlay too, on a full download.
    let (full, inc) = (dir.path().join("full.qcow2"), dir.path().join("inc.qcow2"));
    ok(blockgate(&server, &["download", "--progress", "none", "--checkpoint", "cp2", &src, full.to_str().unwrap()]));
    ok(blockgate_to_file(&server, &["backup", "--since", "cp2", "--checkpoint", "cp3", &src], &files[2]));
    write(24 * MIB, 4).await;
    let args = ["download", "--progress", "json", "--incremental", "--since", "cp3", "--backing", full.to_str().unwrap(), &src];
    let output = ok(blockgate(&server, &[&args[..], &[inc.to_str().unwrap()]].concat()));
    assert_eq!(stats(&output)["data_bytes"], MIB, "only what changed since cp3");
    compare(&source, &inc);

    let listed = ok(blockgate(&server, &["checkpoint", "list", "--json", &src]));
    let ids: Vec<String> = String::from_utf8_lossy(&listed.stdout)
        .lines()
        .map(|line| serde_json::from_str::<Value>(line).unwrap()["id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(ids, ["cp1", "cp2", "cp3"]);
    let table = ok(blockgate(&server, &["checkpoint", "list", &src]));
    assert!(String::from_utf8_lossy(&table.stdout).lines().nth(2).unwrap().starts_with("cp2"));

    // Out of order: refused with both ids, non-zero exit, one line.
    let output = blockgate_with_input(&server, &["restore", &dst], &files[1]);
    assert!(!output.status.success());
    let said = String::from_utf8_lossy(&output.stderr);
    assert!(said.contains("cp1") && said.contains("409"), "{said}");
    for (file, checkpoint) in files.iter().zip(["cp1", "cp2", "cp3"]) {
        let output = ok(blockgate_with_input(&server, &["restore", "--progress", "json", &dst], file));
        assert_eq!(stats(&output)["data_bytes"], std::fs::metadata(file).unwrap().len(), "the whole stream was sent");
        let restored: Value = serde_json::from_slice(&output.stdout).unwrap();
        assert_eq!(restored["checkpoint"], checkpoint);
        assert!(String::from_utf8_lossy(&output.stderr).contains(&format!("checkpoint {checkpoint}")));
    }
    let restored = dir.path().join("restored.raw");
    ok(blockgate(&server, &["download", "--progress", "none", &dst, restored.to_str().unwrap()]));
    let at_cp3 = dir.path().join("at-cp3.raw");
    ok(blockgate(&server, &["download", "--progress", "none", &src, at_cp3.to_str().unwrap()]));
    let mut expected = std::fs::read(&at_cp3).unwrap();
    expected[24 * MIB as usize..25 * MIB as usize].fill(0);
    assert!(std::fs::read(&restored).unwrap() == expected, "the target holds the source as of cp3");

    let made = ok(blockgate(&server, &["checkpoint", "create", &src]));
    let made: Value = serde_json::from_slice(&made.stdout).unwrap();
    assert_eq!(made["parent"], "cp3");
    ok(blockgate(&server, &["checkpoint", "delete", &src, "cp1"]));
    let output = blockgate(&server, &["checkpoint", "delete", &src, "cp1"]);
    assert!(!output.status.success() && String::from_utf8_lossy(&output.stderr).contains("404"));
    // Options a command has no use for are refused, not ignored.
    for args in [&["info", "--connections", "2", &src][..], &["checkpoint", "list", "--progress", "json", &src]] {
        let output = blockgate(&server, args);
        assert_eq!(output.status.code(), Some(2), "{args:?}: {}", String::from_utf8_lossy(&output.stderr));
    }
    let output = blockgate(&server, &["checkpoint", "create", &src, ".bad"]);
    assert!(!output.status.success() && String::from_utf8_lossy(&output.stderr).contains("invalid checkpoint id"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_download_survives_a_qemu_nbd_restart() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.raw");
    std::fs::write(&image, random_bytes(256 * MIB as usize, 11)).unwrap();
    let socket = dir.path().join("nbd.sock");
    let mut nbd = QemuNbd::start(&image, "raw", &socket);
    let server = Server::start(dir.path(), &[format!("disk={}", QemuNbd::uri_of(&socket))]).await;
    let copy = dir.path().join("copy.raw");
    let mut child = Command::new(binary("blockgate"))
        .arg("--cacert")
        .arg(server.ca())
        .args(["download", "--verbose", "--connections", "2", "--progress", "json", &server.image_url("disk"), copy.to_str().unwrap()])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Wait for real progress, then pull the backend away for a moment.
    let stderr = child.stderr.take().unwrap();
    let (progressed_tx, progressed_rx) = std::sync::mpsc::channel();
    let reader = std::thread::spawn(move || {
        use std::io::BufRead;
        let mut lines = Vec::new();
        for line in std::io::BufReader::new(stderr).lines() {
            let line = line.unwrap();
            if line.contains("\"done\"") {
                let _ = progressed_tx.send(());
            }
            lines.push(line);
        }
        lines
    });
    progressed_rx.recv_timeout(std::time::Duration::from_secs(60)).expect("the download made progress");
    nbd.child.kill().unwrap();
    nbd.child.wait().unwrap();
    std::thread::sleep(std::time::Duration::from_millis(700));
    let _restarted = QemuNbd::start(&image, "raw", &socket);
    let status = child.wait().unwrap();
    let lines = reader.join().unwrap();
    assert!(status.success(), "the download failed: {lines:?}");
    assert!(lines.iter().any(|line| line.contains("retrying")), "the restart was noticed and retried: {lines:?}");
    assert!(std::fs::read(&copy).unwrap() == std::fs::read(&image).unwrap(), "the copy differs");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failures_exit_non_zero_with_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &[format!("disk={}/disk.raw,size=1M", dir.path().display())]).await;
    // (A refused connection is retried, each retry announced on a line of
    // its own: cli_safety.rs.)
    let cases: [(&[&str], &str); 2] = [
        (&["download", &server.url("/images/nope"), "/nonexistent/x.raw"], "403"),
        (&["checksum", "--block-size", "1000", &server.image_url("disk")], "block_size"),
    ];
    for (args, says) in cases {
        let output = blockgate(&server, args);
        assert!(!output.status.success(), "{args:?} succeeded");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(stderr.lines().count(), 1, "{args:?}: {stderr}");
        assert!(stderr.starts_with("blockgate: error:") && stderr.contains(says), "{args:?}: {stderr}");
    }
    for command in ["info", "extents", "checksum", "download", "upload", "backup", "restore"] {
        let help = Command::new(binary("blockgate")).args([command, "--help"]).output().unwrap();
        assert!(String::from_utf8_lossy(&help.stdout).contains("Example"), "{command} --help has an example");
    }
}
