//! [`ControlClient`]: the server's control API (tickets, metrics, and the
//! VMs and backups to come), on the server's `--control-socket` (plain
//! HTTP on a unix socket, for software on the same host) or at its
//! `--control-listen` address (HTTPS, where this client proves who it is
//! with a certificate of a CA the server trusts). Each call is one
//! request, never retried, since a control request changes what the
//! server serves; an error status is a [`ClientError::Status`] with the
//! server's one-line message. [`ControlArgs`] are the command-line flags
//! that choose the way in.

use std::path::{Path, PathBuf};
use std::time::Duration;

use reqwest::StatusCode;
use serde_json::Value;

use crate::error::{ClientError, Result};
use crate::http::{Trust, bounded_body, pem_certificates, read, send, trusting};

/// A client of one server's control API.
#[derive(Clone)]
pub struct ControlClient {
    http: reqwest::Client,
    /// `https://HOST:PORT`, or `http://localhost` over the unix socket;
    /// request paths follow it.
    base: String,
}

impl ControlClient {
    /// A client of the control socket at `socket` (the server's
    /// `--control-socket`).
    pub fn over_unix_socket(socket: &Path) -> Result<ControlClient> {
        let http = reqwest::Client::builder().unix_socket(socket).read_timeout(READ_TIMEOUT).build()?;
        Ok(ControlClient { http, base: "http://localhost".into() })
    }

    /// A client of the control API at `url` (`https://HOST:PORT`, the
    /// server's `--control-listen`), trusting `trust` for the server's
    /// certificate and presenting the certificate in the PEM file `cert`
    /// with its private key in `key`.
    pub fn over_https(url: &str, trust: &Trust, cert: &Path, key: &Path) -> Result<ControlClient> {
        let base = url.strip_suffix('/').unwrap_or(url);
        let authority = base.strip_prefix("https://").unwrap_or_default();
        if authority.is_empty() || authority.contains(['/', '?', '#']) {
            return Err(ClientError::Invalid(format!("{url:?} is not a control API URL: expected https://HOST:PORT")));
        }
        let builder = reqwest::Client::builder()
            .use_rustls_tls()
            .identity(identity(cert, key)?)
            .connect_timeout(Duration::from_secs(30))
            .read_timeout(READ_TIMEOUT);
        Ok(ControlClient { http: trusting(builder, trust)?.build()?, base: base.to_string() })
    }

    /// `GET path`: its JSON answer.
    pub async fn get_json(&self, path: &str) -> Result<Value> {
        let response = send(&self.http, self.http.get(self.url(path)?)).await?;
        answer(response, path).await
    }

    /// `GET path`: its text answer (such as `/metrics`).
    pub async fn get_text(&self, path: &str) -> Result<String> {
        let response = send(&self.http, self.http.get(self.url(path)?)).await?;
        String::from_utf8(bounded_body(response, path).await?)
            .map_err(|_| ClientError::Protocol(format!("{path}: the answer is not UTF-8")))
    }

    /// `PUT path` with a JSON body (such as a ticket): the answer's JSON,
    /// `null` when it has no body.
    pub async fn put_json(&self, path: &str, body: &Value) -> Result<Value> {
        let response = send(&self.http, self.http.put(self.url(path)?).json(body)).await?;
        answer(response, path).await
    }

    /// `POST path` with a JSON body: the success status (such as 201) and the
    /// answer's JSON, `null` when it has no body.
    pub async fn post_json(&self, path: &str, body: &Value) -> Result<(StatusCode, Value)> {
        let response = send(&self.http, self.http.post(self.url(path)?).json(body)).await?;
        let status = response.status();
        Ok((status, answer(response, path).await?))
    }

    /// `DELETE path`.
    pub async fn delete(&self, path: &str) -> Result<()> {
        send(&self.http, self.http.delete(self.url(path)?)).await?;
        Ok(())
    }

    fn url(&self, path: &str) -> Result<String> {
        if !path.starts_with('/') {
            return Err(ClientError::Invalid(format!("{path:?} is not a control API path (such as /tickets/ID)")));
        }
        Ok(format!("{}{path}", self.base))
    }
}

/// Time an answer may take to come (a ticket DELETE waits for transfers
/// to stop, up to the server's `--cancel-timeout`).
const READ_TIMEOUT: Duration = Duration::from_secs(120);

/// A JSON answer; `null` for an empty body.
async fn answer(response: reqwest::Response, path: &str) -> Result<Value> {
    let body = bounded_body(response, path).await?;
    if body.is_empty() {
        return Ok(Value::Null);
    }
    serde_json::from_slice(&body).map_err(|error| ClientError::Protocol(format!("{path}: {error}")))
}

