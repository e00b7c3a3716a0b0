//! The server's command line: listeners, TLS files, the state directory,
//! and the `--image ID=SOURCE[,OPTION]...` specs that become tickets, from
//! flags and from a `--config` TOML file whose keys are the flags' names
//! (flags given on the command line override it). Parsing only; nothing
//! here opens an image or starts a process.

use std::path::PathBuf;

use blockgate_nbd::Address;
pub use blockgate_protocol::ticket::ImageFormat;
use clap::Parser;

/// Command-line arguments of `blockgate-server`.
#[derive(Debug, Clone, Parser)]
#[command(
    name = "blockgate-server",
    version,
    args_override_self = true,
    about = "HTTPS disk-image transfer server over NBD: qemu-storage-daemon for local images, or any NBD server (imageio-compatible)",
    after_help = "Example:\n  blockgate-server --image demo=./demo.qcow2,size=1G\n  curl --cacert ~/.local/state/blockgate/ca.pem https://localhost:54322/images/demo -o demo.raw"
)]
// The fields' docs are the --help text, where brackets mean "optional"
// (`ID=SOURCE[,ro]`), not links.
#[allow(rustdoc::broken_intra_doc_links)]
pub struct Args {
    /// A TOML file of settings: each key is a flag's name (`listen`,
    /// `image`, `allow-dir`, `max-readers`...), repeatable flags take
    /// arrays. Flags on the command line override single values and add
    /// to repeatable ones.
    #[arg(long, value_name = "FILE.toml")]
    pub config: Option<PathBuf>,
    /// Address of the TLS listener: HOST:PORT, where HOST is an IP address
    /// or a name (every address it resolves to is bound). The default is
    /// this host only; `[::]:54322` listens on every interface.
    #[arg(long, default_value = "localhost:54322", value_name = "HOST:PORT")]
    pub listen: String,
    /// PEM certificate chain; without it a self-signed CA and certificate
    /// are made (and reused) in the state directory.
    #[arg(long, requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(long, requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Directory for the generated certificates, checkpoint and restore
    /// records, and VM backup jobs' files
    /// [default: $XDG_STATE_HOME/blockgate, else ~/.local/state/blockgate].
    #[arg(long)]
    pub state_dir: Option<PathBuf>,
    /// An image to serve: ID=SOURCE[,ro][,bitmap=NAME|,dirty][,size=SIZE][,sparse][,format=raw|qcow2].
    /// `dirty` uses the one dirty bitmap the image has.
    /// SOURCE is a file path (served through a qemu-storage-daemon child) or an NBD URI
    /// (nbd://HOST[:PORT]/EXPORT, nbd+unix:///EXPORT?socket=PATH,
    /// nbd:unix:PATH[:exportname=NAME]). Repeatable.
    #[arg(long = "image", value_name = "ID=SOURCE[,OPTION]...", value_parser = parse_image_spec)]
    pub images: Vec<ImageSpec>,
    /// A directory whose images `file://` ticket urls may name (after
    /// symlinks and `..` are resolved). Repeatable; without it, `file://`
    /// tickets are refused.
    #[arg(long = "allow-dir", value_name = "DIR")]
    pub allow_dirs: Vec<PathBuf>,
    /// A ticket JSON file (imageio's format) to serve from the start. Repeatable.
    #[arg(long = "ticket", value_name = "FILE.json")]
    pub tickets: Vec<PathBuf>,
    /// Serve the data API without TLS on this unix socket too (mode 0660).
    #[arg(long, value_name = "PATH")]
    pub local_socket: Option<PathBuf>,
    /// Serve the control API (tickets) on this unix socket (mode 0660).
    #[arg(long, value_name = "PATH")]
    pub control_socket: Option<PathBuf>,
    /// Serve the control API on this TCP address too (HOST:PORT, every
    /// address a name resolves to), over TLS with the server's certificate,
    /// to clients with a certificate signed by a CA of --client-ca only.
    #[arg(long, value_name = "HOST:PORT")]
    pub control_listen: Option<String>,
    /// PEM file of the CA certificates that sign the clients of
    /// --control-listen: a client without a certificate that chains to one
    /// of them fails the TLS handshake.
    #[arg(long, value_name = "FILE")]
    pub client_ca: Option<PathBuf>,
    /// Back up running VMs through libvirt at this URI (the control API's
    /// `/vms` routes); `--libvirt` alone means qemu:///system. Without it
    /// the VM routes answer 503.
    #[arg(long, value_name = "URI", num_args = 0..=1, default_missing_value = "qemu:///system")]
    pub libvirt: Option<String>,
    /// Where VM backup jobs keep their scratch files and NBD sockets, a
    /// directory per job [default: STATE_DIR/vm-backups]. The VMs' qemu
    /// must be able to reach it: each job's directory is given to the owner
    /// of the VM's disk (qemu's user), but the directories above it must
    /// let that user through.
    #[arg(long, value_name = "DIR")]
    pub vm_scratch_dir: Option<PathBuf>,
    /// Serve `GET /metrics` (Prometheus, plain HTTP) on this TCP address
    /// too; the control socket and --control-listen always serve it.
    #[arg(long, value_name = "HOST:PORT")]
    pub metrics_listen: Option<String>,
    /// Requests that may read one ticket at once (503 past it).
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub max_readers: u32,
    /// Requests that may write one ticket at once (503 past it).
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub max_writers: u32,
    /// Open connections on the TLS listener (the local socket has a budget
    /// of the same size of its own). A new connection past it closes the
    /// least recently active idle one; when none is idle it is refused.
    #[arg(long, default_value_t = 512, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub max_connections: u32,
    /// Open connections on the TLS listener from one client address. A new
    /// one past it closes the address's least recently active idle
    /// connection; when none is idle it is refused.
    #[arg(long, default_value_t = 128, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub max_connections_per_address: u32,
    /// Seconds a connection may stay idle: to finish its TLS handshake and
    /// send a request head, to send the next one after a response, or to
    /// open a stream on HTTP/2.
    #[arg(long, default_value_t = 30, value_name = "SECONDS", value_parser = clap::value_parser!(u64).range(1..=86400))]
    pub header_timeout: u64,
    /// Seconds a response may wait for the client to take more of it
    /// before it is cut off (and its reader slot freed).
    #[arg(long, default_value_t = 60, value_name = "SECONDS", value_parser = clap::value_parser!(u64).range(1..=86400))]
    pub send_timeout: u64,
    /// Seconds a request body may stall before the request fails.
    #[arg(long, default_value_t = 60, value_name = "SECONDS", value_parser = clap::value_parser!(u64).range(1..=86400))]
    pub body_timeout: u64,
    /// Seconds between SIGTERM and the listeners closing, during which
    /// `/healthz` answers 503 while requests are still served, so a load
    /// balancer stops sending work before connections are refused.
    #[arg(long, default_value_t = 0, value_name = "SECONDS", value_parser = clap::value_parser!(u64).range(0..=3600))]
    pub shutdown_delay: u64,
    /// Seconds a ticket DELETE waits for running operations (else 409).
    #[arg(long, default_value_t = 30, value_name = "SECONDS", value_parser = clap::value_parser!(u64).range(0..=86400))]
    pub cancel_timeout: u64,
    /// Seconds an NBD request may wait for its reply; past it the request
    /// fails (502) and its connection is replaced.
    #[arg(long, default_value_t = 60, value_name = "SECONDS", value_parser = clap::value_parser!(u64).range(1..=86400))]
    pub nbd_timeout: u64,
    /// Checkpoints one image may have (a 409 past it: delete the oldest
    /// first). Each is a qcow2 bitmap that every write updates.
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..=256))]
    pub max_checkpoints: u32,
    /// NBD connections per image; each one carries many requests at once.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..=16))]
    pub nbd_connections: u32,
    /// Log filter (error, warn, info, debug, trace, or a tracing filter).
    #[arg(long, default_value = "info", env = "BLOCKGATE_LOG")]
    pub log: String,
    /// Log lines as text, or as one JSON object each (for log shippers).
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}

