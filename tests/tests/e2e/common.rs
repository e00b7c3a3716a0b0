//! Shared fixtures: the built server binary started on an ephemeral port
//! with images in a temporary directory, an HTTPS client that trusts its
//! generated CA, and the qemu tools that give the image as qemu sees it.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::{Value, json};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

pub const MIB: u64 = 1 << 20;

/// A built binary of the workspace, next to the test executable's `deps/`.
pub fn binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    let dir = exe.parent().and_then(Path::parent).expect("target directory");
    let path = dir.join(name);
    assert!(path.exists(), "{} is missing: run `cargo build --workspace --bins` first (tests/run does)", path.display());
    path
}

/// Peak resident memory (VmHWM) of a running process, in KiB.
pub fn peak_rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|line| line.starts_with("VmHWM:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// Runs a command and panics with its stderr if it fails.
pub fn run(program: &str, args: &[&str]) -> Vec<u8> {
    let output = Command::new(program).args(args).output().unwrap_or_else(|error| panic!("{program}: {error}"));
    assert!(output.status.success(), "{program} {args:?} failed: {}", String::from_utf8_lossy(&output.stderr));
    output.stdout
}

/// Creates an image with qemu-img.
pub fn create_image(path: &Path, format: &str, size: &str) {
    run("qemu-img", &["create", "-q", "-f", format, path.to_str().unwrap(), size]);
}

/// Runs qemu-io commands on an image that no one has open.
pub fn qemu_io(path: &Path, format: &str, commands: &[&str]) {
    let mut args = vec!["-f", format];
    for command in commands {
        args.extend(["-c", command]);
    }
    args.push(path.to_str().unwrap());
    run("qemu-io", &args);
}

/// The image's guest-visible bytes, as qemu reads them (works while the
/// server has it open).
pub fn raw_view(path: &Path) -> Vec<u8> {
    let out = path.with_extension("view.raw");
    run("qemu-img", &["convert", "-U", "-O", "raw", path.to_str().unwrap(), out.to_str().unwrap()]);
    let bytes = std::fs::read(&out).unwrap();
    std::fs::remove_file(&out).unwrap();
    bytes
}

/// Deterministic pseudo-random bytes.
pub fn random_bytes(length: usize, seed: u64) -> Vec<u8> {
    use rand::{RngCore, SeedableRng};
    let mut bytes = vec![0u8; length];
    rand::rngs::StdRng::seed_from_u64(seed).fill_bytes(&mut bytes);
    bytes
}

/// A running `blockgate-server`.
pub struct Server {
    child: Option<Child>,
    pub port: u16,
    pub state_dir: PathBuf,
}

impl Server {
    /// Starts the server with `--image` specs and waits until it answers.
    pub async fn start(dir: &Path, images: &[String]) -> Server {
        Self::try_start(dir, images, &[]).await.unwrap_or_else(|error| panic!("{error}"))
    }

    /// Starts the server with extra arguments; an error holds what it said
    /// if it exited instead of serving.
    pub async fn try_start(dir: &Path, images: &[String], extra: &[&str]) -> Result<Server, String> {
        let state_dir = dir.join("state");
        let port = free_port();
        let mut command = Command::new(binary("blockgate-server"));
        command.arg("--listen").arg(format!("127.0.0.1:{port}")).arg("--state-dir").arg(&state_dir).args(extra);
        for image in images {
            command.arg("--image").arg(image);
        }
        let log = std::fs::File::create(dir.join(format!("server-{port}.log"))).unwrap();
        let mut child = command.current_dir(dir).stdout(Stdio::null()).stderr(log).spawn().unwrap();
        let mut server = Server { child: None, port, state_dir };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                let said = std::fs::read_to_string(dir.join(format!("server-{port}.log"))).unwrap_or_default();
                return Err(format!("blockgate-server exited ({status}): {said}"));
            }
            if server.state_dir.join("ca.pem").exists() {
                server.child = Some(child);
                if let Ok(response) = server.client().get(server.url("/info/")).send().await {
                    if response.status().is_success() {
                        return Ok(server);
                    }
                }
                child = server.child.take().unwrap();
            }
            assert!(Instant::now() < deadline, "blockgate-server did not start");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    pub fn ca(&self) -> PathBuf {
        self.state_dir.join("ca.pem")
    }

    pub fn url(&self, path: &str) -> String {
        format!("https://localhost:{}{path}", self.port)
    }

    pub fn image_url(&self, ticket: &str) -> String {
        self.url(&format!("/images/{ticket}"))
    }

    /// A client trusting the server's CA; HTTP/2 or HTTP/1.1 by ALPN.
    pub fn client(&self) -> reqwest::Client {
        self.client_builder().build().unwrap()
    }

    pub fn client_builder(&self) -> reqwest::ClientBuilder {
        let ca = reqwest::Certificate::from_pem(&std::fs::read(self.ca()).unwrap()).unwrap();
        reqwest::Client::builder().use_rustls_tls().tls_built_in_root_certs(false).add_root_certificate(ca)
    }

    /// Sends SIGTERM and waits for the exit status.
    pub fn stop(&mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("running");
        kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM).unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("blockgate-server ignored SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if self.child.is_some() {
            self.stop();
        }
    }
}

