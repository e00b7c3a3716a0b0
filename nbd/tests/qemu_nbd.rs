//! The client against a real qemu-nbd: data round trips, holes, zeroing,
//! block status for all three context kinds, bitmap discovery, pipelining
//! and the loss of the server mid-flight.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use blockgate_nbd::{ALLOCATION_DEPTH, Address, BASE_ALLOCATION, Client, ConnectOptions, Error, STATE_DIRTY, STATE_ZERO, ZeroFlags};

const MIB: u64 = 1 << 20;

struct QemuNbd {
    child: Child,
    socket: PathBuf,
}

impl Drop for QemuNbd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn run(program: &str, args: &[&str]) {
    let status = Command::new(program).args(args).stdout(Stdio::null()).status().expect(program);
    assert!(status.success(), "{program} {args:?} failed");
}

fn qemu_nbd(dir: &Path, image: &Path, format: &str, extra: &[&str]) -> QemuNbd {
    let socket = dir.join("nbd.sock");
    let mut child = Command::new("qemu-nbd")
        .args(["-t", "-e", "8", "--discard=unmap", "-A", "-f", format, "-k"])
        .arg(&socket)
        .args(extra)
        .arg(image)
        .spawn()
        .expect("qemu-nbd");
    for _ in 0..200 {
        if std::os::unix::net::UnixStream::connect(&socket).is_ok() {
            return QemuNbd { child, socket };
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let _ = child.kill();
    let _ = child.wait();
    panic!("qemu-nbd did not start");
}

fn contexts(names: &[&str]) -> ConnectOptions {
    ConnectOptions { meta_contexts: names.iter().map(|n| n.to_string()).collect(), ..Default::default() }
}

#[tokio::test]
async fn reads_writes_and_zeroes_match_the_image_file() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.raw");
    run("qemu-img", &["create", "-f", "raw", image.to_str().unwrap(), "64M"]);
    run("qemu-io", &["-f", "raw", "-c", "write -P 0xab 1M 3M", image.to_str().unwrap()]);
    let server = qemu_nbd(dir.path(), &image, "raw", &[]);
    let client = Client::connect(&Address::unix(&server.socket, ""), &contexts(&[BASE_ALLOCATION])).await.unwrap();
    assert_eq!(client.size(), 64 * MIB);

    let data = client.read(0, 8 * MIB as usize).await.unwrap();
    let on_disk = std::fs::read(&image).unwrap();
    assert_eq!(&data[..], &on_disk[..8 * MIB as usize]);

    let pattern: Vec<u8> = (0..5 * MIB).map(|i| (i * 7 % 256) as u8).collect();
    client.write(10 * MIB + 512, pattern.clone().into(), false).await.unwrap();
    client.write_zeroes(2 * MIB, MIB, ZeroFlags { no_hole: true, ..Default::default() }).await.unwrap();
    client.flush().await.unwrap();
    let on_disk = std::fs::read(&image).unwrap();
    let start = (10 * MIB + 512) as usize;
    assert_eq!(&on_disk[start..start + pattern.len()], &pattern[..]);
    assert!(on_disk[2 * MIB as usize..3 * MIB as usize].iter().all(|&b| b == 0));
    assert!(on_disk[3 * MIB as usize..4 * MIB as usize].iter().all(|&b| b == 0xab));

    let status = client.block_status(0, 64 * MIB).await.unwrap();
    let allocation = status.extents(BASE_ALLOCATION).unwrap();
    assert_eq!(allocation.iter().map(|e| u64::from(e.length)).sum::<u64>(), 64 * MIB);
    let last = allocation.last().unwrap();
    assert_eq!(last.flags & STATE_ZERO, STATE_ZERO, "the never-written tail is a hole: {allocation:?}");
}

#[tokio::test]
async fn many_reads_in_flight_on_one_connection() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.raw");
    let content: Vec<u8> = (0..32 * MIB).map(|i| (i / 4096 % 253) as u8).collect();
    std::fs::write(&image, &content).unwrap();
    let server = qemu_nbd(dir.path(), &image, "raw", &[]);
    let client = Client::connect(&Address::unix(&server.socket, ""), &ConnectOptions::default()).await.unwrap();
    let reads = (0..64u64).map(|i| {
        let client = client.clone();
        async move { (i, client.read(i * 512 * 1024, 512 * 1024).await) }
    });
    for (i, data) in futures_join_all(reads).await {
        let start = (i * 512 * 1024) as usize;
        assert_eq!(&data.unwrap()[..], &content[start..start + 512 * 1024]);
    }
}

