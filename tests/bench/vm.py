"""The running-VM rows of the benchmark: a full and an incremental backup
of a libvirt domain with `blockgate vm backup`, against virtnbdbackup on
a domain of the same disk and the same writes. Each run starts both
domains from one base image (1 GiB qcow2, its first 512 MiB random), takes
a full backup, writes 64 MiB into the disk from outside the guest (HMP
qemu-io), and takes an incremental. Time is the tool's whole run; bytes
stored are the sizes of the files it wrote. Needs libvirtd
(tests/libvirt/start) and root."""

import json
import os
import shutil
import socket
import statistics
import subprocess
import tempfile
import time

MIB = 1 << 20
GIB = 1 << 30

DOMAIN_XML = """<domain type='qemu'>
  <name>{name}</name>
  <memory unit='MiB'>128</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64'>hvm</type></os>
  <devices>
    <disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='{disk}'/><target dev='vda' bus='virtio'/></disk>
    <controller type='usb' model='none'/>
    <memballoon model='none'/>
  </devices>
</domain>
"""

# What changes between the full and the incremental: 64 MiB in two places.
WRITES = ("write -P 0x5a 256M 32M", "write -P 0x33 800M 32M")


def virsh(*args, check=True):
    return subprocess.run(["virsh", "-c", "qemu:///system", *args], capture_output=True, text=True, check=check).stdout


def stored_bytes(directory):
    return sum(os.path.getsize(os.path.join(root, name)) for root, _, names in os.walk(directory) for name in names)


class Domain:
    """A persistent TCG domain on a copy of the base image."""

    def __init__(self, name, base, work):
        self.name = name
        self.disk = os.path.join(work, f"{name}.qcow2")
        shutil.copyfile(base, self.disk)
        xml = os.path.join(work, f"{name}.xml")
        with open(xml, "w") as f:
            f.write(DOMAIN_XML.format(name=name, disk=self.disk))
        virsh("define", xml)
        virsh("start", name)

    def write(self):
        for command in WRITES:
            virsh("qemu-monitor-command", self.name, "--hmp",
                  f'qemu-io -d /machine/peripheral/virtio-disk0/virtio-backend "{command}"')
        # qemu-io answers on the domain's log once the write is done.
        log = f"/var/log/libvirt/qemu/{self.name}.log"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            with open(log, errors="replace") as f:
                if f.read().count("wrote 33554432/33554432 bytes") >= len(WRITES):
                    return
            time.sleep(0.05)
        raise RuntimeError(f"the writes into {self.name} did not complete")

    def remove(self):
        virsh("destroy", self.name, check=False)
        for checkpoint in virsh("checkpoint-list", self.name, "--name", check=False).split():
            virsh("checkpoint-delete", "--metadata", self.name, checkpoint, check=False)
        virsh("undefine", self.name, check=False)
        os.unlink(self.disk)


def timed(*cmd):
    started = time.monotonic()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.monotonic() - started


