//! Fixed-newstyle negotiation: structured replies, metadata contexts (list
//! and set) and `NBD_OPT_GO` with block sizes. Runs once per connection
//! before transmission and yields what the export is ([`ExportInfo`]).

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::error::{Error, Result};
use crate::reply::{be_u16, be_u32, be_u64};
use crate::wire::{FLAG_FIXED_NEWSTYLE, FLAG_NO_ZEROES, IHAVEOPT, NBD_MAGIC, OPTION_REPLY_MAGIC, info, opt, rep};

/// Largest option reply payload accepted; real replies are tiny.
const MAX_OPTION_REPLY: u32 = 1 << 20;

/// What to ask for while negotiating.
#[derive(Debug, Clone, Default)]
pub struct ConnectOptions {
    /// Metadata contexts to select for BLOCK_STATUS, by exact name
    /// (`base:allocation`, `qemu:allocation-depth`, `qemu:dirty-bitmap:NAME`).
    pub meta_contexts: Vec<String>,
    /// Queries for `NBD_OPT_LIST_META_CONTEXT` (for example
    /// `qemu:dirty-bitmap:` to discover bitmaps); results land in
    /// [`ExportInfo::listed_contexts`].
    pub list_meta_contexts: Vec<String>,
}

/// Block size constraints of the export.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockSizes {
    /// Minimum (alignment) in bytes.
    pub minimum: u32,
    /// Preferred size in bytes.
    pub preferred: u32,
    /// Maximum payload of one READ or WRITE.
    pub maximum: u32,
}

impl Default for BlockSizes {
    /// The protocol's defaults when the server sends no `NBD_INFO_BLOCK_SIZE`.
    fn default() -> Self {
        BlockSizes { minimum: 1, preferred: 4096, maximum: 32 << 20 }
    }
}

/// What negotiation learned about the export.
#[derive(Debug, Clone, Default)]
pub struct ExportInfo {
    /// Export size in bytes.
    pub size: u64,
    /// Transmission flags (`wire::tflag`).
    pub flags: u16,
    /// Block size constraints.
    pub block_sizes: BlockSizes,
    /// Selected metadata contexts: server-assigned id and name.
    pub contexts: Vec<(u32, String)>,
    /// Names returned by `NBD_OPT_LIST_META_CONTEXT`.
    pub listed_contexts: Vec<String>,
}

impl ExportInfo {
    /// True if the given transmission flag is set.
    pub fn has_flag(&self, flag: u16) -> bool {
        self.flags & flag != 0
    }

    /// The id of a selected context.
    pub fn context_id(&self, name: &str) -> Option<u32> {
        self.contexts.iter().find(|(_, n)| n == name).map(|(id, _)| *id)
    }
}

/// Reads a server's greeting and leaves cleanly (`NBD_OPT_ABORT`): a
/// readiness check that the server does not take, and log, for a client
/// that failed (qemu 7.2 warns of a connection closed before its options).
pub async fn greet_and_leave<S>(stream: &mut S) -> Result<()>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut greeting = [0u8; 18];
    stream.read_exact(&mut greeting).await?;
    if be_u64(&greeting[0..8]) != NBD_MAGIC || be_u64(&greeting[8..16]) != IHAVEOPT {
        return Err(Error::Protocol("not a newstyle NBD server".into()));
    }
    let client_flags = u32::from(FLAG_FIXED_NEWSTYLE | (be_u16(&greeting[16..18]) & FLAG_NO_ZEROES));
    stream.write_all(&client_flags.to_be_bytes()).await?;
    send_option(stream, opt::ABORT, &[]).await?;
    // The server acknowledges, or just closes: either is a goodbye.
    let _ = read_option_reply(stream, opt::ABORT).await;
    Ok(())
}

