//! Backups of running VMs through blockgate (`--libvirt`): the control
//! API's `/vms` routes and `blockgate vm`, against the real libvirtd and
//! TCG domains of `vm_host`, with writes made from outside the guest.
//! A chain (full and two incrementals) restored through blockgate into
//! new images equals each disk; writes made during a job are not in it;
//! and every refusal leaves no job, checkpoint, scratch file or ticket.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::json;

use crate::common::*;
use crate::vm_api::*;
use crate::vm_host::*;

/// The sparse stream of a disk's url.
async fn pull(server: &Server, url: &str) -> Vec<u8> {
    let response = server.client().get(format!("{url}?format=sparse")).send().await.unwrap();
    assert_eq!(response.status(), 200);
    response.bytes().await.unwrap().to_vec()
}

/// New images of the domain's disk sizes, served by a second server for
/// the restores (`r0`, `r1`, ...).
async fn restore_targets(dir: &Path, sizes: &[u64]) -> (Server, Vec<PathBuf>) {
    let paths: Vec<PathBuf> = (0..sizes.len()).map(|index| dir.join(format!("restored-{index}.qcow2"))).collect();
    let images: Vec<String> =
        paths.iter().zip(sizes).enumerate().map(|(index, (path, size))| format!("r{index}={},size={size}", path.display())).collect();
    let restore_dir = dir.join("restore");
    std::fs::create_dir_all(&restore_dir).unwrap();
    (Server::start(&restore_dir, &images).await, paths)
}

