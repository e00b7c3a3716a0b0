//! The files a qcow2 header names: its backing file (with the backing
//! format) and its external data file. qemu opens both by itself when it
//! opens a qcow2 image, so a header that names a host file hands that file
//! to whoever reads or writes the image. blockgate reads the header here,
//! without qemu, decides which of these files may be opened, and builds
//! every block node itself with explicit formats ([`crate::qemu`]).
//!
//! [`resolve`] follows an image's links where a [`LinkPolicy`] allows
//! and gives the [`ImageLayer`] to open, every file of it opened first
//! without blocking (a FIFO is refused, not waited on).
//!
//! The header layout is qemu's `docs/interop/qcow2.txt`: big-endian fields,
//! the backing file name at `backing_file_offset`, and header extensions
//! (type, length, data padded to 8 bytes) after the header, among them the
//! backing format (`0xe2792aca`) and the external data file name
//! (`0x44415441`), which incompatible feature bit 2 makes mandatory.

use std::fs::{File, Metadata};
use std::io::Read;
use std::path::{Path, PathBuf};

use crate::qemu::{self, ImageLayer, QemuError};

/// The magic number at offset 0.
pub const MAGIC: &[u8; 4] = b"QFI\xfb";
/// Longest header (with extensions) read: qemu keeps it in the first
/// cluster, at most 2 MiB.
const MAX_HEADER: usize = 2 << 20;
/// Longest file name qemu allows in a header.
const MAX_NAME: usize = 1023;
const EXTENSION_END: u32 = 0;
const EXTENSION_BACKING_FORMAT: u32 = 0xe279_2aca;
const EXTENSION_DATA_FILE: u32 = 0x4441_5441;
const INCOMPATIBLE_DATA_FILE: u64 = 1 << 2;

/// What a qcow2 header names besides the image itself.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Links {
    /// The backing file name, as written (relative names are relative to
    /// the image's directory).
    pub backing: Option<String>,
    /// The backing file's format, if the header records it.
    pub backing_format: Option<String>,
    /// The external data file name, as written.
    pub data_file: Option<String>,
}

/// A header that is not a qcow2 header qemu would open.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not a valid qcow2 header: {0}")]
pub struct HeaderError(String);

fn invalid(why: impl Into<String>) -> HeaderError {
    HeaderError(why.into())
}

fn be_u32(header: &[u8], at: usize) -> Result<u32, HeaderError> {
    let bytes = header.get(at..at + 4).ok_or_else(|| invalid(format!("ends before offset {}", at + 4)))?;
    Ok(u32::from_be_bytes(bytes.try_into().expect("4 bytes")))
}

fn be_u64(header: &[u8], at: usize) -> Result<u64, HeaderError> {
    let bytes = header.get(at..at + 8).ok_or_else(|| invalid(format!("ends before offset {}", at + 8)))?;
    Ok(u64::from_be_bytes(bytes.try_into().expect("8 bytes")))
}

fn name(bytes: &[u8], what: &str) -> Result<String, HeaderError> {
    if bytes.len() > MAX_NAME {
        return Err(invalid(format!("{what} name of {} bytes", bytes.len())));
    }
    String::from_utf8(bytes.to_vec()).map_err(|_| invalid(format!("{what} name is not UTF-8")))
}

