//! The pipelined transmission phase. One connection has a writer task that
//! owns the socket's write half (requests go to it through a channel, so a
//! caller that gives up never leaves half a request on the wire), a reader
//! task that owns the read half and routes reply chunks to pending requests
//! by cookie, and a table of those pending requests. Many requests are in
//! flight at once; a lost or corrupt connection fails every one of them.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader, BufWriter};
use tokio::net::{TcpStream, UnixStream};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

use crate::address::{Address, Endpoint};
use crate::buffers;
use crate::error::{Error, Result};
use crate::handshake::{ConnectOptions, ExportInfo, negotiate};
use crate::reply::{ChunkPayload, ReplyHeader, StatusExtent, parse_chunk_payload};
use crate::wire::{self, cflag, chunk, cmd, tflag};

/// Requests queued for the writer task; bounded so a flood of callers waits
/// instead of growing memory.
const WRITE_QUEUE: usize = 64;

/// Read-ahead of reply headers. Small on purpose: data payloads bypass
/// it (read straight into their buffer) once it is empty, so only what it
/// read ahead is copied twice; a 256 KiB one copied most of every read.
const REPLY_HEADER_BUFFER: usize = 8 << 10;

/// Largest WRITE_ZEROES or TRIM request: qemu-nbd takes up to 4 GiB, and a
/// smaller step keeps one request from holding the export for long.
const MAX_ZERO_REQUEST: u64 = 1 << 30;

/// Largest BLOCK_STATUS request (u32 length, kept 4 KiB aligned).
const MAX_STATUS_REQUEST: u64 = 0xFFFF_F000;

/// Options of a WRITE_ZEROES request.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ZeroFlags {
    /// Keep the range allocated (NO_HOLE); without it the server may punch
    /// a hole.
    pub no_hole: bool,
    /// Fail with ENOTSUP rather than zero slowly (FAST_ZERO).
    pub fast: bool,
    /// Stable before the reply (FUA).
    pub fua: bool,
}

/// Extents of the selected metadata contexts for one BLOCK_STATUS request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockStatus {
    /// Request offset.
    pub offset: u64,
    /// Extents per context name, clipped to the request; each list starts at
    /// `offset` and may cover less than was asked.
    pub contexts: Vec<(String, Vec<StatusExtent>)>,
}

impl BlockStatus {
    /// The extents of one context, if the server described it.
    pub fn extents(&self, context: &str) -> Option<&[StatusExtent]> {
        self.contexts.iter().find(|(name, _)| name == context).map(|(_, extents)| extents.as_slice())
    }
}

/// A connected NBD client. Cheap to clone; clones share the connection.
#[derive(Clone)]
pub struct Client {
    connection: Arc<Connection>,
}

struct Connection {
    info: ExportInfo,
    shared: Arc<Shared>,
    requests: mpsc::Sender<OutgoingRequest>,
    tasks: [JoinHandle<()>; 2],
}

impl Drop for Connection {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

struct Shared {
    pending: Mutex<PendingTable>,
    next_cookie: AtomicU64,
}

#[derive(Default)]
struct PendingTable {
    requests: HashMap<u64, Pending>,
    /// Why the connection is gone, once it is.
    closed: Option<String>,
}

struct OutgoingRequest {
    header: [u8; wire::REQUEST_LEN],
    payload: Option<Bytes>,
}

struct Pending {
    offset: u64,
    length: u32,
    state: PendingState,
    /// First error chunk received; the reply still runs to its DONE chunk.
    error: Option<Error>,
    reply: oneshot::Sender<Result<Completed>>,
}

enum PendingState {
    Read { buffer: Vec<u8>, covered: u64 },
    BlockStatus(Vec<(u32, Vec<StatusExtent>)>),
    Other,
}

enum Completed {
    Read(Vec<u8>),
    BlockStatus(Vec<(u32, Vec<StatusExtent>)>),
    Done,
}

impl Shared {
    fn take(&self, cookie: u64) -> Result<Pending> {
        let mut table = self.pending.lock().expect("pending table lock");
        table.requests.remove(&cookie).ok_or_else(|| Error::Protocol(format!("reply for unknown cookie {cookie}")))
    }

