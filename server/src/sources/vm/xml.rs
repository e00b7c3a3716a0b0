//! The libvirt XML blockgate reads (a domain's disks, a checkpoint) and
//! writes (a pull-mode backup, the checkpoint made with it). Reading
//! takes only the elements named here and ignores the rest; writing
//! escapes every value, though ids and disk names are checked before
//! they get here.

use std::path::Path;

/// A disk of a domain, as its XML describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DomainDisk {
    /// The target (`vda`): the disk's name everywhere in the API.
    pub name: String,
    /// The file or block device behind it.
    pub file: String,
    /// The driver's format (`qcow2`, `raw`).
    pub format: String,
}

impl DomainDisk {
    /// True if the disk can hold persistent bitmaps (checkpoints).
    pub fn has_checkpoints(&self) -> bool {
        self.format == "qcow2"
    }
}

/// A checkpoint, as its XML describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckpointXml {
    /// The checkpoint's name: its id in the API.
    pub name: String,
    /// Seconds since the epoch.
    pub created: i64,
    /// The checkpoint it follows.
    pub parent: Option<String>,
    /// The disks that carry a bitmap for it, and that bitmap's name.
    pub disks: Vec<(String, String)>,
}

fn parse(xml: &str) -> Result<roxmltree::Document<'_>, String> {
    roxmltree::Document::parse(xml).map_err(|error| format!("libvirt returned XML that does not parse: {error}"))
}

fn child<'a>(node: roxmltree::Node<'a, 'a>, name: &str) -> Option<roxmltree::Node<'a, 'a>> {
    node.children().find(|child| child.has_tag_name(name))
}

/// What a disk's `<source>` names: a file or block device's path, a
/// network disk as `PROTOCOL:NAME` (or its host's socket), a storage-pool
/// volume as `POOL/VOLUME`.
fn source_text(source: roxmltree::Node<'_, '_>) -> Option<String> {
    if let Some(path) = source.attribute("file").or_else(|| source.attribute("dev")) {
        return Some(path.to_string());
    }
    if let Some(protocol) = source.attribute("protocol") {
        let host = child(source, "host").and_then(|host| host.attribute("socket").or_else(|| host.attribute("name")));
        let name = source.attribute("name").or(host).unwrap_or_default();
        return Some(format!("{protocol}:{name}"));
    }
    match (source.attribute("pool"), source.attribute("volume")) {
        (Some(pool), Some(volume)) => Some(format!("{pool}/{volume}")),
        _ => None,
    }
}

/// The disks (`<disk device='disk'>` with a source: files, block devices,
/// network disks, pool volumes) of a domain's XML; CD-ROMs and floppies
/// are not backed up.
pub fn domain_disks(xml: &str) -> Result<Vec<DomainDisk>, String> {
    let document = parse(xml)?;
    let Some(devices) = child(document.root_element(), "devices") else { return Ok(Vec::new()) };
    Ok(devices
        .children()
        .filter(|disk| disk.has_tag_name("disk") && disk.attribute("device").unwrap_or("disk") == "disk")
        .filter_map(|disk| {
            let name = child(disk, "target")?.attribute("dev")?.to_string();
            let file = source_text(child(disk, "source")?)?;
            let format = child(disk, "driver").and_then(|driver| driver.attribute("type")).unwrap_or("raw").to_string();
            Some(DomainDisk { name, file, format })
        })
        .collect())
}

/// The unix socket a running backup job exports on, from its XML.
pub fn backup_socket(xml: &str) -> Option<String> {
    let document = parse(xml).ok()?;
    let server = child(document.root_element(), "server")?;
    server.attribute("socket").map(str::to_string)
}

/// A checkpoint's XML.
pub fn checkpoint(xml: &str) -> Result<CheckpointXml, String> {
    let document = parse(xml)?;
    let root = document.root_element();
    let text = |name: &str| child(root, name).and_then(|node| node.text()).map(str::trim).map(str::to_string);
    let name = text("name").ok_or("a checkpoint without a name")?;
    let created = text("creationTime").and_then(|time| time.parse().ok()).unwrap_or(0);
    let parent =
        child(root, "parent").and_then(|parent| child(parent, "name")).and_then(|node| node.text()).map(|text| text.trim().to_string());
    let disks = child(root, "disks")
        .map(|disks| {
            disks
                .children()
                .filter(|disk| disk.has_tag_name("disk") && disk.attribute("checkpoint") == Some("bitmap"))
                .filter_map(|disk| {
                    let disk_name = disk.attribute("name")?.to_string();
                    let bitmap = disk.attribute("bitmap").unwrap_or(&name).to_string();
                    Some((disk_name, bitmap))
                })
                .collect()
        })
        .unwrap_or_default();
    Ok(CheckpointXml { name, created, parent, disks })
}

/// `text` escaped for an XML attribute or element.
fn escape(text: &str) -> String {
    text.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('\'', "&apos;").replace('"', "&quot;")
}

/// How one disk takes part in a backup job.
#[derive(Debug, Clone)]
pub struct BackupDisk<'a> {
    /// The disk's target.
    pub name: &'a str,
    /// Where qemu keeps the blocks the VM overwrites during the job.
    pub scratch: &'a Path,
    /// Only what changed since the job's `<incremental>` checkpoint (else
    /// the whole disk: a raw disk, or a full backup).
    pub incremental: bool,
}

