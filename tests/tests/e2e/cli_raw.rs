//! The CLI with a local raw file, which it reads and writes itself (no
//! qemu-nbd): a round trip keeps holes as holes and the file private
//! whatever the umask, a symlink is read through, a block device uploads;
//! and bad luck fails loudly: a FIFO or a dangling link at once, a read
//! error or a file that shrinks mid-upload with its reason, a download
//! killed midway with nothing under the final name.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::common::*;

fn blockgate(server: &Server) -> Command {
    let mut command = Command::new(binary("blockgate"));
    command.arg("--cacert").arg(server.ca());
    command
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// The stats of a `--progress json` run that succeeded.
fn stats(output: &Output) -> Value {
    assert!(output.status.success(), "{}", stderr(output));
    let said = stderr(output);
    serde_json::from_str::<Value>(said.lines().last().expect("a stats line")).unwrap()["stats"].clone()
}

/// The output of `child`, killed if it runs past `limit` (a hang fails).
fn within(mut child: Child, limit: Duration) -> Output {
    let started = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if started.elapsed() > limit {
            child.kill().unwrap();
            panic!("blockgate hung: {}", stderr(&child.wait_with_output().unwrap()));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    child.wait_with_output().unwrap()
}

/// The output of `command`, run with its output captured and killed if
/// it runs past `limit`.
fn run_within(command: &mut Command, limit: Duration) -> Output {
    within(command.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap(), limit)
}

/// A 64 MiB raw image: data at 0-3 MiB and 40-41 MiB, holes elsewhere.
fn sparse_source(dir: &Path) -> (PathBuf, Vec<u8>) {
    let path = dir.join("source.raw");
    let mut content = vec![0u8; 64 * MIB as usize];
    content[..3 * MIB as usize].copy_from_slice(&random_bytes(3 * MIB as usize, 1));
    content[40 * MIB as usize..41 * MIB as usize].copy_from_slice(&random_bytes(MIB as usize, 2));
    let file = std::fs::File::create(&path).unwrap();
    file.set_len(64 * MIB).unwrap();
    for range in [0..3 * MIB as usize, 40 * MIB as usize..41 * MIB as usize] {
        std::os::unix::fs::FileExt::write_all_at(&file, &content[range.clone()], range.start as u64).unwrap();
    }
    (path, content)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_raw_round_trip_keeps_holes_and_the_file_private_whatever_the_umask() {
    let dir = tempfile::tempdir().unwrap();
    let (source, content) = sparse_source(dir.path());
    let target = dir.path().join("target.raw");
    create_image(&target, "raw", "64M");
    let server = Server::start(dir.path(), &[format!("src={},ro", source.display()), format!("dst={}", target.display())]).await;

    let copy = dir.path().join("copy.raw");
    let download = Command::new("sh")
        .args(["-c", "umask 000; exec \"$@\"", "sh"])
        .arg(binary("blockgate"))
        .arg("--cacert")
        .arg(server.ca())
        .args(["download", "--progress", "json", &server.image_url("src"), copy.to_str().unwrap()])
        .output()
        .unwrap();
    let moved = stats(&download);
    assert_eq!(moved["data_bytes"], 4 * MIB, "only the data crossed: {moved}");
    assert!(std::fs::read(&copy).unwrap() == content, "the copy holds the image");
    let metadata = std::fs::metadata(&copy).unwrap();
    assert_eq!(metadata.permissions().mode() & 0o777, 0o600, "readable by its owner only, as qemu-img's file was");
    assert!(metadata.blocks() * 512 < 8 * MIB, "the holes stayed holes: {} bytes allocated", metadata.blocks() * 512);

    // Through a symlink: its target is read, holes sent as zeros.
    let link = dir.path().join("link.raw");
    std::os::unix::fs::symlink(&copy, &link).unwrap();
    let upload =
        blockgate(&server).args(["upload", "--progress", "json", link.to_str().unwrap(), &server.image_url("dst")]).output().unwrap();
    let moved = stats(&upload);
    assert_eq!((moved["data_bytes"].as_u64(), moved["zero_bytes"].as_u64()), (Some(4 * MIB), Some(60 * MIB)), "{moved}");
    assert!(std::fs::read(&target).unwrap() == content, "the image holds the file");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upload_from_a_fifo_or_a_dangling_link_fails_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let target = dir.path().join("target.raw");
    create_image(&target, "raw", "1M");
    let server = Server::start(dir.path(), &[format!("dst={}", target.display())]).await;
    let fifo = dir.path().join("fifo.raw");
    run("mkfifo", &[fifo.to_str().unwrap()]);
    let dangling = dir.path().join("dangling.raw");
    std::os::unix::fs::symlink(dir.path().join("nowhere"), &dangling).unwrap();
    for (source, said) in [(&fifo, "is not a regular file or a block device"), (&dangling, "No such file or directory")] {
        // Nobody ever writes into the FIFO: opening it to read would wait.
        let output =
            run_within(blockgate(&server).args(["upload", source.to_str().unwrap(), &server.image_url("dst")]), Duration::from_secs(30));
        assert_eq!(output.status.code(), Some(1), "{}", stderr(&output));
        assert!(stderr(&output).contains(said) && stderr(&output).contains(source.to_str().unwrap()), "{}", stderr(&output));
    }
}

/// A FUSE file (nbdfuse) over an nbdkit `eval` plugin, unmounted on drop.
struct FuseFile {
    child: Child,
    mountpoint: PathBuf,
}

impl Drop for FuseFile {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.child.id() as i32), nix::sys::signal::Signal::SIGTERM);
        let _ = self.child.wait();
        let _ = Command::new("umount").arg(&self.mountpoint).stderr(Stdio::null()).status();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_raw_upload_fails_on_a_read_error_midway() {
    let dir = tempfile::tempdir().unwrap();
    let target = dir.path().join("target.raw");
    create_image(&target, "raw", "32M");
    let server = Server::start(dir.path(), &[format!("dst={}", target.display())]).await;
    // 32 MiB of data whose reads fail with EIO from 20 MiB on.
    let mountpoint = dir.path().join("mnt");
    std::fs::create_dir(&mountpoint).unwrap();
    let source = mountpoint.join("disk.raw");
    let child = Command::new("nbdfuse")
        .arg(&source)
        .args(["--command", "nbdkit", "-s", "eval", &format!("get_size=echo {}", 32 * MIB)])
        .arg(format!("pread=if [ $4 -ge {} ]; then echo 'EIO bad sector' >&2; exit 1; fi; head -c $3 /dev/urandom", 20 * MIB))
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let _fuse = FuseFile { child, mountpoint };
    wait_until("nbdfuse serves", async || std::fs::metadata(&source).is_ok_and(|metadata| metadata.len() == 32 * MIB)).await;
    let output = blockgate(&server).args(["upload", source.to_str().unwrap(), &server.image_url("dst")]).output().unwrap();
    assert_eq!(output.status.code(), Some(1), "{}", stderr(&output));
    assert!(stderr(&output).contains("Input/output error") && stderr(&output).contains("disk.raw"), "{}", stderr(&output));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_raw_file_that_shrinks_during_its_upload_fails_and_is_never_read_as_zeros() {
    let dir = tempfile::tempdir().unwrap();
    // Each write to the image takes 2 s: the upload is slow.
    let (store, _) = slow_store(dir.path(), 2, 0, 0);
    let server = Server::start(dir.path(), &[format!("dst={}", store.uri())]).await;
    let source = dir.path().join("source.raw");
    std::fs::write(&source, random_bytes(16 * MIB as usize, 4)).unwrap();
    let child = blockgate(&server)
        .args(["upload", "--connections", "1", source.to_str().unwrap(), &server.image_url("dst")])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let opened = || {
        std::fs::read_dir(format!("/proc/{}/fd", child.id()))
            .is_ok_and(|fds| fds.flatten().any(|fd| std::fs::read_link(fd.path()).is_ok_and(|path| path == source)))
    };
    wait_until("the CLI opened its source", async || opened()).await;
    // Past its size and runs, before the second range is read.
    tokio::time::sleep(Duration::from_millis(500)).await;
    std::fs::File::options().write(true).open(&source).unwrap().set_len(4 * MIB).unwrap();
    let output = within(child, Duration::from_secs(60));
    assert_eq!(output.status.code(), Some(1), "{}", stderr(&output));
    assert!(stderr(&output).contains("did it shrink while it was read?"), "{}", stderr(&output));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_block_device_uploads_as_raw() {
    let dir = tempfile::tempdir().unwrap();
    let backing = dir.path().join("device.img");
    let content = random_bytes(8 * MIB as usize, 6);
    std::fs::write(&backing, &content).unwrap();
    let attached = Command::new("losetup").args(["--find", "--show", "--read-only"]).arg(&backing).output().unwrap();
    if !attached.status.success() {
        eprintln!("skipped: no loop device here ({})", stderr(&attached).trim());
        return;
    }
    let device = String::from_utf8(attached.stdout).unwrap().trim().to_string();
    let target = dir.path().join("target.raw");
    create_image(&target, "raw", "8M");
    let server = Server::start(dir.path(), &[format!("dst={}", target.display())]).await;
    let output = blockgate(&server).args(["upload", "--progress", "json", &device, &server.image_url("dst")]).output().unwrap();
    run("losetup", &["--detach", &device]);
    assert_eq!(stats(&output)["data_bytes"], 8 * MIB, "a block device is all data");
    assert!(std::fs::read(&target).unwrap() == content);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_raw_download_killed_midway_leaves_nothing_under_its_name() {
    let dir = tempfile::tempdir().unwrap();
    let slow = Nbdkit::start(dir.path(), "slow", &["--filter=delay", "pattern", "size=1G", "rdelay=20ms"]);
    let small = dir.path().join("small.raw");
    std::fs::write(&small, random_bytes(4 * MIB as usize, 7)).unwrap();
    let server = Server::start(dir.path(), &[format!("slow={},ro", slow.uri()), format!("small={},ro", small.display())]).await;
    let target = dir.path().join("disk.raw");
    let partial = |dir: &Path| {
        std::fs::read_dir(dir)
            .unwrap()
            .flatten()
            .map(|entry| entry.file_name().to_string_lossy().into_owned())
            .filter(|name| name.starts_with(".disk.raw.partial-"))
            .collect::<Vec<_>>()
    };
    let mut child =
        blockgate(&server).args(["download", "--progress", "none", &server.image_url("slow"), target.to_str().unwrap()]).spawn().unwrap();
    wait_until("the download is under way", async || !partial(dir.path()).is_empty()).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(!target.exists(), "SIGKILL left a file under the final name");
    assert_eq!(partial(dir.path()).len(), 1, "and only its hidden partial file");

    let output = blockgate(&server).args(["download", &server.image_url("small"), target.to_str().unwrap()]).output().unwrap();
    assert!(output.status.success(), "{}", stderr(&output));
    assert!(stderr(&output).contains("removed the stale partial download"), "{}", stderr(&output));
    assert_eq!(partial(dir.path()), Vec::<String>::new());
    assert!(std::fs::read(&target).unwrap() == std::fs::read(&small).unwrap());
}

/// A small ext4 file system (direct I/O, unlike tmpfs, honours alignment)
/// mounted on a loop device, unmounted when dropped; `None` where this
/// process may not mount.
struct SmallExt4 {
    mount: tempfile::TempDir,
}

impl SmallExt4 {
    fn make(dir: &Path, size: &str) -> Option<SmallExt4> {
        let image = dir.join("small.ext4");
        let made = Command::new("mkfs.ext4").args(["-q", "-F"]).arg(&image).arg(size).status().ok()?.success();
        let mount = tempfile::tempdir().unwrap();
        let mounted = made && Command::new("mount").args(["-o", "loop"]).arg(&image).arg(mount.path()).status().ok()?.success();
        mounted.then_some(SmallExt4 { mount })
    }
}

impl Drop for SmallExt4 {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(self.mount.path()).status();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_download_larger_than_the_free_space_fails_naming_enospc_and_leaves_no_file() {
    let dir = tempfile::tempdir().unwrap();
    let Some(small) = SmallExt4::make(dir.path(), "16M") else {
        eprintln!("skipped: cannot mount a loop file system here");
        return;
    };
    let source = dir.path().join("source.raw");
    std::fs::write(&source, random_bytes(32 * MIB as usize, 5)).unwrap();
    let server = Server::start(dir.path(), &[format!("src={},ro", source.display())]).await;
    let copy = small.mount.path().join("copy.raw");
    let output = run_within(
        blockgate(&server).args(["download", "--progress", "none", &server.image_url("src"), copy.to_str().unwrap()]),
        Duration::from_secs(60),
    );
    assert_eq!(output.status.code(), Some(1), "{}", stderr(&output));
    assert!(stderr(&output).contains("No space left on device") && stderr(&output).contains("copy.raw"), "{}", stderr(&output));
    let left: Vec<_> = std::fs::read_dir(small.mount.path()).unwrap().map(|entry| entry.unwrap().file_name()).collect();
    assert!(left.iter().all(|name| name == "lost+found"), "no file is left: {left:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_download_to_a_dangling_link_fails_at_once_and_creates_nothing_through_it() {
    let dir = tempfile::tempdir().unwrap();
    let (source, _) = sparse_source(dir.path());
    let server = Server::start(dir.path(), &[format!("src={},ro", source.display())]).await;
    let nowhere = dir.path().join("nowhere.raw");
    let link = dir.path().join("link.raw");
    std::os::unix::fs::symlink(&nowhere, &link).unwrap();
    let output = run_within(
        blockgate(&server).args(["download", "--progress", "json", &server.image_url("src"), link.to_str().unwrap()]),
        Duration::from_secs(60),
    );
    assert_eq!(output.status.code(), Some(1), "{}", stderr(&output));
    assert!(stderr(&output).contains("link.raw exists; choose a new file"), "refused before any transfer: {}", stderr(&output));
    assert!(!stderr(&output).contains("data_bytes"), "nothing was downloaded: {}", stderr(&output));
    assert!(!nowhere.exists() && link.symlink_metadata().unwrap().is_symlink(), "the link and its target are untouched");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_download_without_proc_mounted_goes_through_the_page_cache() {
    let dir = tempfile::tempdir().unwrap();
    let (source, content) = sparse_source(dir.path());
    let server = Server::start(dir.path(), &[format!("src={},ro", source.display())]).await;
    let copy = dir.path().join("copy.raw");
    // A mount namespace of its own where /proc is gone (a chroot or a
    // sandbox without it): /proc/self/fd cannot reopen the file.
    let Ok(download) = Command::new("unshare")
        .args(["--mount", "--propagation", "private", "sh", "-c", "umount -l /proc && exec \"$@\"", "sh"])
        .arg(binary("blockgate"))
        .arg("--cacert")
        .arg(server.ca())
        .args(["download", "--progress", "json", &server.image_url("src"), copy.to_str().unwrap()])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
    else {
        eprintln!("skipped: no unshare");
        return;
    };
    let output = within(download, Duration::from_secs(60));
    if stderr(&output).contains("umount") || stderr(&output).contains("unshare") {
        eprintln!("skipped: cannot unmount /proc here: {}", stderr(&output));
        return;
    }
    stats(&output);
    assert!(std::fs::read(&copy).unwrap() == content, "the copy holds the image");
}
