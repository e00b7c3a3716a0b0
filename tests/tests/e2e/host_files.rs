//! No host file through a qcow2's links or a swapped path: a backing or
//! external data file outside the allowed directories refuses the ticket
//! or `--image`, naming the file (one inside is served), and an image
//! replaced by a symlink or another file after its ticket was made is
//! never opened by the restarted daemon.

use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use reqwest::StatusCode;

use crate::common::*;

fn qcow2(path: &Path, options: &[&str]) {
    let mut args = vec!["create", "-q", "-f", "qcow2", "-u"];
    args.extend(options);
    args.extend([path.to_str().unwrap(), "4M"]);
    run("qemu-img", &args);
}

struct Layout {
    _dir: tempfile::TempDir,
    images: PathBuf,
    secret: PathBuf,
    secret_bytes: Vec<u8>,
}

fn layout() -> Layout {
    let dir = tempfile::tempdir().unwrap();
    let root = std::fs::canonicalize(dir.path()).unwrap();
    let (images, outside) = (root.join("images"), root.join("outside"));
    std::fs::create_dir_all(&images).unwrap();
    std::fs::create_dir_all(&outside).unwrap();
    let secret = outside.join("secret.raw");
    let secret_bytes = random_bytes(4 * MIB as usize, 71);
    std::fs::write(&secret, &secret_bytes).unwrap();
    Layout { _dir: dir, images, secret, secret_bytes }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qcow2_links_outside_the_allowed_directories_are_refused_naming_the_file() {
    let Layout { _dir, images, secret, secret_bytes } = layout();
    let base_bytes = random_bytes(4 * MIB as usize, 72);
    std::fs::write(images.join("base.raw"), &base_bytes).unwrap();
    qcow2(&images.join("good.qcow2"), &["-b", "base.raw", "-F", "raw"]);
    qcow2(&images.join("absolute.qcow2"), &["-b", secret.to_str().unwrap(), "-F", "raw"]);
    qcow2(&images.join("relative.qcow2"), &["-b", "../outside/secret.raw", "-F", "raw"]);
    // qemu-img makes the data file; the victim's content is written after.
    let victim = secret.with_file_name("victim.raw");
    qcow2(&images.join("data.qcow2"), &["-o", &format!("data_file={},data_file_raw=on", victim.display())]);
    let victim_bytes = random_bytes(4 * MIB as usize, 74);
    std::fs::write(&victim, &victim_bytes).unwrap();

    let (server, control) = start_with_control(&images, &[]).await;
    let good = qcow2_ticket("good", &images.join("good.qcow2"), &["read", "write"], 4 * MIB);
    let (status, text) = control.curl(&["-X", "PUT", "-d", &good.to_string(), &control.url("/tickets/good")]);
    assert_eq!(status, 200, "{text}");
    let response = server.client().get(server.image_url("good")).send().await.unwrap();
    assert!(response.bytes().await.unwrap()[..] == base_bytes[..], "a backing file inside the directory is served");

    for (name, link) in [("absolute", "backing file"), ("relative", "backing file"), ("data", "external data file")] {
        let spec = qcow2_ticket(name, &images.join(format!("{name}.qcow2")), &["read", "write"], 4 * MIB);
        let (status, text) = control.curl(&["-X", "PUT", "-d", &spec.to_string(), &control.url(&format!("/tickets/{name}"))]);
        assert_eq!(status, 400, "{name}: {text}");
        assert!(text.contains(&format!("{name}.qcow2")) && text.contains(link) && text.contains("not allowed"), "{name}: {text}");
        let response = server.client().get(server.image_url(name)).send().await.unwrap();
        assert_eq!(response.status(), StatusCode::FORBIDDEN);
    }
    // The same through --image: the server does not start, and says why.
    for name in ["absolute", "data"] {
        let spec = format!("{name}={}", images.join(format!("{name}.qcow2")).display());
        let error = Server::try_start(&images, &[spec], &[]).await.err().expect("refused");
        assert!(error.contains(&format!("{name}.qcow2")) && error.contains("not allowed"), "{error}");
    }
    assert!(std::fs::read(&secret).unwrap() == secret_bytes, "the secret was never written");
    assert!(std::fs::read(&victim).unwrap() == victim_bytes, "nor the data file");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_image_swapped_after_its_ticket_was_made_is_never_opened() {
    let Layout { _dir, images, secret, secret_bytes } = layout();
    let disk = images.join("disk.raw");
    let disk_bytes = random_bytes(4 * MIB as usize, 73);
    std::fs::write(&disk, &disk_bytes).unwrap();
    let (server, control) = start_with_control(&images, &[]).await;
    assert_eq!(control.add(&ticket("t", &disk, &["read", "write"], 300)).await, StatusCode::OK);
    let get = async || {
        let response = server.client().get(server.image_url("t")).send().await.unwrap();
        (response.status(), response.bytes().await.unwrap_or_default().to_vec())
    };
    assert!(get().await.1 == disk_bytes);

    for swap in ["symlink", "rename"] {
        std::fs::rename(&disk, images.join("disk.old")).unwrap();
        match swap {
            "symlink" => std::os::unix::fs::symlink(&secret, &disk).unwrap(),
            _ => std::fs::copy(&secret, &disk).map(drop).unwrap(),
        }
        let [old] = daemon_pids(&server)[..] else { panic!("one qemu-storage-daemon") };
        kill(Pid::from_raw(old as i32), Signal::SIGKILL).unwrap();
        for _ in 0..20 {
            let (status, body) = get().await;
            assert_eq!(status, StatusCode::BAD_GATEWAY, "{swap}: the swapped file is not served");
            assert!(body.len() < MIB as usize && !body.windows(64).any(|w| w == &secret_bytes[..64]), "{swap}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        // Put back, the image is served again.
        std::fs::remove_file(&disk).unwrap();
        std::fs::rename(images.join("disk.old"), &disk).unwrap();
        let mut served = false;
        for _ in 0..100 {
            let (status, body) = get().await;
            if status == StatusCode::OK {
                assert!(body == disk_bytes, "{swap}");
                served = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        assert!(served, "{swap}: the restored image is served again");
    }
}