impl Args {
    /// Refuses what clap cannot see alone: two `--image` with one id, and
    /// `--control-listen` without `--client-ca` (or the reverse).
    pub fn check(&self) -> Result<(), String> {
        match (&self.control_listen, &self.client_ca) {
            (Some(_), None) => {
                return Err("--control-listen needs --client-ca FILE: the control API hands out tickets, so over TCP it serves only \
                            clients whose certificate a CA in FILE signed"
                    .into());
            }
            (None, Some(_)) => {
                return Err("--client-ca is for the clients of --control-listen, which is not given (the data API needs no client \
                            certificate: its credential is the ticket)"
                    .into());
            }
            _ => {}
        }
        let mut seen = std::collections::HashSet::new();
        for spec in &self.images {
            if !seen.insert(spec.id.as_str()) {
                return Err(format!("--image id {:?} is given twice; each image needs its own id", spec.id));
            }
        }
        Ok(())
    }

    /// The state directory, resolved from the flag or the environment.
    pub fn state_dir(&self) -> PathBuf {
        if let Some(dir) = &self.state_dir {
            return dir.clone();
        }
        match std::env::var_os("XDG_STATE_HOME").filter(|value| !value.is_empty()) {
            Some(state) => PathBuf::from(state).join("blockgate"),
            None => {
                let home = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("."));
                home.join(".local/state/blockgate")
            }
        }
    }
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// One line of text each (colour only at a terminal).
    Text,
    /// One JSON object per line, with the span's fields.
    Json,
}

