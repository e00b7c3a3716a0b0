//! Every refusal of `docs/api.md`: the right status, a one-line
//! `text/plain` message that says what is wrong, the right headers, and
//! not one byte of the image changed.

use reqwest::header::{CONTENT_RANGE, CONTENT_TYPE};
use reqwest::{Method, StatusCode};

use crate::common::*;

struct Case {
    method: Method,
    path: &'static str,
    headers: &'static [(&'static str, &'static str)],
    body: Vec<u8>,
    status: StatusCode,
    says: &'static str,
}

fn case(method: Method, path: &'static str, status: u16, says: &'static str) -> Case {
    Case { method, path, headers: &[], body: Vec::new(), status: StatusCode::from_u16(status).unwrap(), says }
}

fn cases() -> Vec<Case> {
    let image_size = 16 * MIB;
    vec![
        // Unknown or forbidden tickets.
        case(Method::GET, "/images/nope", 403, "no such ticket"),
        case(Method::GET, "/images/disj", 403, "no such ticket"),
        Case { body: vec![1; 10], ..case(Method::PUT, "/images/nope", 403, "no such ticket") },
        Case { body: vec![1; 10], ..case(Method::PUT, "/images/ro", 403, "read-only") },
        Case { body: br#"{"op":"zero","size":4096}"#.to_vec(), ..case(Method::PATCH, "/images/ro", 403, "read-only") },
        case(Method::GET, "/images/nope/extents", 403, "no such ticket"),
        // Ranges.
        Case { headers: &[("range", "bytes=5-1")], ..case(Method::GET, "/images/disk", 400, "end before start") },
        Case { headers: &[("range", "pages=0-1")], ..case(Method::GET, "/images/disk", 400, "Range") },
        Case { headers: &[("range", "bytes=16777216-")], ..case(Method::GET, "/images/disk", 416, "not satisfiable") },
        Case { headers: &[("range", "bytes=0-1,5-6")], ..case(Method::GET, "/images/disk", 416, "multiple ranges") },
        case(Method::GET, "/images/disk?close=maybe", 400, "close"),
        case(Method::GET, "/images/disk?format=vmdk", 400, "format"),
        // PUT.
        Case {
            headers: &[("content-range", "bytes 16777215-16777216/*")],
            body: vec![7; 2],
            ..case(Method::PUT, "/images/disk", 416, "pass the end")
        },
        Case {
            headers: &[("content-range", "bytes 16777216-16777216/*")],
            body: vec![7; 1],
            ..case(Method::PUT, "/images/disk", 416, "pass the end")
        },
        Case { body: vec![7; image_size as usize + 1], ..case(Method::PUT, "/images/disk", 416, "pass the end") },
        Case {
            headers: &[("content-range", "bytes 0-99/*")],
            body: vec![7; 50],
            ..case(Method::PUT, "/images/disk", 400, "Content-Length")
        },
        Case {
            headers: &[("content-range", "bytes 9-2/*")],
            body: vec![7; 5],
            ..case(Method::PUT, "/images/disk", 400, "end before start")
        },
        Case { headers: &[("content-range", "octets 0-1/*")], body: vec![7; 2], ..case(Method::PUT, "/images/disk", 400, "Content-Range") },
        Case { body: vec![7; 5], ..case(Method::PUT, "/images/disk?flush=maybe", 400, "flush") },
        // PATCH.
        Case { body: b"{not json".to_vec(), ..case(Method::PATCH, "/images/disk", 400, "not valid JSON") },
        Case { body: br#"{"op":"trim","size":1}"#.to_vec(), ..case(Method::PATCH, "/images/disk", 400, "\"trim\"") },
        Case { body: br#"{"op":"zero"}"#.to_vec(), ..case(Method::PATCH, "/images/disk", 400, "\"size\"") },
        Case { body: br#"{"op":"zero","size":-4096}"#.to_vec(), ..case(Method::PATCH, "/images/disk", 400, "\"size\"") },
        Case { body: br#"{"op":"zero","size":"4096"}"#.to_vec(), ..case(Method::PATCH, "/images/disk", 400, "\"size\"") },
        Case { body: br#"{"op":"zero","size":1,"wipe":true}"#.to_vec(), ..case(Method::PATCH, "/images/disk", 400, "\"wipe\"") },
        Case {
            body: br#"{"op":"zero","size":4096,"offset":16773121}"#.to_vec(),
            ..case(Method::PATCH, "/images/disk", 416, "pass the end")
        },
        Case { body: vec![b' '; 65 * 1024], ..case(Method::PATCH, "/images/disk", 413, "larger than") },
        // Extents.
        case(Method::GET, "/images/disk/extents?context=colour", 400, "context"),
        case(Method::GET, "/images/disk/extents?context=dirty", 404, "no dirty bitmap"),
        case(Method::GET, "/images/disk/extents?start=16777216", 416, "do not fit"),
        case(Method::GET, "/images/disk/extents?start=0&length=16777217", 416, "do not fit"),
        case(Method::GET, "/images/disk/extents?start=-1", 400, "start"),
        case(Method::GET, "/images/disk/extents?length=0", 400, "length"),
        // Routes and methods.
        case(Method::GET, "/nothing/here", 404, "no route"),
        case(Method::DELETE, "/images/disk", 405, "not allowed"),
        case(Method::POST, "/images/disk/extents", 405, "not allowed"),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_refusal_has_its_status_and_message_and_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.qcow2");
    create_image(&image, "qcow2", "16M");
    qemu_io(&image, "qcow2", &["write -P 0x5a 0 16M"]);
    let other = dir.path().join("ro.raw");
    create_image(&other, "raw", "1M");
    let server = Server::start(dir.path(), &[format!("disk={}", image.display()), format!("ro={},ro", other.display())]).await;
    let before = raw_view(&image);
    for client in [server.client_builder().http1_only().build().unwrap(), server.client()] {
        for case in cases() {
            let mut request = client.request(case.method.clone(), server.url(case.path)).body(case.body.clone());
            for (name, value) in case.headers {
                request = request.header(*name, *value);
            }
            let response = request.send().await.unwrap();
            let label = format!("{} {} {:?} ({:?})", case.method, case.path, case.headers, response.version());
            assert_eq!(response.status(), case.status, "{label}");
            assert_eq!(response.headers()[CONTENT_TYPE], "text/plain; charset=utf-8", "{label}");
            if case.status == StatusCode::RANGE_NOT_SATISFIABLE {
                let size = if case.path.starts_with("/images/ro") { MIB } else { 16 * MIB };
                assert_eq!(response.headers()[CONTENT_RANGE], format!("bytes */{size}").as_str(), "{label}");
            }
            if case.status == StatusCode::METHOD_NOT_ALLOWED {
                assert!(response.headers().contains_key("allow"), "{label}");
            }
            if case.status == StatusCode::FORBIDDEN && response.version() == reqwest::Version::HTTP_11 {
                assert_eq!(response.headers()["connection"], "close", "{label}");
            }
            let text = response.text().await.unwrap();
            assert!(text.ends_with('\n') && text.lines().count() == 1, "{label}: one line: {text:?}");
            assert!(text.contains(case.says), "{label}: {text:?} should say {:?}", case.says);
        }
    }
    assert!(raw_view(&image) == before, "a refused request changed the image");
    assert!(raw_view(&other).iter().all(|&b| b == 0), "the read-only image changed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expect_100_continue_clients_get_the_refusal_instead_of_a_100() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.raw");
    create_image(&image, "raw", "1M");
    let server = Server::start(dir.path(), &[format!("disk={}", image.display())]).await;
    let body = dir.path().join("body");
    std::fs::write(&body, vec![9u8; 2 * MIB as usize]).unwrap();
    let output = std::process::Command::new("curl")
        .args(["-sS", "-v", "--http1.1", "--cacert", server.ca().to_str().unwrap(), "-H", "Expect: 100-continue", "-T"])
        .arg(&body)
        .arg(server.image_url("disk"))
        .output()
        .unwrap();
    let trace = String::from_utf8_lossy(&output.stderr);
    assert!(trace.contains("< HTTP/1.1 416"), "{trace}");
    assert!(!trace.contains("HTTP/1.1 100"), "the server must refuse before asking for the body: {trace}");
    assert!(std::fs::read(&image).unwrap().iter().all(|&b| b == 0));
}

/// A client that announces more than it sends and then closes its side:
/// the server answers 400 and says how far it got, never 200.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_shorter_than_content_length_is_never_a_success() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.raw");
    create_image(&image, "raw", "4M");
    let server = Server::start(dir.path(), &[format!("disk={}", image.display())]).await;
    let script = r#"
import socket, ssl, sys
port, ca = int(sys.argv[1]), sys.argv[2]
context = ssl.create_default_context(cafile=ca)
context.set_alpn_protocols(["http/1.1"])
raw = socket.create_connection(("127.0.0.1", port))
tls = context.wrap_socket(raw, server_hostname="localhost")
tls.sendall(b"PUT /images/disk HTTP/1.1\r\nHost: localhost\r\nContent-Length: 1048576\r\n\r\n" + b"x" * 1000)
socket.socket.shutdown(tls, socket.SHUT_WR)
answer = b""
try:
    while True:
        chunk = tls.recv(65536)
        if not chunk:
            break
        answer += chunk
except (ssl.SSLError, ConnectionError) as error:
    answer += b"<" + str(error).encode() + b">"
print(answer.decode(errors="replace"))
"#;
    let output = std::process::Command::new("python3")
        .args(["-c", script, &server.port.to_string(), server.ca().to_str().unwrap()])
        .output()
        .unwrap();
    let answer = String::from_utf8_lossy(&output.stdout);
    assert!(answer.starts_with("HTTP/1.1 400"), "a short body must be refused: {answer:?} {}", String::from_utf8_lossy(&output.stderr));
    assert!(answer.contains("reading the request body failed after 1000 bytes"), "{answer}");
}
