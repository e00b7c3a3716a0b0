//! Hostile review of VM backups (`--libvirt`, the `/vms` control routes,
//! `blockgate vm backup`, restores of VM streams): a client that goes away
//! in the middle, a CLI interrupted by Ctrl-C, unusual but legal state
//! directories, VMs whose disks are not plain files or are missing, a
//! restore given the wrong disk's incremental, a lying control server.
//! Each test states what a user relies on; the ones marked "review
//! finding" failed before their fix. The last ones pin behavior that held
//! under attack. Two restart the libvirtd every VM test shares: they are
//! ignored in the parallel run and run alone by tests/run.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::Request;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use serde_json::{Value, json};

use crate::common::*;
use crate::vm_api::*;
use crate::vm_host::*;

// ---------------------------------------------------------------- helpers

/// Polls `check` every 100 ms for `seconds`; false if it never held.
async fn within(seconds: u64, mut check: impl AsyncFnMut() -> bool) -> bool {
    let deadline = Instant::now() + Duration::from_secs(seconds);
    loop {
        if check().await {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A libvirt domain from XML this file writes (a network disk, a
/// missing disk file): created (transient) or only defined (persistent,
/// shut off). Dropping it removes its checkpoints' metadata, destroys it
/// and undefines it.
struct RawDomain {
    name: String,
    defined: bool,
}

impl RawDomain {
    fn name_for(what: &str) -> String {
        use std::sync::atomic::{AtomicU32, Ordering};
        static NEXT: AtomicU32 = AtomicU32::new(0);
        format!("attack-{what}-{}-{}", std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed))
    }

    fn xml(name: &str, devices: &str) -> String {
        format!(
            "<domain type='qemu'><name>{name}</name><memory unit='MiB'>128</memory><vcpu>1</vcpu>\
             <os><type arch='x86_64'>hvm</type></os><devices>{devices}\
             <controller type='usb' model='none'/><memballoon model='none'/></devices></domain>"
        )
    }

    fn file_disk(target: &str, format: &str, path: &Path) -> String {
        format!(
            "<disk type='file' device='disk'><driver name='qemu' type='{format}'/><source file='{}'/><target dev='{target}' bus='virtio'/></disk>",
            path.display()
        )
    }

    /// `virsh create` (running) or `virsh define` (shut off) of `devices`.
    fn new(dir: &Path, name: String, devices: &str, run: bool) -> RawDomain {
        require_libvirtd();
        let path = dir.join(format!("{name}.xml"));
        std::fs::write(&path, Self::xml(&name, devices)).unwrap();
        let path = path.to_string_lossy().into_owned();
        virsh(&[if run { "create" } else { "define" }, &path]).unwrap_or_else(|said| panic!("{said}"));
        RawDomain { name, defined: !run }
    }
}

impl Drop for RawDomain {
    fn drop(&mut self) {
        if let Ok(checkpoints) = virsh(&["checkpoint-list", "--name", &self.name]) {
            for checkpoint in checkpoints.lines().filter(|line| !line.is_empty()) {
                let _ = virsh(&["checkpoint-delete", "--metadata", &self.name, checkpoint]);
            }
        }
        let _ = virsh(&["destroy", &self.name]);
        if self.defined {
            let _ = virsh(&["undefine", &self.name]);
        }
    }
}

// --------------------------------------------------------------- findings

/// Review finding (high), fixed: A client that goes away while its `POST
/// /vms/{vm}/backups` is being served (Ctrl-C of `blockgate vm backup`
/// during its first request, a control client's timeout, a dropped
/// connection on `--control-listen`) must not leave the VM unusable: the
/// handler's future is dropped, but the libvirt job it asked for still
/// begins (it runs in a blocking task), with its checkpoint; the VM's slot
/// stays "starting" for the life of the server, so every later backup of
/// that VM is a 409 "has a backup starting", and the job, which has no
/// ticket, no expiry and no id anyone knows, runs (and fills its scratch
/// file) until the server restarts. What a user needs: within seconds the
/// VM can be backed up again, or the 409 names a backup that DELETE ends.
#[tokio::test(flavor = "multi_thread")]
async fn a_post_abandoned_by_its_client_leaves_no_stuck_slot_and_no_orphan_job() {
    let domain = Domain::start("abandoned", &[("vda", "qcow2", 16 * MIB), ("vdb", "qcow2", 16 * MIB)]);
    let vm = domain.name().to_string();
    let dir = tempfile::tempdir().unwrap();
    let (server, control) = vm_server(dir.path()).await;
    let url = control.url(&format!("/vms/{vm}/backups"));

    // The client gives up 50 ms into the request; beginning a job takes
    // libvirt 100-250 ms.
    let mut abandoned = false;
    for attempt in 0..5 {
        let body = json!({"checkpoint": format!("abandoned{attempt}")}).to_string();
        let (code, said) = control.curl(&["--max-time", "0.05", "-X", "POST", "-d", &body, &url]);
        if code == 0 {
            abandoned = true;
            break;
        }
        // Served in under 50 ms: end it and try again.
        let answer: Value = serde_json::from_str(&said).unwrap_or(Value::Null);
        end_backup(&control, &vm, &answer);
    }
    assert!(abandoned, "every POST was answered within 50 ms; the race could not be set up");

    let mut last = (0, Value::Null);
    let usable_again = within(6, async || {
        let (code, said) = begin(&control, &vm, json!({}));
        if code == 201 {
            end_backup(&control, &vm, &said);
            return true;
        }
        // A 409 that names the abandoned backup is fine if DELETE ends it.
        if let Some(id) = said.as_str().and_then(|said| said.split("running (").nth(1)).and_then(|rest| rest.split(')').next()) {
            delete(&control, &format!("/vms/{vm}/backups/{id}"));
        }
        last = (code, said);
        false
    })
    .await;
    assert!(usable_again, "6 s after a client abandoned its POST, VM {vm} still cannot be backed up: {} {}", last.0, last.1);
    assert_eq!(leftovers(&server.state_dir, &vm), (0, false), "a job or its directory outlived the abandoned request");
}

/// Review finding (medium), fixed: `blockgate vm backup` "ends the backup whatever
/// happened", but Ctrl-C (SIGINT) drops its future before the DELETE: the
/// CLI exits 130 saying only that "the transfer was stopped", and the
/// server keeps the backup, its libvirt job and scratch file, for the
/// whole `--timeout` (an hour by default), while the VM cannot be backed
/// up again (409). A user expects Ctrl-C to end what the command started.
#[tokio::test(flavor = "multi_thread")]
async fn ctrl_c_of_vm_backup_ends_its_backup_on_the_server() {
    let domain = Domain::start("interrupted", &[("vda", "qcow2", 192 * MIB)]);
    let vm = domain.name().to_string();
    domain.write(0, 0x5c, 0, 160 * MIB);
    let dir = tempfile::tempdir().unwrap();
    let (server, control) = vm_server(dir.path()).await;
    let out = dir.path().join("out");
    let mut child = Command::new(binary("blockgate"))
        .arg("--cacert")
        .arg(server.ca())
        .args(["vm", "backup", "--control-socket", control.socket.to_str().unwrap(), &vm, "--out", out.to_str().unwrap()])
        .args(["--progress", "none"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = BufReader::new(child.stderr.take().unwrap());
    let mut line = String::new();
    stderr.read_line(&mut line).unwrap();
    // "blockgate: backup ID of VM NAME started: ..."
    assert!(line.contains("started"), "{line}");
    let id = line.split_whitespace().nth(2).unwrap().to_string();
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), nix::sys::signal::Signal::SIGINT).unwrap();
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(130), "the pull finished before SIGINT came; write more into the disk");

    let path = format!("/vms/{vm}/backups/{id}");
    let ended = within(5, async || get_json(&control, &path).0 == 404).await;
    let (_, status) = get_json(&control, &path);
    assert!(ended, "5 s after Ctrl-C of `blockgate vm backup`, its backup still runs on the server until {}: {status}", status["expires"]);
    assert_eq!(leftovers(&server.state_dir, &vm), (0, false));
}

/// Review finding (medium), fixed: The watcher decides that a job is ours by looking for
/// the job's socket path in libvirt's backup XML as raw text, but libvirt
/// writes that XML escaped. A state directory whose path holds `&` or `'`
/// (legal, e.g. a $HOME or a mount named so) makes every backup "stop"
/// within a second: its tickets and files go, the 201's urls are dead,
/// and the libvirt job, judged "not ours", is never aborted: it runs on,
/// orphaned (scratch file deleted under it), and the VM refuses every
/// later backup because a job runs.
#[tokio::test(flavor = "multi_thread")]
async fn a_state_dir_with_xml_special_characters_keeps_its_backups() {
    let domain = Domain::start("escaped", &[("vda", "qcow2", 16 * MIB)]);
    let vm = domain.name().to_string();
    let dir = tempfile::Builder::new().prefix("blockgate&'state-").tempdir().unwrap();
    let (server, control) = vm_server(dir.path()).await;
    let (code, backup) = begin(&control, &vm, json!({"checkpoint": "c1"}));
    assert_eq!(code, 201, "{backup}");
    let id = backup["id"].as_str().unwrap();
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let (code, status) = get_json(&control, &format!("/vms/{vm}/backups/{id}"));
    let job = virsh(&["domjobinfo", &vm]).unwrap_or_default().contains("Backup");
    assert_eq!(
        (code, status["state"].as_str()),
        (200, Some("running")),
        "2.5 s after it began, the backup is gone from the API ({status}) while libvirt still runs a job: {job}"
    );
    let url = backup["disks"][0]["url"].as_str().unwrap();
    assert_eq!(server.client().get(format!("{url}/extents")).send().await.unwrap().status(), 200);
    assert_eq!(delete(&control, &format!("/vms/{vm}/backups/{id}")).0, 204);
    assert_eq!(leftovers(&server.state_dir, &vm), (0, false), "the job was not ended");
}

/// Review finding (medium), fixed: At start, `--libvirt` "ends the jobs a previous run
/// left" by removing every directory in STATE/vm-backups, following
/// STATE/vm-backups itself if it is a symlink: an operator who put the
/// (large) scratch files on another file system with `ln -s
/// /srv/scratch STATE/vm-backups` loses every directory of /srv/scratch
/// at the next start. Only the server's own job directories (with their
/// job record) may go.
#[tokio::test(flavor = "multi_thread")]
async fn a_symlinked_vm_backups_directory_is_not_emptied_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let elsewhere = dir.path().join("srv-scratch");
    std::fs::create_dir_all(elsewhere.join("other-project")).unwrap();
    std::fs::write(elsewhere.join("other-project/data.txt"), b"not blockgate's").unwrap();
    let state = dir.path().join("state");
    std::fs::create_dir_all(&state).unwrap();
    std::os::unix::fs::symlink(&elsewhere, state.join("vm-backups")).unwrap();
    let control = dir.path().join("control.sock");
    let started = Server::try_start(
        dir.path(),
        &[],
        &["--control-socket", control.to_str().unwrap(), "--allow-dir", dir.path().to_str().unwrap(), "--libvirt"],
    )
    .await;
    assert!(
        elsewhere.join("other-project/data.txt").exists(),
        "starting with --libvirt removed {} through the symlink STATE/vm-backups (the server {})",
        elsewhere.join("other-project").display(),
        if started.is_ok() { "started" } else { "did not start" }
    );
}

/// Review finding (medium), fixed: "Every disk" (a POST without `disks`, `blockgate vm
/// backup` without `--disk`) leaves out, without a word, each disk that is
/// not a local file or block device: a network disk (NBD, Ceph RBD,
/// iSCSI, Gluster) or a storage-pool volume. `GET /vms` does not list it
/// either, the 201 lists the other disks, the CLI reports success, and
/// the user holds a backup of a VM without its data disk. Back it up, or
/// refuse naming it.
#[tokio::test(flavor = "multi_thread")]
async fn a_network_disk_is_not_silently_left_out_of_an_every_disk_backup() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data.qcow2");
    create_image(&data, "qcow2", &(16 * MIB).to_string());
    let nbd = QemuNbd::start(&data, "qcow2", &dir.path().join("data.sock"));
    let system = dir.path().join("system.qcow2");
    create_image(&system, "qcow2", &(16 * MIB).to_string());
    let network = format!(
        "<disk type='network' device='disk'><driver name='qemu' type='raw'/><source protocol='nbd'>\
         <host transport='unix' socket='{}'/></source><target dev='vdb' bus='virtio'/></disk>",
        nbd.socket.display()
    );
    let devices = RawDomain::file_disk("vda", "qcow2", &system) + &network;
    let domain = RawDomain::new(dir.path(), RawDomain::name_for("network"), &devices, true);
    let server_dir = dir.path().join("server");
    std::fs::create_dir_all(&server_dir).unwrap();
    let (_server, control) = vm_server(&server_dir).await;

    let (code, backup) = begin(&control, &domain.name, json!({}));
    end_backup(&control, &domain.name, &backup);
    let names: Vec<&str> =
        backup["disks"].as_array().map(|disks| disks.iter().filter_map(|disk| disk["name"].as_str()).collect()).unwrap_or_default();
    assert!(
        names.contains(&"vdb") || (code >= 400 && backup.to_string().contains("vdb")),
        "a backup of every disk of a VM with a network disk vdb: {code} {backup}"
    );
    drop(domain);
    drop(nbd);
}