/// The certificate in `cert` and the key in `key` (PEM files), each
/// checked, so that a wrong file is named rather than found out in a
/// failed handshake.
fn identity(cert: &Path, key: &Path) -> Result<reqwest::Identity> {
    let mut pem = read(cert)?;
    pem_certificates(&pem, cert)?;
    let key_pem = read(key)?;
    match rustls_pemfile::private_key(&mut &key_pem[..]) {
        Ok(Some(_)) => {}
        Ok(None) => {
            return Err(ClientError::Invalid(format!(
                "{} holds no PEM private key (-----BEGIN PRIVATE KEY-----, RSA or EC)",
                key.display()
            )));
        }
        Err(error) => return Err(ClientError::Invalid(format!("{} is not a PEM key file: {error}", key.display()))),
    }
    pem.push(b'\n');
    pem.extend_from_slice(&key_pem);
    Ok(reqwest::Identity::from_pem(&pem)?)
}

/// Command-line flags that reach a server's control API: its control
/// socket on this host, or its `--control-listen` address from another
/// with a client certificate (the server's certificate is checked against
/// the CA of `--cacert`, else the system's). The server has no default
/// control socket, so one of the two is required.
#[derive(Debug, Clone, clap::Args)]
pub struct ControlArgs {
    /// The server's control socket (its --control-socket).
    #[arg(long, value_name = "PATH", required_unless_present = "control", conflicts_with = "control")]
    pub control_socket: Option<PathBuf>,
    /// The server's control API over TLS (its --control-listen),
    /// https://HOST:PORT; needs --cert and --key.
    #[arg(long, value_name = "URL", requires_all = ["cert", "key"])]
    pub control: Option<String>,
    /// This client's certificate (PEM), signed by a CA of the server's
    /// --client-ca.
    #[arg(long, value_name = "FILE", requires = "control")]
    pub cert: Option<PathBuf>,
    /// The private key (PEM) of --cert.
    #[arg(long, value_name = "FILE", requires = "control")]
    pub key: Option<PathBuf>,
}

impl ControlArgs {
    /// The client the flags name, trusting `trust` for a server over TLS.
    pub fn client(&self, trust: &Trust) -> Result<ControlClient> {
        match (&self.control_socket, &self.control, &self.cert, &self.key) {
            (Some(socket), None, None, None) => ControlClient::over_unix_socket(socket),
            (None, Some(url), Some(cert), Some(key)) => ControlClient::over_https(url, trust, cert, key),
            _ => Err(ClientError::Invalid(
                "give --control-socket PATH, or --control https://HOST:PORT with --cert FILE and --key FILE".into(),
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Parser)]
    struct Command {
        #[command(flatten)]
        control: ControlArgs,
    }

    fn parse(words: &[&str]) -> std::result::Result<ControlArgs, String> {
        let words = std::iter::once("blockgate").chain(words.iter().copied());
        Command::try_parse_from(words).map(|command| command.control).map_err(|error| error.to_string())
    }

    #[test]
    fn a_command_names_a_socket_or_a_url_with_a_certificate() {
        assert_eq!(parse(&["--control-socket", "/run/c.sock"]).unwrap().control_socket, Some(PathBuf::from("/run/c.sock")));
        let remote = parse(&["--control", "https://h:54323", "--cert", "c.pem", "--key", "c.key"]).unwrap();
        assert_eq!(
            (remote.control.as_deref(), remote.cert, remote.key),
            (Some("https://h:54323"), Some("c.pem".into()), Some("c.key".into()))
        );
        for (words, says) in [
            (&[][..], "--control-socket"),
            (&["--control", "https://h:54323"][..], "--cert"),
            (&["--control", "https://h:54323", "--cert", "c.pem"][..], "--key"),
            (&["--control-socket", "c.sock", "--control", "https://h:1", "--cert", "c", "--key", "k"][..], "cannot be used with"),
            (&["--control-socket", "c.sock", "--cert", "c.pem"][..], "--control"),
        ] {
            let error = parse(words).unwrap_err();
            assert!(error.contains(says), "{words:?}: {error}");
        }
    }

    #[test]
    fn a_url_is_https_host_port_and_the_files_must_hold_what_they_are_for() {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
        std::fs::write(&cert, "not a certificate\n").unwrap();
        std::fs::write(&key, "not a key\n").unwrap();
        let over =
            |url: &str, cert: &Path, key: &Path| ControlClient::over_https(url, &Trust::System, cert, key).err().map(|e| e.to_string());
        for url in ["http://h:54323", "https://", "https://h:54323/tickets", "h:54323"] {
            let error = over(url, &cert, &key).unwrap();
            assert!(error.contains("expected https://HOST:PORT"), "{url}: {error}");
        }
        let error = over("https://h:54323", &cert, &key).unwrap();
        assert!(error.contains("cert.pem holds no PEM certificate"), "{error}");
        let error = over("https://h:54323", &dir.path().join("missing.pem"), &key).unwrap();
        assert!(error.contains("reading") && error.contains("missing.pem"), "{error}");
    }
}
