#!/usr/bin/env python3
"""Network-boot benchmarks, each against its peer in the same run (ratios, not absolutes):

  http  1 GiB image, one curl client: nodekeeper vs nginx (sendfile on)        target >= 0.8x
        256 MiB compressed image, 20 clients at once, aggregate                   target >= 1.0x
  tftp  64 MiB file, blksize 1428, 1 and 20 clients: vs tftpd-hpa               target >= 1.0x
        and the windowsize gain (atftp, windowsize 16) over lockstep tftpd-hpa   goal >= 5x
  dhcp  perfdhcp DORA exchanges/s with no drops (<= 0.1%), 100,000 clients:
        vs Kea (kea-dhcp4, memfile) and dnsmasq, same namespaces and subnet     target >= 1.0x dnsmasq

usage: bench_net.py PROVISIONER WORKDIR   (BENCH=http,tftp,dhcp selects sections)
Root is needed (network namespaces for DHCP). Everything started here is stopped here.
"""
import json, os, re, shutil, signal, statistics, subprocess, sys, time

PROV, WORK = sys.argv[1], os.path.abspath(sys.argv[2])
SECTIONS = os.environ.get("BENCH", "http,tftp,dhcp").split(",")
# SQLite's synchronous level for the DHCP server's database ("normal": to measure what the
# default FULL costs; see docs/performance.md).
SYNC = "?synchronous=normal" if os.environ.get("NK_SQLITE_SYNC") == "normal" else ""
os.makedirs(WORK, exist_ok=True)
results = []


def sh(*args, check=True, **kw):
    return subprocess.run(args, check=check, capture_output=True, text=True, **kw)


def start(args, **kw):
    return subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, **kw)


