//! The host files an owned image reaches, decided before qemu opens any
//! ([`qcow2::resolve`]: the backing chain and data files a qcow2 header
//! names are opened only where the [`LinkPolicy`] allows: inside an
//! `--allow-dir` tree, or directly in the directory of an `--image` file,
//! never a hidden file, never a `json:` name), and pinned.
//!
//! Every file is then *pinned* by device and inode: before each start of
//! the daemon the paths must still be those files (no symlink, no other
//! file renamed over them), and after the start the daemon must hold
//! each of them open, so a swap between the check and qemu's open is
//! caught too.

use std::fs::Metadata;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use blockgate_nbd::qcow2::{self, LinkPolicy};
use blockgate_nbd::qemu::ImageLayer;

/// A file by device and inode, and the path it was found at.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Pin {
    path: PathBuf,
    device: u64,
    inode: u64,
    /// When the file was made (nanoseconds), where the file system keeps
    /// it: a new file that reuses a deleted one's inode differs here.
    born: Option<u128>,
}

impl Pin {
    fn of(path: &Path, metadata: &Metadata) -> Pin {
        let born = metadata.created().ok().and_then(|time| time.duration_since(std::time::UNIX_EPOCH).ok()).map(|age| age.as_nanos());
        Pin { path: path.to_path_buf(), device: metadata.dev(), inode: metadata.ino(), born }
    }

    fn matches(&self, metadata: &Metadata) -> bool {
        (metadata.dev(), metadata.ino()) == (self.device, self.inode)
    }
}

/// The files of an image, pinned.
#[derive(Debug, Clone, Default)]
pub struct Pins(Vec<Pin>);

impl Pins {
    /// The image's own file as `device:inode:birth` (or, where the file
    /// system keeps no birth time, `device:inode:path`): the same for
    /// every path that reaches it (hard links included), and not the same
    /// for a new file that reuses a deleted one's inode.
    pub fn identity(&self) -> Option<String> {
        self.0.first().map(|pin| match pin.born {
            Some(born) => format!("{}:{}:{born}", pin.device, pin.inode),
            None => format!("{}:{}:{}", pin.device, pin.inode, pin.path.display()),
        })
    }

    /// The files the image links to (its backing chain and data files),
    /// without the image itself.
    pub fn linked_files(&self) -> Vec<PathBuf> {
        self.0.iter().skip(1).map(|pin| pin.path.clone()).collect()
    }

    /// Checks, without following symlinks, that every path is still the
    /// file that was checked.
    pub fn verify_paths(&self) -> Result<()> {
        for pin in &self.0 {
            let metadata = std::fs::symlink_metadata(&pin.path).with_context(|| format!("{}", pin.path.display()))?;
            let real = std::fs::canonicalize(&pin.path).with_context(|| format!("{}", pin.path.display()))?;
            if !pin.matches(&metadata) || real != pin.path {
                bail!(
                    "{} is no longer the file that was checked (replaced or reached through a symlink); not opening it",
                    pin.path.display()
                );
            }
        }
        Ok(())
    }

    /// Checks that process `pid` holds every pinned file open (and so
    /// opened those files, not others swapped in after the check).
    pub fn verify_open_by(&self, pid: u32) -> Result<()> {
        let open: Vec<Metadata> = std::fs::read_dir(format!("/proc/{pid}/fd"))
            .with_context(|| format!("listing the open files of process {pid}"))?
            .filter_map(|entry| std::fs::metadata(entry.ok()?.path()).ok())
            .collect();
        for pin in &self.0 {
            if !open.iter().any(|metadata| pin.matches(metadata)) {
                bail!("qemu-storage-daemon did not open {} as checked (the file was replaced); stopped it", pin.path.display());
            }
        }
        Ok(())
    }
}

