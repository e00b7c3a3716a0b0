//! A libvirt host for the VM-backup tests: the libvirtd that
//! `tests/libvirt/start` runs (`tests/run` starts it), and `Domain`, a
//! TCG guest with no OS (it idles in firmware) on qcow2 or raw virtio
//! disks in a temporary directory, transient or persistent. Tests write into its disks from
//! outside the guest (HMP qemu-io), stop it, or kill its qemu. Dropping it
//! destroys it and its checkpoints' metadata; it is started with
//! `--autodestroy` on a virsh session the test holds, so libvirt destroys
//! it too if the test process dies first (a timeout, Ctrl-C). Names are
//! unique per process and domain: tests run in parallel.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::{Pid, geteuid};

use crate::common::create_image;

/// The libvirt connection of every test.
pub const LIBVIRT: &str = "qemu:///system";

/// Runs `virsh -c qemu:///system ARGS`: its stdout, or what it said on
/// stderr.
pub fn virsh(args: &[&str]) -> Result<String, String> {
    let output = Command::new("virsh").args(["-c", LIBVIRT]).args(args).output().map_err(|error| format!("virsh: {error}"))?;
    if output.status.success() {
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    } else {
        Err(format!("virsh {args:?}: {}", String::from_utf8_lossy(&output.stderr).trim()))
    }
}

/// Panics, saying how to start it, unless libvirtd answers: a VM test
/// fails rather than being skipped.
pub fn require_libvirtd() {
    if let Err(said) = virsh(&["version"]) {
        if geteuid().is_root() {
            panic!("libvirtd is not running: run tests/libvirt/start (tests/run does) [{said}]");
        }
        panic!("libvirtd does not answer: run tests/libvirt/start, and the VM tests as root (qemu:///system is root's) [{said}]");
    }
}

/// A running domain and its disk images.
pub struct Domain {
    name: String,
    dir: tempfile::TempDir,
    disks: Vec<(String, PathBuf)>,
    /// The virsh session that created a transient domain with
    /// `--autodestroy`: closing its stdin ends the session, and libvirt
    /// destroys the domain. None for a persistent domain.
    session: Option<Child>,
    session_stdin: Option<ChildStdin>,
}