/// Negotiates `export` on a fresh connection.
pub async fn negotiate<S>(stream: &mut S, export: &str, options: &ConnectOptions) -> Result<ExportInfo>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut greeting = [0u8; 18];
    stream.read_exact(&mut greeting).await?;
    if be_u64(&greeting[0..8]) != NBD_MAGIC {
        return Err(Error::Protocol("not an NBD server (bad NBDMAGIC)".into()));
    }
    if be_u64(&greeting[8..16]) != IHAVEOPT {
        return Err(Error::Protocol("server speaks oldstyle NBD; newstyle is required".into()));
    }
    let server_flags = be_u16(&greeting[16..18]);
    if server_flags & FLAG_FIXED_NEWSTYLE == 0 {
        return Err(Error::Protocol("server does not offer fixed newstyle negotiation".into()));
    }
    let client_flags = u32::from(FLAG_FIXED_NEWSTYLE | (server_flags & FLAG_NO_ZEROES));
    stream.write_all(&client_flags.to_be_bytes()).await?;

    send_option(stream, opt::STRUCTURED_REPLY, &[]).await?;
    expect_ack(stream, opt::STRUCTURED_REPLY).await?;

    let mut info = ExportInfo::default();
    if !options.list_meta_contexts.is_empty() {
        send_option(stream, opt::LIST_META_CONTEXT, &context_request(export, &options.list_meta_contexts)).await?;
        info.listed_contexts = read_contexts(stream, opt::LIST_META_CONTEXT).await?.into_iter().map(|(_, name)| name).collect();
    }
    if !options.meta_contexts.is_empty() {
        send_option(stream, opt::SET_META_CONTEXT, &context_request(export, &options.meta_contexts)).await?;
        info.contexts = read_contexts(stream, opt::SET_META_CONTEXT).await?;
    }

    let mut go = Vec::with_capacity(export.len() + 8);
    go.extend((export.len() as u32).to_be_bytes());
    go.extend(export.as_bytes());
    go.extend(1u16.to_be_bytes());
    go.extend(info::BLOCK_SIZE.to_be_bytes());
    send_option(stream, opt::GO, &go).await?;
    let mut saw_export = false;
    loop {
        let (reply, data) = read_option_reply(stream, opt::GO).await?;
        match reply {
            rep::ACK => break,
            rep::INFO if data.len() >= 2 => match be_u16(&data) {
                info::EXPORT if data.len() == 12 => {
                    info.size = be_u64(&data[2..10]);
                    info.flags = be_u16(&data[10..12]);
                    saw_export = true;
                }
                info::BLOCK_SIZE if data.len() == 14 => {
                    let sizes =
                        BlockSizes { minimum: be_u32(&data[2..6]), preferred: be_u32(&data[6..10]), maximum: be_u32(&data[10..14]) };
                    if sizes.minimum == 0 || sizes.maximum < sizes.minimum || !sizes.minimum.is_power_of_two() {
                        return Err(Error::Protocol(format!("invalid block sizes {sizes:?}")));
                    }
                    info.block_sizes = sizes;
                }
                info::EXPORT | info::BLOCK_SIZE => {
                    return Err(Error::Protocol(format!("NBD_REP_INFO of {} bytes", data.len())));
                }
                _ => {}
            },
            rep::INFO => return Err(Error::Protocol("empty NBD_REP_INFO".into())),
            other => return Err(Error::Protocol(format!("unexpected reply {other} to NBD_OPT_GO"))),
        }
    }
    if !saw_export {
        return Err(Error::Protocol("NBD_OPT_GO finished without NBD_INFO_EXPORT".into()));
    }
    Ok(info)
}

fn context_request(export: &str, queries: &[String]) -> Vec<u8> {
    let mut data = Vec::new();
    data.extend((export.len() as u32).to_be_bytes());
    data.extend(export.as_bytes());
    data.extend((queries.len() as u32).to_be_bytes());
    for query in queries {
        data.extend((query.len() as u32).to_be_bytes());
        data.extend(query.as_bytes());
    }
    data
}

async fn send_option<S: AsyncWrite + Unpin>(stream: &mut S, option: u32, data: &[u8]) -> Result<()> {
    let mut message = Vec::with_capacity(16 + data.len());
    message.extend(IHAVEOPT.to_be_bytes());
    message.extend(option.to_be_bytes());
    message.extend((data.len() as u32).to_be_bytes());
    message.extend(data);
    stream.write_all(&message).await?;
    stream.flush().await?;
    Ok(())
}

/// Reads one option reply; error replies become [`Error::OptionRefused`].
async fn read_option_reply<S: AsyncRead + Unpin>(stream: &mut S, option: u32) -> Result<(u32, Vec<u8>)> {
    let mut header = [0u8; 20];
    stream.read_exact(&mut header).await?;
    if be_u64(&header[0..8]) != OPTION_REPLY_MAGIC {
        return Err(Error::Protocol("bad option reply magic".into()));
    }
    let replied_to = be_u32(&header[8..12]);
    if replied_to != option {
        return Err(Error::Protocol(format!("reply to option {replied_to} while waiting for {}", opt::name(option))));
    }
    let reply = be_u32(&header[12..16]);
    let length = be_u32(&header[16..20]);
    if length > MAX_OPTION_REPLY {
        return Err(Error::Protocol(format!("option reply of {length} bytes")));
    }
    let mut data = vec![0u8; length as usize];
    stream.read_exact(&mut data).await?;
    if reply & rep::ERROR_BIT != 0 {
        return Err(Error::OptionRefused {
            option: opt::name(option),
            reason: rep::error_name(reply),
            message: String::from_utf8_lossy(&data).into_owned(),
        });
    }
    Ok((reply, data))
}

async fn expect_ack<S: AsyncRead + Unpin>(stream: &mut S, option: u32) -> Result<()> {
    match read_option_reply(stream, option).await? {
        (rep::ACK, _) => Ok(()),
        (other, _) => Err(Error::Protocol(format!("unexpected reply {other} to {}", opt::name(option)))),
    }
}

async fn read_contexts<S: AsyncRead + Unpin>(stream: &mut S, option: u32) -> Result<Vec<(u32, String)>> {
    let mut contexts = Vec::new();
    loop {
        match read_option_reply(stream, option).await? {
            (rep::ACK, _) => return Ok(contexts),
            (rep::META_CONTEXT, data) if data.len() >= 4 => {
                let name =
                    String::from_utf8(data[4..].to_vec()).map_err(|_| Error::Protocol("metadata context name is not UTF-8".into()))?;
                contexts.push((be_u32(&data), name));
            }
            (other, _) => {
                return Err(Error::Protocol(format!("unexpected reply {other} to {}", opt::name(option))));
            }
        }
    }
}