    fn put_back(&self, cookie: u64, pending: Pending) {
        self.pending.lock().expect("pending table lock").requests.insert(cookie, pending);
    }

    /// Marks the connection dead and fails every pending request.
    fn close(&self, reason: String) {
        let drained = {
            let mut table = self.pending.lock().expect("pending table lock");
            if table.closed.is_none() {
                table.closed = Some(reason.clone());
            }
            std::mem::take(&mut table.requests)
        };
        for (_, pending) in drained {
            let _ = pending.reply.send(Err(Error::Disconnected(reason.clone())));
        }
    }
}

impl Client {
    /// Connects to an export and negotiates it.
    pub async fn connect(address: &Address, options: &ConnectOptions) -> Result<Client> {
        match &address.endpoint {
            Endpoint::Unix(path) => {
                let stream = UnixStream::connect(path).await?;
                let (read, write) = stream.into_split();
                Self::handshake(read, write, &address.export, options).await
            }
            Endpoint::Tcp { host, port } => {
                let stream = TcpStream::connect((host.as_str(), *port)).await?;
                stream.set_nodelay(true)?;
                let (read, write) = stream.into_split();
                Self::handshake(read, write, &address.export, options).await
            }
        }
    }

    /// Negotiates over any byte stream (used by tests with an in-process
    /// server).
    pub async fn connect_stream<S>(stream: S, export: &str, options: &ConnectOptions) -> Result<Client>
    where
        S: AsyncRead + AsyncWrite + Send + 'static,
    {
        let (read, write) = tokio::io::split(stream);
        Self::handshake(read, write, export, options).await
    }

    async fn handshake<R, W>(read: R, write: W, export: &str, options: &ConnectOptions) -> Result<Client>
    where
        R: AsyncRead + Send + Unpin + 'static,
        W: AsyncWrite + Send + Unpin + 'static,
    {
        let mut socket = tokio::io::join(read, write);
        let info = negotiate(&mut socket, export, options).await?;
        let (read, write) = socket.into_inner();
        let shared = Arc::new(Shared { pending: Mutex::new(PendingTable::default()), next_cookie: AtomicU64::new(1) });
        let (requests, queue) = mpsc::channel(WRITE_QUEUE);
        let reader = tokio::spawn(read_replies(BufReader::with_capacity(REPLY_HEADER_BUFFER, read), shared.clone(), info.clone()));
        let writer = tokio::spawn(write_requests(BufWriter::with_capacity(64 << 10, write), queue, shared.clone()));
        Ok(Client { connection: Arc::new(Connection { info, shared, requests, tasks: [reader, writer] }) })
    }

    /// What negotiation learned about the export.
    pub fn info(&self) -> &ExportInfo {
        &self.connection.info
    }

    /// Export size in bytes.
    pub fn size(&self) -> u64 {
        self.connection.info.size
    }

    /// True if the export refuses writes.
    pub fn is_read_only(&self) -> bool {
        self.connection.info.has_flag(tflag::READ_ONLY)
    }

    /// True once the connection failed; every request will fail.
    pub fn is_closed(&self) -> bool {
        self.connection.shared.pending.lock().expect("pending table lock").closed.is_some()
    }