impl Domain {
    /// Creates the disks (`("vda", "qcow2", size)`, then vdb, ...) and
    /// starts a domain named `PREFIX-PID-N` on them, running once this
    /// returns.
    pub fn start(prefix: &str, disks: &[(&str, &str, u64)]) -> Domain {
        let (mut domain, xml_path) = Self::prepare(prefix, disks);
        // virsh reads commands from its stdin; `echo` marks when `create`
        // is done, whether it worked or not (its errors come before).
        let said_path = domain.dir.path().join("virsh-session.log");
        let said = std::fs::File::create(&said_path).expect("create the virsh session's log");
        let mut session = Command::new("virsh")
            .args(["-c", LIBVIRT])
            .stdin(Stdio::piped())
            .stdout(said.try_clone().expect("the virsh session's log, twice"))
            .stderr(said)
            .spawn()
            .expect("start virsh (tests/libvirt/start installs libvirt-clients)");
        let mut session_stdin = session.stdin.take().expect("virsh's stdin");
        writeln!(session_stdin, "create --autodestroy {}\necho created", xml_path.display()).expect("send virsh the create command");
        domain.session = Some(session);
        domain.session_stdin = Some(session_stdin);
        let deadline = Instant::now() + Duration::from_secs(30);
        let said = loop {
            let said = std::fs::read_to_string(&said_path).unwrap_or_default();
            let ended = domain.session.as_mut().expect("a session").try_wait().expect("virsh's status").is_some();
            if said.lines().any(|line| line == "created") || ended || Instant::now() > deadline {
                break said;
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        assert!(domain.is_running(), "the domain {} did not start: {said}", domain.name);
        domain
    }

    /// Like [`Domain::start`], but a persistent domain (`virsh define`),
    /// which outlives its qemu: after a crash it is shut off, keeps its
    /// checkpoints, and starts again with [`Domain::start_again`]. Dropping
    /// it undefines it.
    pub fn start_persistent(prefix: &str, disks: &[(&str, &str, u64)]) -> Domain {
        let (domain, xml_path) = Self::prepare(prefix, disks);
        virsh(&["define", &xml_path.to_string_lossy()]).unwrap_or_else(|said| panic!("{said}"));
        domain.start_again();
        domain
    }

    /// Starts a persistent domain that is shut off.
    pub fn start_again(&self) {
        virsh(&["start", &self.name]).unwrap_or_else(|said| panic!("{said}"));
        assert!(self.is_running(), "the domain {} did not start", self.name);
    }

    /// Names the domain, makes its disks and writes its XML.
    fn prepare(prefix: &str, disks: &[(&str, &str, u64)]) -> (Domain, PathBuf) {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        require_libvirtd();
        let name = format!("{prefix}-{}-{}", std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed));
        let dir = tempfile::tempdir().expect("a temporary directory for the domain's disks");
        let mut devices = String::new();
        let mut paths = Vec::new();
        for &(target, format, size) in disks {
            assert!(target.len() == 3 && target.starts_with("vd"), "disk names are vda, vdb, ... (got {target})");
            let path = dir.path().join(format!("{target}.{format}"));
            create_image(&path, format, &size.to_string());
            devices += &format!(
                "<disk type='file' device='disk'><driver name='qemu' type='{format}'/><source file='{}'/><target dev='{target}' bus='virtio'/></disk>\n",
                path.display()
            );
            paths.push((target.to_string(), path));
        }
        // No <graphics> at all (type='none' is refused); no balloon or USB
        // to emulate.
        let xml = format!(
            "<domain type='qemu'>
  <name>{name}</name>
  <memory unit='MiB'>128</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64'>hvm</type></os>
  <devices>
{devices}    <controller type='usb' model='none'/>
    <memballoon model='none'/>
  </devices>
</domain>
"
        );
        let xml_path = dir.path().join("domain.xml");
        std::fs::write(&xml_path, xml).expect("write the domain XML");
        (Domain { name, dir, disks: paths, session: None, session_stdin: None }, xml_path)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The domain's temporary directory, for a test's scratch files and
    /// sockets (removed with the domain).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The image file of disk `index` (0 is vda).
    pub fn disk_path(&self, index: usize) -> &Path {
        &self.disks[index].1
    }

    /// Whether libvirt has the domain running.
    pub fn is_running(&self) -> bool {
        virsh(&["domstate", &self.name]).is_ok_and(|state| state.trim() == "running")
    }

    /// Writes `length` bytes of `pattern` at `offset` of disk `index`, as
    /// the guest would, through qemu's own block layer (HMP qemu-io on the
    /// virtio device). The write is done when this returns.
    pub fn write(&self, index: usize, pattern: u8, offset: u64, length: u64) {
        let target = self.disks[index].0.as_bytes();
        // libvirt names a disk's device after its target: vdb is virtio-disk1.
        let device = format!("/machine/peripheral/virtio-disk{}/virtio-backend", target[2] - b'a');
        let log = PathBuf::from(format!("/var/log/libvirt/qemu/{}.log", self.name));
        let before = std::fs::metadata(&log).map(|meta| meta.len()).unwrap_or(0) as usize;
        let command = format!("qemu-io -d {device} \"write -P {pattern:#x} {offset} {length}\"");
        let answer = virsh(&["qemu-monitor-command", &self.name, "--hmp", &command]).unwrap_or_else(|said| panic!("{said}"));
        assert!(answer.trim().is_empty(), "HMP {command}: {answer}");
        // qemu-io reports on qemu's stderr, which is the domain's log.
        let done = format!("wrote {length}/{length} bytes at offset {offset}");
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let text = std::fs::read(&log).unwrap_or_default();
            let new = String::from_utf8_lossy(text.get(before..).unwrap_or_default());
            if new.contains(&done) {
                return;
            }
            assert!(!new.contains("failed") && Instant::now() < deadline, "HMP {command}: {}: {new}", log.display());
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Stops the domain (`virsh destroy`: qemu ends, and flushes, on
    /// SIGTERM); a transient domain is then gone from libvirt.
    pub fn destroy(&self) {
        virsh(&["destroy", &self.name]).unwrap_or_else(|said| panic!("{said}"));
    }

    /// `kill -9` of the domain's qemu, a crash: returns once libvirt has
    /// seen it (the domain is gone).
    pub fn kill_qemu(&self) {
        let pid_file = format!("/run/libvirt/qemu/{}.pid", self.name);
        let pid = std::fs::read_to_string(&pid_file).unwrap_or_else(|error| panic!("{pid_file}: {error}"));
        let pid: i32 = pid.trim().parse().unwrap_or_else(|_| panic!("{pid_file} holds {pid:?}, not a pid"));
        kill(Pid::from_raw(pid), Signal::SIGKILL).unwrap_or_else(|error| panic!("kill -9 {pid} (qemu of {}): {error}", self.name));
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.is_running() {
            assert!(Instant::now() < deadline, "libvirt still says {} runs 10 s after its qemu was killed", self.name);
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Domain {
    /// Destroys the domain, ignoring that it is already gone, after
    /// deleting its checkpoints' metadata (the bitmaps stay in the images,
    /// which go with the directory); ends the virsh session, and checks
    /// that libvirt no longer has the domain.
    fn drop(&mut self) {
        if let Ok(checkpoints) = virsh(&["checkpoint-list", "--name", &self.name]) {
            for checkpoint in checkpoints.lines().filter(|line| !line.is_empty()) {
                let _ = virsh(&["checkpoint-delete", "--metadata", &self.name, checkpoint]);
            }
        }
        let _ = virsh(&["destroy", &self.name]);
        drop(self.session_stdin.take());
        match self.session.as_mut() {
            Some(session) => drop(session.wait()),
            None => drop(virsh(&["undefine", &self.name])),
        }
        if !std::thread::panicking() {
            let deadline = Instant::now() + Duration::from_secs(10);
            while virsh(&["domstate", &self.name]).is_ok() {
                assert!(Instant::now() < deadline, "the domain {} is still there 10 s after it was destroyed", self.name);
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
}
