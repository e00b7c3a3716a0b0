//! The QMP client and the qemu-storage-daemon child against the real
//! daemon: greeting and commands, qemu's errors with their class, an export
//! added live and read over NBD with its dirty bitmap, and persistent
//! bitmaps written back when the daemon is stopped.

use std::process::Command;

use blockgate_nbd::qemu::{DaemonSettings, ImageLayer, StorageDaemon};
use blockgate_nbd::qmp::{Qmp, QmpError};
use blockgate_nbd::{Address, Client, ConnectOptions, DIRTY_BITMAP_PREFIX, ZeroFlags};
use serde_json::{Value, json};

fn qemu_img(args: &[&str]) -> Vec<u8> {
    let output = Command::new("qemu-img").args(args).output().unwrap();
    assert!(output.status.success(), "qemu-img {args:?}: {}", String::from_utf8_lossy(&output.stderr));
    output.stdout
}

#[tokio::test]
async fn bitmaps_and_exports_are_managed_live_and_persist() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk,with comma.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", image.to_str().unwrap(), "16M"]);
    let mut daemon = StorageDaemon::start(&DaemonSettings { image: &ImageLayer::single(&image, "qcow2"), read_only: false }).await.unwrap();
    let mut qmp = Qmp::connect_when_ready(daemon.qmp_socket(), std::time::Duration::from_secs(5)).await.unwrap();
    let node = StorageDaemon::NODE;
    qmp.execute("block-dirty-bitmap-add", json!({"node": node, "name": "cp1", "persistent": true})).await.unwrap();
    match qmp.execute("block-dirty-bitmap-add", json!({"node": node, "name": "cp1", "persistent": true})).await {
        Err(QmpError::Command { class, desc }) => assert_eq!((class.as_str(), desc.contains("already exists")), ("GenericError", true)),
        other => panic!("a duplicate bitmap must fail: {other:?}"),
    }
    match qmp.execute("no-such-command", Value::Null).await {
        Err(QmpError::Command { class, .. }) => assert_eq!(class, "CommandNotFound"),
        other => panic!("{other:?}"),
    }
    let export = json!({"type": "nbd", "id": "e1", "node-name": node, "name": "disk", "writable": true, "bitmaps": ["cp1"]});
    qmp.execute("block-export-add", export).await.unwrap();

    let context = format!("{DIRTY_BITMAP_PREFIX}cp1");
    let options = ConnectOptions { meta_contexts: vec![context.clone()], ..Default::default() };
    let client = Client::connect(&Address::unix(daemon.nbd_socket(), "disk"), &options).await.unwrap();
    assert_eq!(client.size(), 16 << 20);
    client.write(1 << 20, bytes::Bytes::from(vec![7u8; 65536]), true).await.unwrap();
    client.write_zeroes(4 << 20, 65536, ZeroFlags::default()).await.unwrap();
    assert_eq!(&client.read(1 << 20, 4).await.unwrap()[..], [7, 7, 7, 7]);
    client.disconnect().await;

    let nodes = qmp.execute("query-named-block-nodes", json!({"flat": true})).await.unwrap();
    let disk = nodes.as_array().unwrap().iter().find(|n| n["node-name"] == node).unwrap();
    let bitmap = &disk["dirty-bitmaps"][0];
    assert_eq!((bitmap["name"].as_str(), bitmap["count"].as_u64()), (Some("cp1"), Some(2 * 65536)));
    assert_eq!((bitmap["recording"].as_bool(), bitmap["persistent"].as_bool()), (Some(true), Some(true)));
    drop(qmp);
    daemon.stop().await;

    let info: Value = serde_json::from_slice(&qemu_img(&["info", "--output=json", image.to_str().unwrap()])).unwrap();
    let bitmaps = &info["format-specific"]["data"]["bitmaps"];
    assert_eq!(bitmaps[0]["name"], "cp1", "{info}");
    assert!(!bitmaps[0]["flags"].as_array().unwrap().iter().any(|flag| flag == "in-use"), "written back cleanly: {info}");
}

#[tokio::test]
async fn a_daemon_that_cannot_open_its_image_says_why() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing.qcow2");
    let error =
        StorageDaemon::start(&DaemonSettings { image: &ImageLayer::single(&missing, "qcow2"), read_only: true }).await.err().unwrap();
    assert!(error.to_string().contains("qemu-storage-daemon exited"), "{error}");
    assert!(error.to_string().contains("missing.qcow2"), "{error}");
}