/// Review finding (low-medium), fixed: One shut-off VM whose disk file is gone (a
/// definition left after its images were removed: common on real hosts)
/// makes `GET /vms` a 502 for every VM, so `blockgate vm list` shows
/// nothing. The other VMs must still be listed.
#[tokio::test(flavor = "multi_thread")]
async fn a_shut_off_vm_with_a_missing_disk_does_not_break_the_vm_list() {
    let running = Domain::start("listed", &[("vda", "qcow2", 16 * MIB)]);
    let dir = tempfile::tempdir().unwrap();
    let gone = RawDomain::file_disk("vda", "qcow2", &dir.path().join("deleted-long-ago.qcow2"));
    let stale = RawDomain::new(dir.path(), RawDomain::name_for("stale"), &gone, false);
    let server_dir = dir.path().join("server");
    std::fs::create_dir_all(&server_dir).unwrap();
    let (_server, control) = vm_server(&server_dir).await;
    let (code, list) = get_json(&control, "/vms");
    assert_eq!(code, 200, "GET /vms with one stale VM definition ({}): {list}", stale.name);
    let names: Vec<&str> = list.as_array().unwrap().iter().filter_map(|vm| vm["name"].as_str()).collect();
    assert!(names.contains(&running.name()), "{list}");
}

/// Review finding (medium), fixed: A VM's disks share their checkpoint names (c1, c2
/// for vda and for vdb), and a stream's meta names only `since` and
/// `checkpoint`, nothing of the disk or VM it was taken from. So `blockgate
/// restore URL vda.c1.sparse vdb.c2.sparse` (one letter off, disks of the
/// same size) passes the chain check and silently makes an image that is
/// neither disk. The chain check exists for exactly this: it must refuse.
#[tokio::test(flavor = "multi_thread")]
async fn restore_refuses_an_incremental_of_another_disk() {
    let domain = Domain::start("crossed", &[("vda", "qcow2", 16 * MIB), ("vdb", "qcow2", 16 * MIB)]);
    let vm = domain.name().to_string();
    let dir = tempfile::tempdir().unwrap();
    let (server, control) = vm_server(dir.path()).await;
    let socket = control.socket.to_str().unwrap().to_string();
    let out = dir.path().join("backups");
    let out_text = out.to_str().unwrap().to_string();
    domain.write(0, 0x11, 0, MIB);
    domain.write(1, 0x22, 0, MIB);
    let base = ["vm", "backup", "--control-socket", &socket, &vm, "--out", &out_text, "--progress", "none"];
    ok(blockgate(&server.ca(), &[&base[..], &["--checkpoint", "c1"]].concat()));
    domain.write(0, 0x33, 2 * MIB, MIB);
    domain.write(1, 0x44, 4 * MIB, MIB);
    ok(blockgate(&server.ca(), &[&base[..], &["--since", "c1", "--checkpoint", "c2"]].concat()));

    let target_dir = dir.path().join("target");
    std::fs::create_dir_all(&target_dir).unwrap();
    let image = target_dir.join("restored.qcow2");
    let target = Server::start(&target_dir, &[format!("r0={},size={}", image.display(), 16 * MIB)]).await;
    let url = target.image_url("r0");
    let file = |name: &str| out.join(name).display().to_string();
    ok(blockgate(&target.ca(), &["restore", &url, &file("vda.c1.sparse"), "--progress", "none"]));
    let crossed = blockgate(&target.ca(), &["restore", &url, &file("vdb.c2.sparse"), "--progress", "none"]);
    assert!(
        !crossed.status.success(),
        "vdb's incremental was applied onto vda's full backup: {}",
        String::from_utf8_lossy(&crossed.stdout)
    );
}