/// The command line with the settings of its `--config FILE` (if any)
/// put first, as flags, so that the real flags come after and win.
pub fn with_config_file(arguments: Vec<std::ffi::OsString>) -> Result<Vec<std::ffi::OsString>, String> {
    let mut config = None;
    let mut words = arguments.iter().skip(1);
    while let Some(word) = words.next() {
        let word = word.to_string_lossy();
        if word == "--" {
            break;
        }
        if word == "--config" {
            config = words.next().map(PathBuf::from);
        } else if let Some(path) = word.strip_prefix("--config=") {
            config = Some(PathBuf::from(path));
        }
    }
    let Some(path) = config else { return Ok(arguments) };
    let flags = read_config(&path).map_err(|error| format!("--config {}: {error}", path.display()))?;
    let mut combined = arguments[..1].to_vec();
    combined.extend(flags.into_iter().map(std::ffi::OsString::from));
    combined.extend(arguments[1..].iter().cloned());
    Ok(combined)
}

/// The flags of a settings file, which only its owner may change: one
/// that group or others may write is refused, as ssh refuses such a
/// config (anyone who can write it chooses what the server serves).
fn read_config(path: &std::path::Path) -> Result<Vec<String>, String> {
    use std::os::unix::fs::PermissionsExt;
    let file = std::fs::File::open(path).map_err(|error| error.to_string())?;
    let mode = file.metadata().map_err(|error| error.to_string())?.permissions().mode();
    if mode & 0o022 != 0 {
        return Err(format!("the file is writable by group or others (mode {:o}); make it the owner's only: chmod go-w", mode & 0o7777));
    }
    config_flags(&std::io::read_to_string(file).map_err(|error| error.to_string())?)
}

