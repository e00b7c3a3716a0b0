"""The CLI's transfers to and from a local raw file against nbdcopy --flush
doing the same local work on the same qemu-nbd export: the rows "CLI
download/upload vs nbdcopy --flush" of bench.py, alone, with the CPU
seconds (user+sys) per GiB of the client (its own and its children's)
and of the services (blockgate-server and the qemu-nbd exports): on a
machine of few cores their sum bounds the wall time. Builds nothing:
build the release binaries first. Needs no imageio: plain python3.

Usage: python3 tests/bench/cli_local.py [--runs N] [--source RAW]
  [--cli PATH]... (several --cli compare builds, interleaved)
"""

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

from bench import BIN, GIB, curl_ok, free_port, run, wait_for


def cpu_seconds(pids):
    """User+sys CPU seconds the processes `pids` used so far."""
    ticks = 0
    for pid in pids:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        ticks += int(fields[11]) + int(fields[12])
    return ticks / os.sysconf("SC_CLK_TCK")


def measured(services, *cmd):
    """Runs cmd: its wall-clock seconds, its CPU seconds (user+sys, with
    the children it waited for) and those of the `services` pids."""
    before = cpu_seconds(services)
    started = time.monotonic()
    child = subprocess.Popen(cmd, stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(child.pid, 0)
    seconds = time.monotonic() - started
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"{cmd} failed: {os.waitstatus_to_exitcode(status)}")
    return seconds, usage.ru_utime + usage.ru_stime, cpu_seconds(services) - before


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--source", default="/work/main/target/bench-work/dense.raw")
    parser.add_argument("--cli", action="append", help="blockgate binaries to compare [default: target/release/blockgate]")
    args = parser.parse_args()
    clis = args.cli or [os.path.join(BIN, "blockgate")]
    work = tempfile.mkdtemp(prefix="cli-local-", dir=os.path.join(BIN, ".."))
    children = []
    try:
        size = os.path.getsize(args.source)
        target = os.path.join(work, "target.raw")
        run("fallocate", "-l", str(size), target)
        sockets = {}
        for name, path, extra in (("dense", args.source, ["-r"]), ("upload", target, [])):
            sockets[name] = os.path.join(work, f"{name}.sock")
            children.append(subprocess.Popen(["qemu-nbd", "-t", "-e", "16", "-A", "-f", "raw", "-k", sockets[name], *extra, path]))
            wait_for(lambda: os.path.exists(sockets[name]), f"qemu-nbd {name}")
        port = free_port()
        state = os.path.join(work, "state")
        images = [f"dense=nbd+unix:///?socket={sockets['dense']},ro", f"upload=nbd+unix:///?socket={sockets['upload']}"]
        children.append(subprocess.Popen([os.path.join(BIN, "blockgate-server"), "--listen", f"127.0.0.1:{port}", "--state-dir", state,
                                          "--log", "warn", *sum((["--image", image] for image in images), [])]))
        ca = os.path.join(state, "ca.pem")
        url = lambda name: f"https://localhost:{port}/images/{name}"
        wait_for(lambda: os.path.exists(ca) and curl_ok(f"https://localhost:{port}/info/", ca), "blockgate-server")
        out = os.path.join(work, "out.raw")
        services = [child.pid for child in children]
        timed = lambda *cmd: measured(services, *cmd)

        def fresh(measure):
            def fresh_run():
                if os.path.exists(out):
                    os.unlink(out)
                return measure()
            return fresh_run

        measures = {"nbdcopy --flush download": fresh(lambda: timed("nbdcopy", "--flush", f"nbd+unix:///?socket={sockets['dense']}", out))}
        for cli in clis:
            measures[f"{cli} download"] = fresh(
                lambda cli=cli: timed(cli, "download", "--cacert", ca, "--progress", "none", url("dense"), out))
        measures["nbdcopy --flush upload"] = lambda: timed("nbdcopy", "--flush", args.source, f"nbd+unix:///?socket={sockets['upload']}")
        for cli in clis:
            measures[f"{cli} upload"] = lambda cli=cli: timed(cli, "upload", "--cacert", ca, "--progress", "none", args.source, url("upload"))
        samples = {name: [] for name in measures}
        for _ in range(args.runs):
            for name, measure in measures.items():
                samples[name].append(measure())
        gib = size / GIB
        median = {name: [statistics.median(run[i] for run in runs) for i in range(3)] for name, runs in samples.items()}
        for name, runs in samples.items():
            seconds, cpu, services_cpu = median[name]
            peer = median["nbdcopy --flush " + name.rsplit(" ", 1)[1]][0]
            each = " ".join(f"{run[0]:.2f}" for run in runs)
            print(f"{name:<52} median {seconds:5.2f} s ({each})  client cpu {cpu / gib:4.2f} s/GiB"
                  f"  services cpu {services_cpu / gib:4.2f} s/GiB  nbdcopy/this {peer / seconds:4.2f}x")
    finally:
        for child in reversed(children):
            child.terminate()
        for child in children:
            child.wait(timeout=15)
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