    /// Reads `length` bytes at `offset`. Holes the server reports come back
    /// as zeros without data on the wire. Longer reads are split at the
    /// export's maximum block size and run in parallel.
    pub async fn read(&self, offset: u64, length: usize) -> Result<Bytes> {
        self.check_range(offset, length as u64)?;
        let mut replies = Vec::new();
        let mut part_offset = offset;
        let end = offset + length as u64;
        while part_offset < end {
            let part_len = (end - part_offset).min(self.max_payload() as u64) as u32;
            // Filled as chunks arrive, never zeroed first: holes and gaps
            // are the only bytes written twice.
            let state = PendingState::Read { buffer: buffers::take(part_len as usize), covered: 0 };
            replies.push(self.send(cmd::READ, 0, part_offset, part_len, None, state).await?);
            part_offset += u64::from(part_len);
        }
        let mut parts = Vec::with_capacity(replies.len());
        for reply in replies {
            match receive(reply).await? {
                Completed::Read(buffer) => parts.push(buffer),
                _ => unreachable!("a READ completes with data"),
            }
        }
        if parts.len() == 1 {
            return Ok(buffers::freeze(parts.pop().expect("one part")));
        }
        let mut whole = BytesMut::with_capacity(length);
        for part in parts {
            whole.extend_from_slice(&part);
            buffers::give_back(part);
        }
        Ok(whole.freeze())
    }

    /// Writes `data` at `offset`, split at the maximum block size. With
    /// `fua`, the data is stable when this returns.
    pub async fn write(&self, offset: u64, data: Bytes, fua: bool) -> Result<()> {
        self.check_writable()?;
        self.check_range(offset, data.len() as u64)?;
        let flags = if fua { self.fua_flag()? } else { 0 };
        let mut replies = Vec::new();
        let mut position = 0;
        while position < data.len() {
            let end = data.len().min(position + self.max_payload());
            let part = data.slice(position..end);
            let state = PendingState::Other;
            let length = part.len() as u32;
            replies.push(self.send(cmd::WRITE, flags, offset + position as u64, length, Some(part), state).await?);
            position = end;
        }
        for reply in replies {
            receive(reply).await?;
        }
        Ok(())
    }

    /// Zeroes `length` bytes at `offset` without sending data.
    pub async fn write_zeroes(&self, offset: u64, length: u64, flags: ZeroFlags) -> Result<()> {
        self.check_writable()?;
        if !self.connection.info.has_flag(tflag::SEND_WRITE_ZEROES) {
            return Err(Error::Unsupported("WRITE_ZEROES"));
        }
        let mut command_flags = 0;
        if flags.no_hole {
            command_flags |= cflag::NO_HOLE;
        }
        if flags.fast {
            if !self.connection.info.has_flag(tflag::SEND_FAST_ZERO) {
                return Err(Error::Unsupported("FAST_ZERO"));
            }
            command_flags |= cflag::FAST_ZERO;
        }
        if flags.fua {
            command_flags |= self.fua_flag()?;
        }
        self.ranged_command(cmd::WRITE_ZEROES, command_flags, offset, length).await
    }

    /// Discards `length` bytes at `offset` (contents become unspecified).
    pub async fn trim(&self, offset: u64, length: u64) -> Result<()> {
        self.check_writable()?;
        if !self.connection.info.has_flag(tflag::SEND_TRIM) {
            return Err(Error::Unsupported("TRIM"));
        }
        self.ranged_command(cmd::TRIM, 0, offset, length).await
    }

    /// Flushes completed writes to stable storage.
    pub async fn flush(&self) -> Result<()> {
        if !self.connection.info.has_flag(tflag::SEND_FLUSH) {
            return Err(Error::Unsupported("FLUSH"));
        }
        let reply = self.send(cmd::FLUSH, 0, 0, 0, None, PendingState::Other).await?;
        receive(reply).await.map(drop)
    }