/// The flags a TOML settings file stands for, each value checked as its
/// flag would be, so an error names the key (clap's own names only the
/// flag).
fn config_flags(text: &str) -> Result<Vec<String>, String> {
    use clap::CommandFactory;
    use clap::error::ErrorKind;
    let table: toml::Table = text.parse().map_err(|error: toml::de::Error| error.to_string())?;
    let command = Args::command();
    let mut flags = Vec::new();
    for (key, value) in table {
        let name = key.replace('_', "-");
        let known = command.get_arguments().any(|argument| argument.get_long() == Some(name.as_str()));
        if !known || name == "config" {
            return Err(format!("unknown key {key:?}: keys are the flags' names, such as listen, image or allow-dir"));
        };
        let scalar = |value: &toml::Value| {
            let text = match value {
                toml::Value::String(text) => text.clone(),
                toml::Value::Integer(number) => number.to_string(),
                other => return Err(format!("key {key:?}: expected a string or a number, not a {}", other.type_str())),
            };
            // The flag alone: only an error of its value counts here (one
            // flag may require another that a later key gives).
            let alone = command.clone().try_get_matches_from(["blockgate-server", &format!("--{name}"), &text]);
            match alone {
                Err(error) if matches!(error.kind(), ErrorKind::InvalidValue | ErrorKind::ValueValidation) => {
                    Err(format!("key {key:?}: {}", error.to_string().lines().next().unwrap_or_default().trim_start_matches("error: ")))
                }
                _ => Ok(text),
            }
        };
        match &value {
            toml::Value::Array(items) => {
                for item in items {
                    flags.extend([format!("--{name}"), scalar(item)?]);
                }
            }
            value => flags.extend([format!("--{name}"), scalar(value)?]),
        }
    }
    Ok(flags)
}

/// Where an image's data comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ImageSource {
    /// A local file the server exports through its own qemu-storage-daemon child.
    File(PathBuf),
    /// An NBD export that is already running.
    Nbd(Address),
}

/// One `--image` argument.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageSpec {
    /// Ticket id in URLs.
    pub id: String,
    /// Data source.
    pub source: ImageSource,
    /// Refuse writes.
    pub read_only: bool,
    /// Dirty bitmap for `context=dirty`.
    pub bitmap: Option<String>,
    /// Use the one bitmap the image has (when `bitmap` names none).
    pub dirty: bool,
    /// Create the file with this size if it is missing.
    pub create_size: Option<u64>,
    /// Zeroing may deallocate.
    pub sparse: bool,
    /// Format of the local file; when absent, qcow2 for a `.qcow2` name,
    /// else raw (never probed from the content).
    pub format: Option<ImageFormat>,
    /// Checkpoints may be made and deleted (`--image` tickets, and tickets
    /// with the `write` or `checkpoint` op).
    pub checkpoints: bool,
    /// Made from a control ticket (else from `--image`): errors name its
    /// fields, not the flag's options.
    pub from_ticket: bool,
}

/// An option of an image spec, as an error names it.
#[derive(Debug, Clone, Copy)]
pub enum SpecOption {
    /// Read-only.
    ReadOnly,
    /// Use the image's one dirty bitmap.
    Dirty,
    /// A dirty bitmap by name.
    Bitmap,
}

impl ImageSpec {
    /// How an error names `option`: a ticket's field, or an `--image`
    /// option.
    pub fn option_name(&self, option: SpecOption) -> &'static str {
        match (self.from_ticket, option) {
            (true, SpecOption::ReadOnly) => r#""ops": ["read"]"#,
            (true, SpecOption::Dirty) => r#""dirty": true"#,
            (true, SpecOption::Bitmap) => r#""bitmap": "NAME""#,
            (false, SpecOption::ReadOnly) => ",ro",
            (false, SpecOption::Dirty) => ",dirty",
            (false, SpecOption::Bitmap) => ",bitmap=NAME",
        }
    }
}

