"""blockgate benchmark: the measures of docs/benchmarks.md, side by side
with the peers in the same run (nbdcopy on the same qemu-nbd export,
ovirt-imageio's daemon and client on the same export and TLS certificate,
curl as the common client). Each measure runs several times, peers
interleaved, and the median is reported. Prints one table.

Run through tests/bench/run, which installs the peers and builds blockgate.
Options: --runs N (default 3), --work DIR (default target/bench-work).
"""

import argparse
import http.client
import json
import os
import resource
import shutil
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time

from vm import vm_measures

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
BIN = os.path.join(ROOT, "target", "release")
GIB = 1 << 30
MIB = 1 << 20


def run(*cmd, **kwargs):
    return subprocess.run(cmd, check=True, **kwargs)


def timed(*cmd):
    started = time.monotonic()
    run(*cmd, stdout=subprocess.DEVNULL)
    return time.monotonic() - started


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(check, what, timeout=60):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.05)
    sys.exit(f"bench: timed out waiting for {what}")


def proc_status(pid, key):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def cpu_seconds(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Workloads:
    """The images of docs/benchmarks.md."""

    def __init__(self, work):
        self.work = work
        self.dense = os.path.join(work, "dense.raw")
        self.upload = os.path.join(work, "upload.raw")
        self.sparse = os.path.join(work, "sparse.raw")
        self.sparse_data = os.path.join(work, "sparse-data.raw")
        self.huge = os.path.join(work, "huge-sparse.qcow2")
        self.incremental = os.path.join(work, "incremental.qcow2")
        self.upload_owned = os.path.join(work, "upload-owned.raw")

    def make(self):
        self.make_dense()
        self.make_others()

    def make_dense(self):
        if not os.path.exists(self.dense):
            print("bench: making dense (2 GiB random)...", file=sys.stderr)
            with open(self.dense + ".tmp", "wb") as f:
                for _ in range(2 * GIB // (64 * MIB)):
                    f.write(os.urandom(64 * MIB))
            os.rename(self.dense + ".tmp", self.dense)

    def make_others(self):
        for path in (self.upload, self.upload_owned):
            with open(path, "wb") as f:
                f.truncate(2 * GIB)
        if not os.path.exists(self.sparse):
            print("bench: making sparse (2 GiB, 32 x 1 MiB of data)...", file=sys.stderr)
            with open(self.sparse, "wb") as f:
                f.truncate(2 * GIB)
                for i in range(32):
                    f.seek(i * (2 * GIB // 32))
                    f.write(os.urandom(MIB))
            with open(self.sparse_data, "wb") as f:
                f.write(os.urandom(32 * MIB))
        if not os.path.exists(self.huge):
            print("bench: making huge-sparse (1 TiB qcow2, 4000 extents of 256 KiB)...", file=sys.stderr)
            run("qemu-img", "create", "-q", "-f", "qcow2", self.huge + ".tmp", "1T")
            commands = []
            for i in range(4000):
                commands += ["-c", f"write -P {i % 250 + 1} {i * 256}M 256k"]
            run("qemu-io", "-f", "qcow2", *commands, self.huge + ".tmp", stdout=subprocess.DEVNULL)
            os.rename(self.huge + ".tmp", self.huge)
        if not os.path.exists(self.incremental):
            print("bench: making incremental (2 GiB qcow2, bitmap, 1% of blocks dirty)...", file=sys.stderr)
            path = self.incremental + ".tmp"
            run("qemu-img", "create", "-q", "-f", "qcow2", path, "2G")
            run("qemu-io", "-f", "qcow2", "-c", "write -P 1 0 1G", path, stdout=subprocess.DEVNULL)
            run("qemu-img", "bitmap", "--add", "-g", "64K", path, "b1")
            commands = []
            for i in range(328):
                commands += ["-c", f"write -P 2 {i * 100 * 64}k 64k"]
            run("qemu-io", "-f", "qcow2", *commands, path, stdout=subprocess.DEVNULL)
            os.rename(path, self.incremental)


class Services:
    """qemu-nbd exports, blockgate and imageio's daemon on them."""

    def __init__(self, work, workloads):
        self.work = work
        self.w = workloads
        self.children = []
        self.sockets = {}

    def start(self):
        exports = {
            "dense": (self.w.dense, "raw", ["-r"]),
            "upload": (self.w.upload, "raw", []),
            "sparse": (self.w.sparse, "raw", ["-r"]),
            "sparse-data": (self.w.sparse_data, "raw", ["-r"]),
            "huge": (self.w.huge, "qcow2", ["-r"]),
            "incremental": (self.w.incremental, "qcow2", ["-r", "-B", "b1"]),
        }
        for name, (path, fmt, extra) in exports.items():
            sock = os.path.join(self.work, f"{name}.sock")
            self.spawn("qemu-nbd", "-t", "-e", "16", "-A", "-f", fmt, "-k", sock, *extra, path)
            self.sockets[name] = sock
            wait_for(lambda: os.path.exists(sock), f"qemu-nbd {name}")
        # Storage that costs nothing, the size of the dense workload: it
        # discards writes and reads as zeros, so a transfer through it
        # measures HTTP and TLS alone.
        sock = os.path.join(self.work, "null.sock")
        size = os.path.getsize(self.w.dense)
        self.spawn("qemu-nbd", "-t", "-e", "16", "-A", "-k", sock, "--image-opts", f"driver=null-co,size={size},read-zeroes=on")
        self.sockets["null"] = sock
        wait_for(lambda: os.path.exists(sock), "qemu-nbd null")
        self.state = os.path.join(self.work, "state")
        self.port = self.start_blockgate()
        self.ca = os.path.join(self.state, "ca.pem")
        self.imageio_port = self.start_imageio()

    def spawn(self, *cmd, **kwargs):
        child = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, **kwargs)
        self.children.append(child)
        return child

    def image_args(self):
        args = []
        for name, sock in self.sockets.items():
            spec = f"{name}=nbd+unix:///?socket={sock}"
            if name not in ("upload", "null"):
                spec += ",ro"
            if name == "incremental":
                spec += ",bitmap=b1"
            args += ["--image", spec]
        # The same data through blockgate's own qemu-storage-daemon, and a
        # qcow2 overlay on the incremental workload for checkpoints.
        self.chain = os.path.join(self.work, "chain.qcow2")
        if not os.path.exists(self.chain):
            run("qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", self.w.incremental, self.chain)
        args += ["--image", f"dense-owned={self.w.dense},ro", "--image", f"upload-owned={self.w.upload_owned}",
                 "--image", f"chain={self.chain}"]
        return args

    def start_blockgate(self):
        port = free_port()
        self.blockgate = self.spawn(
            os.path.join(BIN, "blockgate-server"), "--listen", f"127.0.0.1:{port}", "--state-dir", self.state,
            "--log", "warn", *self.image_args())
        ca = os.path.join(self.state, "ca.pem")
        wait_for(lambda: os.path.exists(ca) and curl_ok(f"https://localhost:{port}/info/", ca), "blockgate")
        return port

    def restart_blockgate(self):
        """A fresh server process, so its peak RSS covers one measure."""
        self.blockgate.terminate()
        self.blockgate.wait()
        self.children.remove(self.blockgate)
        self.port = self.start_blockgate()

    def start_imageio(self):
        port = free_port()
        conf = os.path.join(self.work, "imageio")
        run_dir = os.path.join(conf, "run")
        os.makedirs(os.path.join(conf, "conf.d"), exist_ok=True)
        os.makedirs(run_dir, exist_ok=True)
        control = os.path.join(run_dir, "control.sock")
        with open(os.path.join(conf, "conf.d", "50-bench.conf"), "w") as f:
            f.write(f"""[daemon]
drop_privileges = false
systemd_enable = false
run_dir = {run_dir}
[tls]
enable = true
key_file = {os.path.join(self.state, "key.pem")}
cert_file = {os.path.join(self.state, "cert.pem")}
ca_file = {os.path.join(self.state, "ca.pem")}
[remote]
host = 127.0.0.1
port = {port}
[local]
enable = false
[control]
transport = unix
socket = {control}
[handlers]
keys = stderr
[logger_root]
level = WARNING
handlers = stderr
""")
        imageio = os.path.join(os.path.dirname(sys.executable), "ovirt-imageio")
        self.spawn(imageio, "-c", conf)
        wait_for(lambda: os.path.exists(control), "imageio's control socket")
        for name in ("dense", "upload"):
            size = os.path.getsize(self.w.dense)
            ticket = {"uuid": name, "size": size, "url": f"nbd:unix:{self.sockets[name]}",
                      "ops": ["read", "write"] if name == "upload" else ["read"], "timeout": 3600}
            run("curl", "-sSf", "--unix-socket", control, "-X", "PUT", "--data-binary", json.dumps(ticket),
                f"http://localhost/tickets/{name}", stdout=subprocess.DEVNULL)
        wait_for(lambda: curl_ok(f"https://localhost:{port}/images/dense", self.ca, "-X", "OPTIONS"), "imageio")
        return port

    def url(self, name):
        return f"https://localhost:{self.port}/images/{name}"

    def imageio_url(self, name):
        return f"https://localhost:{self.imageio_port}/images/{name}"

    def stop(self):
        for child in reversed(self.children):
            child.terminate()
        for child in self.children:
            try:
                child.wait(timeout=15)
            except subprocess.TimeoutExpired:
                child.kill()


def curl_ok(url, ca, *extra):
    return subprocess.run(["curl", "-sSf", "-o", "/dev/null", "--cacert", ca, *extra, url],
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode == 0


def curl_time(url, ca, *extra):
    started = time.monotonic()
    run("curl", "-sSf", "-o", "/dev/null", "--cacert", ca, *extra, url)
    return time.monotonic() - started


class Table:
    def __init__(self):
        self.rows = []

    def add(self, measure, peer, peer_value, ours, ratio, target, met, unit):
        self.rows.append((measure, peer, peer_value, ours, ratio, target, met, unit))

    def print(self):
        head = ("measure", "peer", "peer", "blockgate", "ratio", "target", "")
        lines = [head]
        for measure, peer, peer_value, ours, ratio, target, met, unit in self.rows:
            fmt = (lambda v: "-" if v is None else f"{v:.3f} {unit}")
            lines.append((measure, peer, fmt(peer_value), fmt(ours), "-" if ratio is None else f"{ratio:.2f}x",
                          target, "" if met is None else ("met" if met else "MISSED")))
        widths = [max(len(str(line[i])) for line in lines) for i in range(len(head))]
        for index, line in enumerate(lines):
            print("  ".join(str(cell).ljust(width) for cell, width in zip(line, widths)).rstrip())
            if index == 0:
                print("  ".join("-" * width for width in widths))


def median_of(runs, measure):
    return statistics.median(measure() for _ in range(runs))


def interleaved(runs, *measures):
    """Runs each measure `runs` times, alternating; the medians."""
    samples = [[] for _ in measures]
    for _ in range(runs):
        for index, measure in enumerate(measures):
            samples[index].append(measure())
    return [statistics.median(s) for s in samples]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--work", default=os.path.join(ROOT, "target", "bench-work"))
    parser.add_argument("--only-checkpoints", action="store_true", help="only the qemu-storage-daemon and checkpoint measures")
    parser.add_argument("--only-vm", action="store_true", help="only the running-VM backup measures (libvirt)")
    args = parser.parse_args()
    os.makedirs(args.work, exist_ok=True)
    workloads = Workloads(args.work)
    table = Table()
    try:
        if args.only_vm:
            workloads.make_dense()
            vm_measures(table, args.runs, args.work, workloads.dense, BIN)
        else:
            workloads.make()
            run_all(table, workloads, args)
    finally:
        # What was measured is printed even when a later measure fails.
        cpu = subprocess.run(["sh", "-c", "grep -m1 'model name' /proc/cpuinfo | cut -d: -f2"], capture_output=True, text=True).stdout.strip()
        print(f"\nblockgate benchmark, medians of {args.runs} runs, {os.cpu_count()} cores ({cpu}), loopback, warm page cache\n")
        table.print()


def run_all(table, workloads, args):
    """Every measure but --only-vm's, with the services they need."""
    tmp = tempfile.mkdtemp(prefix="bg-bench-", dir="/tmp")
    services = Services(tmp, workloads)
    services.start()
    out = os.path.join(args.work, "out.raw")
    try:
        checkpoint_measures(table, services, args.runs)
        if not args.only_checkpoints:
            peer_measures(table, services, workloads, args.runs, out)
    finally:
        services.stop()
        shutil.rmtree(tmp, ignore_errors=True)
        if os.path.exists(out):
            os.unlink(out)
    if not args.only_checkpoints:
        vm_measures(table, args.runs, args.work, workloads.dense, BIN)


def https(services):
    context = ssl.create_default_context(cafile=services.ca)
    return http.client.HTTPSConnection("localhost", services.port, context=context)


def first_byte_and_whole(services, path):
    """Seconds to the first byte of a GET's body, and to its end."""
    connection = https(services)
    connection.connect()
    started = time.monotonic()
    connection.request("GET", path)
    response = connection.getresponse()
    response.read(1)
    first = time.monotonic() - started
    while response.read(1 << 20):
        pass
    whole = time.monotonic() - started
    connection.close()
    return first, whole


def checkpoint_measures(table, services, runs):
    """The owned qemu-storage-daemon against qemu-nbd, and checkpoints."""
    ca = services.ca
    qemu_nbd, daemon = interleaved(
        runs,
        lambda: curl_time(services.url("dense"), ca),
        lambda: curl_time(services.url("dense-owned"), ca),
    )
    table.add("dense GET via qemu-storage-daemon", "via qemu-nbd", qemu_nbd, daemon, qemu_nbd / daemon, ">= 0.95x", qemu_nbd / daemon >= 0.95, "s")
    dense = services.w.dense
    range_header = f"Content-Range: bytes 0-{2 * GIB - 1}/*"
    qemu_nbd, daemon = interleaved(
        runs,
        lambda: curl_time(services.url("upload"), ca, "-T", dense, "-H", range_header),
        lambda: curl_time(services.url("upload-owned"), ca, "-T", dense, "-H", range_header),
    )
    table.add("dense PUT via qemu-storage-daemon", "via qemu-nbd", qemu_nbd, daemon, qemu_nbd / daemon, ">= 0.95x", qemu_nbd / daemon >= 0.95, "s")

    connection = https(services)

    def request(method, path, body=None):
        connection.request(method, path, body=body, headers={"Content-Type": "application/json"} if body else {})
        response = connection.getresponse()
        data = response.read()
        if response.status >= 300:
            sys.exit(f"bench: {method} {path}: {response.status} {data!r}")
        return data

    def create(index):
        started = time.monotonic()
        request("POST", "/images/chain/checkpoints", json.dumps({"id": f"bench-{index}"}))
        return time.monotonic() - started

    latencies = [create(index) for index in range(15)]
    for index in range(15):
        request("DELETE", f"/images/chain/checkpoints/bench-{index}")
    create = statistics.median(latencies)
    table.add("checkpoint create (POST)", "-", None, create, None, "< 0.100 s", create < 0.1, "s")

    # 1% of the blocks change after checkpoint c0, as in the incremental workload.
    request("POST", "/images/chain/checkpoints", json.dumps({"id": "c0"}))
    block = os.urandom(64 * 1024)
    for i in range(328):
        offset = i * 100 * 64 * 1024
        connection.request("PUT", "/images/chain?flush=n", body=block,
                           headers={"Content-Range": f"bytes {offset}-{offset + len(block) - 1}/*"})
        response = connection.getresponse()
        response.read()
    request("PATCH", "/images/chain", json.dumps({"op": "flush"}))

    samples = [first_byte_and_whole(services, "/images/chain?format=sparse&since=c0") for _ in range(runs)]
    connection.close()
    first = statistics.median(s[0] for s in samples)
    table.add("incremental since checkpoint, first byte", "-", None, first, None, "< 0.100 s", first < 0.1, "s")
    table.add("incremental since checkpoint, whole (1% dirty)", "-", None, statistics.median(s[1] for s in samples), None, "(info)", None, "s")


def peer_measures(table, services, workloads, runs, out):
    """The measures of docs/benchmarks.md against the peers."""
    ca = services.ca
    blockgate_cli = os.path.join(BIN, "blockgate")
    dense_gib = os.path.getsize(workloads.dense) / GIB

    def server_cpu(measure):
        """A blockgate measure that also reports the server's CPU seconds per GiB moved."""
        def run_once():
            before = cpu_seconds(services.blockgate.pid)
            wall = measure()
            cpu.append((cpu_seconds(services.blockgate.pid) - before) / dense_gib)
            return wall
        cpu = []
        return run_once, cpu

    def cpu_share(measure):
        """A measure that also reports the CPU its client, the server and
        the qemu-nbd exports used together, as a percentage of the
        machine's cores over its wall time (near 100: the cores are what
        bounds it)."""
        shares = []

        def run_once():
            def used():
                children = resource.getrusage(resource.RUSAGE_CHILDREN)
                exports = [child.pid for child in services.children if child.args[0] == "qemu-nbd"]
                return children.ru_utime + children.ru_stime + sum(cpu_seconds(pid) for pid in [services.blockgate.pid, *exports])
            before = used()
            wall = measure()
            shares.append(100 * (used() - before) / (wall * os.cpu_count()))
            return wall
        return run_once, shares

    # The NBD ceilings, measured beside the HTTP transfers: nbdcopy reading
    # the export to null:, and writing a local raw file into it (flushed).
    ceiling_read = lambda: timed("nbdcopy", f"nbd+unix:///?socket={services.sockets['dense']}", "null:")
    ceiling_write = lambda: timed("nbdcopy", "--flush", workloads.dense, f"nbd+unix:///?socket={services.sockets['upload']}")

    # Dense download, one curl stream, HTTP/2 (curl's default) and
    # HTTP/1.1, against the ceiling; imageio's daemon for scale.
    get_h2, get_h2_cpu = server_cpu(lambda: curl_time(services.url("dense"), ca))
    get_h1, get_h1_cpu = server_cpu(lambda: curl_time(services.url("dense"), ca, "--http1.1"))
    ceiling, imageio_get, ours_h2, ours_h1 = interleaved(
        runs, ceiling_read, lambda: curl_time(services.imageio_url("dense"), ca), get_h2, get_h1)
    for label, ours, cpu, cpu_target in (("h2", ours_h2, get_h2_cpu, 0.6), ("h1.1", ours_h1, get_h1_cpu, 0.5)):
        table.add(f"dense GET, curl {label}", "nbdcopy to null:", ceiling, ours, ceiling / ours, ">= 0.95x", ceiling / ours >= 0.95, "s")
        cpu = statistics.median(cpu)
        table.add(f"  server CPU per GiB (GET {label})", "-", None, cpu, None, f"<= {cpu_target} s", cpu <= cpu_target, "s")
    table.add("  dense GET, imageio's daemon (h1.1)", "-", None, imageio_get, None, "(info)", None, "s")
    # The same GETs from storage that costs nothing (zeros the server sends
    # from memory, no NBD read): HTTP and TLS alone against the ceiling.
    null_h2, null_h2_cpu = server_cpu(lambda: curl_time(services.url("null"), ca))
    null_h1, null_h1_cpu = server_cpu(lambda: curl_time(services.url("null"), ca, "--http1.1"))
    null_h2, null_h1 = interleaved(runs, null_h2, null_h1)
    for label, ours, cpu in (("h2", null_h2, null_h2_cpu), ("h1.1", null_h1, null_h1_cpu)):
        table.add(f"  GET {label} of a null export (no storage)", "nbdcopy to null:", ceiling, ours, ceiling / ours, "(info)", None, "s")
        table.add(f"  server CPU per GiB (GET {label}, null export)", "-", None, statistics.median(cpu), None, "(info)", None, "s")

    # Dense upload, one curl stream, against nbdcopy --flush from the same
    # local file; the PUT flushes too (its default).
    range_header = f"Content-Range: bytes 0-{os.path.getsize(workloads.dense) - 1}/*"
    put_args = ("-T", workloads.dense, "-H", range_header)
    put, put_cpu = server_cpu(lambda: curl_time(services.url("upload"), ca, *put_args))
    put_h1, put_h1_cpu = server_cpu(lambda: curl_time(services.url("upload"), ca, "--http1.1", *put_args))
    put_h1, put_h1_share = cpu_share(put_h1)
    ceiling_write, ceiling_write_share = cpu_share(ceiling_write)
    ceiling_up, imageio_put, ours, ours_h1 = interleaved(
        runs, ceiling_write, lambda: curl_time(services.imageio_url("upload"), ca, *put_args), put, put_h1)
    for label, ours, cpu in (("h2", ours, put_cpu), ("h1.1", ours_h1, put_h1_cpu)):
        ratio = ceiling_up / ours
        table.add(f"dense PUT, curl {label}", "nbdcopy --flush", ceiling_up, ours, ratio, ">= 0.8x", ratio >= 0.8, "s")
        cpu = statistics.median(cpu)
        table.add(f"  server CPU per GiB (PUT {label})", "-", None, cpu, None, "<= 0.7 s", cpu <= 0.7, "s")
    table.add("  CPU of client, server and qemu-nbd, % of cores (PUT h1.1)", "nbdcopy --flush", statistics.median(ceiling_write_share),
              statistics.median(put_h1_share), None, "(info)", None, "%")
    table.add("  dense PUT, imageio's daemon (h1.1)", "-", None, imageio_put, None, "(info)", None, "s")
    # The same PUTs into storage that discards them: HTTP and TLS alone.
    null_put, null_put_cpu = server_cpu(lambda: curl_time(services.url("null"), ca, *put_args))
    null_put_h1, null_put_h1_cpu = server_cpu(lambda: curl_time(services.url("null"), ca, "--http1.1", *put_args))
    null_put, null_put_h1 = interleaved(runs, null_put, null_put_h1)
    for label, ours, cpu in (("h2", null_put, null_put_cpu), ("h1.1", null_put_h1, null_put_h1_cpu)):
        table.add(f"  PUT {label} into a null export (no storage)", "nbdcopy --flush", ceiling_up, ours, ceiling_up / ours, "(info)", None, "s")
        table.add(f"  server CPU per GiB (PUT {label}, null export)", "-", None, statistics.median(cpu), None, "(info)", None, "s")

    # A restore as fast as a plain upload: the dense full stream PUT with
    # format=sparse against the plain PUT of the same bytes.
    full_stream = os.path.join(os.path.dirname(out), "dense.sparse")
    run("curl", "-sSf", "-o", full_stream, "--cacert", ca, services.url("dense") + "?format=sparse")
    restore, restore_cpu = server_cpu(lambda: curl_time(services.url("upload") + "?format=sparse", ca, "-T", full_stream))
    unchecked, unchecked_cpu = server_cpu(
        lambda: curl_time(services.url("upload") + "?format=sparse&checksum=n", ca, "-T", full_stream))
    plain, plain_cpu = server_cpu(lambda: curl_time(services.url("upload"), ca, *put_args))
    plain, sparse_restore, unchecked = interleaved(runs, plain, restore, unchecked)
    os.unlink(full_stream)
    ratio = sparse_restore / plain
    table.add("sparse restore of dense vs plain PUT", "plain PUT", plain, sparse_restore, ratio, "<= 1.1x time", ratio <= 1.1, "s")
    table.add("  server CPU per GiB (restore / plain PUT)", "plain PUT", statistics.median(plain_cpu), statistics.median(restore_cpu), None, "(info)", None, "s")
    # The difference is the check of the trailer's blkhash: the same
    # restore without it.
    table.add("  the same with checksum=n (no hash)", "plain PUT", plain, unchecked, unchecked / plain, "(info)", None, "s")
    table.add("  server CPU per GiB (restore, checksum=n)", "-", None, statistics.median(unchecked_cpu), None, "(info)", None, "s")

    # The CLI against nbdcopy doing the same local work; nbdcopy to null:
    # is the NBD ceiling.
    def fresh_out():
        if os.path.exists(out):
            os.unlink(out)

    def cli_download():
        fresh_out()
        return timed(blockgate_cli, "download", "--cacert", ca, "--progress", "none", services.url("dense"), out)

    # Like for like: the CLI reports success only once the file (or the
    # image) is on stable storage, so the target compares it with nbdcopy
    # --flush; nbdcopy without it leaves the copy in the page cache and is
    # shown as information.
    def nbdcopy_download(*flush):
        def measure():
            fresh_out()
            return timed("nbdcopy", *flush, f"nbd+unix:///?socket={services.sockets['dense']}", out)
        return measure

    nbdcopy_flushed, nbdcopy_down_share = cpu_share(nbdcopy_download("--flush"))
    cli_measure, cli_down_share = cpu_share(cli_download)
    nbd_read, nbd_read_flushed, cli = interleaved(runs, nbdcopy_download(), nbdcopy_flushed, cli_measure)
    table.add("CLI download vs nbdcopy, to local raw", "nbdcopy", nbd_read, cli, nbd_read / cli, "(info)", None, "s")
    table.add("CLI download vs nbdcopy --flush", "nbdcopy", nbd_read_flushed, cli, nbd_read_flushed / cli, ">= 0.7x", nbd_read_flushed / cli >= 0.7, "s")
    table.add("  CPU of client, server and qemu-nbd, % of cores", "nbdcopy --flush", statistics.median(nbdcopy_down_share),
              statistics.median(cli_down_share), None, "(info)", None, "%")

    def nbdcopy_upload(*flush):
        return lambda: timed("nbdcopy", *flush, workloads.dense, f"nbd+unix:///?socket={services.sockets['upload']}")

    nbdcopy_up_flushed, nbdcopy_up_share = cpu_share(nbdcopy_upload("--flush"))
    cli_up_measure, cli_up_share = cpu_share(
        lambda: timed(blockgate_cli, "upload", "--cacert", ca, "--progress", "none", workloads.dense, services.url("upload")))
    nbd_write, nbd_write_flushed, cli_up = interleaved(runs, nbdcopy_upload(), nbdcopy_up_flushed, cli_up_measure)
    table.add("CLI upload vs nbdcopy, from local raw", "nbdcopy", nbd_write, cli_up, nbd_write / cli_up, "(info)", None, "s")
    table.add("CLI upload vs nbdcopy --flush", "nbdcopy", nbd_write_flushed, cli_up, nbd_write_flushed / cli_up, ">= 0.7x", nbd_write_flushed / cli_up >= 0.7, "s")
    table.add("  CPU of client, server and qemu-nbd, % of cores", "nbdcopy --flush", statistics.median(nbdcopy_up_share),
              statistics.median(cli_up_share), None, "(info)", None, "%")

    # imageio's client against its daemon, ours against ours.
    def imageio_client_download():
        fresh_out()
        code = ("import sys; from ovirt_imageio import client; "
                "client.download(sys.argv[1], sys.argv[2], sys.argv[3], fmt='raw')")
        return timed(sys.executable, "-c", code, services.imageio_url("dense"), out, ca)

    theirs, ours = interleaved(runs, imageio_client_download, cli_download)
    table.add("CLI download vs imageio's client", "imageio client", theirs, ours, theirs / ours, ">= 2x", theirs / ours >= 2, "s")

    # Sparse: cost follows data, not size.
    def cli_get(name):
        def measure():
            fresh_out()
            return timed(blockgate_cli, "download", "--cacert", ca, "--progress", "none", services.url(name), out)
        return measure

    data_alone, sparse = interleaved(runs, cli_get("sparse-data"), cli_get("sparse"))
    ratio = sparse / data_alone
    table.add("sparse download vs its 32 MiB of data", "dense 32 MiB", data_alone, sparse, ratio, "<= 1.3x time", ratio <= 1.3, "s")

    # The full sparse stream of dense against a plain GET of it.
    # Without the trailer's hash (checksum=n), what the hash costs shows.
    stream, stream_cpu = server_cpu(lambda: curl_time(services.url("dense") + "?format=sparse", ca))
    unhashed, unhashed_cpu = server_cpu(lambda: curl_time(services.url("dense") + "?format=sparse&checksum=n", ca))
    plain, full_stream, unhashed_stream = interleaved(runs, lambda: curl_time(services.url("dense"), ca), stream, unhashed)
    ratio = full_stream / plain
    table.add("full sparse stream vs plain GET, dense", "plain GET", plain, full_stream, ratio, "<= 1.15x time", ratio <= 1.15, "s")
    table.add("  server CPU per GiB (sparse out)", "-", None, statistics.median(stream_cpu), None, "(info)", None, "s")
    ratio = unhashed_stream / plain
    table.add("  the same with checksum=n", "plain GET", plain, unhashed_stream, ratio, "(info)", None, "s")
    table.add("  server CPU per GiB (sparse out, checksum=n)", "-", None, statistics.median(unhashed_cpu), None, "(info)", None, "s")

    # Extents of huge-sparse: first byte of the body and whole listing,
    # against what qemu-nbd alone takes to describe the image.
    samples = [first_byte_and_whole(services, "/images/huge/extents") for _ in range(runs)]
    first = statistics.median(s[0] for s in samples)
    whole = statistics.median(s[1] for s in samples)
    qemu_map = median_of(runs, lambda: timed("nbdinfo", "--map", f"nbd+unix:///?socket={services.sockets['huge']}"))
    # The listing also says which extents are holes, from
    # qemu:allocation-depth, which qemu-nbd computes on top of
    # base:allocation (the peer's only context): what that one costs.
    depth_map = median_of(runs, lambda: timed("nbdinfo", "--map=qemu:allocation-depth", f"nbd+unix:///?socket={services.sockets['huge']}"))
    table.add("extents of huge-sparse, first byte", "-", None, first, None, "< 0.050 s", first < 0.05, "s")
    ratio = whole / qemu_map
    table.add("extents of huge-sparse, whole listing", "nbdinfo --map", qemu_map, whole, ratio, "<= 1.2x time", ratio <= 1.2, "s")
    both = qemu_map + depth_map
    table.add("  vs both contexts, one nbdinfo --map each", "nbdinfo x2", both, whole, whole / both, "(info)", None, "s")

    # imageio's incremental (the ticket's own bitmap), for scale.
    incremental = median_of(runs, lambda: curl_time(services.url("incremental") + "?format=sparse&context=dirty", ca))
    table.add("incremental stream, ticket bitmap (1%)", "-", None, incremental, None, "(info)", None, "s")

    # Checksum of dense against imageio's.
    checksum, checksum_cpu = server_cpu(lambda: curl_time(services.url("dense") + "/checksum", ca))
    theirs, ours = interleaved(runs, lambda: curl_time(services.imageio_url("dense") + "/checksum", ca), checksum)
    table.add("checksum of dense", "imageio", theirs, ours, theirs / ours, ">= 2x", theirs / ours >= 2, "s")
    table.add("  server CPU per GiB (checksum)", "-", None, statistics.median(checksum_cpu), None, "(info)", None, "s")

    # Memory: a fresh server each, 8 concurrent downloads of dense, then 8
    # concurrent uploads, each of an eighth of dense into its eighth of the
    # upload image.
    eighth = os.path.getsize(workloads.dense) // 8
    part = os.path.join(os.path.dirname(out), "eighth.raw")
    with open(workloads.dense, "rb") as source, open(part, "wb") as target:
        target.write(source.read(eighth))
    # The commands are made after each restart: a new server has a new port.
    for label, commands in (
        ("downloads", lambda: [["curl", "-sSf", "-o", "/dev/null", "--cacert", ca, services.url("dense")] for _ in range(8)]),
        ("uploads", lambda: [["curl", "-sSf", "-o", "/dev/null", "--cacert", ca, "-T", part, "-H",
                              f"Content-Range: bytes {n * eighth}-{(n + 1) * eighth - 1}/*", services.url("upload")] for n in range(8)]),
    ):
        services.restart_blockgate()
        transfers = [subprocess.Popen(command) for command in commands()]
        if any(transfer.wait() != 0 for transfer in transfers):
            sys.exit(f"bench: one of the concurrent {label} failed")
        peak = proc_status(services.blockgate.pid, "VmHWM") / 1024
        table.add(f"server peak RSS, 8 concurrent {label}", "-", None, peak, None, "< 64 MiB", peak < 64, "MiB")
    os.unlink(part)


if __name__ == "__main__":
    main()