    /// Asks for the status of the selected metadata contexts from `offset`.
    /// The answer may cover less than `length` (ask again from where it
    /// stops) and never more.
    pub async fn block_status(&self, offset: u64, length: u64) -> Result<BlockStatus> {
        if self.connection.info.contexts.is_empty() {
            return Err(Error::Unsupported("BLOCK_STATUS (no metadata context negotiated)"));
        }
        self.check_range(offset, length)?;
        if length == 0 {
            return Err(Error::OutOfRange("BLOCK_STATUS of length 0".into()));
        }
        let length = length.min(MAX_STATUS_REQUEST) as u32;
        let reply = self.send(cmd::BLOCK_STATUS, 0, offset, length, None, PendingState::BlockStatus(Vec::new())).await?;
        let Completed::BlockStatus(chunks) = receive(reply).await? else { unreachable!("a BLOCK_STATUS completes with extents") };
        let mut contexts = Vec::new();
        for (id, extents) in chunks {
            let Some((_, name)) = self.connection.info.contexts.iter().find(|(known, _)| *known == id) else {
                return Err(Error::Protocol(format!("block status for unknown context id {id}")));
            };
            contexts.push((name.clone(), clip_extents(extents, length)));
        }
        Ok(BlockStatus { offset, contexts })
    }

    /// Closes the connection at once: every pending request fails with
    /// `reason`, and so does every later one.
    pub fn abort(&self, reason: &str) {
        self.connection.shared.close(reason.to_string());
        for task in &self.connection.tasks {
            task.abort();
        }
    }

    /// Sends NBD_CMD_DISC; pending requests still get their replies, if the
    /// server sends them before closing.
    pub async fn disconnect(&self) {
        let header = wire::encode_request(0, cmd::DISC, 0, 0, 0);
        let _ = self.connection.requests.send(OutgoingRequest { header, payload: None }).await;
    }

    async fn ranged_command(&self, command: u16, flags: u16, offset: u64, length: u64) -> Result<()> {
        self.check_range(offset, length)?;
        let mut replies = Vec::new();
        let mut position = offset;
        let end = offset + length;
        while position < end {
            let part = (end - position).min(MAX_ZERO_REQUEST);
            let state = PendingState::Other;
            replies.push(self.send(command, flags, position, part as u32, None, state).await?);
            position += part;
        }
        for reply in replies {
            receive(reply).await?;
        }
        Ok(())
    }

    fn max_payload(&self) -> usize {
        self.connection.info.block_sizes.maximum as usize
    }

    fn fua_flag(&self) -> Result<u16> {
        if self.connection.info.has_flag(tflag::SEND_FUA) { Ok(cflag::FUA) } else { Err(Error::Unsupported("FUA")) }
    }

    fn check_writable(&self) -> Result<()> {
        if self.is_read_only() { Err(Error::Unsupported("writes (the export is read-only)")) } else { Ok(()) }
    }

    fn check_range(&self, offset: u64, length: u64) -> Result<()> {
        let size = self.size();
        match offset.checked_add(length) {
            Some(end) if end <= size => Ok(()),
            _ => Err(Error::OutOfRange(format!("{length} bytes at offset {offset} exceed the export size {size}"))),
        }
    }