/// Parses `ID=SOURCE[,OPTION]...`.
pub fn parse_image_spec(text: &str) -> Result<ImageSpec, String> {
    let (id, rest) = text.split_once('=').ok_or("expected ID=SOURCE[,OPTION]...")?;
    if id.is_empty() || !id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.') {
        return Err(format!("image id {id:?} must be non-empty letters, digits, '-', '_' or '.'"));
    }
    let mut parts = rest.split(',');
    let source_text = parts.next().filter(|s| !s.is_empty()).ok_or("missing SOURCE after ID=")?;
    let source = if source_text.starts_with("nbd:") || source_text.starts_with("nbd+unix:") || source_text.starts_with("nbd://") {
        ImageSource::Nbd(Address::parse(source_text).map_err(|error| error.to_string())?)
    } else {
        ImageSource::File(PathBuf::from(source_text))
    };
    let mut spec = ImageSpec {
        id: id.to_string(),
        source,
        read_only: false,
        bitmap: None,
        dirty: false,
        create_size: None,
        sparse: false,
        format: None,
        checkpoints: true,
        from_ticket: false,
    };
    for option in parts {
        match option.split_once('=') {
            None if option == "ro" => spec.read_only = true,
            None if option == "sparse" => spec.sparse = true,
            None if option == "dirty" => spec.dirty = true,
            Some(("bitmap", name)) if !name.is_empty() => spec.bitmap = Some(name.to_string()),
            Some(("size", size)) => spec.create_size = Some(parse_size(size)?),
            Some(("format", format)) => spec.format = Some(ImageFormat::parse(format)?),
            _ => {
                return Err(format!(
                    "unknown image option {option:?}: expected ro, sparse, dirty, bitmap=NAME, size=SIZE or format=raw|qcow2"
                ));
            }
        }
    }
    if matches!(spec.source, ImageSource::Nbd(_)) && (spec.create_size.is_some() || spec.format.is_some()) {
        return Err("size= and format= apply to local files, not NBD URIs".into());
    }
    Ok(spec)
}