fn same_content(a: &Path, b: &Path, b_format: &str) {
    let output = Command::new("qemu-img").args(["compare", "-U", "-f", "qcow2", "-F", b_format]).arg(a).arg(b).output().unwrap();
    assert!(output.status.success(), "{} and {} differ: {}", a.display(), b.display(), String::from_utf8_lossy(&output.stdout));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_full_and_two_incrementals_of_a_running_vm_restore_to_its_disks() {
    let domain = Domain::start("chain", &[("vda", "qcow2", 64 * MIB), ("vdb", "qcow2", 32 * MIB)]);
    let vm = domain.name().to_string();
    let dir = tempfile::tempdir().unwrap();
    let (server, control) = vm_server(dir.path()).await;
    let socket = control.socket.to_str().unwrap().to_string();
    let out = dir.path().join("backups");
    let out_text = out.to_str().unwrap().to_string();

    domain.write(0, 0x11, 0, 4 * MIB);
    domain.write(1, 0x22, MIB, 2 * MIB);
    ok(blockgate(
        &server.ca(),
        &["vm", "backup", "--control-socket", &socket, &vm, "--out", &out_text, "--checkpoint", "c1", "--progress", "none"],
    ));

    // The first incremental through the API, with writes made while its
    // job runs: they belong to the next backup, not to this one.
    domain.write(0, 0x33, 8 * MIB, MIB);
    let (code, backup) = begin(&control, &vm, json!({"since": "c1", "checkpoint": "c2"}));
    assert_eq!(code, 201, "{backup}");
    assert_eq!((backup["since"].as_str(), backup["checkpoint"].as_str()), (Some("c1"), Some("c2")));
    domain.write(0, 0x44, 16 * MIB, MIB);
    domain.write(1, 0x55, 0, MIB);
    let mut c2_files = Vec::new();
    for disk in backup["disks"].as_array().unwrap() {
        assert_eq!(disk["incremental"], true, "{disk}");
        let stream = pull(&server, disk["url"].as_str().unwrap()).await;
        let meta = meta(&stream);
        assert_eq!(
            (meta["since"].as_str(), meta["checkpoint"].as_str(), meta["incremental"].as_bool()),
            (Some("c1"), Some("c2"), Some(true))
        );
        let file = out.join(format!("{}.c2.sparse", disk["name"].as_str().unwrap()));
        std::fs::write(&file, &stream).unwrap();
        c2_files.push(file);
    }
    // vdb took no write between c1 and c2: its incremental carries no data.
    assert_eq!(meta(&std::fs::read(&c2_files[1]).unwrap())["data-size"], 0);
    assert_eq!(meta(&std::fs::read(&c2_files[0]).unwrap())["data-size"], MIB);
    let id = backup["id"].as_str().unwrap();
    assert_eq!(delete(&control, &format!("/vms/{vm}/backups/{id}")).0, 204);
    assert_eq!(leftovers(&server.state_dir, &vm), (0, false));

    domain.write(0, 0x66, 32 * MIB, 2 * MIB);
    ok(blockgate(
        &server.ca(),
        &[
            "vm",
            "backup",
            "--control-socket",
            &socket,
            &vm,
            "--out",
            &out_text,
            "--since",
            "c2",
            "--checkpoint",
            "c3",
            "--progress",
            "none",
        ],
    ));
    assert_eq!(checkpoint_ids(&control, &vm), ["c1", "c2", "c3"]);
    domain.destroy();

    let (target, restored) = restore_targets(dir.path(), &[64 * MIB, 32 * MIB]).await;
    for (index, disk) in ["vda", "vdb"].into_iter().enumerate() {
        let url = target.image_url(&format!("r{index}"));
        let files: Vec<String> =
            ["c1", "c2", "c3"].iter().map(|label| out.join(format!("{disk}.{label}.sparse")).display().to_string()).collect();
        // Out of order: the second incremental on the full backup alone.
        ok(blockgate(&target.ca(), &["restore", &url, &files[0], "--progress", "none"]));
        let refused = blockgate(&target.ca(), &["restore", &url, &files[2], "--progress", "none"]);
        assert!(!refused.status.success());
        let said = String::from_utf8_lossy(&refused.stderr);
        assert!(said.contains("409") && said.contains("\"c2\""), "{said}");
        ok(blockgate(&target.ca(), &["restore", &url, &files[1], &files[2], "--progress", "none"]));
        same_content(&restored[index], domain.disk_path(index), "qcow2");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_backup_exports_the_instant_it_began_and_a_raw_disk_in_full_every_time() {
    let domain = Domain::start("instant", &[("vda", "qcow2", 32 * MIB), ("vdb", "raw", 16 * MIB)]);
    let vm = domain.name().to_string();
    let dir = tempfile::tempdir().unwrap();
    let (server, control) = vm_server(dir.path()).await;
    domain.write(1, 0x77, 0, 2 * MIB);
    let (code, full) = begin(&control, &vm, json!({"checkpoint": "c1"}));
    assert_eq!(code, 201, "{full}");
    // Written after the job began: not in its export.
    domain.write(0, 0x88, 0, MIB);
    domain.write(1, 0x99, 4 * MIB, MIB);
    let vda = pull(&server, full["disks"][0]["url"].as_str().unwrap()).await;
    assert_eq!(meta(&vda)["data-size"], 0, "{}", meta(&vda));
    let vdb = pull(&server, full["disks"][1]["url"].as_str().unwrap()).await;
    assert_eq!(meta(&vdb)["data-size"], 2 * MIB);
    delete(&control, &format!("/vms/{vm}/backups/{}", full["id"].as_str().unwrap()));

    let (code, incremental) = begin(&control, &vm, json!({"since": "c1", "checkpoint": "c2"}));
    assert_eq!(code, 201, "{incremental}");
    assert_eq!(incremental["disks"][0]["incremental"], true);
    assert_eq!(incremental["disks"][1]["incremental"], false, "a raw disk has no bitmap: {incremental}");
    let vdb = pull(&server, incremental["disks"][1]["url"].as_str().unwrap()).await;
    let vdb_meta = meta(&vdb);
    assert_eq!((vdb_meta["incremental"].as_bool(), vdb_meta["data-size"].as_u64()), (Some(false), Some(3 * MIB)), "{vdb_meta}");
    let vda = pull(&server, incremental["disks"][0]["url"].as_str().unwrap()).await;
    assert_eq!(meta(&vda)["data-size"], MIB);
    // Its checkpoint tracks the qcow2 disk only.
    let (_, checkpoints) = get_json(&control, &format!("/vms/{vm}/checkpoints"));
    assert_eq!(checkpoints[1]["disks"], json!(["vda"]), "{checkpoints}");
    assert_eq!(checkpoints[1]["usable"], true);
}

#[tokio::test(flavor = "multi_thread")]
async fn refused_backups_leave_no_job_checkpoint_scratch_or_ticket() {
    let domain = Domain::start("refusals", &[("vda", "qcow2", 16 * MIB)]);
    let vm = domain.name().to_string();
    let dir = tempfile::tempdir().unwrap();
    let (server, control) = vm_server(dir.path()).await;

    let (code, said) = begin(&control, "no-such-vm", json!({}));
    assert_eq!(code, 404, "{said}");
    let (code, said) = begin(&control, &vm, json!({"disks": ["vdz"]}));
    assert_eq!((code, said.as_str().is_some_and(|said| said.contains("vda"))), (404, true), "{said}");
    let (code, said) = begin(&control, &vm, json!({"since": "never-made"}));
    assert_eq!(code, 404, "{said}");
    let (code, said) = begin(&control, &vm, json!({"quiesce": true, "checkpoint": "frozen"}));
    assert_eq!(code, 409, "{said}");
    assert!(said.as_str().unwrap().contains("guest agent"), "{said}");
    let (code, said) = begin(&control, &vm, json!({"disks": ["../etc"]}));
    assert_eq!(code, 400, "{said}");
    assert_eq!(leftovers(&server.state_dir, &vm), (0, false));
    assert!(checkpoint_ids(&control, &vm).is_empty());
    assert_eq!(server.client().get(server.url("/info/")).send().await.unwrap().status(), 200);

    let (code, first) = begin(&control, &vm, json!({"checkpoint": "c1"}));
    assert_eq!(code, 201, "{first}");
    let (code, said) = begin(&control, &vm, json!({"checkpoint": "c2"}));
    assert_eq!(code, 409, "{said}");
    assert!(said.as_str().unwrap().contains(first["id"].as_str().unwrap()), "the 409 names the running backup: {said}");
    let (code, status) = get_json(&control, &format!("/vms/{vm}/backups/{}", first["id"].as_str().unwrap()));
    assert_eq!((code, status["state"].as_str()), (200, Some("running")), "{status}");
    assert_eq!(leftovers(&server.state_dir, &vm), (1, true));
    assert_eq!(delete(&control, &format!("/vms/{vm}/backups/{}", first["id"].as_str().unwrap())).0, 204);
    assert_eq!(leftovers(&server.state_dir, &vm), (0, false));
    let ticket = first["disks"][0]["url"].as_str().unwrap();
    assert_eq!(server.client().get(ticket).send().await.unwrap().status(), 403, "a deleted backup's ticket is gone");
    assert_eq!(checkpoint_ids(&control, &vm), ["c1"]);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_vm_destroyed_mid_transfer_fails_the_transfer_and_ends_the_backup() {
    let domain = Domain::start("destroyed", &[("vda", "qcow2", 256 * MIB)]);
    let vm = domain.name().to_string();
    domain.write(0, 0x5a, 0, 192 * MIB);
    let dir = tempfile::tempdir().unwrap();
    let (server, control) = vm_server(dir.path()).await;
    let (code, backup) = begin(&control, &vm, json!({}));
    assert_eq!(code, 201, "{backup}");
    let url = format!("{}?format=sparse", backup["disks"][0]["url"].as_str().unwrap());
    let mut response = server.client().get(url).send().await.unwrap();
    assert_eq!(response.status(), 200);
    let first = response.chunk().await.unwrap().unwrap();
    assert!(!first.is_empty());
    domain.destroy();
    let mut received = first.len();
    let ended = loop {
        match response.chunk().await {
            Ok(Some(chunk)) => received += chunk.len(),
            Ok(None) => break Ok(()),
            Err(error) => break Err(error),
        }
    };
    assert!(ended.is_err(), "the stream of a destroyed VM ended as if complete after {received} bytes");
    wait_until("the backup of the destroyed VM is ended", async || {
        get_json(&control, &format!("/vms/{vm}/backups/{}", backup["id"].as_str().unwrap())).0 == 404
    })
    .await;
    assert_eq!(leftovers(&server.state_dir, &vm).0, 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_restarted_server_ends_the_job_it_left_behind() {
    let domain = Domain::start("restart", &[("vda", "qcow2", 16 * MIB)]);
    let vm = domain.name().to_string();
    let dir = tempfile::tempdir().unwrap();
    let (server, control) = vm_server(dir.path()).await;
    let (code, backup) = begin(&control, &vm, json!({}));
    assert_eq!(code, 201, "{backup}");
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(server.pid() as i32), nix::sys::signal::Signal::SIGKILL).unwrap();
    drop(server);
    assert!(virsh(&["domjobinfo", &vm]).unwrap().contains("Backup"), "the killed server's job still runs");
    let (server, control) = vm_server(dir.path()).await;
    assert_eq!(leftovers(&server.state_dir, &vm), (0, false));
    let (code, again) = begin(&control, &vm, json!({}));
    assert_eq!(code, 201, "{again}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_checkpoint_broken_by_a_killed_qemu_asks_for_a_full_backup() {
    let domain = Domain::start_persistent("crash", &[("vda", "qcow2", 16 * MIB)]);
    let vm = domain.name().to_string();
    let dir = tempfile::tempdir().unwrap();
    let (server, control) = vm_server(dir.path()).await;
    let (code, backup) = begin(&control, &vm, json!({"checkpoint": "c1"}));
    assert_eq!(code, 201, "{backup}");
    delete(&control, &format!("/vms/{vm}/backups/{}", backup["id"].as_str().unwrap()));
    domain.kill_qemu();

    let (code, said) = begin(&control, &vm, json!({}));
    assert_eq!(code, 409, "a shut-off VM: {said}");
    assert!(said.as_str().unwrap().contains("not running"), "{said}");
    domain.start_again();
    let (_, checkpoints) = get_json(&control, &format!("/vms/{vm}/checkpoints"));
    assert_eq!((checkpoints[0]["id"].as_str(), checkpoints[0]["usable"].as_bool()), (Some("c1"), Some(false)), "{checkpoints}");
    let (code, said) = begin(&control, &vm, json!({"since": "c1", "checkpoint": "c2"}));
    assert_eq!(code, 409, "{said}");
    assert!(said.as_str().unwrap().contains("take a full backup"), "{said}");
    assert_eq!(checkpoint_ids(&control, &vm), ["c1"], "a refused backup makes no checkpoint");
    assert_eq!(leftovers(&server.state_dir, &vm), (0, false));

    // A full backup starts a new chain; the broken record goes with
    // metadata_only=y (a plain delete says so).
    let (code, full) = begin(&control, &vm, json!({"checkpoint": "c2"}));
    assert_eq!(code, 201, "{full}");
    delete(&control, &format!("/vms/{vm}/backups/{}", full["id"].as_str().unwrap()));
    let (code, said) = delete(&control, &format!("/vms/{vm}/checkpoints/c1"));
    assert_eq!(code, 409, "{said}");
    assert!(said.contains("metadata_only=y"), "{said}");
    assert_eq!(delete(&control, &format!("/vms/{vm}/checkpoints/c1?metadata_only=y")).0, 204);
    domain.write(0, 0x42, MIB, MIB);
    let (code, incremental) = begin(&control, &vm, json!({"since": "c2", "checkpoint": "c3"}));
    assert_eq!(code, 201, "{incremental}");
    let stream = pull(&server, incremental["disks"][0]["url"].as_str().unwrap()).await;
    assert_eq!(meta(&stream)["data-size"], MIB);
}

#[tokio::test(flavor = "multi_thread")]
async fn without_libvirt_the_vm_routes_say_how_to_turn_them_on() {
    let dir = tempfile::tempdir().unwrap();
    let (_server, control) = start_with_control(dir.path(), &[]).await;
    let (code, said) = control.curl(&[&control.url("/vms")]);
    assert_eq!(code, 503, "{said}");
    assert!(said.contains("--libvirt"), "{said}");
}

#[tokio::test(flavor = "multi_thread")]
async fn ctrl_c_of_a_vm_backup_ends_it_on_the_server_and_leaves_no_file() {
    let domain = Domain::start("interrupted", &[("vda", "qcow2", 1024 * MIB)]);
    let vm = domain.name().to_string();
    domain.write(0, 0x6b, 0, 768 * MIB);
    let dir = tempfile::tempdir().unwrap();
    let (server, control) = vm_server(dir.path()).await;
    let out = dir.path().join("backups");
    let cli = Command::new(binary("blockgate"))
        .arg("--cacert")
        .arg(server.ca())
        .args(["vm", "backup", "--control-socket", control.socket.to_str().unwrap(), &vm, "--out", out.to_str().unwrap()])
        .args(["--progress", "none"])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Interrupted once the backup runs and its stream is being written.
    wait_until("the CLI writes the stream", async || {
        std::fs::read_dir(&out)
            .is_ok_and(|entries| entries.flatten().any(|entry| entry.file_name().to_string_lossy().contains(".partial-")))
    })
    .await;
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(cli.id() as i32), nix::sys::signal::Signal::SIGINT).unwrap();
    let output = tokio::task::spawn_blocking(move || cli.wait_with_output()).await.unwrap().unwrap();
    let said = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(130), "{said}");
    assert!(said.contains("ended the backup"), "{said}");
    assert_eq!(leftovers(&server.state_dir, &vm), (0, false), "the server still runs the backup");
    assert_eq!(std::fs::read_dir(&out).unwrap().count(), 0, "a file was left in --out");
}
