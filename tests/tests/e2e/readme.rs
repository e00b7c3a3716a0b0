//! The README's examples, run as written against a live server: the blocks
//! between `readme-test` markers, with the documented ports (54322 and the
//! 54323/54324 of sections that start a server of their own) and state
//! directory swapped for this test's, and the built `blockgate` on PATH. A
//! block that starts the server gives the arguments the test starts it
//! with (all but `--listen`).

use std::path::Path;
use std::process::Command;

use crate::common::*;
use crate::vm_host::Domain;

const END: &str = "<!-- readme-test: end -->";

/// The ```sh blocks of a marked README section.
fn section_blocks(name: &str) -> Vec<String> {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md")).unwrap();
    let begin = format!("<!-- readme-test: {name} -->");
    let section = readme.split(&begin).nth(1).and_then(|rest| rest.split(END).next()).unwrap_or_else(|| panic!("README has no {begin}"));
    let mut blocks = Vec::new();
    let mut current: Option<String> = None;
    for line in section.lines() {
        match (line.trim(), &mut current) {
            ("```sh", None) => current = Some(String::new()),
            ("```", Some(_)) => blocks.push(current.take().unwrap()),
            (_, Some(block)) => {
                block.push_str(line);
                block.push('\n');
            }
            _ => {}
        }
    }
    blocks
}

/// Runs a README block in `dir` against `server`; its stdout.
fn run_block(block: &str, dir: &Path, server: Option<&Server>) -> String {
    let mut script = block.to_string();
    if let Some(server) = server {
        for documented in ["https://localhost:54322", "https://localhost:54323", "https://localhost:54324"] {
            script = script.replace(documented, &format!("https://localhost:{}", server.port));
        }
        script = script.replace("~/.local/state/blockgate", server.state_dir.to_str().unwrap());
    }
    let bin = binary("blockgate");
    let path = format!("{}:{}", bin.parent().unwrap().display(), std::env::var("PATH").unwrap_or_default());
    let output = Command::new("bash").args(["-euo", "pipefail", "-c", &script]).env("PATH", path).current_dir(dir).output().unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "README block failed:\n{script}\nstdout:\n{stdout}\nstderr:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
}

/// The `--image` values and the other arguments of a documented
/// `blockgate-server` command, without its `--listen`.
fn server_arguments(block: &str) -> (Vec<String>, Vec<String>) {
    let line = block.lines().find(|line| line.starts_with("blockgate-server")).expect("a blockgate-server command");
    let mut words = line.split_whitespace().skip(1);
    let (mut images, mut others) = (Vec::new(), Vec::new());
    while let Some(word) = words.next() {
        match word {
            "--listen" => drop(words.next()),
            "--image" => images.extend(words.next().map(str::to_string)),
            other => others.push(other.to_string()),
        }
    }
    (images, others)
}