/// Parses a size with an optional K, M, G or T suffix (powers of 1024).
pub fn parse_size(text: &str) -> Result<u64, String> {
    let invalid = || format!("invalid size {text:?}: expected a number with an optional K, M, G or T suffix");
    let (digits, shift) = match text.as_bytes().last().map(u8::to_ascii_uppercase) {
        Some(b'K') => (&text[..text.len() - 1], 10),
        Some(b'M') => (&text[..text.len() - 1], 20),
        Some(b'G') => (&text[..text.len() - 1], 30),
        Some(b'T') => (&text[..text.len() - 1], 40),
        _ => (text, 0),
    };
    let number: u64 = digits.parse().map_err(|_| invalid())?;
    number.checked_mul(1 << shift).filter(|&size| size > 0).ok_or_else(invalid)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_image_specs() {
        let spec = parse_image_spec("demo=./demo.qcow2,size=1G,bitmap=b0,sparse").unwrap();
        assert_eq!(spec.id, "demo");
        assert_eq!(spec.source, ImageSource::File("./demo.qcow2".into()));
        assert_eq!(spec.create_size, Some(1 << 30));
        assert_eq!(spec.bitmap.as_deref(), Some("b0"));
        assert!(spec.sparse && !spec.read_only);
        let spec = parse_image_spec("x=nbd:unix:/run/s:exportname=e,ro").unwrap();
        assert_eq!(spec.source, ImageSource::Nbd(Address::unix("/run/s", "e")));
        assert!(spec.read_only);
    }

    #[test]
    fn rejects_bad_specs() {
        for text in ["demo", "=x", "a b=x", "d=", "d=x,colour=red", "d=x,size=1Q", "d=x,format=vmdk", "d=nbd://h/e,size=1G"] {
            assert!(parse_image_spec(text).is_err(), "{text}");
        }
    }

    #[test]
    fn parses_sizes() {
        assert_eq!(parse_size("512"), Ok(512));
        assert_eq!(parse_size("4k"), Ok(4096));
        assert_eq!(parse_size("2T"), Ok(2 << 40));
        assert!(parse_size("0").is_err());
        assert!(parse_size("99999999999T").is_err());
    }

    #[test]
    fn durations_a_clock_cannot_hold_are_refused() {
        for flag in ["--header-timeout", "--send-timeout", "--body-timeout", "--cancel-timeout", "--nbd-timeout"] {
            for value in ["18446744073709551615", "-1", "86401"] {
                assert!(Args::try_parse_from(["blockgate-server", flag, value]).is_err(), "{flag} {value}");
            }
        }
        assert!(Args::try_parse_from(["blockgate-server", "--max-connections", "0"]).is_err());
        assert!(Args::try_parse_from(["blockgate-server", "--max-connections-per-address", "0"]).is_err());
    }

    #[test]
    fn a_config_file_is_flags_that_the_command_line_overrides() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("blockgate.toml");
        let text = "listen = \"127.0.0.1:6000\"\nmax_readers = 4\nimage = [\"a=a.raw\", \"b=b.qcow2,ro\"]\nlog-format = \"json\"\n";
        std::fs::write(&path, text).unwrap();
        let command_line = |extra: &[&str]| {
            let mut words: Vec<std::ffi::OsString> = vec!["blockgate-server".into(), "--config".into(), path.clone().into()];
            words.extend(extra.iter().map(Into::into));
            Args::parse_from(with_config_file(words).unwrap())
        };
        let args = command_line(&[]);
        assert_eq!((args.listen.as_str(), args.max_readers, args.log_format), ("127.0.0.1:6000", 4, LogFormat::Json));
        assert_eq!(args.images.iter().map(|image| image.id.as_str()).collect::<Vec<_>>(), ["a", "b"]);
        let args = command_line(&["--max-readers", "2", "--image", "c=c.raw"]);
        assert_eq!((args.listen.as_str(), args.max_readers), ("127.0.0.1:6000", 2), "flags win");
        assert_eq!(args.images.len(), 3, "repeatable flags add up");
        for (bad, says) in [("colour = \"red\"", "unknown key"), ("listen = true", "a boolean"), ("listen = ", "")] {
            std::fs::write(&path, bad).unwrap();
            let error = with_config_file(vec!["blockgate-server".into(), "--config".into(), path.clone().into()]).unwrap_err();
            assert!(error.contains("--config") && error.contains(says), "{bad}: {error}");
        }
        let missing = with_config_file(vec!["s".into(), "--config=/nonexistent.toml".into()]).unwrap_err();
        assert!(missing.contains("/nonexistent.toml"), "{missing}");
    }

    #[test]
    fn a_config_value_of_the_wrong_type_names_the_file_and_the_key() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("blockgate.toml");
        for (bad, key) in
            [("max_readers = \"lots\"", "max_readers"), ("log-format = \"xml\"", "log-format"), ("image = [\"a=a.raw\", \"b\"]", "image")]
        {
            std::fs::write(&path, bad).unwrap();
            let error = with_config_file(vec!["blockgate-server".into(), "--config".into(), path.clone().into()]).unwrap_err();
            assert!(error.contains(&path.display().to_string()) && error.contains(&format!("key {key:?}")), "{bad}: {error}");
        }
    }

    #[test]
    fn a_config_file_others_may_write_is_refused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("blockgate.toml");
        std::fs::write(&path, "max_readers = 4\n").unwrap();
        let load = || with_config_file(vec!["blockgate-server".into(), "--config".into(), path.clone().into()]);
        for mode in [0o664, 0o646, 0o666] {
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
            let error = load().unwrap_err();
            assert!(error.contains(&path.display().to_string()) && error.contains("writable"), "{mode:o}: {error}");
        }
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(load().is_ok());
    }

    #[test]
    fn the_control_listener_needs_a_client_ca() {
        let args = Args::parse_from(["blockgate-server", "--control-listen", "127.0.0.1:54323"]);
        let error = args.check().unwrap_err();
        assert!(error.contains("--control-listen needs --client-ca"), "{error}");
        let args = Args::parse_from(["blockgate-server", "--client-ca", "ca.pem"]);
        assert!(args.check().unwrap_err().contains("--client-ca is for the clients of --control-listen"));
        let args = Args::parse_from(["blockgate-server", "--control-listen", "127.0.0.1:54323", "--client-ca", "ca.pem"]);
        assert!(args.check().is_ok());
    }

    #[test]
    fn duplicate_image_ids_are_refused() {
        let args = Args::parse_from(["blockgate-server", "--image", "a=x.raw", "--image", "b=y.raw"]);
        assert!(args.check().is_ok());
        let args = Args::parse_from(["blockgate-server", "--image", "a=x.raw", "--image", "a=y.raw"]);
        assert!(args.check().unwrap_err().contains("\"a\" is given twice"));
    }
}