/// A TCP port of 127.0.0.1 that nothing listens on now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// The PIDs of a process's children.
pub fn children(pid: u32) -> Vec<u32> {
    let mut children = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap().flatten() {
        let list = std::fs::read_to_string(task.path().join("children")).unwrap_or_default();
        children.extend(list.split_whitespace().filter_map(|pid| pid.parse::<u32>().ok()));
    }
    children
}

/// A qemu-nbd this test owns, for NBD-URI images.
pub struct QemuNbd {
    pub child: Child,
    pub socket: PathBuf,
}

impl QemuNbd {
    pub fn start(image: &Path, format: &str, socket: &Path) -> QemuNbd {
        let child = Command::new("qemu-nbd").args(["-t", "-e", "8", "-A", "-f", format, "-k"]).arg(socket).arg(image).spawn().unwrap();
        QemuNbd { child: serving(child, socket, "qemu-nbd"), socket: socket.to_path_buf() }
    }

    pub fn uri(&self) -> String {
        Self::uri_of(&self.socket)
    }

    pub fn uri_of(socket: &Path) -> String {
        format!("nbd+unix:///?socket={}", socket.display())
    }
}

impl Drop for QemuNbd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A client of the control socket.
pub struct Control {
    pub socket: PathBuf,
    http: reqwest::Client,
}

impl Control {
    pub fn new(socket: PathBuf) -> Control {
        let http = reqwest::Client::builder().unix_socket(socket.clone()).build().unwrap();
        Control { socket, http }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://localhost{path}")
    }

    pub async fn add(&self, ticket: &Value) -> StatusCode {
        let id = ticket["uuid"].as_str().unwrap();
        self.http.put(self.url(&format!("/tickets/{id}"))).json(ticket).send().await.unwrap().status()
    }

    pub async fn status(&self, id: &str) -> (StatusCode, Value) {
        let response = self.http.get(self.url(&format!("/tickets/{id}"))).send().await.unwrap();
        let status = response.status();
        (status, response.json().await.unwrap_or(Value::Null))
    }

    pub async fn delete(&self, id: &str) -> StatusCode {
        self.http.delete(self.url(&format!("/tickets/{id}"))).send().await.unwrap().status()
    }

    /// curl on the control socket: status code and body.
    pub fn curl(&self, args: &[&str]) -> (u16, String) {
        curl_status(Command::new("curl").arg("--unix-socket").arg(&self.socket).args(args))
    }
}

