//! Transports: HTTP/1.1 and HTTP/2 over TLS 1.2 and 1.3 (by ALPN), no
//! TLS below 1.2, and QEMU's own https driver as a client.

use std::process::Command;

use reqwest::Version;

use crate::common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http1_and_http2_are_both_served() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &[format!("disk={}/disk.raw,size=4M", dir.path().display())]).await;
    let http1 = server.client_builder().http1_only().build().unwrap();
    let http2 = server.client_builder().http2_prior_knowledge().build().unwrap();
    for (client, version) in [(http1, Version::HTTP_11), (http2, Version::HTTP_2)] {
        let data = random_bytes(MIB as usize, 5);
        let put =
            client.put(server.image_url("disk")).header("content-range", "bytes 1024-1049599/*").body(data.clone()).send().await.unwrap();
        assert_eq!((put.status().as_u16(), put.version()), (200, version));
        let get = client.get(server.image_url("disk")).header("range", "bytes=1024-1049599").send().await.unwrap();
        assert_eq!((get.status().as_u16(), get.version()), (206, version));
        assert!(get.bytes().await.unwrap()[..] == data[..]);
    }
}

fn curl_tls(server: &Server, version_flags: &[&str]) -> (bool, String) {
    let output = Command::new("curl")
        .args(["-sS", "-o", "/dev/null", "-w", "%{http_code} %{http_version}", "--cacert", server.ca().to_str().unwrap()])
        .args(version_flags)
        .arg(server.url("/info/"))
        .output()
        .unwrap();
    (output.status.success(), String::from_utf8_lossy(&output.stdout).into_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_1_2_and_1_3_are_accepted_and_older_versions_refused() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &[]).await;
    assert_eq!(curl_tls(&server, &["--tlsv1.2", "--tls-max", "1.2"]), (true, "200 2".to_string()));
    assert_eq!(curl_tls(&server, &["--tlsv1.3", "--http1.1"]), (true, "200 1.1".to_string()));
    let (ok, _) = curl_tls(&server, &["--tlsv1.0", "--tls-max", "1.1"]);
    assert!(!ok, "TLS 1.1 must be refused");
}

/// `qemu-img convert` from a blockgate URL through QEMU's own https
/// driver, with one coroutine (`-m 1`: see the README's known limits for
/// the stall of the default), 20 times, each copy identical.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_pulls_an_image_through_its_https_driver_every_time() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.raw");
    std::fs::write(&image, random_bytes(16 * MIB as usize, 77)).unwrap();
    let server = Server::start(dir.path(), &[format!("disk={},ro", image.display())]).await;
    let source =
        format!(r#"json:{{"file.driver":"https","file.url":"https://127.0.0.1:{}/images/disk","file.sslverify":"off"}}"#, server.port);
    let copy = dir.path().join("copy.qcow2");
    for round in 0..20 {
        let _ = std::fs::remove_file(&copy);
        let mut child = Command::new("qemu-img")
            .args(["convert", "-m", "1", "-f", "raw", "-O", "qcow2", &source])
            .arg(&copy)
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        let status = loop {
            if let Some(status) = child.try_wait().unwrap() {
                break status;
            }
            if std::time::Instant::now() > deadline {
                let _ = child.kill();
                panic!("round {round}: qemu-img convert stalled");
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        };
        assert!(status.success(), "round {round}: qemu-img convert failed (is qemu-block-extra installed?)");
        run("qemu-img", &["compare", "-f", "raw", "-F", "qcow2", image.to_str().unwrap(), copy.to_str().unwrap()]);
    }
}
