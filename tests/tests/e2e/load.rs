//! Load and abuse: 64 clients on 4 tickets doing mixed ranged GET and PUT
//! for a bounded time with every byte verified (503 is the only refusal
//! allowed, and is retried), slow clients (headers trickling, a body
//! that stalls, a response read at 1 byte/s) cut off by the timeouts while
//! others are served, and 512 idle HTTP/1.1 and HTTP/2 connections that
//! never keep a working client out.

use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use reqwest::StatusCode;

use crate::common::*;

const TICKETS: usize = 4;
const CLIENTS: usize = 64;
const REGION: u64 = 4 * MIB;

fn load_seconds() -> u64 {
    std::env::var("BLOCKGATE_LOAD_SECONDS").ok().and_then(|s| s.parse().ok()).unwrap_or(30)
}

#[derive(Default)]
struct Counts {
    gets: u64,
    puts: u64,
    busy: u64,
    bytes: u64,
}

/// One client: owns `REGION` bytes of its ticket's image, keeps a model of
/// them, and checks every read against it.
async fn client_loop(client: reqwest::Client, url: String, base: u64, seed: u64, deadline: Instant) -> Counts {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut model = vec![0u8; REGION as usize];
    let mut counts = Counts::default();
    while Instant::now() < deadline {
        let length = rng.random_range(1..=256 * 1024u64);
        let offset = rng.random_range(0..REGION - length);
        let (start, end) = (base + offset, base + offset + length - 1);
        if rng.random_bool(0.5) {
            let data = random_bytes(length as usize, rng.random());
            let response =
                client.put(&url).header("content-range", format!("bytes {start}-{end}/*")).body(data.clone()).send().await.unwrap();
            match response.status() {
                StatusCode::OK => {
                    model[offset as usize..(offset + length) as usize].copy_from_slice(&data);
                    counts.puts += 1;
                    counts.bytes += length;
                }
                StatusCode::SERVICE_UNAVAILABLE => counts.busy += 1,
                other => panic!("PUT {start}-{end}: {other}: {}", response.text().await.unwrap()),
            }
        } else {
            let response = client.get(&url).header("range", format!("bytes={start}-{end}")).send().await.unwrap();
            match response.status() {
                StatusCode::PARTIAL_CONTENT => {
                    let body = response.bytes().await.unwrap();
                    assert!(body[..] == model[offset as usize..(offset + length) as usize], "GET {start}-{end} returned other bytes");
                    counts.gets += 1;
                    counts.bytes += length;
                }
                StatusCode::SERVICE_UNAVAILABLE => counts.busy += 1,
                other => panic!("GET {start}-{end}: {other}: {}", response.text().await.unwrap()),
            }
        }
        if counts.busy > 0 && counts.busy % 16 == 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    // The whole region, once more, against the model.
    loop {
        let response = client.get(&url).header("range", format!("bytes={base}-{}", base + REGION - 1)).send().await.unwrap();
        if response.status() == StatusCode::SERVICE_UNAVAILABLE {
            tokio::time::sleep(Duration::from_millis(20)).await;
            continue;
        }
        assert_eq!(response.status(), StatusCode::PARTIAL_CONTENT);
        assert!(response.bytes().await.unwrap()[..] == model[..], "final read of region {base} differs");
        return counts;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sixty_four_clients_on_four_tickets_every_byte_verified() {
    let dir = tempfile::tempdir().unwrap();
    let images: Vec<String> = (0..TICKETS).map(|t| format!("t{t}={}/t{t}.qcow2,size=64M", dir.path().display())).collect();
    // This test is about the data under load: its clients' pooled
    // connections must not meet the idle timeout or the per-address cap
    // (each tested on its own below), which close idle connections that a
    // client may be about to reuse.
    let limits = ["--header-timeout", "300", "--max-connections-per-address", "512"];
    let server = Server::try_start(dir.path(), &images, &limits).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(load_seconds());
    let mut clients = Vec::new();
    for index in 0..CLIENTS {
        let ticket = index % TICKETS;
        let base = (index / TICKETS) as u64 * REGION;
        let client = server.client_builder().http1_only().build().unwrap();
        clients.push(tokio::spawn(client_loop(client, server.image_url(&format!("t{ticket}")), base, index as u64, deadline)));
    }
    let mut total = Counts::default();
    for client in clients {
        let counts = client.await.unwrap();
        total.gets += counts.gets;
        total.puts += counts.puts;
        total.busy += counts.busy;
        total.bytes += counts.bytes;
    }
    let rss = peak_rss_kib(server.pid());
    println!(
        "load: {} GETs, {} PUTs, {} MiB verified, {} answered 503 (retried), server peak RSS {} MiB",
        total.gets,
        total.puts,
        total.bytes >> 20,
        total.busy,
        rss >> 10
    );
    assert!(total.gets > 100 && total.puts > 100, "the load ran: {} GETs, {} PUTs", total.gets, total.puts);
    assert!(rss < 256 << 10, "server peak RSS {rss} KiB");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_clients_are_cut_off_while_others_are_served() {
    let dir = tempfile::tempdir().unwrap();
    let images = [format!("disk={}/disk.raw,size=8M", dir.path().display())];
    let server = Server::try_start(dir.path(), &images, &["--header-timeout", "2", "--body-timeout", "2"]).await.unwrap();
    let script = r#"
import socket, ssl, sys, time
port, ca, mode = int(sys.argv[1]), sys.argv[2], sys.argv[3]
context = ssl.create_default_context(cafile=ca)
context.set_alpn_protocols(["http/1.1"])
tls = context.wrap_socket(socket.create_connection(("127.0.0.1", port)), server_hostname="localhost")
started = time.monotonic()
answer = b""
try:
    if mode == "headers":
        tls.sendall(b"GET /images/disk HTTP/1.1\r\nHost: localhost\r\n")
        for i in range(20):
            time.sleep(0.5)
            tls.sendall(b"X-Slow-%d: yes\r\n" % i)
    else:
        tls.sendall(b"PUT /images/disk HTTP/1.1\r\nHost: localhost\r\nContent-Length: 1048576\r\n\r\n" + b"x" * 1000)
    tls.settimeout(20)
    while chunk := tls.recv(65536):
        answer += chunk
except (ssl.SSLError, OSError):
    pass
print("%.1f %s" % (time.monotonic() - started, answer.split(b"\r\n", 1)[0].decode(errors="replace")))
"#;
    let run_slow = |mode: &'static str| {
        let args = [script.to_string(), server.port.to_string(), server.ca().display().to_string(), mode.to_string()];
        std::thread::spawn(move || {
            let output = std::process::Command::new("python3").arg("-c").args(&args).output().unwrap();
            String::from_utf8_lossy(&output.stdout).trim().to_string()
        })
    };
    let headers = run_slow("headers");
    let body = run_slow("body");
    // Meanwhile a normal client is served at once.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let started = Instant::now();
    let response = server.client().get(server.image_url("disk")).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.bytes().await.unwrap().len() as u64, 8 * MIB);
    assert!(started.elapsed() < Duration::from_secs(5), "a normal client waited {:?}", started.elapsed());
    let headers = headers.join().unwrap();
    let body = body.join().unwrap();
    let seconds = |line: &str| line.split_whitespace().next().unwrap().parse::<f64>().unwrap();
    assert!(seconds(&headers) < 6.0, "trickling headers were cut off after the header timeout, not after 10 s: {headers}");
    assert!(seconds(&body) < 6.0 && body.contains("400"), "a stalled body gets a 400 after the body timeout: {body}");
}

/// Memory follows buffers, not image size: a full GET of an empty 1 TiB
/// image starts at once and costs the server no more than a small one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_get_of_a_huge_empty_image_starts_at_once_in_bounded_memory() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &[format!("huge={}/huge.qcow2,size=1T", dir.path().display())]).await;
    let before = peak_rss_kib(server.pid());
    let client = server.client_builder().http1_only().build().unwrap();
    let started = Instant::now();
    let response = client.get(server.image_url("huge")).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.headers()["content-length"], (1u64 << 40).to_string().as_str());
    let mut body = response.bytes_stream();
    let mut received = 0u64;
    while received < 64 * MIB {
        let chunk = futures::StreamExt::next(&mut body).await.unwrap().unwrap();
        assert!(chunk.iter().all(|&b| b == 0));
        received += chunk.len() as u64;
    }
    let first_64_mib = started.elapsed();
    drop(body);
    let grown = peak_rss_kib(server.pid()).saturating_sub(before);
    assert!(first_64_mib < Duration::from_secs(5), "the first 64 MiB took {first_64_mib:?}");
    assert!(grown < 32 << 10, "the server grew by {grown} KiB for one download of a 1 TiB hole");
}