/// A pull-mode backup job exporting `disks` on the unix socket `socket`;
/// `since` is the checkpoint the incremental disks start from. Every
/// other disk of the domain is named with `backup='no'`.
pub fn backup(socket: &Path, since: Option<&str>, disks: &[BackupDisk<'_>], others: &[&str]) -> String {
    let mut xml = String::from("<domainbackup mode='pull'>");
    if let Some(since) = since {
        xml += &format!("<incremental>{}</incremental>", escape(since));
    }
    xml += &format!("<server transport='unix' socket='{}'/><disks>", escape(&socket.to_string_lossy()));
    for disk in disks {
        let mode = if disk.incremental { "incremental" } else { "full" };
        xml += &format!(
            "<disk name='{}' backup='yes' type='file' backupmode='{mode}'><scratch file='{}'/></disk>",
            escape(disk.name),
            escape(&disk.scratch.to_string_lossy())
        );
    }
    for name in others {
        xml += &format!("<disk name='{}' backup='no'/>", escape(name));
    }
    xml + "</disks></domainbackup>"
}

/// A checkpoint `id` with a bitmap on each of `bitmap_disks` and none on
/// `others`.
pub fn new_checkpoint(id: &str, bitmap_disks: &[&str], others: &[&str]) -> String {
    let mut xml = format!("<domaincheckpoint><name>{}</name><disks>", escape(id));
    for name in bitmap_disks {
        xml += &format!("<disk name='{}' checkpoint='bitmap'/>", escape(name));
    }
    for name in others {
        xml += &format!("<disk name='{}' checkpoint='no'/>", escape(name));
    }
    xml + "</disks></domaincheckpoint>"
}

#[cfg(test)]
mod tests {
    use super::*;

    const DOMAIN: &str = "<domain type='qemu'><name>vm1</name><devices>\
        <disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='/images/a.qcow2'/><target dev='vda' bus='virtio'/></disk>\
        <disk type='block' device='disk'><driver name='qemu' type='raw'/><source dev='/dev/vg/lv'/><target dev='vdb' bus='virtio'/></disk>\
        <disk type='file' device='cdrom'><source file='/iso/x.iso'/><target dev='sda'/></disk>\
        <disk type='network' device='disk'><source protocol='nbd' name='x'/><target dev='vdc'/></disk>\
        <disk type='volume' device='disk'><driver type='qcow2'/><source pool='p' volume='v'/><target dev='vdd'/></disk>\
        </devices></domain>";

    #[test]
    fn a_domains_disks_are_every_disk_with_a_source() {
        let disks = domain_disks(DOMAIN).unwrap();
        assert_eq!(
            disks,
            vec![
                DomainDisk { name: "vda".into(), file: "/images/a.qcow2".into(), format: "qcow2".into() },
                DomainDisk { name: "vdb".into(), file: "/dev/vg/lv".into(), format: "raw".into() },
                DomainDisk { name: "vdc".into(), file: "nbd:x".into(), format: "raw".into() },
                DomainDisk { name: "vdd".into(), file: "p/v".into(), format: "qcow2".into() },
            ]
        );
        assert!(disks[0].has_checkpoints() && !disks[1].has_checkpoints());
        assert!(domain_disks("<domain").is_err());
    }

    #[test]
    fn a_checkpoint_names_its_parent_and_bitmap_disks() {
        let xml = "<domaincheckpoint><name>cp2</name><parent><name>cp1</name></parent><creationTime>1764547200</creationTime>\
            <disks><disk name='vda' checkpoint='bitmap' bitmap='cp2'/><disk name='vdb' checkpoint='no'/></disks></domaincheckpoint>";
        let parsed = checkpoint(xml).unwrap();
        assert_eq!(parsed.name, "cp2");
        assert_eq!(parsed.parent.as_deref(), Some("cp1"));
        assert_eq!(parsed.created, 1_764_547_200);
        assert_eq!(parsed.disks, vec![("vda".to_string(), "cp2".to_string())]);
    }

    #[test]
    fn written_xml_escapes_what_it_is_given_and_parses() {
        let xml = backup(
            Path::new("/s/a'b<c>.sock"),
            Some("cp&1"),
            &[BackupDisk { name: "vda", scratch: Path::new("/s/vda.qcow2"), incremental: true }],
            &["vdb"],
        );
        let document = roxmltree::Document::parse(&xml).unwrap();
        let server = document.descendants().find(|node| node.has_tag_name("server")).unwrap();
        assert_eq!(server.attribute("socket"), Some("/s/a'b<c>.sock"));
        let incremental = document.descendants().find(|node| node.has_tag_name("incremental")).unwrap();
        assert_eq!(incremental.text(), Some("cp&1"));
        assert_eq!(backup_socket(&xml).as_deref(), Some("/s/a'b<c>.sock"));
        let checkpoint_xml = new_checkpoint("cp2", &["vda"], &["vdb"]);
        let parsed = checkpoint(&checkpoint_xml).unwrap();
        assert_eq!(parsed.disks, vec![("vda".to_string(), "cp2".to_string())]);
    }
}
