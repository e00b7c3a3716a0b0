//! What every client of a blockgate server shares, the image client and
//! the control client alike: which certificates to trust, requests whose
//! error status becomes a [`ClientError::Status`] with the server's
//! one-line message (control characters escaped), and answers read only
//! up to a bound.

use std::path::{Path, PathBuf};

use reqwest::Response;
use serde::de::DeserializeOwned;

use crate::error::{ClientError, Result, printable};

/// Most bytes of an answer read whole into memory: JSON (options,
/// checksum, checkpoints, a restore's summary, control API answers) or
/// the metrics text.
const MAX_BODY: usize = 1 << 20;
/// Most bytes of an error answer kept for its message.
const MAX_ERROR_BODY: usize = 4 << 10;

/// Which certificates to trust.
#[derive(Debug, Clone)]
pub enum Trust {
    /// The CA in this PEM file (for example the server's generated `ca.pem`).
    CaFile(PathBuf),
    /// The system's roots.
    System,
    /// Anything: for tests only, never the default.
    Insecure,
}

/// `builder` trusting `trust`.
pub(crate) fn trusting(builder: reqwest::ClientBuilder, trust: &Trust) -> Result<reqwest::ClientBuilder> {
    Ok(match trust {
        Trust::CaFile(path) => {
            let mut builder = builder.tls_built_in_root_certs(false);
            for certificate in pem_certificates(&read(path)?, path)? {
                builder = builder.add_root_certificate(reqwest::Certificate::from_der(&certificate)?);
            }
            builder
        }
        Trust::System => builder,
        Trust::Insecure => builder.danger_accept_invalid_certs(true),
    })
}

/// A file the user named, its error naming it.
pub(crate) fn read(path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|error| ClientError::Invalid(format!("reading {}: {error}", path.display())))
}

/// The certificates of a PEM file; an error when it holds none (a key, a
/// DER file, a typo'd path to something else), rather than trusting
/// nothing and failing later with a confusing TLS error.
pub(crate) fn pem_certificates(pem: &[u8], path: &Path) -> Result<Vec<Vec<u8>>> {
    let certificates: Vec<Vec<u8>> = rustls_pemfile::certs(&mut &pem[..])
        .map(|certificate| certificate.map(|der| der.to_vec()))
        .collect::<std::io::Result<_>>()
        .map_err(|error| ClientError::Invalid(format!("{} is not a PEM certificate file: {error}", path.display())))?;
    if certificates.is_empty() {
        return Err(ClientError::Invalid(format!("{} holds no PEM certificate (-----BEGIN CERTIFICATE-----)", path.display())));
    }
    Ok(certificates)
}

/// Sends a request and turns an error status into [`ClientError::Status`]
/// with the server's message.
pub(crate) async fn send(http: &reqwest::Client, request: reqwest::RequestBuilder) -> Result<Response> {
    let request = request.build()?;
    let (method, url) = (request.method().to_string(), request.url().to_string());
    let response = http.execute(request).await.map_err(|error| untrusted(error, &url))?;
    if response.status().is_success() {
        return Ok(response);
    }
    let status = response.status();
    let (body, cut) = read_at_most(response, MAX_ERROR_BODY).await.unwrap_or_default();
    let mut message = printable(String::from_utf8_lossy(&body).trim()).into_owned();
    if cut {
        message.push_str("...");
    }
    if message.is_empty() {
        message = "the server gave no reason".into();
    }
    Err(ClientError::Status { method, url, status, message })
}

/// A transport error, or [`ClientError::Untrusted`] when TLS refused the
/// server's certificate (rustls's error, somewhere in the chain).
fn untrusted(error: reqwest::Error, url: &str) -> ClientError {
    let mut next: Option<&(dyn std::error::Error + 'static)> = Some(&error);
    while let Some(cause) = next {
        if let Some(rustls::Error::InvalidCertificate(reason)) = cause.downcast_ref::<rustls::Error>() {
            return ClientError::Untrusted { url: url.to_string(), reason: refusal(reason) };
        }
        // An io::Error's source() skips the error it wraps: look inside.
        next = match cause.downcast_ref::<std::io::Error>() {
            Some(io) => io.get_ref().map(|inner| inner as &(dyn std::error::Error + 'static)),
            None => cause.source(),
        };
    }
    ClientError::Transport(error)
}

/// Why TLS refused a server's certificate, and what would help.
fn refusal(reason: &rustls::CertificateError) -> String {
    use rustls::CertificateError as Refused;
    match reason {
        Refused::UnknownIssuer | Refused::BadSignature => "the server's certificate is not signed by a CA this client trusts; pass the CA that signed it with --cacert FILE (a blockgate server logs its CA's path when it starts: ca.pem in its state directory)".to_string(),
        Refused::NotValidForName | Refused::NotValidForNameContext { .. } => "the server's certificate is not valid for the host name in the URL; use a name the certificate lists (blockgate's generated one lists localhost, 127.0.0.1, ::1 and the host's name), or give the server a certificate for this name (--tls-cert)".to_string(),
        Refused::Expired | Refused::ExpiredContext { .. } => "the server's certificate has expired; the server needs a new one (--tls-cert, then SIGHUP)".to_string(),
        Refused::NotValidYet | Refused::NotValidYetContext { .. } => "the server's certificate is not valid yet (check the clocks of both machines)".to_string(),
        Refused::Revoked => "the server's certificate is revoked".to_string(),
        other => format!("TLS refused the server's certificate ({other}); if its CA is not the system's, pass it with --cacert FILE"),
    }
}

/// Up to `limit` bytes of a body; true as well if it had more.
pub(crate) async fn read_at_most(mut response: Response, limit: usize) -> Result<(Vec<u8>, bool)> {
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await? {
        if body.len() + chunk.len() > limit {
            body.extend_from_slice(&chunk[..limit - body.len()]);
            return Ok((body, true));
        }
        body.extend_from_slice(&chunk);
    }
    Ok((body, false))
}

/// A whole answer of up to [`MAX_BODY`] bytes; an error when it has more.
pub(crate) async fn bounded_body(response: Response, what: &str) -> Result<Vec<u8>> {
    let (body, cut) = read_at_most(response, MAX_BODY).await?;
    if cut {
        return Err(ClientError::Protocol(format!("{what}: the answer is larger than {MAX_BODY} bytes")));
    }
    Ok(body)
}

/// A JSON answer, read up to [`MAX_BODY`] bytes.
pub(crate) async fn json<T: DeserializeOwned>(response: Response, what: &str) -> Result<T> {
    let body = bounded_body(response, what).await?;
    serde_json::from_slice(&body).map_err(|error| ClientError::Protocol(format!("{what}: {error}")))
}
