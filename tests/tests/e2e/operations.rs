//! What an operator runs and reads: one access log line per request with
//! no ticket id in it, `--log-format json` for log shippers, Prometheus
//! metrics parsed by prometheus_client's own parser, and the systemd unit
//! in `contrib/`, checked by `systemd-analyze verify`.

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
    // Block devices (LVs) stay servable: no private /dev, every block
    // device allowed. The group reads the CA (0640 in a 0750 directory);
    // a reload is SIGHUP.
    let settings: Vec<&str> = unit.lines().map(str::trim).filter(|line| !line.starts_with('#')).collect();
    assert!(!settings.iter().any(|line| line.starts_with("PrivateDevices=")), "PrivateDevices= hides block devices");
    for setting in ["DevicePolicy=closed", "DeviceAllow=block-* rw", "StateDirectoryMode=0750", "ExecReload=/bin/kill -HUP $MAINPID"] {
        assert!(settings.contains(&setting), "the unit lacks {setting}");
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

/// A Python with prometheus_client (a venv under target/, made once).
fn prometheus_python() -> std::path::PathBuf {
    let venv = std::path::PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../target/metrics-venv"));
    let python = venv.join("bin/python");
    if !python.exists() {
        run("python3", &["-m", "venv", venv.to_str().unwrap()]);
        run(venv.join("bin/pip").to_str().unwrap(), &["install", "--quiet", "--disable-pip-version-check", "prometheus_client==0.21.1"]);
    }
    python
}

/// The samples of a scrape, parsed by prometheus_client's OpenMetrics parser.
fn parse_metrics(text: &str) -> Vec<Value> {
    let script = "import json, sys\nfrom prometheus_client.openmetrics.parser import text_string_to_metric_families\nprint(json.dumps([{'name': s.name, 'labels': s.labels, 'value': s.value} for f in text_string_to_metric_families(sys.stdin.read()) for s in f.samples]))";
    let mut child = Command::new(prometheus_python())
        .args(["-c", script])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(child.stdin.as_mut().unwrap(), text.as_bytes()).unwrap();
    let output = child.wait_with_output().unwrap();
    assert!(output.status.success(), "the scrape does not parse: {}\n{text}", String::from_utf8_lossy(&output.stderr));
    serde_json::from_slice(&output.stdout).unwrap()
}

fn sample(samples: &[Value], name: &str, labels: &[(&str, &str)]) -> f64 {
    samples
        .iter()
        .filter(|s| s["name"] == name && labels.iter().all(|(key, value)| s["labels"][*key] == *value))
        .map(|s| s["value"].as_f64().unwrap())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_what_was_transferred_and_name_no_ticket() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.raw");
    std::fs::write(&image, random_bytes(64 * MIB as usize, 7)).unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let metrics_listen = format!("127.0.0.1:{port}");
    let (server, control) = start_with_control(dir.path(), &["--metrics-listen", &metrics_listen]).await;
    let secret = "7f3e-metrics-ticket-secret";
    assert_eq!(control.add(&ticket(secret, &image, &["read", "write"], 300)).await, StatusCode::OK);
    let client = server.client();
    let url = server.image_url(secret);
    let put = client.put(&url).header("content-range", format!("bytes 0-{}/*", 3 * MIB - 1)).body(vec![5u8; 3 * MIB as usize]);
    assert_eq!(put.send().await.unwrap().status(), StatusCode::OK);
    let zero = client.patch(&url).body(format!(r#"{{"op":"zero","offset":{},"size":{},"flush":true}}"#, 8 * MIB, MIB));
    assert_eq!(zero.send().await.unwrap().status(), StatusCode::OK);
    let got = client.get(&url).header("range", format!("bytes=0-{}", MIB - 1)).send().await.unwrap().bytes().await.unwrap();
    assert_eq!(got.len() as u64, MIB);
    // A download in flight while the metrics are scraped.
    let mut running = client.get(&url).send().await.unwrap();
    assert!(running.chunk().await.unwrap().is_some());
    let (status, text) = curl_status(Command::new("curl").arg(format!("http://{metrics_listen}/metrics")));
    assert_eq!(status, 200, "{text}");
    let during = parse_metrics(&text);
    assert!(sample(&during, "blockgate_transfers_in_flight", &[]) >= 1.0);
    assert_eq!(sample(&during, "blockgate_tickets", &[("state", "active")]), 1.0);
    drop(running);
    wait_until("the download ends", async || {
        let (_, text) = control.curl(&["http://localhost/metrics"]);
        sample(&parse_metrics(&text), "blockgate_transfers_in_flight", &[]) == 0.0
    })
    .await;

    let (status, text) = control.curl(&["http://localhost/metrics"]);
    assert_eq!(status, 200, "the control socket serves the same metrics");
    let after = parse_metrics(&text);
    assert_eq!(sample(&after, "blockgate_written_bytes_total", &[]), (3 * MIB) as f64);
    assert_eq!(sample(&after, "blockgate_zeroed_bytes_total", &[]), MIB as f64);
    assert!(sample(&after, "blockgate_read_bytes_total", &[]) >= (2 * MIB) as f64, "the GET and part of the cut download were read");
    let requests = |method: &str, status: &str| {
        sample(&after, "blockgate_http_requests_total", &[("route", "/images/{ticket}"), ("method", method), ("status", status)])
    };
    assert_eq!((requests("PUT", "200"), requests("PATCH", "200"), requests("GET", "206")), (1.0, 1.0, 1.0));
    assert!(sample(&after, "blockgate_nbd_request_duration_seconds_count", &[]) > 0.0);
    assert_eq!(sample(&after, "blockgate_nbd_errors_total", &[]), 0.0);
    assert!(!text.contains(secret), "a ticket id in the metrics");
}