/// The image at `path` (resolved) opened as `format`, with the chain and
/// data files its qcow2 headers name, each checked; and their pins.
pub fn resolve(path: &Path, format: &str, allowed: &LinkPolicy) -> Result<(ImageLayer, Pins)> {
    let chain = qcow2::resolve(path, format, allowed)?;
    let pins = chain.files.iter().map(|(path, metadata)| Pin::of(path, metadata)).collect();
    Ok((chain.image, Pins(pins)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn qemu_img(args: &[&str]) {
        let status = std::process::Command::new("qemu-img").args(args).status().expect("qemu-img (qemu-utils)");
        assert!(status.success(), "qemu-img {args:?}");
    }

    #[test]
    fn links_inside_the_allowed_directories_are_followed_and_others_refused() {
        let root = tempfile::tempdir().unwrap();
        let root = std::fs::canonicalize(root.path()).unwrap();
        let images = root.join("images");
        std::fs::create_dir(&images).unwrap();
        let secret = root.join("secret.raw");
        std::fs::write(&secret, b"secret").unwrap();
        let allowed = LinkPolicy { trees: vec![images.clone()], ..LinkPolicy::default() };
        let text = |path: &Path| path.to_str().unwrap().to_string();

        let base = images.join("base.raw");
        std::fs::write(&base, vec![0; 1 << 20]).unwrap();
        let top = images.join("top.qcow2");
        qemu_img(&["create", "-q", "-f", "qcow2", "-b", "base.raw", "-F", "raw", &text(&top)]);
        let (layer, pins) = resolve(&top, "qcow2", &allowed).unwrap();
        assert_eq!(layer.backing.as_deref(), Some(&ImageLayer::single(&base, "raw")));
        assert_eq!(pins.0.len(), 2);
        pins.verify_paths().unwrap();

        let cases: [(&str, Vec<&str>); 3] = [
            ("outside", vec!["-b", "../secret.raw", "-F", "raw"]),
            ("absolute", vec!["-b", secret.to_str().unwrap(), "-F", "raw"]),
            ("json", vec!["-b", "json:{\"driver\":\"raw\"}", "-F", "raw"]),
        ];
        for (name, options) in cases {
            let image = images.join(format!("{name}.qcow2"));
            let path = text(&image);
            let mut args = vec!["create", "-q", "-f", "qcow2", "-u"];
            args.extend(options);
            args.extend([path.as_str(), "1M"]);
            qemu_img(&args);
            let error = format!("{:#}", resolve(&image, "qcow2", &allowed).unwrap_err());
            assert!(error.contains(&path) && error.contains("not opened"), "{name}: {error}");
        }
        let data_outside = images.join("data.qcow2");
        qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            &format!("data_file={},data_file_raw=on", secret.display()),
            &text(&data_outside),
            "1M",
        ]);
        let error = format!("{:#}", resolve(&data_outside, "qcow2", &allowed).unwrap_err());
        assert!(error.contains("external data file") && error.contains("not allowed"), "{error}");
    }

    #[test]
    fn a_fifo_or_a_swapped_file_is_refused_without_blocking() {
        let root = tempfile::tempdir().unwrap();
        let root = std::fs::canonicalize(root.path()).unwrap();
        let allowed = LinkPolicy { trees: vec![root.clone()], ..LinkPolicy::default() };
        let fifo = root.join("fifo");
        assert!(std::process::Command::new("mkfifo").arg(&fifo).status().unwrap().success());
        let error = format!("{:#}", resolve(&fifo, "raw", &allowed).unwrap_err());
        assert!(error.contains("not a regular file"), "{error}");

        let image = root.join("disk.raw");
        std::fs::write(&image, b"disk").unwrap();
        let (_, pins) = resolve(&image, "raw", &allowed).unwrap();
        let secret = root.join("secret");
        std::fs::write(&secret, b"secret").unwrap();
        std::fs::rename(&image, root.join("old")).unwrap();
        std::os::unix::fs::symlink(&secret, &image).unwrap();
        assert!(pins.verify_paths().is_err(), "a symlink swapped in");
        std::fs::remove_file(&image).unwrap();
        std::fs::copy(&secret, &image).unwrap();
        assert!(pins.verify_paths().is_err(), "another file renamed over it");
        let error = format!("{:#}", resolve(&image.join("x"), "raw", &allowed).unwrap_err());
        assert!(error.contains("opening"), "{error}");
    }
}
