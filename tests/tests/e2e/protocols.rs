//! Transports: HTTP/1.1 and HTTP/2 over TLS 1.2 and 1.3 (by ALPN), and no
//! TLS below 1.2.

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