/// Review finding (low), fixed: A backup's tickets are ordinary tickets in the control
/// API, and an imageio-style orchestrator extends a long transfer's ticket
/// with `PATCH /tickets/{id}`: the server answers 200 and the ticket shows
/// the new timeout, but the backup still ends at its own first `expires`,
/// taking the ticket with it. Either the PATCH extends the backup, or it
/// is refused saying to extend (or restart) the backup.
#[tokio::test(flavor = "multi_thread")]
async fn extending_a_backup_ticket_extends_the_backup_or_is_refused() {
    let domain = Domain::start("extended", &[("vda", "qcow2", 16 * MIB)]);
    let vm = domain.name().to_string();
    let dir = tempfile::tempdir().unwrap();
    let (server, control) = vm_server(dir.path()).await;
    let (code, backup) = begin(&control, &vm, json!({"timeout": 2}));
    assert_eq!(code, 201, "{backup}");
    let url = backup["disks"][0]["url"].as_str().unwrap().to_string();
    let ticket = url.rsplit('/').next().unwrap();
    let (patched, said) = control.curl(&["-X", "PATCH", "-d", r#"{"timeout":600}"#, &control.url(&format!("/tickets/{ticket}"))]);
    tokio::time::sleep(Duration::from_millis(3500)).await;
    let status = server.client().get(format!("{url}/extents")).send().await.unwrap().status();
    end_backup(&control, &vm, &backup);
    assert!(
        !(200..300).contains(&patched) || status == 200,
        "PATCH of the backup's ticket said {patched} {said}, yet 3.5 s later the ticket answers {status}"
    );
}

/// Review finding (low), fixed: A disk named twice (`"disks":["vda","vda"]`) is the
/// client's mistake, but it reaches libvirt and comes back as a 502
/// "libvirt failed", the status this API keeps for a failing backend that
/// a client may retry. It is a 400.
#[tokio::test(flavor = "multi_thread")]
async fn a_disk_named_twice_is_a_400_not_a_libvirt_failure() {
    let domain = Domain::start("twice", &[("vda", "qcow2", 16 * MIB)]);
    let vm = domain.name().to_string();
    let dir = tempfile::tempdir().unwrap();
    let (server, control) = vm_server(dir.path()).await;
    let (code, said) = begin(&control, &vm, json!({"disks": ["vda", "vda"]}));
    end_backup(&control, &vm, &said);
    assert_eq!(code, 400, "{said}");
    assert_eq!(leftovers(&server.state_dir, &vm), (0, false));
}

/// Review finding (low-medium), fixed: libvirtd restarts (a package upgrade, a crash):
/// running VMs and their jobs survive, but the server's connection is dead
/// and libvirt cannot tell without an event loop (`is_alive` stays true),
/// so the next request fails with a 502 "Cannot write data: Broken pipe";
/// only the one after it reconnects. A nightly backup that comes first
/// after an upgrade fails. Ignored by default: it restarts the libvirtd
/// every VM test shares (run it alone: `cargo nextest run -p
/// blockgate-e2e --run-ignored only -E 'test(/attack_vm::a_libvirtd/)'`).
#[tokio::test(flavor = "multi_thread")]
#[ignore = "restarts the shared libvirtd; run it alone"]
async fn a_libvirtd_restart_does_not_fail_the_next_backup() {
    let domain = Domain::start_persistent("relaunched", &[("vda", "qcow2", 16 * MIB)]);
    let vm = domain.name().to_string();
    let dir = tempfile::tempdir().unwrap();
    let (server, control) = vm_server(dir.path()).await;
    assert_eq!(get_json(&control, "/vms").0, 200);
    let pid: i32 = std::fs::read_to_string("/run/libvirtd.pid").unwrap().trim().parse().unwrap();
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGTERM).unwrap();
    let stopped = within(10, async || nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_err()).await;
    assert!(stopped, "libvirtd {pid} did not stop");
    let start = Path::new(env!("CARGO_MANIFEST_DIR")).join("libvirt/start");
    let started = Command::new(&start).output().unwrap();
    assert!(started.status.success(), "{}", String::from_utf8_lossy(&started.stderr));
    // A persistent domain: a transient one of vm_host goes with its
    // --autodestroy session.
    assert!(domain.is_running(), "the VM did not survive the restart of libvirtd");

    let (code, backup) = begin(&control, &vm, json!({}));
    end_backup(&control, &vm, &backup);
    assert_eq!(code, 201, "the first backup after libvirtd restarted: {backup}");
    assert_eq!(leftovers(&server.state_dir, &vm), (0, false));
}

/// Review finding (medium; ignored by default like the test above), fixed: A backup
/// deleted (or expired) while libvirtd is down: the DELETE answers 204,
/// the job's directory and tickets go, but the abort never reached
/// libvirt; when libvirtd is back the job still runs, orphaned (no
/// directory for the next start to find, no backup in the API), and the
/// VM refuses every backup while it runs. Either the DELETE fails (503,
/// the backup kept for a retry) or the job is ended once libvirt answers.
#[tokio::test(flavor = "multi_thread")]
#[ignore = "restarts the shared libvirtd; run it alone"]
async fn a_backup_deleted_while_libvirtd_is_down_is_not_orphaned() {
    let domain = Domain::start_persistent("outage", &[("vda", "qcow2", 16 * MIB)]);
    let vm = domain.name().to_string();
    let dir = tempfile::tempdir().unwrap();
    let (server, control) = vm_server(dir.path()).await;
    let (code, backup) = begin(&control, &vm, json!({}));
    assert_eq!(code, 201, "{backup}");
    let pid: i32 = std::fs::read_to_string("/run/libvirtd.pid").unwrap().trim().parse().unwrap();
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGTERM).unwrap();
    let stopped = within(10, async || !Path::new("/run/libvirt/libvirt-sock").exists()).await;
    assert!(stopped, "libvirtd {pid} did not stop");
    let (deleted, said) = delete(&control, &format!("/vms/{vm}/backups/{}", backup["id"].as_str().unwrap()));
    // Wait for the old daemon to be gone for good before starting one.
    within(10, async || nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_err()).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let start = Path::new(env!("CARGO_MANIFEST_DIR")).join("libvirt/start");
    let started = Command::new(&start).output().unwrap();
    assert!(started.status.success(), "{}", String::from_utf8_lossy(&started.stderr));

    let ended = within(5, async || !leftovers(&server.state_dir, &vm).1).await;
    if (200..300).contains(&deleted) {
        assert!(ended, "DELETE said {deleted} while libvirtd was down, and the job still runs after it came back");
    } else {
        assert_eq!(delete(&control, &format!("/vms/{vm}/backups/{}", backup["id"].as_str().unwrap())).0, 204, "{said}");
        assert!(within(5, async || !leftovers(&server.state_dir, &vm).1).await);
    }
}