/// TLS connections that stay idle, held by `idle_clients.py`: groups of
/// `count` connections from a `source` address, of a `kind`: "h1" (just
/// the handshake), "h1-after-request" (one answered request, then
/// keep-alive) or "h2" (the preface, then a PING every 250 ms, answered
/// by the server). What became of them: per group, how many were refused,
/// how many seconds after it went idle each closed one was closed, and
/// how many stayed open.
struct IdleClients {
    child: std::process::Child,
    stdout: std::io::BufReader<std::process::ChildStdout>,
}

impl IdleClients {
    /// Opens the connections; returns once all are open (or refused).
    fn hold(server: &Server, groups: serde_json::Value, seconds: f64) -> IdleClients {
        let mut child = std::process::Command::new("python3")
            .args(["-c", include_str!("idle_clients.py")])
            .arg(server.port.to_string())
            .arg(server.ca())
            .arg(groups.to_string())
            .arg(seconds.to_string())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut stdout = std::io::BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        std::io::BufRead::read_line(&mut stdout, &mut line).unwrap();
        assert_eq!(line.trim(), "ready");
        IdleClients { child, stdout }
    }

    fn results(mut self) -> Vec<serde_json::Value> {
        let mut line = String::new();
        std::io::BufRead::read_line(&mut self.stdout, &mut line).unwrap();
        assert!(self.child.wait().unwrap().success());
        serde_json::from_str(&line).unwrap()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_never_keep_a_working_client_out() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &[format!("disk={}/disk.raw,size=1M", dir.path().display())]).await;
    // 512 (--max-connections) idle connections, 64 from each of eight
    // addresses, half HTTP/1.1 and half HTTP/2.
    let groups: Vec<serde_json::Value> = (2..10)
        .flat_map(|last| {
            let source = format!("127.0.0.{last}");
            [
                serde_json::json!({"source": source, "count": 32, "kind": "h1-after-request"}),
                serde_json::json!({"source": source, "count": 32, "kind": "h2"}),
            ]
        })
        .collect();
    let idle = IdleClients::hold(&server, serde_json::Value::Array(groups), 3.0);
    for client in [server.client_builder().http1_only().build().unwrap(), server.client()] {
        let started = Instant::now();
        let response = tokio::time::timeout(Duration::from_secs(2), client.get(server.image_url("disk")).send())
            .await
            .expect("a normal client is served within 2 s")
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(response.bytes().await.unwrap().len() as u64, MIB);
        println!("served in {:?}", started.elapsed());
    }
    let results = idle.results();
    let refused: u64 = results.iter().map(|group| group["refused"].as_u64().unwrap()).sum();
    let open: u64 = results.iter().map(|group| group["open"].as_u64().unwrap()).sum();
    assert_eq!(refused, 0, "every idle connection got in: {results:?}");
    assert!((500..512).contains(&open), "the idlest made room for the normal clients, the others stayed: {results:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_are_closed_after_the_header_timeout_and_one_address_gets_its_cap() {
    let dir = tempfile::tempdir().unwrap();
    let extra = ["--header-timeout", "2", "--max-connections-per-address", "4"];
    let server = Server::try_start(dir.path(), &[], &extra).await.unwrap();
    let group = |source: &str, count: u64, kind: &str| serde_json::json!({"source": source, "count": count, "kind": kind});
    let groups = serde_json::json!([
        group("127.0.0.2", 3, "h1"),
        group("127.0.0.3", 3, "h1-after-request"),
        group("127.0.0.4", 3, "h2"),
        group("127.0.0.5", 6, "h1"),
    ]);
    let results = IdleClients::hold(&server, groups, 6.0).results();
    let closed_after = |group: usize| -> Vec<f64> {
        results[group]["closed_after"].as_array().unwrap().iter().map(|seconds| seconds.as_f64().unwrap()).collect()
    };
    for group in 0..3 {
        let closed = closed_after(group);
        assert_eq!(closed.len(), 3, "group {group}: every connection is closed: {results:?}");
        assert!(closed.iter().all(|&seconds| (1.5..4.0).contains(&seconds)), "group {group}: closed after 2 s idle: {results:?}");
    }
    // Six from one address with a cap of four: the fifth and sixth make
    // room by closing that address's two idlest connections at once.
    let (early, late): (Vec<f64>, Vec<f64>) = closed_after(3).into_iter().partition(|&seconds| seconds < 1.0);
    assert_eq!((early.len(), late.len(), results[3]["refused"].as_u64()), (2, 4, Some(0)), "{results:?}");
}

/// A GET of `path` over HTTP/1.1 whose body is read at `rate` bytes per
/// second for `seconds`, then as fast as it comes (`slow_reader.py`), on a
/// thread: what it says is "BYTES_READ_SLOWLY complete|cut STATUS_LINE".
fn slow_reader(server: &Server, path: &str, rate: u64, seconds: f64) -> std::thread::JoinHandle<String> {
    let args = [server.port.to_string(), server.ca().display().to_string(), path.to_string(), rate.to_string(), seconds.to_string()];
    std::thread::spawn(move || {
        let output = std::process::Command::new("python3").args(["-c", include_str!("slow_reader.py")]).args(&args).output().unwrap();
        String::from_utf8_lossy(&output.stdout).trim().to_string()
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readers_that_take_nothing_lose_their_slot_and_slow_but_moving_ones_keep_it() {
    let dir = tempfile::tempdir().unwrap();
    let images = [format!("disk={}/disk.raw,size=64M", dir.path().display())];
    let server = Server::try_start(dir.path(), &images, &["--send-timeout", "6"]).await.unwrap();
    // The 8 reader slots (--max-readers): one client reading 1 MB/s, seven
    // reading 1 byte/s.
    let moving = slow_reader(&server, "/images/disk", 1_000_000, 14.0);
    let stalled: Vec<_> = (0..7).map(|_| slow_reader(&server, "/images/disk", 1, 12.0)).collect();
    let client = server.client();
    let ninth = || client.get(server.image_url("disk")).header("range", "bytes=0-4095").send();
    // The eight readers are Python processes: on a loaded machine they
    // take seconds to start (more than 3 s was seen), so wait until they
    // hold every slot, within the send timeout that would free them.
    let started = Instant::now();
    while ninth().await.unwrap().status() != StatusCode::SERVICE_UNAVAILABLE {
        assert!(started.elapsed() < Duration::from_secs(6), "the eight slots are never all taken");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Within the send timeout (and the time their buffers take to fill),
    // the seven slots held by readers taking nothing are free.
    let started = Instant::now();
    loop {
        let seven = futures::future::join_all((0..7).map(|_| ninth())).await;
        let statuses: Vec<StatusCode> = seven.into_iter().map(|response| response.unwrap().status()).collect();
        if statuses.iter().all(|&status| status == StatusCode::PARTIAL_CONTENT) {
            break;
        }
        assert!(statuses.iter().all(|&status| status == StatusCode::PARTIAL_CONTENT || status == StatusCode::SERVICE_UNAVAILABLE));
        assert!(started.elapsed() < Duration::from_secs(10), "the stalled readers still hold their slots: {statuses:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    for reader in stalled {
        let said = reader.join().unwrap();
        assert!(said.contains(" cut "), "a reader taking nothing was cut off: {said}");
    }
    let said = moving.join().unwrap();
    let slowly: u64 = said.split_whitespace().next().unwrap().parse().unwrap();
    assert!(said.contains(" complete HTTP/1.1 200"), "a client reading 1 MB/s is never cut: {said}");
    assert!(slowly > 7_000_000, "it read slowly for 14 s first: {said}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http2_response_nobody_reads_loses_its_slot() {
    let dir = tempfile::tempdir().unwrap();
    let images = [format!("disk={}/disk.raw,size=64M", dir.path().display())];
    let server = Server::try_start(dir.path(), &images, &["--send-timeout", "2", "--max-readers", "2"]).await.unwrap();
    // Two downloads over HTTP/2 whose bodies are never read: flow control
    // stops them once the client's windows are full.
    let stalled = server.client_builder().http2_prior_knowledge().build().unwrap();
    let held = [stalled.get(server.image_url("disk")).send().await.unwrap(), stalled.get(server.image_url("disk")).send().await.unwrap()];
    let other = server.client();
    let third = || other.get(server.image_url("disk")).header("range", "bytes=0-4095").send();
    assert_eq!(third().await.unwrap().status(), StatusCode::SERVICE_UNAVAILABLE, "both slots are taken");
    // Both slots come back: two reads at once get 206. (The second
    // response sends once the first one stops, its turn on the connection,
    // so it is cut off up to 50 ms later.)
    let started = Instant::now();
    loop {
        let (one, two) = tokio::join!(third(), third());
        if (one.unwrap().status(), two.unwrap().status()) == (StatusCode::PARTIAL_CONTENT, StatusCode::PARTIAL_CONTENT) {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(6), "the unread responses still hold their slots");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    for response in held {
        let mut response = response;
        let ended = loop {
            match response.chunk().await {
                Ok(Some(_)) => continue,
                Ok(None) => break Ok(()),
                Err(error) => break Err(error),
            }
        };
        assert!(ended.is_err(), "a cut response fails, it never ends as if complete");
    }
}
