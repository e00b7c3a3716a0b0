//! The client against an in-process NBD server on a duplex pipe, scripted
//! to do what qemu-nbd never does on demand: answer out of order, split
//! replies, send errors, refuse options, and hang up mid-reply.

use blockgate_nbd::wire::{self, chunk, cmd, tflag};
use blockgate_nbd::{Client, ConnectOptions, Error, ZeroFlags};
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};

const SIZE: u64 = 1 << 20;

struct Export {
    flags: u16,
    max_block: u32,
    refuse_option: Option<u32>,
}

impl Default for Export {
    fn default() -> Self {
        let flags = tflag::SEND_FLUSH | tflag::SEND_FUA | tflag::SEND_WRITE_ZEROES | tflag::SEND_TRIM | 1;
        Export { flags, max_block: 32 << 20, refuse_option: None }
    }
}

#[derive(Debug)]
struct Request {
    command: u16,
    flags: u16,
    cookie: u64,
    offset: u64,
    length: u32,
}

async fn option_reply(server: &mut DuplexStream, option: u32, reply: u32, data: &[u8]) {
    let mut message = wire::OPTION_REPLY_MAGIC.to_be_bytes().to_vec();
    message.extend(option.to_be_bytes());
    message.extend(reply.to_be_bytes());
    message.extend((data.len() as u32).to_be_bytes());
    message.extend(data);
    server.write_all(&message).await.unwrap();
}

/// Runs the server side of negotiation; returns false if an option was
/// refused and the client went away.
async fn serve_handshake(server: &mut DuplexStream, export: &Export) -> bool {
    let mut greeting = wire::NBD_MAGIC.to_be_bytes().to_vec();
    greeting.extend(wire::IHAVEOPT.to_be_bytes());
    greeting.extend(3u16.to_be_bytes());
    server.write_all(&greeting).await.unwrap();
    server.read_u32().await.unwrap();
    loop {
        let Ok(_magic) = server.read_u64().await else { return false };
        let option = server.read_u32().await.unwrap();
        let length = server.read_u32().await.unwrap();
        let mut data = vec![0; length as usize];
        server.read_exact(&mut data).await.unwrap();
        if export.refuse_option == Some(option) {
            option_reply(server, option, wire::rep::ERROR_BIT | 6, b"no such export here").await;
            continue;
        }
        match option {
            wire::opt::SET_META_CONTEXT | wire::opt::LIST_META_CONTEXT => {
                let name_len = u32::from_be_bytes(data[0..4].try_into().unwrap()) as usize;
                let mut at = 8 + name_len;
                let mut id = 1u32;
                while at < data.len() {
                    let len = u32::from_be_bytes(data[at..at + 4].try_into().unwrap()) as usize;
                    let mut reply = id.to_be_bytes().to_vec();
                    reply.extend(&data[at + 4..at + 4 + len]);
                    option_reply(server, option, wire::rep::META_CONTEXT, &reply).await;
                    at += 4 + len;
                    id += 1;
                }
                option_reply(server, option, wire::rep::ACK, &[]).await;
            }
            wire::opt::GO => {
                let mut info = 0u16.to_be_bytes().to_vec();
                info.extend(SIZE.to_be_bytes());
                info.extend(export.flags.to_be_bytes());
                option_reply(server, option, wire::rep::INFO, &info).await;
                let mut sizes = 3u16.to_be_bytes().to_vec();
                for size in [1u32, 4096, export.max_block] {
                    sizes.extend(size.to_be_bytes());
                }
                option_reply(server, option, wire::rep::INFO, &sizes).await;
                option_reply(server, option, wire::rep::ACK, &[]).await;
                return true;
            }
            _ => option_reply(server, option, wire::rep::ACK, &[]).await,
        }
    }
}

async fn read_request(server: &mut DuplexStream) -> Option<(Request, Vec<u8>)> {
    let mut header = [0u8; 28];
    server.read_exact(&mut header).await.ok()?;
    let request = Request {
        flags: u16::from_be_bytes(header[4..6].try_into().unwrap()),
        command: u16::from_be_bytes(header[6..8].try_into().unwrap()),
        cookie: u64::from_be_bytes(header[8..16].try_into().unwrap()),
        offset: u64::from_be_bytes(header[16..24].try_into().unwrap()),
        length: u32::from_be_bytes(header[24..28].try_into().unwrap()),
    };
    let mut payload = Vec::new();
    if request.command == cmd::WRITE {
        payload.resize(request.length as usize, 0);
        server.read_exact(&mut payload).await.ok()?;
    }
    Some((request, payload))
}