/// The links of a qcow2 header held in `header` (the file's first bytes,
/// at most `MAX_HEADER` of them).
pub fn parse(header: &[u8]) -> Result<Links, HeaderError> {
    if !header.starts_with(MAGIC) {
        return Err(invalid("no qcow2 magic"));
    }
    let version = be_u32(header, 4)?;
    let backing_offset = be_u64(header, 8)?;
    let backing_size = be_u32(header, 16)? as usize;
    let mut links = Links::default();
    if backing_offset != 0 && backing_size != 0 {
        let start = usize::try_from(backing_offset).map_err(|_| invalid("backing file offset out of range"))?;
        let bytes = start
            .checked_add(backing_size)
            .and_then(|end| header.get(start..end))
            .ok_or_else(|| invalid(format!("backing file name at {backing_offset} past the header")))?;
        links.backing = Some(name(bytes, "backing file")?);
    }
    let (incompatible, mut at) = match version {
        2 => (0, 72),
        3 => (be_u64(header, 72)?, be_u32(header, 100)? as usize),
        other => return Err(invalid(format!("version {other}"))),
    };
    if at < 72 {
        return Err(invalid(format!("header length {at}")));
    }
    loop {
        let kind = be_u32(header, at)?;
        let length = be_u32(header, at + 4)? as usize;
        if kind == EXTENSION_END {
            break;
        }
        let data = header.get(at + 8..at + 8 + length).ok_or_else(|| invalid(format!("extension {kind:#x} runs past the header")))?;
        match kind {
            EXTENSION_BACKING_FORMAT => links.backing_format = Some(name(data, "backing format")?),
            EXTENSION_DATA_FILE => links.data_file = Some(name(data, "data file")?),
            _ => {}
        }
        at += 8 + length.next_multiple_of(8);
    }
    if incompatible & INCOMPATIBLE_DATA_FILE != 0 && links.data_file.is_none() {
        return Err(invalid("an external data file is required but not named"));
    }
    if incompatible & INCOMPATIBLE_DATA_FILE == 0 {
        // qemu ignores the name without the feature bit.
        links.data_file = None;
    }
    Ok(links)
}

/// Reads the header of an open qcow2 file and parses its links.
pub fn read_links(file: &mut impl Read) -> Result<Links, std::io::Error> {
    let mut header = Vec::with_capacity(64 << 10);
    file.take(MAX_HEADER as u64).read_to_end(&mut header)?;
    parse(&header).map_err(|error| std::io::Error::new(std::io::ErrorKind::InvalidData, error))
}

/// Deepest backing chain followed.
const MAX_CHAIN: usize = 16;

/// Where the files a qcow2 header names may lie.
#[derive(Debug, Clone, Default)]
pub struct LinkPolicy {
    /// Directories whose whole tree may be named, resolved.
    pub trees: Vec<PathBuf>,
    /// Directories whose own files may be named, not those below them,
    /// resolved.
    pub directories: Vec<PathBuf>,
    /// Any file may be named: for images this program made itself, whose
    /// links it wrote or the user named.
    pub anywhere: bool,
    /// The rule in words, for a refusal.
    pub rule: &'static str,
}

impl LinkPolicy {
    /// True if `real` (resolved) may be opened: anywhere if so told, else
    /// inside a tree, or directly in a directory, and never hidden
    /// (`.ssh/authorized_keys` below a home directory that holds an image).
    fn allows(&self, real: &Path) -> bool {
        if self.anywhere {
            return true;
        }
        let visible = |below: &Path| !below.components().any(|part| part.as_os_str().as_encoded_bytes().starts_with(b"."));
        self.trees.iter().any(|dir| real.strip_prefix(dir).is_ok_and(visible))
            || self.directories.iter().any(|dir| real.parent() == Some(dir) && real.strip_prefix(dir).is_ok_and(visible))
    }
}

/// An image and what it links to, as resolved, with every file's metadata
/// as opened.
#[derive(Debug)]
pub struct Chain {
    /// What to open.
    pub image: ImageLayer,
    /// Every file of it (the image first), as opened.
    pub files: Vec<(PathBuf, Metadata)>,
}

fn refused(message: String) -> QemuError {
    QemuError::new(message)
}

/// Opens a file without blocking; what it is.
fn open_checked(path: &Path) -> Result<(File, Metadata), QemuError> {
    let opened = qemu::open_image_file(path).and_then(|file| Ok((file.metadata()?, file)));
    let (metadata, file) = opened.map_err(|error| refused(format!("opening {}: {error}", path.display())))?;
    Ok((file, metadata))
}