/// Review finding (low), fixed: The checkpoint a running backup makes can be deleted
/// while the backup runs (204): its streams still say `"checkpoint":"k2"`,
/// a restore records k2, and the next incremental `since` k2 is a 404.
/// While a backup makes (or starts from) a checkpoint, deleting it is a
/// 409.
#[tokio::test(flavor = "multi_thread")]
async fn the_checkpoint_a_running_backup_makes_cannot_be_deleted_under_it() {
    let domain = Domain::start("pulled", &[("vda", "qcow2", 16 * MIB)]);
    let vm = domain.name().to_string();
    let dir = tempfile::tempdir().unwrap();
    let (server, control) = vm_server(dir.path()).await;
    let (code, backup) = begin(&control, &vm, json!({"checkpoint": "k2"}));
    assert_eq!(code, 201, "{backup}");
    let (deleted, said) = delete(&control, &format!("/vms/{vm}/checkpoints/k2"));
    let stream = server.client().get(format!("{}?format=sparse", backup["disks"][0]["url"].as_str().unwrap())).send().await.unwrap();
    let labels = meta(&stream.bytes().await.unwrap());
    end_backup(&control, &vm, &backup);
    assert_eq!(deleted, 409, "deleting k2 while its backup runs: {said}; the backup's stream still says {labels}");
}