fn chunk_bytes(flags: u16, kind: u16, cookie: u64, payload: &[u8]) -> Vec<u8> {
    let mut bytes = wire::STRUCTURED_REPLY_MAGIC.to_be_bytes().to_vec();
    bytes.extend(flags.to_be_bytes());
    bytes.extend(kind.to_be_bytes());
    bytes.extend(cookie.to_be_bytes());
    bytes.extend((payload.len() as u32).to_be_bytes());
    bytes.extend(payload);
    bytes
}

fn data_chunk(flags: u16, cookie: u64, offset: u64, data: &[u8]) -> Vec<u8> {
    let mut payload = offset.to_be_bytes().to_vec();
    payload.extend(data);
    chunk_bytes(flags, chunk::OFFSET_DATA, cookie, &payload)
}

fn simple_reply(errno: u32, cookie: u64) -> Vec<u8> {
    let mut bytes = wire::SIMPLE_REPLY_MAGIC.to_be_bytes().to_vec();
    bytes.extend(errno.to_be_bytes());
    bytes.extend(cookie.to_be_bytes());
    bytes
}

/// The byte at `offset` of the fake export.
fn pattern(offset: u64) -> u8 {
    (offset % 251) as u8
}

fn pattern_range(offset: u64, length: u64) -> Vec<u8> {
    (offset..offset + length).map(pattern).collect()
}

/// Starts a server that negotiates and then runs `script` on the socket.
async fn start<F, Fut>(export: Export, options: ConnectOptions, script: F) -> Result<Client, Error>
where
    F: FnOnce(DuplexStream) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    let (client_side, mut server) = tokio::io::duplex(1 << 20);
    tokio::spawn(async move {
        if serve_handshake(&mut server, &export).await {
            script(server).await;
        }
    });
    Client::connect_stream(client_side, "", &options).await
}

#[tokio::test]
async fn replies_out_of_order_reach_their_requests() {
    let client = start(Export::default(), ConnectOptions::default(), |mut server| async move {
        let mut requests = Vec::new();
        for _ in 0..3 {
            requests.push(read_request(&mut server).await.unwrap().0);
        }
        for request in requests.iter().rev() {
            let data = pattern_range(request.offset, request.length.into());
            server.write_all(&data_chunk(chunk::FLAG_DONE, request.cookie, request.offset, &data)).await.unwrap();
        }
        std::future::pending::<()>().await;
    })
    .await
    .unwrap();
    let (a, b, c) = tokio::join!(client.read(0, 100), client.read(5000, 300), client.read(70000, 4096));
    assert_eq!(a.unwrap(), pattern_range(0, 100));
    assert_eq!(b.unwrap(), pattern_range(5000, 300));
    assert_eq!(c.unwrap(), pattern_range(70000, 4096));
}

#[tokio::test]
async fn a_read_split_into_holes_and_data_chunks_is_reassembled() {
    let client = start(Export::default(), ConnectOptions::default(), |mut server| async move {
        let (request, _) = read_request(&mut server).await.unwrap();
        let base = request.offset;
        let mut hole = (base + 4096).to_be_bytes().to_vec();
        hole.extend(4096u32.to_be_bytes());
        let mut reply = data_chunk(0, request.cookie, base + 8192, &pattern_range(base + 8192, 4096));
        reply.extend(chunk_bytes(0, chunk::OFFSET_HOLE, request.cookie, &hole));
        reply.extend(data_chunk(0, request.cookie, base, &pattern_range(base, 4096)));
        reply.extend(chunk_bytes(chunk::FLAG_DONE, chunk::NONE, request.cookie, &[]));
        server.write_all(&reply).await.unwrap();
        std::future::pending::<()>().await;
    })
    .await
    .unwrap();
    let data = client.read(8192, 12288).await.unwrap();
    let mut expected = pattern_range(8192, 4096);
    expected.extend(vec![0; 4096]);
    expected.extend(pattern_range(8192 + 8192, 4096));
    assert_eq!(data, expected);
}