/// Starts the server a README block documents.
async fn start_documented(block: &str, dir: &Path) -> Server {
    let (images, others) = server_arguments(block);
    let others: Vec<&str> = others.iter().map(String::as_str).collect();
    Server::try_start(dir, &images, &others).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_readme_curl_examples_run() {
    let blocks = section_blocks("curl examples");
    assert_eq!(blocks.len(), 1);
    assert!(blocks[0].matches("curl ").count() >= 10, "the README should show curl for every route");
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &["demo=./demo.qcow2,size=1G".to_string()]).await;
    let stdout = run_block(&blocks[0], dir.path(), Some(&server));
    assert!(stdout.contains("\"features\""), "OPTIONS output shown: {stdout}");
    assert!(stdout.contains("\"zero\":true"), "extents output shown: {stdout}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_readme_backup_and_restore_walkthrough_runs() {
    let blocks = section_blocks("backup");
    let [setup, start, walkthrough] = &blocks[..] else { panic!("expected setup, server and curl blocks: {blocks:?}") };
    let dir = tempfile::tempdir().unwrap();
    run_block(setup, dir.path(), None);
    let server = start_documented(start, dir.path()).await;
    let stdout = run_block(walkthrough, dir.path(), Some(&server));
    assert!(stdout.contains("\"dirty\":true"), "dirty extents shown: {stdout}");
    assert!(stdout.contains("\"verified\":true"), "the full restore verified its checksum: {stdout}");
    // Each stream carries its own round only: 8 MiB, then 1 MiB (the
    // zeroed range travels as a zero frame), then 2 MiB.
    let metas: Vec<serde_json::Value> = stdout
        .lines()
        .filter(|line| line.starts_with("{\"virtual-size\""))
        .map(|line| serde_json::from_str(line.trim()).unwrap())
        .collect();
    let sizes: Vec<u64> = metas.iter().map(|meta| meta["data-size"].as_u64().unwrap()).collect();
    assert_eq!(sizes, [8 << 20, 1 << 20, 2 << 20], "{stdout}");
    assert_eq!((metas[2]["since"].as_str(), metas[2]["checkpoint"].as_str()), (Some("tue"), Some("wed")));
    assert!(stdout.contains("409") && stdout.contains("\"tue\""), "the out-of-order restore is refused: {stdout}");
    assert!(stdout.contains("\"checkpoint\":\"wed\""), "the last restore reached wed: {stdout}");
    assert!(stdout.contains("Images are identical."), "{stdout}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_readme_cli_examples_run() {
    let blocks = section_blocks("cli");
    let [examples] = &blocks[..] else { panic!("expected one CLI block: {blocks:?}") };
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &["demo=./demo.qcow2,size=1G".to_string()]).await;
    let stdout = run_block(examples, dir.path(), Some(&server));
    let checksums: Vec<&str> = stdout.lines().filter_map(|line| line.split_whitespace().next()).filter(|word| word.len() == 64).collect();
    assert_eq!(checksums.len(), 2, "{stdout}");
    assert_eq!(checksums[0], checksums[1], "the remote and the local checksum agree: {stdout}");
    assert!(stdout.contains("\"checkpoint\":\"cp4\""), "the incremental restore reached cp4: {stdout}");
    assert!(stdout.contains("cp5"), "the new checkpoint is shown: {stdout}");
    assert!(dir.path().join("inc1.qcow2").exists() && dir.path().join("full.qcow2").exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_readme_control_socket_example_runs() {
    let blocks = section_blocks("control");
    let [setup, start, examples] = &blocks[..] else { panic!("expected setup, server and curl blocks: {blocks:?}") };
    let dir = tempfile::tempdir().unwrap();
    run_block(setup, dir.path(), None);
    let server = start_documented(start, dir.path()).await;
    let stdout = run_block(examples, dir.path(), Some(&server));
    assert!(stdout.contains("\"transfer_id\"") || stdout.contains("\"active\""), "the status is shown: {stdout}");
    assert!(stdout.contains("\"checkpoints\":true"), "OPTIONS over the local socket: {stdout}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_readme_vm_backup_walkthrough_runs() {
    let blocks = section_blocks("vms");
    let [start, full, incremental] = &blocks[..] else { panic!("expected server, full and incremental blocks: {blocks:?}") };
    let domain = Domain::start("readme", &[("vda", "qcow2", 64 * MIB), ("vdb", "raw", 16 * MIB)]);
    let named = |block: &str| block.replace("vm1", domain.name());
    domain.write(0, 0x11, 0, 4 * MIB);
    let dir = tempfile::tempdir().unwrap();
    let server = start_documented(start, dir.path()).await;
    let listed = run_block(&named(full), dir.path(), Some(&server));
    assert!(listed.contains(domain.name()) && listed.contains("vda:qcow2") && listed.contains("vdb:raw"), "{listed}");
    domain.write(0, 0x22, 8 * MIB, MIB);
    let stdout = run_block(&named(incremental), dir.path(), Some(&server));
    assert!(stdout.contains("vda.tue.sparse") && stdout.contains("tue.json"), "the files are listed: {stdout}");
    assert!(stdout.lines().any(|line| line.starts_with("tue ") && line.contains(" mon ")), "tue follows mon: {stdout}");
    assert!(stdout.contains("\"checkpoint\":\"tue\""), "the restore reached tue: {stdout}");
    domain.destroy();
    let compare = std::process::Command::new("qemu-img")
        .args(["compare", "-U", "-f", "qcow2", "-F", "qcow2"])
        .arg(dir.path().join("restored-vda.qcow2"))
        .arg(domain.disk_path(0))
        .output()
        .unwrap();
    assert!(compare.status.success(), "the restored disk differs: {}", String::from_utf8_lossy(&compare.stdout));
}