/// Runs a curl command: the status code (0 when no status line came) and
/// the body.
pub fn curl_status(curl: &mut Command) -> (u16, String) {
    let output = curl.args(["-sS", "-w", "\n%{http_code}"]).output().unwrap();
    let text = String::from_utf8_lossy(&output.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap();
    (code.parse().unwrap(), body.to_string())
}

/// A ticket JSON for a file:// image.
pub fn ticket(id: &str, image: &Path, ops: &[&str], timeout: u64) -> Value {
    let size = std::fs::metadata(image).unwrap().len();
    json!({"uuid": id, "size": size, "url": format!("file://{}", image.display()), "ops": ops, "timeout": timeout, "transfer_id": "x1"})
}

/// A server with a control socket that allows file:// images in `dir`.
/// A control-API ticket for a qcow2 image of `size` bytes.
pub fn qcow2_ticket(id: &str, image: &Path, ops: &[&str], size: u64) -> Value {
    json!({"uuid": id, "size": size, "url": format!("file://{}", image.display()), "ops": ops, "timeout": 300, "format": "qcow2"})
}

pub async fn start_with_control(dir: &Path, extra: &[&str]) -> (Server, Control) {
    let socket = dir.join("control.sock");
    let mut args = vec!["--control-socket", socket.to_str().unwrap(), "--allow-dir", dir.to_str().unwrap()];
    args.extend(extra);
    let server = Server::try_start(dir, &[], &args).await.unwrap();
    (server, Control::new(socket))
}

/// The server's qemu-storage-daemon children.
pub fn daemon_pids(server: &Server) -> Vec<u32> {
    children(server.pid())
        .into_iter()
        .filter(|pid| std::fs::read_to_string(format!("/proc/{pid}/cmdline")).is_ok_and(|c| c.starts_with("qemu-storage-daemon")))
        .collect()
}

pub fn daemon_children(server: &Server) -> usize {
    daemon_pids(server).len()
}

/// Polls `check` every 100 ms for up to 10 s.
pub async fn wait_until(what: &str, mut check: impl AsyncFnMut() -> bool) {
    for _ in 0..100 {
        if check().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("timed out waiting until {what}");
}

/// The child once its unix socket accepts connections (5 s at most).
pub fn serving(mut child: Child, socket: &Path, what: &str) -> Child {
    for _ in 0..500 {
        if std::os::unix::net::UnixStream::connect(socket).is_ok() {
            return child;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let _ = child.kill();
    let _ = child.wait();
    panic!("{what} did not start on {}", socket.display());
}

/// An nbdkit server this test owns (its filters inject delays and errors).
pub struct Nbdkit {
    child: Child,
    pub socket: PathBuf,
}

impl Nbdkit {
    /// `nbdkit ARGS...` on a unix socket in `dir`, once it answers.
    pub fn start(dir: &Path, name: &str, args: &[&str]) -> Nbdkit {
        let socket = dir.join(format!("{name}.sock"));
        let child =
            Command::new("nbdkit").args(["-f", "--exit-with-parent", "-U"]).arg(&socket).args(args).stderr(Stdio::null()).spawn().unwrap();
        Nbdkit { child: serving(child, &socket, "nbdkit (tests/run installs it)"), socket }
    }

    pub fn uri(&self) -> String {
        QemuNbd::uri_of(&self.socket)
    }
}

impl Drop for Nbdkit {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A sparse stream, checked to be one.
pub async fn get_stream(client: &reqwest::Client, url: String) -> Vec<u8> {
    let response = client.get(url).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.headers()["content-type"], "application/x-blockgate-sparse");
    response.bytes().await.unwrap().to_vec()
}

/// PUTs a sparse stream; status and body.
pub async fn put_stream(client: &reqwest::Client, url: String, stream: Vec<u8>) -> (StatusCode, String) {
    let response = client.put(url).body(stream).send().await.unwrap();
    (response.status(), response.text().await.unwrap())
}

/// The stream's meta frame.
pub fn meta(stream: &[u8]) -> Value {
    let length = usize::from_str_radix(std::str::from_utf8(&stream[22..38]).unwrap(), 16).unwrap();
    serde_json::from_slice(&stream[40..40 + length]).unwrap()
}

/// A sparse frame: header, then the payload and CRLF if there is one.
pub fn frame(kind: &str, start: u64, length: u64, payload: &[u8]) -> Vec<u8> {
    let mut frame = format!("{kind} {start:016x} {length:016x}\r\n").into_bytes();
    if !payload.is_empty() {
        frame.extend_from_slice(payload);
        frame.extend_from_slice(b"\r\n");
    }
    frame
}

pub fn meta_frame(meta: &Value) -> Vec<u8> {
    let json = serde_json::to_vec(meta).unwrap();
    frame("meta", 0, json.len() as u64, &json)
}

/// A stream of `meta`, one data frame at 0 and zeros to `size`, and a
/// stop frame without trailer.
pub fn stream(meta: Value, data: &[u8], size: u64) -> Vec<u8> {
    let mut stream = meta_frame(&meta);
    stream.extend(frame("data", 0, data.len() as u64, data));
    if size > data.len() as u64 {
        stream.extend(frame("zero", data.len() as u64, size - data.len() as u64, &[]));
    }
    stream.extend(frame("stop", 0, 0, &[]));
    stream
}

/// Kills the server's one qemu-storage-daemon and waits for its successor.
pub async fn kill_daemon(server: &Server) {
    let [old] = daemon_pids(server)[..] else { panic!("one qemu-storage-daemon child") };
    kill(Pid::from_raw(old as i32), Signal::SIGKILL).unwrap();
    wait_until("a new qemu-storage-daemon runs", async || daemon_pids(server).iter().any(|&pid| pid != old)).await;
}

/// PUT at `offset`; a 502 that is not the ledger's (daemon coming back) is retried.
pub async fn put_retrying(server: &Server, offset: u64, data: &[u8], query: &str) -> (StatusCode, String) {
    let range = format!("bytes {offset}-{}/*", offset + data.len() as u64 - 1);
    for _ in 0..200 {
        let response =
            server.client().put(server.image_url("disk") + query).header("content-range", &range).body(data.to_vec()).send().await;
        let Ok(response) = response else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let status = response.status();
        let text = response.text().await.unwrap_or_default();
        if status != StatusCode::BAD_GATEWAY || text.contains("writes may be lost") {
            return (status, text);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("the restarted daemon never took a write");
}

/// An incremental `since` → `checkpoint` with one data frame at `offset`.
pub fn incremental(size: u64, since: &str, checkpoint: &str, offset: u64, data: &[u8]) -> Vec<u8> {
    let meta = json!({"virtual-size": size, "data-size": data.len(), "incremental": true, "since": since, "checkpoint": checkpoint});
    let mut body = meta_frame(&meta);
    body.extend(frame("data", offset, data.len() as u64, data));
    body.extend(frame("stop", 0, 0, &[]));
    body
}

/// PUTs a sparse stream into `ticket` with `query` added; status and body.
pub async fn sparse_put_to(server: &Server, ticket: &str, query: &str, body: Vec<u8>) -> (StatusCode, String) {
    let response = server.client().put(server.image_url(ticket) + "?format=sparse" + query).body(body).send().await.unwrap();
    let status = response.status();
    (status, response.text().await.unwrap())
}

/// PUTs `data` at `offset` of `ticket`; status and body.
pub async fn raw_put_to(server: &Server, ticket: &str, offset: u64, data: &[u8]) -> (StatusCode, String) {
    let range = format!("bytes {offset}-{}/*", offset + data.len() as u64 - 1);
    let response = server.client().put(server.image_url(ticket)).header("content-range", range).body(data.to_vec()).send().await.unwrap();
    let status = response.status();
    (status, response.text().await.unwrap())
}

/// nbdkit over a 16 MiB file, requests in parallel: writes over 64 KiB
/// take `write_delay` seconds, a flush `flush_delay`, zeroing
/// `zero_delay`. Storage that is slow the way a test needs it.
pub fn slow_store(dir: &Path, write_delay: u32, flush_delay: u32, zero_delay: u32) -> (Nbdkit, PathBuf) {
    let file = dir.join("store.raw");
    std::fs::write(&file, vec![0u8; 16 * MIB as usize]).unwrap();
    let f = file.display().to_string();
    let pread = format!("dd if={f} skip=$4 count=$3 iflag=skip_bytes,count_bytes status=none");
    let pwrite = format!("if [ $3 -gt 65536 ]; then sleep {write_delay}; fi; dd of={f} seek=$4 conv=notrunc oflag=seek_bytes status=none");
    let zero = format!("sleep {zero_delay}; head -c $3 /dev/zero | dd of={f} seek=$4 conv=notrunc oflag=seek_bytes status=none");
    let nbdkit = Nbdkit::start(
        dir,
        "slow",
        &[
            "eval",
            &format!("get_size=echo {}", 16 * MIB),
            &format!("pread={pread}"),
            &format!("pwrite={pwrite}"),
            &format!("zero={zero}"),
            &format!("flush=sleep {flush_delay}; sync"),
            "can_write=exit 0",
            "can_flush=exit 0",
            "can_zero=exit 0",
            "thread_model=echo parallel",
        ],
    );
    (nbdkit, file)
}

/// A TLS acceptor for a fake server on localhost (HTTP/1.1), with a
/// self-signed certificate whose PEM is written to `dir/ca.pem`.
pub fn self_signed_acceptor(dir: &Path) -> (tokio_rustls::TlsAcceptor, PathBuf) {
    let certified = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    let ca = dir.join("ca.pem");
    std::fs::write(&ca, certified.cert.pem()).unwrap();
    let key = rustls::pki_types::PrivateKeyDer::Pkcs8(certified.key_pair.serialize_der().into());
    let mut config = rustls::ServerConfig::builder_with_provider(std::sync::Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![certified.cert.der().clone()], key)
        .unwrap();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    (tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(config)), ca)
}

/// A CA's certificate and a certificate with its key that the CA signed.
pub struct SignedPair {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// Makes a CA (`NAME-ca.pem`) and a certificate for `subject` with
/// `usage` that it signed (`NAME-cert.pem`, `NAME-key.pem`), in `dir`.
pub fn signed_pair(dir: &Path, name: &str, subject: &str, usage: rcgen::ExtendedKeyUsagePurpose) -> SignedPair {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose};
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.distinguished_name.push(DnType::CommonName, format!("{name} CA"));
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    let ca_key = KeyPair::generate().unwrap();
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let mut params = CertificateParams::new(vec![subject.to_string()]).unwrap();
    params.distinguished_name.push(DnType::CommonName, format!("{name} {subject}"));
    params.use_authority_key_identifier_extension = true;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![usage];
    let key = KeyPair::generate().unwrap();
    let cert = params.signed_by(&key, &ca, &ca_key).unwrap();
    let pair = SignedPair {
        ca: dir.join(format!("{name}-ca.pem")),
        cert: dir.join(format!("{name}-cert.pem")),
        key: dir.join(format!("{name}-key.pem")),
    };
    std::fs::write(&pair.ca, ca.pem()).unwrap();
    std::fs::write(&pair.cert, cert.pem()).unwrap();
    std::fs::write(&pair.key, key.serialize_pem()).unwrap();
    pair
}
