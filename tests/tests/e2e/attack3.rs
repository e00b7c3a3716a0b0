//! Third hostile review (restore records keyed by device and inode):
//! each test is an attack; a failing test is a defect.

use std::os::unix::fs::MetadataExt;
use std::path::Path;

use reqwest::StatusCode;
use serde_json::json;

use crate::common::*;

const MIB: u64 = 1 << 20;

async fn sparse_put(server: &Server, ticket: &str, body: Vec<u8>) -> (StatusCode, String) {
    let response = server.client().put(server.image_url(ticket) + "?format=sparse").body(body).send().await.unwrap();
    let status = response.status();
    (status, response.text().await.unwrap())
}

fn incremental(size: u64, since: &str, checkpoint: &str, offset: u64, data: &[u8]) -> Vec<u8> {
    let meta = json!({"virtual-size": size, "data-size": data.len(), "incremental": true, "since": since, "checkpoint": checkpoint});
    let mut body = meta_frame(&meta);
    body.extend(frame("data", offset, data.len() as u64, data));
    body.extend(frame("stop", 0, 0, &[]));
    body
}

fn inode(path: &Path) -> u64 {
    std::fs::metadata(path).unwrap().ino()
}

/// The restore record is keyed by the image file's device and inode, and
/// nothing removes it when that file is deleted. ext4 hands a freed inode
/// to the next file: a brand-new image, never restored, made after the
/// old one was deleted, inherits the old image's checkpoint, and an
/// incremental of the old chain is applied to it (a silently corrupt
/// restore). Keyed by path, a new file under another name was safe.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attack3_a_new_image_on_a_reused_inode_inherits_the_deleted_images_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let size = 16 * MIB;
    let old = dir.path().join("old.raw");
    std::fs::File::create(&old).unwrap().set_len(size).unwrap();
    let old_inode = inode(&old);
    let mut server = Server::start(dir.path(), &[format!("old={}", old.display())]).await;
    let full = stream(json!({"virtual-size": size, "data-size": 4096, "incremental": false, "checkpoint": "c1"}), &[1u8; 4096], size);
    let (status, text) = sparse_put(&server, "old", full).await;
    assert_eq!(status, StatusCode::OK, "full restore: {text}");
    server.stop();
    std::fs::remove_file(&old).unwrap();

    // A new, unrelated image; the first file that gets the freed inode.
    let mut new = None;
    for n in 0..50 {
        let path = dir.path().join(format!("new{n}.raw"));
        std::fs::File::create(&path).unwrap().set_len(size).unwrap();
        if inode(&path) == old_inode {
            new = Some(path);
            break;
        }
    }
    let Some(new) = new else {
        eprintln!("inconclusive: the file system did not reuse inode {old_inode}");
        return;
    };
    let server = Server::start(dir.path(), &[format!("new={}", new.display())]).await;
    let (status, text) = sparse_put(&server, "new", incremental(size, "c1", "c2", 4 * MIB, &[7u8; 4096])).await;
    assert_eq!(
        status,
        StatusCode::CONFLICT,
        "{} was never restored, but an incremental from c1 (a checkpoint of the deleted {}) was admitted: {text}",
        new.display(),
        old.display()
    );
}
