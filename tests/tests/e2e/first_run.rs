//! A first run that is safe, and what operators look for: the default
//! listener, health checks, access logs, certificate reloads, and the
//! words the CLI uses.

use std::process::{Command, Stdio};
use std::time::Duration;

use crate::common::*;

/// A child process killed when the test ends, passed or not.
struct KilledOnDrop(std::process::Child);

impl Drop for KilledOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The addresses a server logged as its data listeners.
fn listening_addresses(log: &str) -> Vec<String> {
    log.lines()
        .filter(|line| line.contains("data API listening (TLS)"))
        .filter_map(|line| line.split("address=https://").nth(1))
        .map(|rest| rest.split_whitespace().next().unwrap_or_default().to_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_listen_the_server_serves_this_host_only() {
    let dir = tempfile::tempdir().unwrap();
    let log_path = dir.path().join("server.log");
    let _server = KilledOnDrop(
        Command::new(binary("blockgate-server"))
            .args(["--state-dir", "state", "--image", "demo=./demo.qcow2,size=1M"])
            .current_dir(dir.path())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log_path).unwrap())
            .spawn()
            .unwrap(),
    );
    wait_until("the default listeners are up", async || {
        std::fs::read_to_string(&log_path).is_ok_and(|log| log.contains("data API listening"))
    })
    .await;
    let log = std::fs::read_to_string(&log_path).unwrap();
    let addresses = listening_addresses(&log);
    assert!(
        addresses.iter().all(|address| address == "127.0.0.1:54322" || address == "[::1]:54322"),
        "the default listens beyond this host: {addresses:?}\n{log}"
    );
    // And nothing answers on this machine's other addresses.
    let others = String::from_utf8(Command::new("hostname").arg("-I").output().unwrap().stdout).unwrap();
    for address in others.split_whitespace().filter(|address| !address.starts_with("127.")) {
        let target = if address.contains(':') { format!("[{address}]:54322") } else { format!("{address}:54322") };
        let connected = tokio::time::timeout(Duration::from_secs(2), tokio::net::TcpStream::connect(&target)).await;
        assert!(!matches!(connected, Ok(Ok(_))), "{target} accepted a connection while the server ran on the default listener");
    }
}