class Blockgate:
    """A blockgate-server with --libvirt and a control socket."""

    def __init__(self, binaries, work):
        self.binaries = binaries
        self.state = os.path.join(work, "bg-state")
        self.socket = os.path.join(work, "control.sock")
        self.process = subprocess.Popen(
            [os.path.join(binaries, "blockgate-server"), "--listen", f"127.0.0.1:{free_port()}",
             "--state-dir", self.state, "--control-socket", self.socket, "--libvirt", "--log", "warn"])
        deadline = time.monotonic() + 30
        while not os.path.exists(self.socket):
            if time.monotonic() > deadline:
                raise RuntimeError("blockgate-server did not start")
            time.sleep(0.05)

    def backup(self, vm, out, *extra):
        return timed(os.path.join(self.binaries, "blockgate"), "vm", "backup", "--control-socket", self.socket,
                     "--cacert", os.path.join(self.state, "ca.pem"), "--progress", "none", vm, "--out", out, *extra)

    def start_latency(self, vm):
        """Seconds from POST /vms/{vm}/backups to its 201 (then deleted)."""
        started = time.monotonic()
        answer = subprocess.run(["curl", "-sSf", "--unix-socket", self.socket, "-X", "POST", "-d", "{}",
                                 f"http://localhost/vms/{vm}/backups"], capture_output=True, text=True, check=True)
        elapsed = time.monotonic() - started
        backup = json.loads(answer.stdout)
        subprocess.run(["curl", "-sSf", "--unix-socket", self.socket, "-X", "DELETE",
                        f"http://localhost/vms/{vm}/backups/{backup['id']}"], check=True)
        virsh("checkpoint-delete", vm, backup["checkpoint"])
        return elapsed

    def stop(self):
        self.process.terminate()
        self.process.wait()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def base_image(work, dense):
    """1 GiB qcow2 whose first 512 MiB are random (from the dense workload)."""
    path = os.path.join(work, "vm-base.qcow2")
    if not os.path.exists(path):
        raw = os.path.join(work, "vm-base.raw")
        with open(dense, "rb") as source, open(raw, "wb") as target:
            for _ in range(512 * MIB // (64 * MIB)):
                target.write(source.read(64 * MIB))
            target.truncate(GIB)
        subprocess.run(["qemu-img", "convert", "-q", "-f", "raw", "-O", "qcow2", raw, path + ".tmp"], check=True)
        os.unlink(raw)
        os.rename(path + ".tmp", path)
    return path


def vm_measures(table, runs, work, dense, binaries):
    base = base_image(work, dense)
    scratch = tempfile.mkdtemp(prefix="bg-bench-vm-", dir="/tmp")
    server = Blockgate(binaries, scratch)
    samples = {key: [] for key in ("bg_full", "bg_inc", "vb_full", "vb_inc", "bg_full_bytes", "bg_inc_bytes",
                                   "vb_full_bytes", "vb_inc_bytes", "latency")}
    try:
        for run in range(runs):
            # blockgate
            domain = Domain(f"bench-bg-{os.getpid()}-{run}", base, scratch)
            out = os.path.join(scratch, f"bg-{run}")
            try:
                samples["latency"].append(server.start_latency(domain.name))
                samples["bg_full"].append(server.backup(domain.name, out, "--checkpoint", "full"))
                full_bytes = stored_bytes(out)
                domain.write()
                samples["bg_inc"].append(server.backup(domain.name, out, "--since", "full", "--checkpoint", "inc"))
                samples["bg_full_bytes"].append(full_bytes)
                samples["bg_inc_bytes"].append(stored_bytes(out) - full_bytes)
            finally:
                domain.remove()
                shutil.rmtree(out, ignore_errors=True)
            # virtnbdbackup, on a domain of the same disk and writes
            domain = Domain(f"bench-vb-{os.getpid()}-{run}", base, scratch)
            out = os.path.join(scratch, f"vb-{run}")
            try:
                samples["vb_full"].append(timed("virtnbdbackup", "-d", domain.name, "-l", "full", "-o", out))
                full_bytes = stored_bytes(out)
                domain.write()
                samples["vb_inc"].append(timed("virtnbdbackup", "-d", domain.name, "-l", "inc", "-o", out))
                samples["vb_full_bytes"].append(full_bytes)
                samples["vb_inc_bytes"].append(stored_bytes(out) - full_bytes)
            finally:
                domain.remove()
                shutil.rmtree(out, ignore_errors=True)
    finally:
        server.stop()
        shutil.rmtree(scratch, ignore_errors=True)
    median = {key: statistics.median(values) for key, values in samples.items()}
    for kind, label in (("full", "VM full backup (1 GiB disk, 512 MiB data)"), ("inc", "VM incremental backup (64 MiB changed)")):
        theirs, ours = median[f"vb_{kind}"], median[f"bg_{kind}"]
        table.add(label, "virtnbdbackup", theirs, ours, theirs / ours, ">= 1x", theirs / ours >= 1, "s")
        theirs, ours = median[f"vb_{kind}_bytes"] / MIB, median[f"bg_{kind}_bytes"] / MIB
        table.add("  bytes stored", "virtnbdbackup", theirs, ours, ours / theirs, "<= 1x", ours / theirs <= 1, "MiB")
    table.add("VM backup start (POST to 201)", "-", None, median["latency"], None, "(info)", None, "s")