/// Resolves a file a header names: relative to the image's directory,
/// symlinks followed, where the policy allows.
fn linked_file(name: &str, image: &Path, what: &str, allowed: &LinkPolicy) -> Result<PathBuf, QemuError> {
    let refusal = |why: &str| refused(format!("{}: its {what} {name:?} {why}; it is not opened", image.display()));
    if name.starts_with("json:") {
        return Err(refusal("is a json: file name"));
    }
    let directory = image.parent().unwrap_or(Path::new("/"));
    let real = std::fs::canonicalize(directory.join(name)).map_err(|error| refusal(&format!("cannot be resolved ({error})")))?;
    if !allowed.allows(&real) {
        return Err(refusal(&format!("is not allowed ({})", allowed.rule)));
    }
    Ok(real)
}

/// The image at `path` (resolved) opened as `format` (`raw` or `qcow2`),
/// with the backing chain and data files its qcow2 headers name, each
/// resolved and allowed by `allowed`, each opened first without blocking.
pub fn resolve(path: &Path, format: &str, allowed: &LinkPolicy) -> Result<Chain, QemuError> {
    let mut files = Vec::new();
    let image = resolve_layer(path, format, allowed, &mut files, 0)?;
    Ok(Chain { image, files })
}

fn resolve_layer(
    path: &Path,
    format: &str,
    allowed: &LinkPolicy,
    files: &mut Vec<(PathBuf, Metadata)>,
    depth: usize,
) -> Result<ImageLayer, QemuError> {
    if depth > MAX_CHAIN {
        return Err(refused(format!("{}: backing chain deeper than {MAX_CHAIN}", path.display())));
    }
    let (mut file, metadata) = open_checked(path)?;
    files.push((path.to_path_buf(), metadata));
    let mut layer = ImageLayer::single(path, format);
    match format {
        "raw" => return Ok(layer),
        "qcow2" => {}
        other => return Err(refused(format!("{}: format {other} is not served (raw or qcow2)", path.display()))),
    }
    let links = read_links(&mut file).map_err(|error| refused(format!("reading the qcow2 header of {}: {error}", path.display())))?;
    if let Some(name) = &links.data_file {
        let data_file = linked_file(name, path, "external data file", allowed)?;
        let (_, metadata) = open_checked(&data_file)?;
        files.push((data_file.clone(), metadata));
        layer.data_file = Some(data_file);
    }
    if let Some(name) = &links.backing {
        let backing = linked_file(name, path, "backing file", allowed)?;
        let Some(backing_format) = links.backing_format.as_deref() else {
            return Err(refused(format!(
                "{}: its backing file {name:?} has no recorded format, and formats are never probed (qemu-img rebase -u -F)",
                path.display()
            )));
        };
        layer.backing = Some(Box::new(resolve_layer(&backing, backing_format, allowed, files, depth + 1)?));
    }
    Ok(layer)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A version 3 header with the given backing name and extensions.
    fn header(backing: Option<&str>, extensions: &[(u32, &[u8])], incompatible: u64) -> Vec<u8> {
        let mut header = vec![0u8; 104];
        header[..4].copy_from_slice(MAGIC);
        header[4..8].copy_from_slice(&3u32.to_be_bytes());
        header[72..80].copy_from_slice(&incompatible.to_be_bytes());
        header[100..104].copy_from_slice(&104u32.to_be_bytes());
        for (kind, data) in extensions {
            header.extend(kind.to_be_bytes());
            header.extend((data.len() as u32).to_be_bytes());
            header.extend(*data);
            header.resize(header.len().next_multiple_of(8), 0);
        }
        header.extend([0; 8]);
        if let Some(backing) = backing {
            let offset = header.len() as u64;
            header[8..16].copy_from_slice(&offset.to_be_bytes());
            header[16..20].copy_from_slice(&(backing.len() as u32).to_be_bytes());
            header.extend(backing.as_bytes());
        }
        header
    }

    #[test]
    fn backing_file_format_and_data_file_are_read() {
        let bytes = header(Some("../secret"), &[(EXTENSION_BACKING_FORMAT, b"raw"), (EXTENSION_DATA_FILE, b"/etc/shadow")], 4);
        let links = parse(&bytes).unwrap();
        assert_eq!(links.backing.as_deref(), Some("../secret"));
        assert_eq!(links.backing_format.as_deref(), Some("raw"));
        assert_eq!(links.data_file.as_deref(), Some("/etc/shadow"));
        assert_eq!(parse(&header(None, &[], 0)).unwrap(), Links::default());
        assert!(parse(&header(None, &[], INCOMPATIBLE_DATA_FILE)).is_err(), "a data file required but not named");
    }

    #[test]
    fn headers_qemu_img_makes_are_read() {
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("top.qcow2");
        let data = dir.path().join("data.raw");
        let run = |args: &[&str]| {
            let status = std::process::Command::new("qemu-img").args(args).status().expect("qemu-img (qemu-utils)");
            assert!(status.success(), "qemu-img {args:?}");
        };
        run(&["create", "-q", "-f", "qcow2", "-b", "/nonexistent/base", "-F", "raw", "-u", image.to_str().unwrap(), "1M"]);
        let links = read_links(&mut std::fs::File::open(&image).unwrap()).unwrap();
        assert_eq!((links.backing.as_deref(), links.backing_format.as_deref()), (Some("/nonexistent/base"), Some("raw")));
        std::fs::remove_file(&image).unwrap();
        let option = format!("data_file={},data_file_raw=on", data.display());
        run(&["create", "-q", "-f", "qcow2", "-o", &option, image.to_str().unwrap(), "1M"]);
        let links = read_links(&mut std::fs::File::open(&image).unwrap()).unwrap();
        assert_eq!(links.data_file.as_deref(), data.to_str());
        assert_eq!(links.backing, None);
    }

    #[test]
    fn trees_reach_below_image_directories_do_not_and_hidden_files_never() {
        let policy = LinkPolicy { trees: vec!["/srv/images".into()], directories: vec!["/home/u".into()], ..LinkPolicy::default() };
        for (path, allowed) in [
            ("/srv/images/base.raw", true),
            ("/srv/images/vm1/base.qcow2", true),
            ("/srv/images/.hidden/base.raw", false),
            ("/srv/images/vm1/.base.raw", false),
            ("/srv/other/base.raw", false),
            ("/home/u/base.raw", true),
            ("/home/u/.ssh/authorized_keys", false),
            ("/home/u/.bashrc", false),
            ("/home/u/sub/base.raw", false),
            ("/home/base.raw", false),
        ] {
            assert_eq!(policy.allows(Path::new(path)), allowed, "{path}");
        }
    }

    proptest! {
        #[test]
        fn any_bytes_after_the_magic_parse_or_fail_without_panic(tail in prop::collection::vec(any::<u8>(), 0..600)) {
            let mut bytes = MAGIC.to_vec();
            bytes.extend(tail);
            let _ = parse(&bytes);
        }

        #[test]
        fn any_field_values_parse_or_fail_without_panic(
            version in prop_oneof![Just(2u32), Just(3u32), any::<u32>()],
            backing_offset in prop_oneof![any::<u64>(), 0u64..300],
            backing_size in prop_oneof![any::<u32>(), 0u32..300],
            header_length in prop_oneof![any::<u32>(), 0u32..300],
            extension in (any::<u32>(), prop_oneof![any::<u32>(), 0u32..64]),
        ) {
            let mut bytes = header(None, &[], 0);
            bytes[4..8].copy_from_slice(&version.to_be_bytes());
            bytes[8..16].copy_from_slice(&backing_offset.to_be_bytes());
            bytes[16..20].copy_from_slice(&backing_size.to_be_bytes());
            bytes[100..104].copy_from_slice(&header_length.to_be_bytes());
            bytes[104..108].copy_from_slice(&extension.0.to_be_bytes());
            bytes[108..112].copy_from_slice(&extension.1.to_be_bytes());
            bytes.resize(300, 0);
            let _ = parse(&bytes);
        }
    }
}