// ------------------------------------------------- a lying control server

/// A fake blockgate: the control API on a unix socket (plain HTTP) whose
/// `POST /vms/{vm}/backups` answers `backup` (its disks' urls point at
/// the fake's data API), and a data API over TLS whose every `GET` answers
/// `stream`. DELETEs are 204.
struct FakeServer {
    socket: PathBuf,
    ca: PathBuf,
    deletes: Arc<std::sync::Mutex<u32>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    _dir: tempfile::TempDir,
}

impl FakeServer {
    async fn start(backup: impl Fn(u16) -> Value + Send + Sync + 'static, stream: Vec<u8>) -> FakeServer {
        let dir = tempfile::tempdir().unwrap();
        let (acceptor, ca) = self_signed_acceptor(dir.path());
        let data_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = data_listener.local_addr().unwrap().port();
        let stream = Bytes::from(stream);
        let data = axum::Router::new().fallback(move |_request: Request| {
            let stream = stream.clone();
            async move { ([("content-type", "application/x-blockgate-sparse")], stream).into_response() }
        });
        let data_task = tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = data_listener.accept().await else { return };
                let (acceptor, data) = (acceptor.clone(), data.clone());
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else { return };
                    let service = hyper_util::service::TowerToHyperService::new(data);
                    let builder = hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new());
                    let _ = builder.serve_connection(hyper_util::rt::TokioIo::new(tls), service).await;
                });
            }
        });
        let deletes = Arc::new(std::sync::Mutex::new(0));
        let counted = deletes.clone();
        let backup = Arc::new(backup);
        let control = axum::Router::new().fallback(move |request: Request| {
            let (backup, counted) = (backup.clone(), counted.clone());
            async move {
                match request.method().as_str() {
                    "POST" => (StatusCode::CREATED, axum::Json(backup(port))).into_response(),
                    "DELETE" => {
                        *counted.lock().unwrap() += 1;
                        StatusCode::NO_CONTENT.into_response()
                    }
                    _ => StatusCode::NOT_FOUND.into_response(),
                }
            }
        });
        let socket = dir.path().join("control.sock");
        let control_listener = tokio::net::UnixListener::bind(&socket).unwrap();
        let control_task = tokio::spawn(async move {
            let _ = axum::serve(control_listener, control).await;
        });
        FakeServer { socket, ca, deletes, tasks: vec![data_task, control_task], _dir: dir }
    }

    /// `blockgate vm backup` of `vm1` into `out` with extra `args`.
    async fn backup(&self, out: &Path, args: &[&str]) -> Output {
        let mut command = Command::new(binary("blockgate"));
        command.arg("--cacert").arg(&self.ca);
        command.args(["vm", "backup", "--control-socket", self.socket.to_str().unwrap(), "vm1", "--out", out.to_str().unwrap()]);
        command.args(["--progress", "none"]).args(args);
        tokio::task::spawn_blocking(move || command.output().unwrap()).await.unwrap()
    }
}