#[tokio::test]
async fn an_error_chunk_fails_only_its_request() {
    let client = start(Export::default(), ConnectOptions::default(), |mut server| async move {
        let (failing, _) = read_request(&mut server).await.unwrap();
        let mut error = 5u32.to_be_bytes().to_vec();
        let message = b"disk on fire";
        error.extend((message.len() as u16).to_be_bytes());
        error.extend(message);
        error.extend(failing.offset.to_be_bytes());
        server.write_all(&chunk_bytes(0, chunk::ERROR_OFFSET, failing.cookie, &error)).await.unwrap();
        server.write_all(&chunk_bytes(chunk::FLAG_DONE, chunk::NONE, failing.cookie, &[])).await.unwrap();
        let (next, _) = read_request(&mut server).await.unwrap();
        let data = pattern_range(next.offset, next.length.into());
        server.write_all(&data_chunk(chunk::FLAG_DONE, next.cookie, next.offset, &data)).await.unwrap();
        std::future::pending::<()>().await;
    })
    .await
    .unwrap();
    match client.read(0, 512).await {
        Err(Error::Server { errno: 5, message }) => assert_eq!(message, "disk on fire"),
        other => panic!("expected EIO, got {other:?}"),
    }
    assert_eq!(client.read(512, 512).await.unwrap(), pattern_range(512, 512));
}

#[tokio::test]
async fn a_refused_option_is_reported_with_the_server_message() {
    let export = Export { refuse_option: Some(wire::opt::GO), ..Export::default() };
    let error = start(export, ConnectOptions::default(), |_| async {}).await.err().expect("refused");
    let text = error.to_string();
    assert!(matches!(error, Error::OptionRefused { option: "NBD_OPT_GO", .. }), "{text}");
    assert!(text.contains("no such export here"), "{text}");
}

#[tokio::test]
async fn eof_mid_reply_fails_every_pending_request() {
    let client = start(Export::default(), ConnectOptions::default(), |mut server| async move {
        let (first, _) = read_request(&mut server).await.unwrap();
        read_request(&mut server).await.unwrap();
        let reply = data_chunk(chunk::FLAG_DONE, first.cookie, first.offset, &pattern_range(0, 4096));
        server.write_all(&reply[..reply.len() - 1000]).await.unwrap();
    })
    .await
    .unwrap();
    let (a, b) = tokio::join!(client.read(0, 4096), client.read(4096, 4096));
    assert!(matches!(a, Err(Error::Disconnected(_))), "{a:?}");
    assert!(matches!(b, Err(Error::Disconnected(_))), "{b:?}");
    assert!(client.is_closed());
    assert!(matches!(client.flush().await, Err(Error::Disconnected(_))));
}

#[tokio::test]
async fn a_malformed_reply_closes_the_connection() {
    let client = start(Export::default(), ConnectOptions::default(), |mut server| async move {
        let (request, _) = read_request(&mut server).await.unwrap();
        // A data chunk that claims to lie outside the request.
        let bad = data_chunk(chunk::FLAG_DONE, request.cookie, SIZE - 10, &[1; 10]);
        server.write_all(&bad).await.unwrap();
        std::future::pending::<()>().await;
    })
    .await
    .unwrap();
    let error = client.read(0, 10).await.unwrap_err();
    assert!(error.to_string().contains("outside the request"), "{error}");
    assert!(client.is_closed());
}

#[tokio::test]
async fn a_short_read_reply_is_an_error_not_data() {
    let client = start(Export::default(), ConnectOptions::default(), |mut server| async move {
        let (request, _) = read_request(&mut server).await.unwrap();
        let reply = data_chunk(chunk::FLAG_DONE, request.cookie, request.offset, &pattern_range(0, 100));
        server.write_all(&reply).await.unwrap();
        std::future::pending::<()>().await;
    })
    .await
    .unwrap();
    let error = client.read(0, 200).await.unwrap_err();
    assert!(matches!(error, Error::Protocol(_)), "{error}");
}