    /// Registers a request and queues it for the writer; returns the channel
    /// its completion arrives on.
    async fn send(
        &self,
        command: u16,
        flags: u16,
        offset: u64,
        length: u32,
        payload: Option<Bytes>,
        state: PendingState,
    ) -> Result<oneshot::Receiver<Result<Completed>>> {
        let shared = &self.connection.shared;
        let cookie = shared.next_cookie.fetch_add(1, Ordering::Relaxed);
        let (reply, completion) = oneshot::channel();
        {
            let mut table = shared.pending.lock().expect("pending table lock");
            if let Some(reason) = &table.closed {
                return Err(Error::Disconnected(reason.clone()));
            }
            table.requests.insert(cookie, Pending { offset, length, state, error: None, reply });
        }
        let header = wire::encode_request(flags, command, cookie, offset, length);
        if self.connection.requests.send(OutgoingRequest { header, payload }).await.is_err() {
            shared.close("the writer stopped".into());
        }
        Ok(completion)
    }
}

async fn receive(completion: oneshot::Receiver<Result<Completed>>) -> Result<Completed> {
    completion.await.unwrap_or_else(|_| Err(Error::Disconnected("the connection was dropped".into())))
}

/// The server may describe more than was asked in its last extent: clip it.
fn clip_extents(extents: Vec<StatusExtent>, length: u32) -> Vec<StatusExtent> {
    let mut remaining = length;
    let mut clipped = Vec::with_capacity(extents.len());
    for mut extent in extents {
        if remaining == 0 {
            break;
        }
        extent.length = extent.length.min(remaining);
        remaining -= extent.length;
        clipped.push(extent);
    }
    clipped
}

async fn write_requests<W: AsyncWrite + Unpin>(mut socket: BufWriter<W>, mut queue: mpsc::Receiver<OutgoingRequest>, shared: Arc<Shared>) {
    let result: std::io::Result<()> = async {
        while let Some(request) = queue.recv().await {
            socket.write_all(&request.header).await?;
            if let Some(payload) = &request.payload {
                socket.write_all(payload).await?;
            }
            if queue.is_empty() {
                socket.flush().await?;
            }
        }
        socket.shutdown().await
    }
    .await;
    if let Err(error) = result {
        shared.close(format!("writing to the NBD server failed: {error}"));
    }
}

async fn read_replies<R: AsyncRead + Unpin>(mut socket: BufReader<R>, shared: Arc<Shared>, info: ExportInfo) {
    let reason = loop {
        match read_reply(&mut socket, &shared, &info).await {
            Ok(()) => continue,
            Err(Error::Io(error)) if error.kind() == std::io::ErrorKind::UnexpectedEof => {
                break "the NBD server closed the connection".to_string();
            }
            Err(error) => break error.to_string(),
        }
    };
    tracing::debug!(%reason, "NBD connection closed");
    shared.close(reason);
}

/// Reads one simple reply or structured chunk and routes it. An error return
/// means the stream can no longer be trusted.
async fn read_reply<R: AsyncRead + Unpin>(socket: &mut R, shared: &Shared, info: &ExportInfo) -> Result<()> {
    let magic = socket.read_u32().await?;
    let mut rest = [0u8; 16];
    let rest = &mut rest[..ReplyHeader::rest_len(magic)?];
    socket.read_exact(rest).await?;
    match ReplyHeader::parse(magic, rest)? {
        ReplyHeader::Simple { errno, cookie } => {
            let pending = shared.take(cookie)?;
            let result = match (&pending.state, errno) {
                (PendingState::Read { .. }, 0) => {
                    return Err(Error::Protocol("simple reply to READ with structured replies on".into()));
                }
                (PendingState::BlockStatus(_), 0) => {
                    return Err(Error::Protocol("simple success reply to BLOCK_STATUS".into()));
                }
                (_, 0) => Ok(Completed::Done),
                (_, errno) => Err(Error::Server { errno, message: String::new() }),
            };
            let _ = pending.reply.send(result);
        }
        ReplyHeader::Chunk { flags, kind, cookie, length } => {
            let mut pending = shared.take(cookie)?;
            if let Err(error) = read_chunk(socket, &mut pending, kind, length).await {
                // Back into the table, so that closing the connection fails
                // it with the reason.
                shared.put_back(cookie, pending);
                return Err(error);
            }
            if flags & chunk::FLAG_DONE != 0 {
                complete(pending, info);
            } else {
                shared.put_back(cookie, pending);
            }
        }
    }
    Ok(())
}

async fn read_chunk<R: AsyncRead + Unpin>(socket: &mut R, pending: &mut Pending, kind: u16, length: u32) -> Result<()> {
    if kind != chunk::OFFSET_DATA {
        let mut payload = vec![0u8; length as usize];
        socket.read_exact(&mut payload).await?;
        return apply_chunk(pending, parse_chunk_payload(kind, &payload)?);
    }
    let offset = socket.read_u64().await?;
    let data_len = u64::from(length - 8);
    let PendingState::Read { buffer, covered } = &mut pending.state else {
        return Err(Error::Protocol("OFFSET_DATA chunk for a request that is not a READ".into()));
    };
    let start = chunk_start(pending.offset, pending.length, offset, data_len)?;
    let end = start + data_len as usize;
    if start >= buffer.len() {
        // In order (the usual case): zero any gap, then append unzeroed.
        buffer.resize(start, 0);
        let mut limited = (&mut *socket).take(data_len);
        while buffer.len() < end {
            if limited.read_buf(buffer).await? == 0 {
                return Err(Error::Io(std::io::ErrorKind::UnexpectedEof.into()));
            }
        }
    } else {
        if end > buffer.len() {
            buffer.resize(end, 0);
        }
        socket.read_exact(&mut buffer[start..end]).await?;
    }
    *covered += data_len;
    Ok(())
}

/// Where a data or hole chunk lands in its request's buffer, checking that
/// it lies inside the request.
fn chunk_start(request_offset: u64, request_length: u32, offset: u64, length: u64) -> Result<usize> {
    let request_end = request_offset + u64::from(request_length);
    match offset.checked_add(length) {
        Some(end) if offset >= request_offset && end <= request_end => Ok((offset - request_offset) as usize),
        _ => Err(Error::Protocol(format!("chunk {offset}+{length} outside the request {request_offset}+{request_length}"))),
    }
}

fn apply_chunk(pending: &mut Pending, payload: ChunkPayload) -> Result<()> {
    match (payload, &mut pending.state) {
        (ChunkPayload::None, _) => {}
        (ChunkPayload::Hole { offset, length }, PendingState::Read { buffer, covered }) => {
            // Bytes below the buffer's length that no chunk wrote were
            // zeroed as a gap, so only a hole past the end needs zeros.
            let end = chunk_start(pending.offset, pending.length, offset, u64::from(length))? + length as usize;
            if end > buffer.len() {
                buffer.resize(end, 0);
            }
            *covered += u64::from(length);
        }
        (ChunkPayload::BlockStatus { context, extents }, PendingState::BlockStatus(chunks)) => {
            chunks.push((context, extents));
        }
        (ChunkPayload::Error { errno, message, .. }, _) => {
            pending.error.get_or_insert(Error::Server { errno, message });
        }
        (payload, _) => {
            return Err(Error::Protocol(format!("reply chunk {payload:?} does not fit its request")));
        }
    }
    Ok(())
}

fn complete(pending: Pending, info: &ExportInfo) {
    let result = match (pending.error, pending.state) {
        (Some(error), _) => Err(error),
        (None, PendingState::Read { buffer, covered }) if covered == u64::from(pending.length) => Ok(Completed::Read(buffer)),
        (None, PendingState::Read { covered, .. }) => {
            Err(Error::Protocol(format!("READ of {} bytes at {} answered with {covered} bytes", pending.length, pending.offset)))
        }
        (None, PendingState::BlockStatus(chunks)) => {
            let missing = info.contexts.iter().find(|(id, _)| !chunks.iter().any(|(got, _)| got == id));
            match missing {
                Some((_, name)) => Err(Error::Protocol(format!("BLOCK_STATUS reply without context {name}"))),
                None => Ok(Completed::BlockStatus(chunks)),
            }
        }
        (None, PendingState::Other) => Ok(Completed::Done),
    };
    let _ = pending.reply.send(result);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clips_the_last_extent() {
        let extents = vec![StatusExtent { length: 4096, flags: 0 }, StatusExtent { length: 1 << 20, flags: 3 }];
        assert_eq!(clip_extents(extents, 8192), vec![StatusExtent { length: 4096, flags: 0 }, StatusExtent { length: 4096, flags: 3 }]);
    }

    #[test]
    fn chunk_must_lie_inside_its_request() {
        assert_eq!(chunk_start(4096, 8192, 8192, 4096).unwrap(), 4096);
        assert!(chunk_start(4096, 8192, 0, 4096).is_err());
        assert!(chunk_start(4096, 8192, 8192, 8192).is_err());
        assert!(chunk_start(0, 10, u64::MAX, 2).is_err());
    }
}
