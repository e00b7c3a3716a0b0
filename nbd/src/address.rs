//! Where an NBD export lives: a unix socket or a TCP host and port, plus
//! the export name. Parses the URI forms blockgate accepts: the standard
//! `nbd://HOST[:PORT]/EXPORT` and `nbd+unix:///EXPORT?socket=PATH`, and the
//! older imageio forms `nbd:unix:PATH[:exportname=NAME]` and
//! `nbd:HOST:PORT[:exportname=NAME]`.

use std::fmt;
use std::path::PathBuf;

use crate::error::{Error, Result};

/// The IANA port of NBD.
pub const DEFAULT_PORT: u16 = 10809;

/// A socket to connect to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    /// A unix domain socket.
    Unix(PathBuf),
    /// A TCP host name or address and port.
    Tcp {
        /// Host name or IP address (no brackets).
        host: String,
        /// Port.
        port: u16,
    },
}

/// An export on an NBD server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Address {
    /// The socket.
    pub endpoint: Endpoint,
    /// The export name ("" for the default export).
    pub export: String,
}

impl Address {
    /// A unix-socket address.
    pub fn unix(path: impl Into<PathBuf>, export: impl Into<String>) -> Address {
        Address { endpoint: Endpoint::Unix(path.into()), export: export.into() }
    }

    /// Parses any of the accepted URI forms.
    pub fn parse(uri: &str) -> Result<Address> {
        let invalid = |reason: &str| Error::InvalidUri { uri: uri.to_string(), reason: reason.to_string() };
        if let Some(rest) = uri.strip_prefix("nbd+unix://") {
            let (path, query) = rest.split_once('?').ok_or_else(|| invalid("missing ?socket=PATH"))?;
            if !path.is_empty() && !path.starts_with('/') {
                return Err(invalid("nbd+unix:// takes no host"));
            }
            let export = path.strip_prefix('/').unwrap_or("").to_string();
            let socket = query
                .split('&')
                .find_map(|pair| pair.strip_prefix("socket="))
                .filter(|socket| !socket.is_empty())
                .ok_or_else(|| invalid("missing ?socket=PATH"))?;
            return Ok(Address::unix(socket, export));
        }
        if let Some(rest) = uri.strip_prefix("nbd://") {
            let (authority, export) = match rest.split_once('/') {
                Some((authority, export)) => (authority, export.to_string()),
                None => (rest, String::new()),
            };
            let (host, port) = split_host_port(authority).ok_or_else(|| invalid("bad HOST[:PORT]"))?;
            return Ok(Address { endpoint: Endpoint::Tcp { host, port: port.unwrap_or(DEFAULT_PORT) }, export });
        }
        if let Some(rest) = uri.strip_prefix("nbd:unix:") {
            let (path, export) = split_exportname(rest);
            if path.is_empty() {
                return Err(invalid("missing socket path"));
            }
            return Ok(Address::unix(path, export));
        }
        if let Some(rest) = uri.strip_prefix("nbd:") {
            let (authority, export) = split_exportname(rest);
            let (host, port) = authority
                .rsplit_once(':')
                .and_then(|(host, port)| Some((host, port.parse::<u16>().ok()?)))
                .filter(|(host, _)| !host.is_empty())
                .ok_or_else(|| invalid("expected nbd:HOST:PORT"))?;
            let host = host.trim_start_matches('[').trim_end_matches(']').to_string();
            return Ok(Address { endpoint: Endpoint::Tcp { host, port }, export });
        }
        Err(invalid("not an NBD URI (nbd://, nbd+unix://, nbd:unix:, nbd:HOST:PORT)"))
    }
}

fn split_exportname(rest: &str) -> (&str, String) {
    match rest.split_once(":exportname=") {
        Some((before, export)) => (before, export.to_string()),
        None => (rest, String::new()),
    }
}

fn split_host_port(authority: &str) -> Option<(String, Option<u16>)> {
    if authority.is_empty() {
        return None;
    }
    if let Some(rest) = authority.strip_prefix('[') {
        let (host, after) = rest.split_once(']')?;
        let port = match after.strip_prefix(':') {
            Some(port) => Some(port.parse().ok()?),
            None if after.is_empty() => None,
            None => return None,
        };
        return Some((host.to_string(), port));
    }
    match authority.split_once(':') {
        Some((host, port)) if !host.is_empty() => Some((host.to_string(), Some(port.parse().ok()?))),
        Some(_) => None,
        None => Some((authority.to_string(), None)),
    }
}

impl fmt::Display for Address {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.endpoint {
            Endpoint::Unix(path) => write!(f, "nbd+unix:///{}?socket={}", self.export, path.display()),
            Endpoint::Tcp { host, port } if host.contains(':') => write!(f, "nbd://[{host}]:{port}/{}", self.export),
            Endpoint::Tcp { host, port } => write!(f, "nbd://{host}:{port}/{}", self.export),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_form() {
        assert_eq!(Address::parse("nbd+unix:///sda?socket=/run/nbd.sock").unwrap(), Address::unix("/run/nbd.sock", "sda"));
        assert_eq!(Address::parse("nbd+unix://?socket=/s").unwrap(), Address::unix("/s", ""));
        assert_eq!(Address::parse("nbd:unix:/tmp/s:exportname=disk").unwrap(), Address::unix("/tmp/s", "disk"));
        assert_eq!(Address::parse("nbd:unix:/tmp/s").unwrap(), Address::unix("/tmp/s", ""));
        let tcp = |host: &str, port, export: &str| Address { endpoint: Endpoint::Tcp { host: host.into(), port }, export: export.into() };
        assert_eq!(Address::parse("nbd://example.com/disk").unwrap(), tcp("example.com", 10809, "disk"));
        assert_eq!(Address::parse("nbd://[::1]:2000/").unwrap(), tcp("::1", 2000, ""));
        assert_eq!(Address::parse("nbd:localhost:10810").unwrap(), tcp("localhost", 10810, ""));
        assert_eq!(Address::parse("nbd:10.0.0.1:10810:exportname=x").unwrap(), tcp("10.0.0.1", 10810, "x"));
    }

    #[test]
    fn rejects_malformed_uris() {
        for uri in ["", "http://x", "nbd+unix:///x", "nbd://", "nbd://host:port/", "nbd:unix:", "nbd:host", "nbd::10"] {
            assert!(Address::parse(uri).is_err(), "{uri} should be rejected");
        }
    }

    #[test]
    fn display_round_trips() {
        for uri in ["nbd+unix:///e?socket=/s", "nbd://h:1/e", "nbd://[::1]:2/"] {
            assert_eq!(Address::parse(uri).unwrap().to_string(), uri);
        }
    }
}