impl Drop for FakeServer {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

/// A well-formed sparse stream of a 1 MiB disk with `meta`'s labels.
fn labeled_stream(labels: Value) -> Vec<u8> {
    let mut meta = json!({"virtual-size": MIB, "data-size": 4096, "generator": "blockgate 0.1.0", "context": "dirty"});
    for (key, value) in labels.as_object().unwrap() {
        meta[key] = value.clone();
    }
    let mut stream = meta_frame(&meta);
    stream.extend(frame("data", 0, 4096, &[0x42; 4096]));
    stream.extend(frame("stop", 0, 0, &[]));
    stream
}

/// Review finding (low), fixed: `blockgate vm backup --disk vda` succeeds when the
/// control server's 201 does not hold vda (here: no disk at all): it saves
/// nothing, writes a record of an empty backup and exits 0. A backup that
/// lacks a disk that was asked for (or has none) is a failure.
#[tokio::test(flavor = "multi_thread")]
async fn vm_backup_fails_when_the_answer_lacks_the_asked_disks() {
    let fake = FakeServer::start(
        |_| json!({"id": "b1", "vm": "vm1", "since": null, "checkpoint": "c1", "expires": "2030-01-01T00:00:00Z", "disks": []}),
        labeled_stream(json!({"incremental": false, "checkpoint": "c1"})),
    )
    .await;
    let out = tempfile::tempdir().unwrap();
    let output = fake.backup(out.path(), &["--disk", "vda"]).await;
    assert!(
        !output.status.success(),
        "a backup without the asked disk vda was reported complete: {}",
        String::from_utf8_lossy(&output.stdout)
    );
    assert_eq!(*fake.deletes.lock().unwrap(), 1, "the backup is ended on the server");
}

/// Review finding (low), fixed: `blockgate vm backup` saves each disk's stream under the
/// backup's checkpoint and records the backup's `since` and `checkpoint`
/// for it, without reading what the stream's own meta says. A stream that
/// says another chain (since c0, checkpoint c9, where the backup is since
/// c1 to c2) is filed as vda.c2.sparse, and the record lies about it; the
/// mismatch shows only at restore time, when the backup is long gone.
#[tokio::test(flavor = "multi_thread")]
async fn vm_backup_refuses_a_stream_whose_labels_contradict_its_backup() {
    let fake = FakeServer::start(
        |port| {
            json!({"id": "b1", "vm": "vm1", "since": "c1", "checkpoint": "c2", "expires": "2030-01-01T00:00:00Z",
                "disks": [{"name": "vda", "size": MIB, "incremental": true, "url": format!("https://localhost:{port}/images/t1")}]})
        },
        labeled_stream(json!({"incremental": true, "since": "c0", "checkpoint": "c9"})),
    )
    .await;
    let out = tempfile::tempdir().unwrap();
    let output = fake.backup(out.path(), &["--since", "c1", "--checkpoint", "c2"]).await;
    let saved = out.path().join("vda.c2.sparse");
    let labels = std::fs::read(&saved).map(|stream| meta(&stream)).unwrap_or(Value::Null);
    assert!(
        !output.status.success(),
        "a stream labeled since {} checkpoint {} was saved as {} of the backup since c1 to c2",
        labels["since"],
        labels["checkpoint"],
        saved.display()
    );
}

// ------------------------------------------------------------ what held

/// Held: four POSTs for one VM at the same instant: one 201, three 409,
/// one job, one checkpoint.
#[tokio::test(flavor = "multi_thread")]
async fn simultaneous_posts_for_one_vm_start_one_backup() {
    let domain = Domain::start("racing", &[("vda", "qcow2", 16 * MIB)]);
    let vm = domain.name().to_string();
    let dir = tempfile::tempdir().unwrap();
    let (server, control) = vm_server(dir.path()).await;
    let control = Arc::new(control);
    let posts: Vec<_> = (0..4)
        .map(|index| {
            let (control, vm) = (control.clone(), vm.clone());
            std::thread::spawn(move || begin(&control, &vm, json!({"checkpoint": format!("race{index}")})))
        })
        .collect();
    let answers: Vec<(u16, Value)> = posts.into_iter().map(|post| post.join().unwrap()).collect();
    let mut codes: Vec<u16> = answers.iter().map(|(code, _)| *code).collect();
    codes.sort_unstable();
    assert_eq!(codes, [201, 409, 409, 409], "{answers:?}");
    assert_eq!(leftovers(&server.state_dir, &vm), (1, true));
    assert_eq!(checkpoint_ids(&control, &vm).len(), 1);
    let created = answers.iter().find(|(code, _)| *code == 201).unwrap();
    end_backup(&control, &vm, &created.1);
    assert_eq!(leftovers(&server.state_dir, &vm), (0, false));
}

/// Held: a backup's timeout slides with use, as a ticket's does: a
/// transfer that stalls past it still completes with every byte, and the
/// backup ends (job and files) once nothing has used it for the timeout;
/// VM names and disk names that are not plain are refused with a 400.
#[tokio::test(flavor = "multi_thread")]
async fn a_backup_outlives_its_timeout_while_a_transfer_runs_and_ends_once_idle() {
    let domain = Domain::start("expiring", &[("vda", "qcow2", 128 * MIB)]);
    let vm = domain.name().to_string();
    domain.write(0, 0x3c, 0, 96 * MIB);
    let dir = tempfile::tempdir().unwrap();
    let (server, control) = vm_server(dir.path()).await;
    for (name, body) in [
        ("..%2Fetc", json!({})),
        ("a%0Ab", json!({})),
        (&"x".repeat(300)[..], json!({})),
        (vm.as_str(), json!({"disks": ["../vda"]})),
        (vm.as_str(), json!({"disks": ["vda%2F"]})),
        (vm.as_str(), json!({"timeout": u64::MAX})),
        (vm.as_str(), json!({"timeout": -1})),
    ] {
        let (code, said) = begin(&control, name, body.clone());
        assert!(code == 400 || code == 404, "{name} {body}: {code} {said}");
    }
    assert_eq!(leftovers(&server.state_dir, &vm), (0, false));

    let (code, backup) = begin(&control, &vm, json!({"timeout": 2}));
    assert_eq!(code, 201, "{backup}");
    let url = format!("{}?format=sparse", backup["disks"][0]["url"].as_str().unwrap());
    let mut response = server.client().get(url).send().await.unwrap();
    assert_eq!(response.status(), 200);
    let mut received = response.chunk().await.unwrap().unwrap().len();
    tokio::time::sleep(Duration::from_secs(4)).await;
    let ended = loop {
        match response.chunk().await {
            Ok(Some(chunk)) => received += chunk.len(),
            Ok(None) => break Ok(()),
            Err(error) => break Err(error),
        }
    };
    assert!(ended.is_ok(), "a transfer running past the backup's timeout was cut after {received} bytes");
    assert!(received as u64 > 96 * MIB, "the whole stream arrived: {received} bytes");
    let id = backup["id"].as_str().unwrap().to_string();
    wait_until("the idle backup ends", async || get_json(&control, &format!("/vms/{vm}/backups/{id}")).0 == 404).await;
    assert_eq!(leftovers(&server.state_dir, &vm), (0, false));
}
