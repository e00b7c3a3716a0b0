//! The libvirt domains of `vm_host` against the real libvirtd: a domain
//! runs on qcow2 and raw disks and takes writes from outside the guest, a
//! pull-mode backup job exports its disks as they were when it began, and
//! neither a dropped domain nor one whose qemu was killed leaves a domain,
//! a qemu or checkpoint metadata behind.

use crate::common::*;
use crate::vm_host::*;

/// The pid of the qemu that runs domain `name`, if one does.
fn qemu_of(name: &str) -> Option<u32> {
    let needle = format!("guest={name},");
    std::fs::read_dir("/proc").expect("/proc").flatten().find_map(|entry| {
        let pid = entry.file_name().to_str()?.parse().ok()?;
        let cmdline = std::fs::read(entry.path().join("cmdline")).ok()?;
        String::from_utf8_lossy(&cmdline).contains(&needle).then_some(pid)
    })
}

#[test]
fn a_domain_with_two_disks_runs_and_takes_writes_from_outside() {
    let domain = Domain::start("two-disks", &[("vda", "qcow2", 64 * MIB), ("vdb", "raw", 64 * MIB)]);
    assert!(domain.is_running());
    domain.write(1, 0xab, 4 * MIB, 4 * MIB);
    domain.write(0, 0xcd, 0, MIB);
    domain.destroy();
    assert!(!domain.is_running());
    qemu_io(domain.disk_path(1), "raw", &["read -P 0 0 4M", "read -P 0xab 4M 4M", "read -P 0 8M 56M"]);
    qemu_io(domain.disk_path(0), "qcow2", &["read -P 0xcd 0 1M", "read -P 0 1M 63M"]);
}

#[test]
fn a_pull_mode_backup_of_a_domain_exports_its_disks_as_they_were_when_it_began() {
    let domain = Domain::start("backup", &[("vda", "qcow2", 64 * MIB), ("vdb", "raw", 64 * MIB)]);
    domain.write(0, 0xab, 0, 4 * MIB);
    domain.write(1, 0x5a, 8 * MIB, MIB);
    let dir = domain.dir();
    let socket = dir.join("backup.sock");
    let backup = dir.join("backup.xml");
    std::fs::write(
        &backup,
        format!(
            "<domainbackup mode='pull'><server transport='unix' socket='{}'/><disks>
               <disk name='vda' backup='yes' type='file'><scratch file='{}'/></disk>
               <disk name='vdb' backup='yes' type='file'><scratch file='{}'/></disk>
             </disks></domainbackup>",
            socket.display(),
            dir.join("scratch-vda.qcow2").display(),
            dir.join("scratch-vdb.qcow2").display()
        ),
    )
    .expect("write the backup XML");
    let checkpoint = dir.join("checkpoint.xml");
    std::fs::write(
        &checkpoint,
        "<domaincheckpoint><name>full</name><disks><disk name='vda' checkpoint='bitmap'/><disk name='vdb' checkpoint='no'/></disks></domaincheckpoint>",
    )
    .expect("write the checkpoint XML");
    virsh(&["backup-begin", domain.name(), backup.to_str().unwrap(), checkpoint.to_str().unwrap()]).unwrap_or_else(|said| panic!("{said}"));
    // After the job began: not in its exports.
    domain.write(0, 0xee, 0, MIB);
    domain.write(1, 0xee, 8 * MIB, MIB);

    let expected: [(&str, &[&str]); 2] =
        [("vda", &["read -P 0xab 0 4M", "read -P 0 4M 60M"]), ("vdb", &["read -P 0 0 8M", "read -P 0x5a 8M 1M", "read -P 0 9M 55M"])];
    for (disk, reads) in expected {
        let copy = dir.join(format!("{disk}-export.raw"));
        let export = format!("nbd+unix:///{disk}?socket={}", socket.display());
        run("qemu-img", &["convert", "-f", "raw", "-O", "raw", &export, copy.to_str().unwrap()]);
        qemu_io(&copy, "raw", reads);
    }
    let checkpoints = virsh(&["checkpoint-list", "--name", domain.name()]).unwrap_or_else(|said| panic!("{said}"));
    assert_eq!(checkpoints.trim(), "full");
    virsh(&["domjobabort", domain.name()]).unwrap_or_else(|said| panic!("{said}"));
}

#[test]
fn a_dropped_domain_leaves_no_domain_no_qemu_and_no_checkpoint_behind() {
    let domain = Domain::start("dropped", &[("vda", "qcow2", 16 * MIB)]);
    let name = domain.name().to_string();
    virsh(&["checkpoint-create-as", &name, "first", "--diskspec", "vda,checkpoint=bitmap"]).unwrap_or_else(|said| panic!("{said}"));
    assert!(qemu_of(&name).is_some(), "no qemu runs {name}");
    drop(domain);
    let names = virsh(&["list", "--all", "--name"]).unwrap_or_else(|said| panic!("{said}"));
    assert!(!names.lines().any(|line| line == name), "libvirt still lists {name}");
    assert_eq!(qemu_of(&name), None, "the qemu of {name} still runs");
    let metadata = format!("/var/lib/libvirt/qemu/checkpoint/{name}");
    assert!(!std::path::Path::new(&metadata).exists(), "{metadata} is left");
}

#[test]
fn a_domain_whose_qemu_is_killed_is_gone_and_its_completed_writes_stay() {
    let domain = Domain::start("killed", &[("vda", "raw", 16 * MIB)]);
    domain.write(0, 0x77, 0, MIB);
    assert!(qemu_of(domain.name()).is_some());
    domain.kill_qemu();
    assert!(!domain.is_running());
    assert_eq!(qemu_of(domain.name()), None);
    qemu_io(domain.disk_path(0), "raw", &["read -P 0x77 0 1M", "read -P 0 1M 15M"]);
}