#[tokio::test]
async fn holes_read_after_data_are_zeros_not_the_bytes_of_a_reused_buffer() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.raw");
    run("qemu-img", &["create", "-f", "raw", image.to_str().unwrap(), "8M"]);
    run("qemu-io", &["-f", "raw", "-c", "write -P 0xcd 0 4M", image.to_str().unwrap()]);
    let server = qemu_nbd(dir.path(), &image, "raw", &[]);
    let client = Client::connect(&Address::unix(&server.socket, ""), &ConnectOptions::default()).await.unwrap();
    // Read buffers go back to a pool when dropped: fill it with 0xcd.
    for piece in 0..16 {
        let data = client.read(piece * 256 * 1024, 256 * 1024).await.unwrap();
        assert!(data.iter().all(|&b| b == 0xcd));
    }
    let hole = client.read(6 * MIB, 256 * 1024).await.unwrap();
    assert_eq!(hole.len(), 256 * 1024);
    assert!(hole.iter().all(|&b| b == 0), "a hole read came back with old bytes");
    let across = client.read(4 * MIB - 1000, 100_000).await.unwrap();
    assert!(across[..1000].iter().all(|&b| b == 0xcd));
    assert!(across[1000..].iter().all(|&b| b == 0), "the hole after the data came back with old bytes");
}

/// A tiny join_all, so the crate needs no futures dependency for one test.
async fn futures_join_all<F: std::future::Future + Send + 'static>(futures: impl Iterator<Item = F>) -> Vec<F::Output>
where
    F::Output: Send,
{
    let handles: Vec<_> = futures.map(tokio::spawn).collect();
    let mut outputs = Vec::new();
    for handle in handles {
        outputs.push(handle.await.unwrap());
    }
    outputs
}

#[tokio::test]
async fn dirty_bitmap_and_allocation_depth_describe_a_qcow2_image() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.qcow2");
    let path = image.to_str().unwrap();
    run("qemu-img", &["create", "-f", "qcow2", path, "64M"]);
    run("qemu-io", &["-f", "qcow2", "-c", "write -P 0x11 0 4M", path]);
    run("qemu-img", &["bitmap", "--add", "-g", "64K", path, "bitmap0"]);
    run("qemu-io", &["-f", "qcow2", "-c", "write -P 0x22 1M 64k", "-c", "write -z 20M 64k", path]);
    let server = qemu_nbd(dir.path(), &image, "qcow2", &["-B", "bitmap0"]);
    let address = Address::unix(&server.socket, "");

    let listing = ConnectOptions { list_meta_contexts: vec!["qemu:dirty-bitmap:".into()], ..Default::default() };
    let discovered = Client::connect(&address, &listing).await.unwrap();
    assert_eq!(discovered.info().listed_contexts, vec!["qemu:dirty-bitmap:bitmap0".to_string()]);

    let names = [BASE_ALLOCATION, ALLOCATION_DEPTH, "qemu:dirty-bitmap:bitmap0"];
    let client = Client::connect(&address, &contexts(&names)).await.unwrap();
    let mut dirty = Vec::new();
    let mut offset = 0;
    while offset < client.size() {
        let status = client.block_status(offset, client.size() - offset).await.unwrap();
        let extents = status.extents("qemu:dirty-bitmap:bitmap0").unwrap();
        for extent in extents {
            if extent.flags & STATE_DIRTY != 0 {
                dirty.push((offset, u64::from(extent.length)));
            }
            offset += u64::from(extent.length);
        }
    }
    assert_eq!(dirty, vec![(MIB, 65536), (20 * MIB, 65536)]);

    let status = client.block_status(20 * MIB, 65536).await.unwrap();
    assert_eq!(status.extents(BASE_ALLOCATION).unwrap()[0].flags & STATE_ZERO, STATE_ZERO);
    let depth = client.block_status(32 * MIB, MIB).await.unwrap();
    assert_eq!(depth.extents(ALLOCATION_DEPTH).unwrap()[0].flags, 0, "never written: depth 0");
    let depth = client.block_status(0, MIB).await.unwrap();
    assert_eq!(depth.extents(ALLOCATION_DEPTH).unwrap()[0].flags, 1, "written: top layer");
}

#[tokio::test]
async fn losing_qemu_nbd_fails_pending_and_later_requests() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.raw");
    run("qemu-img", &["create", "-f", "raw", image.to_str().unwrap(), "256M"]);
    let mut server = qemu_nbd(dir.path(), &image, "raw", &[]);
    let client = Client::connect(&Address::unix(&server.socket, ""), &ConnectOptions::default()).await.unwrap();
    client.read(0, 4096).await.unwrap();
    server.child.kill().unwrap();
    server.child.wait().unwrap();
    let error = client.read(0, 4096).await.unwrap_err();
    assert!(matches!(error, Error::Disconnected(_)), "{error}");
    assert!(error.is_connection_error());
}

#[tokio::test]
async fn an_unknown_export_is_refused_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.raw");
    run("qemu-img", &["create", "-f", "raw", image.to_str().unwrap(), "1M"]);
    let server = qemu_nbd(dir.path(), &image, "raw", &[]);
    let error = Client::connect(&Address::unix(&server.socket, "nope"), &ConnectOptions::default()).await.err().unwrap();
    assert!(matches!(error, Error::OptionRefused { option: "NBD_OPT_GO", .. }), "{error}");
}
