//! What an operator runs and reads: one access log line per request with
//! no ticket id in it, `--log-format json` for log shippers, and the
//! systemd unit in `contrib/`, checked by `systemd-analyze verify`.

use std::process::Command;

use reqwest::StatusCode;
use serde_json::Value;

use crate::common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_request_is_logged_once_as_json_without_its_ticket() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.raw");
    std::fs::write(&image, vec![0u8; 4 * MIB as usize]).unwrap();
    let (server, control) = start_with_control(dir.path(), &["--log-format", "json"]).await;
    let secret = "c1a5f1e0-ticket-secret";
    assert_eq!(control.add(&ticket(secret, &image, &["read", "write"], 300)).await, StatusCode::OK);
    let client = server.client();
    let url = server.image_url(secret);
    let put = client.put(&url).header("content-range", "bytes 0-12344/*").body(vec![9u8; 12345]).send().await.unwrap();
    assert_eq!(put.status(), StatusCode::OK);
    let get = client.get(&url).header("range", "bytes=0-99999").send().await.unwrap();
    assert_eq!(get.bytes().await.unwrap().len(), 100_000);
    let refused = client.get(server.image_url("no-such-ticket")).send().await.unwrap();
    assert_eq!(refused.status(), StatusCode::FORBIDDEN);
    // A download the client abandons is logged too, as incomplete.
    let mut abandoned = client.get(&url).send().await.unwrap();
    assert!(abandoned.chunk().await.unwrap().is_some());
    drop(abandoned);

    let log = dir.path().join(format!("server-{}.log", server.port));
    let mut access = Vec::new();
    wait_until("the abandoned download is logged", async || {
        let text = std::fs::read_to_string(&log).unwrap();
        let lines: Vec<Value> =
            text.lines().map(|line| serde_json::from_str(line).unwrap_or_else(|_| panic!("not JSON: {line}"))).collect();
        access = lines.into_iter().filter(|line| line["target"] == "blockgate_server::access").collect();
        access.iter().filter(|line| line["fields"]["route"] == "/images/{ticket}").count() == 4
    })
    .await;
    let data: Vec<&Value> = access.iter().map(|line| &line["fields"]).filter(|fields| fields["route"] == "/images/{ticket}").collect();
    let (put, get, refused, abandoned) = (data[0], data[1], data[2], data[3]);
    assert_eq!((put["method"].as_str(), put["status"].as_u64(), put["bytes_in"].as_u64()), (Some("PUT"), Some(200), Some(12345)));
    assert_eq!((get["method"].as_str(), get["status"].as_u64(), get["bytes_out"].as_u64()), (Some("GET"), Some(206), Some(100_000)));
    assert_eq!(get["complete"], true);
    assert_eq!(refused["status"], 403);
    assert_eq!((abandoned["status"].as_u64(), abandoned["complete"].as_bool()), (Some(200), Some(false)));
    assert!(abandoned["bytes_out"].as_u64().unwrap() < 4 * MIB);
    let ids: std::collections::HashSet<u64> = data.iter().map(|fields| fields["id"].as_u64().unwrap()).collect();
    assert_eq!(ids.len(), 4, "one line per request, each with its own id");
    assert!(data.iter().all(|fields| fields["duration_ms"].is_u64()));
    let control_lines = access.iter().filter(|line| line["fields"]["route"] == "/tickets/{id}").count();
    assert_eq!(control_lines, 1, "the control API is logged the same way");
    for line in &access {
        assert!(!line.to_string().contains(secret), "a ticket id in an access line: {line}");
    }
}

#[test]
fn the_systemd_unit_verifies() {
    let unit = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../contrib/blockgate.service")).unwrap();
    for hardening in ["NoNewPrivileges=yes", "ProtectSystem=strict", "StateDirectory=", "RuntimeDirectory=", "PrivateTmp=yes"] {
        assert!(unit.contains(hardening), "the unit lacks {hardening}");
    }
    // Verified with this build's binary in place of /usr/local/bin's.
    let dir = tempfile::tempdir().unwrap();
    let local = dir.path().join("blockgate.service");
    std::fs::write(&local, unit.replace("/usr/local/bin/blockgate-server", binary("blockgate-server").to_str().unwrap())).unwrap();
    let output = Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(&local)
        .output()
        .expect("systemd-analyze (tests/run installs systemd)");
    let said = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success() && said.trim().is_empty(), "systemd-analyze verify: {said}");
    // The flags of its ExecStart are the server's.
    let exec = unit.lines().find_map(|line| line.strip_prefix("ExecStart=")).unwrap();
    let mut words = exec.split_whitespace().skip(1).collect::<Vec<_>>();
    words.push("--help");
    let help = Command::new(binary("blockgate-server")).args(&words).output().unwrap();
    assert!(help.status.success(), "{}", String::from_utf8_lossy(&help.stderr));
}
