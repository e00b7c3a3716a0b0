//! Small JSON files in the state directory (checkpoint records, restore
//! records), replaced atomically: written to a temporary file, synced,
//! renamed over the old one, so a crash leaves either the old record or
//! the new one, never half of one. Readable by the server's user only.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use blake2::{Blake2b, Digest, digest::consts::U16};
use serde::Serialize;
use serde::de::DeserializeOwned;

/// The file of `kind` (a subdirectory) that belongs to `key` (an image
/// path or NBD URI): named by a hash of the key, so any key makes a safe
/// file name.
pub fn path_for(state_dir: &Path, kind: &str, key: &str) -> PathBuf {
    let digest = Blake2b::<U16>::digest(key.as_bytes());
    state_dir.join(kind).join(format!("{}.json", hex::encode(digest)))
}

/// The file's content, or `None` if there is no file.
pub fn load<T: DeserializeOwned>(path: &Path) -> Result<Option<T>> {
    match std::fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes).map(Some).with_context(|| format!("parsing {}", path.display())),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(error) => Err(error).with_context(|| format!("reading {}", path.display())),
    }
}

/// Replaces the file's content with `value`.
pub fn save<T: Serialize>(path: &Path, value: &T) -> Result<()> {
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
    let dir = path.parent().context("a state file has a directory")?;
    std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir).with_context(|| format!("creating {}", dir.display()))?;
    let temporary = path.with_extension(format!("tmp-{}", std::process::id()));
    let write = || -> std::io::Result<()> {
        let mut file = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&temporary)?;
        file.write_all(&serde_json::to_vec_pretty(value).map_err(std::io::Error::other)?)?;
        file.sync_all()?;
        std::fs::rename(&temporary, path)?;
        std::fs::File::open(dir)?.sync_all()
    };
    write().with_context(|| format!("writing {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn saved_values_load_back_and_keys_make_distinct_safe_names() {
        let dir = tempfile::tempdir().unwrap();
        let first = path_for(dir.path(), "records", "/images/a/../b.qcow2");
        let second = path_for(dir.path(), "records", "nbd://host/b");
        assert_ne!(first, second);
        assert_eq!(first.parent().unwrap(), dir.path().join("records"));
        assert_eq!(load::<Vec<String>>(&first).unwrap(), None);
        save(&first, &vec!["cp1".to_string()]).unwrap();
        save(&first, &vec!["cp1".to_string(), "cp2".to_string()]).unwrap();
        assert_eq!(load::<Vec<String>>(&first).unwrap().unwrap(), ["cp1", "cp2"]);
        std::fs::write(&second, b"{not json").unwrap();
        assert!(load::<Vec<String>>(&second).is_err());
    }
}
