//! The README's curl examples, run as written against a live server: the
//! blocks between the `readme-test` markers, with the documented default
//! URL and state directory swapped for this test's.

use std::process::Command;

use crate::common::*;

const BEGIN: &str = "<!-- readme-test: curl examples -->";
const END: &str = "<!-- readme-test: end -->";

fn readme_examples() -> String {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md")).unwrap();
    let section = readme.split(BEGIN).nth(1).and_then(|rest| rest.split(END).next()).expect("README has the curl example markers");
    let mut script = String::new();
    let mut in_block = false;
    for line in section.lines() {
        match line.trim() {
            "```sh" => in_block = true,
            "```" => in_block = false,
            _ if in_block => {
                script.push_str(line);
                script.push('\n');
            }
            _ => {}
        }
    }
    assert!(script.matches("curl ").count() >= 8, "the README should show curl for every route:\n{script}");
    script
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_readme_curl_examples_run() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &[format!("demo={}/demo.qcow2,size=1G", dir.path().display())]).await;
    let script = readme_examples()
        .replace("https://localhost:54322", &format!("https://localhost:{}", server.port))
        .replace("~/.local/state/blockgate", server.state_dir.to_str().unwrap());
    let output = Command::new("bash").args(["-euo", "pipefail", "-c", &script]).current_dir(dir.path()).output().unwrap();
    assert!(
        output.status.success(),
        "README examples failed:\n{script}\nstdout:\n{}\nstderr:\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(stdout.contains("\"features\""), "OPTIONS output shown: {stdout}");
    assert!(stdout.contains("\"zero\":true"), "extents output shown: {stdout}");
}
