#!/usr/bin/env python3
"""Benchmark `nodekeeper-guard boot`: N libvirt definitions (40% owned elsewhere, every one
with an autostart link), on SQLite and PostgreSQL, for N in 100, 1,000, 10,000.

Each measured run starts from a fresh copy of the node's files, so it does the full job
(scan, one batched query, quarantine 40%, record events). Prints one line per case:
engine, N, median wall time of the process over RUNS runs, and the report's own elapsed_ms.
"""
import json, os, shutil, statistics, subprocess, sys, time, uuid

GUARD, PROVISIONER, WORK, PG_ADMIN = sys.argv[1:5]
SIZES = [int(s) for s in os.environ.get("SIZES", "100,1000,10000").split(",")]
RUNS = int(os.environ.get("RUNS", "5"))
NK = "https://nodekeeper.dev/xmlns/instance/1"

XML = """<!--
WARNING: THIS IS AN AUTO-GENERATED FILE. CHANGES TO IT ARE LIKELY TO BE
OVERWRITTEN AND LOST. Changes to this xml configuration should be made using:
  virsh edit {name}
-->

<domain type='kvm'>
  <name>{name}</name>
  <uuid>{uuid}</uuid>
  <metadata>
    <nk:instance xmlns:nk="{nk}" generation="1" ha="true"/>
  </metadata>
  <memory unit='KiB'>2097152</memory>
  <currentMemory unit='KiB'>2097152</currentMemory>
  <vcpu placement='static'>2</vcpu>
  <os>
    <type arch='x86_64' machine='pc-q35-7.2'>hvm</type>
    <boot dev='hd'/>
  </os>
  <features><acpi/><apic/></features>
  <cpu mode='host-passthrough' check='none' migratable='on'/>
  <clock offset='utc'/>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>restart</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <disk type='network' device='disk'>
      <driver name='qemu' type='raw' cache='none'/>
      <source protocol='rbd' name='vms/{uuid}_disk'/>
      <target dev='vda' bus='virtio'/>
    </disk>
    <interface type='bridge'>
      <mac address='52:54:00:{m1:02x}:{m2:02x}:{m3:02x}'/>
      <source bridge='br0'/>
      <model type='virtio'/>
    </interface>
    <serial type='pty'><target port='0'/></serial>
    <console type='pty'><target type='serial' port='0'/></console>
    <graphics type='vnc' port='-1' autoport='yes' listen='127.0.0.1'/>
    <video><model type='virtio' heads='1' primary='yes'/></video>
    <memballoon model='virtio'/>
  </devices>
</domain>
"""

def run(*args, env=None, capture=True):
    return subprocess.run(args, check=True, capture_output=capture, text=True, env=env)

def setup(engine, n):
    base = os.path.join(WORK, f"boot-{engine}-{n}")
    shutil.rmtree(base, ignore_errors=True)
    template = os.path.join(base, "template/etc/libvirt/qemu")
    os.makedirs(os.path.join(template, "autostart"))
    if engine == "sqlite":
        url = f"sqlite://{base}/nk.db"
    else:
        db = f"nk_bench_boot_{n}"
        run("psql", "-q", PG_ADMIN, "-c", f"DROP DATABASE IF EXISTS {db} WITH (FORCE)")
        run("psql", "-q", PG_ADMIN, "-c", f"CREATE DATABASE {db}")
        url = PG_ADMIN.rsplit("/", 1)[0] + "/" + db
    env = dict(os.environ, NODEKEEPER_DATABASE_URL=url)
    run(PROVISIONER, "db", "migrate", env=env)
    for h in ("node-a", "node-b"):
        run(PROVISIONER, "host", "add", h, env=env)
    lines = []
    for i in range(n):
        u = str(uuid.uuid4())
        name = f"instance-{i:06d}"
        owner = "node-b" if i % 5 < 2 else "node-a"  # 40% owned elsewhere
        path = os.path.join(template, name + ".xml")
        with open(path, "w") as f:
            f.write(XML.format(name=name, uuid=u, nk=NK, m1=(i >> 16) & 255, m2=(i >> 8) & 255, m3=i & 255))
        os.symlink(path.replace("/template/", "/run/"), os.path.join(template, "autostart", name + ".xml"))
        lines.append(json.dumps({"uuid": u, "name": name, "host": owner, "ha": True, "storage": "shared"}))
    inv = os.path.join(base, "inventory.jsonl")
    with open(inv, "w") as f:
        f.write("\n".join(lines) + "\n")
    run(PROVISIONER, "instance", "import", inv, env=env)
    config = os.path.join(base, "guard.toml")
    with open(config, "w") as f:
        f.write(f'host = "node-a"\ndatabase_url = "{url}"\n[libvirt]\nconfig_dir = "{base}/run/etc/libvirt/qemu"\n'
                f'[boot]\nstate_dir = "{base}/run/var/lib/nodekeeper"\ndb_wait = "5s"\n')
    return base, config

def measure(engine, n):
    base, config = setup(engine, n)
    walls, internal = [], []
    for _ in range(RUNS):
        shutil.rmtree(os.path.join(base, "run"), ignore_errors=True)
        shutil.copytree(os.path.join(base, "template"), os.path.join(base, "run"), symlinks=True)
        subprocess.run(["sync"], check=True)
        t0 = time.perf_counter()
        out = run(GUARD, "boot", "--json", "--config", config)
        walls.append(time.perf_counter() - t0)
        report = json.loads(out.stdout)
        assert report["database"] == "ok", report
        assert len(report["quarantined"]) == n * 2 // 5, (len(report["quarantined"]), n)
        assert len(report["kept"]) == n - n * 2 // 5
        internal.append(report["elapsed_ms"])
    return statistics.median(walls), statistics.median(internal)

print(f"{'engine':<10} {'definitions':>11} {'quarantined':>11} {'wall (median)':>14} {'report elapsed_ms':>18}")
for engine in ("sqlite", "postgres"):
    for n in SIZES:
        wall, ms = measure(engine, n)
        print(f"{engine:<10} {n:>11} {n * 2 // 5:>11} {wall * 1000:>11.0f} ms {ms:>15.0f} ms", flush=True)