def stop(p):
    if p and p.poll() is None:
        p.send_signal(signal.SIGTERM)
        try:
            p.wait(10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def wait_http(url, tries=100):
    for _ in range(tries):
        if subprocess.run(["curl", "-sf", "-o", "/dev/null", url]).returncode == 0:
            return
        time.sleep(0.1)
    raise SystemExit(f"bench: {url} never answered")


def big_file(path, size):
    if not os.path.exists(path) or os.path.getsize(path) != size:
        with open(path, "wb") as f:
            left = size
            while left:
                n = min(left, 1 << 24)
                f.write(os.urandom(n))
                left -= n


def report(what, ours, peer_name, peer, unit, target):
    ratio = ours / peer if peer else float("inf")
    results.append((what, f"{ours:,.1f} {unit}", f"{peer_name} {peer:,.1f} {unit}", f"{ratio:.2f}x", target))
    print(f"{what}: nodekeeper {ours:,.1f} {unit}, {peer_name} {peer:,.1f} {unit}, ratio {ratio:.2f}x (target {target})", flush=True)


def prov_config(path, body):
    with open(path, "w") as f:
        f.write(body)


# ---------------------------------------------------------------- HTTP
def bench_http():
    d = os.path.join(WORK, "http")
    os.makedirs(os.path.join(d, "images"), exist_ok=True)
    big_file(os.path.join(d, "images", "big.img"), 1 << 30)
    prov_config(os.path.join(d, "prov.toml"), f'database_url = "sqlite://{d}/nk.db"\n[http]\nlisten = "127.0.0.1:18181"\n'
                f'public_url = "http://127.0.0.1:18181"\nimages_dir = "{d}/images"\n')
    with open(os.path.join(d, "nginx.conf"), "w") as f:
        f.write(f"worker_processes auto;\ndaemon off;\npid {d}/nginx.pid;\nerror_log {d}/nginx.err;\nevents {{ worker_connections 64; }}\n"
                f"http {{ access_log off; sendfile on; tcp_nopush on;\n server {{ listen 127.0.0.1:18182; root {d}; location /images/ {{ }} }} }}\n")
    ours = start([PROV, "serve", "--config", f"{d}/prov.toml"])
    nginx = start(["nginx", "-c", f"{d}/nginx.conf"])
    try:
        wait_http("http://127.0.0.1:18181/healthz")
        wait_http("http://127.0.0.1:18182/images/big.img")
        # The first request computes the sha256 ETag; take it out of the measurement.
        sh("curl", "-s", "-o", "/dev/null", "http://127.0.0.1:18181/images/big.img")
        o, n = [], []
        for _ in range(5):
            for url, acc in (("http://127.0.0.1:18181/images/big.img", o), ("http://127.0.0.1:18182/images/big.img", n)):
                out = sh("curl", "-s", "-o", "/dev/null", "-w", "%{speed_download}", url).stdout
                acc.append(float(out) / 1e9)
        report("HTTP 1 GiB, 1 client (median of 5)", statistics.median(o), "nginx", statistics.median(n), "GB/s", ">= 0.8x")
        # 20 deploy agents fetching one compressed catalogue image at once (stub agents: curl
        # to /dev/null), aggregate MB/s; the two servers take turns, three rounds.
        zst = os.path.join(d, "images", "node.raw.zst")
        big_file(zst, 256 << 20)
        for url in ("http://127.0.0.1:18181/images/node.raw.zst", "http://127.0.0.1:18182/images/node.raw.zst"):
            sh("curl", "-s", "-o", "/dev/null", url)  # the ETag digest, the page cache

        def many(url, n=20):
            t = time.monotonic()
            procs = [subprocess.Popen(["curl", "-s", "-o", "/dev/null", "-w", "%{size_download}", url],
                                      stdout=subprocess.PIPE) for _ in range(n)]
            got = sum(int(p.communicate()[0] or 0) for p in procs)
            if got != n * (256 << 20):
                raise SystemExit(f"bench: {url}: {got} bytes for {n} clients")
            return got / (time.monotonic() - t) / 1e6
        o, n = [], []
        for _ in range(3):
            o.append(many("http://127.0.0.1:18181/images/node.raw.zst"))
            n.append(many("http://127.0.0.1:18182/images/node.raw.zst"))
        report("HTTP 256 MiB compressed image, 20 agents at once (median of 3)", statistics.median(o), "nginx",
               statistics.median(n), "MB/s", ">= 1.0x")
    finally:
        stop(ours)
        stop(nginx)


# ---------------------------------------------------------------- TFTP
def bench_tftp():
    d = os.path.join(WORK, "tftp")
    root = os.path.join(d, "root")
    os.makedirs(root, exist_ok=True)
    size = 64 << 20
    big_file(os.path.join(root, "big.bin"), size)
    os.chmod(d, 0o755)
    os.chmod(root, 0o755)
    os.chmod(os.path.join(root, "big.bin"), 0o644)
    prov_config(os.path.join(d, "prov.toml"), f'database_url = "sqlite://{d}/nk.db"\n[tftp]\nlisten = "127.0.0.1:16901"\nroot = "{root}"\n'
                f'[http]\nlisten = "127.0.0.1:18183"\npublic_url = "http://127.0.0.1:18183"\nimages_dir = "{d}/images"\n')
    ours = start([PROV, "serve", "--config", f"{d}/prov.toml"])
    hpa = start(["/usr/sbin/in.tftpd", "-L", "-s", "-a", "127.0.0.1:16902", root])
    out = os.path.join(d, "out")
    try:
        wait_http("http://127.0.0.1:18183/healthz")
        time.sleep(0.3)

        def curl_once(port):
            t = time.perf_counter()
            sh("curl", "-s", "--tftp-blksize", "1428", f"tftp://127.0.0.1:{port}/big.bin", "-o", out)
            assert os.path.getsize(out) == size
            return size / (time.perf_counter() - t) / 1e6

        def many(port, n=20):
            t = time.perf_counter()
            procs = [subprocess.Popen(["curl", "-s", "--tftp-blksize", "1428", f"tftp://127.0.0.1:{port}/big.bin", "-o", f"{out}{i}"]) for i in range(n)]
            for p in procs:
                assert p.wait() == 0
            took = time.perf_counter() - t
            for i in range(n):
                assert os.path.getsize(f"{out}{i}") == size
                os.remove(f"{out}{i}")
            return n * size / took / 1e6

        def atftp(port):
            t = time.perf_counter()
            sh("atftp", "--option", "windowsize 16", "--option", "blksize 1428", "-g", "-r", "big.bin", "-l", out, "127.0.0.1", str(port))
            assert os.path.getsize(out) == size
            return size / (time.perf_counter() - t) / 1e6

        o1 = statistics.median([curl_once(16901) for _ in range(3)])
        h1 = statistics.median([curl_once(16902) for _ in range(3)])
        report("TFTP 64 MiB, blksize 1428, 1 client (curl, median of 3)", o1, "tftpd-hpa", h1, "MB/s", ">= 1.0x")
        o20, h20 = many(16901), many(16902)
        report("TFTP 64 MiB x 20 clients at once, aggregate", o20, "tftpd-hpa", h20, "MB/s", ">= 1.0x")
        ow = statistics.median([atftp(16901) for _ in range(3)])
        report("TFTP windowsize 16 (atftp) vs tftpd-hpa lockstep (curl)", ow, "tftpd-hpa", h1, "MB/s", ">= 5x (goal)")
    finally:
        stop(ours)
        stop(hpa)


# ---------------------------------------------------------------- DHCP
NS_S, NS_C = f"nkb{os.getpid()}s", f"nkb{os.getpid()}c"
RATES = [int(r) for r in os.environ.get("DHCP_RATES", "100,200,400,1000,2000,4000,6000,8000,10000,12000,16000").split(",")]
SECONDS = int(os.environ.get("DHCP_SECONDS", "10"))


def netns_up():
    for ns in (NS_S, NS_C):
        sh("ip", "netns", "add", ns)
        sh("ip", "-n", ns, "link", "set", "lo", "up")
    sh("ip", "-n", NS_S, "link", "add", "veth0", "type", "veth", "peer", "name", "eth0", "netns", NS_C)
    sh("ip", "-n", NS_S, "addr", "add", "10.32.0.1/12", "dev", "veth0")
    sh("ip", "-n", NS_C, "addr", "add", "10.32.0.2/12", "dev", "eth0")
    sh("ip", "-n", NS_S, "link", "set", "veth0", "up")
    sh("ip", "-n", NS_C, "link", "set", "eth0", "up")


def netns_down():
    for ns in (NS_C, NS_S):
        sh("ip", "netns", "del", ns, check=False)


# DHCP_PREFILL=N: each server starts with N leases already in its lease store (a fleet's, held
# by other clients, at the start of the pool), as a provisioner of a big fleet does.
PREFILL = int(os.environ.get("DHCP_PREFILL", "0"))


def prefill(kind, d):
    import sqlite3
    now = int(time.time())
    leases = [(f"52:54:01:{i >> 16 & 255:02x}:{i >> 8 & 255:02x}:{i & 255:02x}",
               f"10.{33 + (i >> 16)}.{i >> 8 & 255}.{i & 255}") for i in range(1, PREFILL + 1)]
    if kind == "nodekeeper":
        sh(PROV, "--database-url", f"sqlite://{d}/nk.db", "db", "migrate")
        db = sqlite3.connect(f"{d}/nk.db")
        db.executemany("INSERT INTO leases (mac, ip, expires_at, updated_at) VALUES (?, ?, ?, ?)",
                       [(m, ip, (now + 3600) * 1000, now * 1000) for m, ip in leases])
        db.commit()
        db.close()
    elif kind == "kea":
        with open(f"{d}/leases4.csv", "w") as f:
            f.write("address,hwaddr,client_id,valid_lifetime,expire,subnet_id,fqdn_fwd,fqdn_rev,hostname,state,user_context\n")
            for m, ip in leases:
                f.write(f"{ip},{m},,3600,{now + 3600},1,0,0,,0,\n")
    else:
        with open(f"{d}/dnsmasq.leases", "w") as f:
            for m, ip in leases:
                f.write(f"{now + 3600} {m} {ip} * *\n")


def dhcp_server(kind, d):
    shutil.rmtree(d, ignore_errors=True)
    os.makedirs(d)
    if PREFILL:
        prefill(kind, d)
    if kind == "nodekeeper":
        prov_config(f"{d}/prov.toml", f'database_url = "sqlite://{d}/nk.db{SYNC}"\n[dhcp]\nmode = "full"\ninterface = "veth0"\nserver_ip = "10.32.0.1"\n'
                    f'subnet = "10.32.0.0/12"\nrange = ["10.33.0.0", "10.47.255.250"]\nallow_unknown = true\n'
                    f'[http]\nlisten = "10.32.0.1:8080"\npublic_url = "http://10.32.0.1:8080"\nimages_dir = "{d}/images"\n')
        args = [PROV, "serve", "--config", f"{d}/prov.toml"]
    elif kind == "kea":
        conf = {"Dhcp4": {
            "interfaces-config": {"interfaces": ["veth0"]},
            "lease-database": {"type": "memfile", "persist": True, "name": f"{d}/leases4.csv", "lfc-interval": 0},
            "valid-lifetime": 3600, "authoritative": True,
            "subnet4": [{"id": 1, "subnet": "10.32.0.0/12", "pools": [{"pool": "10.33.0.0 - 10.47.255.250"}]}],
            "loggers": [{"name": "kea-dhcp4", "severity": "WARN", "output_options": [{"output": f"{d}/kea.log"}]}]}}
        with open(f"{d}/kea.json", "w") as f:
            json.dump(conf, f)
        args = ["env", f"KEA_PIDFILE_DIR={d}", f"KEA_LOCKFILE_DIR={d}", "kea-dhcp4", "-c", f"{d}/kea.json"]
    else:
        args = ["dnsmasq", "--no-daemon", "--port=0", "--conf-file=/dev/null", "--no-resolv", "--no-hosts", "--interface=veth0",
                "--bind-interfaces", "--dhcp-range=10.33.0.0,10.47.255.250,1h", "--dhcp-lease-max=2000000",
                # dnsmasq pings every address before offering it (~3 s), which perfdhcp counts
                # as a drop; nodekeeper and Kea do not ping, so compare without.
                "--no-ping",
                f"--dhcp-leasefile={d}/dnsmasq.leases", "--dhcp-authoritative", f"--pid-file={d}/dnsmasq.pid", "--log-facility=/dev/null"]
    p = start(["ip", "netns", "exec", NS_S] + args)
    time.sleep(2)
    return p


def perfdhcp(rate):
    out = sh("ip", "netns", "exec", NS_C, "timeout", str(SECONDS + 30), "perfdhcp", "-4", "-l", "eth0", "-r", str(rate),
             "-R", "100000", "-p", str(SECONDS), check=False).stdout
    achieved = float(re.search(r"Rate: ([\d.]+) 4-way", out).group(1)) if "Rate:" in out else 0.0
    sent = sum(int(x) for x in re.findall(r"sent packets: (\d+)", out))
    recv = sum(int(x) for x in re.findall(r"received packets: (\d+)", out))
    drops = (sent - recv) / sent if sent else 1.0
    return achieved, drops


def bench_dhcp():
    netns_up()
    best = {}
    try:
        for kind in os.environ.get("DHCP_SERVERS", "nodekeeper,kea,dnsmasq").split(","):
            best[kind] = 0.0
            for rate in RATES:
                d = os.path.join(WORK, "dhcp", kind)
                p = dhcp_server(kind, d)
                try:
                    achieved, drops = perfdhcp(rate)
                finally:
                    stop(p)
                    sh("pkill", "-f", f"{d}/", check=False)
                print(f"  dhcp {kind:<10} offered {rate:>6}/s: {achieved:>9,.1f} DORA/s, drops {drops * 100:.3f}%", flush=True)
                if drops <= 0.001:
                    best[kind] = max(best[kind], achieved)
                else:
                    break
        what = "DHCP DORA/s, no drops (<= 0.1%), 100k clients" + (f", {PREFILL:,} leases held" if PREFILL else "")
        if "nodekeeper" in best and "dnsmasq" in best:
            report(what, best["nodekeeper"], "dnsmasq", best["dnsmasq"], "DORA/s", ">= 1.0x dnsmasq")
        if "nodekeeper" in best and "kea" in best:
            report(what, best["nodekeeper"], "Kea", best["kea"], "DORA/s", "goal >= 1.5x Kea")
    finally:
        netns_down()


for section in SECTIONS:
    {"http": bench_http, "tftp": bench_tftp, "dhcp": bench_dhcp}[section]()

print()
print(f"{'benchmark':<58} {'nodekeeper':>16} {'peer':>24} {'ratio':>7}  target")
for r in results:
    print(f"{r[0]:<58} {r[1]:>16} {r[2]:>24} {r[3]:>7}  {r[4]}")
