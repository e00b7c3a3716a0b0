//! The README's examples, run as written against a live server: the blocks
//! between `readme-test` markers, with the documented default URL and
//! state directory swapped for this test's. A block that starts the server
//! gives the `--image` arguments the test starts it with.

use std::path::Path;
use std::process::Command;

use crate::common::*;

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
        script = script
            .replace("https://localhost:54322", &format!("https://localhost:{}", server.port))
            .replace("~/.local/state/blockgate", server.state_dir.to_str().unwrap());
    }
    let output = Command::new("bash").args(["-euo", "pipefail", "-c", &script]).current_dir(dir).output().unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "README block failed:\n{script}\nstdout:\n{stdout}\nstderr:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
}

/// The `--image` values of a documented `blockgate-server` command.
fn image_arguments(block: &str) -> Vec<String> {
    let line = block.lines().find(|line| line.starts_with("blockgate-server")).expect("a blockgate-server command");
    let words: Vec<&str> = line.split_whitespace().collect();
    words.windows(2).filter(|pair| pair[0] == "--image").map(|pair| pair[1].to_string()).collect()
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
    let server = Server::start(dir.path(), &image_arguments(start)).await;
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