#[tokio::test]
async fn requests_are_split_at_the_maximum_block_size() {
    let export = Export { max_block: 64 << 10, ..Export::default() };
    let (seen_tx, seen_rx) = tokio::sync::oneshot::channel();
    let client = start(export, ConnectOptions::default(), |mut server| async move {
        let mut lengths = Vec::new();
        while let Some((request, payload)) = read_request(&mut server).await {
            lengths.push((request.command, request.length));
            let reply = match request.command {
                cmd::READ => {
                    data_chunk(chunk::FLAG_DONE, request.cookie, request.offset, &pattern_range(request.offset, request.length.into()))
                }
                cmd::WRITE => {
                    assert_eq!(payload, pattern_range(request.offset, request.length.into()));
                    simple_reply(0, request.cookie)
                }
                _ => break,
            };
            server.write_all(&reply).await.unwrap();
        }
        let _ = seen_tx.send(lengths);
    })
    .await
    .unwrap();
    let length = 200 << 10;
    assert_eq!(client.read(0, length).await.unwrap(), pattern_range(0, length as u64));
    client.write(0, pattern_range(0, length as u64).into(), false).await.unwrap();
    client.disconnect().await;
    let lengths = seen_rx.await.unwrap();
    let expected: Vec<u32> = vec![65536, 65536, 65536, 8192];
    let reads: Vec<u32> = lengths.iter().filter(|(c, _)| *c == cmd::READ).map(|(_, l)| *l).collect();
    let writes: Vec<u32> = lengths.iter().filter(|(c, _)| *c == cmd::WRITE).map(|(_, l)| *l).collect();
    assert_eq!(reads, expected);
    assert_eq!(writes, expected);
}

#[tokio::test]
async fn commands_the_export_forbids_are_never_sent() {
    let export = Export { flags: tflag::READ_ONLY | 1, ..Export::default() };
    let client = start(export, ConnectOptions::default(), |mut server| async move {
        if let Some((request, _)) = read_request(&mut server).await {
            panic!("the client sent a forbidden request {request:?}");
        }
    })
    .await
    .unwrap();
    assert!(matches!(client.write(0, vec![1; 10].into(), false).await, Err(Error::Unsupported(_))));
    assert!(matches!(client.write_zeroes(0, 10, ZeroFlags::default()).await, Err(Error::Unsupported(_))));
    assert!(matches!(client.trim(0, 10).await, Err(Error::Unsupported(_))));
    assert!(matches!(client.flush().await, Err(Error::Unsupported(_))));
    assert!(matches!(client.block_status(0, 10).await, Err(Error::Unsupported(_))));
    assert!(matches!(client.read(SIZE - 1, 2).await, Err(Error::OutOfRange(_))));
}

#[tokio::test]
async fn block_status_is_clipped_and_named() {
    let options = ConnectOptions { meta_contexts: vec!["base:allocation".into(), "qemu:dirty-bitmap:b0".into()], ..Default::default() };
    let client = start(Export::default(), options, |mut server| async move {
        let (request, _) = read_request(&mut server).await.unwrap();
        assert_eq!((request.command, request.flags), (cmd::BLOCK_STATUS, 0));
        let mut allocation = 1u32.to_be_bytes().to_vec();
        for (length, flags) in [(4096u32, 0u32), (1 << 20, 3)] {
            allocation.extend(length.to_be_bytes());
            allocation.extend(flags.to_be_bytes());
        }
        let mut dirty = 2u32.to_be_bytes().to_vec();
        dirty.extend(8192u32.to_be_bytes());
        dirty.extend(1u32.to_be_bytes());
        server.write_all(&chunk_bytes(0, chunk::BLOCK_STATUS, request.cookie, &dirty)).await.unwrap();
        server.write_all(&chunk_bytes(chunk::FLAG_DONE, chunk::BLOCK_STATUS, request.cookie, &allocation)).await.unwrap();
        std::future::pending::<()>().await;
    })
    .await
    .unwrap();
    let status = client.block_status(0, 16384).await.unwrap();
    let allocation = status.extents("base:allocation").unwrap();
    assert_eq!(allocation.iter().map(|e| (e.length, e.flags)).collect::<Vec<_>>(), vec![(4096, 0), (12288, 3)]);
    let dirty = status.extents("qemu:dirty-bitmap:b0").unwrap();
    assert_eq!(dirty.iter().map(|e| (e.length, e.flags)).collect::<Vec<_>>(), vec![(8192, 1)]);
}
